"""DRBD 8.4 as drbd-utils 9.22 shows it: which dialect the loaded module speaks, and the
resource status read from 8.4's ``events2``.

Debian's stock kernels carry DRBD 8.4.11. drbd-utils 9.22 drives it through
``drbdadm-84`` and ``drbdsetup-84`` (``user/v84/drbdsetup.c``), which have no ``status
--json`` and no ``events2 --color`` (both exit 20). Their ``drbdsetup events2 RES --now
--statistics`` prints the initial state in the DRBD 9 line format that
:func:`~kemari_suite.disk.drbdevents.parse_events2` reads::

    exists resource name:R role:Secondary suspended:no write-ordering:flush
    exists device name:R volume:0 minor:0 disk:Inconsistent size:65496 read:0 written:0
        al-writes:0 bm-writes:0 upper-pending:0 lower-pending:0 al-suspended:no blocked:no
    exists connection name:R peer-node-id:0 conn-name:peer connection:Connecting
        role:Unknown congested:no
    exists peer-device name:R peer-node-id:0 conn-name:peer volume:0 minor:0
        replication:Off peer-disk:DUnknown resync-suspended:no received:0 sent:0
        out-of-sync:65496 pending:0 unacked:0
    exists -

(one line each; ``--statistics`` also turns on 8.4's verbose statistics, hence ``size``).
What differs from DRBD 9, and how :func:`status_from_events` fills
:class:`~kemari_suite.disk.drbdstatus.ResourceStatus`:

* 8.4 has no node ids and a single peer. drbdsetup-84 prints ``peer-node-id:0`` and
  ``conn-name:peer`` for every connection, whatever the peer. :class:`Pair84` supplies
  the ids and the peer's name instead (from the resource's config when known, else 0 for
  this host, 1 for the peer, and the printed ``peer``).
* The kernel keeps the connection at ``Connected`` (8.4's WFReportParams) at most; the
  per-volume state (``Established``, ``SyncSource``...) is the peer device's
  ``replication``, and ``Off`` while not connected.
* No quorum and no diskless clients: ``quorum`` is True (quorum never blocks I/O in 8.4),
  ``client`` and ``peer_client`` False.
* No ``percent-in-sync``, ``done`` or ``eta`` in the events: ``percent_in_sync`` (and,
  while a resync runs, ``resync_done_percent``) is ``100 * (1 - out-of-sync / size)``,
  the formula DRBD 9's drbdsetup uses, 0 for an unknown or zero size; ``eta_s`` is None.

:func:`parse_module_version` reads the module's version from ``/proc/drbd`` or from
``drbdadm --version``; :func:`dialect_of` maps it to a dialect of
:func:`~kemari_suite.disk.drbdconf.render_resource`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kemari_suite.disk.drbdevents import DrbdEvent, EventAction, EventObject
from kemari_suite.disk.drbdstatus import (
    ConnectionState,
    ConnectionStatus,
    DeviceStatus,
    DiskState,
    PeerDeviceStatus,
    ReplicationState,
    ResourceStatus,
    Role,
    state_enum,
)
from kemari_suite.errors import DiskError

# ---- which dialect the loaded module speaks ----------------------------------------------

#: /proc/drbd's first line: "version: 8.4.11 (api:1/proto:86-101)".
_PROC_VERSION = re.compile(r"^version:\s*(\d+\.\d+\.\d+)\b")
#: drbdadm --version (drbd-utils 9): "DRBD_KERNEL_VERSION=9.2.12", "0" without a module.
_ADM_VERSION = re.compile(r"^DRBD_KERNEL_VERSION=(\S+)$", re.M)
#: drbdadm --version: "DRBD_KERNEL_VERSION_CODE=0x08040b", the only version line when
#: drbdadm hands over to drbdadm-84 (an 8.4 module is loaded); 0x000000 without a module.
_ADM_CODE = re.compile(r"^DRBD_KERNEL_VERSION_CODE=0x([0-9a-fA-F]+)$", re.M)


def _read(text: str) -> str:
    return repr(text[:200])


def parse_module_version(text: str) -> str:
    """The loaded DRBD module's version ("8.4.11") in ``/proc/drbd`` or in the output of
    ``drbdadm --version``.

    Raises:
        DiskError: no version in ``text``, or the one there says no module is loaded
            (the message quotes what was read).
    """
    first = text.lstrip().partition("\n")[0]
    m = _PROC_VERSION.match(first)
    if m is not None:
        return m.group(1)
    adm = _ADM_VERSION.search(text)
    if adm is not None and re.fullmatch(r"\d+\.\d+\.\d+", adm.group(1)):
        return adm.group(1)
    code = _ADM_CODE.search(text)
    if code is not None and int(code.group(1), 16) != 0:
        n = int(code.group(1), 16)
        return f"{n >> 16}.{n >> 8 & 0xFF}.{n & 0xFF}"
    if adm is not None or code is not None:
        raise DiskError("drbd", f"no DRBD kernel module loaded: read {_read(text)}")
    raise DiskError("drbd", f"no DRBD module version in {_read(text)}")


def dialect_of(version: str) -> str:
    """The dialect ("9" or "8.4") of a module of version ``version`` ("9.2.12", "8.4.11").

    Raises:
        DiskError: a version neither dialect covers (8.3, a future 10).
    """
    major, _, rest = version.partition(".")
    if major == "9":
        return "9"
    if major == "8" and rest.partition(".")[0] == "4":
        return "8.4"
    raise DiskError("drbd", f"DRBD module version {version!r} is neither 9 nor 8.4")


# ---- status from 8.4's events2 --now -----------------------------------------------------


@dataclass(frozen=True)
class Pair84:
    """What DRBD 8.4 does not know and its events cannot tell: the node id of this host,
    that of its one peer, and the peer's name (None: the ``conn-name`` drbdsetup-84
    prints, always ``peer``)."""

    node_id: int = 0
    peer_node_id: int = 1
    peer_name: str | None = None


#: The resync states in which DRBD 9's drbdsetup derives ``percent-resync-done`` from the
#: out-of-sync count (online verify is not a resync).
_RESYNC_DONE_STATES = frozenset(
    {
        ReplicationState.SYNC_SOURCE,
        ReplicationState.SYNC_TARGET,
        ReplicationState.PAUSED_SYNC_S,
        ReplicationState.PAUSED_SYNC_T,
    }
)

_STATE_ACTIONS = frozenset(
    {EventAction.EXISTS, EventAction.CREATE, EventAction.CHANGE, EventAction.DESTROY}
)

_Key = tuple[EventObject, int | None]


def _need(props: Mapping[str, str], key: str, where: str) -> str:
    if key not in props:
        raise DiskError("drbd", f"8.4 events2: {where} has no {key!r}")
    return props[key]


def _int(props: Mapping[str, str], key: str, where: str) -> int:
    value = _need(props, key, where)
    if not value.isdigit():
        raise DiskError("drbd", f"8.4 events2: {where} {key} is {value!r}")
    return int(value)


def _opt_int(props: Mapping[str, str], key: str, where: str) -> int | None:
    return _int(props, key, where) if key in props else None


def _in_sync_percent(out_of_sync_kib: int, size_kib: int | None) -> float:
    # DRBD 9's drbdsetup: a volume of size 0 is 0 % in sync.
    if not size_kib:
        return 0.0
    return round(100.0 * (1.0 - out_of_sync_kib / size_kib), 2)


def _fold(events: Iterable[DrbdEvent], resource: str) -> dict[_Key, dict[str, str]]:
    """The latest properties of each object of ``resource``: ``exists``/``create`` lines
    set them, ``change`` lines (only what changed) update them, ``destroy`` removes."""
    objects: dict[_Key, dict[str, str]] = {}
    for ev in events:
        if ev.obj is None or ev.action not in _STATE_ACTIONS or ev.resource != resource:
            continue
        if ev.obj not in (EventObject.DEVICE, EventObject.PEER_DEVICE):
            key: _Key = (ev.obj, None)
        else:
            key = (ev.obj, _int(ev.props, "volume", f"{ev.obj.value} of {resource}"))
        if ev.action is EventAction.DESTROY:
            objects.pop(key, None)
        else:
            objects.setdefault(key, {}).update(ev.props)
    return objects


def _volumes(
    objects: Mapping[_Key, dict[str, str]], obj: EventObject
) -> list[tuple[int, dict[str, str]]]:
    found = [(v, props) for (o, v), props in objects.items() if o is obj and v is not None]
    return sorted(found, key=lambda vp: vp[0])


def _peer_device(
    props: Mapping[str, str], volume: int, size_kib: int | None, where: str
) -> PeerDeviceStatus:
    state = state_enum(ReplicationState, _need(props, "replication", where), "replication state")
    out_of_sync = _opt_int(props, "out-of-sync", where) or 0
    in_sync = _in_sync_percent(out_of_sync, size_kib)
    return PeerDeviceStatus(
        volume=volume,
        replication_state=state,
        peer_disk_state=state_enum(DiskState, _need(props, "peer-disk", where), "disk state"),
        peer_client=False,
        resync_suspended=props.get("resync-suspended", "no"),
        out_of_sync_kib=out_of_sync,
        percent_in_sync=in_sync,
        resync_done_percent=in_sync if state in _RESYNC_DONE_STATES else None,
        eta_s=None,
    )


def status_from_events(
    events: Iterable[DrbdEvent], resource: str, pair: Pair84 | None = None
) -> ResourceStatus | None:
    """The status of ``resource`` from 8.4's ``drbdsetup events2 RES --now --statistics``
    (parsed lines; later ``change`` lines are applied too). None when the events hold no
    such resource (it is not up).

    Raises:
        DiskError: an object lacks a state, a number is not one, or a state is unknown.
    """
    pair = pair if pair is not None else Pair84()
    objects = _fold(events, resource)
    res = objects.get((EventObject.RESOURCE, None))
    if res is None:
        return None
    where = f"resource {resource}"
    sizes: dict[int, int | None] = {}
    devices = []
    for volume, props in _volumes(objects, EventObject.DEVICE):
        dwhere = f"{where} device {volume}"
        sizes[volume] = _opt_int(props, "size", dwhere)
        devices.append(
            DeviceStatus(
                volume=volume,
                minor=_int(props, "minor", dwhere),
                disk_state=state_enum(DiskState, _need(props, "disk", dwhere), "disk state"),
                client=False,
                quorum=True,
                size_kib=sizes[volume],
            )
        )
    connections = []
    conn = objects.get((EventObject.CONNECTION, None))
    if conn is not None:
        cwhere = f"{where} connection"
        peer_devices = tuple(
            _peer_device(props, volume, sizes.get(volume), f"{cwhere} volume {volume}")
            for volume, props in _volumes(objects, EventObject.PEER_DEVICE)
        )
        connections.append(
            ConnectionStatus(
                peer_node_id=pair.peer_node_id,
                name=pair.peer_name or conn.get("conn-name", "peer"),
                connection_state=state_enum(
                    ConnectionState, _need(conn, "connection", cwhere), "connection state"
                ),
                peer_role=state_enum(Role, _need(conn, "role", cwhere), "role"),
                congested=conn.get("congested") == "yes",
                peer_devices=peer_devices,
            )
        )
    return ResourceStatus(
        name=resource,
        node_id=pair.node_id,
        role=state_enum(Role, _need(res, "role", where), "role"),
        # "no", or which of user, no-data, fencing suspended I/O.
        suspended=res.get("suspended", "no") != "no",
        devices=tuple(devices),
        connections=tuple(connections),
    )


__all__ = [
    "Pair84",
    "dialect_of",
    "parse_module_version",
    "status_from_events",
]
