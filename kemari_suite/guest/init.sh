#!/bin/sh
# Kemari guest init: PID 1 of the initramfs built by kemari_suite/vm/image.py.
#
# Kernel command line parameters (all optional):
#   kemari.ip=A.B.C.D/NN   address for eth0 (lo is always brought up)
#   kemari.gw=A.B.C.D      default route
#   kemari.run=CMD         command to run, percent-encoded: every byte outside
#                          [A-Za-z0-9._/,:=+-] is written %HH (so a space is %20);
#                          kernel_cmdline(run=...) does the encoding. It takes
#                          precedence over the command baked in at build time
#                          (/etc/kemari/run).
#   kemari.root=/dev/vda   after modules and network, mount this ext4 device and
#                          switch_root into it (kemari.run is then not run); if that
#                          fails, init goes on as if the option were absent
#   kemari.rootinit=PATH   the program to exec in the new root (default
#                          /sbin/kemari-init, see kemari_suite/vm/debian.py)
#   kemari.rootflags=OPTS  mount options for the root (default rw)
#
# Console protocol (on ttyS0 with console=ttyS0):
#   "KEMARI-BOOTED"        init is ready: modules loaded, network configured
#   "KEMARI-ROOT <dev>"    kemari.root is mounted; switch_root follows
#   "KEMARI-EXIT <rc>"     the command returned (init then sleeps forever)
# Without any command, a shell is (re)started on the console.
# Init must never exit: PID 1 exiting panics the kernel.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
umask 022
set -f

log() { echo "kemari-init: $*"; }

[ -x /bin/mount ] || /bin/busybox --install -s

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm

# Modules, in the order written by the image builder (dependencies first).
if [ -f /etc/kemari/modules ]; then
    while read -r mod; do
        [ -n "$mod" ] || continue
        insmod "/lib/modules/$mod" || log "insmod $mod failed"
    done < /etc/kemari/modules
fi

urldecode() {
    printf '%b' "$(printf '%s' "$1" | sed 's/%\([0-9A-Fa-f][0-9A-Fa-f]\)/\\x\1/g')"
}

ip_cidr=
gw=
run=
root=
rootinit=/sbin/kemari-init
rootflags=rw
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        kemari.ip=*) ip_cidr=${arg#kemari.ip=} ;;
        kemari.gw=*) gw=${arg#kemari.gw=} ;;
        kemari.run=*) run=$(urldecode "${arg#kemari.run=}") ;;
        kemari.root=*) root=${arg#kemari.root=} ;;
        kemari.rootinit=*) rootinit=${arg#kemari.rootinit=} ;;
        kemari.rootflags=*) rootflags=${arg#kemari.rootflags=} ;;
    esac
done
set +f

hostname kemari-guest
ip link set lo up
if [ -n "$ip_cidr" ]; then
    # virtio_net probes synchronously in insmod, but give udev-less setups a moment.
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ "$i" -lt 50 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    if ip link set eth0 up && ip addr add "$ip_cidr" dev eth0; then
        if [ -n "$gw" ]; then
            ip route add default via "$gw" || log "default route via $gw failed"
        fi
    else
        log "could not configure eth0 with $ip_cidr"
    fi
fi

[ -n "$run" ] || run=$(cat /etc/kemari/run 2>/dev/null)

# The leading newline puts the marker on a line of its own: firmware and kernel leave
# terminal escape sequences without a newline at the start of the console.
printf '\nKEMARI-BOOTED\n'

# Returns only if the switch cannot be made; then the root is left unmounted.
switch_to_root() {
    # virtio_blk probes synchronously in insmod; the wait covers slower disk drivers.
    i=0
    while [ ! -b "$root" ] && [ "$i" -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    if [ ! -b "$root" ]; then
        log "kemari.root: no block device $root"
        return 1
    fi
    mkdir -p /newroot
    if ! mount -t ext4 -o "$rootflags" "$root" /newroot; then
        log "kemari.root: cannot mount $root (ext4, $rootflags)"
        return 1
    fi
    if [ ! -x "/newroot$rootinit" ]; then
        log "kemari.root: $root has no executable $rootinit"
        umount /newroot
        return 1
    fi
    # Hand the kernel filesystems over instead of remounting them: /dev carries the
    # console and devpts, and the new init need not know what the initramfs did.
    # The network configuration is kernel state and survives the switch as it is.
    for m in /dev /proc /sys; do
        [ -d "/newroot$m" ] && mount -o move "$m" "/newroot$m" || log "cannot move $m"
    done
    echo "KEMARI-ROOT $root"
    exec switch_root /newroot "$rootinit"
}

if [ -n "$root" ]; then
    switch_to_root
    # exec failed or never happened: /proc etc. may have moved, bring them back.
    [ -e /proc/self ] || mount -t proc proc /proc
fi

if [ -n "$run" ]; then
    log "running: $run"
    sh -c "$run"
    echo "KEMARI-EXIT $?"
    while :; do sleep 3600; done
fi

while :; do
    setsid cttyhack sh -l
    sleep 1
done
