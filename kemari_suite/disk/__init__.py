"""Disk consistency backends: one interface, the built-in replicated disk, DRBD, shared
storage with a lease.

The engine calls :func:`open_backend` and then only the
:class:`~kemari_suite.disk.base.DiskBackend` contract, asking the backend's
:class:`~kemari_suite.disk.base.DiskCaps` what it needs; no module outside this package
names a backend. See ``kemari_suite/disk/README.md`` for the layouts, the DRBD handler
contract, what was checked on this machine and how to run the tests that need a DRBD
kernel module.
"""

from kemari_suite.disk.base import (
    CopyState,
    DiskBackend,
    DiskCaps,
    DiskRole,
    DiskStatus,
    Extent,
    FileDisk,
)
from kemari_suite.disk.builtin import BuiltinDisk
from kemari_suite.disk.drbd import (
    CommandResult,
    DrbdBackend,
    DrbdConfig,
    DrbdNode,
    DrbdResource,
    DrbdTools,
    QuorumOptions,
    check_with_drbdadm,
    drbd_config_from_dict,
    render_resource,
)
from kemari_suite.disk.drbdstate import (
    DrbdEvent,
    DrbdMonitor,
    Events2Decoder,
    ResourceStatus,
    parse_events2,
    parse_status_json,
)
from kemari_suite.disk.factory import guest_disk_size, open_backend
from kemari_suite.disk.shared import (
    SHARED_RESERVED_BYTES,
    SharedDiskBackend,
    SharedDiskConfig,
    create_shared_image,
    format_shared,
)
from kemari_suite.ha.lease import Lease, LeaseAttempt, LeaseRecord, LeaseTiebreaker

__all__ = [
    "SHARED_RESERVED_BYTES",
    "BuiltinDisk",
    "CommandResult",
    "CopyState",
    "DiskBackend",
    "DiskCaps",
    "DiskRole",
    "DiskStatus",
    "DrbdBackend",
    "DrbdConfig",
    "DrbdEvent",
    "DrbdMonitor",
    "DrbdNode",
    "DrbdResource",
    "DrbdTools",
    "Events2Decoder",
    "Extent",
    "FileDisk",
    "Lease",
    "LeaseAttempt",
    "LeaseRecord",
    "LeaseTiebreaker",
    "QuorumOptions",
    "ResourceStatus",
    "SharedDiskBackend",
    "SharedDiskConfig",
    "check_with_drbdadm",
    "create_shared_image",
    "drbd_config_from_dict",
    "format_shared",
    "guest_disk_size",
    "open_backend",
    "parse_events2",
    "parse_status_json",
    "render_resource",
]
