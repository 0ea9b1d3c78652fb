"""Sync points, the primary's side: when to take one, and taking it.

::

    wait_trigger ─(pipelining: pre-copy half-way)─► trigger ─► sync_point:
      StoppedWindow.run (stop, capture, scan, stage, epoch switch, cont?)
      ─► sender: pages, device state, I/O log, end ─► open the next epoch
      ─► classic: wait for the ack, then cont │ speculative: metrics, then the ack

The initial synchronization is an epoch of kind FULL: every page while the guest
runs, the built-in disk copy, pre-copy rounds until few pages change, then an
ordinary sync point closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from kemari_suite.checkpoint import diskcopy
from kemari_suite.checkpoint.peer import PeerSession
from kemari_suite.checkpoint.window import WindowError, WindowResult
from kemari_suite.protocol import wire
from kemari_suite.service.metrics import CheckpointMetrics, qemu_pause
from kemari_suite.testing import faults

if TYPE_CHECKING:
    from kemari_suite.checkpoint.primary import PrimaryAgent

#: Pipelining pre-copies between sync points only when the last epoch was this dirty.
PRECOPY_MIN_PAGES = 256


class SyncPoints:
    """Takes the primary's sync points; one at a time (its lock)."""

    def __init__(self, agent: PrimaryAgent) -> None:
        self.agent = agent
        self.lock = asyncio.Lock()
        self.last_sync = time.monotonic()
        self.last_dirty = 0

    async def wait_trigger(self, session: PeerSession) -> str:
        """Wait for a sync trigger; meanwhile pre-copy dirty pages (pipelining)."""
        a = self.agent
        interval = a.rcfg.max_interval_ms / 1000
        deadline = self.last_sync + interval
        if a.rcfg.pipelining and self.last_dirty >= PRECOPY_MIN_PAGES:
            # Half-way through the interval, send what changed so far: the stop then
            # carries only what changes after this.
            why = await a.triggers.wait_until(self.last_sync + interval / 2)
            if why is not None:
                return why
            if not session.lost.is_set() and not a.stopping:
                await self.precopy_pass()
        why = await a.triggers.wait_until(deadline)
        a.triggers.clear()
        return why or "interval"

    async def precopy_pass(self) -> None:
        """Send the pages dirtied so far into the open epoch, with the guest running."""
        a = self.agent
        assert a.ram is not None and a.tracker is not None and a.sender is not None
        assert a.buffers is not None
        async with self.lock:
            await a.sender.precopy_round(a.tracker, a.ram.pages, a.buffers)

    async def initial_sync(self) -> None:
        """Iterative pre-copy of all RAM while the VM runs, then the first checkpoint."""
        a = self.agent
        assert a.ram is not None and a.tracker is not None and a.sender is not None
        assert a.buffers is not None
        epoch = a.epoch + 1
        if a.io is not None:
            # From here on writes are logged (in this epoch) and output is held.
            await a.io.protect(epoch)
        await a.sender.begin(epoch, wire.EpochKind.FULL)

        async def stop() -> None:
            await a.vm.execute("stop")

        async def cont() -> None:
            await a.vm.execute("cont")

        await a.sender.full_copy(a.tracker, a.ram.pages, a.buffers, stop=stop, cont=cont)
        # The disk copy is taken while no committed write can reach the disk (the tap
        # logs them in this epoch; they follow in its I/O log).
        await diskcopy.send_copy(a, epoch)
        await a.sender.converge(a.tracker, a.ram.pages, a.buffers)
        a.epoch = epoch
        await self.sync_point("initial")

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
                if err.stopped and resume:
                    # The epoch never closed, so its output is still held: running the
                    # guest on is safe, leaving it stopped is not an outcome.
                    with contextlib.suppress(Exception):
                        await a.vm.execute("cont")
                raise
            # The epoch switched while stopped, so writes from now on are logged in the
            # next one: serializing this epoch's log need not keep the guest stopped.
            io_log = a.io.io_log(epoch) if a.io is not None else b""
            # The shadow (the XOR base) changes only at commit, so reading it now is as
            # good as inside the window.
            prev = a.tracker.previous(w.idx, a.buffers.prev)
            sent, enc_s = await a.sender.pages(w.idx, w.staged, prev)
            a.tracker.commit(w.idx, w.staged)
            sent += await a.sender.end(n_pages=w.dirty_pages, devstate=w.devstate, io_log=io_log)
            t_sent = time.perf_counter()
            faults.hit("before-ack")
            # Open the next epoch at once so pre-copied pages have somewhere to go.
            precopied, precopy_bytes = a.sender.precopied, a.sender.precopy_bytes
            await a.sender.begin(epoch + 1, wire.EpochKind.DELTA)
            self.last_sync = time.monotonic()
            ack = a.acks.future(epoch)
            t_resume = w.t_end
            if classic:
                await a.session.wait_ack(ack, epoch)
                if resume:
                    await a.vm.execute("cont")
                t_resume = time.perf_counter()
        m = self._metrics(w, epoch, trigger, sent, enc_s, t_sent, t_resume, classic)
        m.precopied_pages, m.precopy_bytes = precopied, precopy_bytes
        self.last_dirty = w.dirty_pages + precopied
        if not classic:
            await a.session.wait_ack(ack, epoch)
        m.ack_ms = (time.perf_counter() - t_sent) * 1e3
        a.checkpoints += 1
        a.artifacts.checkpoint(m)

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
            transfer_ms=(t_sent - t_resume) * 1e3 if not classic else 0.0,
            t_wall=time.time(),
        )
        qp = qemu_pause(self.agent.vm.events, w.t_start_wall - 0.01)
        if qp is not None:
            m.stopped_at, m.guest_pause_ms = qp[0], qp[1] * 1e3
        return m


__all__ = ["SyncPoints"]
