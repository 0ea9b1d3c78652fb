"""Kemari's own engine inside the L1s: ``kemari standby`` in one, ``kemari protect`` in
the other, the witness on the host.

::

    host   kemari witness --listen 127.0.0.1:<port>          (the tiebreaker)
    L1 a   kemari protect -c /var/lib/kemari-klab/primary.toml
             QEMU (L2, -accel kvm) with the guest NIC behind the frame proxy -> ktap0
             replication 10.99.<slot>.1:7410  ->  10.99.<slot>.2:7410  (the L1 link)
             witness 10.0.2.2:<port> (eth1, QEMU's user network: the host's loopback)
    L1 b   kemari standby -c /var/lib/kemari-klab/secondary.toml   (its own ktap0)

The suite runs from the host's tree, shared read-only into both L1s (share.py). The
role configs follow the host lab's (``lab/configs.py``: klab may not import it, the two
are siblings in the layers) with what differs in an L1 (:func:`l1_trees`): no
namespaces, the L1 link's addresses, the L1's TAP, the witness on the host, paths in
the L1. Each file is written by :func:`kemari_suite.config.dump_toml` and checked by
:func:`kemari_suite.config.load` on the host before it is copied in. The agents run in
the L1 under ``nohup``, their output in ``/run``, and are stopped by PID.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kemari_suite.config import KemariConfig, PathsConfig, dump_toml, load
from kemari_suite.errors import ConfigError, LabError
from kemari_suite.klab.drbd import Runner
from kemari_suite.klab.share import kemari_command, python_env
from kemari_suite.protocol.files import mkdir_owner_only, write_owner_only
from kemari_suite.protocol.keys import generate_key

#: Where the configs, keys and guest disks go in each L1.
ENGINE_DIR = "/var/lib/kemari-klab"
#: The L1's own paths for the agents (run_dir, shm_dir, cache_dir).
L1_PATHS = PathsConfig(
    cache_dir=Path("/var/cache/kemari"), run_dir=Path("/run/kemari"), shm_dir=Path("/dev/shm")
)
#: The TAP the frame proxy puts the guest's frames on, in each L1, and its network.
TAP = "ktap0"
GUEST_NET = "192.168.77"
GUEST_IP = f"{GUEST_NET}.2"
TAP_IP = f"{GUEST_NET}.1"
#: The host's loopback as the L1 sees it on eth1 (QEMU's user network).
HOST_FROM_L1 = "10.0.2.2"
L1_LAN_IP = "10.0.2.15/24"
#: The witness's port on the host's 127.0.0.1: one per lab slot.
WITNESS_BASE_PORT = 47100
REPL_PORT = 7410
#: Key files, as the host lab names them: both hosts' replication key, and the pair's
#: key at the witness in its keys folder.
REPLICATION_KEY_FILE = "replication.key"
WITNESS_KEYS_DIR = "witness.d"
#: Asks an agent's control socket (argv[1]) for its status; prints it as JSON.
STATUS_SCRIPT = (
    "import json, sys; from pathlib import Path; "
    "from kemari_suite.service import control; "
    "print(json.dumps(control.request(Path(sys.argv[1]), 'status', timeout=20), default=str))"
)
#: The L1s of the pair, by their first role (primary's, secondary's): the agents' node ids.
L1_NAMES = ("l1a", "l1b")
#: The agents' commands by role.
COMMANDS = {"primary": "protect", "secondary": "standby"}
#: DRBD's fence-peer handler in each L1 when the engine's disk is DRBD: a wrapper of the
#: engine's own ``kemari fence-peer`` (:func:`fence_peer_script`), and its log.
FENCE_PEER = "/run/kemari-fence-peer"
FENCE_PEER_LOG = "/run/kemari-fence-peer.log"


def witness_port(slot: int) -> int:
    return WITNESS_BASE_PORT + slot


@dataclass(frozen=True)
class EngineSpec:
    """What the protected VM in the L1s is, and how it is replicated.

    ``tree`` is the suite's checkout, shared into the L1s at the same path. ``kernel``
    and ``initrd`` are the guest's files *in the L1s* (see :func:`l2.push_guest`).
    """

    lab_id: str
    slot: int
    tree: str
    kernel: str
    initrd: str
    accel: str = "kvm"
    #: The lab's disk: "builtin" (a file in each L1), "drbd" (:attr:`disk_device`) or
    #: "iscsi": the iSCSI lab's LUN (:attr:`lun_devices`), the engine's shared backend
    #: fenced by SCSI-3 reservations (:data:`LAB_DISKS`).
    disk_backend: str = "builtin"
    #: The DRBD device for ``disk_backend = "drbd"``; the builtin disk is a file.
    disk_device: str = "/dev/drbd0"
    #: ``disk_backend = "iscsi"``: the LUN's block device in the primary's L1 and in the
    #: standby's (each host finds its own, :func:`~.iscsi.login`).
    lun_devices: tuple[str, ...] = ()
    workload: str = ""
    vm_name: str = "klabvm"
    memory_mib: int = 128
    disk_mib: int = 16
    #: A loaded host stalls an L1's vCPU for seconds, and the engine's Python runs
    #: emulated: a short timeout fails over (or fences) for nothing. The product's
    #: default is 800 ms.
    heartbeat_interval_ms: int = 500
    heartbeat_timeout_ms: int = 15000
    max_interval_ms: int = 1000
    #: ``replication.tracker_verify``: the compare tracker checks the fast one at every
    #: scan (a missed page stops the primary; over-reporting is counted in its status).
    tracker_verify: bool = False
    #: ``replication.reprotect``: after a failover the survivor protects the guest again
    #: once the repaired L1 answers as a standby.
    reprotect: bool = False

    @property
    def dir(self) -> str:
        return f"{ENGINE_DIR}/{self.lab_id}"

    def config_path(self, role: str) -> str:
        return f"{self.dir}/{role}.toml"

    def agent_dir(self, role: str) -> str:
        """The agent's folder under its run_dir (control socket, console, artifacts)."""
        return f"{role_run_dir(self.lab_id, role)}/kemari-{self.vm_name}"

    def log(self, role: str) -> str:
        return f"/run/kemari-klab-{role}.log"

    def pidfile(self, role: str) -> str:
        return f"/run/kemari-klab-{role}.pid"


def _host_tree(spec: EngineSpec, role: str, addresses: tuple[str, str]) -> dict[str, Any]:
    """One role's tree: the host lab's role config (``lab/configs.py``: witness, output
    commit through the frame proxy, key files, both hosts' addresses) with the L1's
    values; klab sits beside ``lab`` in the layers, so it cannot call that renderer."""
    i = 0 if role == "primary" else 1
    tree: dict[str, Any] = {
        "paths": {
            "cache_dir": str(L1_PATHS.cache_dir),
            "run_dir": str(role_run_dir(spec.lab_id, role)),
            "shm_dir": str(L1_PATHS.shm_dir / f"kemari-{spec.lab_id}-{role[:3]}"),
        },
        "image": {"kernel": spec.kernel, "initrd": spec.initrd},
        "vm": {
            "name": spec.vm_name,
            "memory_mib": spec.memory_mib,
            "vcpus": 1,
            "accel": spec.accel,
            # The frame proxy opens the TAP (output commit); QEMU has no netdev of its own.
            "netdev": "",
            "unprotected_output": False,
            "netns": "",
            "ip": f"{GUEST_IP}/24",
            "run": spec.workload,
            "display": "none",
        },
        "replication": {
            "key_file": f"{spec.dir}/{REPLICATION_KEY_FILE}",
            # Each host listens on its own address and knows the other's.
            "listen": f"{addresses[i]}:{REPL_PORT}",
            "peer": f"{addresses[1 - i]}:{REPL_PORT}",
            # The L1's name: the same id whatever role its agent runs (and for DRBD's
            # fence-peer handler, which reads it from this file).
            "node_id": L1_NAMES[i],
            "reprotect": spec.reprotect,
            "max_interval_ms": spec.max_interval_ms,
            "tracker_verify": spec.tracker_verify,
            "heartbeat_interval_ms": spec.heartbeat_interval_ms,
            "heartbeat_timeout_ms": spec.heartbeat_timeout_ms,
            "tiebreaker": "witness",
            "witness": f"{HOST_FROM_L1}:{witness_port(spec.slot)}",
            "witness_key_file": f"{spec.dir}/{WITNESS_KEYS_DIR}/{spec.vm_name}.key",
        },
        "tap": {"host_tap": TAP},
    }
    tree["disk"] = disk_tree(spec, role)
    return tree


#: The lab's disks and the engine's backend each one is (``disk.backend``).
LAB_DISKS = {"builtin": "builtin", "drbd": "drbd", "iscsi": "shared"}


def disk_tree(spec: EngineSpec, role: str) -> dict[str, Any]:
    """``role``'s ``[disk]`` table (pure).

    The iSCSI LUN is one disk both hosts see: the engine's shared backend, no lease (the
    witness is the tiebreaker) but ``fencing = "scsi-pr"``: the host that runs the guest
    registers its key and reserves the LUN, a standby that takes over preempts-and-aborts
    the old writer's key. Its first MiB is the backend's reserved head (the guest's disk
    starts at 1 MiB).

    Raises:
        ConfigError: an unknown lab disk, or the LUN's devices are not known.
    """
    backend = LAB_DISKS.get(spec.disk_backend)
    if backend is None:
        raise ConfigError(
            f"{spec.disk_backend!r}: the kernel lab's disks are {', '.join(LAB_DISKS)}",
            key="klab.disk_backend",
        )
    disk: dict[str, Any] = {"backend": backend, "size_mib": spec.disk_mib}
    if spec.disk_backend == "drbd":
        disk["path"] = spec.disk_device
    elif spec.disk_backend == "iscsi":
        if len(spec.lun_devices) != 2 or not all(spec.lun_devices):
            raise ConfigError("the LUN's device on both hosts", key="klab.lun_devices")
        disk["path"] = spec.lun_devices[0 if role == "primary" else 1]
        disk["fencing"] = "scsi-pr"
    else:
        disk["path"] = f"{spec.dir}/disk-{role}.img"
    return disk


def role_run_dir(lab_id: str, role: str) -> Path:
    """``role``'s run_dir in its L1 (as the host lab names it: ``kemari-<id>-pri``)."""
    return L1_PATHS.run_dir / f"kemari-{lab_id}-{role[:3]}"


def l1_trees(spec: EngineSpec, addresses: tuple[str, str]) -> dict[str, dict[str, Any]]:
    """The primary's and secondary's config trees for the L1s (pure).

    ``addresses`` are the two L1s' replication-link IPs (primary's, secondary's).
    """
    return {role: _host_tree(spec, role, addresses) for role in ("primary", "secondary")}


def witness_tree(spec: EngineSpec, host_paths: PathsConfig, folder: Path) -> dict[str, Any]:
    """The witness's config on the host: its keys and state under ``folder`` (pure)."""
    return {
        "paths": {
            "cache_dir": str(host_paths.cache_dir),
            "run_dir": str(folder / "run"),
            "shm_dir": str(host_paths.shm_dir),
        },
        "replication": {
            "heartbeat_interval_ms": spec.heartbeat_interval_ms,
            "heartbeat_timeout_ms": spec.heartbeat_timeout_ms,
        },
        "witness": {
            "keys_dir": str(folder / WITNESS_KEYS_DIR),
            "state_file": str(folder / "witness.json"),
        },
    }


def check_tree(tree: dict[str, Any], path: Path) -> KemariConfig:
    """Write ``tree`` to ``path`` (mode 0600) and load it with the suite's own loader.

    Raises:
        ConfigError: the suite refuses it.
    """
    write_owner_only(path, dump_toml(tree))
    return load(path)


class EngineProcess:
    """One agent (protect or standby) inside an L1, started with nohup, stopped by PID.

    ``role`` names the config it reads (the role the L1 began in); ``command`` is what
    it runs, by default that role's (a restarted primary's L1 runs ``standby`` with its
    own config: its address, its node id)."""

    def __init__(self, l1: Runner, spec: EngineSpec, role: str, command: str = "") -> None:
        self.l1, self.spec, self.role = l1, spec, role
        self.command = command or COMMANDS[role]
        self.pid: int | None = None

    def start(self) -> int:
        """Start ``kemari protect|standby`` in the L1; its PID there. Raises AgentError."""
        s = self.spec
        cmd = kemari_command(s.tree, [self.command, "-c", s.config_path(self.role)])
        out = self.l1.run(
            f"cd / && nohup {cmd} </dev/null >>{s.log(self.role)} 2>&1 & echo $! "
            f"| tee {s.pidfile(self.role)}",
            timeout=60,
        )
        self.pid = int(out.stdout.split()[-1])
        return self.pid

    def alive(self) -> bool:
        if self.pid is None:
            return False
        return self.l1.run(f"kill -0 {self.pid}", check=False, timeout=60).exit_code == 0

    def output(self, tail: int = 4000) -> str:
        r = self.l1.run(f"tail -c {tail} {self.spec.log(self.role)}", check=False, timeout=60)
        return r.stdout

    def events(self, tail: int = 6000) -> str:
        """The tail of the agent's ``events.jsonl`` (state changes, failover steps and
        errors: the agent's output is mostly empty)."""
        path = f"{role_run_dir(self.spec.lab_id, self.role)}/{self.spec.vm_name}-artifacts"
        r = self.l1.run(f"tail -c {tail} {path}/events.jsonl", check=False, timeout=60)
        return r.stdout

    def status(self, timeout: float = 120.0) -> dict[str, Any]:
        """The agent's status, as ``kemari status --json`` gets it (its control socket).

        The request is sent by a short Python run in the L1 that imports only the
        control client: the whole CLI takes tens of seconds to import under TCG.

        Raises:
            LabError: the agent did not answer (the reason attached).
            AgentError: the L1 did not answer.
        """
        s = self.spec
        sock = f"{s.agent_dir(self.role)}/control.sock"
        cmd = f"cd / && env {python_env(s.tree)} python3 -c {shlex.quote(STATUS_SCRIPT)} {sock}"
        r = self.l1.run(cmd, check=False, timeout=timeout)
        if r.exit_code != 0:
            raise LabError(s.lab_id, f"{self.role} status: rc {r.exit_code}: {r.stderr[-800:]}")
        try:
            data = json.loads(r.stdout)
        except ValueError as err:
            raise LabError(s.lab_id, f"{self.role} status: {r.stdout[-800:]!r}") from err
        if not isinstance(data, dict):
            raise LabError(s.lab_id, f"{self.role} status: not an object")
        return data

    def wait_state(
        self,
        states: set[str],
        timeout: float,
        note: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Poll the status until the state is one of ``states``; ``note`` hears each
        new state (with its reason, if any).

        Raises:
            LabError: the agent exited, or not there in time (its output attached).
        """
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        seen = None
        while time.monotonic() < deadline:
            try:
                last = self.status()
                state = (last.get("state"), last.get("reason"))
                if note is not None and state != seen:
                    note(f"{self.role}: {state[0]} {state[1] or ''}".rstrip())
                seen = state
                if last.get("state") in states:
                    return last
            except LabError:
                if not self.alive():
                    raise LabError(
                        self.spec.lab_id, f"{self.role} exited:\n{self.output()}"
                    ) from None
            time.sleep(1.0)
        raise LabError(
            self.spec.lab_id,
            f"{self.role} not in {sorted(states)} after {timeout:.0f} s "
            f"(last: {last.get('state')}):\n{self.output()}",
        )

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL after 20 s (the agent stops its QEMU)."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        self.l1.run(
            f"kill {pid} 2>/dev/null; for i in $(seq 40); do kill -0 {pid} 2>/dev/null || "
            f"exit 0; sleep 0.5; done; kill -9 {pid} 2>/dev/null; true",
            check=False,
            timeout=60,
        )


def fence_peer_script(spec: EngineSpec, role: str) -> str:
    """``role``'s fence-peer handler (pure): DRBD runs it through ``sh -c`` as
    ``FENCE_PEER RES`` with a bare environment, so it runs ``kemari fence-peer`` the way
    the agents run (the shared tree, the L1's ``/usr/bin/python3``, ``PYTHONPATH``) with
    the config of the role the L1 began in; the node id is the config's, as the agents'
    (the L1's name, whatever role its agent runs now). It logs each call and exit code
    (7: we hold the lease, the peer is fenced; 6: the peer holds it, outdate ourselves;
    1: the witness did not answer) in :data:`FENCE_PEER_LOG`."""
    args = ["fence-peer", "-c", spec.config_path(role)]
    cmd = f"env {python_env(spec.tree)} /usr/bin/python3 -m kemari_suite.cli.main"
    return f"""#!/bin/sh
# Kemari kernel lab: DRBD's fence-peer handler is the engine's own `kemari fence-peer`.
# Generated by kemari_suite/klab/engine.py.
LOG={FENCE_PEER_LOG}
echo "$(date +%s.%N) call $* resource=$DRBD_RESOURCE peer=$DRBD_PEER" >> "$LOG"
cd /
{cmd} {shlex.join(args)} --resource "$1" >> "$LOG" 2>&1
rc=$?
echo "$(date +%s.%N) exit $rc" >> "$LOG"
exit $rc
"""


def fence_peer_calls(log: str) -> list[int]:
    """The exit codes of the handler's calls in its log (-1: a call still running)."""
    codes: list[int] = []
    for line in log.splitlines():
        words = line.split()
        if len(words) >= 2 and words[1] == "call":
            codes.append(-1)
        elif len(words) == 3 and words[1] == "exit" and codes and words[2].isdigit():
            codes[-1] = int(words[2])
    return codes


def prepare_l1(l1: Runner, spec: EngineSpec, role: str, tree: dict[str, Any], keys: Keys) -> None:
    """Copy ``role``'s config and the keys into the L1, make its TAP and its disk file
    (with DRBD: its fence-peer handler, :func:`fence_peer_script`; the iSCSI LUN is
    there already: never touched here).

    Raises:
        AgentError: a command failed in the L1.
    """
    d = shlex.quote(spec.dir)
    wkey = f"{spec.dir}/{WITNESS_KEYS_DIR}/{spec.vm_name}.key"
    l1.run(f"umask 077 && mkdir -p {d}/{WITNESS_KEYS_DIR}")
    for path, text in (
        (spec.config_path(role), dump_toml(tree)),
        (f"{spec.dir}/{REPLICATION_KEY_FILE}", keys.replication + "\n"),
        (wkey, keys.witness + "\n"),
    ):
        l1.run(f"umask 077 && cat > {shlex.quote(path)}", stdin=text.encode())
    if spec.disk_backend == "builtin":
        img = shlex.quote(tree["disk"]["path"])
        l1.run(f"umask 077 && rm -f {img} && truncate -s {spec.disk_mib}M {img}")
    elif spec.disk_backend == "drbd":
        l1.run(
            f"cat > {FENCE_PEER} && chmod 0755 {FENCE_PEER} && rm -f {FENCE_PEER_LOG}",
            stdin=fence_peer_script(spec, role).encode(),
        )
    l1.run(
        f"modprobe tun && (ip link show {TAP} >/dev/null 2>&1 || ip tuntap add {TAP} mode tap) "
        f"&& ip addr replace {TAP_IP}/24 dev {TAP} && ip link set {TAP} up"
    )


def lan_up(l1: Runner) -> None:
    """eth1 on QEMU's user network: the host's loopback is 10.0.2.2. Raises AgentError."""
    l1.run(f"ip addr replace {L1_LAN_IP} dev eth1 && ip link set eth1 up")


@dataclass(frozen=True)
class Keys:
    """The pair's replication key and its key at the witness (text, as in the files)."""

    replication: str
    witness: str

    @classmethod
    def new(cls) -> Keys:
        return cls(generate_key(), generate_key())


class HostWitness:
    """``kemari witness`` on this host, listening on 127.0.0.1 (the L1s' 10.0.2.2)."""

    def __init__(self, spec: EngineSpec, folder: Path, host_paths: PathsConfig) -> None:
        self.spec, self.folder, self.host_paths = spec, Path(folder), host_paths
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.folder / "witness.out"

    def start(self, keys: Keys) -> None:
        """Write its config and key, start it, wait until it listens.

        Raises:
            ConfigError: the suite refuses the rendered config.
            LabError: it exited or did not listen within 60 s.
        """
        mkdir_owner_only(self.folder)
        mkdir_owner_only(self.folder / WITNESS_KEYS_DIR)
        key = self.folder / WITNESS_KEYS_DIR / f"{self.spec.vm_name}.key"
        write_owner_only(key, keys.witness + "\n")
        config = self.folder / "witness.toml"
        check_tree(witness_tree(self.spec, self.host_paths, self.folder), config)
        port = witness_port(self.spec.slot)
        argv = [sys.executable, "-m", "kemari_suite.cli.main", "witness", "-c", str(config),
                "--listen", f"127.0.0.1:{port}"]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, env={**os.environ},
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while not _listening(port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise LabError(self.spec.lab_id, f"witness: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


__all__ = [
    "ENGINE_DIR",
    "FENCE_PEER",
    "FENCE_PEER_LOG",
    "GUEST_IP",
    "L1_PATHS",
    "LAB_DISKS",
    "TAP",
    "EngineProcess",
    "EngineSpec",
    "HostWitness",
    "Keys",
    "check_tree",
    "disk_tree",
    "fence_peer_calls",
    "fence_peer_script",
    "l1_trees",
    "lan_up",
    "prepare_l1",
    "witness_port",
    "witness_tree",
]
