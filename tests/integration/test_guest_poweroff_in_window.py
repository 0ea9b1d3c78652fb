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

from kemari_suite.checkpoint.states import PrimaryState
from kemari_suite.config import PathsConfig
from kemari_suite.vm.devstate import WARM_MIGRATIONS
from kemari_suite.vm.image import GuestImage, kernel_cmdline
from kemari_suite.vm.qemu import VMSpec
from tests.conftest import needs_root
from tests.integration.window_faults_rig import Rig, make_config

pytestmark = [pytest.mark.integration, needs_root]

OUTPUT = b"written on the way down " * 256


@pytest.mark.parametrize("mode", ["speculative", "classic"])
def test_a_sync_point_after_the_guest_powered_off_commits_and_fails_nothing(
    tmp_path: Path, run_paths: PathsConfig, guest_image: GuestImage, mode: str
) -> None:
    # A booting TCG guest shares two cores with the in-memory secondary: a roomy timeout.
    cfg = make_config(tmp_path, run_paths, mode=mode, heartbeat_timeout_ms=10000)
    spec = VMSpec(
        name=f"pw{tmp_path.name[-12:]}-{mode[:4]}",
        kernel=guest_image.kernel,
        initrd=guest_image.initrd,
        memory_mib=128,
        append=kernel_cmdline(run="sleep 10; poweroff -f"),
        accel="tcg",
    )
    rig = Rig(cfg, spec, tmp_path / "artifacts")

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
            deadline = time.monotonic() + 120
            while await rig.qemu_status() != "shutdown":
                assert time.monotonic() < deadline, "the guest never powered off"
                await asyncio.sleep(0.2)
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
