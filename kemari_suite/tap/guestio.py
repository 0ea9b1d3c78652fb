"""The guest's I/O on one host: the block tap (NBD) and the network frame proxy.

Both agents use it. On the primary it starts UNPROTECTED, turns PROTECTED when a
secondary starts receiving, logs writes per epoch, applies an epoch's writes once the
epoch is acknowledged, and releases the epoch's network output once the writes it needs
are durable. On the secondary, at failover, it is started UNPROTECTED (write-through) on
the secondary's own disk and TAP before the guest resumes.

The guest disk's backend is chosen by ``disk.backend``:

- ``builtin``: a raw image file per host; committed writes reach the secondary's copy
  through the IOLog of each epoch, and the initial synchronization copies the disk.
- ``shared``: one device both hosts see (FC LUN, iSCSI, a shared file); committed writes
  go to it, and the secondary replays committed-but-not-applied logs at failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kemari_suite.config import KemariConfig
from kemari_suite.disk.base import FileDisk
from kemari_suite.disk.shared import SHARED_RESERVED_BYTES
from kemari_suite.errors import ConfigError, TapError
from kemari_suite.tap import (
    BlockTap,
    FrameProxy,
    NBDServer,
    SyncScheduler,
    TapMode,
    check_tapped,
    open_tap,
)
from kemari_suite.tap.events import EpochSource, EventSink
from kemari_suite.vm.qemu import VMPaths, VMSpec, io_paths

log = logging.getLogger(__name__)

#: Size of one chunk of the initial disk copy (one IOLog frame each).
DISK_COPY_CHUNK = 4 << 20
#: Granularity of the dirty-block bitmap that resynchronises a returning secondary.
RESYNC_BLOCK = 64 << 10


class TrackedDisk:
    """A disk backend that records which blocks were written while ``tracking``.

    Tracking is on while no secondary receives the writes (unprotected, or draining the
    log of epochs a lost secondary never acknowledged), so a returning secondary that
    still holds our copy gets only those blocks.
    """

    def __init__(self, disk: FileDisk) -> None:
        self.disk = disk
        self.tracking = False
        self.size = int(disk.size)
        n = (self.size + RESYNC_BLOCK - 1) // RESYNC_BLOCK
        self.dirty = bytearray(n)

    def read(self, offset: int, length: int) -> bytes:
        return self.disk.read(offset, length)

    def apply(self, writes: Sequence[tuple[int, bytes]]) -> None:
        self.disk.apply(writes)
        if self.tracking:
            for offset, data in writes:
                first = offset // RESYNC_BLOCK
                last = (offset + max(1, len(data)) - 1) // RESYNC_BLOCK
                for b in range(first, min(last, len(self.dirty) - 1) + 1):
                    self.dirty[b] = 1

    def flush(self) -> None:
        self.disk.flush()

    def close(self) -> None:
        self.disk.close()

    def dirty_blocks(self) -> list[int]:
        return [i for i, d in enumerate(self.dirty) if d]

    def clear(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            self.dirty[b] = 0


def open_disk(cfg: KemariConfig) -> FileDisk | None:
    """The guest disk's backend on this host, or None when the VM has no disk.

    Raises:
        ConfigError: the disk file is missing.
    """
    d = cfg.disk
    if not d.path:
        return None
    if not Path(d.path).exists():
        raise ConfigError(f"{d.path} does not exist", key="disk.path")
    if d.backend == "shared":
        # The lease lives in the reserved first MiB when it shares the device.
        offset = SHARED_RESERVED_BYTES if d.lease_device in ("", d.path) else 0
        disk = FileDisk(d.path, offset=offset)
    else:
        # builtin: this host's own image; drbd: the /dev/drbdN device of this host.
        disk = FileDisk(d.path)
    disk.attach()
    return disk


def disk_state_path(cfg: KemariConfig) -> Path:
    """The sidecar that says which copy the disk is: ``<disk>.kemari.json``."""
    return Path(cfg.disk.path + ".kemari.json")


def write_disk_state(cfg: KemariConfig, lineage: str, epoch: int) -> None:
    """Record that this host's disk is copy ``lineage`` through ``epoch`` (atomically)."""
    path = disk_state_path(cfg)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"lineage": lineage, "epoch": epoch}))
    os.replace(tmp, path)


def read_disk_state(cfg: KemariConfig) -> dict[str, Any]:
    try:
        state = json.loads(disk_state_path(cfg).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


class GuestIO:
    """Taps of one VM on one host; see the module docstring."""

    def __init__(
        self,
        cfg: KemariConfig,
        paths: VMPaths,
        *,
        epoch_source: EpochSource,
        on_event: EventSink | None,
        mode: TapMode,
        on_durable: Callable[[int], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.paths = io_paths(paths)
        raw = open_disk(cfg)
        self.disk: TrackedDisk | None = TrackedDisk(raw) if raw is not None else None
        #: Identity of the disk copy the secondary holds (new for every full copy).
        self.lineage = ""
        #: Last epoch the secondary acknowledged before it was lost.
        self.acked_at_loss = -1
        self.epoch_source = epoch_source
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
                epoch_source=self.epoch_source,
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
                epoch_source=self.epoch_source,
                mode=self.mode,
                on_event=self.on_event,
                hold_limit_bytes=self.cfg.tap.hold_limit_mib << 20,
            )
            # QEMU connects once and never retries: listen before it starts.
            await self.net.start()
            netdev = f"stream,server=off,addr.type=unix,addr.path={self.paths.net}"
        spec = spec.replace(netdev=netdev, blockdev=blockdev)
        if self.tapped:
            check_tapped(
                spec,
                net_socket=self.paths.net if self.net else None,
                nbd_socket=self.paths.nbd if self.block else None,
            )
        self._release_task = asyncio.create_task(self._releaser())
        return spec

    def rebind(
        self,
        *,
        epoch_source: EpochSource,
        on_event: EventSink | None,
        on_durable: Callable[[int], None] | None,
    ) -> None:
        """Hand the running taps to a new owner (a standby that becomes the primary)."""
        self.epoch_source = epoch_source
        self.on_event = on_event
        self.on_durable = on_durable
        if self.block is not None:
            self.block.epoch_source = epoch_source
            self.block.on_event = on_event
            self.block.on_durable = on_durable
        if self.net is not None:
            self.net.epoch_source = epoch_source
            self.net.on_event = on_event

    # ---- modes -------------------------------------------------------------------------

    async def protect(self) -> None:
        """A secondary starts receiving: log writes, hold output from now on.

        Writes still in the log from an earlier protection are applied first (the new
        secondary gets a full copy of the disk as it is then).
        """
        if self.block is not None:
            if self.block.log.pending_epochs():
                # Epochs the lost secondary never acknowledged: written through now, and
                # remembered as dirty for the next resynchronisation.
                if self.disk is not None:
                    self.disk.tracking = True
                await self.block.set_unprotected()
            if self.disk is not None:
                self.disk.tracking = False
            self.block.set_protected()
        if self.net is not None:
            self.net.set_protected()
        self.mode = TapMode.PROTECTED

    async def unprotect(self) -> None:
        """No secondary (tiebreaker won): write through, release everything held."""
        if self.disk is not None:
            self.disk.tracking = True
        if self.block is not None:
            await self.block.set_unprotected()
        if self.net is not None:
            self.net.set_unprotected()
        self.mode = TapMode.UNPROTECTED

    # ---- epochs ------------------------------------------------------------------------

    def io_log(self, epoch: int) -> bytes:
        return self.block.io_log(epoch) if self.block is not None else b""

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

    def disk_chunks(self) -> list[tuple[int, int]]:
        """(offset, length) of the chunks of a full disk copy."""
        if self.disk is None:
            return []
        size = self.disk.size
        return [(o, min(DISK_COPY_CHUNK, size - o)) for o in range(0, size, DISK_COPY_CHUNK)]

    def dirty_chunks(self) -> list[tuple[int, int]]:
        """(offset, length) of the blocks written while no secondary received them."""
        if self.disk is None:
            return []
        size = self.disk.size
        return [
            (b * RESYNC_BLOCK, min(RESYNC_BLOCK, size - b * RESYNC_BLOCK))
            for b in self.disk.dirty_blocks()
        ]

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode.value, "released_through": self._released}
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
        )
    )
