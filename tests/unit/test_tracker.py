"""Dirty-page trackers and the guest RAM mapping, on synthetic memory (no QEMU)."""

from __future__ import annotations

import gzip
import os
import threading
import tracemalloc
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest

from kemari_suite.checkpoint.tracker import (
    PRESENT_BIT,
    SOFT_DIRTY_BIT,
    CompareTracker,
    DirtyTracker,
    ProcPagemap,
    SoftDirtyTracker,
    allocate_index,
    allocate_pages,
    find_ram_mapping,
    make_tracker,
    probe_soft_dirty,
)
from kemari_suite.errors import ConfigError, ReplicationError
from kemari_suite.vm.guestram import PAGE_SIZE, GuestRAM

N_PAGES = 1000  # not a multiple of any chunk size used below: the last chunk is partial

SOFT_DIRTY_OK, SOFT_DIRTY_REASON = probe_soft_dirty()


@pytest.fixture
def shm_path() -> Iterator[Path]:
    """A unique file name in /dev/shm, removed afterwards."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    path = Path(f"/dev/shm/kemari-test-{worker}-{uuid.uuid4().hex[:8]}.ram")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def make_ram_file(path: Path, n_pages: int, seed: int = 0) -> np.ndarray:
    content = np.random.default_rng(seed).integers(0, 256, (n_pages, PAGE_SIZE), dtype=np.uint8)
    path.write_bytes(content.tobytes())
    return content


def random_ram(n_pages: int = N_PAGES, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n_pages, PAGE_SIZE), dtype=np.uint8)


def touch(ram: np.ndarray, idx: Iterable[int], seed: int = 1) -> None:
    """Change one random byte of every page in idx (always to a different value)."""
    rng = np.random.default_rng(seed)
    for i in idx:
        offset = int(rng.integers(0, PAGE_SIZE))
        ram[i, offset] ^= int(rng.integers(1, 256))


def scan(tracker: DirtyTracker, ram: np.ndarray) -> list[int]:
    out = allocate_index(tracker.n_pages)
    n = tracker.scan(ram, out=out)
    return out[:n].tolist()


def sync(tracker: DirtyTracker, ram: np.ndarray) -> np.ndarray:
    """One sync point: scan, stage, commit. Returns the staged pages' indices."""
    out = allocate_index(tracker.n_pages)
    staging = allocate_pages(tracker.n_pages)
    tracker.rearm()
    n = tracker.scan(ram, out=out)
    staged = tracker.stage(ram, out[:n], staging)
    tracker.commit(out[:n], staged)
    return out[:n].copy()


COMPARE_VARIANTS = [
    pytest.param({"threads": 1, "chunk_pages": 64, "precheck": True}, id="1thr-precheck"),
    pytest.param({"threads": 1, "chunk_pages": 64, "precheck": False}, id="1thr-numpy"),
    pytest.param({"threads": 2, "chunk_pages": 64, "precheck": True}, id="2thr-precheck"),
    pytest.param({"threads": 3, "chunk_pages": 100, "precheck": False}, id="3thr-numpy"),
    pytest.param({"threads": 1, "chunk_pages": 256, "precheck": True}, id="default-chunk"),
]


@pytest.fixture(params=COMPARE_VARIANTS)
def compare(request: pytest.FixtureRequest) -> Iterator[CompareTracker]:
    tracker = CompareTracker(N_PAGES, **request.param)
    try:
        yield tracker
    finally:
        tracker.close()


# --------------------------------------------------------------------------- GuestRAM


def test_guestram_maps_file_read_only(shm_path: Path) -> None:
    content = make_ram_file(shm_path, 16)
    with GuestRAM(shm_path) as ram:
        assert (ram.size, ram.n_pages) == (16 * PAGE_SIZE, 16)
        assert ram.pages.shape == (16, PAGE_SIZE)
        assert np.array_equal(ram.pages, content)
        # A write by another process (here: through the file) is visible at once.
        fd = os.open(shm_path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xab" * 10, 5 * PAGE_SIZE + 7)
        finally:
            os.close(fd)
        assert bytes(ram.pages[5, 7:17]) == b"\xab" * 10
        with pytest.raises(ValueError):
            ram.pages[0, 0] = 1
    assert ram.closed
    with pytest.raises(ReplicationError):
        _ = ram.pages


def test_guestram_writable_writes_through_to_file(shm_path: Path) -> None:
    make_ram_file(shm_path, 4)
    with GuestRAM(shm_path, writable=True) as ram:
        ram.pages[3, :4] = [1, 2, 3, 4]
    assert shm_path.read_bytes()[3 * PAGE_SIZE : 3 * PAGE_SIZE + 4] == bytes([1, 2, 3, 4])


def test_guestram_view_outlives_close(shm_path: Path) -> None:
    content = make_ram_file(shm_path, 4)
    ram = GuestRAM(shm_path)
    view = ram.pages[2]
    ram.close()
    ram.close()  # idempotent
    assert np.array_equal(view, content[2])


def test_guestram_rejects_bad_files(shm_path: Path) -> None:
    with pytest.raises(ReplicationError, match="cannot open"):
        GuestRAM(shm_path)
    shm_path.write_bytes(b"x" * (PAGE_SIZE + 1))
    with pytest.raises(ReplicationError, match="multiple of 4096"):
        GuestRAM(shm_path)
    shm_path.write_bytes(b"")
    with pytest.raises(ReplicationError, match="not a positive multiple"):
        GuestRAM(shm_path)


# --------------------------------------------------------------------------- compare


def test_scan_finds_exactly_the_written_pages(compare: CompareTracker) -> None:
    ram = random_ram()
    compare.reset(ram)
    assert scan(compare, ram) == []
    written = sorted(np.random.default_rng(5).choice(N_PAGES, 137, replace=False).tolist())
    touch(ram, written)
    # Rewritten with identical bytes: not dirty.
    ram[[3, 500, 999]] = ram[[3, 500, 999]].copy()
    assert scan(compare, ram) == written


def test_scan_sees_one_byte_at_page_and_region_edges(compare: CompareTracker) -> None:
    ram = random_ram()
    compare.reset(ram)
    for page, offset in [(0, 0), (63, PAGE_SIZE - 1), (64, 0), (N_PAGES - 1, PAGE_SIZE - 1)]:
        ram[page, offset] ^= 0x80
        assert scan(compare, ram) == [page]
        ram[page, offset] ^= 0x80
        assert scan(compare, ram) == []


def test_stage_commit_then_rescan_finds_nothing(compare: CompareTracker) -> None:
    ram = random_ram()
    compare.reset(ram)
    touch(ram, [1, 2, 700])
    assert sync(compare, ram).tolist() == [1, 2, 700]
    assert scan(compare, ram) == []
    assert np.array_equal(compare.baseline(), ram)


def test_uncommitted_pages_are_reported_again(compare: CompareTracker) -> None:
    ram = random_ram()
    compare.reset(ram)
    touch(ram, [10, 20])
    assert scan(compare, ram) == [10, 20]
    assert scan(compare, ram) == [10, 20]


def test_previous_returns_the_version_last_sent(compare: CompareTracker) -> None:
    ram = random_ram()
    compare.reset(ram)
    old = ram[[4, 900]].copy()
    touch(ram, [4, 900])
    idx = np.array([4, 900], dtype=np.int64)
    prev = compare.previous(idx, allocate_pages(2))
    assert prev is not None
    assert np.array_equal(prev, old)
    staged = compare.stage(ram, idx, allocate_pages(2))
    compare.commit(idx, staged)
    prev = compare.previous(idx, allocate_pages(2))
    assert prev is not None
    assert np.array_equal(prev, ram[[4, 900]])


def test_write_between_stage_and_commit_is_found_next_scan(compare: CompareTracker) -> None:
    """QEMU may write RAM while the VM is stopped, after the pages were staged."""
    ram = random_ram()
    compare.reset(ram)
    touch(ram, [7, 8])
    out = allocate_index(N_PAGES)
    n = compare.scan(ram, out=out)
    staged = compare.stage(ram, out[:n], allocate_pages(N_PAGES))
    touch(ram, [8, 9], seed=2)  # after staging: page 8 again, page 9 new
    compare.commit(out[:n], staged)
    assert scan(compare, ram) == [8, 9]


def test_write_between_scan_and_stage_is_sent_with_the_newer_bytes(
    compare: CompareTracker,
) -> None:
    ram = random_ram()
    compare.reset(ram)
    touch(ram, [7])
    out = allocate_index(N_PAGES)
    n = compare.scan(ram, out=out)
    touch(ram, [7], seed=3)
    staged = compare.stage(ram, out[:n], allocate_pages(N_PAGES))
    compare.commit(out[:n], staged)
    assert np.array_equal(staged[0], ram[7])
    assert scan(compare, ram) == []


def test_reset_then_scan_is_empty(compare: CompareTracker) -> None:
    ram = random_ram()
    compare.reset(ram)
    touch(ram, range(0, N_PAGES, 3))
    compare.reset(ram)
    assert scan(compare, ram) == []


def test_replica_stays_exact_under_concurrent_writers(compare: CompareTracker) -> None:
    """Pre-copy while the 'guest' writes: replaying the staged pages rebuilds RAM exactly."""
    ram = random_ram()
    compare.reset(ram)
    replica = compare.baseline().copy()
    out = allocate_index(N_PAGES)
    staging = allocate_pages(N_PAGES)
    stop = threading.Event()

    def writer() -> None:
        rng = np.random.default_rng(9)
        while not stop.is_set():
            page = int(rng.integers(0, N_PAGES))
            start = int(rng.integers(0, PAGE_SIZE - 64))
            # numpy releases the GIL for large copies only; this is a many-small-writes
            # writer that interleaves with the scan at the bytecode level.
            ram[page, start : start + 64] = rng.integers(0, 256, 64, dtype=np.uint8)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(30):
            n = compare.scan(ram, out=out)
            staged = compare.stage(ram, out[:n], staging)
            replica[out[:n]] = staged
            compare.commit(out[:n], staged)
    finally:
        stop.set()
        thread.join()
    n = compare.scan(ram, out=out)  # the stop-time scan
    staged = compare.stage(ram, out[:n], staging)
    replica[out[:n]] = staged
    compare.commit(out[:n], staged)
    assert np.array_equal(replica, ram)
    assert scan(compare, ram) == []


def test_stage_and_commit_do_not_allocate_page_buffers() -> None:
    ram = random_ram()
    tracker = CompareTracker(N_PAGES)
    tracker.reset(ram)
    idx = np.arange(0, N_PAGES, 2, dtype=np.int64)  # 500 pages = 2 MB
    staging = allocate_pages(N_PAGES)
    prev = allocate_pages(N_PAGES)
    out = allocate_index(N_PAGES)
    touch(ram, idx)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        n = tracker.scan(ram, out=out)
        staged = tracker.stage(ram, out[:n], staging)
        tracker.previous(out[:n], prev)
        tracker.commit(out[:n], staged)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == len(idx)
    assert peak < 64 * 1024, f"a sync point allocated {peak} bytes"


def test_compare_misuse_is_refused() -> None:
    tracker = CompareTracker(N_PAGES)
    ram = random_ram()
    with pytest.raises(ReplicationError, match="no baseline"):
        tracker.scan(ram, out=allocate_index(N_PAGES))
    assert tracker.previous(np.array([1], dtype=np.int64), allocate_pages(1)) is None
    tracker.reset(ram)
    with pytest.raises(ValueError, match="out must be"):
        tracker.scan(ram, out=np.zeros(10, dtype=np.int64))
    with pytest.raises(ValueError, match="pages must be"):
        tracker.scan(ram[:10], out=allocate_index(N_PAGES))
    with pytest.raises(ValueError, match="out of range"):
        tracker.stage(ram, np.array([N_PAGES], dtype=np.int64), allocate_pages(1))
    with pytest.raises(ValueError, match="staging must be"):
        tracker.stage(ram, np.array([1, 2], dtype=np.int64), allocate_pages(1))
    with pytest.raises(ValueError, match="threads"):
        tracker.scan(ram, out=allocate_index(N_PAGES), threads=2)
    with pytest.raises(ValueError, match="read-only"):
        tracker.baseline()[0, 0] = 1


# --------------------------------------------------------------------------- soft-dirty


def kernel_config(option: str) -> str | None:
    try:
        text = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        return None
    if f"\n{option}=y" in text:
        return "y"
    return "not set"


def test_probe_soft_dirty_gives_a_reason() -> None:
    ok, reason = probe_soft_dirty()
    assert reason
    config = kernel_config("CONFIG_MEM_SOFT_DIRTY")
    if config == "not set":
        assert not ok
        assert "CONFIG_MEM_SOFT_DIRTY is not set" in reason
        assert "bit 55" in reason
    elif config == "y":
        assert ok, reason


@pytest.mark.skipif(SOFT_DIRTY_OK, reason="this kernel tracks soft-dirty pages")
def test_make_tracker_soft_dirty_refused_with_probe_reason(shm_path: Path) -> None:
    with pytest.raises(ReplicationError) as info:
        make_tracker("soft-dirty", n_pages=4, qemu_pid=os.getpid(), ram_path=shm_path)
    assert SOFT_DIRTY_REASON in str(info.value)


def test_make_tracker_kinds() -> None:
    tracker = make_tracker("compare", n_pages=8, qemu_pid=None, ram_path=None, threads=2)
    assert isinstance(tracker, CompareTracker)
    assert tracker.name == "compare"
    tracker.close()
    with pytest.raises(ConfigError, match="unknown dirty-page tracker"):
        make_tracker("bitmap", n_pages=8, qemu_pid=None, ram_path=None)


class FakePagemap:
    """Stands in for the kernel: the test marks pages written, clear() forgets them.

    Entries carry other bits too (present, a fake PFN) so the tracker must mask bit 55.
    """

    def __init__(self, n_pages: int) -> None:
        self.dirty = np.zeros(n_pages, dtype=bool)
        self.clears = 0
        self.reads = 0
        self.closed = False

    def write(self, ram: np.ndarray, idx: list[int] | range, seed: int = 1) -> None:
        touch(ram, idx, seed)
        self.dirty[list(idx)] = True

    def read(self, out: np.ndarray) -> None:
        self.reads += 1
        base = np.uint64(1 << PRESENT_BIT) | np.arange(len(out), dtype=np.uint64) + np.uint64(
            0x1234
        )
        out[:] = base | (self.dirty.astype(np.uint64) << np.uint64(SOFT_DIRTY_BIT))

    def clear(self) -> None:
        self.clears += 1
        self.dirty[:] = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def soft() -> Iterator[tuple[SoftDirtyTracker, FakePagemap]]:
    source = FakePagemap(N_PAGES)
    tracker = SoftDirtyTracker(N_PAGES, source=source, batch_pages=16)
    try:
        yield tracker, source
    finally:
        tracker.close()


def test_soft_dirty_scan_finds_written_pages(soft: tuple[SoftDirtyTracker, FakePagemap]) -> None:
    tracker, kernel = soft
    ram = random_ram()
    tracker.reset(ram)
    assert kernel.clears == 1
    assert scan(tracker, ram) == []
    written = sorted(np.random.default_rng(5).choice(N_PAGES, 77, replace=False).tolist())
    kernel.write(ram, written)
    assert scan(tracker, ram) == written


def test_soft_dirty_trusts_the_bits(soft: tuple[SoftDirtyTracker, FakePagemap]) -> None:
    """A page changed without its bit set is not looked at: the kernel is the source."""
    tracker, kernel = soft
    ram = random_ram()
    tracker.reset(ram)
    touch(ram, [5])  # no bit
    kernel.write(ram, [6])
    assert scan(tracker, ram) == [6]


def test_soft_dirty_drops_false_positives(soft: tuple[SoftDirtyTracker, FakePagemap]) -> None:
    tracker, kernel = soft
    ram = random_ram()
    tracker.reset(ram)
    kernel.dirty[[1, 2, 3]] = True  # written with the same bytes
    kernel.write(ram, [2, 400])
    assert scan(tracker, ram) == [2, 400]
    tracker.verify = False
    assert scan(tracker, ram) == [1, 2, 3, 400]


def test_soft_dirty_sync_points(soft: tuple[SoftDirtyTracker, FakePagemap]) -> None:
    tracker, kernel = soft
    ram = random_ram()
    tracker.reset(ram)
    replica = tracker.baseline().copy()
    kernel.write(ram, [10, 11, 12])
    out = allocate_index(N_PAGES)
    staging = allocate_pages(N_PAGES)
    # Pre-copy while running: no clear.
    n = tracker.scan(ram, out=out)
    assert out[:n].tolist() == [10, 11, 12]
    staged = tracker.stage(ram, out[:n], staging)
    replica[out[:n]] = staged
    tracker.commit(out[:n], staged)
    assert kernel.clears == 1
    kernel.write(ram, [11, 13], seed=4)
    # Stop: rearm folds the bits, then the scan compares the candidates with the shadow.
    tracker.rearm()
    assert kernel.clears == 2
    reads = kernel.reads
    n = tracker.scan(ram, out=out)
    assert kernel.reads == reads  # the bits were read by rearm() a moment ago
    assert out[:n].tolist() == [11, 13]
    staged = tracker.stage(ram, out[:n], staging)
    kernel.write(ram, [13, 14], seed=5)  # QEMU writes while stopped, after staging
    replica[out[:n]] = staged
    tracker.commit(out[:n], staged)
    assert scan(tracker, ram) == [13, 14]
    replica[[13, 14]] = tracker.stage(ram, np.array([13, 14], np.int64), staging)
    tracker.commit(np.array([13, 14], np.int64), staging)
    assert np.array_equal(replica, ram)


def test_soft_dirty_uncommitted_pages_survive_rearm(
    soft: tuple[SoftDirtyTracker, FakePagemap],
) -> None:
    """A sync point that never committed must not lose its pages when the bits clear."""
    tracker, kernel = soft
    ram = random_ram()
    tracker.reset(ram)
    kernel.write(ram, [30, 31])
    assert sync(tracker, ram).tolist() == [30, 31]
    kernel.write(ram, [40])
    tracker.rearm()
    assert scan(tracker, ram) == [40]  # scanned, never committed
    tracker.rearm()
    assert not kernel.dirty.any()
    assert scan(tracker, ram) == [40]
    kernel.write(ram, [41])
    tracker.rearm()  # rearm without a scan before it keeps the bits as candidates
    assert scan(tracker, ram) == [40, 41]


def test_soft_dirty_previous_and_reset(soft: tuple[SoftDirtyTracker, FakePagemap]) -> None:
    tracker, kernel = soft
    ram = random_ram()
    assert tracker.previous(np.array([0], np.int64), allocate_pages(1)) is None
    tracker.reset(ram)
    old = ram[9].copy()
    kernel.write(ram, [9])
    prev = tracker.previous(np.array([9], np.int64), allocate_pages(1))
    assert prev is not None
    assert np.array_equal(prev[0], old)
    tracker.reset(ram)
    assert scan(tracker, ram) == []
    tracker.close()
    assert kernel.closed


# --------------------------------------------------------------------------- /proc


def test_find_ram_mapping_parses_maps() -> None:
    maps = "\n".join(
        [
            "55d000000000-55d000001000 r-xp 00000000 08:01 42   /usr/bin/qemu-system-x86_64",
            "7f0000000000-7f0004000000 rw-s 00000000 00:1a 77   /dev/shm/vm 1.ram (deleted)",
            "7f0004000000-7f0008000000 rw-s 04000000 00:1a 77   /dev/shm/vm 1.ram (deleted)",
            "7f1000000000-7f1000001000 rw-p 00000000 00:00 0 ",
        ]
    )
    path = Path("/dev/shm/vm 1.ram")
    assert find_ram_mapping(maps, path, 0x8000000) == 0x7F0000000000
    with pytest.raises(ReplicationError, match="mapped for"):
        find_ram_mapping(maps, path, 0x8001000)
    with pytest.raises(ReplicationError, match="not mapped"):
        find_ram_mapping(maps, Path("/dev/shm/other.ram"), 4096)
    twice = maps + "\n7f2000000000-7f2000001000 r--s 00000000 00:1a 77   /dev/shm/vm 1.ram"
    with pytest.raises(ReplicationError, match="more than once"):
        find_ram_mapping(twice, path, 4096)


def test_proc_pagemap_on_this_process(shm_path: Path) -> None:
    """The /proc plumbing on a real mapping (this process stands in for QEMU)."""
    make_ram_file(shm_path, 8)
    with GuestRAM(shm_path) as ram:
        source = ProcPagemap(os.getpid(), shm_path, 8)
        try:
            assert source.address == ram.pages.__array_interface__["data"][0]
            entries = np.zeros(8, dtype=np.uint64)
            source.read(entries)
            present = (entries >> np.uint64(PRESENT_BIT)) & np.uint64(1)
            assert present.all()  # mapped with MAP_POPULATE
            source.clear()
        finally:
            source.close()
    with pytest.raises(ReplicationError, match="not mapped"):
        ProcPagemap(os.getpid(), shm_path, 8)


@pytest.mark.skipif(not SOFT_DIRTY_OK, reason=f"soft-dirty probe: {SOFT_DIRTY_REASON}")
def test_soft_dirty_on_the_real_kernel(shm_path: Path) -> None:
    """This process writes its own shared mapping and plays QEMU."""
    make_ram_file(shm_path, 64)
    with GuestRAM(shm_path, writable=True) as ram:
        tracker = make_tracker("soft-dirty", n_pages=64, qemu_pid=os.getpid(), ram_path=shm_path)
        try:
            tracker.reset(ram.pages)
            assert scan(tracker, ram.pages) == []
            touch(ram.pages, [3, 40])
            tracker.rearm()
            assert scan(tracker, ram.pages) == [3, 40]
        finally:
            tracker.close()


def test_soft_dirty_commit_retires_candidates(soft: tuple[SoftDirtyTracker, FakePagemap]) -> None:
    """Committed pages are no longer candidates (seen without the shadow check)."""
    tracker, kernel = soft
    ram = random_ram()
    tracker.reset(ram)
    tracker.verify = False
    kernel.write(ram, [50, 51])
    assert sync(tracker, ram).tolist() == [50, 51]
    assert scan(tracker, ram) == []
    kernel.write(ram, [52])
    assert scan(tracker, ram) == [52]
    assert scan(tracker, ram) == [52]  # bit still set, nothing committed
