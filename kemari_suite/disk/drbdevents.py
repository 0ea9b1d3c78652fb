"""DRBD 9 ``drbdsetup events2`` parsing, and :class:`DrbdMonitor`.

The parser follows drbd-utils 9.22 (``user/v9/drbdsetup_events2.c``).
``drbdsetup events2 [--now] [--statistics] [--timestamps] RES`` prints one event a line::

    [TIMESTAMP ]ACTION OBJECT key:value key:value ...
    ACTION = exists | create | change | destroy | call | response | rename
    OBJECT = resource | device | connection | peer-device | path | helper
    exists -            end of the initial state (the only line of --now after the dump)
    - skipped N         N netlink events were lost: re-read the status

A value never contains a space; it may contain colons (``local:ipv4:10.0.0.1:7789``), so
a field splits at its first colon. States are the enums of
:mod:`kemari_suite.disk.drbdstatus`; an unknown one raises
:class:`~kemari_suite.errors.DiskError`.

:class:`DrbdMonitor` turns events into the notices the failover logic needs:
disconnects, role changes, split brain (the kernel runs the ``initial-split-brain`` and,
when unresolved, the ``split-brain`` helper, which events2 shows as ``call helper ...
helper:split-brain``), resync progress and the end of a resync. DRBD 8.4.11 through
drbdsetup-84 prints the same helper lines (recorded in the kernel lab: both sides, with
every peer ``peer-node-id:0 conn-name:peer``), so the same notices come from 8.4.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from kemari_suite.disk.drbdstatus import (
    ConnectionState,
    DiskState,
    ReplicationState,
    Role,
    state_enum,
)
from kemari_suite.errors import DiskError

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
                new = state_enum(Role, ev.props["role"], "role")
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
            new = state_enum(DiskState, ev.props["disk"], "disk state")
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
            new = state_enum(ConnectionState, ev.props["connection"], "connection state")
            old = view.state
            if not quiet and new is not old:
                if old is ConnectionState.CONNECTED:
                    out.append(ConnectionLost(res, view.name, pid, new))
                elif new is ConnectionState.CONNECTED:
                    out.append(ConnectionEstablished(res, view.name, pid))
            view.state = new
        if "role" in ev.props:
            new_role = state_enum(Role, ev.props["role"], "role")
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
            state_enum(ReplicationState, ev.props["replication"], "replication state")
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


__all__ = [
    "ConnectionEstablished",
    "ConnectionLost",
    "DiskStateChanged",
    "DrbdEvent",
    "DrbdMonitor",
    "EventAction",
    "EventObject",
    "Events2Decoder",
    "EventsLost",
    "HelperEvent",
    "Notice",
    "QuorumChanged",
    "ResyncFinished",
    "ResyncProgress",
    "RoleChanged",
    "SplitBrain",
    "parse_events2",
    "parse_events2_line",
]
