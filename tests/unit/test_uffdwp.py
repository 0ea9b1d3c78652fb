"""The uffd-wp tracker on this kernel, without QEMU: the helper preloaded into a child
process that maps a shared RAM file and writes the pages it is told to.

What is checked: exactly the pages written are reported (none missed, none extra),
each once, re-protected by the scan itself; pending pages survive a sync point that
never committed; arming forgets what came before; a random write pattern (a property
test) is reported exactly; the verifying tracker catches a tracker that misses pages.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kemari_suite.checkpoint import uffdwp
from kemari_suite.checkpoint.compare import CompareTracker
from kemari_suite.checkpoint.uffdwp import PagemapScan, UffdWpTracker, protect_ram
from kemari_suite.checkpoint.verifying import TrackerMissed, VerifyingTracker
from kemari_suite.config import PathsConfig
from kemari_suite.errors import ReplicationError
from kemari_suite.vm import wphelper
from kemari_suite.vm.guestram import PAGE_SIZE

KERNEL_OK, KERNEL_WHY = wphelper.probe_kernel()
pytestmark = pytest.mark.skipif(not KERNEL_OK, reason=KERNEL_WHY)

N_PAGES = 2048  # 8 MiB

# The child: maps the RAM file shared, then writes the pages named on each stdin line
# ("w 1 5 9") and answers "ok"; "x" exits.
CHILD = textwrap.dedent(
    """
    import mmap, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    ram = mmap.mmap(fd, int(sys.argv[2]), mmap.MAP_SHARED)
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "x":
            break
        for w in words[1:]:
            p = int(w)
            ram[p * 4096 + 8] = (ram[p * 4096 + 8] + 1) % 256
        print("ok", flush=True)
    """
)


class Writer:
    """A process with the helper preloaded that writes pages of a shared RAM file."""

    def __init__(self, tmp: Path, helper: Path) -> None:
        self.ram = Path(f"/dev/shm/kemari-test-uffdwp-{os.getpid()}-{id(self)}.ram")
        with self.ram.open("wb") as f:
            f.truncate(N_PAGES * PAGE_SIZE)
        self.sock = tmp / "wp.sock"
        env = {**os.environ, "LD_PRELOAD": str(helper), "KEMARI_WP_SOCK": str(self.sock)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(self.ram), str(N_PAGES * PAGE_SIZE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def write(self, pages: list[int]) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("w " + " ".join(map(str, pages)) + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def tracker(self) -> UffdWpTracker:
        size = N_PAGES * PAGE_SIZE
        address = protect_ram(self.sock, self.ram, size)

        def arm() -> None:
            protect_ram(self.sock, self.ram, size)

        tracker = UffdWpTracker(
            N_PAGES, scanner=PagemapScan(self.proc.pid, address, N_PAGES), arm=arm
        )
        tracker.reset(np.empty((0, PAGE_SIZE), dtype=np.uint8))
        return tracker

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.ram.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def helper() -> Path:
    return wphelper.build_helper(PathsConfig().cache_dir)


@pytest.fixture
def writer(tmp_path: Path, helper: Path) -> Iterator[Writer]:
    w = Writer(tmp_path, helper)
    try:
        yield w
    finally:
        w.close()


def scan(tracker: UffdWpTracker) -> list[int]:
    out = np.zeros(N_PAGES, dtype=np.int64)
    n = tracker.scan(np.empty((0, PAGE_SIZE), dtype=np.uint8), out=out)
    return out[:n].tolist()


def test_exactly_the_written_pages_once(writer: Writer) -> None:
    tracker = writer.tracker()
    assert scan(tracker) == []
    writer.write([3, 4, 5, 700, 2047])
    found = scan(tracker)
    assert found == [3, 4, 5, 700, 2047]
    tracker.commit(np.array(found, dtype=np.int64))
    # Re-protected by the scan: nothing new until the next write.
    assert scan(tracker) == []
    writer.write([4])
    assert scan(tracker) == [4]


def test_a_page_written_during_a_scan_of_many_regions_is_reported_once(
    writer: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every other page written: more regions than the kernel's own 512-region buffer,
    after which its walk_end is stale (it names where that buffer filled, not the end).
    A page written right after the kernel's walk must be reported once, at the next
    scan, not again by a second walk over what the first already protected."""
    tracker = writer.tracker()
    evens = list(range(0, N_PAGES, 2))
    writer.write(evens)
    walks = []

    def ioctl(fd: int, request: int, arg: Any) -> int:
        regions = fcntl.ioctl(fd, request, arg)
        walks.append(regions)
        if len(walks) == 1:
            writer.write([N_PAGES - 2])  # the guest runs on between two walks
        return regions

    monkeypatch.setattr(uffdwp, "fcntl", SimpleNamespace(ioctl=ioctl))
    found = scan(tracker)
    assert found == evens, "a page reported twice or out of order"
    tracker.commit(np.array(found, dtype=np.int64))
    assert walks == [N_PAGES // 2]
    assert scan(tracker) == [N_PAGES - 2]


def test_pages_stay_pending_until_committed(writer: Writer) -> None:
    tracker = writer.tracker()
    writer.write([10, 11])
    assert scan(tracker) == [10, 11]
    # The sync point failed before commit: the next scan reports them again, with news.
    writer.write([500])
    assert scan(tracker) == [10, 11, 500]
    tracker.commit(np.array([10, 11, 500], dtype=np.int64))
    assert scan(tracker) == []


def test_arming_forgets_earlier_writes(writer: Writer) -> None:
    tracker = writer.tracker()
    writer.write([1, 2])
    tracker.reset(np.empty((0, PAGE_SIZE), dtype=np.uint8))  # the full copy follows
    assert scan(tracker) == []


def test_scan_before_arming_is_refused(writer: Writer) -> None:
    address = protect_ram(writer.sock, writer.ram, N_PAGES * PAGE_SIZE)
    tracker = UffdWpTracker(N_PAGES, scanner=PagemapScan(writer.proc.pid, address, N_PAGES))
    with pytest.raises(ReplicationError, match="not armed"):
        scan(tracker)


def test_helper_refuses_a_file_it_does_not_map(writer: Writer, tmp_path: Path) -> None:
    with pytest.raises(ReplicationError, match="not mapped"):
        protect_ram(writer.sock, tmp_path / "other.ram", PAGE_SIZE)
    with pytest.raises(ReplicationError, match="mapped for"):
        protect_ram(writer.sock, writer.ram, 2 * N_PAGES * PAGE_SIZE)


def test_no_helper_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ReplicationError, match="is it loaded into QEMU"):
        protect_ram(tmp_path / "absent.sock", tmp_path / "x.ram", PAGE_SIZE)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rounds=st.lists(
        st.lists(st.integers(min_value=0, max_value=N_PAGES - 1), max_size=300),
        min_size=1,
        max_size=6,
    )
)
def test_random_write_patterns_are_reported_exactly(
    writer: Writer, rounds: list[list[int]]
) -> None:
    tracker = writer.tracker()
    for pages in rounds:
        if pages:
            writer.write(pages)
        found = scan(tracker)
        assert found == sorted(set(pages))
        tracker.commit(np.array(found, dtype=np.int64))


def test_verifying_tracker_fails_on_a_missed_page(writer: Writer) -> None:
    ram = np.memmap(writer.ram, dtype=np.uint8, mode="r", shape=(N_PAGES, PAGE_SIZE))
    pages = np.ascontiguousarray(ram)
    fast = writer.tracker()
    checked = VerifyingTracker(fast, CompareTracker(N_PAGES))
    checked.reset(pages.copy())
    out = np.zeros(N_PAGES, dtype=np.int64)
    writer.write([7, 8])
    pages = np.ascontiguousarray(ram)
    n = checked.scan(pages, out=out)
    assert out[:n].tolist() == [7, 8]
    checked.commit(out[:n], checked.stage(pages, out[:n], np.zeros((n, PAGE_SIZE), np.uint8)))
    # A change the fast tracker cannot see (written through another mapping).
    ram_rw = np.memmap(writer.ram, dtype=np.uint8, mode="r+", shape=(N_PAGES, PAGE_SIZE))
    ram_rw[99, 0] ^= 0xFF
    ram_rw.flush()
    with pytest.raises(TrackerMissed, match="missed 1 changed page"):
        checked.scan(np.ascontiguousarray(ram), out=out)


def test_a_qemu_that_refuses_the_plugin_gets_it_preloaded(tmp_path: Path) -> None:
    """A helper built for a plugin API this QEMU does not speak: the probe sees QEMU
    refuse it and falls back to LD_PRELOAD, and says so."""
    refused = wphelper.build_helper(tmp_path, defines=("KEMARI_WP_PLUGIN_API=99",))
    mode, reason = wphelper.probe_loading(refused, tmp_path)
    assert mode == "preload", reason
    assert "refused the plugin" in reason and "API version 99" in reason
    # The answer is cached per QEMU binary and helper build.
    assert wphelper.probe_loading(refused, tmp_path) == (mode, reason)
    normal = wphelper.build_helper(tmp_path)
    assert wphelper.probe_loading(normal, tmp_path)[0] == "plugin"
