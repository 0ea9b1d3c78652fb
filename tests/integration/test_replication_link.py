"""The secondary against a hand-driven primary over loopback TCP: it commits only
complete, verified epochs, and a forged or corrupt frame leaves the replica at its last
committed checkpoint."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from kemari_suite.config import KemariConfig, PathsConfig, load
from kemari_suite.errors import AuthError, ConnectError, ProtocolError
from kemari_suite.protocol import wire
from kemari_suite.protocol.codec import PageEncoder
from kemari_suite.protocol.link import Link, connect
from kemari_suite.replica.secondary import SecondaryAgent
from kemari_suite.vm.qemu import VMSpec

KEY = "k" * 64
MIB = 16
N = MIB * 256


def _cfg(run_paths: PathsConfig) -> KemariConfig:
    base = load(None)
    return dataclasses.replace(
        base,
        paths=run_paths,
        replication=dataclasses.replace(base.replication, key=KEY, listen="127.0.0.1:0"),
    )


async def _send_epoch(
    link: Link,
    epoch: int,
    kind: wire.EpochKind,
    idx: np.ndarray,
    pages: np.ndarray,
    old: np.ndarray | None,
    *,
    bad_digest: bool = False,
) -> None:
    await link.send(wire.EpochBegin(epoch=epoch, kind=kind, ram_size=N * 4096, page_size=4096))
    dg = wire.EpochDigest(epoch)
    msgs: list[wire.Message] = [
        wire.Pages(epoch=epoch, encoded=PageEncoder("zstd").encode(idx, pages, old)),
        wire.DeviceState(epoch=epoch, data=b"device-state-%d" % epoch),
        wire.IOLog(epoch=epoch, data=b""),
    ]
    for m in msgs:
        dg.update(m)  # type: ignore[arg-type]
        await link.send(m)
    digest = dg.digest()
    if bad_digest:
        digest = bytes(32)
    await link.send(wire.EpochEnd(epoch=epoch, n_pages=len(idx), digest=digest))


async def _reply(link: Link) -> wire.Message:
    """The next message that answers us (heartbeats, the disk and RAM state and
    compatibility verdicts skipped)."""
    while True:
        msg = await asyncio.wait_for(link.recv(), 10)
        if not isinstance(
            msg, wire.Heartbeat | wire.DiskState | wire.RamState | wire.CompatVerdict
        ):
            return msg


def test_commit_rules_and_forgery(run_paths: PathsConfig) -> None:
    cfg = _cfg(run_paths)
    spec = VMSpec(
        name="rl", kernel=Path("/nonexistent"), initrd=Path("/nonexistent"), memory_mib=MIB
    )
    rng = np.random.default_rng(1)

    async def main() -> None:
        agent = SecondaryAgent(cfg, spec)
        task = asyncio.create_task(agent.run())
        for _ in range(200):
            if agent._server is not None:
                break
            await asyncio.sleep(0.01)
        assert agent._server is not None
        port = agent._server.sockets[0].getsockname()[1]
        addr = f"127.0.0.1:{port}"
        try:
            # 1. A full epoch commits and is acknowledged.
            link = await connect(addr, key=KEY.encode(), node_id="p", timeout=5)
            ram = rng.integers(0, 256, size=(N, 4096), dtype=np.uint8)
            ram[::3] = 0
            await _send_epoch(link, 1, wire.EpochKind.FULL, np.arange(N), ram, None)
            ack = await _reply(link)
            assert isinstance(ack, wire.Ack) and ack.epoch == 1
            assert agent.committed_epoch == 1
            assert agent.replica is not None
            assert np.array_equal(agent.replica.pages, ram)
            # 2. A delta epoch whose digest does not verify is rolled back.
            idx = np.sort(rng.choice(N, 300, replace=False)).astype(np.int64)
            new = ram[idx].copy()
            new[:, :100] ^= 0x5A
            await _send_epoch(link, 2, wire.EpochKind.DELTA, idx, new, ram[idx], bad_digest=True)
            reply = await _reply(link)
            assert isinstance(reply, wire.Resync) and "digest" in reply.reason
            await asyncio.sleep(0.2)
            assert agent.committed_epoch == 1
            assert np.array_equal(agent.replica.pages, ram), "rejected epoch left pages behind"
            link.close()
            # 3. A primary without the key cannot even finish the handshake.
            with pytest.raises((AuthError, ConnectError, ProtocolError, ConnectionError)):
                bad = await connect(addr, key=b"wrong" * 8, node_id="x", timeout=5)
                await bad.recv()
            # 4. A frame with a flipped bit mid-epoch: the open epoch is dropped.
            link = await connect(addr, key=KEY.encode(), node_id="p", timeout=5)
            await link.send(
                wire.EpochBegin(
                    epoch=2, kind=wire.EpochKind.DELTA, ram_size=N * 4096, page_size=4096
                )
            )
            await link.send(wire.Pages(epoch=2, encoded=PageEncoder().encode(idx, new, ram[idx])))
            parts = link.session.encode_parts(wire.DeviceState(epoch=2, data=b"x" * 1000))
            raw = bytearray(b"".join(parts))
            raw[40] ^= 1
            link.writer.write(bytes(raw))
            await link.writer.drain()
            await asyncio.sleep(0.5)
            assert agent.committed_epoch == 1
            assert agent.open is None
            assert np.array_equal(agent.replica.pages, ram), "corrupt frame changed the replica"
            link.close()
            events = "\n".join(p.read_text() for p in (run_paths.run_dir).rglob("events.jsonl"))
            assert "rollback" in events and "rejected" in events
        finally:
            agent._stop.set()
            await task

    asyncio.run(main())
    assert not any(run_paths.shm_dir.iterdir()), "replica file left behind"
