"""The new primary's first epoch after a planned switchover: a delta, when it is safe.

At a switchover both hosts hold the same memory: the old primary's stopped guest RAM
is the checkpoint the standby resumed. So the old primary, turning standby, keeps that
RAM file as its replica, and the new primary sends only what its guest changed since
the resume, instead of a full copy of every page::

    standby (new primary)                      old primary (new standby)
    ─────────────────────                      ─────────────────────────
    SwitchoverRequest(E) accepted
    replica digest (a thread) ─┐               stopped at E, waits
    QEMU started, -incoming    │
    arm_at_resume: tracker     │               Switched(done)
      armed, guest stopped     │               QEMU quits; RAM file kept
    restore, digest ◄──────────┘               standby: RAM file = baseline E,
    cont: the guest runs                         its digest hashed
    connect ─────────────────────────────────► DiskState, RamState(E, lineage, digest)
    delta_refusal(ours, theirs) == ""?
      yes: DELTA epoch E+1 = the tracked pages (+ the disk's dirty blocks)
      no:  FULL epoch E+1, as after a failover

The tracker is armed (:func:`arm_at_resume`: ``reset`` on the resumed RAM) before
``cont``, so every write of the guest on this host is reported: uffd-wp write-protects
every page; soft-dirty clears the bits; a shadow tracker's shadow becomes the resumed
RAM. The delta is used only when both sides prove they hold the same checkpoint: the same
epoch, the same lineage (the disk copy's, from the switchover request), and equal RAM
digests (:func:`~kemari_suite.vm.guestram.ram_digest`: SHA-256 over every page, hashed
on each host from its own copy). Any doubt (no digest, a mismatch, no answer, a
reconnection, a tracker reset since) and the first epoch is FULL. The standby's baseline
is never resumed by a failover (it has no device state); the first committed DELTA makes
it a checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kemari_suite.checkpoint.tracker import DirtyTracker, make_tracker
from kemari_suite.checkpoint.uffdwp import refuse_qemu_userfaultfd
from kemari_suite.config import KemariConfig
from kemari_suite.protocol import wire
from kemari_suite.vm.guestram import PAGE_SIZE, GuestRAM
from kemari_suite.vm.qemu import AsyncVM

if TYPE_CHECKING:
    from kemari_suite.checkpoint.primary import PrimaryAgent

#: How long the standby has to say which checkpoint it keeps (sent first thing on a link).
RAM_STATE_TIMEOUT_S = 5.0
#: :func:`delta_refusal`'s answer when both hold the same checkpoint but not the same bytes.
DIGEST_MISMATCH = "the standby's RAM differs from the resumed checkpoint (digest mismatch)"


@dataclass(frozen=True)
class SwitchBaseline:
    """The checkpoint a switchover resumed here: its epoch, its lineage (the disk copy's,
    as the switchover request named it) and the digest of its RAM."""

    epoch: int
    lineage: str
    digest: bytes


def delta_refusal(ours: SwitchBaseline | None, theirs: wire.RamState | None) -> str:
    """Why the first epoch must be FULL ("" when a DELTA on the peer's kept checkpoint
    is safe): the same epoch, lineage and RAM digest on both sides, or a full copy."""
    if ours is None:
        return "no switchover checkpoint resumed here"
    if not ours.digest:
        return "the resumed checkpoint's digest is unknown"
    if theirs is None:
        return "the standby did not say which checkpoint it keeps"
    if theirs.epoch == wire.NO_EPOCH:
        return "the standby keeps no switchover checkpoint"
    if theirs.epoch != ours.epoch:
        return f"the standby keeps epoch {theirs.epoch}, this host resumed {ours.epoch}"
    if theirs.lineage != ours.lineage:
        return f"the standby's checkpoint is of lineage {theirs.lineage!r}, not {ours.lineage!r}"
    if not hmac.compare_digest(bytes(theirs.digest), ours.digest):
        return DIGEST_MISMATCH
    return ""


async def peer_ram_state(agent: PrimaryAgent) -> wire.RamState | None:
    """What the secondary says it keeps (None if it did not say in time)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(agent.peer.ram_known.wait(), RAM_STATE_TIMEOUT_S)
    return agent.peer.ram


async def build_tracker(cfg: KemariConfig, vm: AsyncVM) -> DirtyTracker:
    """The dirty-page tracker ``replication.tracker`` names, for ``vm`` (see
    :func:`~.tracker.make_tracker`); not armed yet.

    Raises:
        ConfigError, ReplicationError: as :func:`~.tracker.make_tracker`, or QEMU runs a
            userfaultfd of its own beside the uffd-wp helper.
    """
    rcfg = cfg.replication
    spec = vm.spec
    await refuse_qemu_userfaultfd(vm, rcfg.tracker, spec.wp_helper)
    # Two threads for the stop-time scan: the vCPUs are idle then.
    return await asyncio.to_thread(
        make_tracker,
        rcfg.tracker,
        n_pages=spec.memory_mib * 1024 * 1024 // PAGE_SIZE,
        qemu_pid=vm.pid,
        ram_path=vm.paths.ram,
        threads=2,
        wp_socket=vm.paths.wp_socket if spec.wp_helper else None,
        wp_unavailable=spec.wp_helper_reason,
        verify=rcfg.tracker_verify,
    )


async def arm_at_resume(cfg: KemariConfig, vm: AsyncVM) -> DirtyTracker:
    """Build the tracker for a resumed, still stopped ``vm`` and take its RAM (the
    checkpoint) as the baseline: every write from ``cont`` on is reported.

    Raises:
        ConfigError, ReplicationError: as :func:`build_tracker`, or the arming failed.
    """
    tracker = await build_tracker(cfg, vm)
    try:
        with GuestRAM(vm.paths.ram, populate=False) as ram:
            await asyncio.to_thread(tracker.reset, ram.pages)
    except BaseException:
        tracker.close()
        raise
    return tracker


__all__ = [
    "DIGEST_MISMATCH",
    "RAM_STATE_TIMEOUT_S",
    "SwitchBaseline",
    "arm_at_resume",
    "build_tracker",
    "delta_refusal",
    "peer_ram_state",
]
