"""DRBD 9 state model and the ``drbdsetup status --json`` parser.

The parser follows drbd-utils 9.22 (``user/v9/drbdsetup.c``).
``drbdsetup status --json RES`` prints a JSON list of resources::

    [{"name", "node-id", "role", "suspended", ..., "devices": [{"volume", "minor",
      "disk-state", "client", "quorum", "size" (KiB), ...}],
      "connections": [{"peer-node-id", "name", "connection-state", "peer-role",
        "peer_devices": [{"volume", "replication-state", "peer-disk-state",
          "out-of-sync" (KiB), "percent-in-sync", "percent-resync-done"?, ...}]}]}]

States are parsed into enums; a value this module does not know (a newer DRBD) raises
:class:`~kemari_suite.errors.DiskError` rather than being guessed at. The events2 parser
and the monitor live in :mod:`kemari_suite.disk.drbdevents`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
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


def state_enum(cls: type[E], value: Any, what: str) -> E:
    """``cls(value)``, the state enum member DRBD spells ``value``.

    Raises:
        DiskError: DRBD printed a state this module does not know.
    """
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
        replication_state=state_enum(
            ReplicationState, _get(pd, "replication-state", str, where), "replication state"
        ),
        peer_disk_state=state_enum(
            DiskState, _get(pd, "peer-disk-state", str, where), "disk state"
        ),
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
            disk_state=state_enum(DiskState, _get(d, "disk-state", str, where), "disk state"),
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
                connection_state=state_enum(
                    ConnectionState, _get(c, "connection-state", str, cwhere), "connection state"
                ),
                peer_role=state_enum(Role, _get(c, "peer-role", str, cwhere), "role"),
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
        role=state_enum(Role, _get(res, "role", str, where), "role"),
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


__all__ = [
    "ConnectionState",
    "ConnectionStatus",
    "DeviceStatus",
    "DiskState",
    "PeerDeviceStatus",
    "ReplicationState",
    "ResourceStatus",
    "Role",
    "parse_status_json",
    "state_enum",
]
