"""GuestIO without QEMU or root: the epoch is pushed into both taps, and writes and
frames land in the epoch that was open when they arrived. The disk is the configured
built-in backend on a temp file, the "TAP" a SOCK_SEQPACKET socketpair."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from kemari_suite.config import DiskConfig, KemariConfig, TapConfig
from kemari_suite.disk import DiskRole, open_backend
from kemari_suite.errors import TapError
from kemari_suite.tap import guestio
from kemari_suite.tap.epochs import parse
from kemari_suite.tap.events import IOEvent, TapMode
from kemari_suite.tap.guestio import GuestIO
from kemari_suite.tap.net import encode_frame
from kemari_suite.tap.tun import TapDevice
from kemari_suite.vm.qemu import VMPaths, VMSpec

SIZE = 1 << 20
TIMEOUT = 10.0


def frame(tag: int) -> bytes:
    return struct.pack("!I", tag) + bytes(56)


class Rig:
    """A GuestIO on a temp image and a fake TAP, with a fake QEMU on the net socket."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        image = tmp / "disk.img"
        with image.open("wb") as f:
            f.truncate(SIZE)
        self.image = image
        self.cfg = KemariConfig(
            disk=DiskConfig(backend="builtin", path=str(image)),
            tap=TapConfig(host_tap="fake0"),
        )
        self.lan, tap_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        os.set_blocking(tap_end.fileno(), False)
        self.lan.setblocking(False)
        dev = TapDevice("fake0", tap_end.detach())
        monkeypatch.setattr(guestio, "open_tap", lambda name: dev)
        self.paths = VMPaths(run_dir=tmp / "run", ram=tmp / "ram")
        self.events: list[tuple[IOEvent, int]] = []
        self.writer: asyncio.StreamWriter | None = None

    def guest_io(self, **kw: object) -> GuestIO:
        return GuestIO(
            self.cfg,
            self.paths,
            on_event=lambda k, e: self.events.append((k, e)),
            mode=TapMode.UNPROTECTED,
            **kw,  # type: ignore[arg-type]
        )

    async def start(self, io: GuestIO) -> None:
        spec = await io.start(VMSpec(name="t", kernel=None, initrd=None))
        assert spec.blockdev is not None and "nbd" in spec.blockdev
        assert spec.netdev is not None and "stream" in spec.netdev
        _, self.writer = await asyncio.open_unix_connection(str(io.paths.net))

    async def send_frame(self, io: GuestIO, tag: int) -> None:
        assert self.writer is not None and io.net is not None
        before = io.net.stats.from_guest_frames
        self.writer.write(encode_frame(frame(tag)))
        await self.writer.drain()
        for _ in range(200):
            if io.net.stats.from_guest_frames > before:
                return
            await asyncio.sleep(0.005)
        raise AssertionError("the proxy never read the frame")

    def lan_frames(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.lan.recv(65536))
            except BlockingIOError:
                return out

    async def close(self, io: GuestIO) -> None:
        if self.writer is not None:
            self.writer.close()
        await io.close()
        self.lan.close()


def run(fn: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await asyncio.wait_for(fn(), TIMEOUT)

    asyncio.run(main())


def test_switch_epoch_routes_writes_and_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path, monkeypatch)

    async def go() -> None:
        io = rig.guest_io(epoch=4)
        assert io.disk is not None and io.disk.name == "builtin" and io.streams_copy
        await rig.start(io)
        try:
            assert io.block is not None and io.net is not None
            assert io.block.epoch == io.net.epoch == io.epoch == 4
            await io.protect(6)  # the first epoch the secondary gets
            await io.block.write(0, b"six")
            await rig.send_frame(io, 1)
            io.switch_epoch(7)  # inside the stopped window
            await io.block.write(4096, b"seven")
            await io.block.flush()
            await rig.send_frame(io, 2)
            assert io.block.log.pending_epochs() == [6, 7]
            assert io.net.held_epochs() == [6, 7]
            assert rig.events == [
                (IOEvent.WRITE, 6),
                (IOEvent.NET, 6),
                (IOEvent.WRITE, 7),
                (IOEvent.FLUSH, 7),
                (IOEvent.NET, 7),
            ]
            assert [op.data for op in parse(io.io_log(6)).ops] == [b"six"]
            assert rig.lan_frames() == []
            # The acknowledgement of 6 releases 6's frame and writes 6's data only.
            io.committed(6)
            await asyncio.wait_for(io.released(6), TIMEOUT)
            await io.block.durable(6)
            assert rig.lan_frames() == [frame(1)]
            assert io.disk.read(0, 3) == b"six" and io.disk.read(4096, 5) == bytes(5)
            with pytest.raises(TapError, match="never back"):
                io.switch_epoch(6)
            assert io.status()["epoch"] == 7
        finally:
            await rig.close(io)

    run(go)


def test_rebind_hands_the_taps_to_a_new_owner_in_its_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A standby that becomes the primary takes over the running taps: its sink gets the
    events from then on, in the epoch it pushes."""
    rig = Rig(tmp_path, monkeypatch)
    mine: list[tuple[IOEvent, int]] = []
    durable: list[int] = []

    async def go() -> None:
        io = rig.guest_io(epoch=3)
        await rig.start(io)
        try:
            assert io.block is not None and io.net is not None
            await io.protect()
            await io.block.write(0, b"a")
            await rig.send_frame(io, 1)
            # No epoch: the open epoch stays.
            io.rebind(on_event=lambda k, e: mine.append((k, e)), on_durable=durable.append)
            assert io.epoch == io.block.epoch == io.net.epoch == 3
            await io.block.write(1, b"b")
            io.rebind(on_event=lambda k, e: mine.append((k, e)), on_durable=durable.append, epoch=9)
            await io.block.write(2, b"c")
            await io.block.flush()
            await rig.send_frame(io, 2)
            assert io.block.log.pending_epochs() == [3, 9]
            assert io.net.held_epochs() == [3, 9]
            assert io.epoch == io.block.epoch == io.net.epoch == 9
            assert rig.events == [(IOEvent.WRITE, 3), (IOEvent.NET, 3)]
            assert mine == [
                (IOEvent.WRITE, 3),
                (IOEvent.WRITE, 9),
                (IOEvent.FLUSH, 9),
                (IOEvent.NET, 9),
            ]
            with pytest.raises(TapError, match="never back"):
                io.rebind(on_event=None, on_durable=None, epoch=8)
            assert io.epoch == 9
            io.committed(3)
            io.committed(9)
            await asyncio.wait_for(io.released(9), TIMEOUT)
            await io.block.durable(9)
            assert durable == [9]  # told to the new owner (9 had a flush)
            assert rig.lan_frames() == [frame(1), frame(2)]
        finally:
            await rig.close(io)

    run(go)


def test_unprotected_writes_are_tracked_for_the_next_resync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path, monkeypatch)

    async def go() -> None:
        # The engine may open, attach and promote the disk itself and hand it over.
        disk = open_backend(rig.cfg, role=DiskRole.PRIMARY)
        assert disk is not None
        disk.attach()
        disk.promote()
        io = rig.guest_io(epoch=1, disk=disk)
        assert io.disk is disk
        await rig.start(io)
        try:
            assert io.block is not None
            await io.protect()
            await io.block.write(0, b"logged, never acknowledged")
            await io.unprotect()  # the secondary was lost: written through, tracked
            await io.block.write(200_000, b"x")
            assert [o for o, _ in io.dirty_chunks()] == [0, 196_608]
            io.lineage = "lin"
            io.remember(1)
            assert disk.read_state().to_dict() == {"lineage": "lin", "epoch": 1}
            await io.protect(2)  # a new secondary: tracking stops
            await io.block.write(500_000, b"y")
            io.committed(2)
            await io.block.durable(2)
            assert len(io.dirty_chunks()) == 2
            io.clear_dirty()
            assert io.dirty_chunks() == [] and len(io.disk_chunks()) == 1
        finally:
            await rig.close(io)
        assert rig.image.read_bytes()[500_000:500_001] == b"y"

    run(go)


def test_a_write_through_in_flight_when_protection_starts_is_tracked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A write the guest sent unprotected may still be queued for the disk when a new
    # secondary arrives. It must be marked for the resync: the incremental copy sends
    # only the marked blocks, and an unmarked one would leave the standby stale.
    rig = Rig(tmp_path, monkeypatch)

    async def go() -> None:
        disk = open_backend(rig.cfg, role=DiskRole.PRIMARY)
        assert disk is not None
        disk.attach()
        disk.promote()
        gate = threading.Event()
        apply = disk.apply

        def slow_apply(writes: Sequence[tuple[int, bytes]]) -> None:
            if any(off == 300_000 for off, _ in writes):
                gate.wait(TIMEOUT)
            apply(writes)

        monkeypatch.setattr(disk, "apply", slow_apply)
        io = rig.guest_io(epoch=1, disk=disk)
        await rig.start(io)
        try:
            assert io.block is not None
            await io.unprotect()
            io.clear_dirty()
            write = asyncio.create_task(io.block.write(300_000, b"in flight"))
            await asyncio.sleep(0.05)  # on the apply thread, held at the gate
            protect = asyncio.create_task(io.protect(2))
            await asyncio.sleep(0.05)
            gate.set()
            await asyncio.gather(write, protect)
            assert [o for o, _ in io.dirty_chunks()] == [262_144]
            assert disk.read(300_000, 9) == b"in flight"
        finally:
            gate.set()
            await rig.close(io)

    run(go)
