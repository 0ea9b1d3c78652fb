"""A guest that powers itself off between two sync points is not a host failure, on a
real QEMU under TCG.

QEMU runs with ``-no-shutdown``: the guest's ``poweroff -f`` leaves it in the run state
``shutdown``, where ``stop`` is a no-op and ``cont`` is refused until a reset. A sync
point that starts before the agent has handled the guest's SHUTDOWN event used to see
that refusal, retry it and declare this host failed (the primary exited 2 instead of
forwarding the shutdown; found by CI in tests/e2e/test_reprotect.py). Here the guest
powers off, the output it wrote on its way down is held, and the sync point is taken
as the race takes it: the epoch must commit with the guest left down, no failure, and
the final checkpoint must then release the output and forward the event.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from kemari_suite.checkpoint import commands, loss
from kemari_suite.checkpoint.states import PrimaryState
from kemari_suite.config import PathsConfig
from kemari_suite.vm.devstate import WARM_MIGRATIONS
from kemari_suite.vm.image import GuestImage, kernel_cmdline
from kemari_suite.vm.qemu import VMSpec
from tests.conftest import needs_root
from tests.integration.window_faults_rig import OUT_OFFSET, Rig, make_config

pytestmark = [pytest.mark.integration, needs_root]

OUTPUT = b"written on the way down " * 256


def _rig(
    tmp_path: Path, run_paths: PathsConfig, image: GuestImage, mode: str, **rep: object
) -> Rig:
    """A kernel guest that powers itself off 10 s after boot."""
    # A booting TCG guest shares two cores with the in-memory secondary: a roomy timeout.
    cfg = make_config(tmp_path, run_paths, mode=mode, heartbeat_timeout_ms=10000, **rep)
    spec = VMSpec(
        name=f"pw{tmp_path.name[-12:]}-{mode[:4]}",
        kernel=image.kernel,
        initrd=image.initrd,
        memory_mib=128,
        append=kernel_cmdline(run="sleep 10; poweroff -f"),
        accel="tcg",
    )
    return Rig(cfg, spec, tmp_path / "artifacts")


async def _powered_off(rig: Rig) -> None:
    deadline = time.monotonic() + 120
    while await rig.qemu_status() != "shutdown":
        assert time.monotonic() < deadline, "the guest never powered off"
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("mode", ["speculative", "classic"])
def test_a_sync_point_after_the_guest_powered_off_commits_and_fails_nothing(
    tmp_path: Path, run_paths: PathsConfig, guest_image: GuestImage, mode: str
) -> None:
    rig = _rig(tmp_path, run_paths, guest_image, mode)

    async def run() -> None:
        try:
            await rig.start()
            a = rig.agent
            # Warm sync points first: from then on the device state is captured with
            # a save that leaves QEMU's run state alone (a migration would turn
            # "shutdown" into "postmigrate", where cont is allowed), as in production.
            assert a.capturer is not None
            while a.capturer.migrations < WARM_MIGRATIONS:
                await asyncio.wait_for(a.sync_point("warm-up"), 60)
            assert a.capturer.prefix is not None, a.capturer.why
            assert await rig.qemu_status() == "running", "powered off during the warm-up"
            await _powered_off(rig)
            epoch = await rig.guest_writes(OUTPUT)
            assert rig.held(epoch) and not rig.on_disk(OUTPUT)
            # The race: a sync point before the protect loop handled the event.
            await asyncio.wait_for(a.sync_point("test"), 60)
            assert a.last_committed_epoch >= epoch
            assert a.state is PrimaryState.PROTECTED, a.life.reason
            assert await rig.qemu_status() == "shutdown"
            names = [e["event"] for e in rig.events()]
            assert "host-failure" not in names and "guest-resumed" not in names
            # The guest's event was seen, and the protect loop's next step is the
            # final checkpoint: the output reaches the disk, the agent stops.
            assert a.guest.stopped == "SHUTDOWN"
            await asyncio.wait_for(a.guest.final_checkpoint(), 60)
            assert rig.on_disk(OUTPUT)
            assert a._stop.is_set()
        finally:
            await rig.close()

    asyncio.run(run())


def test_resuming_at_the_held_bound_a_guest_that_powered_off_is_no_host_failure(
    tmp_path: Path, run_paths: PathsConfig, guest_image: GuestImage
) -> None:
    """HELD (no secondary, no tiebreaker), the guest powers off, the held writes reach
    the bound (the pause's ``stop`` is a no-op on it), then ``release --solo`` resumes:
    QEMU refuses ``cont``, and that must not kill it as a failed host."""
    rig = _rig(tmp_path, run_paths, guest_image, "speculative", held_limit_mib=1)

    async def run() -> None:
        try:
            await rig.start()
            a = rig.agent
            assert rig.replica is not None
            await rig.replica.close()
            await loss.secondary_lost(a, "test: the secondary is gone")
            assert a.state is PrimaryState.HELD
            await _powered_off(rig)
            chunk = b"h" * (256 << 10)
            for i in range(4):
                await rig.guest_writes(chunk, OUT_OFFSET + i * len(chunk))
            deadline = time.monotonic() + 10
            while not a.status_dict()["held_paused"]:
                assert time.monotonic() < deadline, "the bound never paused the guest"
                await asyncio.sleep(0.05)
            res = await asyncio.wait_for(commands.handlers(a)["release"]({"solo": True}), 30)
            assert res["released"] is True, res
            assert a.vm.alive() and await rig.qemu_status() == "shutdown"
            names = [e["event"] for e in rig.events()]
            assert "host-failure" not in names and "guest-stopped-itself" in names
            assert rig.on_disk(chunk, OUT_OFFSET)
        finally:
            await rig.close()

    asyncio.run(run())
