"""A kernel lab that stays up: ``kemari lab up --kernel`` / ``status --kernel`` / ``down --kernel``.

The scenarios (``kemari klab ...``) boot their L1s and stop them within one command. An
operator who wants to look around in the lab, or run the engine by hand, needs L1s that
outlive the command that started them. QEMU gets a parent-death signal
(:mod:`kemari_suite.vm.qemu`), so something must stay as their parent: a supervisor.

::

    kemari lab up --kernel --id k1
      └─ spawns, in a session of its own:  kemari klab serve --id k1   (the supervisor)
           ├─ builds (or finds) the L1 image, boots l1a and l1b (klab/pair.py),
           │  gives each eth0 the link profile with netem (klab/netem.py)
           ├─ writes <run_dir>/kemari-klab-k1/state.json: "ready", the QEMU PIDs,
           │  the agent sockets, the kernel, the profile
           └─ waits for SIGTERM; then stops both L1s by PID and removes its files
    kemari lab status --kernel --id k1   reads state.json, checks every PID and asks
                                         each L1's agent (uname, the qdisc)
    kemari lab down --kernel --id k1     SIGTERM to the supervisor by PID, waits; any QEMU
                                         still there gets SIGKILL by its recorded PID
    kemari klab exec --id k1 --host l1a -- CMD   runs CMD in an L1 through its agent

The supervisor holds no agent connection once the lab is ready, so ``status`` and
``exec`` can connect (the agent's socket takes one client at a time). Files:
``<run_dir>/kemari-klab-<id>/`` (state, supervisor log, ``h/`` the hosts' overlays and
console logs, ``r/`` QEMU's run folders) and ``<shm_dir>/kemari-klab-<id>/`` (the L1s' RAM files).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite.config import PathsConfig
from kemari_suite.errors import ConfigError, KemariError, VMError
from kemari_suite.klab.agent import AgentClient, RunResult
from kemari_suite.klab.image import HostImage, build_host_image
from kemari_suite.klab.l2 import NESTED_PACKAGES, NESTED_SIZE_MIB
from kemari_suite.klab.netem import get_profile, parse_qdisc, tc_command
from kemari_suite.klab.pair import L1Pair, PairSpec
from kemari_suite.klab.sshd import SSH_PACKAGES, SSH_PORT, make_keys, start_sshd
from kemari_suite.vm.qemu import pid_alive

STATE_FILE = "state.json"
LOG_FILE = "serve.log"
#: The first ``lab up --kernel`` may build the image (minutes), then boot under TCG.
UP_TIMEOUT_S = 1200.0
#: How long ``down`` waits for the supervisor to stop its L1s before SIGKILL by PID.
DOWN_TIMEOUT_S = 90.0
#: Standing labs take link slots 20..99 (tests use 100+, the scenarios 190+).
SLOT_BASE, SLOT_COUNT = 20, 80
#: The L1's address on QEMU's user network and its gateway (QEMU's defaults).
USER_NET_IP, USER_NET_GATEWAY = "10.0.2.15/24", "10.0.2.2"
#: Without namespaces, L1 i of slot s has its sshd at 127.0.0.1:(this + 2s + i).
SSH_LOCAL_BASE = 42000

Progress = Callable[[str], None]


def validate_id(lab_id: str) -> str:
    """Raises ConfigError unless ``lab_id`` is 1-4 lower-case letters or digits."""
    if not (1 <= len(lab_id) <= 4 and lab_id.isascii() and lab_id.isalnum()) or (
        lab_id != lab_id.lower()
    ):
        raise ConfigError(f"{lab_id!r}: 1-4 lower-case letters or digits", key="--id")
    return lab_id


def default_slot(lab_id: str) -> int:
    """The link slot of a standing lab, from its id (pure)."""
    return SLOT_BASE + zlib.crc32(lab_id.encode()) % SLOT_COUNT


def lab_folder(paths: PathsConfig, lab_id: str) -> Path:
    return paths.run_dir / f"kemari-klab-{validate_id(lab_id)}"


def shm_folder(paths: PathsConfig, lab_id: str) -> Path:
    return paths.shm_dir / f"kemari-klab-{validate_id(lab_id)}"


@dataclass
class HostStatus:
    name: str
    pid: int | None
    alive: bool = False
    #: The agent answered ``uname -r`` (None: not asked, the L1 is not running).
    answered: bool | None = None
    kernel: str = ""
    qdisc: dict[str, str] = field(default_factory=dict)
    #: Where its sshd is reached: [address, port] (None: no sshd).
    ssh: list[Any] | None = None
    error: str = ""


@dataclass
class StandingStatus:
    lab_id: str
    #: "absent", "booting", "ready", "failed", "degraded" (an L1 died), "stale" (the
    #: supervisor is gone but its state file is not).
    state: str
    state_file: str
    profile: str = ""
    slot: int | None = None
    supervisor_pid: int | None = None
    #: The host lab's namespaces the L1s run in (empty: the host's own network).
    namespaces: list[str] = field(default_factory=list)
    #: The folder of the client key and known_hosts; "" without sshd.
    ssh_dir: str = ""
    hosts: list[HostStatus] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "ready" and all(h.alive and h.answered for h in self.hosts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "lab_id": self.lab_id,
            "state": self.state,
            "ok": self.ok,
            "profile": self.profile,
            "slot": self.slot,
            "supervisor_pid": self.supervisor_pid,
            "namespaces": self.namespaces,
            "ssh_dir": self.ssh_dir,
            "state_file": self.state_file,
            "hosts": [h.__dict__ for h in self.hosts],
            "error": self.error,
        }


def read_state(paths: PathsConfig, lab_id: str) -> dict[str, Any] | None:
    try:
        data = json.loads((lab_folder(paths, lab_id) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    tmp = folder / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(folder / STATE_FILE)


# --------------------------------------------------------------------------- the supervisor


def serve(
    paths: PathsConfig,
    lab_id: str,
    *,
    profile: str = "1g",
    slot: int | None = None,
    nested: bool = True,
    memory_mib: int = 1024,
    share: str = "",
    namespaces: tuple[str, str] | None = None,
    link_ips: tuple[str, str] | None = None,
    ssh_addresses: tuple[str, str] | None = None,
    ssh: bool = True,
) -> int:
    """The supervisor's body (``kemari klab serve``): boot the pair, write the state,
    wait for SIGTERM or SIGINT, stop the L1s. Returns the exit status (0: stopped as
    asked; 1: the lab failed, the reason is in the state file).

    With ``ssh`` each L1 runs sshd, forwarded from ``ssh_addresses[i]``:2222 on its
    side (127.0.0.1 and a port from the slot without them); see :mod:`.sshd`."""
    prof = get_profile(profile)
    folder, shm = lab_folder(paths, lab_id), shm_folder(paths, lab_id)
    folder.mkdir(parents=True, exist_ok=True)
    shm.mkdir(parents=True, exist_ok=True)
    slot = default_slot(lab_id) if slot is None else slot
    state: dict[str, Any] = {
        "lab_id": lab_id,
        "state": "booting",
        "supervisor_pid": os.getpid(),
        "profile": prof.name,
        "slot": slot,
        "nested": nested,
        "namespaces": list(namespaces or ()),
        "link_ips": list(link_ips or ()),
        "hosts": {},
        "error": "",
        "started_at": time.time(),
    }
    _write_state(folder, state)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    pair: L1Pair | None = None
    status = 0
    endpoints: dict[str, tuple[str, int]] = {}
    if ssh:
        for i, name in enumerate(("l1a", "l1b")):
            endpoints[name] = (
                (ssh_addresses[i], SSH_PORT)
                if ssh_addresses
                else ("127.0.0.1", SSH_LOCAL_BASE + 2 * slot + i)
            )
    try:
        image = _image(paths, nested, ssh)
        keys = make_keys(folder / "ssh", list(endpoints), endpoints) if ssh else None
        pair = L1Pair(
            PairSpec(
                lab_id,
                slot=slot,
                memory_mib=memory_mib,
                share=share,
                lan=True,
                namespaces=namespaces,
                link_ips=link_ips,
                ssh_forwards=(endpoints["l1a"], endpoints["l1b"]) if ssh else None,
            ),
            image,
            # Short names: QEMU's sockets go in here, and a socket path has 107 bytes.
            lab_dir=folder / "h",
            run_root=folder / "r",
            shm_dir=shm,
        )
        pair.start()
        for host in pair.hosts:
            host.run(tc_command(prof), timeout=60)
            # eth1, QEMU's user network: sshd's forward, and through its NAT the lab's
            # LAN (a witness in the client namespace) or the host's loopback (10.0.2.2).
            host.run(
                f"ip addr replace {USER_NET_IP} dev eth1 && ip link set eth1 up && "
                f"ip route replace default via {USER_NET_GATEWAY}",
                timeout=60,
            )
            if keys is not None:
                start_sshd(host, keys)
            state["hosts"][host.spec.host] = {
                "qemu_pid": host.pid,
                "agent_socket": str(host.folder / "agent.sock"),
                "ip": host.spec.ip,
                "netns": host.spec.netns or "",
                "ssh": list(endpoints[host.spec.host]) if ssh else None,
                "boot_s": round(host.boot_s or 0.0, 1),
                "kernel": image.kernel_version,
            }
            # Let `status` and `exec` connect: the agent takes one client at a time.
            assert host.agent is not None
            host.agent.close()
        state["state"] = "ready"
        _write_state(folder, state)
        while not stop.wait(1.0):
            dead = [h.spec.host for h in pair.hosts if not h.alive()]
            if dead and state["state"] == "ready":
                state["state"] = "degraded"
                state["error"] = f"L1 {', '.join(dead)} exited"
                _write_state(folder, state)
    except (KemariError, OSError) as err:
        state["state"], state["error"] = "failed", str(err)
        _write_state(folder, state)
        status = 1
        # Stay until `down`: the state file tells the operator why.
        stop.wait()
    finally:
        if pair is not None:
            with contextlib.suppress(KemariError, OSError):
                pair.stop()
        shutil.rmtree(shm, ignore_errors=True)
    return status


def _image(paths: PathsConfig, nested: bool, ssh: bool) -> HostImage:
    if ssh:
        return build_host_image(paths.cache_dir, packages=SSH_PACKAGES, size_mib=NESTED_SIZE_MIB)
    if nested:
        return build_host_image(paths.cache_dir, packages=NESTED_PACKAGES, size_mib=NESTED_SIZE_MIB)
    return build_host_image(paths.cache_dir)


# --------------------------------------------------------------------------- up / down / status


def up(
    paths: PathsConfig,
    lab_id: str,
    *,
    profile: str = "1g",
    slot: int | None = None,
    nested: bool = True,
    share: str = "",
    namespaces: tuple[str, str] | None = None,
    link_ips: tuple[str, str] | None = None,
    ssh_addresses: tuple[str, str] | None = None,
    ssh: bool = True,
    config: Path | None = None,
    progress: Progress | None = None,
    timeout: float = UP_TIMEOUT_S,
) -> StandingStatus:
    """Start the supervisor of lab ``lab_id`` and wait until its L1s are ready.

    Raises:
        ConfigError: a bad id or profile, or the lab is up already.
        VMError: the lab failed or did not come up in ``timeout`` (it is taken down; the
            message has the supervisor's log tail).
    """
    get_profile(profile)
    say = progress or (lambda _m: None)
    current = status(paths, lab_id, ask_agents=False)
    if current.state not in ("absent", "stale"):
        raise ConfigError(
            f"kernel lab {lab_id} is {current.state}: `kemari lab down --kernel --id {lab_id}` "
            "first",
            key="--id",
        )
    if current.state == "stale":
        down(paths, lab_id)
    folder = lab_folder(paths, lab_id)
    folder.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "kemari_suite.cli.main", "klab", "serve", "--id", lab_id]
    argv += ["--profile", profile] + (["--slot", str(slot)] if slot is not None else [])
    argv += [] if nested else ["--no-nested"]
    argv += ["--share", share] if share else []
    argv += ["--netns", ",".join(namespaces)] if namespaces else []
    argv += ["--link-ips", ",".join(link_ips)] if link_ips else []
    argv += ["--ssh-addresses", ",".join(ssh_addresses)] if ssh_addresses else []
    argv += [] if ssh else ["--no-ssh"]
    argv += ["--config", str(config)] if config is not None else []
    env = {**os.environ, "KEMARI_RUN": str(paths.run_dir), "KEMARI_SHM": str(paths.shm_dir)}
    env["KEMARI_CACHE"] = str(paths.cache_dir)
    with (folder / LOG_FILE).open("ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
        )
    say(f"supervisor started (PID {proc.pid}); booting two L1s under TCG")
    deadline = time.monotonic() + timeout
    shown = ""
    while time.monotonic() < deadline:
        st = read_state(paths, lab_id) or {}
        if st.get("state") in ("ready", "failed", "degraded"):
            break
        if proc.poll() is not None:
            break
        line = _log_tail(folder, 1)
        if line and line != shown:
            say(line)
            shown = line
        time.sleep(1.0)
    result = status(paths, lab_id)
    if not result.ok:
        why = result.error or f"not ready after {timeout:.0f} s ({result.state})"
        tail = _log_tail(folder, 15)
        down(paths, lab_id)
        raise VMError(f"klab-{lab_id}", f"{why}\nsupervisor log:\n{tail}")
    return result


def _log_tail(folder: Path, n: int) -> str:
    try:
        lines = (folder / LOG_FILE).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(line for line in lines[-n:] if line.strip())


def status(paths: PathsConfig, lab_id: str, *, ask_agents: bool = True) -> StandingStatus:
    """What there is of lab ``lab_id``: its state, every PID checked, each running L1's
    agent asked for its kernel and its link's qdisc (``ask_agents``). Never raises for
    what it finds (a dead L1 is a state, not an error); raises ConfigError for a bad id."""
    folder = lab_folder(paths, lab_id)
    st = read_state(paths, lab_id)
    res = StandingStatus(lab_id, "absent", str(folder / STATE_FILE))
    if st is None:
        return res
    res.state = str(st.get("state", "stale"))
    res.profile = str(st.get("profile", ""))
    res.slot = st.get("slot")
    res.error = str(st.get("error", ""))
    res.supervisor_pid = st.get("supervisor_pid")
    res.namespaces = [str(n) for n in st.get("namespaces") or ()]
    if (folder / "ssh" / "known_hosts").exists():
        res.ssh_dir = str(folder / "ssh")
    if not pid_alive(res.supervisor_pid):
        res.state, res.error = "stale", res.error or "the supervisor is not running"
    for name, h in sorted((st.get("hosts") or {}).items()):
        hs = HostStatus(name, h.get("qemu_pid"), ssh=h.get("ssh"))
        hs.alive = pid_alive(hs.pid)
        if hs.alive and res.state in ("ready", "degraded") and ask_agents:
            _ask(hs, Path(h["agent_socket"]))
        res.hosts.append(hs)
    if res.state == "ready" and not all(h.alive for h in res.hosts):
        res.state = "degraded"
    return res


def _ask(hs: HostStatus, sock: Path) -> None:
    try:
        r = run_in(sock, hs.name, "uname -r; tc qdisc show dev eth0", pid=hs.pid, timeout=30)
    except KemariError as err:
        hs.answered, hs.error = False, str(err)
        return
    lines = r.stdout.splitlines()
    hs.answered = r.exit_code == 0
    hs.kernel = lines[0].strip() if lines else ""
    hs.qdisc = parse_qdisc("\n".join(lines[1:]))


def run_in(
    sock: Path, host: str, command: str, *, pid: int | None, timeout: float = 120.0
) -> RunResult:
    """Run ``command`` in the L1 whose agent socket is ``sock``.

    Raises:
        AgentError: no agent (another client holds it, or the L1 is gone) or a timeout.
    """
    client = AgentClient(host, sock, alive=lambda: pid_alive(pid))
    try:
        client.wait_ready(min(timeout, 30.0))
        return client.run(command, timeout=timeout, check=False)
    finally:
        client.close()


def exec_in(paths: PathsConfig, lab_id: str, host: str, command: str, timeout: float) -> RunResult:
    """``kemari klab exec``: run ``command`` in L1 ``host`` of a standing lab.

    Raises:
        ConfigError: no such lab or host. AgentError: as :func:`run_in`.
    """
    st = read_state(paths, lab_id)
    if st is None:
        raise ConfigError(f"no kernel lab {lab_id} (`kemari lab up --kernel --id {lab_id}`)")
    hosts = st.get("hosts") or {}
    if host not in hosts:
        raise ConfigError(
            f"no L1 {host!r} in kernel lab {lab_id}: {', '.join(hosts)}", key="--host"
        )
    h = hosts[host]
    return run_in(Path(h["agent_socket"]), host, command, pid=h.get("qemu_pid"), timeout=timeout)


@dataclass
class DownResult:
    lab_id: str
    found: bool
    supervisor_stopped: bool = False
    #: QEMU PIDs that were still alive after the supervisor and got SIGKILL.
    killed: list[int] = field(default_factory=list)


def down(paths: PathsConfig, lab_id: str, timeout: float = DOWN_TIMEOUT_S) -> DownResult:
    """Take lab ``lab_id`` down: SIGTERM to its supervisor (which stops its L1s), wait,
    then SIGKILL any QEMU still alive by its recorded PID; remove its folders. A lab
    that is not there is not an error."""
    folder, shm = lab_folder(paths, lab_id), shm_folder(paths, lab_id)
    st = read_state(paths, lab_id)
    res = DownResult(lab_id, st is not None or folder.exists())
    st = st or {}
    sup = st.get("supervisor_pid")
    if isinstance(sup, int) and pid_alive(sup):
        with contextlib.suppress(ProcessLookupError):
            os.kill(sup, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(sup) and time.monotonic() < deadline:
            time.sleep(0.5)
        res.supervisor_stopped = not pid_alive(sup)
        if not res.supervisor_stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(sup, signal.SIGKILL)
    for h in (st.get("hosts") or {}).values():
        pid = h.get("qemu_pid")
        if isinstance(pid, int) and pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            res.killed.append(pid)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(shm, ignore_errors=True)
    return res


__all__ = [
    "DownResult",
    "HostStatus",
    "StandingStatus",
    "default_slot",
    "down",
    "exec_in",
    "read_state",
    "serve",
    "status",
    "up",
    "validate_id",
]
