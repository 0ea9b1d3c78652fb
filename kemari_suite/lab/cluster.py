"""A real Corosync + Pacemaker cluster on a lab: two cluster nodes and a qnetd witness.

The lab's primary and secondary namespaces are the cluster nodes ``a`` and ``b``; its
client namespace (the LAN) runs ``corosync-qnetd``, the third vote. Each node is a
*host* in the sense the cluster needs: its own network namespace (the lab's), and its
own mount and UTS namespaces, held open by one holder process (``sleep``) that the
node's daemons join with ``nsenter``::

    node a (kemari-<id>-pri)                    node b (kemari-<id>-sec)
      holder: unshare --mount --uts                holder: the same
        /run         tmpfs; the machine's /run       /etc/corosync     <root>/b/etc-corosync
                     entries bound back in           /var/lib/corosync <root>/b/lib-corosync
                     (netns, lock, kemari, ...)      /var/lib/pacemaker, /var/log/pacemaker
        /dev/shm     tmpfs                           /dev/shm, /run    tmpfs
        /etc/corosync, /var/lib/corosync,            /usr/lib/ocf/resource.d, /usr/sbin:
        /var/lib/pacemaker, /var/log/pacemaker:      overlays adding ocf:kemari:vm and
                     <root>/a/...                    the test fence agent
        /usr/lib/ocf/resource.d, /usr/sbin: read-only overlays (the test's agents first)
      corosync -f, corosync-qdevice -f, pacemakerd   (same daemons)

    kemari-<id>-cli: corosync-qnetd -f -s off (its own /run), listening on the LAN

Why each of these: corosync locks ``/var/run/corosync.pid`` (fixed path), pacemaker
keeps the CIB in ``/var/lib/pacemaker/cib`` and the IPC of libqb puts its ring buffers
in ``/dev/shm`` while the connection sockets are *abstract* unix sockets, which belong
to the network namespace. So one host's pacemaker daemons find their own corosync (and
its ``/dev/shm`` files) and never the other host's; :meth:`ClusterLab.check_isolation`
verifies it from the daemons' views. The UTS namespace gives each node its hostname,
which pacemaker and ``crm_attribute`` use as the local node name.

Everything is started by this module and stopped by PID (:meth:`ClusterLab.stop`);
:meth:`ClusterLab.kill_node` SIGKILLs every process in a node's network namespace, the
"host lost" fault. Nothing is written outside ``root`` (the private mounts vanish with
their holder).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kemari_suite.errors import LabError
from kemari_suite.lab.addressing import LabLayout

#: The qnetd's TCP port on the client's LAN address.
QNETD_PORT = 5403
#: corosync's knet port on each node.
KNET_PORT = 5405
#: Daemons looked for on PATH (Debian: pacemaker, corosync, corosync-qdevice/-qnetd).
BINARIES = ("corosync", "pacemakerd", "corosync-qdevice", "corosync-qnetd", "crm_mon")

_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_HACLUSTER = "hacluster"
_HACLIENT = "haclient"


def missing_binaries() -> list[str]:
    """The cluster daemons and tools that are not installed here."""
    return [b for b in BINARIES if shutil.which(b, path=_PATH) is None]


@dataclass(frozen=True)
class ClusterNode:
    """One cluster node: its name (also its hostname), corosync node id, namespace and
    address on the LAN (the cluster network)."""

    name: str
    nodeid: int
    ns: str
    ip: str


def corosync_conf(cluster: str, nodes: Sequence[ClusterNode], qnetd: str | None) -> str:
    """corosync.conf for ``nodes``: knet on the LAN, votequorum, and qdevice (model net,
    ffsplit, TLS off: the lab's LAN is private) at ``qnetd`` ("host:port") when given;
    without it the two-node special case. Pure."""
    lines = [
        "totem {",
        "    version: 2",
        f"    cluster_name: {cluster}",
        "    transport: knet",
        "    crypto_cipher: none",
        "    crypto_hash: none",
        # A loaded 2-core machine stalls daemons for a second or more: a short token
        # would make the lab see failures that are only scheduling.
        "    token: 3000",
        "}",
        "nodelist {",
    ]
    for n in nodes:
        lines += [
            "    node {",
            f"        ring0_addr: {n.ip}",
            f"        name: {n.name}",
            f"        nodeid: {n.nodeid}",
            "    }",
        ]
    lines += ["}", "quorum {", "    provider: corosync_votequorum"]
    if qnetd:
        host, _, port = qnetd.rpartition(":")
        lines += [
            "    device {",
            "        model: net",
            "        votes: 1",
            "        net {",
            f"            host: {host}",
            f"            port: {port}",
            "            algorithm: ffsplit",
            "            tls: off",
            "        }",
            "    }",
        ]
    else:
        lines.append("    two_node: 1")
    lines += [
        "}",
        "logging {",
        "    to_syslog: no",
        "    to_stderr: no",
        "    to_logfile: yes",
        "    logfile: /var/log/pacemaker/corosync.log",
        "    timestamp: on",
        "}",
        "",
    ]
    return "\n".join(lines)


def stash_dir(lab_id: str, host: str) -> Path:
    """Where a holder keeps the machine's /run while it mounts its own: outside /run
    (which it covers) and outside the lab's root (which may live under /run)."""
    return Path(tempfile.gettempdir()) / f"kemari-cluster-{lab_id}-{host}-run"


def _holder_script(
    root: Path, stash: Path, binds: dict[str, Path], overlays: dict[str, Path], host: str
) -> str:
    """The sh script a holder runs in its new mount (and UTS) namespace: the binds and
    the overlays (``lowerdir=OURS:ORIGINAL``, read-only), made first so that sources
    under /run work; then a private /run with the machine's entries bound back, and a
    private /dev/shm; the hostname. Then it writes ``ready`` and sleeps until killed."""
    q = shlex.quote
    s = ["set -e"]
    for target, src in binds.items():
        s.append(f"mount --bind {q(str(src))} {q(target)}")
    for target, upper in overlays.items():
        s.append(f"mount -t overlay overlay -o lowerdir={q(str(upper))}:{q(target)} {q(target)}")
    s += [
        f"mkdir -p {q(str(stash))}",
        f"mount --rbind /run {q(str(stash))}",
        "mount -t tmpfs -o mode=0755 tmpfs /run",
        f"for e in {q(str(stash))}/* {q(str(stash))}/.[!.]*; do",
        '  [ -e "$e" ] || [ -L "$e" ] || continue',
        '  n=/run/$(basename "$e")',
        '  if [ -L "$e" ]; then cp -P "$e" "$n"',
        '  elif [ -d "$e" ]; then mkdir -p "$n"; mount --rbind "$e" "$n"',
        '  else touch "$n"; mount --bind "$e" "$n"; fi',
        "done",
        # Our own daemons' run directories, never the machine's.
        "for d in crm corosync-qdevice corosync-qnetd; do",
        '  if mountpoint -q "/run/$d"; then umount -l "/run/$d"; fi',
        '  rm -rf "/run/$d" 2>/dev/null || true; mkdir -p "/run/$d"',
        "done",
        f"chown {_HACLUSTER}:{_HACLIENT} /run/crm; chmod 0750 /run/crm",
        "mount -t tmpfs -o mode=1777 tmpfs /dev/shm",
        f"hostname {q(host)}",
        f"touch {q(str(root / 'ready'))}",
        "exec sleep infinity",
    ]
    return "\n".join(s) + "\n"


class ClusterLab:
    """Corosync, qdevice and Pacemaker on the lab's two hosts, qnetd on its LAN.

    ``ocf_dir`` holds provider folders added under ``/usr/lib/ocf/resource.d`` on both
    nodes (``kemari/vm``); ``sbin_dir`` holds programs added to ``/usr/sbin`` (where
    pacemaker-fenced looks for ``fence_*`` agents).
    """

    def __init__(
        self,
        lab: LabLayout,
        root: Path,
        *,
        ocf_dir: Path | None = None,
        sbin_dir: Path | None = None,
        qdevice: bool = True,
    ) -> None:
        self.lab = lab
        self.root = root
        self.ocf_dir = ocf_dir
        self.sbin_dir = sbin_dir
        self.qdevice = qdevice
        self.cluster_name = f"kemari-{lab.lab_id}"
        self.nodes = {
            "a": ClusterNode("a", 1, lab.ns_primary, lab.lan_primary_ip),
            "b": ClusterNode("b", 2, lab.ns_secondary, lab.lan_secondary_ip),
        }
        self.qnetd_addr = f"{lab.lan_client_ip}:{QNETD_PORT}"
        #: Every process started, by name ("a/corosync", "qnetd", ...).
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    # ---- paths ------------------------------------------------------------------------

    def node_root(self, name: str) -> Path:
        return self.root / name

    def log(self, name: str) -> str:
        """``name``'s pacemaker and corosync logs plus its daemons' output (tail)."""
        out = []
        for f in ("log-pacemaker/pacemaker.log", "log-pacemaker/corosync.log"):
            with contextlib.suppress(OSError):
                out.append((self.node_root(name) / f).read_text(errors="replace")[-6000:])
        for key in sorted(self.procs):
            if key.startswith(f"{name}/") or key == name:
                with contextlib.suppress(OSError):
                    out.append((self.root / f"{key.replace('/', '-')}.out").read_text()[-2000:])
        return "\n".join(out)

    # ---- processes --------------------------------------------------------------------

    def _spawn(self, key: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        out = self.root / f"{key.replace('/', '-')}.out"
        with open(out, "ab") as fd:
            self.procs[key] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={"PATH": _PATH, "LANG": "C.UTF-8", **(env or {})},
            )

    def _holder(self, key: str, ns: str, script: str, ready: Path) -> int:
        self._spawn(
            key,
            [
                "ip",
                "netns",
                "exec",
                ns,
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
        )
        deadline = time.monotonic() + 20
        while not ready.exists():
            if self.procs[key].poll() is not None or time.monotonic() > deadline:
                raise LabError(self.lab.lab_id, f"{key} holder failed:\n{self._out(key)}")
            time.sleep(0.05)
        return self.procs[key].pid

    def _out(self, key: str) -> str:
        try:
            return (self.root / f"{key.replace('/', '-')}.out").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def in_node(self, name: str, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` as one of node ``name``'s processes."""
        holder = self.procs.get(f"{name}/holder")
        if holder is None:
            raise LabError(self.lab.lab_id, f"node {name} is not running")
        pid = holder.pid
        return ["nsenter", "-t", str(pid), "-m", "-u", "-n", "--", *argv]

    def run(
        self, name: str, argv: Sequence[str], *, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a tool (``crm_mon``, ``cibadmin``, ``crm_resource`` ...) on node ``name``.

        Raises:
            LabError: it failed (with ``check``) or timed out.
        """
        try:
            proc = subprocess.run(
                self.in_node(name, argv),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                env={"PATH": _PATH, "LANG": "C.UTF-8"},
            )
        except subprocess.TimeoutExpired as err:
            raise LabError(self.lab.lab_id, f"{name}: {' '.join(argv)} timed out") from err
        if check and proc.returncode != 0:
            raise LabError(
                self.lab.lab_id,
                f"{name}: {' '.join(argv)} exited {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-800:]}",
            )
        return proc

    def start_qnetd(self) -> None:
        qroot = self.root / "qnetd"
        (qroot / "etc").mkdir(parents=True, exist_ok=True)
        stash = stash_dir(self.lab.lab_id, "qnetd")
        script = _holder_script(qroot, stash, {"/etc/corosync": qroot / "etc"}, {}, "qnetd")
        self._holder("qnetd/holder", self.lab.ns_client, script, qroot / "ready")
        host, _, port = self.qnetd_addr.rpartition(":")
        argv = ["corosync-qnetd", "-f", "-s", "off", "-l", host, "-p", port]
        self._spawn(
            "qnetd",
            ["nsenter", "-t", str(self.procs["qnetd/holder"].pid), "-m", "-u", "-n", "--", *argv],
        )

    def stop_qnetd(self) -> None:
        for key in ("qnetd", "qnetd/holder"):
            self._end(key)
        with contextlib.suppress(FileNotFoundError):
            (self.root / "qnetd" / "ready").unlink()

    def _prepare_node(self, name: str) -> tuple[dict[str, Path], dict[str, Path]]:
        nroot = self.node_root(name)
        dirs = {
            "/etc/corosync": nroot / "etc-corosync",
            "/var/lib/corosync": nroot / "lib-corosync",
            "/var/lib/pacemaker": nroot / "lib-pacemaker",
            "/var/log/pacemaker": nroot / "log-pacemaker",
        }
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        for sub in ("cib", "pengine", "blackbox", "cores"):
            (dirs["/var/lib/pacemaker"] / sub).mkdir(exist_ok=True)
        uid, gid = pwd.getpwnam(_HACLUSTER).pw_uid, grp.getgrnam(_HACLIENT).gr_gid
        for d in (dirs["/var/lib/pacemaker"], dirs["/var/log/pacemaker"]):
            for p in (d, *d.iterdir()):
                os.chown(p, uid, gid)
            d.chmod(0o770)
        conf = corosync_conf(
            self.cluster_name, list(self.nodes.values()), self.qnetd_addr if self.qdevice else None
        )
        (dirs["/etc/corosync"] / "corosync.conf").write_text(conf)
        overlays: dict[str, Path] = {}
        if self.ocf_dir is not None:
            overlays["/usr/lib/ocf/resource.d"] = self.ocf_dir
        if self.sbin_dir is not None:
            overlays["/usr/sbin"] = self.sbin_dir
        return dirs, overlays

    def start_node(self, name: str) -> None:
        """Start node ``name``: holder, corosync, qdevice, pacemakerd (in this order)."""
        node = self.nodes[name]
        binds, overlays = self._prepare_node(name)
        nroot = self.node_root(name)
        with contextlib.suppress(FileNotFoundError):
            (nroot / "ready").unlink()
        script = _holder_script(nroot, stash_dir(self.lab.lab_id, name), binds, overlays, name)
        self._holder(f"{name}/holder", node.ns, script, nroot / "ready")
        self._spawn(f"{name}/corosync", self.in_node(name, ["corosync", "-f"]))
        self._wait_tool(name, ["corosync-cfgtool", "-s"], 30)
        if self.qdevice:
            self._spawn(f"{name}/qdevice", self.in_node(name, ["corosync-qdevice", "-f"]))
        env = {"PCMK_logfile": "/var/log/pacemaker/pacemaker.log", "PCMK_debug": "no"}
        self._spawn(f"{name}/pacemakerd", self.in_node(name, ["pacemakerd"]), env)

    def _wait_tool(self, name: str, argv: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.run(name, argv, check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LabError(
                    self.lab.lab_id, f"{name}: {argv[0]} never answered:\n" + self.log(name)
                )
            time.sleep(0.3)

    def start(self) -> None:
        """qnetd (when ``qdevice``), then both nodes."""
        if self.qdevice:
            self.start_qnetd()
        for name in self.nodes:
            self.start_node(name)

    # ---- what the cluster says -----------------------------------------------------------

    def crm_mon_xml(self, name: str) -> str:
        return self.run(name, ["crm_mon", "-1", "--output-as=xml"], timeout=30).stdout

    def wait_online(self, timeout: float = 120) -> None:
        """Until both nodes' pacemaker sees both nodes online with quorum and a DC."""
        from xml.etree import ElementTree as ET

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            ok = True
            for name in self.nodes:
                try:
                    last = self.crm_mon_xml(name)
                    tree = ET.fromstring(last)
                except (LabError, ET.ParseError):
                    ok = False
                    break
                dc = tree.find("summary/current_dc")
                online = {n.get("name") for n in tree.iter("node") if n.get("online") == "true"}
                if dc is None or dc.get("with_quorum") != "true" or online != set(self.nodes):
                    ok = False
                    break
            if ok:
                return
            time.sleep(1)
        raise LabError(self.lab.lab_id, f"cluster not online in {timeout} s:\n{last[-2000:]}")

    def quorate(self, name: str) -> bool:
        proc = self.run(name, ["corosync-quorumtool", "-s"], check=False)
        return any(
            line.split(":", 1)[-1].strip() == "Yes"
            for line in proc.stdout.splitlines()
            if line.startswith("Quorate:")
        )

    def check_isolation(self) -> dict[str, str]:
        """Each node's view of itself, asked through its own daemons: ``crm_node -n``
        (pacemaker's local node name, from its corosync) and ``corosync-cmapctl``'s
        local node id. Returns node -> "name/nodeid".

        Raises:
            LabError: a node's pacemaker or corosync answers for the other node.
        """
        seen: dict[str, str] = {}
        for name, node in self.nodes.items():
            pname = self.run(name, ["crm_node", "-n"]).stdout.strip()
            cmap = self.run(name, ["corosync-cmapctl", "-g", "runtime.votequorum.this_node_id"])
            nodeid = cmap.stdout.strip().rpartition("=")[2].strip()
            seen[name] = f"{pname}/{nodeid}"
            if pname != name or nodeid != str(node.nodeid):
                raise LabError(self.lab.lab_id, f"node {name} answers as {pname}/{nodeid}")
        return seen

    # ---- faults and teardown -----------------------------------------------------------

    def node_pids(self, name: str) -> list[int]:
        """Every process in node ``name``'s network namespace."""
        proc = subprocess.run(
            ["ip", "netns", "pids", self.nodes[name].ns],
            capture_output=True,
            text=True,
            check=False,
        )
        return [int(p) for p in proc.stdout.split() if p.isdigit()]

    def kill_node(self, name: str) -> list[int]:
        """The host is lost: SIGKILL every process in its namespace (cluster daemons,
        Kemari agents, QEMU), by PID. Returns the PIDs killed."""
        pids = self.node_pids(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for key in [k for k in self.procs if k.startswith(f"{name}/")]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.procs[key].wait(10)
            del self.procs[key]
        return pids

    def _end(self, key: str, grace: float = 10.0) -> None:
        p = self.procs.pop(key, None)
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)

    def stop_node(self, name: str) -> None:
        """Stop node ``name`` the orderly way (pacemakerd, qdevice, corosync: SIGTERM by
        PID, then SIGKILL), then whatever still runs in its namespace."""
        for daemon in ("pacemakerd", "qdevice", "corosync"):
            self._end(f"{name}/{daemon}", grace=30.0 if daemon == "pacemakerd" else 10.0)
        self.kill_node(name)

    def stop(self) -> None:
        for name in list(self.nodes):
            self.stop_node(name)
        self.stop_qnetd()
        for key in list(self.procs):
            self._end(key)
        for host in (*self.nodes, "qnetd"):
            with contextlib.suppress(OSError):
                stash_dir(self.lab.lab_id, host).rmdir()


__all__ = [
    "KNET_PORT",
    "QNETD_PORT",
    "ClusterLab",
    "ClusterNode",
    "corosync_conf",
    "missing_binaries",
]
