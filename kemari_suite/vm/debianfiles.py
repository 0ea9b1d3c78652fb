"""What the Debian test guest runs: its service configuration, its init, its console
protocol, and the list of every file the build writes into the image.

Everything here is hashed into the image key (:func:`kemari_suite.vm.debian.image_key`):
a change to any of these texts builds a new image. The build itself is
:func:`kemari_suite.vm.debian.build_debian_image`.
"""

from __future__ import annotations

ROOT_DEVICE = "/dev/vda"
KEMARI_INIT = "/sbin/kemari-init"
RECORDS_DIR = "/srv/records"
HTTP_PORT = 80

#: Console lines of kemari-init.
READY_MARKER = "KEMARI-SERVICE-READY"
FAILED_MARKER = "KEMARI-SERVICE-FAILED"
STOPPED_MARKER = "KEMARI-SERVICE-STOPPED"

NGINX_CONF = """\
# Written by kemari_suite/vm/debian.py: the whole configuration, nothing is included.
user www-data;
# The test guest has 2 vCPUs.
worker_processes 2;
pid /run/nginx.pid;
error_log /var/log/nginx/error.log warn;

events {
    worker_connections 256;
}

http {
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    keepalive_timeout 30;
    client_max_body_size 64m;
    server_tokens off;

    server {
        listen 80 default_server;
        server_name _;

        location = /health {
            default_type text/plain;
            return 200 "ok\\n";
        }

        # /records/<name> is /srv/records/<name>. PUT writes the body to a temporary
        # file and renames it into place, so the temporary directory is on the same
        # filesystem: a reader never sees half a record.
        location /records/ {
            root /srv;
            client_body_temp_path /srv/.nginx-body;
            dav_methods PUT DELETE;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
            autoindex on;
            autoindex_format json;
        }

        # PUT /control/stop asks kemari-init to stop the guest cleanly. The trigger
        # lives on the tmpfs /run, so it never survives into the next boot.
        location /control/ {
            root /run/kemari;
            client_body_temp_path /run/kemari/body;
            dav_methods PUT;
            create_full_put_path on;
        }
    }
}
"""

# bash, not dash: /dev/tcp gives a real HTTP health check without installing curl.
KEMARI_INIT_SH = r"""#!/bin/bash
# PID 1 of the Kemari Debian guest, exec'd by the initramfs through switch_root
# (kemari.root=, see kemari_suite/guest/init.sh). Written by kemari_suite/vm/debian.py.
#
# Console protocol (ttyS0):
#   KEMARI-SERVICE-READY <s>   nginx answered GET /health (s: seconds since boot)
#   KEMARI-SERVICE-FAILED ...  nginx did not start or never answered
#   KEMARI-SERVICE-STOPPED ro=<yes|no>  after a stop request: nginx gone, data synced,
#                              / remounted read-only (ro=yes); the guest powers off next
# A stop is requested by PUT /control/stop or by Ctrl-Alt-Del (SIGINT to init).
# Init never exits: PID 1 exiting panics the kernel.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
umask 022

log() { echo "kemari-init: $*"; }

mounted() { grep -q "^[^ ]* $1 " /proc/mounts 2>/dev/null; }

# The initramfs moved /dev, /proc and /sys here; mount whatever it did not.
[ -e /proc/self ] || mount -t proc proc /proc
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mounted /dev/pts || mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mounted /dev/shm || mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir -p /run/lock /run/kemari/control /run/kemari/body
chown www-data:www-data /run/kemari/control /run/kemari/body

cat /etc/hostname > /proc/sys/kernel/hostname 2>/dev/null
ip link set lo up
# eth0 was configured by the initramfs: kernel state, it survives switch_root.
if [ -e /sys/class/net/eth0 ]; then
    log "eth0 $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
fi
# Ctrl-Alt-Del sends SIGINT to init instead of rebooting at once.
echo 0 > /proc/sys/kernel/ctrl-alt-del

stop_requested=0
trap 'stop_requested=1' INT TERM

health() {
    local line
    exec 3<>/dev/tcp/127.0.0.1/80 || return 1
    printf 'GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
    read -r -t 5 line <&3
    exec 3<&- 3>&-
    [[ $line == HTTP/1.?" 200"* ]]
}

uptime_s() { cut -d' ' -f1 /proc/uptime; }

stop_guest() {
    log "stopping"
    local pid i
    pid=$(cat /run/nginx.pid 2>/dev/null)
    nginx -s quit 2>/dev/null
    for ((i = 0; i < 300; i++)); do
        [ -n "$pid" ] && [ -e "/proc/$pid" ] || break
        sleep 0.1
    done
    sync
    local ro=no
    mount -o remount,ro / && ro=yes
    echo "KEMARI-SERVICE-STOPPED ro=$ro"
    # No init system here to call poweroff(8): the sysrq trigger is the kernel's own.
    echo o > /proc/sysrq-trigger
    while :; do sleep 3600; done
}

if nginx; then
    ready=0
    for ((i = 0; i < 1200; i++)); do
        if health 2>/dev/null; then
            ready=1
            break
        fi
        sleep 0.1
    done
    if [ "$ready" = 1 ]; then
        echo "KEMARI-SERVICE-READY $(uptime_s)"
    else
        echo "KEMARI-SERVICE-FAILED no answer on port 80"
        tail -n 20 /var/log/nginx/error.log
    fi
else
    echo "KEMARI-SERVICE-FAILED nginx exited $?"
    tail -n 20 /var/log/nginx/error.log
fi

# Sleeping in the foreground also reaps orphans: bash waits for any child.
while :; do
    if [ "$stop_requested" = 1 ] || [ -e /run/kemari/control/stop ]; then
        stop_guest
    fi
    sleep 0.5
done
"""

# Runs in the chroot during the build: nothing may start while packages are installed.
POLICY_RC_D = "#!/bin/sh\nexit 101\n"

HOSTNAME = "kemari-debian"

#: Every file this module writes into the image: (path, content, mode). Hashed in the key.
IMAGE_FILES: tuple[tuple[str, str, int], ...] = (
    (KEMARI_INIT, KEMARI_INIT_SH, 0o755),
    ("/etc/nginx/nginx.conf", NGINX_CONF, 0o644),
    ("/etc/hostname", HOSTNAME + "\n", 0o644),
    ("/etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n", 0o644),
    ("/etc/resolv.conf", "", 0o644),
)

#: Directories owned by nginx's worker user (www-data) in the image.
SERVICE_DIRS: tuple[str, ...] = (RECORDS_DIR, "/srv/.nginx-body")

#: Removed from the image after the install: caches and documentation nobody reads.
CLEAN_PATHS: tuple[str, ...] = (
    "/var/cache/apt",
    "/var/lib/apt/lists",
    "/usr/share/doc",
    "/usr/share/man",
    "/usr/share/info",
    "/usr/share/locale",
)

__all__ = [
    "CLEAN_PATHS",
    "FAILED_MARKER",
    "HOSTNAME",
    "HTTP_PORT",
    "IMAGE_FILES",
    "KEMARI_INIT",
    "KEMARI_INIT_SH",
    "NGINX_CONF",
    "POLICY_RC_D",
    "READY_MARKER",
    "RECORDS_DIR",
    "ROOT_DEVICE",
    "SERVICE_DIRS",
    "STOPPED_MARKER",
]
