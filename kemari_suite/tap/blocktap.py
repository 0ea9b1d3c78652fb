"""The block tap: the data path between the guest's NBD requests and the disk backend.

In PROTECTED mode a write (trim, write-zeroes, flush) is logged in the open epoch of the
:class:`~kemari_suite.tap.epochs.EpochLog` and acknowledged at once, so QMP ``stop``
(which drains in-flight I/O and flushes) never waits on a checkpoint; it reports
``on_event(kind, epoch)``. The open epoch is pushed by the primary inside the stopped
window (:meth:`BlockTap.switch_epoch`). Once the primary calls
:meth:`BlockTap.commit_epoch`, a single applier task writes the committed epochs to the
backend on a worker thread, in order, flushing after every epoch that had a FLUSH or a
FUA write. Reads see pending writes through the log's overlay. In UNPROTECTED mode (no
secondary) every logged epoch is applied and flushed first; from then on a write is
applied, and on FLUSH/FUA flushed, before it is acknowledged.

The NBD server in front of it is :mod:`kemari_suite.tap.nbd`.

Guarantees the primary relies on::

    durable(e)       every write logged in an epoch <= e is on the backend, and
                     flushed if its epoch had a FLUSH or FUA write
    output_ready(e)  every epoch <= e that had a FLUSH or FUA write is durable:
                     with the acknowledgement of e, the output rule for e's frames
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from kemari_suite.errors import DiskError, TapError
from kemari_suite.tap.backend import BlockBackend
from kemari_suite.tap.epochs import EpochLog, IOOp, OpKind, ops_to_writes
from kemari_suite.tap.events import EventSink, IOEvent, OpenEpoch, TapMode
from kemari_suite.tap.overlay import Piece, assemble

log = logging.getLogger(__name__)


@dataclass
class BlockTapStats:
    reads: int = 0
    read_bytes: int = 0
    writes: int = 0
    write_bytes: int = 0
    trims: int = 0
    write_zeroes: int = 0
    flushes: int = 0
    fua_writes: int = 0
    written_through: int = 0
    epochs_applied: int = 0
    backend_flushes: int = 0
    errors: int = 0


class _Waiters:
    """Futures waiting for a condition on the tap's log; resolved or failed by ``check``."""

    def __init__(self) -> None:
        self._items: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    def add(self, done: Callable[[], bool]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._items.append((done, fut))
        return fut

    def check(self, error: TapError | None) -> None:
        """Resolve the waiters whose condition holds; fail the rest with ``error``."""
        keep = []
        for done, fut in self._items:
            if fut.done():
                continue
            if done():
                fut.set_result(None)
            elif error is not None:
                fut.set_exception(error)
            else:
                keep.append((done, fut))
        self._items = keep

    def fail_all(self, error: TapError) -> None:
        for _, fut in self._items:
            if not fut.done():
                fut.set_exception(error)
        self._items.clear()


class BlockTap:
    """Log, overlay and applier between NBD requests and the disk backend.

    ``epoch`` is the primary's open epoch, switched by :meth:`switch_epoch`;
    ``on_event(kind, epoch)`` is told of each write and flush in PROTECTED mode;
    ``on_durable(epoch)`` is told when every write of epochs ``<= epoch`` is applied and
    flushed (the secondary may drop those logs). Use from one event loop; ``close()`` at
    the end.
    """

    def __init__(
        self,
        backend: BlockBackend,
        *,
        mode: TapMode,
        epoch: int = 0,
        on_event: EventSink | None = None,
        on_durable: Callable[[int], None] | None = None,
        name: str = "block",
    ) -> None:
        self.backend = backend
        self.name = name
        #: The open epoch, pushed by :meth:`switch_epoch`.
        self.open_epoch = OpenEpoch(name, epoch)
        self.on_event = on_event
        self.on_durable = on_durable
        self.log = EpochLog()
        self.mode = mode
        self.stats = BlockTapStats()
        #: Set when the backend failed; from then on writes get EIO and waiters fail.
        self.error: TapError | None = None
        #: Every write of epochs <= this is applied and flushed.
        self.flushed_through = -1
        self._io = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-apply")
        self._readers = ThreadPoolExecutor(2, thread_name_prefix=f"{name}-read")
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._draining = False
        #: Write-throughs the guest sent that are not on the disk yet.
        self._through_in_flight = 0
        self._through_idle = asyncio.Event()
        self._through_idle.set()
        if mode is TapMode.UNPROTECTED:
            self._drained.set()
        self._unflushed = False
        #: Writes applied since the last backend flush (apply thread only).
        self._dirty = False
        self._waiters = _Waiters()
        self._applier: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def size(self) -> int:
        return int(self.backend.size)

    @property
    def epoch(self) -> int:
        """The open epoch: guest writes are logged in it (PROTECTED)."""
        return self.open_epoch.value

    def switch_epoch(self, epoch: int) -> None:
        """The primary's open epoch is now ``epoch`` (inside the stopped window).

        Raises:
            TapError: ``epoch`` is older than the open epoch.
        """
        self.open_epoch.switch(epoch)

    # ---- guest I/O ---------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TapError(self.name, f"{offset}+{length} outside the {self.size}-byte disk")

    async def read(self, offset: int, length: int) -> bytes:
        """The guest's view of ``[offset, offset + length)``, pending writes included.

        Raises:
            TapError: outside the disk, or the backend failed.
        """
        self._check_range(offset, length)
        self.stats.reads += 1
        self.stats.read_bytes += length
        pieces = self.log.read_pieces(offset, length)
        gaps = [x for x in pieces if x.source == "backend"]
        got: dict[int, bytes] = {}
        if gaps:
            loop = asyncio.get_running_loop()
            try:
                got = await loop.run_in_executor(self._readers, self._read_gaps, gaps)
            except (DiskError, OSError) as err:
                self.stats.errors += 1
                raise TapError(self.name, f"read {offset}+{length}: {err}") from err
        return assemble(pieces, got)

    def _read_gaps(self, gaps: list[Piece]) -> dict[int, bytes]:
        return {g.offset: self.backend.read(g.offset, g.length) for g in gaps}

    def _event(self, kind: IOEvent, epoch: int) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, epoch)
            except Exception:  # a broken sink must not fail the guest's I/O
                log.exception("%s: on_event(%s, %d) failed", self.name, kind, epoch)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        """A guest write: logged (PROTECTED) or written through (UNPROTECTED).

        Raises:
            TapError: outside the disk, a log misuse, or the backend failed.
        """
        self._check_range(offset, len(data))
        self.stats.writes += 1
        self.stats.write_bytes += len(data)
        self.stats.fua_writes += int(fua)
        if not data:
            return
        if self.mode is TapMode.PROTECTED:
            epoch = self.open_epoch.value
            self.log.record_write(epoch, offset, data, fua=fua)
            self._event(IOEvent.WRITE, epoch)
            if fua:
                self._event(IOEvent.FLUSH, epoch)
            return
        await self._write_through([(offset, bytes(data))], flush=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """A guest trim; reads as zeros afterwards. Raises TapError as :meth:`write`."""
        self._check_range(offset, length)
        self.stats.trims += 1
        await self._zero(offset, length, fua=fua, trim=True)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        """A guest write-zeroes. Raises TapError as :meth:`write`."""
        self._check_range(offset, length)
        self.stats.write_zeroes += 1
        await self._zero(offset, length, fua=fua, trim=False)

    async def _zero(self, offset: int, length: int, *, fua: bool, trim: bool) -> None:
        if length == 0:
            return
        if self.mode is TapMode.PROTECTED:
            epoch = self.open_epoch.value
            if trim:
                self.log.record_trim(epoch, offset, length, fua=fua)
            else:
                self.log.record_write_zeroes(epoch, offset, length, fua=fua)
            self._event(IOEvent.WRITE, epoch)
            if fua:
                self._event(IOEvent.FLUSH, epoch)
            return
        writes = ops_to_writes([IOOp(OpKind.WRITE_ZEROES, offset, length)])
        await self._write_through(writes, flush=fua)

    async def flush(self) -> None:
        """A guest flush: logged (PROTECTED) or a backend flush (UNPROTECTED).

        Raises:
            TapError: a log misuse, or the backend failed.
        """
        self.stats.flushes += 1
        if self.mode is TapMode.PROTECTED:
            epoch = self.open_epoch.value
            self.log.record_flush(epoch)
            self._event(IOEvent.FLUSH, epoch)
            return
        await self._write_through([], flush=True)

    async def _write_through(self, writes: list[tuple[int, bytes]], *, flush: bool) -> None:
        self._through_in_flight += 1
        self._through_idle.clear()
        try:
            # Logged epochs first: their overlay must be gone before this write is visible.
            await self._drained.wait()
            if self.error is not None:
                raise self.error
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._io, self._apply_sync, writes, flush)
            except (DiskError, OSError) as err:
                self.stats.errors += 1
                raise TapError(self.name, f"write-through: {err}") from err
            self.stats.written_through += 1
        finally:
            self._through_in_flight -= 1
            if not self._through_in_flight:
                self._through_idle.set()

    async def write_through_idle(self) -> None:
        """Resolve once every write-through already sent has reached the backend (or
        failed). After :meth:`set_protected` no new one starts, so the disk a copy reads
        then holds every unprotected write."""
        await self._through_idle.wait()

    def _apply_sync(self, writes: list[tuple[int, bytes]], flush: bool) -> None:
        # Runs on the single apply thread only, so _dirty needs no lock.
        if writes:
            self.backend.apply(writes)
            self._dirty = True
        # QEMU's `stop` flushes every disk, so nearly every epoch carries a FLUSH; a
        # flush with nothing applied since the last one is skipped.
        if flush and self._dirty:
            self.backend.flush()
            self._dirty = False
            self.stats.backend_flushes += 1

    # ---- the primary's side -----------------------------------------------------------

    def io_log(self, epoch: int) -> bytes:
        """Epoch ``epoch``'s IOLog payload: pass as ``PrimaryAgent.io_log_provider``."""
        return self.log.serialize(epoch)

    def commit_epoch(self, epoch: int) -> None:
        """The secondary acknowledged ``epoch``: apply every logged epoch ``<= epoch``.

        Returns at once; await :meth:`durable` or :meth:`output_ready` for the result.
        Ignored in UNPROTECTED mode (everything is written through there).
        """
        if self.mode is TapMode.UNPROTECTED:
            return
        self.log.committed(epoch)
        self._kick()

    async def durable(self, epoch: int) -> None:
        """Resolve once every write of epochs ``<= epoch`` is applied (and flushed where
        its epoch had a FLUSH or FUA write).

        Raises:
            TapError: the backend failed or the tap was closed.
        """

        def done() -> bool:
            return not self.log.pending_through(epoch)

        await self._wait(done)

    async def output_ready(self, epoch: int) -> None:
        """Resolve once every epoch ``<= epoch`` that had a FLUSH or a FUA write is durable.

        Together with the acknowledgement of ``epoch`` this is the output rule: the
        network tap may then release ``epoch``'s frames.

        Raises:
            TapError: the backend failed or the tap was closed.
        """

        def done() -> bool:
            return not any(r.needs_flush for r in self.log.pending_through(epoch))

        await self._wait(done)

    async def _wait(self, done: Callable[[], bool]) -> None:
        if done():
            return
        if self.error is not None:
            raise self.error
        if self._closed:
            raise TapError(self.name, "closed")
        await self._waiters.add(done)

    def _check_waiters(self) -> None:
        self._waiters.check(self.error)

    async def set_unprotected(self) -> None:
        """No secondary: apply and flush every logged epoch, then write through.

        Returns once the log is drained. Raises TapError if the backend failed.
        """
        if self.mode is TapMode.PROTECTED:
            log.info(
                "%s: unprotected: writing %d logged epochs through",
                self.name,
                len(self.log.pending_epochs()),
            )
            self.mode = TapMode.UNPROTECTED
            self._draining = True
            self._drained.clear()
            self._kick()
        await self._drained.wait()
        if self.error is not None:
            raise self.error

    def set_protected(self) -> None:
        """A secondary takes over: from now on writes are logged in the open epoch.

        Call it where the primary's open epoch is the first one the secondary will get
        (writes logged earlier than that epoch closes are shipped with it).

        Raises:
            TapError: the log is still being drained (await ``set_unprotected()`` first).
        """
        if self.mode is TapMode.PROTECTED:
            return
        if not self._drained.is_set():
            raise TapError(self.name, "still writing the log through")
        self.mode = TapMode.PROTECTED

    # ---- applier -----------------------------------------------------------------------

    def _kick(self) -> None:
        if self._closed:
            return
        if self._applier is None or self._applier.done():
            self._applier = asyncio.get_running_loop().create_task(
                self._apply_loop(), name=f"{self.name}-applier"
            )
        self._wake.set()

    async def _apply_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            rec = self.log.next_to_apply(include_uncommitted=self._draining)
            if rec is None:
                if (self._unflushed or self._draining) and not await self._flush_idle(loop):
                    return
                if self._draining:
                    self._draining = False
                    self._drained.set()
                self._check_waiters()
                self._wake.clear()
                await self._wake.wait()
                continue
            n_ops = len(rec.ops)
            writes = ops_to_writes(rec.ops)
            try:
                await loop.run_in_executor(self._io, self._apply_sync, writes, rec.needs_flush)
            except (DiskError, OSError) as err:
                self._fail(TapError(self.name, f"applying epoch {rec.epoch}: {err}"))
                return
            if len(rec.ops) != n_ops:
                self._fail(TapError(self.name, f"epoch {rec.epoch} grew while it was applied"))
                return
            self.log.applied(rec.epoch, force=self._draining)
            self.stats.epochs_applied += 1
            if rec.needs_flush:
                self._unflushed = False
                self._set_flushed(rec.epoch)
            else:
                self._unflushed = True
            self._check_waiters()

    async def _flush_idle(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Caught up: make what was applied durable so the secondary can drop its logs.
        Returns False if the backend failed."""
        through = self.log.applied_through
        try:
            await loop.run_in_executor(self._io, self._apply_sync, [], True)
        except (DiskError, OSError) as err:
            self._fail(TapError(self.name, f"flush: {err}"))
            return False
        self._unflushed = False
        self._set_flushed(through)
        return True

    def _set_flushed(self, epoch: int) -> None:
        if epoch > self.flushed_through:
            self.flushed_through = epoch
            if self.on_durable is not None:
                try:
                    self.on_durable(epoch)
                except Exception:
                    log.exception("%s: on_durable(%d) failed", self.name, epoch)

    def _fail(self, err: TapError) -> None:
        log.error("%s: %s", self.name, err)
        self.stats.errors += 1
        self.error = err
        self._draining = False
        self._drained.set()  # write-through waiters see the error
        self._check_waiters()

    # ---- status and teardown -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "pending_epochs": self.log.pending_epochs(),
            "pending_bytes": self.log.pending_bytes(),
            "committed_through": self.log.committed_through,
            "applied_through": self.log.applied_through,
            "flushed_through": self.flushed_through,
            "error": str(self.error) if self.error else None,
            **asdict(self.stats),
        }

    async def close(self) -> None:
        """Stop the applier (pending writes stay unapplied: the secondary holds them) and
        fail every waiter."""
        self._closed = True
        if self._applier is not None:
            self._applier.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._applier
        self._waiters.fail_all(TapError(self.name, "closed"))
        self._drained.set()
        self._io.shutdown(wait=True)
        self._readers.shutdown(wait=True)


__all__ = ["BlockTap", "BlockTapStats"]
