"""The epoch receiver: the replica's pages, the open epoch, commit and rollback. No I/O.

The replica is a ``(n_pages, 4096)`` uint8 array (on the secondary, the shared mapping
of the RAM file QEMU will run on at failover; in tests, a plain numpy array). One epoch
is open at a time, and its messages arrive in this order::

    EpochBegin -> (Pages | DeviceState | IOLog)* -> EpochEnd

Received pages are written into the replica at once, with the old contents of those
pages kept in an undo log. At EpochEnd the epoch commits if its digest verifies, it
carried device state and as many pages as it claims, and (for a DELTA epoch) it follows
the last committed one: the undo log is dropped and :meth:`EpochReceiver.end` returns
the epoch, for the caller to acknowledge. Anything else raises, and the caller rolls
the epoch back (:meth:`EpochReceiver.rollback`), which restores every page it touched:
the replica is always exactly the last committed checkpoint when no epoch is open.

A replica may also start from a *baseline* (:meth:`EpochReceiver.adopt_baseline`): after
a planned switchover, the old primary keeps its stopped guest's RAM, which is exactly the
checkpoint the new primary resumed. The first epoch may then be a DELTA that follows it
(carrying, like a FULL epoch, the disk copy). A baseline is no committed checkpoint: it
has no device state, so it is never resumed (:attr:`EpochReceiver.resumable` stays
false until an epoch commits on top of it).

The disk copy of a FULL epoch, or of the DELTA on a baseline (built-in replicated
disk), goes through a :class:`~kemari_suite.replica.replicadisk.ReplicaDisk`; without
one, the committed I/O logs are kept for a replay on shared storage at failover, until
the primary says its disk holds them (:meth:`EpochReceiver.durable`).

Errors: :class:`~kemari_suite.errors.ProtocolError` for a message that breaks the order
(or a digest mismatch), :class:`~kemari_suite.errors.ReplicationError` for an epoch
this replica cannot take (another RAM size, a delta that does not follow, missing
device state or pages).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from kemari_suite.errors import ProtocolError, ReplicationError
from kemari_suite.protocol import wire
from kemari_suite.protocol.codec import parse_pages
from kemari_suite.protocol.devstatedelta import apply_delta
from kemari_suite.replica.replicadisk import ReplicaDisk
from kemari_suite.testing import faults

PAGE = 4096

U8Array = npt.NDArray[np.uint8]
#: Called after every commit with the epoch and the replica (which then holds it).
CommitObserver = Callable[[int, U8Array], None]


@dataclass
class OpenEpoch:
    """The epoch being received: its digest so far and how to undo it."""

    epoch: int
    kind: wire.EpochKind
    digest: wire.EpochDigest
    #: (page numbers, their contents before this epoch), one entry per Pages batch,
    #: each page once: a page sent again in the epoch (pre-copy, then the stop) keeps
    #: its first entry, the only one a rollback needs.
    undo: list[tuple[npt.NDArray[np.intp], U8Array]] = field(default_factory=list)
    pages: int = 0
    devstate: bytes | None = None
    iologs: list[bytes] = field(default_factory=list)
    #: The disk travels in this (FULL) epoch; its I/O logs went into the copy already.
    disk_copy: bool = False


class EpochReceiver:
    """Receives epochs into ``pages`` and commits or rolls them back; see the module."""

    def __init__(self, pages: U8Array, *, disk: ReplicaDisk | None = None) -> None:
        if pages.dtype != np.uint8 or pages.ndim != 2 or pages.shape[1] != PAGE:
            raise ValueError(f"replica must be (n, {PAGE}) uint8, not {pages.dtype} {pages.shape}")
        self.pages = pages
        self.n_pages = pages.shape[0]
        self.disk = disk
        self.open: OpenEpoch | None = None
        self.committed_epoch = -1
        self.committed_devstate: bytes | None = None
        #: Committed I/O logs not known to be on the primary's disk (no disk copy here).
        self.committed_iologs: list[tuple[int, bytes]] = []
        self.durable_epoch = -1
        self.epochs_committed = 0
        #: The switchover checkpoint this replica holds without device state (-1: none).
        self.baseline_epoch = -1
        self.closed = False
        self._observers: list[CommitObserver] = []
        # Pages already in the open epoch's undo log (cleared as the epoch closes).
        self._saved = np.zeros(self.n_pages, dtype=bool)
        #: Told the page numbers of every write into the replica, *after* the write (an
        #: apply or a rollback): keeps :class:`~kemari_suite.vm.guestram.RamDigests` exact.
        self.written: Callable[[npt.NDArray[np.intp]], None] = lambda idx: None

    def on_commit(self, fn: CommitObserver) -> None:
        """Call ``fn(epoch, pages)`` after every commit (in commit order)."""
        self._observers.append(fn)

    @property
    def resumable(self) -> bool:
        """Whether the replica holds a committed checkpoint a failover can resume."""
        return self.committed_devstate is not None

    def adopt_baseline(self, epoch: int) -> None:
        """Take the replica's pages as switchover checkpoint ``epoch`` (not resumable):
        a DELTA ``epoch + 1`` may follow.

        Raises:
            ProtocolError: an epoch was already received or is open.
        """
        if self.open is not None or self.committed_epoch >= 0 or self.closed:
            raise ProtocolError("a baseline is taken only by a fresh replica")
        self.committed_epoch = epoch
        self.baseline_epoch = epoch

    # ---- the messages of one epoch, in order --------------------------------------

    def begin(self, msg: wire.EpochBegin) -> None:
        """Open epoch ``msg.epoch``.

        Raises:
            ReplicationError: another RAM size, or a DELTA that does not follow the last
                committed epoch.
            ProtocolError: an epoch is already open, or the receiver is closed.
        """
        if self.closed:
            raise ProtocolError(f"epoch {msg.epoch} begun after this replica was closed")
        if msg.page_size != PAGE or msg.ram_size != self.n_pages * PAGE:
            raise ReplicationError(
                f"primary's RAM is {msg.ram_size} bytes in {msg.page_size}-byte pages, "
                f"this secondary expects {self.n_pages * PAGE} in {PAGE}: configs differ",
                msg.epoch,
            )
        if self.open is not None:
            raise ProtocolError(f"epoch {msg.epoch} begun while {self.open.epoch} is open")
        if msg.kind is not wire.EpochKind.FULL and (
            self.committed_epoch < 0 or msg.epoch != self.committed_epoch + 1
        ):
            raise ReplicationError(
                f"delta epoch {msg.epoch} does not follow committed {self.committed_epoch}",
                msg.epoch,
            )
        self.open = OpenEpoch(msg.epoch, msg.kind, wire.EpochDigest(msg.epoch))

    def disk_copy(self, lineage: str, *, incremental: bool) -> int:
        """The primary copies its disk in the open FULL epoch (or the DELTA on a
        baseline); returns that epoch.

        Raises:
            ProtocolError: no FULL epoch (nor DELTA on a baseline) is open.
            ReplicationError: this host has no disk copy to write.
        """
        ep = self.open
        on_baseline = (
            ep is not None and self.baseline_epoch >= 0 and ep.epoch == self.baseline_epoch + 1
        )
        if ep is None or (ep.kind is not wire.EpochKind.FULL and not on_baseline):
            raise ProtocolError("disk copy outside a FULL epoch")
        if self.disk is None:
            raise ReplicationError("the primary copies a disk, this secondary has none", ep.epoch)
        self.disk.begin_copy(lineage, incremental=incremental)
        ep.disk_copy = True
        return ep.epoch

    def receive_pages(self, msg: wire.Pages) -> int:
        """Decode a batch and write it into the replica, keeping what it overwrote.
        Returns the number of pages in the batch (CPU-bound: callers may run it in a
        thread, one at a time).

        Raises:
            ProtocolError: no such open epoch, or a malformed batch.
        """
        ep = self._expect_open(msg.epoch)
        ep.digest.update(msg)
        batch = parse_pages(msg.encoded, self.n_pages)
        idx = batch.indices.astype(np.intp)
        first = idx[~self._saved[idx]]
        if len(first):
            self._saved[first] = True
            ep.undo.append((first, self.pages[first]))
        faults.hit("secondary-apply")
        batch.apply_to(self.pages)
        self.written(idx)
        ep.pages += len(idx)
        return len(idx)

    def device_state(self, msg: wire.DeviceState) -> None:
        """Keep the epoch's device state.

        Raises:
            ProtocolError: no such open epoch.
        """
        ep = self._expect_open(msg.epoch)
        ep.digest.update(msg)
        ep.devstate = bytes(msg.data)

    def device_state_delta(self, msg: wire.DeviceStateDelta) -> None:
        """Keep the epoch's device state, sent as a change to the last committed one
        (:mod:`~kemari_suite.protocol.devstatedelta`).

        Raises:
            ProtocolError: no such open epoch, a base other than the last committed
                epoch's device state, or a delta that does not apply.
        """
        ep = self._expect_open(msg.epoch)
        base = self.committed_devstate
        if base is None or msg.base_epoch != self.committed_epoch:
            raise ProtocolError(
                f"device state delta of epoch {msg.epoch} on epoch {msg.base_epoch}, but "
                f"the last committed device state is epoch {self.committed_epoch}'s"
                if base is not None
                else f"device state delta of epoch {msg.epoch} with no committed device state",
                msg.TYPE,
            )
        ep.digest.update(msg)
        ep.devstate = apply_delta(base, msg.data, msg.size)

    def io_log(self, msg: wire.IOLog) -> None:
        """Keep the epoch's I/O log; a disk copy in progress takes it at once.

        Raises:
            ProtocolError: no such open epoch, or (during a copy) a malformed log.
            DiskError: the copy could not be written.
        """
        ep = self._expect_open(msg.epoch)
        ep.digest.update(msg)
        data = bytes(msg.data)
        if not data:
            return
        ep.iologs.append(data)
        if ep.disk_copy and self.disk is not None and self.disk.copying:
            self.disk.write_now(data)

    def end(self, msg: wire.EpochEnd) -> int:
        """Verify and commit the open epoch; returns it (to acknowledge).

        Raises:
            ProtocolError: no such open epoch, or the digest differs.
            ReplicationError: no device state, or fewer pages than the epoch claims.
            DiskError, OSError: the disk copy could not be brought to the epoch.
        """
        ep = self._expect_open(msg.epoch)
        if ep.devstate is None:
            raise ReplicationError("epoch ended without device state", msg.epoch)
        ep.digest.verify(msg)
        # n_pages counts the stop-time pages; pre-copied ones come on top.
        if ep.pages < msg.n_pages:
            raise ReplicationError(
                f"epoch claims {msg.n_pages} pages, {ep.pages} arrived", msg.epoch
            )
        if self.disk is not None:
            self.disk.commit(ep.epoch, ep.iologs)
        elif ep.iologs:
            self.committed_iologs.extend((ep.epoch, d) for d in ep.iologs)
        # Committed: the undo log is no longer needed.
        self._forget_undo(ep)
        self.committed_epoch = ep.epoch
        self.committed_devstate = ep.devstate
        self.baseline_epoch = -1
        self.open = None
        self.epochs_committed += 1
        for fn in self._observers:
            fn(ep.epoch, self.pages)
        return ep.epoch

    # ---- outside one epoch ----------------------------------------------------------

    def rollback(self) -> OpenEpoch | None:
        """Undo the open epoch, if any (returned): the replica is the last committed
        checkpoint again, and a disk copy in progress is dropped."""
        ep = self.open
        if ep is None:
            return None
        for idx, rows in reversed(ep.undo):
            self.pages[idx] = rows
            self.written(idx)
        self._forget_undo(ep)
        if ep.disk_copy and self.disk is not None:
            self.disk.abort()
        self.open = None
        return ep

    def _forget_undo(self, ep: OpenEpoch) -> None:
        for idx, _ in ep.undo:
            self._saved[idx] = False
        ep.undo.clear()

    def durable(self, epoch: int) -> None:
        """The primary's disk holds every write through ``epoch``: drop those logs."""
        self.durable_epoch = max(self.durable_epoch, epoch)
        self.committed_iologs = [(e, d) for e, d in self.committed_iologs if e > self.durable_epoch]

    def pending_iologs(self) -> list[bytes]:
        """The committed I/O logs a shared disk may still lack, oldest first."""
        return [d for e, d in self.committed_iologs if e > self.durable_epoch]

    def close(self) -> OpenEpoch | None:
        """Roll back and take no more epochs (the replica now belongs to a VM)."""
        ep = self.rollback()
        self.closed = True
        self.pages = np.empty((0, PAGE), np.uint8)
        return ep

    def _expect_open(self, epoch: int) -> OpenEpoch:
        if self.open is None or self.open.epoch != epoch:
            have = None if self.open is None else self.open.epoch
            raise ProtocolError(f"data for epoch {epoch} while epoch {have} is open")
        return self.open


__all__ = ["CommitObserver", "EpochReceiver", "OpenEpoch", "U8Array"]
