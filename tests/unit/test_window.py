"""The stopped window with fakes: a QMP executor, a capturer, and real trackers on numpy RAM.

Every collaborator writes into one shared log, so each test asserts the exact order of
what happened while the guest was stopped.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import numpy as np
import pytest

from kemari_suite.checkpoint.tracker import (
    PRESENT_BIT,
    SOFT_DIRTY_BIT,
    CompareTracker,
    DirtyTracker,
    SoftDirtyTracker,
    TrackerCaps,
    allocate_index,
    allocate_pages,
)
from kemari_suite.checkpoint.window import StoppedWindow, WindowError, WindowResult
from kemari_suite.errors import ReplicationError
from kemari_suite.vm.guestram import PAGE_SIZE

N_PAGES = 300
DEVSTATE = b"device state \x00\x01" * 100

Log = list[str]


class FakeVM:
    """Records QMP commands; ``fail`` names the commands that raise."""

    def __init__(self, log: Log, *, fail: tuple[str, ...] = ()) -> None:
        self.log = log
        self.fail = fail
        self.running = True

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        if cmd in self.fail:
            raise RuntimeError(f"QMP {cmd} refused")
        self.log.append(cmd)
        if cmd == "stop":
            self.running = False
        elif cmd == "cont":
            self.running = True
        return {}


class FakeCapturer:
    """Returns :data:`DEVSTATE`, after ``delay`` seconds; raises when ``fail``.

    ``during`` runs in the middle of the capture (a write by QEMU while stopped, or a
    check that the scan is running beside it).
    """

    def __init__(
        self,
        log: Log,
        *,
        delay: float = 0.0,
        fail: bool = False,
        during: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.log = log
        self.delay = delay
        self.fail = fail
        self.during = during
        self.calls = 0

    async def capture(self) -> bytes:
        self.calls += 1
        self.log.append("capture")
        if self.during is not None:
            await self.during()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise ReplicationError("migrate failed")
        self.log.append("captured")
        return DEVSTATE


class RecordingTracker:
    """A real tracker, with its stopped-window calls written into the log.

    ``scan_started`` is set when a scan begins (from the scan's own thread when the
    window overlaps it with the capture).
    """

    def __init__(self, inner: DirtyTracker, log: Log) -> None:
        self.inner = inner
        self.log = log
        self.name = inner.name
        self.n_pages = inner.n_pages
        self.caps: TrackerCaps = inner.caps
        self.scan_started = threading.Event()
        self.scan_threads: list[int | None] = []

    def reset(self, pages: np.ndarray) -> None:
        self.inner.reset(pages)

    def baseline(self) -> np.ndarray:
        return self.inner.baseline()

    def scan(self, pages: np.ndarray, *, out: np.ndarray, threads: int | None = None) -> int:
        self.log.append("scan")
        self.scan_threads.append(threads)
        self.scan_started.set()
        n = self.inner.scan(pages, out=out, threads=threads)
        self.log.append("scanned")
        return n

    def stage(self, pages: np.ndarray, idx: np.ndarray, staging: np.ndarray) -> np.ndarray:
        self.log.append("stage")
        return self.inner.stage(pages, idx, staging)

    def previous(self, idx: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        return self.inner.previous(idx, out)

    def commit(self, idx: np.ndarray, staged: np.ndarray) -> None:
        self.inner.commit(idx, staged)

    def rearm(self) -> None:
        self.log.append("rearm")
        self.inner.rearm()

    def close(self) -> None:
        self.inner.close()


class FakePagemap:
    """The kernel side of soft-dirty: the test marks pages written, clear() forgets them."""

    def __init__(self, n_pages: int, log: Log) -> None:
        self.dirty = np.zeros(n_pages, dtype=bool)
        self.log = log

    def write(self, ram: np.ndarray, idx: list[int], seed: int = 1) -> None:
        touch(ram, idx, seed)
        self.dirty[idx] = True

    def read(self, out: np.ndarray) -> None:
        present = np.uint64(1 << PRESENT_BIT)
        out[:] = present | (self.dirty.astype(np.uint64) << np.uint64(SOFT_DIRTY_BIT))

    def clear(self) -> None:
        self.log.append("clear_refs")
        self.dirty[:] = False

    def close(self) -> None:
        pass


def random_ram(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (N_PAGES, PAGE_SIZE), dtype=np.uint8)


def touch(ram: np.ndarray, idx: list[int], seed: int = 1) -> None:
    """Change one byte of every page in ``idx`` (always to a different value)."""
    rng = np.random.default_rng(seed)
    for i in idx:
        ram[i, int(rng.integers(0, PAGE_SIZE))] ^= int(rng.integers(1, 256))


class Rig:
    """A window over real RAM, a real tracker and the fakes, all logging into ``log``."""

    def __init__(
        self,
        tracker: DirtyTracker,
        *,
        vm_fail: tuple[str, ...] = (),
        capturer: FakeCapturer | None = None,
        overlap: bool = True,
        ram: np.ndarray | None = None,
    ) -> None:
        self.log: Log = []
        self.ram = random_ram() if ram is None else ram
        self.tracker = RecordingTracker(tracker, self.log)
        self.tracker.reset(self.ram)
        self.vm = FakeVM(self.log, fail=vm_fail)
        self.capturer = capturer or FakeCapturer(self.log)
        self.capturer.log = self.log
        self.window = StoppedWindow(
            self.vm,
            self.capturer,
            self.tracker,
            self.ram,
            staging=allocate_pages(N_PAGES),
            index=allocate_index(N_PAGES),
            overlap_scan=overlap,
            scan_threads=2,
        )

    def run(
        self,
        *,
        resume: bool = True,
        while_stopped: Callable[[], Awaitable[None] | None] | None = None,
    ) -> WindowResult:
        return asyncio.run(self.window.run(resume=resume, while_stopped=while_stopped))

    def close(self) -> None:
        self.window.close()
        self.tracker.close()


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    """Closes every rig a test builds."""
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()


def compare_rig(rigs: list[Rig], **kwargs: Any) -> Rig:
    rig = Rig(CompareTracker(N_PAGES, threads=2, chunk_pages=64), **kwargs)
    rigs.append(rig)
    return rig


def calls(log: Log) -> list[str]:
    """The QMP commands and the capture, in order (the order the guest sees)."""
    return [e for e in log if e in ("stop", "capture", "cont")]


WRITTEN = [0, 5, 63, 64, 150, 299]


# --------------------------------------------------------------------------- the order


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
def test_stop_capture_cont_in_that_order(rigs: list[Rig], overlap: bool) -> None:
    rig = compare_rig(rigs, overlap=overlap)
    res = rig.run()
    assert calls(rig.log) == ["stop", "capture", "cont"]
    assert rig.vm.running and res.resumed
    assert res.devstate == DEVSTATE
    assert rig.window.overlap is overlap
    # Staging follows the capture and the scan, whichever way they ran.
    assert rig.log.index("stage") > rig.log.index("captured")
    assert rig.log.index("stage") > rig.log.index("scanned")
    if overlap:
        assert "rearm" not in rig.log
    else:
        assert rig.log[rig.log.index("captured") :] == [
            "captured",
            "rearm",
            "scan",
            "scanned",
            "stage",
            "cont",
        ]
    assert rig.tracker.scan_threads == [2]


def test_overlapped_scan_runs_during_the_capture(rigs: list[Rig]) -> None:
    """The capture waits (at most 5 s) for the scan to start: it only can if beside it."""
    seen: list[bool] = []

    async def wait_for_scan() -> None:
        seen.append(await asyncio.to_thread(rig.tracker.scan_started.wait, 5.0))

    rig = compare_rig(rigs, capturer=FakeCapturer([], during=wait_for_scan))
    rig.run()
    assert seen == [True]
    assert rig.log.index("scan") < rig.log.index("captured")


def test_serial_scan_waits_for_the_capture(rigs: list[Rig]) -> None:
    seen: list[bool] = []

    async def check_no_scan() -> None:
        await asyncio.sleep(0.02)
        seen.append(rig.tracker.scan_started.is_set())

    rig = compare_rig(rigs, overlap=False, capturer=FakeCapturer([], during=check_no_scan))
    rig.run()
    assert seen == [False]


# --------------------------------------------------------------------------- the pages


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
def test_dirty_pages_are_found_and_staged_exactly(rigs: list[Rig], overlap: bool) -> None:
    rig = compare_rig(rigs, overlap=overlap)
    touch(rig.ram, WRITTEN)
    res = rig.run()
    assert res.idx.tolist() == WRITTEN and res.dirty_pages == len(WRITTEN)
    assert np.array_equal(res.staged, rig.ram[WRITTEN])
    # Staged into the preallocated buffer; the indices are a copy (the buffer is reused).
    assert np.shares_memory(res.staged, rig.window.staging)
    assert not np.shares_memory(res.idx, rig.window.index)
    rig.tracker.commit(res.idx, res.staged)
    assert rig.run().dirty_pages == 0
    touch(rig.ram, [7], seed=3)
    assert rig.run().idx.tolist() == [7]


def test_overlap_on_and_off_give_the_same_pages(rigs: list[Rig]) -> None:
    ram = random_ram()
    on = compare_rig(rigs, overlap=True, ram=ram)
    off = compare_rig(rigs, overlap=False, ram=ram)
    for seed, pages in enumerate([WRITTEN, [], [1, 2, 3, 250], list(range(0, N_PAGES, 7))]):
        touch(ram, pages, seed=seed + 10)
        a, b = on.run(), off.run()
        assert a.idx.tolist() == b.idx.tolist() == sorted(set(a.idx.tolist()))
        assert np.array_equal(a.staged, b.staged)
        on.tracker.commit(a.idx, a.staged)
        off.tracker.commit(b.idx, b.staged)
    assert np.array_equal(on.tracker.baseline(), ram)
    assert np.array_equal(off.tracker.baseline(), ram)


def test_uncommitted_pages_come_back(rigs: list[Rig]) -> None:
    """The window never commits: the caller does, once the pages are handed on."""
    rig = compare_rig(rigs)
    touch(rig.ram, [9, 10])
    assert rig.run().idx.tolist() == [9, 10]
    assert rig.run().idx.tolist() == [9, 10]


# --------------------------------------------------------------------------- while stopped


def test_while_stopped_runs_after_staging_and_before_cont(rigs: list[Rig]) -> None:
    rig = compare_rig(rigs)
    touch(rig.ram, WRITTEN)
    seen: dict[str, Any] = {}

    def switch() -> None:
        rig.log.append("switch")
        seen["running"] = rig.vm.running
        seen["staged"] = rig.window.staging[: len(WRITTEN)].copy()

    rig.run(while_stopped=switch)
    assert rig.log[-3:] == ["stage", "switch", "cont"]
    assert seen["running"] is False
    assert np.array_equal(seen["staged"], rig.ram[WRITTEN])


def test_while_stopped_may_be_async(rigs: list[Rig]) -> None:
    rig = compare_rig(rigs)

    async def switch() -> None:
        await asyncio.sleep(0.005)
        rig.log.append("switch")

    res = rig.run(while_stopped=switch)
    assert rig.log[-2:] == ["switch", "cont"]
    assert res.pause_ms >= 5.0


# --------------------------------------------------------------------------- resume or not


def test_resume_false_leaves_the_guest_stopped(rigs: list[Rig]) -> None:
    rig = compare_rig(rigs)
    touch(rig.ram, [3])
    res = rig.run(resume=False)
    assert calls(rig.log) == ["stop", "capture"]
    assert not rig.vm.running and not res.resumed
    assert res.pause_ms == 0.0
    assert res.idx.tolist() == [3]


def test_timings_add_up(rigs: list[Rig]) -> None:
    rig = compare_rig(rigs, overlap=False, capturer=FakeCapturer([], delay=0.02))
    res = rig.run()
    assert res.devstate_ms >= 20.0
    parts = res.stop_ms + res.devstate_ms + res.scan_ms + res.stage_ms
    assert 0 < parts <= res.pause_ms
    assert res.t_start < res.t_end
    assert res.pause_ms == pytest.approx((res.t_end - res.t_start) * 1e3)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
def test_the_capture_alone_is_timed(rigs: list[Rig], overlap: bool) -> None:
    rig = compare_rig(rigs, overlap=overlap, capturer=FakeCapturer([], delay=0.02))
    res = rig.run()
    assert res.capture_ms >= 20.0
    if overlap:  # devstate_ms also waited for the scan beside it
        assert res.capture_ms <= res.devstate_ms
    else:
        assert res.capture_ms == res.devstate_ms


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
def test_capture_failure_leaves_the_guest_stopped(rigs: list[Rig], overlap: bool) -> None:
    rig = compare_rig(rigs, overlap=overlap, capturer=FakeCapturer([], fail=True))
    with pytest.raises(WindowError) as info:
        rig.run()
    err = info.value
    assert (err.step, err.stopped) == ("capture", True)
    assert isinstance(err, ReplicationError)
    assert isinstance(err.__cause__, ReplicationError)
    assert calls(rig.log) == ["stop", "capture"]
    assert not rig.vm.running
    if overlap:
        # The scan thread finished before the error left the window.
        assert "scanned" in rig.log


def test_while_stopped_failure_names_its_step(rigs: list[Rig]) -> None:
    rig = compare_rig(rigs)

    def switch() -> None:
        raise ValueError("epoch switch broke")

    with pytest.raises(WindowError) as info:
        rig.run(while_stopped=switch)
    assert (info.value.step, info.value.stopped) == ("epoch switch", True)
    assert isinstance(info.value.__cause__, ValueError)
    assert "cont" not in rig.log and not rig.vm.running


def test_stop_failure_says_the_guest_runs(rigs: list[Rig]) -> None:
    rig = compare_rig(rigs, vm_fail=("stop",))
    with pytest.raises(WindowError) as info:
        rig.run()
    assert (info.value.step, info.value.stopped) == ("stop", False)
    assert rig.log == [] and rig.capturer.calls == 0 and rig.vm.running


def test_cont_failure_says_the_guest_is_stopped(rigs: list[Rig]) -> None:
    rig = compare_rig(rigs, vm_fail=("cont",))
    with pytest.raises(WindowError) as info:
        rig.run()
    assert (info.value.step, info.value.stopped) == ("cont", True)
    assert not rig.vm.running


# --------------------------------------------------------------------------- soft-dirty


@pytest.fixture
def soft(rigs: list[Rig]) -> tuple[Rig, FakePagemap]:
    log: Log = []
    kernel = FakePagemap(N_PAGES, log)
    rig = Rig(SoftDirtyTracker(N_PAGES, source=kernel, batch_pages=16), overlap=True)
    kernel.log = rig.log
    rigs.append(rig)
    return rig, kernel


def test_soft_dirty_never_scans_beside_the_capture(soft: tuple[Rig, FakePagemap]) -> None:
    rig, kernel = soft
    assert not rig.tracker.caps.scan_during_capture
    assert not rig.window.overlap  # asked for, refused by the tracker's caps
    kernel.write(rig.ram, WRITTEN)
    res = rig.run()
    assert res.idx.tolist() == WRITTEN
    assert np.array_equal(res.staged, rig.ram[WRITTEN])
    assert [e for e in rig.log if e != "scanned"] == [
        "stop",
        "capture",
        "captured",
        "rearm",
        "clear_refs",
        "scan",
        "stage",
        "cont",
    ]


def test_soft_dirty_catches_a_write_made_during_the_capture(
    soft: tuple[Rig, FakePagemap],
) -> None:
    """QEMU may write guest RAM while stopped (a virtio completion as its backend
    drains): the bits are read after the capture, so this window sends that page."""
    rig, kernel = soft

    async def qemu_writes() -> None:
        kernel.write(rig.ram, [42], seed=7)

    rig.capturer.during = qemu_writes
    kernel.write(rig.ram, [1])
    res = rig.run()
    assert res.idx.tolist() == [1, 42]
    rig.tracker.commit(res.idx, res.staged)
    rig.capturer.during = None
    assert rig.run().dirty_pages == 0
    assert np.array_equal(rig.tracker.baseline(), rig.ram)
