"""The frame proxy without QEMU or root: the guest side is a unix stream client speaking
QEMU's length-prefixed framing, the "TAP" a SOCK_SEQPACKET socketpair (one frame per
read, like a TAP descriptor)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kemari_suite.errors import ProtocolError, TapError
from kemari_suite.tap.events import IOEvent, TapMode
from kemari_suite.tap.net import MAX_FRAME, FrameDecoder, FrameProxy, ProxyState, encode_frame
from kemari_suite.tap.tun import TapDevice, open_tap

TIMEOUT = 10.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=20), st.data())
def test_decoder_reassembles_any_chunking(frames: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec = FrameDecoder()
    out: list[bytes] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out += dec.feed(stream[prev:cut])
        prev = cut
    assert out == frames
    assert dec.buffered == 0


def test_decoder_refuses_bad_lengths() -> None:
    with pytest.raises(ProtocolError, match="frame length 0"):
        FrameDecoder().feed(struct.pack("!I", 0))
    with pytest.raises(ProtocolError, match="frame length"):
        FrameDecoder().feed(struct.pack("!I", MAX_FRAME + 1))
    assert FrameDecoder().feed(struct.pack("!I", MAX_FRAME)[:3]) == []


def frame(tag: int, size: int = 60) -> bytes:
    """An Ethernet-sized frame that says which one it is."""
    return struct.pack("!I", tag) + bytes(size - 4)


class Rig:
    def __init__(self, sock_path: Path, mode: TapMode, **kw: int) -> None:
        self.lan, tap_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        os.set_blocking(tap_end.fileno(), False)
        self.lan.settimeout(TIMEOUT)
        self.events: list[tuple[IOEvent, int]] = []
        self.proxy = FrameProxy(
            sock_path,
            TapDevice("fake0", tap_end.detach()),
            epoch=1,
            mode=mode,
            on_event=lambda k, e: self.events.append((k, e)),
            **kw,  # type: ignore[arg-type]
        )
        self.sock_path = sock_path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @property
    def epoch(self) -> int:
        return self.proxy.epoch

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        # What the primary does inside the stopped window.
        self.proxy.switch_epoch(epoch)

    async def connect_guest(self) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(str(self.sock_path))
        for _ in range(100):
            if self.proxy.state is ProxyState.CONNECTED:
                return
            await asyncio.sleep(0.01)

    async def guest_send(self, *frames: bytes) -> None:
        assert self.writer is not None
        self.writer.write(b"".join(encode_frame(f) for f in frames))
        await self.writer.drain()
        await self.settle(len(frames))

    async def settle(self, _n: int = 0) -> None:
        # The proxy reads on the same loop: give it a few turns.
        for _ in range(5):
            await asyncio.sleep(0.01)

    def lan_frames(self) -> list[bytes]:
        out = []
        self.lan.setblocking(False)
        try:
            while True:
                out.append(self.lan.recv(65536))
        except BlockingIOError:
            pass
        finally:
            self.lan.settimeout(TIMEOUT)
        return out

    async def guest_recv(self) -> bytes:
        assert self.reader is not None
        (n,) = struct.unpack("!I", await asyncio.wait_for(self.reader.readexactly(4), TIMEOUT))
        return await self.reader.readexactly(n)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        await self.proxy.close()
        self.lan.close()


def rig_test(
    mode: TapMode = TapMode.PROTECTED, **kw: int
) -> Callable[[Callable[[Rig], Awaitable[None]]], Callable[[Path], None]]:
    def deco(fn: Callable[[Rig], Awaitable[None]]) -> Callable[[Path], None]:
        def wrapper(tmp_path: Path) -> None:
            async def go() -> None:
                rig = Rig(tmp_path / "net.sock", mode, **kw)
                await rig.proxy.start()
                try:
                    await rig.connect_guest()
                    await asyncio.wait_for(fn(rig), TIMEOUT * 3)
                finally:
                    await rig.close()
                assert not (tmp_path / "net.sock").exists()

            asyncio.run(go())

        wrapper.__name__ = fn.__name__
        return wrapper

    return deco


@rig_test()
async def test_guest_frames_are_held_per_epoch_and_released_in_order(rig: Rig) -> None:
    await rig.guest_send(frame(1), frame(2))
    rig.epoch = 2
    await rig.guest_send(frame(3))
    rig.epoch = 3
    await rig.guest_send(frame(4))
    assert rig.lan_frames() == []  # nothing leaves before its epoch commits
    assert rig.proxy.held_epochs() == [1, 2, 3]
    assert rig.events == [(IOEvent.NET, 1)] * 2 + [(IOEvent.NET, 2), (IOEvent.NET, 3)]
    assert rig.proxy.stats.held_frames == 4 and rig.proxy.stats.held_bytes == 240
    assert rig.proxy.release(0) == 0
    assert rig.proxy.release(2) == 3
    assert rig.lan_frames() == [frame(1), frame(2), frame(3)]
    assert rig.proxy.held_epochs() == [3]
    assert rig.proxy.oldest_held_age() is not None
    assert rig.proxy.release(3) == 1
    assert rig.lan_frames() == [frame(4)]
    s = rig.proxy.stats
    assert (s.released_frames, s.released_bytes, s.held_frames, s.held_bytes) == (4, 240, 0, 0)
    assert rig.proxy.released_through == 3


@rig_test()
async def test_epoch_never_goes_back(rig: Rig) -> None:
    await rig.guest_send(frame(1))  # in the epoch given to the constructor
    rig.epoch = 4
    with pytest.raises(TapError, match="never back"):
        rig.epoch = 3
    rig.epoch = 4  # the same epoch again: nothing changes
    await rig.guest_send(frame(2))
    assert rig.epoch == 4
    assert rig.proxy.held_epochs() == [1, 4]
    assert rig.events == [(IOEvent.NET, 1), (IOEvent.NET, 4)]


@rig_test()
async def test_lan_frames_pass_straight_to_the_guest(rig: Rig) -> None:
    big = frame(9, 1514)
    rig.lan.send(frame(7))
    rig.lan.send(big)
    assert await rig.guest_recv() == frame(7)
    assert await rig.guest_recv() == big
    assert rig.proxy.stats.to_guest_frames == 2


@rig_test(hold_limit_frames=3)
async def test_overflow_drops_and_reports_but_keeps_reading(rig: Rig) -> None:
    await rig.guest_send(*[frame(i) for i in range(5)])
    s = rig.proxy.stats
    assert (s.held_frames, s.dropped_frames, s.overflows) == (3, 2, 1)
    assert rig.proxy.overflowing
    assert rig.proxy.status()["overflowing"] is True
    assert len(rig.events) == 5  # every frame still asked for a sync point
    rig.proxy.release(1)
    assert rig.lan_frames() == [frame(0), frame(1), frame(2)]
    assert not rig.proxy.overflowing
    await rig.guest_send(frame(5))
    assert rig.proxy.stats.held_frames == 1 and rig.proxy.stats.overflows == 1


@rig_test(hold_limit_bytes=100)
async def test_byte_limit(rig: Rig) -> None:
    await rig.guest_send(frame(0), frame(1))
    assert (rig.proxy.stats.held_frames, rig.proxy.stats.dropped_bytes) == (1, 60)


@rig_test()
async def test_unprotected_releases_everything_then_passes_through(rig: Rig) -> None:
    await rig.guest_send(frame(1))
    rig.epoch = 5
    await rig.guest_send(frame(2))
    assert rig.proxy.set_unprotected() == 2
    assert rig.lan_frames() == [frame(1), frame(2)]
    await rig.guest_send(frame(3))
    assert rig.lan_frames() == [frame(3)]
    assert rig.proxy.stats.passed_frames == 1
    n_events = len(rig.events)
    rig.proxy.set_protected()
    rig.epoch = 6
    await rig.guest_send(frame(4))
    assert rig.lan_frames() == []
    assert len(rig.events) == n_events + 1
    rig.proxy.release(6)
    assert rig.lan_frames() == [frame(4)]


@rig_test(mode=TapMode.UNPROTECTED)
async def test_a_new_qemu_connection_replaces_the_old_one(rig: Rig) -> None:
    old_reader = rig.reader
    assert old_reader is not None
    await rig.connect_guest()
    await rig.settle()
    assert rig.proxy.stats.guest_connections == 2
    assert await asyncio.wait_for(old_reader.read(), TIMEOUT) == b""  # dropped
    rig.lan.send(frame(1))
    assert await rig.guest_recv() == frame(1)
    await rig.guest_send(frame(2))
    assert rig.lan_frames() == [frame(2)]


@rig_test()
async def test_a_malformed_stream_drops_that_connection(rig: Rig) -> None:
    assert rig.writer is not None and rig.reader is not None
    rig.writer.write(struct.pack("!I", MAX_FRAME + 5))
    await rig.writer.drain()
    assert await asyncio.wait_for(rig.reader.read(), TIMEOUT) == b""
    await rig.settle()
    assert rig.proxy.stats.protocol_errors == 1
    assert rig.proxy.state is ProxyState.WAITING
    rig.lan.send(frame(1))  # no guest: dropped and counted
    await rig.settle()
    assert rig.proxy.stats.to_guest_dropped == 1
    await rig.connect_guest()
    await rig.guest_send(frame(2))
    assert rig.proxy.stats.held_frames == 1


@rig_test(guest_buffer_limit=1000)
async def test_a_guest_that_does_not_read_loses_lan_frames_not_the_proxy(rig: Rig) -> None:
    # QEMU stops reading while the VM is stopped; frames to it pile up to the limit, then
    # are dropped, and frames from the guest are still read at once.
    rig.lan.setblocking(False)
    sent = 0
    while sent < 500:
        try:
            rig.lan.send(frame(sent, 1000))
            sent += 1
        except BlockingIOError:
            await asyncio.sleep(0.005)
    await rig.settle()
    assert rig.proxy.stats.to_guest_dropped > 0
    await rig.guest_send(frame(1))
    assert rig.proxy.stats.held_frames == 1


def test_start_and_open_errors(tmp_path: Path) -> None:
    async def go() -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proxy = FrameProxy(
            tmp_path / "nodir" / "x.sock",
            TapDevice("fake", b.detach()),
            mode=TapMode.PROTECTED,
        )
        with pytest.raises(TapError, match="cannot listen"):
            await proxy.start()
        await proxy.close()
        await proxy.close()
        a.close()

    asyncio.run(go())
    with pytest.raises(TapError, match="valid interface name"):
        open_tap("x" * 20)
    with pytest.raises(TapError):
        open_tap("ktap-x", netns="kemari-no-such-namespace")
