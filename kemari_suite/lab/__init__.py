"""The local host-pair lab: two hosts and a LAN as network namespaces on one machine.

See :mod:`kemari_suite.lab.addressing` for the topology, names and address plan,
:mod:`kemari_suite.lab.lab` for bringing a lab up and down,
:mod:`kemari_suite.lab.links` for its live links (status, partitions),
:mod:`kemari_suite.lab.profiles` for the replication-link profiles,
:mod:`kemari_suite.lab.registry` for where labs are recorded, and
:mod:`kemari_suite.lab.configs` for the agents' configs of a VM protected in a lab.
"""

from kemari_suite.lab.addressing import (
    HOST_ROLES,
    HostRole,
    LabLayout,
    Role,
    layout,
    subnet_index,
    validate_lab_id,
    worker_lab_id,
)
from kemari_suite.lab.lab import (
    DownReport,
    down,
    fresh,
    list_labs,
    netns_exec_argv,
    state_file,
    up,
)
from kemari_suite.lab.links import (
    LabStatus,
    LinkKind,
    LinkState,
    heal,
    partition,
    set_link_up,
    status,
    wait_tap_forwarding,
)
from kemari_suite.lab.profiles import PROFILES, LinkProfile, get_profile, profile_for_rate

__all__ = [
    "HOST_ROLES",
    "PROFILES",
    "DownReport",
    "HostRole",
    "LabLayout",
    "LabStatus",
    "LinkKind",
    "LinkProfile",
    "LinkState",
    "Role",
    "down",
    "fresh",
    "get_profile",
    "heal",
    "layout",
    "list_labs",
    "netns_exec_argv",
    "partition",
    "profile_for_rate",
    "set_link_up",
    "state_file",
    "status",
    "subnet_index",
    "up",
    "validate_lab_id",
    "wait_tap_forwarding",
    "worker_lab_id",
]
