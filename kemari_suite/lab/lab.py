"""The local host-pair lab: three network namespaces standing in for two hosts and a LAN.

::

     kemari-<id>-pri                                      kemari-<id>-sec
    +---------------------------+   replication link   +---------------------------+
    |  krep-<id>-p  ------------+---- veth, tbf -------+------------  krep-<id>-s  |
    |  (repl_primary_ip)        |   (profile rate)     |       (repl_secondary_ip) |
    |                           |                      |                           |
    |  br0 (lan_primary_ip)     |                      |   br0 (lan_secondary_ip)  |
    |   +- ktap-<id>-p  (TAP)   |                      |   (TAP)  ktap-<id>-s -+   |
    |   +- klan-<id>-p          |                      |          klan-<id>-s -+   |
    +-----------|---------------+                      +----------------|----------+
                |              kemari-<id>-cli                          |
                |            +---------------------------+              |
                +- veth -----+- klan-<id>-cp             |              |
                             |   lan (bridge,            |              |
                             |        lan_client_ip)     |              |
                             |  klan-<id>-cs ------------+----- veth ---+
                             +---------------------------+

The guest's frames leave through the TAP of the host running it (the agent's frame proxy
opens that TAP inside the host's namespace with ``IFF_TAP | IFF_NO_PI``), cross ``br0``
and the LAN veth, and reach the ``lan`` bridge in the client namespace, where clients
and the witness live. After a failover the same guest MAC appears behind the other
host's TAP and ``announce-self`` moves it in the bridges' forwarding tables.

Address plan (``subnet_index`` is a number 1..65535 derived from the lab id)::

    LAN          10.<i // 256>.<i % 256>.0/24    client .1, primary .2, secondary .3,
                                                 guest .10
    replication  172.16.0.0/14 + 4*i, a /30      primary .1, secondary .2 (of the /30)

Lab ids of up to three lowercase letters or digits map one to one onto indices
1..50652 (the id read as a base-37 number with digits 1..36), so such labs never share
a subnet; any other id (four characters, upper case) is hashed into 50653..65535, where
two ids can meet. :func:`up` refuses an id whose index another live lab already uses.
Every lab lives in its own namespaces, with no link to the root namespace, so these
ranges cannot disturb the machine's own networks; they are chosen to be distinct
per lab for the day a lab is bridged out.

Files: :func:`up` records the lab in ``<run_dir>/lab-<id>.json`` (``/run/kemari`` unless
``KEMARI_RUN`` says otherwise), and in the machine-wide registry
(``/run/kemari/labs/<id>.json``, :mod:`kemari_suite.lab.registry`), which says which run
and shm directories it used. Everything else a lab's users leave behind is named
``kemari-<id>-...`` in the run directory or the shm directory (``/dev/shm``; for
example ``/dev/shm/kemari-<id>-pri.ram``). :func:`status` and :func:`down` find all of
it through the registry, whatever the environment says now, and :func:`down` removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from kemari_suite.config import PathsConfig
from kemari_suite.errors import LabError, LabInUseError
from kemari_suite.lab import registry
from kemari_suite.lab.profiles import LinkProfile, get_profile, profile_for_rate
from kemari_suite.protocol.files import mkdir_owner_only, write_owner_only

Role = Literal["primary", "secondary", "client"]
HostRole = Literal["primary", "secondary"]
LinkKind = Literal["repl", "lan"]
HOST_ROLES: tuple[HostRole, HostRole] = ("primary", "secondary")

#: Where ``ip netns add`` mounts named namespaces (iproute2's NETNS_RUN_DIR).
NETNS_DIR = Path("/run/netns")
#: Held while a lab's namespaces are checked and created.
LOCK_FILE = Path("/run/lock/kemari-lab.lock")
NS_PREFIX = "kemari-"
_NS_SUFFIX: dict[Role, str] = {"primary": "pri", "secondary": "sec", "client": "cli"}
HOST_BRIDGE = "br0"
CLIENT_BRIDGE = "lan"
LAN_PREFIX = 24
REPL_PREFIX = 30
LAN_MTU = 1500
#: Longest interface name the kernel accepts (IFNAMSIZ - 1).
IFNAME_MAX = 15

_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
#: Indices 1..50652 belong to ids of up to three [0-9a-z] characters, one to one.
_DIRECT_LIMIT = 37**3
_INDEX_LIMIT = 1 << 16

_KILL_GRACE_S = 2.0
#: Carrier changes reach bridges through the kernel's linkwatch, which batches
#: non-urgent events for up to a second per hop; allow several hops and a busy machine.
_READY_TIMEOUT_S = 10.0


def validate_lab_id(lab_id: str) -> str:
    """Return ``lab_id`` if it is 1-4 ASCII letters or digits.

    Raises:
        LabError: it is not (it becomes part of namespace and interface names).
    """
    if not (1 <= len(lab_id) <= 4 and lab_id.isascii() and lab_id.isalnum()):
        raise LabError(lab_id, "a lab id must be 1-4 letters or digits")
    return lab_id


def subnet_index(lab_id: str) -> int:
    """The number (1..65535) that places a lab's subnets; see the module docstring.

    Raises:
        LabError: ``lab_id`` is not a valid lab id.
    """
    validate_lab_id(lab_id)
    if len(lab_id) <= 3 and all(c in _ID_ALPHABET for c in lab_id):
        n = 0
        for c in lab_id:
            n = n * 37 + _ID_ALPHABET.index(c) + 1
        return n
    digest = hashlib.sha256(f"kemari-lab:{lab_id}".encode()).digest()
    return _DIRECT_LIMIT + int.from_bytes(digest[:4], "big") % (_INDEX_LIMIT - _DIRECT_LIMIT)


def worker_lab_id(worker: str | None, slot: int) -> str:
    """A lab id for test worker ``worker`` (a pytest-xdist id such as "gw3", or None).

    Tests on parallel workers must never share a lab or its subnets. Workers 0..35
    get ``t<worker><slot>`` in base 36 (e.g. "t3a"): three characters from [0-9a-z],
    so distinct (worker, slot) pairs never share subnets. Workers from 36 on get a
    four-character id ``w<worker:2><slot>``, whose subnets are hashed: :func:`up`
    refuses a collision rather than sharing.

    Raises:
        LabError: ``slot`` is not in 0..35 or the worker number is above 1295.
    """
    digits = "".join(c for c in (worker or "") if c.isdigit())
    number = int(digits) if digits else 0
    if not 0 <= slot < 36 or number >= 36 * 36:
        raise LabError(f"{worker}/{slot}", "worker numbers go to 1295 and slots to 35")
    if number < 36:
        return f"t{_ID_ALPHABET[number]}{_ID_ALPHABET[slot]}"
    return f"w{_ID_ALPHABET[number // 36]}{_ID_ALPHABET[number % 36]}{_ID_ALPHABET[slot]}"


@dataclass(frozen=True)
class LabLayout:
    """Every name and address of one lab, computed from its id and profile alone."""

    lab_id: str
    profile: LinkProfile
    subnet_index: int
    ns_primary: str
    ns_secondary: str
    ns_client: str
    #: Replication veth ends (in the primary / secondary namespace).
    repl_primary_if: str
    repl_secondary_if: str
    repl_primary_ip: str
    repl_secondary_ip: str
    repl_prefix: int
    #: LAN veth ends on the host side (members of ``br0`` in each host namespace) ...
    lan_primary_if: str
    lan_secondary_if: str
    #: ... and their peers in the client namespace (members of the ``lan`` bridge).
    lan_client_primary_if: str
    lan_client_secondary_if: str
    host_bridge: str
    client_bridge: str
    lan_client_ip: str
    lan_primary_ip: str
    lan_secondary_ip: str
    guest_ip: str
    lan_prefix: int
    #: TAP devices inside the primary / secondary namespace, members of ``br0``.
    tap_primary: str
    tap_secondary: str

    @property
    def namespaces(self) -> tuple[str, str, str]:
        """The three namespaces: primary, secondary, client."""
        return (self.ns_primary, self.ns_secondary, self.ns_client)

    @property
    def repl_subnet(self) -> str:
        """The replication link's network in CIDR notation."""
        return f"{_network(self.repl_primary_ip, self.repl_prefix)}/{self.repl_prefix}"

    @property
    def lan_subnet(self) -> str:
        """The LAN's network in CIDR notation."""
        return f"{_network(self.lan_client_ip, self.lan_prefix)}/{self.lan_prefix}"

    def ns_for(self, role: Role) -> str:
        """The namespace of ``role``."""
        return {
            "primary": self.ns_primary,
            "secondary": self.ns_secondary,
            "client": self.ns_client,
        }[role]

    def repl_if_for(self, role: HostRole) -> str:
        """The replication veth end in ``role``'s namespace."""
        return self.repl_primary_if if role == "primary" else self.repl_secondary_if

    def repl_ip_for(self, role: HostRole) -> str:
        """``role``'s address on the replication link."""
        return self.repl_primary_ip if role == "primary" else self.repl_secondary_ip

    def lan_if_for(self, role: HostRole) -> str:
        """The host-side LAN veth end in ``role``'s namespace."""
        return self.lan_primary_if if role == "primary" else self.lan_secondary_if

    def lan_ip_for(self, role: Role) -> str:
        """``role``'s own address on the LAN."""
        return {
            "primary": self.lan_primary_ip,
            "secondary": self.lan_secondary_ip,
            "client": self.lan_client_ip,
        }[role]

    def tap_for(self, role: HostRole) -> str:
        """The TAP device in ``role``'s namespace."""
        return self.tap_primary if role == "primary" else self.tap_secondary


def _network(ip: str, prefix: int) -> str:
    value = _ip_to_int(ip) & ~((1 << (32 - prefix)) - 1) & 0xFFFFFFFF
    return _int_to_ip(value)


def _ip_to_int(ip: str) -> int:
    a, b, c, d = (int(x) for x in ip.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def _int_to_ip(value: int) -> str:
    return ".".join(str((value >> shift) & 0xFF) for shift in (24, 16, 8, 0))


def layout(lab_id: str, profile: str = "1g") -> LabLayout:
    """Compute the names and addresses of lab ``lab_id`` (no side effects).

    Raises:
        LabError: the lab id is invalid or the profile unknown.
    """
    index = subnet_index(lab_id)
    prof = get_profile(profile, lab_id=lab_id)
    lan_base = (10 << 24) | (index << 8)
    repl_base = _ip_to_int("172.16.0.0") + 4 * index
    i = lab_id
    return LabLayout(
        lab_id=lab_id,
        profile=prof,
        subnet_index=index,
        ns_primary=f"{NS_PREFIX}{i}-pri",
        ns_secondary=f"{NS_PREFIX}{i}-sec",
        ns_client=f"{NS_PREFIX}{i}-cli",
        repl_primary_if=f"krep-{i}-p",
        repl_secondary_if=f"krep-{i}-s",
        repl_primary_ip=_int_to_ip(repl_base + 1),
        repl_secondary_ip=_int_to_ip(repl_base + 2),
        repl_prefix=REPL_PREFIX,
        lan_primary_if=f"klan-{i}-p",
        lan_secondary_if=f"klan-{i}-s",
        lan_client_primary_if=f"klan-{i}-cp",
        lan_client_secondary_if=f"klan-{i}-cs",
        host_bridge=HOST_BRIDGE,
        client_bridge=CLIENT_BRIDGE,
        lan_client_ip=_int_to_ip(lan_base + 1),
        lan_primary_ip=_int_to_ip(lan_base + 2),
        lan_secondary_ip=_int_to_ip(lan_base + 3),
        guest_ip=_int_to_ip(lan_base + 10),
        lan_prefix=LAN_PREFIX,
        tap_primary=f"ktap-{i}-p",
        tap_secondary=f"ktap-{i}-s",
    )


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


# --------------------------------------------------------------------------- status


@dataclass(frozen=True)
class LinkState:
    """One interface found in a lab namespace."""

    ns: str
    name: str
    #: "veth", "bridge", "tun", or None (loopback).
    kind: str | None
    admin_up: bool
    carrier: bool
    mtu: int
    master: str | None
    addresses: tuple[str, ...]
    #: Root qdisc kind ("tbf", "noqueue", ...) and, for tbf, its shaping.
    qdisc: str | None
    rate_bit: int | None
    burst_bytes: int | None


@dataclass(frozen=True)
class LabStatus:
    """What is actually there for one lab id."""

    lab_id: str
    #: At least one of the lab's namespaces exists (``up`` would refuse).
    exists: bool
    #: All three namespaces and every expected interface, address and qdisc are present.
    complete: bool
    namespaces: tuple[str, ...]
    missing_namespaces: tuple[str, ...]
    links: tuple[LinkState, ...]
    #: From the state file, else recognised from the replication link's tbf rate.
    profile: str | None
    layout: LabLayout | None
    state_file: Path | None
    #: Human-readable differences from the expected lab (empty when complete).
    problems: tuple[str, ...]
    #: The lab's entry in the machine-wide registry, when it has one.
    registry_file: Path | None = None
    #: The run and shm directories the registry recorded for its files.
    run_dir: Path | None = None
    shm_dir: Path | None = None
    #: Every place looked at: the namespaces' mount points, the registry entry, the
    #: state files tried (what to say when nothing was found).
    looked_in: tuple[Path, ...] = ()

    def link(self, ns: str, name: str) -> LinkState | None:
        """The interface ``name`` in namespace ``ns``, if found."""
        for link in self.links:
            if link.ns == ns and link.name == name:
                return link
        return None


def status(lab_id: str, *, paths: PathsConfig | None = None) -> LabStatus:
    """Inspect lab ``lab_id`` without changing anything.

    Raises:
        LabError: the id is invalid, or iproute2 failed on a namespace that exists.
    """
    bare = layout(lab_id)
    existing = _existing_namespaces()
    present = tuple(ns for ns in bare.namespaces if ns in existing)
    missing = tuple(ns for ns in bare.namespaces if ns not in existing)
    links: list[LinkState] = []
    for ns in present:
        links.extend(_links_in(lab_id, ns))

    rec = registry.lookup(lab_id)
    tried = [_state_path(run_dir, lab_id) for run_dir, _ in _lab_dirs(lab_id, paths)]
    found = next(((f, d) for f in tried if (d := _read_state(f)) is not None), None)
    profile: str | None = None
    if found is not None and isinstance(found[1].get("profile"), str):
        profile = found[1]["profile"]
    elif rec is not None:
        profile = rec.profile
    else:
        repl = next((x for x in links if x.name == bare.repl_primary_if), None)
        guess = profile_for_rate(repl.rate_bit) if repl is not None else None
        profile = guess.name if guess is not None else None
    lay = None
    if profile is not None:
        try:
            lay = layout(lab_id, profile)
        except LabError:
            lay = None

    problems = [f"namespace {ns} is missing" for ns in missing]
    if present and lay is None:
        problems.append("cannot tell the link profile (no state file, unknown tbf rate)")
    if lay is not None and present:
        problems.extend(_check(lay, links))
    if rec is not None and not present:
        problems.append(f"the registry entry {registry.registry_file(lab_id)} is stale")
    return LabStatus(
        lab_id=lab_id,
        exists=bool(present),
        complete=bool(present) and not missing and not problems,
        namespaces=present,
        missing_namespaces=missing,
        links=tuple(links),
        profile=profile,
        layout=lay,
        state_file=found[0] if found is not None else None,
        problems=tuple(problems),
        registry_file=registry.registry_file(lab_id) if rec is not None else None,
        run_dir=rec.run_dir if rec is not None else None,
        shm_dir=rec.shm_dir if rec is not None else None,
        looked_in=(
            *(NETNS_DIR / ns for ns in bare.namespaces),
            registry.registry_file(lab_id),
            *tried,
        ),
    )


def _links_in(lab_id: str, ns: str) -> list[LinkState]:
    addrs = _run_json(lab_id, ["ip", "-n", ns, "-j", "-d", "addr", "show"])
    qdiscs = _run_json(lab_id, ["tc", "-n", ns, "-j", "qdisc", "show"])
    root_qdisc: dict[str, dict[str, Any]] = {
        str(q.get("dev")): q for q in qdiscs if q.get("root") and "dev" in q
    }
    links: list[LinkState] = []
    for entry in addrs:
        name = str(entry.get("ifname", ""))
        flags = entry.get("flags", [])
        q = root_qdisc.get(name)
        options = q.get("options", {}) if q else {}
        rate = options.get("rate") if q and q.get("kind") == "tbf" else None
        burst = options.get("burst") if q and q.get("kind") == "tbf" else None
        links.append(
            LinkState(
                ns=ns,
                name=name,
                kind=(entry.get("linkinfo") or {}).get("info_kind"),
                admin_up="UP" in flags,
                carrier="LOWER_UP" in flags,
                mtu=int(entry.get("mtu", 0)),
                master=entry.get("master"),
                addresses=tuple(
                    f"{a['local']}/{a['prefixlen']}"
                    for a in entry.get("addr_info", [])
                    if a.get("family") == "inet"
                ),
                qdisc=str(q["kind"]) if q else entry.get("qdisc"),
                # tc reports tbf rates in bytes per second.
                rate_bit=int(rate) * 8 if isinstance(rate, int) else None,
                burst_bytes=int(burst) if isinstance(burst, int) else None,
            )
        )
    return links


def _check(lay: LabLayout, links: list[LinkState]) -> list[str]:
    problems: list[str] = []
    found = {(x.ns, x.name): x for x in links}

    def need(ns: str, name: str, *, master: str | None = None, addr: str | None = None) -> None:
        link = found.get((ns, name))
        if link is None:
            problems.append(f"{name} is missing in {ns}")
            return
        if not link.admin_up:
            problems.append(f"{name} in {ns} is down")
        if master is not None and link.master != master:
            problems.append(f"{name} in {ns} is not in bridge {master}")
        if addr is not None and addr not in link.addresses:
            problems.append(f"{name} in {ns} lacks address {addr}")

    for role in HOST_ROLES:
        ns = lay.ns_for(role)
        repl_if = lay.repl_if_for(role)
        need(ns, repl_if, addr=f"{lay.repl_ip_for(role)}/{lay.repl_prefix}")
        need(ns, lay.host_bridge, addr=f"{lay.lan_ip_for(role)}/{lay.lan_prefix}")
        need(ns, lay.lan_if_for(role), master=lay.host_bridge)
        need(ns, lay.tap_for(role), master=lay.host_bridge)
        repl = found.get((ns, repl_if))
        if repl is not None:
            if repl.mtu != lay.profile.mtu:
                problems.append(f"{repl_if} in {ns} has MTU {repl.mtu}, not {lay.profile.mtu}")
            if repl.rate_bit != lay.profile.rate_bit:
                want = lay.profile.rate_bit or "no tbf"
                problems.append(f"{repl_if} in {ns} is shaped to {repl.rate_bit}, not {want}")
    cli = lay.ns_client
    need(cli, lay.client_bridge, addr=f"{lay.lan_client_ip}/{lay.lan_prefix}")
    need(cli, lay.lan_client_primary_if, master=lay.client_bridge)
    need(cli, lay.lan_client_secondary_if, master=lay.client_bridge)
    return problems


# --------------------------------------------------------------------------- partitions


def set_link_up(
    lab_id: str, role: Role, up: bool, *, link: LinkKind = "repl", wait: bool = True
) -> None:
    """Set one host's end of the replication link (or its LAN veth) administratively up or down.

    Taking one end down drops the carrier on the other end too, like a pulled cable,
    and takes effect at once. The tbf qdisc and the addresses stay; bringing the end up
    restores the route. With ``wait``, bringing an end up returns only once both ends
    of that link are operationally UP again (when the other end is admin-up too).

    Raises:
        LabError: ``role`` has no such link (the client has no replication link), the
            lab is not up, ``ip`` failed, or the link did not come up in time.
    """
    lay = layout(lab_id)
    if role == "client":
        raise LabError(lab_id, f"the {role} namespace has no {link} link of its own")
    ns = lay.ns_for(role)
    if ns not in _existing_namespaces():
        raise LabError(lab_id, f"namespace {ns} does not exist (is the lab up?)")
    if link == "repl":
        dev = lay.repl_if_for(role)
        other_role: HostRole = "secondary" if role == "primary" else "primary"
        peer = (lay.ns_for(other_role), lay.repl_if_for(other_role))
    else:
        dev = lay.lan_if_for(role)
        client_end = lay.lan_client_primary_if if role == "primary" else lay.lan_client_secondary_if
        peer = (lay.ns_client, client_end)
    _run(lab_id, ["ip", "-n", ns, "link", "set", "dev", dev, "up" if up else "down"])
    if up and wait and _admin_up(lab_id, *peer):
        _wait_until_up(lay, [(ns, dev), peer])


def wait_tap_forwarding(lab_id: str, role: HostRole, timeout_s: float = _READY_TIMEOUT_S) -> None:
    """Wait until ``role``'s TAP forwards frames in ``br0``.

    The TAP has no carrier until a process opens it; after the frame proxy opens it,
    the bridge starts forwarding on it only once the kernel's linkwatch has seen the
    carrier (up to a second). Call this before relying on frames crossing the TAP.

    Raises:
        LabError: the port is not forwarding after ``timeout_s``, or ``bridge`` failed.
    """
    lay = layout(lab_id)
    ns, tap = lay.ns_for(role), lay.tap_for(role)
    deadline = time.monotonic() + timeout_s
    while True:
        ports = _run_json(lab_id, ["bridge", "-n", ns, "-j", "link", "show", "dev", tap])
        state = str(ports[0].get("state")) if ports else "absent"
        if state == "forwarding":
            return
        if time.monotonic() >= deadline:
            raise LabError(
                lab_id, f"TAP {tap} in {ns} is {state}, not forwarding, after {timeout_s:g} s"
            )
        time.sleep(0.02)


def _admin_up(lab_id: str, ns: str, dev: str) -> bool:
    entries = _run_json(lab_id, ["ip", "-n", ns, "-j", "link", "show", "dev", dev])
    return bool(entries) and "UP" in entries[0].get("flags", [])


def partition(lab_id: str) -> None:
    """Cut the replication link (both ends down); the LAN stays up.

    Raises:
        LabError: as :func:`set_link_up`.
    """
    set_link_up(lab_id, "primary", False)
    set_link_up(lab_id, "secondary", False)


def heal(lab_id: str) -> None:
    """Restore the replication link (both ends up).

    Raises:
        LabError: as :func:`set_link_up`.
    """
    set_link_up(lab_id, "primary", True, wait=False)
    set_link_up(lab_id, "secondary", True)
