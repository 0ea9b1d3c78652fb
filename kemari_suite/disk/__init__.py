"""Disk consistency backends: one interface, DRBD, shared storage with a lease.

See ``kemari_suite/disk/README.md`` for the layouts, the DRBD handler contract, what
was checked on this machine and how to run the tests that need a DRBD kernel module.
"""

from kemari_suite.disk.base import DiskBackend, DiskRole, DiskStatus, FileDisk
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
    "CommandResult",
    "DiskBackend",
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
    "parse_events2",
    "parse_status_json",
    "render_resource",
]
