"""Fault points at every step of the stopped window, and the QMP timeout, without QEMU:
the window's collaborators from tests/unit/test_window.py (fake QMP and capturer, a real
tracker on numpy RAM). The same points on a real QEMU: tests/integration/
test_window_faults_qemu.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kemari_suite.checkpoint.window import QMPTimeout, WindowError
from kemari_suite.testing import faults
from tests.unit.test_window import FakeCapturer, Rig, compare_rig

#: The window's points, the step each one fails, and whether the guest is then stopped.
WINDOW_POINTS = [
    ("window-stop", "stop", True),
    ("window-capture", "capture", True),
    ("window-scan", "scan", True),
    ("window-stage", "stage", True),
    ("stopped", "epoch switch", True),
    ("window-cont", "cont", True),
]


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    faults.disarm()
    yield
    faults.disarm()


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()


def test_every_window_step_has_a_fault_point_in_checkpoint_order() -> None:
    names = list(faults.POINTS)
    points = [p for p, _, _ in WINDOW_POINTS]
    assert all(p in names for p in points)
    assert [names.index(p) for p in points] == sorted(names.index(p) for p in points)
    for p in ("window-send", "ack-wait"):
        assert p in names


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
@pytest.mark.parametrize(("point", "step", "stopped"), WINDOW_POINTS)
def test_a_raised_fault_names_its_step(
    rigs: list[Rig], overlap: bool, point: str, step: str, stopped: bool
) -> None:
    rig = compare_rig(rigs, overlap=overlap)
    faults.arm(point, action="raise")
    with pytest.raises(WindowError) as info:
        rig.run()
    err = info.value
    assert (err.step, err.stopped, err.hung) == (step, stopped, False)
    assert isinstance(err.__cause__, faults.InjectedFault) and err.__cause__.point == point
    assert not rig.vm.running
    # Once only: the next window runs through.
    assert faults.armed_point() is None
    assert rig.run().resumed and rig.vm.running


def test_raise_is_once_and_kill_stays_the_default() -> None:
    faults.arm("window-scan", count=2, action="raise")
    faults.hit("window-scan")
    with pytest.raises(faults.InjectedFault):
        faults.hit("window-scan")
    faults.hit("window-scan")  # disarmed
    with pytest.raises(ValueError, match="unknown fault action"):
        faults.arm("window-scan", action="explode")
    with pytest.raises(ValueError, match="unknown fault point"):
        faults.arm("window-nowhere", action="raise")


def test_the_control_command_arms_a_raise() -> None:
    asyncio.run(faults.control_handler({"point": "ack-wait", "action": "raise"}))
    assert faults.armed_point() == "ack-wait"
    with pytest.raises(faults.InjectedFault):
        faults.hit("ack-wait")


class HangingVM:
    """A QMP executor whose ``hang`` commands never answer (a frozen QEMU)."""

    def __init__(self, hang: tuple[str, ...]) -> None:
        self.hang = hang
        self.running = True
        self.log: list[str] = []

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        self.log.append(cmd)
        if cmd in self.hang:
            await asyncio.Event().wait()
        if cmd in ("stop", "cont"):
            self.running = cmd == "cont"
        return {}


class HangingCapturer(FakeCapturer):
    async def capture(self) -> bytes:
        await asyncio.Event().wait()
        return b""


@pytest.mark.parametrize(
    ("hang", "step", "stopped"),
    [("stop", "stop", False), ("cont", "cont", True), ("migrate", "capture", True)],
)
def test_a_qemu_that_does_not_answer_is_hung_within_the_timeout(
    rigs: list[Rig], hang: str, step: str, stopped: bool
) -> None:
    rig = compare_rig(rigs)
    rig.window.vm = HangingVM((hang,))
    if hang == "migrate":
        rig.window.capturer = HangingCapturer([])
    rig.window.qmp_timeout_s = 0.2
    t0 = time.monotonic()
    with pytest.raises(WindowError) as info:
        rig.run()
    took = time.monotonic() - t0
    assert 0.2 <= took < 5.0
    err = info.value
    assert (err.step, err.stopped, err.hung) == (step, stopped, True)
    assert isinstance(err.__cause__, QMPTimeout) and err.__cause__.timeout_s == 0.2
    assert "200 ms" in str(err)
