"""The page copier: the C helper and numpy's take give the same bytes, and neither
writes anywhere an index does not name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kemari_suite.checkpoint.pagecopy import NUMPY_COPIER, PageCopier
from kemari_suite.checkpoint.uffdwp import UffdWpTracker
from kemari_suite.vm.guestram import PAGE_SIZE


@pytest.fixture(scope="module")
def c_copier(tmp_path_factory: pytest.TempPathFactory) -> PageCopier:
    copier = PageCopier.load(tmp_path_factory.mktemp("cache"))
    assert copier.name == "memcpy", copier.reason
    return copier


def _pages(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, PAGE_SIZE), dtype=np.uint8)


@pytest.mark.parametrize("copier_name", ["memcpy", "numpy"])
def test_gather_and_scatter_copy_exactly_the_named_pages(
    copier_name: str, c_copier: PageCopier
) -> None:
    copier = c_copier if copier_name == "memcpy" else NUMPY_COPIER
    src = _pages(512, 1)
    idx = np.sort(np.random.default_rng(2).choice(512, 97, replace=False)).astype(np.int64)
    out = np.zeros((128, PAGE_SIZE), np.uint8)
    view = copier.gather(src, idx, out)
    assert view.shape == (97, PAGE_SIZE)
    assert np.array_equal(view, src[idx])
    assert not out[97:].any(), "a row past the staged ones was written"

    dst = np.zeros_like(src)
    copier.scatter(dst, idx, out)
    assert np.array_equal(dst[idx], src[idx])
    untouched = np.ones(512, bool)
    untouched[idx] = False
    assert not dst[untouched].any(), "a page no index names was written"


def test_the_c_copier_checks_every_index_first(c_copier: PageCopier) -> None:
    src = _pages(16, 3)
    out = np.zeros((4, PAGE_SIZE), np.uint8)
    for bad in ([0, 16], [-1, 2], [3, 2, 99]):
        with pytest.raises(ValueError, match=r"out of range 0\.\.15"):
            c_copier.gather(src, np.array(bad, np.int64), out)
        with pytest.raises(ValueError, match=r"out of range 0\.\.15"):
            c_copier.scatter(src, np.array(bad, np.int64), out)
    assert not out.any()
    with pytest.raises(ValueError, match="cannot hold 5 pages"):
        c_copier.gather(src, np.arange(5, dtype=np.int64), out)
    with pytest.raises(ValueError, match="int64"):
        c_copier.gather(src, np.arange(2, dtype=np.int32), out)
    with pytest.raises(ValueError, match="uint8"):
        c_copier.gather(src.view(np.uint64), np.arange(2, dtype=np.int64), out)


def test_unsorted_and_repeated_indices_and_strided_views(c_copier: PageCopier) -> None:
    src = _pages(64, 4)
    idx = np.array([63, 0, 5, 5, 31], np.int64)
    out = np.zeros((8, PAGE_SIZE), np.uint8)
    assert np.array_equal(c_copier.gather(src, idx, out), src[idx])
    # A strided source (every other page) is not C-contiguous: numpy's path copies it.
    strided = src[::2]
    got = c_copier.gather(strided, np.array([1, 3], np.int64), out)
    assert np.array_equal(got, src[[2, 6]])


def test_an_unbuildable_copier_falls_back_to_numpy_and_says_why(tmp_path: Path) -> None:
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    copier = PageCopier.load(blocked)
    assert copier.name == "numpy"
    assert "unavailable" in copier.reason
    src = _pages(8, 5)
    out = np.zeros((2, PAGE_SIZE), np.uint8)
    assert np.array_equal(copier.gather(src, np.array([7, 1], np.int64), out), src[[7, 1]])


class _NoScan:
    def written(self, out: np.ndarray, threads: int = 1) -> int:
        return 0

    def close(self) -> None:
        pass


def test_the_uffd_wp_tracker_stages_through_its_copier(c_copier: PageCopier) -> None:
    tracker = UffdWpTracker(32, scanner=_NoScan(), copier=c_copier)  # type: ignore[arg-type]
    pages = _pages(32, 6)
    staging = np.zeros((32, PAGE_SIZE), np.uint8)
    idx = np.array([3, 9, 30], np.int64)
    assert np.array_equal(tracker.stage(pages, idx, staging), pages[idx])
    with pytest.raises(ValueError, match=r"out of range 0\.\.31"):
        tracker.stage(pages, np.array([1, 32], np.int64), staging)
