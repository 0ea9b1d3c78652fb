"""No failure leaves the guest stopped (issue 13, item 4), on a real QEMU under TCG.

A failure is injected at every step of a sync point (``faults.arm(point,
action="raise")``), in speculative and classic mode. Whatever the step, the guest ends
running (QMP ``query-status`` says so), and the output of the epoch that failed is still
held (logged, not on the disk) unless its acknowledgement came. The loss path that
follows (no tiebreaker: HELD) keeps it running and held.

Also without fault injection: a classic-mode secondary that never acknowledges (the
ack timeout), and a link lost while the classic primary waits, both used to leave the
guest paused for good.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from kemari_suite.checkpoint import loss
from kemari_suite.checkpoint.states import PrimaryState
from kemari_suite.config import PathsConfig
from kemari_suite.errors import KemariError
from kemari_suite.testing import faults
from tests.conftest import needs_root
from tests.integration.window_faults_rig import Rig, guest_spec, make_config

pytestmark = [pytest.mark.integration, needs_root]

#: Every step of a sync point, in order (see faults.POINTS).
STEPS = [
    "window-stop",
    "window-capture",
    "window-scan",
    "window-stage",
    "stopped",
    "window-cont",
    "window-send",
    "before-ack",
    "ack-wait",
]
OUTPUT = b"held output " * 512


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    faults.disarm()
    yield
    faults.disarm()


def _rig(tmp_path: Path, run_paths: PathsConfig, mode: str, tag: str, **kw: object) -> Rig:
    cfg = make_config(tmp_path, run_paths, mode=mode, **kw)  # type: ignore[arg-type]
    return Rig(cfg, guest_spec(tag), tmp_path / "artifacts")


@pytest.mark.parametrize("mode", ["speculative", "classic"])
@pytest.mark.parametrize("point", STEPS)
def test_a_failure_at_every_step_leaves_the_guest_running(
    tmp_path: Path, run_paths: PathsConfig, mode: str, point: str
) -> None:
    async def run() -> None:
        rig = _rig(tmp_path, run_paths, mode, point[:6])
        try:
            await rig.start()
            a = rig.agent
            assert await rig.qemu_status() == "running"
            epoch = await rig.guest_writes(OUTPUT)
            assert rig.held(epoch) and not rig.on_disk(OUTPUT)
            faults.arm(point, action="raise")
            with pytest.raises(KemariError) as info:
                await asyncio.wait_for(a.sync_point("test"), 30)
            assert faults.armed_point() is None, "the fault point was never reached"
            assert "injected fault" in str(info.value)
            # The guest runs on, whatever step failed.
            assert await rig.qemu_status() == "running"
            acked = a.last_committed_epoch >= epoch
            if not acked:
                # Never acknowledged: the output is still held, never released.
                assert rig.held(epoch) and not rig.on_disk(OUTPUT)
            # The run loop's loss path (no tiebreaker): HELD, running, still held.
            await loss.secondary_lost(a, f"test: {info.value}")
            assert a.state is PrimaryState.HELD
            assert await rig.qemu_status() == "running"
            if not acked:
                assert rig.held(epoch) and not rig.on_disk(OUTPUT)
                assert a.status_dict()["held_bytes"] >= len(OUTPUT)
        finally:
            await rig.close()

    asyncio.run(run())


def test_classic_ack_timeout_resumes_the_guest_with_output_held(
    tmp_path: Path, run_paths: PathsConfig
) -> None:
    """The secondary verifies the epoch but never acknowledges it: the classic primary
    gives up after the heartbeat timeout and must not leave the guest paused."""

    async def run() -> None:
        rig = _rig(tmp_path, run_paths, "classic", "acktmo")
        try:
            await rig.start()
            assert rig.replica is not None
            rig.replica.ack = False
            epoch = await rig.guest_writes(OUTPUT)
            with pytest.raises(KemariError):
                await asyncio.wait_for(rig.agent.sync_point("test"), 30)
            assert await rig.qemu_status() == "running"
            assert rig.held(epoch) and not rig.on_disk(OUTPUT)
            assert any(e["event"] == "guest-resumed" for e in rig.events())
        finally:
            await rig.close()

    asyncio.run(run())


def test_classic_link_loss_while_stopped_resumes_the_guest(
    tmp_path: Path, run_paths: PathsConfig
) -> None:
    """The link drops while the classic primary waits for the acknowledgement."""

    async def run() -> None:
        rig = _rig(tmp_path, run_paths, "classic", "linkls")
        try:
            await rig.start()
            assert rig.replica is not None
            replica = rig.replica
            replica.before_ack = lambda _epoch: replica.link.close()
            epoch = await rig.guest_writes(OUTPUT)
            with pytest.raises(KemariError):
                await asyncio.wait_for(rig.agent.sync_point("test"), 30)
            assert await rig.qemu_status() == "running"
            assert rig.held(epoch) and not rig.on_disk(OUTPUT)
        finally:
            await rig.close()

    asyncio.run(run())


def test_a_successful_sync_point_releases_the_output(
    tmp_path: Path, run_paths: PathsConfig
) -> None:
    """The rig itself: without a fault the epoch is acknowledged and its output lands."""

    async def run() -> None:
        rig = _rig(tmp_path, run_paths, "classic", "ok")
        try:
            await rig.start()
            epoch = await rig.guest_writes(OUTPUT)
            await asyncio.wait_for(rig.agent.sync_point("test"), 30)
            assert rig.agent.last_committed_epoch >= epoch
            assert await rig.qemu_status() == "running"
            assert rig.agent.io is not None
            await asyncio.wait_for(rig.agent.io.released(epoch), 10)
            assert not rig.held(epoch) and rig.on_disk(OUTPUT)
        finally:
            await rig.close()

    asyncio.run(run())
