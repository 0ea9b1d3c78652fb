"""Shared storage: one block device (FC LUN, iSCSI, or any file both hosts open).

Without a kernel at hand (tests, the namespace lab) the device is a shared file fenced by
the lease below: the stand-in for an FC LUN. On a real LUN, ``scsi_pr`` adds SCSI-3
persistent reservations (:mod:`kemari_suite.disk.scsipr`, ``disk.fencing = "scsi-pr"``):
``promote`` registers this host's key and reserves the LUN ("write exclusive,
registrants only"), or, at failover, preempts-and-aborts the old writer's key, after
which the target itself refuses the old writer's writes. The kernel lab runs this on an
iSCSI LUN served by LIO (``klab/iscsi.py``).

Committed writes go straight to the shared device; there is one copy, so nothing needs
resynchronising after a failover. What must be prevented is two hosts writing at once:
a :class:`~kemari_suite.ha.lease.Lease` on the same storage fences them. The writer
holds the lease, renews it, and refuses to write the moment its own conservative view
of the lease runs out; a standby takes the lease over only after it watched the holder's
renew counter stand still for the whole lease period.

Device layout when the lease lives on the data device (``lease_device`` empty)::

    0          4 KiB            1 MiB                                  end
    | lease block | reserved      | guest disk (data_offset = 1 MiB) ... |

The guest sees the disk from ``data_offset`` on: QEMU must open the device with the raw
driver's ``offset=1048576`` (``-blockdev driver=raw,offset=1048576,file=...``). With a
separate ``lease_device`` (a small LUN or a file on shared storage) the data device is
the guest disk from byte 0. The backend declares the head as ``caps.reserved_bytes``.

Without ``fenced`` the backend takes no lease: the engine's tiebreaker (a witness)
alone keeps two hosts from running the guest, ``promote`` only records the role.

There is one copy, so the backend declares ``caps.replays_log``: the standby keeps the
committed I/O logs the primary may not have applied yet and replays them after
``promote`` at failover (writes are idempotent).

The lease block is also the disk's lineage record (:mod:`kemari_suite.ha.lease`): the
resource names the pair, the generation the run that may write, and the SOLO flag says
that its holder wrote without a secondary. Two checks follow from it:

- a host whose generation is older than the block's cannot write: :meth:`apply` reads
  the block before every batch (one 4 KiB read per acknowledged epoch), so a host that
  was paused past its lease and woke up believing it still holds it is stopped by the
  disk itself, not only by its own clock;
- a stale standby (SOLO set by another host) cannot take the lease: ``promote``, which
  a failover calls before replaying its logs, refuses and says why, so old logs are
  never replayed onto newer data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kemari_suite.disk.base import DiskCaps, DiskRole, DiskStatus, FileDisk, PlainCapabilities
from kemari_suite.disk.scsipr import ScsiPr, SgPersist, format_key
from kemari_suite.errors import ConfigError, DiskError, LeaseError
from kemari_suite.ha.lease import LEASE_BLOCK, Lease, LeaseRecord, LeaseTiebreaker

#: Bytes reserved at the head of the data device when the lease lives there.
SHARED_RESERVED_BYTES = 1 << 20


@dataclass(frozen=True)
class SharedDiskConfig:
    """The shared device and its lease, validated on construction.

    Raises:
        ConfigError: naming the bad field.
    """

    device: str
    #: The VM the lease protects (written in the lease block).
    resource: str
    #: Empty: the lease is the first 4 KiB of ``device`` (data starts at 1 MiB).
    lease_device: str = ""
    lease_offset: int = 0
    lease_s: float = 3.0
    io_timeout_s: float = 0.5
    #: Take the lease before writing (False: another tiebreaker fences the writer).
    fenced: bool = True
    #: Also fence with SCSI-3 persistent reservations on ``device`` (a real LUN).
    scsi_pr: bool = False

    def __post_init__(self) -> None:
        if not self.device:
            raise ConfigError("missing", key="shared.device")
        if not self.resource or len(self.resource.encode()) > 64:
            raise ConfigError("must be 1-64 bytes", key="shared.resource")
        if not self.fenced:
            return  # no lease: its offset and timing are never used
        if self.lease_offset < 0 or self.lease_offset % LEASE_BLOCK:
            raise ConfigError(f"must be a multiple of {LEASE_BLOCK}", key="shared.lease_offset")
        if not self.lease_device and self.lease_offset + LEASE_BLOCK > SHARED_RESERVED_BYTES:
            raise ConfigError(
                "the lease must lie in the reserved first MiB of the device",
                key="shared.lease_offset",
            )
        if self.io_timeout_s <= 0:
            raise ConfigError("must be positive", key="shared.io_timeout_s")
        if self.lease_s < 4 * self.io_timeout_s:
            raise ConfigError(
                "must be at least 4 x io_timeout_s (a renewal must fit well inside the lease)",
                key="shared.lease_s",
            )

    @property
    def data_offset(self) -> int:
        return 0 if self.lease_device else SHARED_RESERVED_BYTES

    @property
    def lease_path(self) -> str:
        return self.lease_device or self.device


def format_shared(config: SharedDiskConfig, *, force: bool = False) -> LeaseRecord:
    """Write a free lease block (once, when the shared disk is set up).

    Raises:
        LeaseError: the block holds a lease or foreign data already (unless ``force``).
    """
    lease = Lease(
        config.lease_path,
        resource=config.resource,
        lease_s=config.lease_s,
        io_timeout_s=config.io_timeout_s,
        offset=config.lease_offset,
    )
    try:
        return lease.format(force=force)
    finally:
        lease.close()


class SharedDiskBackend(PlainCapabilities):
    """The shared-storage :class:`~kemari_suite.disk.base.DiskBackend`.

    ``lease`` may be passed in (tests inject clocks through it; the engine passes its
    lease tiebreaker's, so that both renew one object); otherwise it is opened on attach
    from the config (not at all without ``config.fenced``). With ``config.scsi_pr`` the
    reservation key is derived from ``node`` and ``sg_persist`` runs through
    ``pr_tools`` (default: on this host).
    """

    name = "shared"

    def __init__(
        self,
        config: SharedDiskConfig,
        node: str,
        *,
        lease: Lease | None = None,
        pr_tools: SgPersist | None = None,
    ):
        if not node:
            raise ConfigError("missing", key="shared.node")
        if lease is not None and not config.fenced:
            raise ConfigError("a lease for an unfenced shared disk", key="shared.fenced")
        self.config = config
        self.node = node
        self.lease = lease
        self._own_lease = lease is None
        self.disk = FileDisk(config.device, offset=config.data_offset)
        self.pr = ScsiPr(config.device, node, tools=pr_tools) if config.scsi_pr else None
        self.role = DiskRole.UNKNOWN
        self.tracking = False

    @property
    def caps(self) -> DiskCaps:
        return DiskCaps(
            replays_log=True, lease=self.config.fenced, reserved_bytes=self.config.data_offset
        )

    @property
    def size(self) -> int:
        return self.disk.size

    def attach(self) -> None:
        """Open the device and the lease (idempotent); checks the lease block is sound.

        Raises:
            DiskError: the device cannot be opened.
            LeaseError: the lease block is unreadable, unformatted or corrupted.
        """
        self.disk.attach()
        if not self.config.fenced:
            if self.role is DiskRole.UNKNOWN:
                self.role = DiskRole.SECONDARY
            return
        if self.lease is None:
            self.lease = Lease(
                self.config.lease_path,
                resource=self.config.resource,
                lease_s=self.config.lease_s,
                io_timeout_s=self.config.io_timeout_s,
                offset=self.config.lease_offset,
            )
        self.lease.holder()
        if self.role is DiskRole.UNKNOWN:
            self.role = DiskRole.SECONDARY

    def _lease(self) -> Lease:
        if self.lease is None:
            raise DiskError(self.name, f"{self.config.device} is not attached")
        return self.lease

    def tiebreaker(self) -> LeaseTiebreaker:
        """The lease as the engine's tiebreaker (same object, so promote sees its grant
        and ``apply`` its renewals).

        Raises:
            DiskError: not fenced, or not attached.
        """
        if not self.config.fenced:
            raise DiskError(self.name, f"{self.config.device}: no lease (not fenced)")
        return LeaseTiebreaker(self._lease(), self.node)

    def promote(self) -> None:
        """Acquire the lease (claim, adopt, or take over an expired one).

        A failover normally wins ``LeaseTiebreaker.ask("takeover")`` first (repeated
        every heartbeat while it watches the old holder); ``promote`` then finds the
        lease already ours.

        With ``scsi_pr``, then register our key and reserve the LUN, or preempt-and-abort
        the key that holds it (the old writer's: a failover calls this only once the
        tiebreaker granted the takeover).

        Raises:
            LeaseError: another host holds the lease and was seen renewing it, or
                another host ran without a secondary (this copy's logs are stale).
            ScsiPrError: a reservation command failed (the role stays as it was).
        """
        if self.config.fenced:
            lease = self._lease()
            if lease.node != self.node or not lease.valid():
                lease.acquire(self.node)
        else:
            self.disk.promote()
        if self.pr is not None:
            self.pr.acquire()
        self.role = DiskRole.PRIMARY

    def renew(self) -> LeaseRecord:
        """Renew the lease (call every ``lease_s / 3``).

        Raises:
            LeaseError: the lease was taken over: stop the guest now.
        """
        try:
            return self._lease().renew()
        except LeaseError:
            self.role = DiskRole.SECONDARY
            raise

    def apply(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """Write to the shared device, only while our lease is certainly valid.

        Raises:
            DiskError: not the writer here, or the write failed (with ``scsi_pr``, when
                another host preempted our key the message says so and the role is then
                SECONDARY).
            LeaseError: our lease lapsed (locally judged), or the block holds a newer
                generation than ours: writing could corrupt the disk the other host owns.
        """
        if self.role is not DiskRole.PRIMARY:
            raise DiskError(self.name, f"{self.config.device}: not the writer on this host")
        if not self.config.fenced:
            self._write(writes)
            return
        lease = self._lease()
        if not lease.valid(margin_s=self.config.io_timeout_s):
            raise LeaseError(
                str(lease.device), "our lease lapsed (not renewed in time): refusing writes"
            )
        try:
            lease.check()  # a newer generation on disk: another host writes now
        except LeaseError:
            self.role = DiskRole.SECONDARY
            raise
        self._write(writes)

    def _write(self, writes: Sequence[tuple[int, bytes]]) -> None:
        try:
            self.disk.apply(writes)
        except DiskError as err:
            self._check_fenced(err)
            raise

    def _check_fenced(self, err: DiskError) -> None:
        """After a failed write or flush on a reserved LUN: if our key no longer holds
        the reservation, the target refused us because another host preempted our key.
        (The SCSI layer says EBADE to an O_DIRECT write, but a buffered write fails only
        at the flush, with EIO: the reservation is what tells.)

        Raises:
            DiskError: fenced (the role is then SECONDARY), chained to ``err``.
        """
        if self.pr is None:
            return
        try:
            holder = self.pr.read_reservation().key
        except DiskError:
            return  # the LUN is unreachable: the original error says enough
        if holder != self.pr.key:
            self.role = DiskRole.SECONDARY
            raise DiskError(
                self.name,
                f"{self.config.device}: the target refused us; the reservation is held by "
                f"{format_key(holder) if holder else 'nobody'}, not our key "
                f"{format_key(self.pr.key)}: another host preempted it, we are fenced",
            ) from err

    def read(self, offset: int, length: int) -> bytes:
        """Read the guest disk (any role: there is one copy).

        Raises:
            DiskError: not attached, outside the disk, or the read failed.
        """
        return self.disk.read(offset, length)

    def flush(self) -> None:
        """Raises: DiskError: the flush failed (or, ``scsi_pr``, we were fenced)."""
        try:
            self.disk.flush()
        except DiskError as err:
            self._check_fenced(err)
            raise

    def demote(self) -> None:
        """Flush and release the lease (if we believe we hold it), and with ``scsi_pr``
        the reservation (our key stays registered).

        Raises:
            LeaseError: the lease had been taken over meanwhile (we were no longer the
                writer; the role is SECONDARY all the same).
            ScsiPrError: the release failed (the role is SECONDARY all the same).
        """
        was_writer = self.role is DiskRole.PRIMARY
        try:
            if was_writer:
                self.disk.flush()
        finally:
            self.role = DiskRole.SECONDARY
            if self.pr is not None and was_writer:
                self.pr.release()
            lease = self.lease
            if lease is not None and lease.node == self.node:
                lease.release()

    def status(self) -> DiskStatus:
        detail: dict[str, Any] = {
            "device": self.config.device,
            "lease_device": self.config.lease_path if self.config.fenced else None,
            "data_offset": self.config.data_offset,
            "scsi_pr_key": format_key(self.pr.key) if self.pr is not None else None,
        }
        if not self.config.fenced:
            # One device, no lease to read: reachable is all there is to know.
            up = self.disk.attached
            return DiskStatus(self.name, self.role, up, up, None, detail)
        connected = False
        if self.lease is not None:
            try:
                rec = self.lease.holder()
            except LeaseError as err:
                detail["lease_error"] = err.reason
            else:
                connected = True
                detail.update(
                    owner=rec.owner,
                    generation=rec.generation,
                    solo=rec.solo,
                    solo_owner=rec.solo_owner,
                    counter=rec.counter,
                    expires_wall=rec.expires_wall,
                    lease_valid_here=self.lease.valid(),
                    direct_io=self.lease.direct,
                )
        return DiskStatus(
            self.name,
            self.role,
            connected=connected,
            up_to_date=connected,
            resync_percent=None,
            detail=detail,
        )

    def close(self) -> None:
        self.disk.close()
        if self.lease is not None and self._own_lease:
            self.lease.close()
            self.lease = None
        self.role = DiskRole.UNKNOWN


def create_shared_image(path: str | os.PathLike[str], size_bytes: int) -> Path:
    """Create a sparse file usable as a shared device (the lab), lease area included.

    Raises:
        DiskError: the file exists or cannot be created.
    """
    p = Path(path)
    try:
        with open(p, "xb") as f:
            f.truncate(SHARED_RESERVED_BYTES + size_bytes)
    except OSError as err:
        raise DiskError("shared", f"cannot create {p}: {err.strerror}") from err
    return p
