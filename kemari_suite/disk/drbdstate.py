"""DRBD 9 state as drbd-utils prints it: ``drbdsetup status --json`` and ``events2``.

Kept for its import path; the code lives in two modules:

* :mod:`kemari_suite.disk.drbdstatus`: the state enums, the status model
  (:class:`ResourceStatus` ...) and :func:`parse_status_json`;
* :mod:`kemari_suite.disk.drbdevents`: the events2 parser (:func:`parse_events2`,
  :class:`Events2Decoder`), the notices and :class:`DrbdMonitor`.
"""

from __future__ import annotations

from kemari_suite.disk.drbdevents import (
    ConnectionEstablished,
    ConnectionLost,
    DiskStateChanged,
    DrbdEvent,
    DrbdMonitor,
    EventAction,
    EventObject,
    Events2Decoder,
    EventsLost,
    HelperEvent,
    Notice,
    QuorumChanged,
    ResyncFinished,
    ResyncProgress,
    RoleChanged,
    SplitBrain,
    parse_events2,
    parse_events2_line,
)
from kemari_suite.disk.drbdstatus import (
    ConnectionState,
    ConnectionStatus,
    DeviceStatus,
    DiskState,
    PeerDeviceStatus,
    ReplicationState,
    ResourceStatus,
    Role,
    parse_status_json,
)

__all__ = [
    "ConnectionEstablished",
    "ConnectionLost",
    "ConnectionState",
    "ConnectionStatus",
    "DeviceStatus",
    "DiskState",
    "DiskStateChanged",
    "DrbdEvent",
    "DrbdMonitor",
    "EventAction",
    "EventObject",
    "Events2Decoder",
    "EventsLost",
    "HelperEvent",
    "Notice",
    "PeerDeviceStatus",
    "QuorumChanged",
    "ReplicationState",
    "ResourceStatus",
    "ResyncFinished",
    "ResyncProgress",
    "Role",
    "RoleChanged",
    "SplitBrain",
    "parse_events2",
    "parse_events2_line",
    "parse_status_json",
]
