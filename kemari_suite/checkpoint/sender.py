"""The epoch sender: everything the primary puts on the replication link for an epoch.

::

    EpochBegin(e) ─► Pages(e)* ─► [IOLog(e) disk copy]* ─► Pages(e)* ─► DeviceState(e)
                  ─► IOLog(e) ─► EpochEnd(e, n_pages, digest) ─► EpochBegin(e+1) ...

DeviceState(e) goes as a DeviceStateDelta(e) (the change since epoch e-1's, which the
secondary just committed) whenever that is much smaller
(:mod:`~kemari_suite.protocol.devstatedelta`).

An epoch is opened right after the previous one closed, so pages pre-copied while the
guest runs (pipelining) have somewhere to go. Every frame of an epoch is folded into
its :class:`~kemari_suite.protocol.wire.EpochDigest`, which the secondary verifies
before it commits. Encoding runs on a worker thread, never inside the stopped window.

The sender is given a ``send`` coroutine (a :class:`~kemari_suite.protocol.link.Link`'s
in production; an in-memory pipe in tests), not the agent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from kemari_suite.checkpoint.shadow import TrackerCaps
from kemari_suite.checkpoint.tracker import DirtyTracker
from kemari_suite.protocol import wire
from kemari_suite.protocol.codec import PageEncoder
from kemari_suite.protocol.devstatedelta import encode_delta
from kemari_suite.testing import faults

PAGE = 4096
#: Pages per Pages frame; bounds frame size and lets heartbeats interleave.
BATCH_PAGES = 4096
#: Initial-sync pre-copy stops iterating when a round finds fewer dirty pages than this.
PRECOPY_CONVERGED = 2048
PRECOPY_MAX_ROUNDS = 8
#: A tracker without a shadow stages at most 1/8 of guest RAM at once...
STAGING_FRACTION = 8
#: ...and at least this many pages (24 MiB) if RAM is larger: a sync point of a small
#: guest dirtying 4000 pages per interval still fits.
STAGING_MIN_PAGES = 6144
SHADOW_CAPS = TrackerCaps(
    keeps_shadow=True, gives_previous=True, scan_during_capture=True, reset_needs_stop=False
)

Send = Callable[[wire.Message], Awaitable[int]]


class EpochSender:
    """Encodes and sends epochs; owns the open epoch's number and digest."""

    def __init__(self, send: Send, encoder: PageEncoder, *, n_pages: int) -> None:
        self.send = send
        self.encoder = encoder
        self.n_pages = n_pages
        self.digest: wire.EpochDigest | None = None
        self.open_epoch = -1
        #: The device state of the last epoch sent on this connection, and its epoch:
        #: the base of the next epoch's DeviceStateDelta.
        self._devstate: tuple[int, bytes] | None = None
        #: Pages (and bytes) pre-copied into the open epoch before its stop.
        self.precopied = 0
        self.precopy_bytes = 0

    async def begin(self, epoch: int, kind: wire.EpochKind) -> None:
        """Open ``epoch`` on the secondary (FULL: a new baseline; DELTA: changes)."""
        await self.send(
            wire.EpochBegin(epoch=epoch, kind=kind, ram_size=self.n_pages * PAGE, page_size=PAGE)
        )
        self.digest = wire.EpochDigest(epoch)
        self.open_epoch = epoch
        self.precopied = 0
        self.precopy_bytes = 0

    async def part(
        self, msg: wire.Pages | wire.DeviceState | wire.DeviceStateDelta | wire.IOLog
    ) -> int:
        """Send one frame that belongs to the open epoch (folded into its digest)."""
        assert self.digest is not None
        self.digest.update(msg)
        return await self.send(msg)

    async def pages(
        self,
        idx: np.ndarray,
        staged: np.ndarray,
        prev: np.ndarray | None,
        *,
        precopy: bool = False,
        batch: int = BATCH_PAGES,
    ) -> tuple[int, float]:
        """Encode and send pages of the open epoch in batches: (bytes sent, encode s)."""
        sent = 0
        enc_s = 0.0
        for start in range(0, len(idx), batch):
            sl = slice(start, start + batch)
            t0 = time.perf_counter()
            blob = await asyncio.to_thread(
                self.encoder.encode, idx[sl], staged[sl], None if prev is None else prev[sl]
            )
            enc_s += time.perf_counter() - t0
            sent += await self.part(wire.Pages(epoch=self.open_epoch, encoded=blob))
            faults.hit("precopy" if precopy else "mid-transfer")
        if precopy:
            self.precopied += len(idx)
            self.precopy_bytes += sent
        return sent, enc_s

    async def end(self, *, n_pages: int, devstate: bytes, io_log: bytes) -> int:
        """Close the open epoch: device state, I/O log, then the end with its digest."""
        assert self.digest is not None
        epoch = self.open_epoch
        delta = None
        if self._devstate is not None and self._devstate[0] == epoch - 1:
            delta = await asyncio.to_thread(encode_delta, self._devstate[1], devstate)
        if delta is not None:
            assert self._devstate is not None
            msg: wire.DeviceState | wire.DeviceStateDelta = wire.DeviceStateDelta(
                epoch=epoch, base_epoch=self._devstate[0], size=len(devstate), data=delta
            )
        else:
            msg = wire.DeviceState(epoch=epoch, data=devstate)
        sent = await self.part(msg)
        # The next epoch's delta is against this one (sent on this connection, in order).
        self._devstate = (epoch, bytes(devstate))
        sent += await self.part(wire.IOLog(epoch=epoch, data=io_log))
        sent += await self.send(
            wire.EpochEnd(epoch=epoch, n_pages=n_pages, digest=self.digest.digest())
        )
        self.digest = None
        return sent

    async def from_ram(
        self,
        tracker: DirtyTracker,
        pages: np.ndarray,
        idx: np.ndarray,
        buf: Buffers,
        *,
        precopy: bool = False,
    ) -> tuple[int, float]:
        """Stage, commit and send pages ``idx`` as many at a time as the staging buffer
        holds: (bytes sent, encode s).

        Each piece is committed once staged (the bytes that are sent, by the one rule)
        and encoded before the next reuses the buffer.
        """
        sent, enc_s = 0, 0.0
        step = len(buf.staging)
        for start in range(0, len(idx), step):
            part = idx[start : start + step]
            staged = tracker.stage(pages, part, buf.staging)
            prev = tracker.previous(part, buf.prev)
            tracker.commit(part, staged)
            n, e = await self.pages(part, staged, prev, precopy=precopy)
            sent += n
            enc_s += e
        return sent, enc_s

    async def precopy_round(self, tracker: DirtyTracker, pages: np.ndarray, buf: Buffers) -> int:
        """One pre-copy round with the guest running: scan on one thread, stage, send.

        Returns the number of pages sent (0: nothing had changed).
        """
        k = await asyncio.to_thread(tracker.scan, pages, out=buf.index, threads=1)
        if k == 0:
            return 0
        await self.from_ram(tracker, pages, buf.index[:k].copy(), buf, precopy=True)
        return k

    async def full_copy(
        self,
        tracker: DirtyTracker,
        pages: np.ndarray,
        buf: Buffers,
        *,
        stop: Callable[[], Awaitable[None]],
        cont: Callable[[], Awaitable[None]],
    ) -> None:
        """Round 0 of the initial sync: every page, staged and taken as the baseline.

        The staged bytes (exactly what is sent) become the tracker's baseline. A tracker
        whose reset clears kernel state is reset with the guest stopped (``stop`` /
        ``cont``), so no write falls between the copy and the clear. A tracker without a
        shadow is armed first and the copy taken after, piece by piece, with the guest
        running: a write during the copy is reported by its next scan.
        """
        all_idx = np.arange(self.n_pages, dtype=np.int64)
        if not tracker.caps.keeps_shadow:
            tracker.reset(pages)
            await self.from_ram(tracker, pages, all_idx, buf, precopy=True)
            return
        if tracker.caps.reset_needs_stop:
            await stop()
        staged = tracker.stage(pages, all_idx, buf.staging)
        tracker.reset(buf.staging)
        if tracker.caps.reset_needs_stop:
            await cont()
        step = BATCH_PAGES * 4
        for start in range(0, self.n_pages, step):
            sl = slice(start, start + step)
            await self.pages(all_idx[sl], staged[sl], None, precopy=True)

    async def converge(self, tracker: DirtyTracker, pages: np.ndarray, buf: Buffers) -> None:
        """Further initial-sync rounds: only what changed since it was sent, until few."""
        for _ in range(PRECOPY_MAX_ROUNDS):
            k = await asyncio.to_thread(tracker.scan, pages, out=buf.index)
            if k < PRECOPY_CONVERGED:
                return
            await self.from_ram(tracker, pages, buf.index[:k].copy(), buf, precopy=True)


def staging_pages(n_pages: int, caps: TrackerCaps) -> int:
    """Pages the staging buffer holds: all of RAM for a shadow tracker (whose full copy
    is staged at once), else an eighth of it (at least :data:`STAGING_MIN_PAGES`).

    A sync point that finds more dirty pages than that keeps the guest stopped while
    it sends them piece by piece (see :class:`~.window.StoppedWindow`).
    """
    if caps.keeps_shadow:
        return n_pages
    return min(n_pages, max(n_pages // STAGING_FRACTION, STAGING_MIN_PAGES))


@dataclass
class Buffers:
    """The sync point's preallocated buffers (no allocation inside the window)."""

    staging: np.ndarray
    #: The XOR-delta bases; empty for a tracker that gives none.
    prev: np.ndarray
    index: np.ndarray

    @classmethod
    def allocate(cls, n_pages: int, caps: TrackerCaps | None = None) -> Buffers:
        """Buffers for a tracker with ``caps`` (None: one with a shadow)."""
        caps = caps or SHADOW_CAPS
        # Touched once here, so the stopped window never takes their page faults.
        staging = np.ones((staging_pages(n_pages, caps), PAGE), dtype=np.uint8)
        prev_pages = len(staging) if caps.gives_previous else 0
        return cls(
            staging=staging,
            prev=np.ones((prev_pages, PAGE), dtype=np.uint8),
            index=np.zeros(n_pages, dtype=np.int64),
        )

    @property
    def nbytes(self) -> int:
        return self.staging.nbytes + self.prev.nbytes + self.index.nbytes


__all__ = ["BATCH_PAGES", "Buffers", "EpochSender", "staging_pages"]
