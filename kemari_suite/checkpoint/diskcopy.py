"""The disk copy a replicated disk needs at protect time, sent in the FULL epoch.

Only for a backend whose copy the engine streams itself (the built-in replicated
disk; DRBD and shared storage carry their data on their own). A full copy, or, when
the secondary still holds our copy (same lineage, at or after the epoch last
acknowledged before it was lost), only the blocks written since. Either is taken while
no committed write can reach the disk: the tap logs them in the open epoch, and they
follow in its I/O log.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from kemari_suite.protocol import wire
from kemari_suite.tap import epochs as iolog
from kemari_suite.testing import faults

if TYPE_CHECKING:
    from kemari_suite.checkpoint.primary import PrimaryAgent

#: How long the secondary has to say what copy it holds (sent first thing on a link).
PEER_STATE_TIMEOUT_S = 5.0


def _streams(agent: PrimaryAgent) -> bool:
    io = agent.io
    return io is not None and io.disk is not None and io.streams_copy


async def send_copy(agent: PrimaryAgent, epoch: int) -> None:
    """Send the disk copy (full or incremental) into the open FULL ``epoch``."""
    if not _streams(agent):
        return
    io = agent.io
    assert io is not None and io.disk is not None and agent.sender is not None
    peer = await _peer_state(agent)
    incremental = (
        bool(io.lineage)
        and peer.get("lineage") == io.lineage
        and int(peer.get("epoch", -1)) >= io.acked_at_loss
    )
    if incremental:
        chunks = io.dirty_chunks()
    else:
        io.lineage = os.urandom(8).hex()
        chunks = io.disk_chunks()
    mode = "incremental" if incremental else "full"
    kind = wire.DiskCopyMode.INCREMENTAL if incremental else wire.DiskCopyMode.FULL
    await agent.sender.send(wire.DiskCopy(kind, io.lineage, epoch))
    sent = 0
    skipped = 0
    for offset, length in chunks:
        data = await asyncio.to_thread(io.disk.read, offset, length)
        if not incremental and data.count(0) == len(data):
            # A full copy lands in a fresh sparse file: zeros need not travel.
            skipped += length
            continue
        rec = iolog.encode(epoch, [iolog.IOOp(iolog.OpKind.WRITE, offset, length, data)])
        await agent.sender.part(wire.IOLog(epoch=epoch, data=rec))
        sent += length
        faults.hit("precopy")
    agent.resync = {
        "mode": mode,
        "blocks": len(chunks),
        "bytes": sent,
        "zero_bytes_skipped": skipped,
        "epoch": epoch,
    }
    agent.artifacts.event("disk-resync", **agent.resync)


async def _peer_state(agent: PrimaryAgent) -> dict[str, Any]:
    """What the secondary says it holds ({} if it did not say in time)."""
    try:
        await asyncio.wait_for(agent.peer.disk_known.wait(), PEER_STATE_TIMEOUT_S)
    except TimeoutError:
        return {}
    return agent.peer.disk


def on_ack(agent: PrimaryAgent, epoch: int) -> None:
    """The epoch that carried a resync is committed: nothing is dirty any more."""
    if agent.resync and agent.resync.get("epoch") == epoch and agent.io is not None:
        agent.io.clear_dirty()
        agent.resync["committed"] = True


def remember_switchover(agent: PrimaryAgent, epoch: int) -> None:
    """After a switchover this copy is the peer's as of ``epoch``: the next protection
    (this host as the standby) then needs only what the peer wrote since."""
    if agent.io is not None:
        agent.io.remember(epoch)


__all__ = ["on_ack", "remember_switchover", "send_copy"]
