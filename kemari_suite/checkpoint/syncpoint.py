"""Sync points, the primary's side: when to take one, and taking it.

::

    wait_trigger ─(pipelining: pre-copy every precopy_period_ms)─► trigger ─► sync_point:
      StoppedWindow.run (stop, capture, scan, stage, epoch switch, cont?)
      ─► sender: pages, device state, I/O log, end ─► open the next epoch
      ─► classic: wait for the ack, then cont │ speculative: metrics, then the ack

The initial synchronization is an epoch of kind FULL: every page while the guest
runs, the built-in disk copy, pre-copy rounds until few pages change, then an
ordinary sync point closes it. After a planned switchover it is a DELTA instead when
the standby proves it keeps the checkpoint this host resumed (:mod:`.baseline`): no
full copy, only the pages the guest changed since (its tracker was armed before the
resume), the disk's dirty blocks, and the sync point.

No exit leaves the guest stopped by accident. A failure while it is stopped (a step of
the window, the send or the acknowledgement in classic mode) resumes it at once: the
epoch was never acknowledged, so its output stays held and running on is safe; the
error then goes to the loss path, which decides about that output (released only once
the tiebreaker agrees, or held). A QEMU that cannot be resumed, or that does not answer
``stop``, ``cont`` or the capture in ``vm.qmp_timeout_ms``, is killed: a host failure
(:func:`~.loss.host_failure`), never a stopped guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from kemari_suite.checkpoint import baseline, diskcopy, loss
from kemari_suite.checkpoint.forward import FrameForwarder
from kemari_suite.checkpoint.peer import PeerSession
from kemari_suite.checkpoint.window import QMPTimeout, WindowError, WindowResult
from kemari_suite.protocol import wire
from kemari_suite.service.metrics import CheckpointMetrics, qemu_pause
from kemari_suite.testing import faults

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from kemari_suite.checkpoint.primary import PrimaryAgent
    from kemari_suite.checkpoint.tracker import DirtyTracker

#: Pipelining pre-copies between sync points only when the last epoch was this dirty.
PRECOPY_MIN_PAGES = 256
#: A pre-copy pass whose pages took more than this on the link (bytes per page after
#: compression: incompressible memory) is the epoch's last. Every pass resends what the
#: guest rewrote since the one before; ``kemari bench memsync`` at cf59d16, before this
#: rule, gave guest throughput 0.52 / 0.64 (1g / 10g) with passes every 25 ms against
#: 0.77 / 0.79 without, for incompressible pages; compressible ones (17 bytes a page)
#: lost 0-2 points. With the rule (benchmarks/results/memsync.md) 10g came out ahead.
PRECOPY_MAX_BYTES_PER_PAGE = 1024


def precopy_on(setting: bool | str, tracker: DirtyTracker) -> bool:
    """``replication.pipelining`` for this tracker: "auto" pre-copies when its scan
    follows the dirty set (no shadow to compare: uffd-wp), not when it compares one."""
    if setting == "auto":
        return not tracker.caps.keeps_shadow
    return bool(setting)


def precopy_schedule(last_sync: float, interval_s: float, period_s: float) -> list[float]:
    """When pre-copy passes run after a sync point at ``last_sync`` (monotonic seconds):
    once half-way through the interval (``period_s`` 0), else every period until the
    interval ends (``replication.precopy_period_ms``)."""
    if period_s <= 0:
        return [last_sync + interval_s / 2]
    n = int(interval_s / period_s - 1e-9)
    return [last_sync + period_s * i for i in range(1, n + 1)]


class SyncPoints:
    """Takes the primary's sync points; one at a time (its lock)."""

    def __init__(self, agent: PrimaryAgent) -> None:
        self.agent = agent
        self.lock = asyncio.Lock()
        self.last_sync = time.monotonic()
        self.last_dirty = 0

    @property
    def precopy(self) -> bool:
        """Whether pages are pre-copied between sync points (``replication.pipelining``)."""
        tracker = self.agent.tracker
        return tracker is not None and precopy_on(self.agent.rcfg.pipelining, tracker)

    async def wait_trigger(self, session: PeerSession) -> str:
        """Wait for a sync trigger; meanwhile pre-copy dirty pages (pipelining)."""
        a = self.agent
        interval = a.rcfg.max_interval_ms / 1000
        deadline = self.last_sync + interval
        if self.precopy and self.last_dirty >= PRECOPY_MIN_PAGES:
            # Send what changed so far, half-way or every period: the stop then carries
            # only what changed after the last pass.
            period = a.rcfg.precopy_period_ms / 1000
            for at in precopy_schedule(self.last_sync, interval, period):
                why = await a.triggers.wait_until(at)
                if why is not None:
                    return why
                if session.lost.is_set() or a.stopping:
                    break
                pages, sent = await self.precopy_pass()
                if pages and sent > pages * PRECOPY_MAX_BYTES_PER_PAGE:
                    break
        why = await a.triggers.wait_until(deadline)
        a.triggers.clear()
        return why or "interval"

    async def precopy_pass(self) -> tuple[int, int]:
        """Send the pages dirtied so far into the open epoch, with the guest running;
        the pages and the bytes it sent."""
        a = self.agent
        assert a.ram is not None and a.tracker is not None and a.sender is not None
        assert a.buffers is not None
        async with self.lock:
            pages, sent = a.sender.precopied, a.sender.precopy_bytes
            await a.sender.precopy_round(a.tracker, a.ram.pages, a.buffers)
            return a.sender.precopied - pages, a.sender.precopy_bytes - sent

    async def first_epoch_kind(self) -> tuple[wire.EpochKind, str]:
        """FULL, or DELTA on the standby's kept switchover checkpoint when it is the one
        this host resumed (:func:`.baseline.delta_refusal`); with why not. The baseline
        serves once: a later synchronization (a reconnection) is FULL."""
        a = self.agent
        ours, a.baseline = a.baseline, None
        if ours is None:
            return wire.EpochKind.FULL, "no switchover checkpoint resumed here"
        why = baseline.delta_refusal(ours, await baseline.peer_ram_state(a))
        if why == baseline.DIGEST_MISMATCH:
            # The same checkpoint, other bytes: one host's copy was not exact. The full
            # copy replaces the standby's; never a silent delta.
            log.error("switchover epoch %d: %s; sending a full copy", ours.epoch, why)
            a.artifacts.event("switchover-digest-mismatch", epoch=ours.epoch, reason=why)
        return (wire.EpochKind.FULL, why) if why else (wire.EpochKind.DELTA, "")

    async def initial_sync(self) -> None:
        """Iterative pre-copy of all RAM while the VM runs (or, after a switchover, the
        pages changed since the resume), then the first checkpoint."""
        a = self.agent
        assert a.ram is not None and a.tracker is not None and a.sender is not None
        assert a.buffers is not None
        epoch = a.epoch + 1
        # Decided before protection starts: the wait for the standby's word holds no output.
        kind, why = await self.first_epoch_kind()
        t0 = time.monotonic()
        if a.io is not None:
            # From here on writes are logged (in this epoch) and output is held; the
            # frames the guest receives are copied to the standby (:mod:`.forward`).
            link = a.session.link if a.session is not None else None
            await a.io.protect(epoch, forward=FrameForwarder(link) if link else None)
        # The writes a HELD bound paused the guest for are on the disk now.
        await a.held.resume("a secondary is back: the held writes are applied")
        await a.sender.begin(epoch, kind)
        if kind is wire.EpochKind.FULL:
            await self._full_copy()
        # The disk copy is taken while no committed write can reach the disk (the tap
        # logs them in this epoch; they follow in its I/O log).
        await diskcopy.send_copy(a, epoch)
        await a.sender.converge(a.tracker, a.ram.pages, a.buffers)
        a.epoch = epoch
        await self.sync_point("initial")
        a.initial_sync = {
            "mode": "full" if kind is wire.EpochKind.FULL else "delta",
            "reason": why,
            "epoch": epoch,
            # Pre-copied and stop-time pages of the epoch.
            "pages": self.last_dirty,
            "ram_pages": a.ram.n_pages,
            "ms": round((time.monotonic() - t0) * 1e3, 1),
        }
        a.artifacts.event("initial-sync", **a.initial_sync)

    async def _full_copy(self) -> None:
        """Round 0 of a FULL initial sync: every page, the guest resumed at once if a
        tracker's reset stops it and the copy fails."""
        a = self.agent
        assert a.ram is not None and a.tracker is not None and a.sender is not None
        assert a.buffers is not None and a.window is not None
        window = a.window
        stopped = False

        async def stop() -> None:
            nonlocal stopped
            stopped = True
            await window.qmp("stop")

        async def cont() -> None:
            nonlocal stopped
            await window.qmp("cont")
            stopped = False

        try:
            await a.sender.full_copy(a.tracker, a.ram.pages, a.buffers, stop=stop, cont=cont)
        except Exception as err:
            if stopped:
                await self.resume_guest(f"the initial copy failed: {err}", hung=_hung(err))
            raise

    async def sync_point(self, trigger: str, *, resume: bool = True) -> None:
        """Take one sync point; returns once its epoch is acknowledged.

        Without ``resume`` (a switchover, a guest that stopped) the VM stays stopped.

        Raises:
            ReplicationError: the window, the link or the acknowledgement failed.
        """
        a = self.agent
        assert a.window is not None and a.tracker is not None and a.sender is not None
        assert a.session is not None and a.buffers is not None and a.ram is not None
        async with self.lock:
            epoch = a.epoch
            classic = a.rcfg.mode == "classic" or not resume

            def switch_epoch() -> None:
                # The epoch switches here, while the VM is stopped: every write from
                # now on belongs to the next epoch.
                a.epoch = epoch + 1
                if a.io is not None:
                    a.io.switch_epoch(epoch + 1)
                a.sched.started(epoch)

            try:
                w = await a.window.run(resume=not classic, while_stopped=switch_epoch)
            except WindowError as err:
                if err.hung or (err.stopped and resume):
                    # The epoch never closed, so its output is still held: running the
                    # guest on is safe, leaving it stopped is not an outcome.
                    await self.resume_guest(
                        str(err), hung=err.hung, cancel_capture=err.step == "capture"
                    )
                raise
            try:
                sent, enc_s, t_sent, ack, (precopied, precopy_bytes) = await self._send(w, epoch)
                t_resume = w.t_end
                if w.spilled and not classic:
                    # Sent from RAM while stopped: resume now, the ack comes later.
                    await a.window.cont()
                    t_resume = time.perf_counter()
                if classic:
                    faults.hit("ack-wait")
                    await a.session.wait_ack(ack, epoch)
                    if resume:
                        await a.window.cont()
                    t_resume = time.perf_counter()
            except Exception as err:
                if (classic or w.spilled) and resume:
                    # Stopped since the window: the epoch is not acknowledged (its output
                    # stays held) or the cont itself failed.
                    await self.resume_guest(str(err), hung=_hung(err))
                raise
        m = self._metrics(w, epoch, trigger, sent, enc_s, t_sent, t_resume, classic)
        m.precopied_pages, m.precopy_bytes = precopied, precopy_bytes
        self.last_dirty = w.dirty_pages + precopied
        if not classic:
            faults.hit("ack-wait")
            await a.session.wait_ack(ack, epoch)
        m.ack_ms = (time.perf_counter() - t_sent) * 1e3
        a.checkpoints += 1
        a.artifacts.checkpoint(m)

    async def _send(
        self, w: WindowResult, epoch: int
    ) -> tuple[int, float, float, asyncio.Future[int], tuple[int, int]]:
        """Send the closed epoch and open the next: (bytes, encode s, t_sent, its ack,
        (pages, bytes) pre-copied into it)."""
        a = self.agent
        assert a.tracker is not None and a.sender is not None and a.buffers is not None
        faults.hit("window-send")
        # The epoch switched while stopped, so writes from now on are logged in the
        # next one: serializing this epoch's log need not keep the guest stopped.
        io_log = a.io.io_log(epoch) if a.io is not None else b""
        # The shadow (the XOR base) changes only at commit, so reading it now is as
        # good as inside the window.
        assert a.ram is not None
        if w.staged is None:
            # A spill: more dirty pages than the staging buffer holds, the guest stopped.
            sent, enc_s = await a.sender.from_ram(a.tracker, a.ram.pages, w.idx, a.buffers)
        else:
            prev = a.tracker.previous(w.idx, a.buffers.prev)
            sent, enc_s = await a.sender.pages(w.idx, w.staged, prev)
            a.tracker.commit(w.idx, w.staged)
        sent += await a.sender.end(n_pages=w.dirty_pages, devstate=w.devstate, io_log=io_log)
        t_sent = time.perf_counter()
        faults.hit("before-ack")
        precopied = a.sender.precopied, a.sender.precopy_bytes
        ack = a.acks.future(epoch)
        # Open the next epoch at once so pre-copied pages have somewhere to go.
        await a.sender.begin(epoch + 1, wire.EpochKind.DELTA)
        self.last_sync = time.monotonic()
        return sent, enc_s, t_sent, ack, precopied

    async def resume_guest(self, why: str, *, hung: bool, cancel_capture: bool = False) -> None:
        """Resume a guest a failure left stopped; its unacknowledged output stays held.

        ``cancel_capture`` first cancels a device-state migration the failure may have
        left running (``cont`` is refused while it runs); a refused ``cont`` is retried
        once after such a cancel. A ``cont`` refused because the guest stopped itself
        (powered off, panicked) leaves it down: that is the guest's event, not a failure.

        Raises:
            FailoverError: QEMU is hung (``hung``, or ``cont`` unanswered) or refused
                ``cont`` twice: it was killed, a host failure (the agent's run ends).
        """
        a = self.agent
        assert a.window is not None
        for attempt in range(0 if hung else 2):
            try:
                if cancel_capture or attempt:
                    with contextlib.suppress(Exception):
                        await a.window.qmp("migrate_cancel")
                await a.window.qmp("cont")
            except QMPTimeout as err:
                why = f"{why}; then {err}"
                break
            except Exception as err:
                status = await a.window.self_stopped()
                if status:
                    # Refused because the guest powered off (or panicked) meanwhile:
                    # no host failure, its own event ends protection (.guestevents).
                    a.artifacts.event("guest-stopped-itself", reason=why, status=status)
                    return
                if attempt:
                    why = f"{why}; then cont failed: {err}"
            else:
                a.artifacts.event("guest-resumed", reason=why, state=a.state.value)
                return
        await loss.host_failure(a, why)

    def _metrics(
        self,
        w: WindowResult,
        epoch: int,
        trigger: str,
        sent: int,
        enc_s: float,
        t_sent: float,
        t_resume: float,
        classic: bool,
    ) -> CheckpointMetrics:
        m = CheckpointMetrics(
            epoch=epoch,
            trigger=trigger,
            pause_ms=(t_resume - w.t_start) * 1e3,
            stop_ms=w.stop_ms,
            devstate_ms=w.devstate_ms,
            scan_ms=w.scan_ms,
            stage_ms=w.stage_ms,
            dirty_pages=w.dirty_pages,
            devstate_bytes=len(w.devstate),
            bytes_sent=sent,
            encode_ms=enc_s * 1e3,
            transfer_ms=max(0.0, (t_sent - t_resume) * 1e3) if not classic else 0.0,
            t_wall=time.time(),
            tracker=self.agent.tracker.name if self.agent.tracker is not None else "",
        )
        qp = qemu_pause(self.agent.vm.events, w.t_start_wall - 0.01)
        if qp is not None:
            m.stopped_at, m.guest_pause_ms = qp[0], qp[1] * 1e3
        return m


def _hung(err: BaseException) -> bool:
    return isinstance(err, QMPTimeout) or (isinstance(err, WindowError) and err.hung)


__all__ = [
    "PRECOPY_MAX_BYTES_PER_PAGE",
    "PRECOPY_MIN_PAGES",
    "SyncPoints",
    "precopy_on",
    "precopy_schedule",
]
