"""The block tap and its NBD server, driven over a unix socket by a raw client (no QEMU).

Covers the two modes (log-and-acknowledge, write-through), commit/apply/durable, the
output rule's ``output_ready``, backend failures, and the protocol's answers to
unsupported and malformed input.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from kemari_suite.errors import DiskError, ProtocolError, TapError
from kemari_suite.tap import nbdproto as p
from kemari_suite.tap.epochs import OpKind, parse
from kemari_suite.tap.events import IOEvent, TapMode
from kemari_suite.tap.nbd import BlockTap, NBDServer

SIZE = 1 << 20
TIMEOUT = 10.0


class MemBackend:
    """In-memory BlockBackend; ``gate`` (when set) holds every apply until it is set."""

    def __init__(self, size: int = SIZE) -> None:
        self.size = size
        self.data = bytearray(size)
        self.log: list[tuple[str, int, int]] = []
        self.fail: Exception | None = None
        self.gate: threading.Event | None = None

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    def apply(self, writes: Sequence[tuple[int, bytes]]) -> None:
        if self.gate is not None:
            assert self.gate.wait(TIMEOUT)
        if self.fail is not None:
            raise self.fail
        for off, buf in writes:
            self.data[off : off + len(buf)] = buf
            self.log.append(("write", off, len(buf)))

    def flush(self) -> None:
        if self.fail is not None:
            raise self.fail
        self.log.append(("flush", 0, 0))


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await asyncio.wait_for(coro_fn(), TIMEOUT * 3)

    asyncio.run(main())


class Env:
    def __init__(self, mode: TapMode = TapMode.PROTECTED) -> None:
        self.backend = MemBackend()
        self.events: list[tuple[IOEvent, int]] = []
        self.durable: list[int] = []
        self.tap = BlockTap(
            self.backend,
            epoch=1,
            mode=mode,
            on_event=lambda k, e: self.events.append((k, e)),
            on_durable=self.durable.append,
        )

    @property
    def epoch(self) -> int:
        return self.tap.epoch

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        # What the primary does inside the stopped window.
        self.tap.switch_epoch(epoch)


# ---- BlockTap ------------------------------------------------------------------------


def test_protected_write_is_logged_acknowledged_and_applied_after_commit() -> None:
    async def go() -> None:
        env = Env()
        tap, be = env.tap, env.backend
        await tap.write(100, b"hello")
        await tap.write(102, b"LL", fua=False)
        assert be.log == []  # nothing reaches the disk before the commit
        assert await tap.read(98, 10) == b"\0\0heLLo\0\0\0"
        assert env.events == [(IOEvent.WRITE, 1), (IOEvent.WRITE, 1)]
        env.epoch = 2
        await tap.flush()
        await tap.write_zeroes(101, 2)
        assert env.events[-2:] == [(IOEvent.FLUSH, 2), (IOEvent.WRITE, 2)]
        assert await tap.read(100, 5) == b"h\0\0Lo"
        rec = parse(tap.io_log(1))
        assert [(o.kind, o.offset, o.data) for o in rec.ops] == [
            (OpKind.WRITE, 100, b"hello"),
            (OpKind.WRITE, 102, b"LL"),
        ]
        # Epoch 1 had no flush: its output may go as soon as it is acknowledged.
        await tap.output_ready(1)
        tap.commit_epoch(1)
        await tap.durable(1)
        assert bytes(be.data[100:105]) == b"heLLo"
        assert tap.log.pending_epochs() == [2]
        # Epoch 2 had a FLUSH: output waits for its writes and the backend flush.
        ready = asyncio.ensure_future(tap.output_ready(2))
        await asyncio.sleep(0.05)
        assert not ready.done()
        tap.io_log(2)
        tap.commit_epoch(2)
        await ready
        assert be.log[-1] == ("flush", 0, 0)
        assert bytes(be.data[100:105]) == b"h\0\0Lo"
        assert await tap.read(100, 5) == b"h\0\0Lo"
        assert env.durable[-1] == 2 and tap.flushed_through == 2
        await tap.close()

    run(go)


def test_reads_during_apply_see_the_overlay_and_applies_keep_order() -> None:
    async def go() -> None:
        env = Env()
        tap, be = env.tap, env.backend
        be.gate = threading.Event()
        await tap.write(0, b"A" * 8)
        env.epoch = 2
        await tap.write(4, b"B" * 8)
        env.epoch = 3
        tap.commit_epoch(2)
        await asyncio.sleep(0.05)  # the applier is now blocked inside apply(epoch 1)
        assert await tap.read(0, 12) == b"AAAABBBBBBBB"
        await tap.trim(0, 2, fua=True)
        assert await tap.read(0, 12) == b"\0\0AABBBBBBBB"
        be.gate.set()
        await tap.durable(2)
        assert bytes(be.data[:12]) == b"AAAABBBBBBBB"
        assert await tap.read(0, 12) == b"\0\0AABBBBBBBB"
        assert [x for x in be.log if x[0] == "write"] == [("write", 0, 8), ("write", 4, 8)]
        await tap.close()

    run(go)


def test_unprotected_applies_the_log_then_writes_through() -> None:
    async def go() -> None:
        env = Env()
        tap, be = env.tap, env.backend
        await tap.write(0, b"old!")
        env.epoch = 2
        await tap.write(2, b"XY")  # never committed: the secondary is gone
        await tap.set_unprotected()
        assert tap.mode is TapMode.UNPROTECTED
        assert bytes(be.data[:4]) == b"olXY"
        assert be.log[-1] == ("flush", 0, 0)
        assert tap.log.pending_epochs() == []
        n_events = len(env.events)
        before = len(be.log)
        await tap.write(0, b"new", fua=True)
        assert bytes(be.data[:4]) == b"newY"  # on the backend before the acknowledgement
        assert be.log[before:] == [("write", 0, 3), ("flush", 0, 0)]
        await tap.write_zeroes(1, 1)
        await tap.flush()
        assert be.log[-2:] == [("write", 1, 1), ("flush", 0, 0)]
        await tap.flush()  # nothing written since the last flush: no backend flush
        assert be.log[-2:] == [("write", 1, 1), ("flush", 0, 0)]
        assert [x[0] for x in be.log].count("flush") == 3
        assert bytes(be.data[:4]) == b"n\0wY"
        assert len(env.events) == n_events  # no sync points wanted without a secondary
        tap.commit_epoch(5)  # ignored
        await tap.durable(99)
        # Protected again (a new secondary): writes are logged in the open epoch.
        tap.set_protected()
        env.epoch = 7
        await tap.write(0, b"Z")
        assert bytes(be.data[:1]) == b"n" and await tap.read(0, 1) == b"Z"
        assert [op.data for op in parse(tap.io_log(7)).ops] == [b"Z"]
        await tap.close()

    run(go)


def test_backend_failure_fails_waiters_and_write_through() -> None:
    async def go() -> None:
        env = Env()
        tap, be = env.tap, env.backend
        await tap.write(0, b"x", fua=True)
        be.fail = DiskError("mem", "media error")
        tap.commit_epoch(1)
        with pytest.raises(TapError, match="media error"):
            await tap.durable(1)
        with pytest.raises(TapError, match="media error"):
            await tap.output_ready(1)
        assert tap.status()["error"]
        # The log keeps the write (the secondary holds it too); reads still see it.
        assert await tap.read(0, 1) == b"x"
        with pytest.raises(TapError):
            await tap.set_unprotected()
        with pytest.raises(TapError):
            await tap.write(0, b"y")
        await tap.close()

    run(go)


def test_misuse_is_a_tap_error() -> None:
    async def go() -> None:
        env = Env()
        tap = env.tap
        with pytest.raises(TapError, match="outside"):
            await tap.write(SIZE - 1, b"ab")
        with pytest.raises(TapError, match="outside"):
            await tap.read(-1, 1)
        await tap.write(0, b"a")
        tap.commit_epoch(1)
        with pytest.raises(TapError, match="committed already"):
            await tap.write(0, b"b")  # the primary forgot to switch epochs
        await tap.close()
        with pytest.raises(TapError, match="closed"):
            await tap.durable(5)

    run(go)


def test_epoch_is_pushed_and_never_goes_back() -> None:
    async def go() -> None:
        env = Env()
        tap = env.tap
        await tap.write(0, b"a")
        tap.switch_epoch(3)
        await tap.write(1, b"b")
        await tap.flush()
        assert tap.log.pending_epochs() == [1, 3]
        assert env.events == [(IOEvent.WRITE, 1), (IOEvent.WRITE, 3), (IOEvent.FLUSH, 3)]
        with pytest.raises(TapError, match="never back"):
            tap.switch_epoch(2)
        assert tap.epoch == 3
        tap.switch_epoch(3)  # the same epoch again: nothing changes
        await tap.write(2, b"c")
        assert tap.log.pending_epochs() == [1, 3]
        await tap.close()

    run(go)


def test_the_first_epoch_is_given_to_the_constructor() -> None:
    async def go() -> None:
        tap = BlockTap(MemBackend(), epoch=4, mode=TapMode.PROTECTED)
        assert tap.epoch == 4
        await tap.write(0, b"a")
        tap.switch_epoch(6)
        await tap.write(1, b"b")
        assert tap.log.pending_epochs() == [4, 6]
        await tap.close()

    run(go)


# ---- NBD over a socket ------------------------------------------------------------------


class Client:
    """A raw NBD client: every byte is spelled out here, so tests can send bad ones."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def connect(cls, path: Path, flags: int | None = 3) -> Client:
        r, w = await asyncio.open_unix_connection(str(path))
        c = cls(r, w)
        magic, opt, hflags = struct.unpack("!QQH", await r.readexactly(18))
        assert (magic, opt, hflags) == (p.NBDMAGIC, p.IHAVEOPT, 3)
        if flags is not None:
            w.write(struct.pack("!I", flags))
        return c

    def send(self, data: bytes) -> None:
        self.w.write(data)

    def option(self, opt: int, data: bytes = b"", magic: int = p.IHAVEOPT) -> None:
        self.w.write(struct.pack("!QII", magic, opt, len(data)) + data)

    async def reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, n = struct.unpack("!QIII", await self.r.readexactly(20))
        assert magic == p.REPLY_MAGIC
        return opt, rep, await self.r.readexactly(n)

    async def go(self, name: str = "disk0", infos: tuple[int, ...] = (3,)) -> dict[int, bytes]:
        raw = name.encode()
        body = (
            struct.pack("!I", len(raw)) + raw + struct.pack(f"!H{len(infos)}H", len(infos), *infos)
        )
        self.option(p.Opt.GO, body)
        got: dict[int, bytes] = {}
        while True:
            opt, rep, data = await self.reply()
            assert opt == p.Opt.GO
            if rep == p.Rep.ACK:
                return got
            assert rep == p.Rep.INFO, hex(rep)
            got[struct.unpack_from("!H", data)[0]] = data

    def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        cookie: int = 1,
        data: bytes = b"",
    ) -> None:
        self.w.write(p.encode_request(p.Request(flags, cmd, cookie, offset, length)) + data)

    async def simple(self, nread: int = 0) -> tuple[int, int, bytes]:
        magic, err, cookie = struct.unpack("!IIQ", await self.r.readexactly(16))
        assert magic == p.SIMPLE_REPLY_MAGIC
        data = await self.r.readexactly(nread) if err == 0 and nread else b""
        return err, cookie, data

    async def closed(self) -> bool:
        try:
            return await asyncio.wait_for(self.r.read(1), TIMEOUT) == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.w.close()


async def serve(tmp_path: Path, env: Env) -> NBDServer:
    srv = NBDServer(env.tap, tmp_path / "nbd.sock", export_name="disk0", description="test disk")
    await srv.start()
    return srv


def nbd_test(fn: Callable[[Path, Env, NBDServer], Awaitable[None]]) -> Callable[[Path], None]:
    def wrapper(tmp_path: Path) -> None:
        async def go() -> None:
            env = Env()
            srv = await serve(tmp_path, env)
            try:
                await fn(tmp_path / "nbd.sock", env, srv)
            finally:
                await srv.close()
                await env.tap.close()

        run(go)

    wrapper.__name__ = fn.__name__
    return wrapper


@nbd_test
async def test_negotiation_answers(sock: Path, env: Env, srv: NBDServer) -> None:
    c = await Client.connect(sock)
    c.option(p.Opt.LIST)
    assert await c.reply() == (p.Opt.LIST, p.Rep.SERVER, struct.pack("!I", 5) + b"disk0")
    assert await c.reply() == (p.Opt.LIST, p.Rep.ACK, b"")
    c.option(p.Opt.LIST, b"junk")
    assert (await c.reply())[1] == p.Rep.ERR_INVALID
    for opt in (p.Opt.STRUCTURED_REPLY, p.Opt.STARTTLS, p.Opt.SET_META_CONTEXT, 77):
        c.option(opt)
        o, rep, msg = await c.reply()
        assert (o, rep) == (opt, p.Rep.ERR_UNSUP) and b"not supported" in msg
    # INFO: the export's size and flags, a block size when asked, the name, the description.
    body = struct.pack("!I", 5) + b"disk0" + struct.pack("!H3H", 3, 3, 1, 2)
    c.option(p.Opt.INFO, body)
    infos = []
    while (r := await c.reply())[1] != p.Rep.ACK:
        assert r[1] == p.Rep.INFO
        infos.append(r[2])
    assert infos[0] == struct.pack("!HQH", 0, SIZE, p.TRANSMISSION_FLAGS)
    assert struct.unpack("!HIII", infos[1]) == (3, 1, 4096, 32 << 20)
    assert infos[2] == b"\0\x01disk0" and infos[3] == b"\0\x02test disk"
    c.option(p.Opt.INFO, struct.pack("!I", 4) + b"nope" + struct.pack("!H", 0))
    assert (await c.reply())[1] == p.Rep.ERR_UNKNOWN
    for bad in (b"", struct.pack("!I", 99) + b"disk0\0\0", struct.pack("!I", 5) + b"disk0\0\x02\0"):
        c.option(p.Opt.GO, bad)
        assert (await c.reply())[1] == p.Rep.ERR_INVALID
    assert srv.stats.option_errors == 9
    # Still negotiating after all that: GO on the default ("") export works.
    got = await c.go("")
    assert struct.unpack("!HQH", got[0]) == (0, SIZE, p.TRANSMISSION_FLAGS)
    c.request(p.Cmd.WRITE, 10, 3, data=b"abc", cookie=42)
    assert await c.simple() == (0, 42, b"")
    c.request(p.Cmd.READ, 9, 5, cookie=43)
    assert await c.simple(5) == (0, 43, b"\0abc\0")
    c.request(p.Cmd.DISC)
    assert await c.closed()
    assert srv.last_protocol_error is None


@nbd_test
async def test_export_name_and_abort(sock: Path, env: Env, srv: NBDServer) -> None:
    c = await Client.connect(sock, flags=1)  # no NO_ZEROES: 124 zero bytes follow
    c.option(p.Opt.EXPORT_NAME, b"disk0")
    size, flags = struct.unpack("!QH", await c.r.readexactly(10))
    assert (size, flags) == (SIZE, p.TRANSMISSION_FLAGS)
    assert await c.r.readexactly(124) == bytes(124)
    c.request(p.Cmd.FLUSH, cookie=7)
    assert await c.simple() == (0, 7, b"")
    c.close()
    c = await Client.connect(sock)
    c.option(p.Opt.EXPORT_NAME, b"other")  # no error reply exists: closed
    assert await c.closed()
    c = await Client.connect(sock)
    c.option(p.Opt.ABORT)
    assert await c.reply() == (p.Opt.ABORT, p.Rep.ACK, b"")
    assert await c.closed()


@nbd_test
async def test_commands_and_their_errors(sock: Path, env: Env, srv: NBDServer) -> None:
    c = await Client.connect(sock)
    await c.go()
    cases: list[tuple[dict[str, Any], int]] = [
        ({"cmd": p.Cmd.CACHE, "length": 512}, p.Errno.EINVAL),
        ({"cmd": p.Cmd.BLOCK_STATUS, "length": 512}, p.Errno.EINVAL),
        ({"cmd": p.Cmd.RESIZE}, p.Errno.EINVAL),
        ({"cmd": 99}, p.Errno.EINVAL),
        ({"cmd": p.Cmd.READ, "length": 512, "flags": p.CMD_FLAG_DF}, p.Errno.EINVAL),
        ({"cmd": p.Cmd.WRITE_ZEROES, "length": 512, "flags": p.CMD_FLAG_FAST_ZERO}, p.Errno.EINVAL),
        ({"cmd": p.Cmd.READ, "offset": SIZE - 1, "length": 2}, p.Errno.EINVAL),
        ({"cmd": p.Cmd.READ, "length": (32 << 20) + 1}, p.Errno.EINVAL),
        ({"cmd": p.Cmd.WRITE, "offset": SIZE - 1, "length": 2, "data": b"zz"}, p.Errno.ENOSPC),
        ({"cmd": p.Cmd.TRIM, "offset": SIZE, "length": 1}, p.Errno.EINVAL),
        ({"cmd": p.Cmd.WRITE_ZEROES, "offset": 1 << 62, "length": 1}, p.Errno.ENOSPC),
        ({"cmd": p.Cmd.FLUSH, "offset": 512}, p.Errno.EINVAL),
        ({"cmd": p.Cmd.WRITE, "offset": 0, "length": 0}, 0),
        ({"cmd": p.Cmd.READ, "offset": 0, "length": 0}, 0),
    ]
    for i, (req, want) in enumerate(cases):
        c.request(req.pop("cmd"), cookie=1000 + i, **req)
        err, cookie, _ = await c.simple()
        assert (cookie, err) == (1000 + i, want), req
    # The connection survived every one of them, and nothing was logged.
    assert env.tap.log.pending_epochs() == []
    c.request(p.Cmd.WRITE, 512, 4, data=b"data", flags=p.CMD_FLAG_FUA, cookie=1)
    c.request(p.Cmd.TRIM, 514, 1, cookie=2)
    c.request(p.Cmd.WRITE_ZEROES, 515, 1, flags=p.CMD_FLAG_NO_HOLE, cookie=3)
    c.request(p.Cmd.FLUSH, cookie=4)
    c.request(p.Cmd.READ, 511, 6, cookie=5)
    assert [await c.simple() for _ in range(4)] == [(0, i, b"") for i in range(1, 5)]
    assert await c.simple(6) == (0, 5, b"\0da\0\0\0")
    ops = env.tap.log.ops(1)
    assert [(o.kind, o.fua) for o in ops] == [
        (OpKind.WRITE, True),
        (OpKind.TRIM, False),
        (OpKind.WRITE_ZEROES, False),
        (OpKind.FLUSH, False),
    ]
    assert srv.stats.einval == 10
    # A backend failure is EIO, and the connection goes on.
    await env.tap.set_unprotected()
    env.backend.fail = DiskError("mem", "gone")
    c.request(p.Cmd.WRITE, 0, 1, data=b"x", cookie=9)
    assert await c.simple() == (p.Errno.EIO, 9, b"")
    env.backend.fail = None
    c.request(p.Cmd.READ, 512, 1, cookie=10)
    assert await c.simple(1) == (0, 10, b"d")


@nbd_test
async def test_malformed_streams_close_the_connection_only(
    sock: Path, env: Env, srv: NBDServer
) -> None:
    async def expect_closed(c: Client, why: str) -> None:
        assert await c.closed()
        assert srv.last_protocol_error is not None
        assert isinstance(srv.last_protocol_error, ProtocolError)
        assert why in str(srv.last_protocol_error)
        srv.last_protocol_error = None

    c = await Client.connect(sock, flags=0x80000001)
    await expect_closed(c, "unknown client flags")
    c = await Client.connect(sock, flags=0)
    await expect_closed(c, "fixed newstyle")
    c = await Client.connect(sock)
    c.option(p.Opt.GO, magic=0x1234)
    await expect_closed(c, "bad option magic")
    c = await Client.connect(sock)
    c.send(struct.pack("!QII", p.IHAVEOPT, p.Opt.GO, 1 << 30))
    await expect_closed(c, "carries")
    c = await Client.connect(sock)
    await c.go()
    c.send(b"\x12\x34\x56\x78" + bytes(24))
    await expect_closed(c, "bad request magic")
    c = await Client.connect(sock)
    await c.go()
    c.request(p.Cmd.WRITE, 0, 64 << 20)
    await expect_closed(c, "write of")
    # A client that dies in the middle of a write's payload: nothing is logged.
    c = await Client.connect(sock)
    await c.go()
    c.request(p.Cmd.WRITE, 0, 4096, data=b"x" * 100)
    await c.w.drain()
    c.close()
    # And one that dies mid-header.
    c = await Client.connect(sock)
    await c.go()
    c.send(p.encode_request(p.Request(0, p.Cmd.READ, 1, 0, 1))[:10])
    await c.w.drain()
    c.close()
    await asyncio.sleep(0.1)
    assert env.tap.log.pending_epochs() == []
    assert srv.stats.protocol_errors == 6
    # The server still serves.
    c = await Client.connect(sock)
    await c.go()
    c.request(p.Cmd.WRITE, 0, 2, data=b"ok")
    assert await c.simple() == (0, 1, b"")
    assert [o.data for o in env.tap.log.ops(1)] == [b"ok"]
    c.close()


def test_server_start_fails_cleanly(tmp_path: Path) -> None:
    async def go() -> None:
        env = Env()
        srv = NBDServer(env.tap, tmp_path / "missing-dir" / "nbd.sock")
        with pytest.raises(TapError, match="cannot listen"):
            await srv.start()
        await env.tap.close()

    run(go)
