"""Bringing a lab up and down: its namespaces, its state file, its registry entry.

This module owns what a lab leaves on the machine: the three network namespaces
and everything built inside them (:func:`up`, :func:`down`), the state file, the entry
in the machine-wide registry (:mod:`kemari_suite.lab.registry`), the lock that
serialises creation, and the processes still running in the namespaces when the lab
goes down. The names and addresses come from :mod:`kemari_suite.lab.addressing`, which
also draws the topology; the live view of the links and the link operations
(:func:`~kemari_suite.lab.links.status`, :func:`~kemari_suite.lab.links.partition`, ...)
are in :mod:`kemari_suite.lab.links`, which uses this module's command helpers, its
readiness wait and its reader of the state file.

Files: :func:`up` records the lab in ``<run_dir>/lab-<id>.json`` (``/run/kemari`` unless
``KEMARI_RUN`` says otherwise), and in the machine-wide registry
(``/run/kemari/labs/<id>.json``, :mod:`kemari_suite.lab.registry`), which says which run
and shm directories it used. Everything else a lab's users leave behind is named
``kemari-<id>-...`` in the run directory or the shm directory (``/dev/shm``; for
example ``/dev/shm/kemari-<id>-pri.ram``). :func:`~kemari_suite.lab.links.status` and
:func:`down` find all of it through the registry, whatever the environment says now,
and :func:`down` removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kemari_suite.config import PathsConfig
from kemari_suite.errors import LabError, LabInUseError
from kemari_suite.lab import registry
from kemari_suite.lab.addressing import (
    _NS_SUFFIX,
    HOST_ROLES,
    NS_PREFIX,
    HostRole,
    LabLayout,
    VmAddresses,
    layout,
    subnet_index,
    validate_lab_id,
)
from kemari_suite.protocol.files import mkdir_owner_only, write_owner_only

#: Where ``ip netns add`` mounts named namespaces (iproute2's NETNS_RUN_DIR).
NETNS_DIR = Path("/run/netns")
#: Held while a lab's namespaces are checked and created.
LOCK_FILE = Path("/run/lock/kemari-lab.lock")

_KILL_GRACE_S = 2.0
#: Carrier changes reach bridges through the kernel's linkwatch, which batches
#: non-urgent events for up to a second per hop; allow several hops and a busy machine.
_READY_TIMEOUT_S = 10.0


def netns_exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *argv]


# --------------------------------------------------------------------------- commands


def _run(
    lab_id: str, argv: Sequence[str], *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run one iproute2 command.

    Raises:
        LabError: the tool is missing, or (with ``check``) the command exited non-zero;
            the message names the command and quotes its stderr.
    """
    try:
        result = subprocess.run(list(argv), check=False, capture_output=True, text=True)
    except OSError as err:
        raise LabError(
            lab_id, f"cannot run `{argv[0]}` ({err.strerror}); install iproute2"
        ) from err
    if check and result.returncode != 0:
        raise LabError(
            lab_id,
            f"`{' '.join(argv)}` exited {result.returncode}: {result.stderr.strip() or '-'}",
        )
    return result


def _run_json(lab_id: str, argv: Sequence[str]) -> list[dict[str, Any]]:
    out = _run(lab_id, argv).stdout.strip()
    if not out:
        return []
    try:
        data = json.loads(out)
    except json.JSONDecodeError as err:
        raise LabError(lab_id, f"`{' '.join(argv)}` printed no JSON: {err}") from err
    return data if isinstance(data, list) else []


def _existing_namespaces() -> set[str]:
    try:
        return {p.name for p in NETNS_DIR.iterdir()}
    except FileNotFoundError:
        return set()


def _paths(paths: PathsConfig | None) -> PathsConfig:
    return paths if paths is not None else PathsConfig()


def state_file(lab_id: str, *, paths: PathsConfig | None = None) -> Path:
    """Where :func:`up` records the lab (``<run_dir>/lab-<id>.json``)."""
    return _state_path(_paths(paths).run_dir, lab_id)


def _state_path(run_dir: Path, lab_id: str) -> Path:
    return run_dir / f"lab-{lab_id}.json"


@contextlib.contextmanager
def _lab_lock(lab_id: str) -> Iterator[None]:
    """Serialise lab creation, so two ``up`` calls cannot both pass the collision checks.

    The lock file is machine-wide (namespaces are), not under the configurable run
    directory: two callers with different run directories still share one lock.
    """
    try:
        mkdir_owner_only(LOCK_FILE.parent)
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise LabError(lab_id, f"cannot open the lab lock {LOCK_FILE}: {err}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- up / down


def list_labs() -> list[str]:
    """Ids of the labs with at least one namespace present, sorted."""
    ids: set[str] = set()
    for name in _existing_namespaces():
        if not name.startswith(NS_PREFIX):
            continue
        lab_id, _, suffix = name[len(NS_PREFIX) :].rpartition("-")
        if suffix not in _NS_SUFFIX.values():
            continue
        try:
            ids.add(validate_lab_id(lab_id))
        except LabError:
            continue
    return sorted(ids)


def up(lab_id: str, profile: str = "1g", *, paths: PathsConfig | None = None) -> LabLayout:
    """Build lab ``lab_id`` with its replication link shaped to ``profile``.

    Raises:
        LabInUseError: one of the lab's namespaces already exists.
        LabError: invalid id or profile, not root, another live lab uses the same
            subnets, or a command failed (then everything created so far is removed
            and the message names the command and its stderr).
    """
    lay = layout(lab_id, profile)
    p = _paths(paths)
    if os.geteuid() != 0:
        raise LabError(lab_id, "building a lab needs root (network namespaces, veth, tc)")
    created: list[str] = []
    try:
        with _lab_lock(lab_id):
            existing = _existing_namespaces()
            if any(ns in existing for ns in lay.namespaces):
                raise LabInUseError(lab_id)
            for other in list_labs():
                if other != lab_id and subnet_index(other) == lay.subnet_index:
                    raise LabError(
                        lab_id,
                        f"labs {other} and {lab_id} map to the same subnets "
                        f"({lay.lan_subnet}, {lay.repl_subnet}) and lab {other} is up; "
                        "pick another id",
                    )
            for ns in lay.namespaces:
                _run(lab_id, ["ip", "netns", "add", ns])
                created.append(ns)
        _build(lay)
        _wait_until_up(lay, _ready_interfaces(lay))
        _write_state(lay, p)
        registry.record(
            registry.LabRecord(lab_id, lay.profile.name, p.run_dir.absolute(), p.shm_dir.absolute())
        )
    except BaseException:
        # Removing the namespaces removes every veth, bridge, TAP and qdisc in them.
        for ns in created:
            _run(lab_id, ["ip", "netns", "del", ns], check=False)
        if created:
            with contextlib.suppress(OSError):
                state_file(lab_id, paths=p).unlink()
            with contextlib.suppress(LabError):
                registry.forget(lab_id)
        raise
    return lay


def fresh(
    lab_id: str,
    profile: str = "1g",
    *,
    say: Callable[[str], None] | None = None,
    paths: PathsConfig | None = None,
) -> LabLayout:
    """Lab ``lab_id`` built anew: a lab of that id left by an earlier run (a demo or a
    bench that was interrupted) is taken down first, then :func:`up`.

    Raises:
        LabError: as :func:`up`.
    """
    if lab_id in list_labs():
        if say is not None:
            say(f"removing a stale lab {lab_id!r} left by an earlier run")
        down(lab_id, paths=paths)
    return up(lab_id, profile, paths=paths)


def _build(lay: LabLayout) -> None:
    i = lay.lab_id
    pri, sec, cli = lay.namespaces
    prof = lay.profile

    def ipn(ns: str, *args: str) -> None:
        _run(i, ["ip", "-n", ns, *args])

    for ns in lay.namespaces:
        ipn(ns, "link", "set", "lo", "up")

    # Replication link: both ends created directly inside their namespaces, so the
    # names never exist in the root namespace and cannot collide with another lab.
    _run(
        i,
        [
            "ip", "link", "add", lay.repl_primary_if, "netns", pri, "type", "veth",
            "peer", "name", lay.repl_secondary_if, "netns", sec,
        ],
    )  # fmt: skip
    for role in HOST_ROLES:
        ns = lay.ns_for(role)
        dev = lay.repl_if_for(role)
        ipn(ns, "link", "set", "dev", dev, "mtu", str(prof.mtu))
        ipn(ns, "addr", "add", f"{lay.repl_ip_for(role)}/{lay.repl_prefix}", "dev", dev)
        if prof.shaped:
            # Shape both ends: a qdisc only shapes what leaves its own interface.
            _run(i, ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *prof.tbf_args()])
        ipn(ns, "link", "set", "dev", dev, "up")

    # LAN: a bridge in the client namespace ...
    ipn(cli, "link", "add", lay.client_bridge, "type", "bridge")
    ipn(cli, "addr", "add", f"{lay.lan_client_ip}/{lay.lan_prefix}", "dev", lay.client_bridge)
    ipn(cli, "link", "set", "dev", lay.client_bridge, "up")
    # ... and in each host namespace br0 = host's LAN veth end + TAP, with the host's address.
    hosts: tuple[tuple[HostRole, str, str], ...] = (
        ("primary", pri, lay.lan_client_primary_if),
        ("secondary", sec, lay.lan_client_secondary_if),
    )
    for role, ns, client_end in hosts:
        host_end = lay.lan_if_for(role)
        tap = lay.tap_for(role)
        _run(
            i,
            [
                "ip", "link", "add", host_end, "netns", ns, "type", "veth",
                "peer", "name", client_end, "netns", cli,
            ],
        )  # fmt: skip
        ipn(cli, "link", "set", "dev", client_end, "master", lay.client_bridge)
        ipn(cli, "link", "set", "dev", client_end, "up")
        ipn(ns, "link", "add", lay.host_bridge, "type", "bridge")
        ipn(ns, "tuntap", "add", "dev", tap, "mode", "tap")
        ipn(ns, "link", "set", "dev", tap, "master", lay.host_bridge)
        ipn(ns, "link", "set", "dev", host_end, "master", lay.host_bridge)
        ipn(ns, "addr", "add", f"{lay.lan_ip_for(role)}/{lay.lan_prefix}", "dev", lay.host_bridge)
        for dev in (tap, host_end, lay.host_bridge):
            ipn(ns, "link", "set", "dev", dev, "up")


def add_vm_taps(lay: LabLayout, vms: Sequence[VmAddresses]) -> None:
    """Give each VM of ``vms`` a TAP of its own in both host namespaces, on ``br0``
    (a TAP serves one frame proxy; the lab's own TAPs are slot 0's). TAPs already
    there are kept; they go with the namespaces at :func:`down`.

    Raises:
        LabError: a command failed.
    """
    for role in HOST_ROLES:
        ns = lay.ns_for(role)
        have = {row.get("ifname") for row in _run_json(lay.lab_id, ["ip", "-n", ns, "-j", "link"])}
        for vm in vms:
            tap = vm.tap_for(role)
            if tap in have:
                continue
            _run(lay.lab_id, ["ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"])
            _run(lay.lab_id, ["ip", "-n", ns, "link", "set", "dev", tap, "master", lay.host_bridge])
            _run(lay.lab_id, ["ip", "-n", ns, "link", "set", "dev", tap, "up"])


def _ready_interfaces(lay: LabLayout) -> list[tuple[str, str]]:
    """(namespace, interface) pairs that carry traffic once the lab is usable."""
    ready: list[tuple[str, str]] = []
    for role in HOST_ROLES:
        ns = lay.ns_for(role)
        ready += [(ns, lay.repl_if_for(role)), (ns, lay.lan_if_for(role)), (ns, lay.host_bridge)]
    cli = lay.ns_client
    ready += [
        (cli, lay.client_bridge),
        (cli, lay.lan_client_primary_if),
        (cli, lay.lan_client_secondary_if),
    ]
    return ready


def _wait_until_up(
    lay: LabLayout, interfaces: Sequence[tuple[str, str]], timeout_s: float = _READY_TIMEOUT_S
) -> None:
    """Wait until every interface's operational state is UP.

    ``ip link set up`` returns before the carrier has propagated: a bridge forwards on
    a port, and itself reports a carrier, only after the kernel's linkwatch has
    processed the port's carrier event, up to a second later. Pinging the lab before
    that loses the first packets.

    Raises:
        LabError: some interface is still not UP after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    namespaces = sorted({ns for ns, _ in interfaces})
    while True:
        states: dict[tuple[str, str], str] = {}
        for ns in namespaces:
            for entry in _run_json(lay.lab_id, ["ip", "-n", ns, "-j", "link", "show"]):
                states[(ns, str(entry.get("ifname")))] = str(entry.get("operstate"))
        pending = [f"{dev} in {ns}" for ns, dev in interfaces if states.get((ns, dev)) != "UP"]
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise LabError(lay.lab_id, f"not up after {timeout_s:g} s: {', '.join(pending)}")
        time.sleep(0.02)


def _write_state(lay: LabLayout, paths: PathsConfig) -> None:
    path = state_file(lay.lab_id, paths=paths)
    record = {
        "lab_id": lay.lab_id,
        "profile": lay.profile.name,
        "created_unix": time.time(),
        "layout": asdict(lay),
    }
    try:
        mkdir_owner_only(path.parent)
        write_owner_only(path, json.dumps(record, indent=2) + "\n")
    except OSError as err:
        raise LabError(lay.lab_id, f"cannot write {path}: {err}") from err


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class DownReport:
    """What :func:`down` found and removed."""

    lab_id: str
    #: Namespaces deleted.
    namespaces: tuple[str, ...]
    #: Files and folders removed (state file, ``kemari-<id>-*``).
    removed: tuple[Path, ...]
    #: Directories searched for the lab's files.
    searched: tuple[Path, ...]
    #: The registry entry removed, if there was one.
    registry_file: Path | None

    @property
    def found(self) -> bool:
        """Anything of the lab was there."""
        return bool(self.namespaces or self.removed or self.registry_file)


def _lab_dirs(lab_id: str, paths: PathsConfig | None) -> list[tuple[Path, Path]]:
    """(run_dir, shm_dir) pairs that may hold lab ``lab_id``'s files: the registry's
    first, then ``paths`` (the environment's when None)."""
    found: list[tuple[Path, Path]] = []
    rec = registry.lookup(lab_id)
    if rec is not None:
        found.append((rec.run_dir, rec.shm_dir))
    p = _paths(paths)
    if (p.run_dir, p.shm_dir) not in found:
        found.append((p.run_dir, p.shm_dir))
    return found


def down(
    lab_id: str, *, paths: PathsConfig | None = None, kill_processes: bool = True
) -> DownReport:
    """Remove lab ``lab_id``; doing so for a lab that is not there is not an error.

    Processes still inside the lab's namespaces are sent SIGTERM, then SIGKILL after
    two seconds (a namespace outlives its name while a process is in it, and with it
    every veth and TAP), unless ``kill_processes`` is False. Then the namespaces are
    deleted (which removes their interfaces), then the state file and every file or
    directory named ``kemari-<id>-*`` in the run and shm directories: those the
    registry recorded for the lab and those of ``paths`` (the environment's when None),
    and last the registry entry.

    Raises:
        LabError: the id is invalid, or something could not be removed (after trying
            everything else).
    """
    validate_lab_id(lab_id)
    problems: list[str] = []
    present = [ns for ns in layout(lab_id).namespaces if ns in _existing_namespaces()]
    if kill_processes:
        for ns in present:
            try:
                _kill_namespace_processes(ns)
            except OSError as err:
                problems.append(f"cannot stop processes in {ns}: {err}")
    deleted: list[str] = []
    for ns in present:
        result = _run(lab_id, ["ip", "netns", "del", ns], check=False)
        if result.returncode != 0 and ns in _existing_namespaces():
            problems.append(
                f"`ip netns del {ns}` exited {result.returncode}: {result.stderr.strip()}"
            )
        else:
            deleted.append(ns)
    leftovers: list[Path] = []
    searched: list[Path] = []
    prefix = f"kemari-{lab_id}-"
    for run_dir, shm_dir in _lab_dirs(lab_id, paths):
        leftovers.append(_state_path(run_dir, lab_id))
        for directory in (run_dir, shm_dir):
            if directory in searched:
                continue
            searched.append(directory)
            with contextlib.suppress(OSError):
                leftovers.extend(c for c in directory.iterdir() if c.name.startswith(prefix))
    removed: list[Path] = []
    for path in leftovers:
        if not (path.exists() or path.is_symlink()):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        except OSError as err:
            problems.append(f"cannot remove {path}: {err}")
    entry = registry.registry_file(lab_id)
    had_entry = entry.exists()
    try:
        registry.forget(lab_id)
    except LabError as err:
        problems.append(err.reason)
    if problems:
        raise LabError(lab_id, "; ".join(problems))
    return DownReport(
        lab_id=lab_id,
        namespaces=tuple(deleted),
        removed=tuple(removed),
        searched=tuple(searched),
        registry_file=entry if had_entry else None,
    )


def _namespace_pids(ns: str) -> list[int]:
    """Processes whose network namespace is the named namespace ``ns`` (as ``ip netns pids``)."""
    try:
        st = os.stat(NETNS_DIR / ns)
    except FileNotFoundError:
        return []
    target = (st.st_dev, st.st_ino)
    pids: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            nst = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue  # exited, a kernel thread, or a zombie
        if (nst.st_dev, nst.st_ino) == target:
            pids.append(int(entry.name))
    return [pid for pid in pids if pid != os.getpid()]


def _kill_namespace_processes(ns: str) -> None:
    pids = _namespace_pids(ns)
    if not pids:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _KILL_GRACE_S
    while time.monotonic() < deadline:
        pids = _namespace_pids(ns)
        if not pids:
            return
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
