"""The ``pause`` fault action: the agent waits at the point while the flag file exists,
once, and never longer than PAUSE_MAX_S."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kemari_suite.testing import faults


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    faults.disarm()
    yield
    faults.disarm()


def test_pause_holds_until_the_flag_is_removed_then_once_only(tmp_path: Path) -> None:
    flag = tmp_path / "pause"
    faults.arm("before-ack", count=2, target=str(flag), action="pause")
    faults.hit("before-ack")  # the first pass does not fire
    assert not flag.exists()
    done = threading.Event()

    def agent() -> None:
        faults.hit("before-ack")
        done.set()

    t = threading.Thread(target=agent)
    t.start()
    deadline = time.monotonic() + 5
    while not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert flag.read_text().split()[1] == "before-ack"
    time.sleep(0.05)
    assert not done.is_set(), "went on while the flag exists"
    flag.unlink()
    t.join(5)
    assert done.is_set()
    assert faults.armed_point() is None
    faults.hit("before-ack")  # disarmed: no pause, no flag
    assert not flag.exists()


def test_pause_gives_up_after_its_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "PAUSE_MAX_S", 0.05)
    flag = tmp_path / "pause"
    faults.arm("after-ack", target=str(flag), action="pause")
    t = time.monotonic()
    faults.hit("after-ack")
    assert time.monotonic() - t < 2
    assert not flag.exists(), "the flag is cleaned up"


def test_pause_needs_a_flag_and_unknown_actions_are_refused() -> None:
    with pytest.raises(ValueError, match="target file"):
        faults.arm("after-ack", action="pause")
    with pytest.raises(ValueError, match="known: kill, raise, pause"):
        faults.arm("after-ack", action="explode")
