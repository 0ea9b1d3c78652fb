"""The compare tracker: dirty pages by comparing guest RAM with the shadow.

Works on every kernel, at the price of a full pass over RAM and the shadow per scan
(memory-bound: 62-70 ms per GiB on the test machines, see DESIGN.md, "Dirty pages")
and a shadow as large as guest RAM. Clean 1 MiB chunks are skipped with libc
``memcmp``; only chunks that differ are compared word by word with numpy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from kemari_suite.checkpoint.shadow import WORDS_PER_PAGE, ShadowTracker, TrackerCaps
from kemari_suite.vm.guestram import PAGE_SIZE

_Memcmp = Callable[[int, int, int], int]


def _load_memcmp() -> _Memcmp | None:
    """libc's memcmp through ctypes (it releases the GIL), or None if unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        fn = libc.memcmp
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    memcmp: _Memcmp = fn
    return memcmp


def _address(a: np.ndarray) -> int:
    address: int = a.__array_interface__["data"][0]
    return address


class CompareTracker(ShadowTracker):
    """Dirty pages by comparing RAM with the shadow, chunk by chunk.

    Per chunk of ``chunk_pages`` pages (1 MiB by default): libc ``memcmp`` first, which
    runs at memory speed and skips a clean chunk outright; only a chunk that differs is
    compared word by word with numpy (``uint64`` ``not_equal`` into a cache-sized
    boolean buffer, then a per-page ``logical_or`` reduction into the page mask).

    ``threads`` > 1 splits one scan into contiguous ranges run on helper threads (numpy
    and ctypes release the GIL). The scan is memory-bound: a second thread buys little
    on a clean region, more when many chunks need the numpy pass. ``scan(threads=1)``
    keeps pre-copy from competing with the running guest for CPU.

    Raises (constructor):
        ValueError: ``n_pages``, ``threads`` or ``chunk_pages`` not positive.
    """

    name = "compare"
    caps = TrackerCaps(
        keeps_shadow=True, gives_previous=True, scan_during_capture=True, reset_needs_stop=False
    )

    def __init__(
        self,
        n_pages: int,
        *,
        threads: int = 1,
        chunk_pages: int = 256,
        precheck: bool = True,
    ) -> None:
        super().__init__(n_pages)
        if threads < 1 or chunk_pages < 1:
            raise ValueError("threads and chunk_pages must be at least 1")
        self.threads = threads
        self._chunk_pages = chunk_pages
        self._memcmp = _load_memcmp() if precheck else None
        self._mask = np.zeros(n_pages, dtype=bool)
        # One word-compare buffer per thread: chunk_pages x 512 bools (128 KiB by
        # default), small enough to stay in L2 between the compare and the reduction.
        self._bufs = [np.zeros((chunk_pages, WORDS_PER_PAGE), dtype=bool) for _ in range(threads)]
        self._pool: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="kemari-scan")
            if threads > 1
            else None
        )

    @property
    def precheck(self) -> bool:
        """Whether clean chunks are skipped with libc memcmp."""
        return self._memcmp is not None

    def scan(self, pages: np.ndarray, *, out: np.ndarray, threads: int | None = None) -> int:
        """Indices of pages that differ from the shadow, into ``out``; returns the count.

        Safe while the guest runs: a page written during the compare may or may not be
        reported; if not, the next scan reports it (the shadow did not change).

        Raises:
            ReplicationError: before :meth:`reset`.
            ValueError: wrong shapes or dtypes; ``threads`` above the constructor's.
        """
        self._require_baseline()
        self._check_pages(pages)
        self._check_out(out)
        n_threads = self.threads if threads is None else threads
        if not 1 <= n_threads <= self.threads:
            raise ValueError(f"threads must be between 1 and {self.threads}, not {n_threads}")
        ram64 = pages.view(np.uint64)
        ram_addr = _address(pages)
        if n_threads == 1 or self._pool is None:
            self._compare_range(ram64, ram_addr, 0, self.n_pages, self._bufs[0])
            return self._collect(self._mask, out)
        ranges = self._split(n_threads)
        futures: list[Future[None]] = []
        try:
            for (lo, hi), buf in zip(ranges[:-1], self._bufs, strict=False):
                futures.append(self._pool.submit(self._compare_range, ram64, ram_addr, lo, hi, buf))
            lo, hi = ranges[-1]
            self._compare_range(ram64, ram_addr, lo, hi, self._bufs[len(ranges) - 1])
        finally:
            # Wait for every helper, even on error: they write into our buffers.
            for future in futures:
                future.result()
        return self._collect(self._mask, out)

    def _split(self, n_threads: int) -> list[tuple[int, int]]:
        cp = self._chunk_pages
        per = -(-self.n_pages // (n_threads * cp)) * cp  # ceil, chunk-aligned
        return [(lo, min(lo + per, self.n_pages)) for lo in range(0, self.n_pages, per)]

    def _compare_range(
        self, ram64: np.ndarray, ram_addr: int, lo: int, hi: int, buf: np.ndarray
    ) -> None:
        memcmp = self._memcmp
        shadow64 = self._shadow64
        shadow_addr = _address(self._shadow)
        mask = self._mask
        cp = self._chunk_pages
        not_equal = np.not_equal
        reduce_or = np.logical_or.reduce
        for p in range(lo, hi, cp):
            q = min(p + cp, hi)
            if (
                memcmp is not None
                and memcmp(
                    ram_addr + p * PAGE_SIZE, shadow_addr + p * PAGE_SIZE, (q - p) * PAGE_SIZE
                )
                == 0
            ):
                mask[p:q] = False
                continue
            words = buf[: q - p]
            not_equal(ram64[p:q], shadow64[p:q], out=words)
            reduce_or(words, axis=1, out=mask[p:q])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            self.threads = 1


__all__ = ["CompareTracker"]
