"""One epoch from the primary's stopped window to the secondary's commit and back, with
no QEMU: the real StoppedWindow (fake QMP and capturer), tracker, EpochSender and a real
authenticated Link over an in-memory socket pair into the real EpochReceiver, whose
acknowledgement resolves the primary's AckTracker through a PeerSession."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import numpy as np
import pytest

from kemari_suite.checkpoint.compare import CompareTracker
from kemari_suite.checkpoint.peer import AckTracker, PeerSession
from kemari_suite.checkpoint.sender import Buffers, EpochSender
from kemari_suite.checkpoint.window import StoppedWindow
from kemari_suite.errors import ProtocolError, ReplicationError
from kemari_suite.protocol import wire
from kemari_suite.protocol.codec import PageEncoder
from kemari_suite.protocol.link import Link, _handshake
from kemari_suite.replica.receiver import EpochReceiver
from kemari_suite.tap import epochs as iolog

PAGE = 4096
KEY = b"k" * 32
N = 96


async def link_pair() -> tuple[Link, Link]:
    """An authenticated primary/secondary Link pair over an in-memory socket pair."""
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    sp = wire.Session(
        KEY, role=wire.Role.PRIMARY, node_id="p", initiator=True, accept_roles={wire.Role.SECONDARY}
    )
    ss = wire.Session(
        KEY,
        role=wire.Role.SECONDARY,
        node_id="s",
        initiator=False,
        accept_roles={wire.Role.PRIMARY},
    )
    return await asyncio.gather(_handshake(ra, wa, sp, "s", 5.0), _handshake(rb, wb, ss, "p", 5.0))


class FakeVM:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        self.calls.append(cmd)
        return {}


class FakeCapturer:
    def __init__(self) -> None:
        self.n = 0

    async def capture(self) -> bytes:
        self.n += 1
        return f"device state {self.n}".encode()


async def serve_replica(link: Link, rx: EpochReceiver, acked: list[int]) -> None:
    """The secondary's side, as the agent dispatches it: data into the receiver, Ack at
    every commit; a lost connection rolls the open epoch back."""
    table = {
        wire.EpochBegin: rx.begin,
        wire.Pages: rx.receive_pages,
        wire.DeviceState: rx.device_state,
        wire.IOLog: rx.io_log,
    }
    try:
        while True:
            msg = await link.recv()
            if isinstance(msg, wire.EpochEnd):
                acked.append(rx.end(msg))
                await link.send(wire.Ack(epoch=acked[-1]))
            elif type(msg) in table:
                table[type(msg)](msg)  # type: ignore[operator]
    except (ConnectionError, ProtocolError):
        rx.rollback()


class Primary:
    """The primary's parts wired as the agent wires them, minus QEMU and the agent."""

    def __init__(self, link: Link, ram: np.ndarray) -> None:
        self.ram = ram
        self.vm = FakeVM()
        self.tracker = CompareTracker(N)
        self.buf = Buffers.allocate(N)
        self.window = StoppedWindow(
            self.vm,
            FakeCapturer(),
            self.tracker,
            ram,
            staging=self.buf.staging,
            index=self.buf.index,
            scan_threads=1,
        )
        self.sender = EpochSender(link.send, PageEncoder("zstd"), n_pages=N)
        self.acks = AckTracker()
        self.session = PeerSession(
            link,
            {wire.Ack: lambda m: self.acks.acked(m.epoch)},
            heartbeat_interval_s=0.2,
            heartbeat_timeout_s=10.0,
            role_state=lambda: "syncing",
        )
        self.epoch = 0

    async def initial(self) -> None:
        self.epoch = 1
        await self.sender.begin(1, wire.EpochKind.FULL)

        async def nop() -> None:
            return None

        await self.sender.full_copy(self.tracker, self.ram, self.buf, stop=nop, cont=nop)

    async def sync_point(self, io_log: bytes = b"") -> int:
        epoch = self.epoch

        def switch() -> None:
            self.epoch = epoch + 1

        w = await self.window.run(resume=True, while_stopped=switch)
        prev = self.tracker.previous(w.idx, self.buf.prev)
        await self.sender.pages(w.idx, w.staged, prev)
        self.tracker.commit(w.idx, w.staged)
        await self.sender.end(n_pages=w.dirty_pages, devstate=w.devstate, io_log=io_log)
        await self.sender.begin(epoch + 1, wire.EpochKind.DELTA)
        await self.session.wait_ack(self.acks.future(epoch), epoch)
        return w.dirty_pages


def test_epochs_from_window_to_commit_and_ack() -> None:
    async def run() -> None:
        rng = np.random.default_rng(7)
        ram = rng.integers(0, 256, (N, PAGE), dtype=np.uint8)
        replica = np.zeros((N, PAGE), dtype=np.uint8)
        plink, slink = await link_pair()
        rx = EpochReceiver(replica)
        acked: list[int] = []
        server = asyncio.create_task(serve_replica(slink, rx, acked))
        p = Primary(plink, ram)
        p.session.start()
        try:
            # FULL epoch 1: every page while "running", then the closing window.
            await p.initial()
            ram[5] = 1  # written after the full copy: the window must catch it
            assert await p.sync_point() == 1
            assert acked == [1] and rx.committed_epoch == 1
            assert np.array_equal(replica, ram)
            assert rx.committed_devstate == b"device state 1"
            # DELTA epoch 2 with a disk write in its I/O log (kept: no disk copy here).
            ram[[3, 40, 95]] = rng.integers(0, 256, (3, PAGE), dtype=np.uint8)
            log = iolog.encode(2, [iolog.IOOp(iolog.OpKind.WRITE, 0, 4, b"abcd")])
            assert await p.sync_point(io_log=log) == 3
            assert acked == [1, 2]
            assert np.array_equal(replica, ram)
            assert rx.pending_iologs() == [log]
            # The window ran stop, then cont, at each sync point, and nothing else.
            assert p.vm.calls == ["stop", "cont", "stop", "cont"]
            # Epoch 3: pages arrive, then the primary dies before the epoch's end.
            before = ram.copy()
            ram[[0, 1]] = 9
            w = await p.window.run(resume=True)
            await p.sender.pages(w.idx, w.staged, p.tracker.previous(w.idx, p.buf.prev))
            await asyncio.sleep(0.05)
            plink.close()
            await asyncio.wait_for(server, 5)
            # Rolled back: the replica is exactly the last committed checkpoint.
            assert rx.open is None and rx.committed_epoch == 2
            assert np.array_equal(replica, before)
            with pytest.raises(ReplicationError):
                await p.session.wait_ack(p.acks.future(3), 3)
        finally:
            await p.session.close()
            plink.close()
            slink.close()
            server.cancel()
            p.window.close()
            p.tracker.close()

    asyncio.run(run())


def test_a_tampered_epoch_is_refused_and_rolled_back() -> None:
    async def run() -> None:
        ram = np.full((N, PAGE), 3, dtype=np.uint8)
        replica = np.zeros((N, PAGE), dtype=np.uint8)
        plink, slink = await link_pair()
        rx = EpochReceiver(replica)
        acked: list[int] = []
        server = asyncio.create_task(serve_replica(slink, rx, acked))
        p = Primary(plink, ram)
        p.session.start()
        try:
            await p.initial()
            await p.sync_point()
            committed = replica.copy()
            ram[7] = 8
            w = await p.window.run(resume=True)
            await p.sender.pages(w.idx, w.staged, p.tracker.previous(w.idx, p.buf.prev))
            await p.sender.part(wire.DeviceState(epoch=2, data=w.devstate))
            await p.sender.part(wire.IOLog(epoch=2, data=b""))
            # An end whose digest does not match what was sent: refused, never applied.
            await plink.send(wire.EpochEnd(epoch=2, n_pages=1, digest=b"\0" * 32))
            await asyncio.wait_for(server, 5)
            assert acked == [1] and rx.committed_epoch == 1
            assert np.array_equal(replica, committed)
        finally:
            await p.session.close()
            plink.close()
            slink.close()
            server.cancel()
            p.window.close()
            p.tracker.close()

    asyncio.run(run())
