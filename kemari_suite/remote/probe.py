"""The script ``kemari remote`` runs on a host, with the host's own Python.

It is sent inline (``python3 -c``) so that it needs nothing installed but Python 3.11's
standard library, and works whether or not the kemari package is importable there. Its
per-host parameters arrive as environment variables (fabric sets them per connection,
so one command line serves both hosts of a group):

``KEMARI_ROOT``, ``KEMARI_CONFIG``, ``KEMARI_UNIT``, ``KEMARI_BIN``, ``KEMARI_SYSTEMCTL``.

``status`` prints one JSON object (see :data:`STATUS_KEYS`). ``logs OUT`` writes a
gzipped tar of the unit's journal, the unit file, the config with its key redacted,
DRBD resource files, the agent's artifact folder and the status, and prints its path.
"""

from __future__ import annotations

#: Keys of the object ``status`` prints.
STATUS_KEYS = (
    "hostname",
    "unit",
    "systemd",
    "unit_active",
    "unit_enabled",
    "unit_installed",
    "config_present",
    "kemari_installed",
    "agent",
    "agent_error",
)

SCRIPT = r"""
import json, os, re, subprocess, sys, tarfile, time, io

E = os.environ
ROOT = E.get("KEMARI_ROOT", "/").rstrip("/")
CONFIG = E["KEMARI_CONFIG"]
UNIT = E["KEMARI_UNIT"]
KEMARI = E["KEMARI_BIN"]
SYSTEMCTL = E.get("KEMARI_SYSTEMCTL", "systemctl")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def run(argv, timeout=20):
    env = dict(os.environ, COLUMNS="500", NO_COLOR="1", TERM="dumb")
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, env=env)
    except FileNotFoundError:
        return 127, "", "%s: not found" % argv[0]
    except subprocess.TimeoutExpired:
        return 124, "", "%s: timed out after %ss" % (argv[0], timeout)
    return p.returncode, p.stdout, p.stderr


def systemd():
    # A substitute systemctl (KEMARI_SYSTEMCTL) is trusted to answer on its own.
    return SYSTEMCTL != "systemctl" or (ROOT == "" and os.path.isdir("/run/systemd/system"))


def unit_file():
    return ROOT + "/etc/systemd/system/" + UNIT


def status():
    st = {"hostname": os.uname().nodename, "unit": UNIT, "systemd": systemd()}
    st["unit_installed"] = os.path.exists(unit_file())
    if st["systemd"]:
        st["unit_active"] = run([SYSTEMCTL, "is-active", UNIT])[1].strip() or "unknown"
        st["unit_enabled"] = run([SYSTEMCTL, "is-enabled", UNIT])[1].strip() or "unknown"
    else:
        # Files mode: no service manager to ask; the enable link says what boot would do.
        link = ROOT + "/etc/systemd/system/multi-user.target.wants/" + UNIT
        st["unit_active"] = "unknown"
        st["unit_enabled"] = ("enabled" if os.path.lexists(link)
                              else "disabled" if st["unit_installed"] else "not-found")
    st["config_present"] = os.path.isfile(CONFIG)
    st["kemari_installed"] = os.access(KEMARI, os.X_OK)
    st["agent"], st["agent_error"] = None, None
    if not st["kemari_installed"]:
        st["agent_error"] = "kemari is not installed at %s" % KEMARI
    elif not st["config_present"]:
        st["agent_error"] = "no config at %s" % CONFIG
    else:
        rc, out, err = run([KEMARI, "status", "--json", "-c", CONFIG])
        if rc == 0:
            try:
                st["agent"] = json.loads(out)
            except ValueError:
                st["agent_error"] = "kemari status printed no JSON: %s" % out.strip()[:200]
        else:
            text = ANSI.sub("", err or out)
            flat = " ".join(text.split())
            if "error:" in flat:
                text = flat[flat.rindex("error:") + len("error:"):].strip()
            else:
                lines = [l.strip() for l in text.splitlines() if l.strip()]
                text = lines[-1] if lines else ""
            st["agent_error"] = (text or "kemari status exited %d" % rc)[:500]
    return st


def redact(text):
    return re.sub(r'(?m)^(\s*key\s*=\s*)(".*?"|\'.*?\')', r'\1"<redacted>"', text)


def add_bytes(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def run_dir():
    try:
        import tomllib
        with open(CONFIG, "rb") as f:
            return tomllib.load(f).get("paths", {}).get("run_dir") or "/run/kemari"
    except Exception:
        return "/run/kemari"


def logs(out, max_file=64 << 20):
    with tarfile.open(out, "w:gz") as tar:
        st = status()
        add_bytes(tar, "status.json", json.dumps(st, indent=2).encode())
        if st["systemd"] and SYSTEMCTL == "systemctl":
            rc, o, e = run(["journalctl", "-u", UNIT, "--no-pager", "-o", "short-iso",
                            "-n", "20000"], timeout=60)
            add_bytes(tar, "journal.txt", (o or e).encode())
        else:
            add_bytes(tar, "journal.txt",
                      b"no journal: systemd does not run this host's services\n")
        for path, name in ((unit_file(), "unit/" + UNIT),):
            if os.path.isfile(path):
                tar.add(path, arcname=name)
        if os.path.isfile(CONFIG):
            with open(CONFIG, errors="replace") as f:
                add_bytes(tar, "kemari.toml", redact(f.read()).encode())
        drbd = ROOT + "/etc/drbd.d"
        if os.path.isdir(drbd):
            for n in sorted(os.listdir(drbd)):
                if n.endswith(".res"):
                    tar.add(os.path.join(drbd, n), arcname="drbd/" + n)
        arts = os.path.join(run_dir(), "artifacts")
        if os.path.isdir(arts):
            for base, dirs, files in os.walk(arts):
                for n in sorted(files):
                    p = os.path.join(base, n)
                    try:
                        if os.path.getsize(p) <= max_file:
                            tar.add(p, arcname="artifacts/" + os.path.relpath(p, arts))
                    except OSError:
                        pass
    print(out)


if sys.argv[1] == "status":
    print(json.dumps(status()))
elif sys.argv[1] == "logs":
    logs(sys.argv[2])
else:
    sys.exit("unknown action %s" % sys.argv[1])
"""
