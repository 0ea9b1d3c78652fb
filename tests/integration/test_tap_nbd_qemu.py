"""The block tap against QEMU's own NBD client (qemu-io, qemu-img).

Each test serves a raw image in tmp_path through BlockTap + NBDServer on a unix socket,
runs the real client against ``nbd+unix:///disk0?socket=...``, and checks the epoch log,
the overlay and the image file. qemu-io is run with ``-t writeback`` so that plain writes
carry no FUA (its default cache mode, writethrough, sets FUA on every write).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from kemari_suite.disk.base import FileDisk
from kemari_suite.tap.epochs import OpKind, parse, replay
from kemari_suite.tap.events import IOEvent, TapMode
from kemari_suite.tap.nbd import BlockTap, NBDServer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("qemu-io") is None, reason="no qemu-io"),
]

SIZE = 8 << 20
TIMEOUT = 60.0


class Env:
    def __init__(self, tmp_path: Path, mode: TapMode) -> None:
        self.image = tmp_path / "disk.img"
        with self.image.open("wb") as fh:
            fh.truncate(SIZE)
        self.disk = FileDisk(self.image)
        self.disk.attach()
        self.sock = tmp_path / "nbd.sock"
        self.url = f"nbd+unix:///disk0?socket={self.sock}"
        self.events: list[tuple[IOEvent, int]] = []
        self.tap = BlockTap(
            self.disk,
            epoch=1,
            mode=mode,
            on_event=lambda k, e: self.events.append((k, e)),
        )
        self.server = NBDServer(self.tap, self.sock, export_name="disk0")

    @property
    def epoch(self) -> int:
        return self.tap.epoch

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        # What the primary does inside the stopped window.
        self.tap.switch_epoch(epoch)

    async def qemu_io(self, *cmds: str, cache: str = "writeback") -> str:
        argv = ["qemu-io", "-f", "raw", "-t", cache, self.url]
        for c in cmds:
            argv += ["-c", c]
        return await run(argv)

    def file_bytes(self, offset: int, n: int) -> bytes:
        with self.image.open("rb") as fh:
            fh.seek(offset)
            return fh.read(n)


async def run(argv: list[str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{text}"
    # qemu-io reports a failed pattern check on stdout and still exits 0.
    assert "Pattern verification failed" not in text, text
    assert "failed" not in text.lower(), text
    return text


def tap_test(mode: TapMode) -> Callable[[Callable[[Env], Awaitable[None]]], Callable[[Path], None]]:
    def deco(fn: Callable[[Env], Awaitable[None]]) -> Callable[[Path], None]:
        def wrapper(tmp_path: Path) -> None:
            async def go() -> None:
                env = Env(tmp_path, mode)
                await env.server.start()
                try:
                    await fn(env)
                finally:
                    await env.server.close()
                    await env.tap.close()
                    env.disk.close()

            asyncio.run(go())

        wrapper.__name__ = fn.__name__
        return wrapper

    return deco


@tap_test(TapMode.PROTECTED)
async def test_protected_writes_reach_the_file_only_after_commit(env: Env) -> None:
    await env.qemu_io("write -P 0xab 0 64k", "read -P 0xab 0 64k")
    assert env.file_bytes(0, 65536) == bytes(65536)  # logged, not applied
    ops = env.tap.log.ops(1)
    assert [(o.kind, o.offset, o.length, o.fua) for o in ops if o.kind is OpKind.WRITE] == [
        (OpKind.WRITE, 0, 65536, False)
    ]
    assert (IOEvent.WRITE, 1) in env.events
    # A second client (another qemu-io) reads the pending write through the overlay,
    # also at unaligned offsets.
    env.epoch = 2
    await env.qemu_io("write -P 0x11 1000 3000", "read -P 0xab 0 1000", "read -P 0x11 1000 3000")
    await env.qemu_io("read -P 0xab 4000 61536")
    payload = env.tap.io_log(1)
    env.tap.commit_epoch(1)
    await env.tap.durable(1)
    assert env.file_bytes(0, 65536) == b"\xab" * 65536
    env.tap.io_log(2)
    env.tap.commit_epoch(2)
    await env.tap.durable(2)
    assert env.file_bytes(1000, 3000) == b"\x11" * 3000
    assert env.tap.log.pending_epochs() == []
    # The secondary's replay of epoch 1's log on a copy gives the same bytes.
    copy = env.image.with_suffix(".copy")
    with copy.open("wb") as fh:
        fh.truncate(SIZE)
    with FileDisk(copy) as other:
        replay(other, [payload])
        assert other.read(0, 65536) == b"\xab" * 65536


@tap_test(TapMode.PROTECTED)
async def test_fua_flush_discard_and_write_zeroes(env: Env) -> None:
    await env.qemu_io(
        "write -P 0x55 0 1M",
        "write -f -P 0x66 4096 4096",
        "flush",
        "discard 65536 65536",
        "write -z 131072 4096",
        "read -P 0x55 0 4096",
        "read -P 0x66 4096 4096",
        "read -P 0 65536 65536",
        "read -P 0 131072 4096",
        "read -P 0x55 135168 4096",
    )
    kinds = [(o.kind, o.fua) for o in env.tap.log.ops(1)]
    assert (OpKind.WRITE, True) in kinds
    assert (OpKind.FLUSH, False) in kinds
    assert (OpKind.TRIM, False) in kinds
    assert any(k is OpKind.WRITE_ZEROES for k, _ in kinds)
    assert env.tap.log.needs_flush(1)
    assert (IOEvent.FLUSH, 1) in env.events
    rec = parse(env.tap.io_log(1))
    assert rec.needs_flush and len(rec.ops) == len(kinds)
    # The output rule: epoch 1 had a flush, so its output waits for its writes on disk.
    ready = asyncio.ensure_future(env.tap.output_ready(1))
    await asyncio.sleep(0.1)
    assert not ready.done()
    env.tap.commit_epoch(1)
    await asyncio.wait_for(ready, TIMEOUT)
    assert env.file_bytes(0, 4096) == b"\x55" * 4096
    assert env.file_bytes(4096, 4096) == b"\x66" * 4096
    assert env.file_bytes(65536, 65536) == bytes(65536)
    assert env.file_bytes(131072, 4096) == bytes(4096)
    assert env.file_bytes(135168, 4096) == b"\x55" * 4096
    assert env.tap.stats.backend_flushes >= 1


@tap_test(TapMode.PROTECTED)
async def test_qemu_img_reads_the_guest_view(env: Env) -> None:
    await env.qemu_io("write -P 0x7e 1M 512k", "write -P 0x01 0 1")
    info = json.loads(await run(["qemu-img", "info", "--output=json", "-f", "raw", env.url]))
    assert info["virtual-size"] == SIZE
    out = env.image.with_suffix(".out")
    await run(["qemu-img", "convert", "-f", "raw", "-O", "raw", env.url, str(out)])
    data = out.read_bytes()
    assert len(data) == SIZE
    assert data[:1] == b"\x01" and data[1 << 20 : (1 << 20) + (512 << 10)] == b"\x7e" * (512 << 10)
    assert env.file_bytes(1 << 20, 16) == bytes(16)
    out.unlink()


@tap_test(TapMode.UNPROTECTED)
async def test_unprotected_writes_through(env: Env) -> None:
    await env.qemu_io("write -P 0x42 0 128k", "write -f -P 0x43 128k 4k", "flush")
    # No commit: the writes are on the file because they were applied before the
    # acknowledgement (and flushed on FUA/flush).
    assert env.file_bytes(0, 131072) == b"\x42" * 131072
    assert env.file_bytes(131072, 4096) == b"\x43" * 4096
    assert env.tap.log.pending_epochs() == []
    assert env.tap.stats.written_through >= 3
    # The FUA write flushed; the flushes after it found nothing new to flush.
    assert env.tap.stats.backend_flushes == 1
    assert env.events == []
    await env.qemu_io("read -P 0x42 0 128k", "discard 0 64k", "read -P 0 0 64k")
    assert env.file_bytes(0, 65536) == bytes(65536)
    assert os.path.exists(env.sock)
