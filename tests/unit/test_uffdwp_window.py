"""The stopped window with the uffd-wp tracker on this kernel: the scan and the staging
run beside the capture, and the rescan after it catches what "QEMU" wrote meanwhile.

The RAM is a shared file written by a child process with the helper preloaded (as in
``test_uffdwp``); the capture is a fake that lets the child write pages while it runs,
after the first scan and staging are done.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kemari_suite.checkpoint.tracker import allocate_index, allocate_pages
from kemari_suite.checkpoint.uffdwp import UffdWpTracker
from kemari_suite.checkpoint.window import StoppedWindow, WindowResult
from kemari_suite.vm.guestram import PAGE_SIZE
from tests.unit.test_uffdwp import KERNEL_OK, KERNEL_WHY, N_PAGES, Writer, helper, scan  # noqa: F401
from tests.unit.test_window import FakeCapturer, FakeVM, Log

pytestmark = pytest.mark.skipif(not KERNEL_OK, reason=KERNEL_WHY)


class StagedSignal:
    """The uffd-wp tracker, signalling when its first staging is done."""

    def __init__(self, inner: UffdWpTracker, log: Log) -> None:
        self.inner = inner
        self.log = log
        self.name = inner.name
        self.reason = inner.reason
        self.n_pages = inner.n_pages
        self.caps = inner.caps
        self.staged = threading.Event()

    def reset(self, pages: np.ndarray) -> None:
        self.inner.reset(pages)

    def baseline(self) -> np.ndarray:
        return self.inner.baseline()

    def scan(self, pages: np.ndarray, *, out: np.ndarray, threads: int | None = None) -> int:
        self.log.append("scan")
        return self.inner.scan(pages, out=out, threads=threads)

    def rescan(self, out: np.ndarray, *, threads: int | None = None) -> int:
        self.log.append("rescan")
        return self.inner.rescan(out, threads=threads)

    def stage(self, pages: np.ndarray, idx: np.ndarray, staging: np.ndarray) -> np.ndarray:
        self.log.append("stage")
        out = self.inner.stage(pages, idx, staging)
        self.staged.set()
        return out

    def previous(self, idx: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        return self.inner.previous(idx, out)

    def commit(self, idx: np.ndarray, staged: np.ndarray) -> None:
        self.inner.commit(idx, staged)

    def rearm(self) -> None:
        self.inner.rearm()

    def close(self) -> None:
        self.inner.close()


class Rig:
    def __init__(self, writer: Writer, *, staging_pages: int = N_PAGES) -> None:
        self.writer = writer
        self.log: Log = []
        self.ram = np.memmap(writer.ram, dtype=np.uint8, mode="r", shape=(N_PAGES, PAGE_SIZE))
        self.tracker = StagedSignal(writer.tracker(), self.log)
        self.during: list[int] = []
        self.await_stage = False
        self.capturer = FakeCapturer(self.log, during=self._write_during)
        self.window = StoppedWindow(
            FakeVM(self.log),
            self.capturer,
            self.tracker,
            self.ram,
            staging=allocate_pages(staging_pages),
            index=allocate_index(N_PAGES),
            overlap_scan=True,
            stage_during_capture=True,
        )

    async def _write_during(self) -> None:
        """QEMU writing guest RAM while stopped, after the first scan and staging (a
        capture that ``await_stage`` only waits for the staging, writing nothing)."""
        if not self.during and not self.await_stage:
            return
        assert await asyncio.to_thread(self.tracker.staged.wait, 30)
        if self.during:
            await asyncio.to_thread(self.writer.write, self.during)

    def run(self) -> WindowResult:
        self.tracker.staged.clear()
        return asyncio.run(self.window.run(resume=True))

    def close(self) -> None:
        self.window.close()
        self.tracker.close()


@pytest.fixture
def rig(tmp_path: Path, helper: Path) -> Iterator[Rig]:  # noqa: F811
    w = Writer(tmp_path, helper)
    r = Rig(w)
    try:
        yield r
    finally:
        r.close()
        w.close()


def staged_bytes(res: WindowResult) -> dict[int, bytes]:
    assert res.staged is not None
    return {int(p): res.staged[i].tobytes() for i, p in enumerate(res.idx)}


def test_uffd_wp_stages_beside_the_capture(rig: Rig) -> None:
    assert rig.window.early_stage and rig.window.overlap
    rig.writer.write([3, 7, 100])
    rig.await_stage = True  # a capture slower than the staging, as QEMU's is
    res = rig.run()
    assert res.idx.tolist() == [3, 7, 100]
    assert staged_bytes(res) == {p: rig.ram[p].tobytes() for p in (3, 7, 100)}
    # The staging ran before the capture ended; the rescan after it found nothing.
    assert rig.log.index("stage") < rig.log.index("captured") < rig.log.index("rescan")
    assert rig.log.count("stage") == 1


def test_a_staged_page_written_during_the_capture_is_staged_again(rig: Rig) -> None:
    rig.writer.write([3, 7, 100])
    before = rig.ram[7].tobytes()
    rig.during = [7]
    res = rig.run()
    assert res.idx.tolist() == [3, 7, 100]
    got = staged_bytes(res)
    assert got[7] != before and got[7] == rig.ram[7].tobytes()
    assert got == {p: rig.ram[p].tobytes() for p in (3, 7, 100)}


def test_a_new_page_written_during_the_capture_joins_the_sync_point(rig: Rig) -> None:
    rig.writer.write([3, 100])
    rig.during = [50, 100]
    res = rig.run()
    assert res.idx.tolist() == [3, 50, 100]
    assert staged_bytes(res) == {p: rig.ram[p].tobytes() for p in (3, 50, 100)}
    rig.tracker.commit(res.idx, res.staged)  # type: ignore[arg-type]
    # Committed: the next scan reports only what is written after.
    rig.writer.write([9])
    assert scan(rig.tracker.inner) == [9]


def test_pages_not_committed_come_back(rig: Rig) -> None:
    rig.writer.write([4])
    rig.during = [5]
    first = rig.run()
    assert first.idx.tolist() == [4, 5]
    rig.during = []
    rig.writer.write([6])
    # Never committed (the epoch failed): both come back with the new one.
    assert rig.run().idx.tolist() == [4, 5, 6]


def test_more_than_the_staging_holds_leaves_the_guest_stopped(
    tmp_path: Path,
    helper: Path,  # noqa: F811
) -> None:
    w = Writer(tmp_path, helper)
    r = Rig(w, staging_pages=2)
    try:
        w.write([1, 2])
        r.during = [8]
        res = r.run()
        assert res.idx.tolist() == [1, 2, 8]
        assert res.staged is None and not res.resumed
        assert r.log[-1] != "cont"
    finally:
        r.close()
        w.close()


def test_a_checker_swapped_in_brings_its_own_caps(rig: Rig) -> None:
    from kemari_suite.checkpoint.compare import CompareTracker
    from kemari_suite.checkpoint.verifying import VerifyingTracker

    assert rig.window.early_stage
    rig.window.tracker = VerifyingTracker(rig.tracker.inner, CompareTracker(N_PAGES, threads=1))
    # A checked scan has no cheap rescan: the window stages after the capture again.
    assert not rig.window.early_stage and not rig.window.overlap


def test_staging_beside_the_capture_is_asked_for(rig: Rig) -> None:
    rig.window.stage_during_capture = False  # replication.stage_during_capture = false
    assert not rig.window.early_stage
    rig.writer.write([5])
    res = rig.run()
    assert res.idx.tolist() == [5] and "rescan" not in rig.log


def test_auto_stages_beside_the_capture_only_on_guests_up_to_1_gib(rig: Rig) -> None:
    """The default ("auto"): beside the capture on small guests; on larger ones the walk
    beside QEMU's save slowed it more than it hid (docs/sizing.md), so after it."""
    from kemari_suite.checkpoint.window import STAGE_BESIDE_MAX_PAGES

    assert STAGE_BESIDE_MAX_PAGES * PAGE_SIZE == 1 << 30
    rig.window.stage_during_capture = "auto"
    assert rig.window.early_stage  # this rig's RAM is small
    rig.writer.write([7])
    res = rig.run()
    assert res.idx.tolist() == [7] and "rescan" in rig.log
    # A guest of 1 GiB plus a page: never touched, so nothing is allocated for it.
    big = np.zeros((STAGE_BESIDE_MAX_PAGES + 1, PAGE_SIZE), dtype=np.uint8)
    rig.window.pages = big
    assert not rig.window.early_stage
    rig.window.pages = big[:STAGE_BESIDE_MAX_PAGES]
    assert rig.window.early_stage
    rig.window.stage_during_capture = True  # forced on: any size
    rig.window.pages = big
    assert rig.window.early_stage
