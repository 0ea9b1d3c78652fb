"""The disk backend of a config: :func:`open_backend`.

The only place that reads ``disk.backend``: everything else asks the backend's
:class:`~kemari_suite.disk.base.DiskCaps`.

=========  =============================================  ==============================
backend    data                                           caps
=========  =============================================  ==============================
builtin    ``disk.path``, this host's own image            streams_copy, tracks_dirty,
                                                          has_sidecar
drbd       ``disk.path`` = the DRBD device (``/dev/drbd/    replays_log
           by-res/RES/0`` or ``/dev/drbdN``)
shared     ``disk.path`` = the device both hosts see;      replays_log, reserved_bytes
           the lease (with a node id and ``tiebreaker =    (1 MiB when the lease lives
           "lease"``) at ``disk.lease_offset`` of           on the data device), lease
           ``disk.lease_device``; ``disk.fencing =
           "scsi-pr"``: SCSI-3 reservations on the LUN
=========  =============================================  ==============================
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from kemari_suite.config import KemariConfig
from kemari_suite.disk.base import DiskBackend, DiskRole, device_size
from kemari_suite.disk.builtin import BuiltinDisk
from kemari_suite.disk.drbd import DrbdBackend, DrbdTools
from kemari_suite.disk.drbdadm import detect_dialect
from kemari_suite.disk.shared import SharedDiskBackend, SharedDiskConfig
from kemari_suite.errors import ConfigError, DiskError
from kemari_suite.ha.lease import Lease

_BY_RES = re.compile(r"^/dev/drbd/by-res/([^/]+)(?:/\d+)?$")


def drbd_resource_name(cfg: KemariConfig) -> str:
    """The DRBD resource of the config: named in ``/dev/drbd/by-res/RES/0`` (the VM
    definition's default path), else the VM's name (the playbooks name it so)."""
    m = _BY_RES.match(cfg.disk.path)
    return m.group(1) if m else cfg.vm.name


def shared_disk_config(
    cfg: KemariConfig, *, fenced: bool, lease: Lease | None = None
) -> SharedDiskConfig:
    """The shared-storage layout and lease timing of the config.

    The lease lives on the data device (its first MiB reserved) when ``disk.lease_device``
    is empty or the data device itself. Its period is ``lease``'s, else the heartbeat
    timeout (as the lease tiebreaker's); ``io_timeout_s`` is a quarter of it.

    Raises:
        ConfigError: the values do not make a valid lease.
    """
    d = cfg.disk
    lease_s = lease.lease_s if lease is not None else cfg.replication.heartbeat_timeout_ms / 1000
    return SharedDiskConfig(
        device=d.path,
        resource=cfg.vm.name,
        lease_device="" if d.lease_device in ("", d.path) else d.lease_device,
        lease_offset=d.lease_offset,
        lease_s=lease_s,
        io_timeout_s=lease_s / 4,
        fenced=fenced,
        scsi_pr=d.fencing == "scsi-pr",
    )


def open_backend(
    cfg: KemariConfig,
    *,
    role: DiskRole = DiskRole.PRIMARY,
    node_id: str | None = None,
    lease: Lease | None = None,
    drbd_tools: DrbdTools | None = None,
) -> DiskBackend | None:
    """The configured disk backend on this host (not attached yet), or None when the VM
    has no disk (``disk.path`` empty).

    ``role`` is the role this host starts in: the built-in disk reports it after
    ``attach``. Whatever the role, the host that runs the guest calls ``attach()`` and
    then ``promote()`` before the first write (DRBD: ``drbdadm primary``; shared: take
    the lease); a standby calls ``attach()`` only, and ``promote()`` at failover.

    Shared storage is fenced by its lease when ``lease`` is given (pass the lease
    tiebreaker's, so both renew one object) or when ``node_id`` is given and
    ``replication.tiebreaker = "lease"`` (then use ``backend.tiebreaker()`` as the
    engine's tiebreaker); otherwise it is written unfenced and the engine's tiebreaker
    alone keeps two hosts apart. With ``disk.fencing = "scsi-pr"`` it is also fenced by
    SCSI-3 persistent reservations, with a key derived from the node id (else the host
    name). ``drbd_tools`` replaces the drbd-utils runner (dry runs).

    Raises:
        ConfigError: the image or shared device is missing, a shared disk without a node
            id for its lease, or lease values that do not fit.
    """
    d = cfg.disk
    if not d.path:
        return None
    if d.backend == "drbd":
        # The device appears with `drbdadm up`: attach brings it up.
        return DrbdBackend.for_resource(
            drbd_resource_name(cfg), d.path, tools=drbd_tools, dialect=_dialect(drbd_tools)
        )
    if not Path(d.path).exists():
        raise ConfigError(f"{d.path} does not exist", key="disk.path")
    if d.backend == "shared":
        fenced = lease is not None or (
            node_id is not None and cfg.replication.tiebreaker == "lease"
        )
        if fenced and not node_id:
            raise ConfigError("a fenced shared disk needs this host's node id", key="disk")
        node = node_id or (socket.gethostname() if d.fencing == "scsi-pr" else "-")
        return SharedDiskBackend(
            shared_disk_config(cfg, fenced=fenced, lease=lease), node, lease=lease
        )
    return BuiltinDisk(d.path, role=role)


def guest_disk_size(cfg: KemariConfig) -> int:
    """Size in bytes of the guest disk this host would serve: 0 without a disk, -1 when
    the image or device is missing; a shared device's reserved head is not counted."""
    if not cfg.disk.path:
        return 0
    size = device_size(cfg.disk.path)
    if size is None:
        return -1
    backend = open_backend(cfg, role=DiskRole.SECONDARY)
    return size - (backend.caps.reserved_bytes if backend is not None else 0)


def _dialect(tools: DrbdTools | None) -> str:
    """The loaded DRBD module's dialect ("9" or "8.4"); "9", the renderer's default,
    where no module answers (a dry run, a machine without the module: every status call
    then fails with drbd-utils' own error)."""
    try:
        return detect_dialect(tools)
    except DiskError:
        return "9"


__all__ = [
    "drbd_resource_name",
    "guest_disk_size",
    "open_backend",
    "shared_disk_config",
]
