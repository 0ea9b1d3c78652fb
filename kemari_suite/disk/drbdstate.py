"""DRBD 9 state as drbd-utils prints it: ``drbdsetup status --json`` and ``events2``.

Both parsers follow drbd-utils 9.22 (``user/v9/drbdsetup.c`` and
``user/v9/drbdsetup_events2.c``):

``drbdsetup status --json RES`` prints a JSON list of resources::

    [{"name", "node-id", "role", "suspended", ..., "devices": [{"volume", "minor",
      "disk-state", "client", "quorum", "size" (KiB), ...}],
      "connections": [{"peer-node-id", "name", "connection-state", "peer-role",
        "peer_devices": [{"volume", "replication-state", "peer-disk-state",
          "out-of-sync" (KiB), "percent-in-sync", "percent-resync-done"?, ...}]}]}]

``drbdsetup events2 [--now] [--statistics] [--timestamps] RES`` prints one event a line::

    [TIMESTAMP ]ACTION OBJECT key:value key:value ...
    ACTION = exists | create | change | destroy | call | response | rename
    OBJECT = resource | device | connection | peer-device | path | helper
    exists -            end of the initial state (the only line of --now after the dump)
    - skipped N         N netlink events were lost: re-read the status

A value never contains a space; it may contain colons (``local:ipv4:10.0.0.1:7789``), so
a field splits at its first colon. States are parsed into enums; a value this module does
not know (a newer DRBD) raises :class:`~kemari_suite.errors.DiskError` rather than being
guessed at.

:class:`DrbdMonitor` turns events into the notices the failover logic needs:
disconnects, role changes, split brain (the kernel runs the ``initial-split-brain`` and,
when unresolved, the ``split-brain`` helper, which events2 shows as ``call helper ...
helper:split-brain``), resync progress and the end of a resync.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kemari_suite.errors import DiskError

# ---- states -----------------------------------------------------------------------------


class Role(enum.Enum):
    PRIMARY = "Primary"
    SECONDARY = "Secondary"
    UNKNOWN = "Unknown"


class DiskState(enum.Enum):
    DISKLESS = "Diskless"
    ATTACHING = "Attaching"
    DETACHING = "Detaching"
    FAILED = "Failed"
    NEGOTIATING = "Negotiating"
    INCONSISTENT = "Inconsistent"
    OUTDATED = "Outdated"
    DUNKNOWN = "DUnknown"
    CONSISTENT = "Consistent"
    UP_TO_DATE = "UpToDate"


class ConnectionState(enum.Enum):
    STANDALONE = "StandAlone"
    DISCONNECTING = "Disconnecting"
    UNCONNECTED = "Unconnected"
    TIMEOUT = "Timeout"
    BROKEN_PIPE = "BrokenPipe"
    NETWORK_FAILURE = "NetworkFailure"
    PROTOCOL_ERROR = "ProtocolError"
    TEAR_DOWN = "TearDown"
    CONNECTING = "Connecting"
    CONNECTED = "Connected"


class ReplicationState(enum.Enum):
    OFF = "Off"
    ESTABLISHED = "Established"
    STARTING_SYNC_S = "StartingSyncS"
    STARTING_SYNC_T = "StartingSyncT"
    WF_BITMAP_S = "WFBitMapS"
    WF_BITMAP_T = "WFBitMapT"
    WF_SYNC_UUID = "WFSyncUUID"
    SYNC_SOURCE = "SyncSource"
    SYNC_TARGET = "SyncTarget"
    VERIFY_S = "VerifyS"
    VERIFY_T = "VerifyT"
    PAUSED_SYNC_S = "PausedSyncS"
    PAUSED_SYNC_T = "PausedSyncT"
    AHEAD = "Ahead"
    BEHIND = "Behind"

    @property
    def resyncing(self) -> bool:
        """A resync is starting, running or paused (online verify is not a resync)."""
        return self in _RESYNC_STATES


_RESYNC_STATES = frozenset(
    {
        ReplicationState.STARTING_SYNC_S,
        ReplicationState.STARTING_SYNC_T,
        ReplicationState.WF_BITMAP_S,
        ReplicationState.WF_BITMAP_T,
        ReplicationState.WF_SYNC_UUID,
        ReplicationState.SYNC_SOURCE,
        ReplicationState.SYNC_TARGET,
        ReplicationState.PAUSED_SYNC_S,
        ReplicationState.PAUSED_SYNC_T,
    }
)

E = TypeVar("E", bound=enum.Enum)


def _enum(cls: type[E], value: Any, what: str) -> E:
    try:
        return cls(value)
    except ValueError:
        raise DiskError("drbd", f"unrecognised {what} {value!r} in drbdsetup output") from None


# ---- drbdsetup status --json ------------------------------------------------------------


@dataclass(frozen=True)
class DeviceStatus:
    volume: int
    minor: int
    disk_state: DiskState
    client: bool
    quorum: bool
    #: KiB; None when the kernel sent no statistics.
    size_kib: int | None = None


@dataclass(frozen=True)
class PeerDeviceStatus:
    volume: int
    replication_state: ReplicationState
    peer_disk_state: DiskState
    peer_client: bool
    resync_suspended: str
    out_of_sync_kib: int
    percent_in_sync: float
    #: ``percent-resync-done``, present only while a resync runs.
    resync_done_percent: float | None = None
    eta_s: float | None = None


@dataclass(frozen=True)
class ConnectionStatus:
    peer_node_id: int
    name: str
    connection_state: ConnectionState
    peer_role: Role
    congested: bool
    peer_devices: tuple[PeerDeviceStatus, ...] = ()


@dataclass(frozen=True)
class ResourceStatus:
    name: str
    node_id: int
    role: Role
    suspended: bool
    devices: tuple[DeviceStatus, ...] = ()
    connections: tuple[ConnectionStatus, ...] = ()

    @property
    def connected(self) -> bool:
        """Every configured connection is up (and there is at least one)."""
        return bool(self.connections) and all(
            c.connection_state is ConnectionState.CONNECTED for c in self.connections
        )

    @property
    def up_to_date(self) -> bool:
        """Every local volume is UpToDate."""
        return bool(self.devices) and all(
            d.disk_state is DiskState.UP_TO_DATE for d in self.devices
        )

    @property
    def peers_up_to_date(self) -> bool:
        """Every peer volume with a disk is UpToDate (diskless tiebreakers excepted)."""
        pds = [pd for c in self.connections for pd in c.peer_devices if not pd.peer_client]
        return bool(pds) and all(pd.peer_disk_state is DiskState.UP_TO_DATE for pd in pds)

    @property
    def resync_percent(self) -> float | None:
        """The least advanced running resync, or None when no resync runs."""
        done = [
            pd.resync_done_percent if pd.resync_done_percent is not None else pd.percent_in_sync
            for c in self.connections
            for pd in c.peer_devices
            if pd.replication_state.resyncing
        ]
        return min(done) if done else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (enums as their DRBD spelling)."""
        return {
            "name": self.name,
            "node_id": self.node_id,
            "role": self.role.value,
            "suspended": self.suspended,
            "devices": [
                {
                    "volume": d.volume,
                    "minor": d.minor,
                    "disk_state": d.disk_state.value,
                    "quorum": d.quorum,
                }
                for d in self.devices
            ],
            "connections": [
                {
                    "peer": c.name,
                    "peer_node_id": c.peer_node_id,
                    "connection_state": c.connection_state.value,
                    "peer_role": c.peer_role.value,
                    "peer_devices": [
                        {
                            "volume": pd.volume,
                            "replication_state": pd.replication_state.value,
                            "peer_disk_state": pd.peer_disk_state.value,
                            "out_of_sync_kib": pd.out_of_sync_kib,
                            "resync_done_percent": pd.resync_done_percent,
                        }
                        for pd in c.peer_devices
                    ],
                }
                for c in self.connections
            ],
        }


def _get(obj: Mapping[str, Any], key: str, tp: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise DiskError("drbd", f"drbdsetup status --json: {where} has no {key!r}")
    value = obj[key]
    # bool is an int: refuse it where a number is expected.
    if not isinstance(value, tp) or (tp in (int, (int, float)) and isinstance(value, bool)):
        raise DiskError("drbd", f"drbdsetup status --json: {where}.{key} is {value!r}")
    return value


def _opt_num(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DiskError("drbd", f"drbdsetup status --json: {key} is {value!r}")
    return float(value)


def _parse_peer_device(pd: Mapping[str, Any], where: str) -> PeerDeviceStatus:
    return PeerDeviceStatus(
        volume=_get(pd, "volume", int, where),
        replication_state=_enum(
            ReplicationState, _get(pd, "replication-state", str, where), "replication state"
        ),
        peer_disk_state=_enum(DiskState, _get(pd, "peer-disk-state", str, where), "disk state"),
        peer_client=bool(pd.get("peer-client", False)),
        resync_suspended=str(pd.get("resync-suspended", "no")),
        out_of_sync_kib=int(pd.get("out-of-sync", 0)),
        percent_in_sync=float(_get(pd, "percent-in-sync", (int, float), where)),
        resync_done_percent=_opt_num(pd, "percent-resync-done"),
        eta_s=_opt_num(pd, "estimated-seconds-to-finish"),
    )


def _parse_resource(res: Any) -> ResourceStatus:
    if not isinstance(res, dict):
        raise DiskError("drbd", f"drbdsetup status --json: resource entry is {res!r}")
    name = _get(res, "name", str, "resource")
    where = f"resource {name}"
    devices = tuple(
        DeviceStatus(
            volume=_get(d, "volume", int, where + " device"),
            minor=_get(d, "minor", int, where + " device"),
            disk_state=_enum(DiskState, _get(d, "disk-state", str, where), "disk state"),
            client=bool(d.get("client", False)),
            quorum=bool(d.get("quorum", True)),
            size_kib=int(d["size"]) if isinstance(d.get("size"), int) else None,
        )
        for d in _get(res, "devices", list, where)
    )
    connections = []
    for c in _get(res, "connections", list, where):
        cwhere = f"{where} connection {c.get('name', '?')}"
        connections.append(
            ConnectionStatus(
                peer_node_id=_get(c, "peer-node-id", int, cwhere),
                name=_get(c, "name", str, cwhere),
                connection_state=_enum(
                    ConnectionState, _get(c, "connection-state", str, cwhere), "connection state"
                ),
                peer_role=_enum(Role, _get(c, "peer-role", str, cwhere), "role"),
                congested=bool(c.get("congested", False)),
                peer_devices=tuple(
                    _parse_peer_device(pd, cwhere + " peer device")
                    for pd in _get(c, "peer_devices", list, cwhere)
                ),
            )
        )
    return ResourceStatus(
        name=name,
        node_id=_get(res, "node-id", int, where),
        role=_enum(Role, _get(res, "role", str, where), "role"),
        suspended=bool(res.get("suspended", False)),
        devices=devices,
        connections=tuple(connections),
    )


def parse_status_json(text: str) -> list[ResourceStatus]:
    """Parse the output of ``drbdsetup status --json``.

    Raises:
        DiskError: not JSON, not the documented shape, or an unknown state.
    """
    try:
        data = json.loads(text)
    except ValueError as err:
        raise DiskError("drbd", f"drbdsetup status --json printed invalid JSON: {err}") from err
    if not isinstance(data, list):
        raise DiskError("drbd", "drbdsetup status --json did not print a list")
    return [_parse_resource(r) for r in data]


# ---- events2 ----------------------------------------------------------------------------


class EventAction(enum.Enum):
    EXISTS = "exists"
    CREATE = "create"
    CHANGE = "change"
    DESTROY = "destroy"
    CALL = "call"
    RESPONSE = "response"
    RENAME = "rename"
    #: ``- skipped N``: events were lost.
    SKIPPED = "-"


class EventObject(enum.Enum):
    RESOURCE = "resource"
    DEVICE = "device"
    CONNECTION = "connection"
    PEER_DEVICE = "peer-device"
    PATH = "path"
    HELPER = "helper"


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)?$")


@dataclass(frozen=True)
class DrbdEvent:
    """One ``events2`` line.

    ``obj`` is None for the two special lines: ``exists -`` (initial state done) and
    ``- skipped N`` (``props["skipped"]`` holds N).
    """

    action: EventAction
    obj: EventObject | None
    props: Mapping[str, str] = field(default_factory=dict)
    timestamp: str | None = None
    raw: str = ""

    @property
    def initial_state_done(self) -> bool:
        return self.action is EventAction.EXISTS and self.obj is None

    @property
    def resource(self) -> str | None:
        return self.props.get("name")

    @property
    def peer_node_id(self) -> int | None:
        v = self.props.get("peer-node-id")
        return int(v) if v is not None else None

    @property
    def conn_name(self) -> str | None:
        return self.props.get("conn-name")

    @property
    def volume(self) -> int | None:
        v = self.props.get("volume")
        return int(v) if v is not None else None


def parse_events2_line(line: str) -> DrbdEvent | None:
    """Parse one events2 line; None for a blank line.

    Raises:
        DiskError: the line is not in the events2 format.
    """
    text = line.strip()
    if not text:
        return None
    tokens = text.split()
    timestamp = None
    if _TIMESTAMP.match(tokens[0]):
        timestamp, tokens = tokens[0], tokens[1:]
    if not tokens:
        raise DiskError("drbd", f"events2: timestamp without event: {text!r}")
    head = tokens[0]
    if head == "-":
        # "- skipped N"
        if len(tokens) == 3 and tokens[1] == "skipped" and tokens[2].isdigit():
            return DrbdEvent(EventAction.SKIPPED, None, {"skipped": tokens[2]}, timestamp, text)
        raise DiskError("drbd", f"events2: unrecognised line {text!r}")
    try:
        action = EventAction(head)
    except ValueError:
        raise DiskError("drbd", f"events2: unknown action {head!r} in {text!r}") from None
    if len(tokens) < 2:
        raise DiskError("drbd", f"events2: no object in {text!r}")
    if tokens[1] == "-":
        if action is not EventAction.EXISTS or len(tokens) != 2:
            raise DiskError("drbd", f"events2: unrecognised line {text!r}")
        return DrbdEvent(EventAction.EXISTS, None, {}, timestamp, text)
    try:
        obj = EventObject(tokens[1])
    except ValueError:
        raise DiskError("drbd", f"events2: unknown object {tokens[1]!r} in {text!r}") from None
    props: dict[str, str] = {}
    for tok in tokens[2:]:
        key, sep, value = tok.partition(":")
        if not sep or not key:
            raise DiskError("drbd", f"events2: field {tok!r} is not key:value in {text!r}")
        props[key] = value
    if "name" not in props:
        raise DiskError("drbd", f"events2: event without resource name: {text!r}")
    return DrbdEvent(action, obj, props, timestamp, text)


def parse_events2(lines: Iterable[str]) -> Iterator[DrbdEvent]:
    """Parse events2 output line by line, skipping blank lines.

    Raises:
        DiskError: a line is not in the events2 format.
    """
    for line in lines:
        ev = parse_events2_line(line)
        if ev is not None:
            yield ev


class Events2Decoder:
    """Incremental decoder: feed it chunks of bytes as they arrive from the pipe."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[DrbdEvent]:
        """Return the events of every complete line so far.

        Raises:
            DiskError: a complete line is not in the events2 format.
        """
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return list(parse_events2(line.decode("utf-8", "replace") for line in lines))

    @property
    def pending(self) -> bytes:
        """Bytes of an incomplete last line."""
        return self._buf


# ---- notices: what the failover logic wants to know -------------------------------------


@dataclass(frozen=True)
class RoleChanged:
    """The role of this host (``peer`` None) or of a peer changed."""

    resource: str
    peer: str | None
    old: Role | None
    new: Role


@dataclass(frozen=True)
class ConnectionLost:
    """A connection left Connected (``new`` None: the connection was removed)."""

    resource: str
    peer: str
    peer_node_id: int
    new: ConnectionState | None


@dataclass(frozen=True)
class ConnectionEstablished:
    resource: str
    peer: str
    peer_node_id: int


@dataclass(frozen=True)
class SplitBrain:
    """The kernel detected a split brain with a peer.

    ``unresolved`` is True for the ``split-brain`` helper (no automatic recovery; with
    every ``after-sb-*`` policy ``disconnect`` that is every split brain) and False for
    ``initial-split-brain`` (detected, recovery policies not yet applied).
    """

    resource: str
    peer: str | None
    peer_node_id: int | None
    volume: int | None
    unresolved: bool


@dataclass(frozen=True)
class ResyncProgress:
    resource: str
    peer: str
    volume: int
    state: ReplicationState
    done_percent: float | None
    out_of_sync_kib: int | None
    eta_s: int | None


@dataclass(frozen=True)
class ResyncFinished:
    resource: str
    peer: str
    volume: int


@dataclass(frozen=True)
class DiskStateChanged:
    resource: str
    volume: int
    old: DiskState | None
    new: DiskState


@dataclass(frozen=True)
class QuorumChanged:
    resource: str
    volume: int
    quorum: bool


@dataclass(frozen=True)
class HelperEvent:
    """A user-mode helper (fence-peer, before-resync-target, ...) was called or returned.

    ``status`` is the raw value the kernel reports on the response (older kernels pass
    the wait status, where the exit code is ``status >> 8``; see :attr:`exit_code`).
    """

    resource: str
    helper: str
    peer: str | None
    volume: int | None
    response: bool
    status: int | None

    @property
    def exit_code(self) -> int | None:
        if self.status is None:
            return None
        return self.status >> 8 if self.status > 0xFF else self.status


@dataclass(frozen=True)
class EventsLost:
    """events2 reported lost events: re-read ``drbdsetup status`` to resynchronise."""

    count: int


Notice = (
    RoleChanged
    | ConnectionLost
    | ConnectionEstablished
    | SplitBrain
    | ResyncProgress
    | ResyncFinished
    | DiskStateChanged
    | QuorumChanged
    | HelperEvent
    | EventsLost
)

_SPLIT_BRAIN_HELPERS = {"split-brain": True, "initial-split-brain": False}


@dataclass
class _PeerView:
    name: str
    state: ConnectionState | None = None
    role: Role | None = None
    replication: dict[int, ReplicationState] = field(default_factory=dict)


class DrbdMonitor:
    """Folds events2 events into the current state and reports :data:`Notice` objects.

    The initial dump (``exists`` lines) only sets the state; changes after it produce
    notices. Only events of ``resource`` are considered when it is given.
    """

    def __init__(self, resource: str | None = None) -> None:
        self.resource = resource
        self.role: Role | None = None
        self.disks: dict[int, DiskState] = {}
        self.quorum: dict[int, bool] = {}
        self.peers: dict[int, _PeerView] = {}
        self.initial_state_done = False

    def _peer(self, ev: DrbdEvent) -> _PeerView:
        pid = ev.peer_node_id
        if pid is None:
            raise DiskError("drbd", f"events2: no peer-node-id in {ev.raw!r}")
        view = self.peers.get(pid)
        if view is None:
            view = self.peers[pid] = _PeerView(name=ev.conn_name or str(pid))
        return view

    def feed_all(self, events: Iterable[DrbdEvent]) -> list[Notice]:
        out: list[Notice] = []
        for ev in events:
            out.extend(self.feed(ev))
        return out

    def feed(self, ev: DrbdEvent) -> list[Notice]:
        """Apply one event; return what changed that the caller should know about.

        Raises:
            DiskError: the event holds an unknown state.
        """
        if ev.action is EventAction.SKIPPED:
            return [EventsLost(int(ev.props["skipped"]))]
        if ev.initial_state_done:
            self.initial_state_done = True
            return []
        if self.resource is not None and ev.resource != self.resource:
            return []
        res = ev.resource or "?"
        quiet = ev.action is EventAction.EXISTS
        out: list[Notice] = []
        if ev.obj is EventObject.HELPER:
            out.extend(self._helper(ev, res))
        elif ev.obj is EventObject.RESOURCE:
            if ev.action is EventAction.DESTROY:
                self.role = None
            elif "role" in ev.props:
                new = _enum(Role, ev.props["role"], "role")
                if new is not self.role and not quiet:
                    out.append(RoleChanged(res, None, self.role, new))
                self.role = new
        elif ev.obj is EventObject.DEVICE:
            out.extend(self._device(ev, res, quiet))
        elif ev.obj is EventObject.CONNECTION:
            out.extend(self._connection(ev, res, quiet))
        elif ev.obj is EventObject.PEER_DEVICE:
            out.extend(self._peer_device(ev, res, quiet))
        return out

    def _helper(self, ev: DrbdEvent, res: str) -> list[Notice]:
        helper = ev.props.get("helper", "")
        response = ev.action is EventAction.RESPONSE
        status = ev.props.get("status")
        peer = ev.conn_name
        if helper in _SPLIT_BRAIN_HELPERS and not response:
            return [SplitBrain(res, peer, ev.peer_node_id, ev.volume, _SPLIT_BRAIN_HELPERS[helper])]
        return [
            HelperEvent(
                res,
                helper,
                peer,
                ev.volume,
                response,
                int(status) if status is not None and status.isdigit() else None,
            )
        ]

    def _device(self, ev: DrbdEvent, res: str, quiet: bool) -> list[Notice]:
        vol = ev.volume if ev.volume is not None else 0
        out: list[Notice] = []
        if ev.action is EventAction.DESTROY:
            self.disks.pop(vol, None)
            self.quorum.pop(vol, None)
            return out
        if "disk" in ev.props:
            new = _enum(DiskState, ev.props["disk"], "disk state")
            old = self.disks.get(vol)
            if new is not old and not quiet:
                out.append(DiskStateChanged(res, vol, old, new))
            self.disks[vol] = new
        if "quorum" in ev.props:
            q = ev.props["quorum"] == "yes"
            if self.quorum.get(vol, q) != q and not quiet:
                out.append(QuorumChanged(res, vol, q))
            self.quorum[vol] = q
        return out

    def _connection(self, ev: DrbdEvent, res: str, quiet: bool) -> list[Notice]:
        view = self._peer(ev)
        pid = ev.peer_node_id if ev.peer_node_id is not None else -1
        out: list[Notice] = []
        if ev.action is EventAction.DESTROY:
            if view.state is ConnectionState.CONNECTED:
                out.append(ConnectionLost(res, view.name, pid, None))
            del self.peers[pid]
            return out
        if "connection" in ev.props:
            new = _enum(ConnectionState, ev.props["connection"], "connection state")
            old = view.state
            if not quiet and new is not old:
                if old is ConnectionState.CONNECTED:
                    out.append(ConnectionLost(res, view.name, pid, new))
                elif new is ConnectionState.CONNECTED:
                    out.append(ConnectionEstablished(res, view.name, pid))
            view.state = new
        if "role" in ev.props:
            new_role = _enum(Role, ev.props["role"], "role")
            if new_role is not view.role and not quiet:
                out.append(RoleChanged(res, view.name, view.role, new_role))
            view.role = new_role
        return out

    def _peer_device(self, ev: DrbdEvent, res: str, quiet: bool) -> list[Notice]:
        view = self._peer(ev)
        vol = ev.volume if ev.volume is not None else 0
        out: list[Notice] = []
        if ev.action is EventAction.DESTROY:
            view.replication.pop(vol, None)
            return out
        old = view.replication.get(vol)
        new = (
            _enum(ReplicationState, ev.props["replication"], "replication state")
            if "replication" in ev.props
            else old
        )
        if new is not None:
            view.replication[vol] = new
        if quiet or new is None:
            return out
        if new.resyncing:
            done = ev.props.get("done")
            oos = ev.props.get("out-of-sync")
            eta = ev.props.get("eta")
            out.append(
                ResyncProgress(
                    res,
                    view.name,
                    vol,
                    new,
                    float(done) if done is not None else None,
                    int(oos) if oos is not None and oos.isdigit() else None,
                    int(eta) if eta is not None and eta.isdigit() else None,
                )
            )
        elif old is not None and old.resyncing and new is ReplicationState.ESTABLISHED:
            out.append(ResyncFinished(res, view.name, vol))
        return out
