"""DRBD 9, protocol C, as a disk backend: the guest's committed writes go to /dev/drbdN.

Three layers, one module each:

* :mod:`kemari_suite.disk.drbdconf`: :class:`DrbdConfig` and :func:`render_resource`
  (the resource file, with safe defaults: protocol C, fencing with the suite's
  fence-peer handler, split brain always ``disconnect``, ``auto-promote no``).
* :mod:`kemari_suite.disk.drbdadm`: :class:`DrbdTools` (every drbd-utils call through
  ``sh``, failures as :class:`~kemari_suite.errors.DrbdError`, dry-run recording),
  :class:`DrbdAdm` (operations on a resource whose file exists) and
  :class:`DrbdResource` (one whose file this host renders).
* this module: :class:`DrbdBackend`, the :class:`~kemari_suite.disk.base.DiskBackend`:
  attach = (write the resource file and) ``drbdadm adjust`` (which is ``up`` for a
  resource that is down, and idempotent otherwise), promote = ``drbdadm primary`` then
  open the device, demote = flush, close, ``drbdadm secondary``, apply = pwrite to
  ``/dev/drbdN``, status = the parsed ``drbdsetup status --json``.

DRBD replicates the data itself: the backend declares ``replays_log`` (the standby keeps
the committed I/O logs and replays them after ``promote`` at failover: with protocol C
every write the primary applied is on both disks, the logs cover the acknowledged epochs
it had not applied yet) and none of the built-in disk's copy capabilities.

The names of the three modules are re-exported here, so ``from kemari_suite.disk.drbd
import DrbdConfig, DrbdTools, ...`` keeps working.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from kemari_suite.disk.base import (
    DiskCaps,
    DiskRole,
    DiskStatus,
    FileDisk,
    PlainCapabilities,
    device_size,
)
from kemari_suite.disk.drbdadm import (
    CommandResult,
    DrbdAdm,
    DrbdResource,
    DrbdTools,
    check_with_drbdadm,
)
from kemari_suite.disk.drbdconf import (
    DEFAULT_CONFIG_DIR,
    MAX_MINOR,
    MAX_NODE_ID,
    DrbdConfig,
    DrbdNode,
    QuorumOptions,
    drbd_config_from_dict,
    render_resource,
    validate,
)
from kemari_suite.disk.drbdstatus import Role
from kemari_suite.errors import DiskError


class DrbdBackend(PlainCapabilities):
    """The DRBD :class:`~kemari_suite.disk.base.DiskBackend`.

    Built from a :class:`DrbdConfig` (``attach`` writes the resource file first), or with
    :meth:`for_resource` for a resource whose file exists already (the playbooks write
    ``/etc/drbd.d/RES.res``). ``device_path`` replaces ``/dev/drbdN`` (tests, dry runs,
    ``/dev/drbd/by-res/RES/0``).
    """

    name = "drbd"
    caps = DiskCaps(replays_log=True)

    def __init__(
        self,
        config: DrbdConfig | DrbdAdm,
        node: str = "",
        *,
        config_path: str | os.PathLike[str] | None = None,
        tools: DrbdTools | None = None,
        device_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """``config``: the resource to render (``node`` is this host in it), or the
        operations on an existing one (then ``device_path`` is required).

        Raises:
            ConfigError: ``node`` is not a node of ``config``.
            DiskError: an existing resource without ``device_path``.
        """
        if isinstance(config, DrbdAdm):
            if device_path is None:
                raise DiskError(self.name, f"{config.name}: the device path is required")
            self.resource = config
            self.device_path = Path(device_path)
        else:
            self.resource = DrbdResource(config, node, config_path=config_path, tools=tools)
            self.device_path = Path(device_path if device_path is not None else config.device)
        self.tracking = False
        self._disk: FileDisk | None = None
        self._size = 0

    @classmethod
    def for_resource(
        cls,
        resource: str,
        device_path: str | os.PathLike[str],
        *,
        config_path: str | os.PathLike[str] | None = None,
        tools: DrbdTools | None = None,
        dialect: str = "9",
    ) -> DrbdBackend:
        """The backend of an existing resource file (nothing is rendered or written);
        ``dialect`` is the loaded module's, "9" or "8.4" (:func:`detect_dialect`)."""
        adm = DrbdAdm(resource, config_path=config_path, tools=tools, dialect=dialect)
        return cls(adm, device_path=device_path)

    @property
    def size(self) -> int:
        return self._disk.size if self._disk is not None else self._size

    def attach(self) -> None:
        """(Write the resource file and) ``drbdadm adjust`` (``up`` when down).

        Raises:
            DrbdError: drbdadm failed.
            DiskError: the resource file cannot be written.
        """
        if isinstance(self.resource, DrbdResource):
            self.resource.write_config()
        self.resource.adjust()
        self._size = _device_size(self.device_path)

    def promote(self) -> None:
        """``drbdadm primary`` (never forced), then open the device for writing.

        Raises:
            DrbdError: DRBD refused (the peer is Primary, no up-to-date data, no quorum).
            DiskError: the device cannot be opened.
        """
        self.resource.primary()
        if self._disk is None:
            disk = FileDisk(self.device_path)
            disk.attach()
            disk.promote()
            self._disk = disk

    def demote(self) -> None:
        """Flush and close the device, then ``drbdadm secondary``.

        Raises:
            DrbdError: DRBD refused (the device is still open elsewhere).
        """
        if self._disk is not None:
            disk, self._disk = self._disk, None
            try:
                disk.flush()
            finally:
                disk.close()
        self.resource.secondary()

    def _writer(self) -> FileDisk:
        if self._disk is None:
            raise DiskError(self.name, f"{self.resource.name}: not primary on this host")
        return self._disk

    def read(self, offset: int, length: int) -> bytes:
        """Read from the DRBD device (open once primary here).

        Raises:
            DiskError: not primary here, or the read failed.
        """
        return self._writer().read(offset, length)

    def apply(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """pwrite to the DRBD device; with protocol C a write completes once both disks have it.

        Raises:
            DiskError: not primary here, or the write failed.
        """
        self._writer().apply(writes)

    def flush(self) -> None:
        self._writer().flush()

    def status(self) -> DiskStatus:
        """Parsed ``drbdsetup status --json``.

        Raises:
            DrbdError: drbdsetup failed (not for a resource that is simply down).
        """
        st = self.resource.status()
        if st is None:
            return DiskStatus(
                self.name,
                DiskRole.UNKNOWN,
                connected=False,
                up_to_date=False,
                resync_percent=None,
                detail={"resource": self.resource.name, "state": "down"},
            )
        role = {
            Role.PRIMARY: DiskRole.PRIMARY,
            Role.SECONDARY: DiskRole.SECONDARY,
            Role.UNKNOWN: DiskRole.UNKNOWN,
        }[st.role]
        return DiskStatus(
            self.name,
            role,
            connected=st.connected,
            up_to_date=st.up_to_date,
            resync_percent=st.resync_percent,
            detail={**st.to_dict(), "peers_up_to_date": st.peers_up_to_date},
        )

    def close(self) -> None:
        """Close the device (the resource stays up: ``resource.down()`` takes it down)."""
        if self._disk is not None:
            disk, self._disk = self._disk, None
            disk.close()


def _device_size(path: Path) -> int:
    """Size of the device (a DRBD 8.4 Secondary, which refuses to open, from sysfs), 0
    where none can be read (a dry run without the device): known at the latest once
    promoted."""
    return device_size(path) or 0


__all__ = [
    "DEFAULT_CONFIG_DIR",
    "MAX_MINOR",
    "MAX_NODE_ID",
    "CommandResult",
    "DrbdAdm",
    "DrbdBackend",
    "DrbdConfig",
    "DrbdNode",
    "DrbdResource",
    "DrbdTools",
    "QuorumOptions",
    "check_with_drbdadm",
    "drbd_config_from_dict",
    "render_resource",
    "validate",
]
