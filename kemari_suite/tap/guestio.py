"""The guest's I/O on one host: the block tap (NBD) and the network frame proxy.

Both agents use it. On the primary it starts UNPROTECTED, turns PROTECTED when a
secondary starts receiving, logs writes per epoch, applies an epoch's writes once the
epoch is acknowledged, and releases the epoch's network output once the writes it needs
are durable. On the secondary, at failover, it is started UNPROTECTED (write-through) on
the secondary's own disk and TAP before the guest resumes.

The guest disk is the configured backend (:func:`kemari_suite.disk.open_backend`),
attached and promoted: the tap writes committed epochs straight into it. This module
never names a backend; it asks the backend's capabilities (``streams_copy``: the engine
streams the disk to the standby; ``tracks_dirty``: the blocks written while no standby
receives them are recorded for an incremental resync).

The open epoch is pushed: the engine calls :meth:`GuestIO.switch_epoch` inside the
stopped window, where the epoch number switches (and gives the first one to the
constructor or to :meth:`GuestIO.protect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
from collections.abc import Callable
from typing import Any

from kemari_suite.config import KemariConfig
from kemari_suite.disk import DiskBackend, DiskRole, Extent, open_backend
from kemari_suite.errors import TapError
from kemari_suite.tap import (
    BlockTap,
    FrameProxy,
    NBDServer,
    SyncScheduler,
    TapMode,
    open_tap,
)
from kemari_suite.tap.events import EventSink, InboundSink
from kemari_suite.tap.outputs import check_wired
from kemari_suite.vm.qemu import VMPaths, VMSpec, io_paths

log = logging.getLogger(__name__)


def open_guest_disk(cfg: KemariConfig) -> DiskBackend | None:
    """The configured disk, attached and promoted on this host (the one that runs the
    guest), or None when the VM has no disk.

    Raises:
        ConfigError: the disk is missing or misconfigured.
        DiskError: it cannot be attached, or the backend refuses the promotion.
    """
    disk = open_backend(cfg, role=DiskRole.PRIMARY)
    if disk is None:
        return None
    try:
        disk.attach()
        disk.promote()
    except BaseException:
        disk.close()
        raise
    return disk


class GuestIO:
    """Taps of one VM on one host; see the module docstring."""

    def __init__(
        self,
        cfg: KemariConfig,
        paths: VMPaths,
        *,
        on_event: EventSink | None,
        mode: TapMode,
        on_durable: Callable[[int], None] | None = None,
        epoch: int = 0,
        disk: DiskBackend | None = None,
    ) -> None:
        """``epoch``: the open epoch until :meth:`switch_epoch`. ``disk``: the guest disk,
        attached and promoted by the caller (GuestIO owns it from now on); by default the
        configured one, opened here with :func:`open_guest_disk`.

        Raises:
            ConfigError, DiskError: as :func:`open_guest_disk`.
        """
        self.cfg = cfg
        self.paths = io_paths(paths)
        self.disk: DiskBackend | None = disk if disk is not None else open_guest_disk(cfg)
        #: Identity of the disk copy the secondary holds (new for every full copy).
        self.lineage = ""
        #: Last epoch the secondary acknowledged before it was lost.
        self.acked_at_loss = -1
        self._epoch = epoch
        self.on_event = on_event
        self.on_durable = on_durable
        self.mode = mode
        self.block: BlockTap | None = None
        self.nbd: NBDServer | None = None
        self.net: FrameProxy | None = None
        self._released = -1
        self._released_changed = asyncio.Event()
        self._release_q: asyncio.Queue[int] = asyncio.Queue()
        self._release_task: asyncio.Task[None] | None = None

    @property
    def tapped(self) -> bool:
        return self.disk is not None or bool(self.cfg.tap.host_tap)

    async def start(self, spec: VMSpec) -> VMSpec:
        """Start the servers QEMU connects to; return the spec wired to them.

        Raises:
            TapError: the TAP device is busy or missing, or the spec has an untapped output.
        """
        self.paths.nbd.parent.mkdir(parents=True, exist_ok=True)
        netdev = spec.netdev
        blockdev = spec.blockdev
        if self.disk is not None:
            self.block = BlockTap(
                self.disk,
                epoch=self._epoch,
                mode=self.mode,
                on_event=self.on_event,
                on_durable=self.on_durable,
            )
            self.nbd = NBDServer(self.block, self.paths.nbd, export_name="disk0")
            await self.nbd.start()
            blockdev = f"driver=nbd,server.type=unix,server.path={self.paths.nbd},export=disk0"
        if self.cfg.tap.host_tap:
            dev = open_tap(self.cfg.tap.host_tap)
            self.net = FrameProxy(
                self.paths.net,
                dev,
                epoch=self._epoch,
                mode=self.mode,
                on_event=self.on_event,
                hold_limit_bytes=self.cfg.tap.hold_limit_mib << 20,
            )
            # QEMU connects once and never retries: listen before it starts.
            await self.net.start()
            netdev = f"stream,server=off,addr.type=unix,addr.path={self.paths.net}"
        spec = spec.replace(netdev=netdev, blockdev=blockdev)
        if spec.runas:
            # QEMU may connect after it changed user (-runas): the sockets are its.
            pw = pwd.getpwnam(spec.runas)
            for sock in (
                self.paths.nbd if self.nbd else None,
                self.paths.net if self.net else None,
            ):
                if sock is not None:
                    os.chown(sock, pw.pw_uid, pw.pw_gid)
        if self.tapped:
            check_wired(
                self.cfg,
                spec,
                net_socket=self.paths.net if self.net else None,
                nbd_socket=self.paths.nbd if self.block else None,
            )
        self._release_task = asyncio.create_task(self._releaser())
        return spec

    def rebind(
        self,
        *,
        on_event: EventSink | None,
        on_durable: Callable[[int], None] | None,
        epoch: int | None = None,
    ) -> None:
        """Hand the running taps to a new owner (a standby that becomes the primary),
        whose open epoch is ``epoch`` (unchanged when None).

        Raises:
            TapError: ``epoch`` is older than the open epoch (the taps keep their owner).
        """
        if epoch is not None:
            self.switch_epoch(epoch)
        self.on_event = on_event
        self.on_durable = on_durable
        if self.block is not None:
            self.block.on_event = on_event
            self.block.on_durable = on_durable
        if self.net is not None:
            self.net.on_event = on_event

    # ---- epochs ------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The open epoch: guest writes are logged and frames held in it (PROTECTED)."""
        return self._epoch

    def switch_epoch(self, epoch: int) -> None:
        """The primary's open epoch is now ``epoch``: every guest write and frame from
        now on belongs to it. Call it inside the stopped window, where the epoch number
        switches (no I/O, no await).

        Raises:
            TapError: ``epoch`` is older than the open epoch (epochs never go back).
        """
        if epoch < self._epoch:
            raise TapError("guestio", f"epoch {epoch} after epoch {self._epoch}: never back")
        self._epoch = epoch
        if self.block is not None:
            self.block.switch_epoch(epoch)
        if self.net is not None:
            self.net.switch_epoch(epoch)

    # ---- modes -------------------------------------------------------------------------

    async def protect(
        self, epoch: int | None = None, *, forward: InboundSink | None = None
    ) -> None:
        """A secondary starts receiving: log writes, hold output from now on, in the
        open epoch (``epoch`` when given: the first epoch the secondary gets), and hand
        copies of the frames delivered to the guest to ``forward`` (for the standby's
        replay at a failover; None: no copies).

        Writes still in the log from an earlier protection are applied first (the new
        secondary gets a full copy of the disk as it is then).

        Raises:
            TapError: ``epoch`` is older than the open epoch, or the disk failed.
        """
        if epoch is not None:
            self.switch_epoch(epoch)
        if self.block is not None:
            if self.block.log.pending_epochs():
                # Epochs the lost secondary never acknowledged: written through now, and
                # remembered as dirty for the next resynchronisation.
                if self.disk is not None:
                    self.disk.tracking = True
                await self.block.set_unprotected()
            self.block.set_protected()
            # Write-throughs still queued land tracked (the resync sends their blocks),
            # and before any disk copy reads.
            await self.block.write_through_idle()
            if self.disk is not None:
                self.disk.tracking = False
        if self.net is not None:
            self.net.forward = forward
            self.net.set_protected()
        self.mode = TapMode.PROTECTED

    async def unprotect(self) -> None:
        """No secondary (tiebreaker won): write through, release everything held."""
        if self.disk is not None:
            self.disk.tracking = True
        if self.block is not None:
            await self.block.set_unprotected()
        if self.net is not None:
            self.net.forward = None
            self.net.set_unprotected()
        self.mode = TapMode.UNPROTECTED

    def inject(self, frames: list[bytes]) -> int:
        """Replay guest-bound frames kept on the standby into the resumed guest (see
        :meth:`FrameProxy.inject`); returns how many reached QEMU (0 without a NIC)."""
        return self.net.inject(frames) if self.net is not None else 0

    # ---- commit and release ------------------------------------------------------------

    def io_log(self, epoch: int) -> bytes:
        return self.block.io_log(epoch) if self.block is not None else b""

    def logged_bytes(self, epoch: int) -> int:
        """Bytes of disk writes logged in ``epoch`` so far (0 once it is applied)."""
        rec = self.block.log.record(epoch) if self.block is not None else None
        return rec.data_bytes if rec is not None else 0

    def committed(self, epoch: int) -> None:
        """Epoch ``epoch`` is acknowledged: apply its writes, then release its output."""
        if self.block is not None:
            self.block.commit_epoch(epoch)
        self._release_q.put_nowait(epoch)

    async def _releaser(self) -> None:
        """Release output in acknowledgement order, once the epoch's writes are durable."""
        while True:
            epoch = await self._release_q.get()
            try:
                if self.block is not None:
                    await self.block.output_ready(epoch)
            except TapError as err:
                # The disk failed: never release output whose writes are not durable.
                log.error("output of epoch %d stays held: %s", epoch, err)
                continue
            if self.net is not None:
                self.net.release(epoch)
            self._released = epoch
            self._released_changed.set()

    async def released(self, epoch: int) -> None:
        """Return once the output of every epoch through ``epoch`` is released (its
        acknowledgement came and its writes are durable)."""
        while self._released < epoch:
            self._released_changed.clear()
            await self._released_changed.wait()

    # ---- the disk copy (caps.streams_copy / tracks_dirty) -------------------------------

    @property
    def streams_copy(self) -> bool:
        """The engine streams this disk to the standby (a full or incremental copy in
        the FULL epoch, then every committed epoch's I/O log)."""
        return self.disk is not None and self.disk.caps.streams_copy

    def disk_chunks(self) -> list[Extent]:
        """(offset, length) of the chunks of a full disk copy (none unless
        ``streams_copy``)."""
        return self.disk.copy_chunks() if self.disk is not None else []

    def dirty_chunks(self) -> list[Extent]:
        """(offset, length) of the blocks written while no secondary received them."""
        return self.disk.dirty_chunks() if self.disk is not None else []

    def clear_dirty(self) -> None:
        """The epoch that carried the dirty blocks committed: the standby has them."""
        if self.disk is not None:
            self.disk.clear_dirty()

    def remember(self, epoch: int) -> None:
        """Record (crash-safely) that this disk is copy ``lineage`` through ``epoch``
        (after a switchover: the peer's copy as of then), where the disk keeps a sidecar.

        Raises:
            DiskError: the flush or the sidecar write failed.
        """
        if self.disk is not None and self.disk.caps.has_sidecar and self.lineage:
            self.disk.write_state(self.lineage, epoch)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode.value,
            "epoch": self.epoch,
            "released_through": self._released,
            "disk": self.disk.name if self.disk is not None else None,
        }
        if self.block is not None:
            out["block"] = self.block.status()
        if self.net is not None:
            out["net"] = self.net.status()
        return out

    async def close(self) -> None:
        if self._release_task is not None:
            self._release_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._release_task
        if self.net is not None:
            with contextlib.suppress(Exception):
                await _maybe_await(self.net.close())
        if self.nbd is not None:
            with contextlib.suppress(Exception):
                await _maybe_await(self.nbd.close())
        if self.block is not None:
            with contextlib.suppress(Exception):
                await _maybe_await(self.block.close())
        if self.disk is not None:
            with contextlib.suppress(Exception):
                self.disk.close()


async def _maybe_await(x: object) -> None:
    if asyncio.iscoroutine(x):
        await x


def make_scheduler(cfg: KemariConfig) -> SyncScheduler:
    from kemari_suite.tap import make_policy

    return SyncScheduler(
        make_policy(
            cfg.tap.policy,
            max_interval_ms=cfg.replication.max_interval_ms,
            remus_interval_ms=cfg.tap.remus_interval_ms,
            adaptive_min_spacing_ms=cfg.tap.adaptive_min_spacing_ms,
            epoch_log_limit_mib=cfg.tap.epoch_log_limit_mib,
        )
    )


__all__ = ["GuestIO", "make_scheduler", "open_guest_disk"]
