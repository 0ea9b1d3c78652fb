"""Dirty-page tracking: which guest pages differ from what the secondary was sent.

Two trackers behind one interface (:class:`DirtyTracker`):

- :class:`CompareTracker` keeps a *shadow* copy of guest RAM and compares it with RAM in
  chunks. Works on every kernel. The scan is memory-bound (it reads RAM and the shadow).
- :class:`SoftDirtyTracker` asks the kernel which pages QEMU wrote since the last clear
  (``/proc/<pid>/clear_refs`` and bit 55 of ``/proc/<pid>/pagemap``), then compares only
  those candidates with the shadow to drop false positives. Needs
  ``CONFIG_MEM_SOFT_DIRTY=y``: see :func:`probe_soft_dirty`.

Both keep the shadow, which is also the base for XOR-delta encoding (:meth:`previous`).

The one rule that keeps the replica exact: **the shadow holds the bytes that were staged
(and so sent), never bytes re-read from RAM.** QEMU may write guest RAM at any time,
even while the VM is stopped, and pre-copy runs while the guest runs. A page that changes
while it is compared or copied is either reported now or, since the shadow only ever
receives staged bytes, reported by the next scan. Nothing is lost; at worst a page is
sent twice.

A sync point drives a tracker like this::

    tracker.reset(ram)            # once, VM stopped: send tracker.baseline() as the full copy
    ...
    # optional pre-copy while the guest runs (pipelining):
    n = tracker.scan(ram, out=idx)
    staged = tracker.stage(ram, idx[:n], staging)
    base = tracker.previous(idx[:n], prev)       # before commit: XOR-delta base
    tracker.commit(idx[:n], staged)              # when the bytes are handed to the sender
    # the sync point, VM stopped:
    tracker.rearm()                               # soft-dirty: new interval (no-op for compare)
    n = tracker.scan(ram, out=idx)
    staged = tracker.stage(ram, idx[:n], staging) # then `cont`; encode and send after
    ...

Every buffer a sync point touches is allocated up front (:func:`allocate_pages`): a
fresh page-sized array costs page faults (65 ms at p99 on the test machines) in the
window where the VM is stopped. The only allocations left in a scan are index-sized
(8 bytes per dirty page) temporaries inside numpy.

A tracker is not thread-safe: one caller drives it. :class:`CompareTracker` may use
helper threads internally for one scan.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gzip
import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import numpy as np

from kemari_suite.errors import ConfigError, ReplicationError
from kemari_suite.vm.guestram import PAGE_SIZE

_WORDS_PER_PAGE = PAGE_SIZE // 8

#: Bit 55 of a /proc/<pid>/pagemap entry: the page was written since the last clear.
SOFT_DIRTY_BIT = 55
#: Bit 63: the page is present in RAM (mapped in the process's page tables).
PRESENT_BIT = 63
_SOFT_DIRTY_MASK = np.uint64(1 << SOFT_DIRTY_BIT)
_PAGEMAP_ENTRY = 8

TRACKER_KINDS = ("compare", "soft-dirty")


def allocate_pages(n_pages: int) -> np.ndarray:
    """A ``(n_pages, PAGE_SIZE)`` ``uint8`` buffer with every page already faulted in.

    Use it for the staging buffer and the XOR-delta base buffer, once, at start-up.
    """
    buf = np.empty((n_pages, PAGE_SIZE), dtype=np.uint8)
    buf.fill(0)  # touch every page now, not in the stopped window
    return buf


def allocate_index(n_pages: int) -> np.ndarray:
    """An index buffer for :meth:`DirtyTracker.scan`: ``int64``, one slot per page."""
    return np.zeros(n_pages, dtype=np.int64)


@dataclass(frozen=True)
class TrackerCaps:
    """What a tracker needs from the engine, declared instead of tested by type.

    The engine (the stopped window, pre-copy, the initial sync) reads these and never
    asks which tracker it holds.
    """

    #: Keeps a copy of every page sent (costs guest RAM once more on the primary).
    keeps_shadow: bool
    #: :meth:`DirtyTracker.previous` gives the last version sent (XOR-delta base).
    gives_previous: bool
    #: The stop-time scan may run beside QEMU's device-state capture. False when the
    #: scan must see the end of the tracking interval (kernel dirty bits read after
    #: QEMU has stopped writing guest RAM).
    scan_during_capture: bool
    #: :meth:`DirtyTracker.reset` clears kernel state, so the baseline copy must be
    #: taken with the guest stopped (no write may fall between copy and clear).
    reset_needs_stop: bool


class DirtyTracker(Protocol):
    """Finds changed guest pages and keeps the last version sent of every page."""

    #: "compare" or "soft-dirty".
    name: str
    n_pages: int
    caps: TrackerCaps

    def reset(self, pages: np.ndarray) -> None:
        """Take ``pages`` as the secondary's full copy of every page (the initial sync).

        Call while the VM is stopped. Either send :meth:`baseline` afterwards (exactly
        these bytes), or pass the bytes that were sent.
        """
        ...

    def baseline(self) -> np.ndarray:
        """Read-only view of the shadow: the last version sent of every page."""
        ...

    def scan(self, pages: np.ndarray, *, out: np.ndarray, threads: int | None = None) -> int:
        """Write the indices of pages that differ from the shadow into ``out``.

        ``out`` is an ``int64`` array of at least ``n_pages``; the result is
        ``out[:count]``, ascending. Returns ``count``. ``threads`` caps the helper
        threads of one scan (1 while the guest runs); trackers without helpers ignore it.
        """
        ...

    def stage(self, pages: np.ndarray, idx: np.ndarray, staging: np.ndarray) -> np.ndarray:
        """Copy ``pages[idx]`` into ``staging[:len(idx)]`` without allocating; return it."""
        ...

    def previous(self, idx: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        """The last version sent of pages ``idx`` (into ``out``), or None before reset.

        Call it before :meth:`commit` of the same pages: commit overwrites it.
        """
        ...

    def commit(self, idx: np.ndarray, staged: np.ndarray) -> None:
        """Record ``staged`` (as returned by :meth:`stage`) as sent for pages ``idx``."""
        ...

    def rearm(self) -> None:
        """Start a new tracking interval. Call only while the VM is stopped."""
        ...

    def close(self) -> None:
        """Release threads and file descriptors. Idempotent."""
        ...


# --------------------------------------------------------------------------- shared base


class _ShadowTracker:
    """The shadow copy and everything built on it: reset, stage, previous, commit."""

    name = "shadow"

    def __init__(self, n_pages: int) -> None:
        if n_pages <= 0:
            raise ValueError(f"n_pages must be positive, not {n_pages}")
        self.n_pages = n_pages
        # Faulted in by reset(), which writes every page of it.
        self._shadow = np.empty((n_pages, PAGE_SIZE), dtype=np.uint8)
        self._shadow64 = self._shadow.view(np.uint64)
        self._arange = np.arange(n_pages, dtype=np.int64)
        self._has_baseline = False

    # -- checks (cheap: O(1), or one pass over an index array)

    def _check_pages(self, pages: np.ndarray, what: str = "pages") -> None:
        if (
            pages.dtype != np.uint8
            or pages.shape != (self.n_pages, PAGE_SIZE)
            or not pages.flags.c_contiguous
        ):
            raise ValueError(
                f"{what} must be a C-contiguous uint8 array of shape "
                f"({self.n_pages}, {PAGE_SIZE}), not {pages.dtype} {pages.shape}"
            )

    def _check_idx(self, idx: np.ndarray) -> int:
        if idx.dtype != np.int64 or idx.ndim != 1:
            raise ValueError(f"page indices must be a 1-D int64 array, not {idx.dtype}")
        k = len(idx)
        # np.take(mode="clip") would silently clamp a bad index: check instead.
        if k and (int(idx.min()) < 0 or int(idx.max()) >= self.n_pages):
            raise ValueError(f"page index out of range 0..{self.n_pages - 1}")
        return k

    def _check_buffer(self, buf: np.ndarray, k: int, what: str) -> None:
        if (
            buf.dtype != np.uint8
            or buf.ndim != 2
            or buf.shape[1] != PAGE_SIZE
            or buf.shape[0] < k
            or not buf.flags.c_contiguous
        ):
            raise ValueError(
                f"{what} must be a C-contiguous uint8 array of at least ({k}, {PAGE_SIZE}), "
                f"not {buf.dtype} {buf.shape}"
            )

    def _check_out(self, out: np.ndarray) -> None:
        if out.dtype != np.int64 or out.ndim != 1 or len(out) < self.n_pages:
            raise ValueError(
                f"out must be a 1-D int64 array of at least {self.n_pages} entries, "
                f"not {out.dtype} {out.shape}"
            )

    def _require_baseline(self) -> None:
        if not self._has_baseline:
            raise ReplicationError(
                f"{self.name} tracker has no baseline: reset() must record the initial full copy"
            )

    # -- the interface

    def reset(self, pages: np.ndarray) -> None:
        self._check_pages(pages)
        self._before_reset()
        np.copyto(self._shadow, pages)
        self._has_baseline = True

    def baseline(self) -> np.ndarray:
        """Read-only view of the shadow.

        Raises:
            ReplicationError: before :meth:`reset`.
        """
        self._require_baseline()
        view = self._shadow.view()
        view.flags.writeable = False
        return view

    def stage(self, pages: np.ndarray, idx: np.ndarray, staging: np.ndarray) -> np.ndarray:
        """Copy ``pages[idx]`` into ``staging[:len(idx)]``; return that view.

        Raises:
            ValueError: wrong shapes or dtypes, an index out of range.
        """
        self._check_pages(pages)
        k = self._check_idx(idx)
        self._check_buffer(staging, k, "staging")
        out = staging[:k]
        # mode="clip": with the default mode="raise", numpy buffers the whole result in
        # a fresh array before copying it to `out` (16 MB for 4000 pages). Indices were
        # range-checked above.
        np.take(pages, idx, axis=0, out=out, mode="clip")
        return out

    def previous(self, idx: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        """The last version sent of pages ``idx``, copied into ``out[:len(idx)]``.

        Returns None before :meth:`reset` (no version known).

        Raises:
            ValueError: wrong shapes or dtypes, an index out of range.
        """
        if not self._has_baseline:
            return None
        k = self._check_idx(idx)
        self._check_buffer(out, k, "out")
        view = out[:k]
        np.take(self._shadow, idx, axis=0, out=view, mode="clip")
        return view

    def commit(self, idx: np.ndarray, staged: np.ndarray) -> None:
        """Record ``staged[:len(idx)]`` as the version sent of pages ``idx``.

        Raises:
            ReplicationError: before :meth:`reset`.
            ValueError: wrong shapes or dtypes, an index out of range.
        """
        self._require_baseline()
        k = self._check_idx(idx)
        self._check_buffer(staged, k, "staged")
        self._shadow[idx] = staged[:k]
        self._after_commit(idx)

    def rearm(self) -> None:
        """Start a new tracking interval (nothing to do for a shadow-only tracker)."""

    def close(self) -> None:
        """Release resources. Idempotent."""

    # -- hooks for subclasses

    def _before_reset(self) -> None:
        pass

    def _after_commit(self, idx: np.ndarray) -> None:
        pass

    def _collect(self, mask: np.ndarray, out: np.ndarray) -> int:
        count = int(np.count_nonzero(mask))
        np.compress(mask, self._arange, out=out[:count])
        return count

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- compare

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


class CompareTracker(_ShadowTracker):
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
        self._bufs = [np.zeros((chunk_pages, _WORDS_PER_PAGE), dtype=bool) for _ in range(threads)]
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


# --------------------------------------------------------------------------- soft-dirty


class PagemapSource(Protocol):
    """The kernel side of soft-dirty tracking for one RAM mapping of one process."""

    def read(self, out: np.ndarray) -> None:
        """Fill ``out`` (``uint64``, one entry per guest page) with pagemap entries."""
        ...

    def clear(self) -> None:
        """Clear the soft-dirty bits of the whole process (``clear_refs`` ``4``)."""
        ...

    def close(self) -> None: ...


def find_ram_mapping(maps_text: str, ram_path: Path, size: int) -> int:
    """Virtual address at which a process maps offset 0 of ``ram_path``.

    ``maps_text`` is the content of ``/proc/<pid>/maps``. The mapping may be split into
    several VMAs (QEMU's madvise calls split it); they must all belong to one mapping
    that covers ``size`` bytes.

    Raises:
        ReplicationError: the file is not mapped, mapped twice, or mapped short.
    """
    wanted = {str(ram_path), os.path.realpath(ram_path)}
    pieces: dict[int, list[tuple[int, int]]] = {}  # base address -> [(offset, length)]
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6:
            continue
        name = fields[5].removesuffix(" (deleted)")
        if name not in wanted:
            continue
        start_s, end_s = fields[0].split("-")
        start, end, offset = int(start_s, 16), int(end_s, 16), int(fields[2], 16)
        pieces.setdefault(start - offset, []).append((offset, end - start))
    if not pieces:
        raise ReplicationError(f"{ram_path} is not mapped by the QEMU process")
    if len(pieces) > 1:
        bases = ", ".join(hex(b) for b in sorted(pieces))
        raise ReplicationError(f"{ram_path} is mapped more than once ({bases})")
    ((base, spans),) = pieces.items()
    covered = 0
    for offset, length in sorted(spans):
        if offset > covered:
            break
        covered = max(covered, offset + length)
    if covered < size:
        raise ReplicationError(
            f"{ram_path} is mapped for {covered} bytes from offset 0, guest RAM is {size}"
        )
    return base


class ProcPagemap:
    """Soft-dirty bits of QEMU's RAM mapping, from ``/proc/<pid>/{maps,pagemap,clear_refs}``.

    Raises (constructor):
        ReplicationError: the process is gone, the file is not mapped, or the /proc
            files cannot be opened (reading another process's pagemap needs ptrace
            access to it).
    """

    def __init__(self, pid: int, ram_path: Path, n_pages: int) -> None:
        self.pid = pid
        proc = Path(f"/proc/{pid}")
        try:
            maps_text = (proc / "maps").read_text()
        except OSError as err:
            raise ReplicationError(f"cannot read /proc/{pid}/maps: {err}") from err
        self.address = find_ram_mapping(maps_text, ram_path, n_pages * PAGE_SIZE)
        self._offset = self.address // PAGE_SIZE * _PAGEMAP_ENTRY
        self._nbytes = n_pages * _PAGEMAP_ENTRY
        self._pagemap_fd = -1
        self._clear_fd = -1
        try:
            self._pagemap_fd = os.open(proc / "pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self._clear_fd = os.open(proc / "clear_refs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError as err:
            self.close()
            raise ReplicationError(f"cannot open /proc/{pid} soft-dirty files: {err}") from err

    def read(self, out: np.ndarray) -> None:
        """Raises: ReplicationError if the read fails or comes back short."""
        view = out.data.cast("B")
        got = 0
        try:
            while got < self._nbytes:
                n = os.preadv(self._pagemap_fd, [view[got:]], self._offset + got)
                if n <= 0:
                    break
                got += n
        except OSError as err:
            raise ReplicationError(f"reading /proc/{self.pid}/pagemap: {err}") from err
        if got != self._nbytes:
            raise ReplicationError(
                f"short read from /proc/{self.pid}/pagemap ({got} of {self._nbytes} bytes)"
            )

    def clear(self) -> None:
        """Raises: ReplicationError if the kernel refuses."""
        try:
            os.write(self._clear_fd, b"4")
        except OSError as err:
            raise ReplicationError(f"writing /proc/{self.pid}/clear_refs: {err}") from err

    def close(self) -> None:
        for attr in ("_pagemap_fd", "_clear_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)


class SoftDirtyTracker(_ShadowTracker):
    """Dirty pages from the kernel's soft-dirty bits, checked against the shadow.

    A page is a *candidate* when its soft-dirty bit is set (written since the last
    clear) or when an earlier scan reported it and it has not been committed since
    (so a sync point that never committed does not lose pages). With ``verify`` (the
    default), candidates whose bytes equal the shadow are dropped: rewrites with the
    same bytes, pages pre-copied since the last clear and not written again.

    Clearing the bits happens in :meth:`reset` and :meth:`rearm` only, and **the caller
    guarantees that the VM is stopped** then. :meth:`rearm` first folds the current bits
    into the candidate set and then clears them; a write that lands between that read
    and the clear would be lost, which is why it must not run while the guest runs
    (nor while QEMU writes guest RAM on its own; see DESIGN.md, "Sync points").
    Scans never clear, so pre-copy scans while the guest runs are safe.

    ``source`` is the kernel interface (:class:`ProcPagemap` for a real QEMU); tests
    inject a fake one.
    """

    name = "soft-dirty"
    caps = TrackerCaps(
        keeps_shadow=True, gives_previous=True, scan_during_capture=False, reset_needs_stop=True
    )

    def __init__(
        self,
        n_pages: int,
        *,
        source: PagemapSource,
        verify: bool = True,
        batch_pages: int = 64,
    ) -> None:
        super().__init__(n_pages)
        if batch_pages < 1:
            raise ValueError("batch_pages must be at least 1")
        self.verify = verify
        self._source = source
        self._entries = np.zeros(n_pages, dtype=np.uint64)
        self._bits = np.zeros(n_pages, dtype=np.uint64)
        self._cand_mask = np.zeros(n_pages, dtype=bool)
        self._bit_mask = np.zeros(n_pages, dtype=bool)
        self._pending = np.zeros(n_pages, dtype=bool)
        self._cand = np.zeros(n_pages, dtype=np.int64)
        # True right after rearm(): every bit set so far is folded into _pending and
        # anything set since is a write made while the VM was stopped, which the next
        # read of the bits (next scan or rearm) still sees. So the scan that follows
        # rearm() may skip reading pagemap.
        self._bits_folded = False
        self._batch = batch_pages
        self._ram_batch = np.zeros((batch_pages, PAGE_SIZE), dtype=np.uint8)
        self._shadow_batch = np.zeros((batch_pages, PAGE_SIZE), dtype=np.uint8)
        self._words = np.zeros((batch_pages, _WORDS_PER_PAGE), dtype=bool)
        self._differs = np.zeros(batch_pages, dtype=bool)

    def _read_bits(self) -> None:
        """Soft-dirty bits into ``self._bit_mask``."""
        self._source.read(self._entries)
        np.bitwise_and(self._entries, _SOFT_DIRTY_MASK, out=self._bits)
        np.not_equal(self._bits, 0, out=self._bit_mask)

    def _before_reset(self) -> None:
        # Clear first, copy after: a write racing with reset() leaves its bit set and is
        # compared at the next scan.
        self._source.clear()
        self._pending.fill(False)
        self._bits_folded = False

    def rearm(self) -> None:
        """Fold the current soft-dirty bits into the candidates, then clear them.

        The caller guarantees that the VM is stopped.

        Raises:
            ReplicationError: pagemap or clear_refs failed.
        """
        self._require_baseline()
        self._read_bits()
        np.logical_or(self._pending, self._bit_mask, out=self._pending)
        self._source.clear()
        self._bits_folded = True

    def scan(self, pages: np.ndarray, *, out: np.ndarray, threads: int | None = None) -> int:
        """Indices of candidate pages that differ from the shadow; returns the count.

        Raises:
            ReplicationError: before :meth:`reset`; pagemap unreadable.
            ValueError: wrong shapes or dtypes.
        """
        self._require_baseline()
        self._check_pages(pages)
        self._check_out(out)
        if self._bits_folded:
            np.copyto(self._cand_mask, self._pending)
            self._bits_folded = False
        else:
            self._read_bits()
            np.logical_or(self._bit_mask, self._pending, out=self._cand_mask)
        c = self._collect(self._cand_mask, self._cand)
        cand = self._cand[:c]
        n = self._verify(pages, cand, out) if self.verify else self._copy(cand, out)
        # Candidates equal to the shadow need nothing; the rest stay candidates until
        # committed.
        self._pending[cand] = False
        self._pending[out[:n]] = True
        return n

    @staticmethod
    def _copy(cand: np.ndarray, out: np.ndarray) -> int:
        out[: len(cand)] = cand
        return len(cand)

    def _verify(self, pages: np.ndarray, cand: np.ndarray, out: np.ndarray) -> int:
        """Keep the candidates whose bytes differ from the shadow; returns how many."""
        ram_b, shadow_b = self._ram_batch, self._shadow_batch
        ram_w, shadow_w = ram_b.view(np.uint64), shadow_b.view(np.uint64)
        words, differs = self._words, self._differs
        n = 0
        for i in range(0, len(cand), self._batch):
            ci = cand[i : i + self._batch]
            b = len(ci)
            # Gathered into cache-sized buffers: fancy indexing would allocate.
            np.take(pages, ci, axis=0, out=ram_b[:b], mode="clip")
            np.take(self._shadow, ci, axis=0, out=shadow_b[:b], mode="clip")
            np.not_equal(ram_w[:b], shadow_w[:b], out=words[:b])
            np.logical_or.reduce(words[:b], axis=1, out=differs[:b])
            k = int(np.count_nonzero(differs[:b]))
            if k == b:
                out[n : n + b] = ci
            elif k:
                np.compress(differs[:b], ci, out=out[n : n + k])
            n += k
        return n

    def _after_commit(self, idx: np.ndarray) -> None:
        self._pending[idx] = False

    def close(self) -> None:
        self._source.close()


# --------------------------------------------------------------------------- probe, factory


def _kernel_config(option: str) -> str | None:
    """``y``/``m``/``not set`` for a kernel option, from /proc/config.gz or /boot; or None."""
    candidates = [Path("/proc/config.gz"), Path(f"/boot/config-{os.uname().release}")]
    for path in candidates:
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        text = raw.decode(errors="replace")
        for line in text.splitlines():
            if line.startswith(f"{option}="):
                return line.split("=", 1)[1]
            if line == f"# {option} is not set":
                return "not set"
        return "not set"
    return None


def _pagemap_entry(fd: int, address: int) -> int:
    raw = os.pread(fd, _PAGEMAP_ENTRY, address // PAGE_SIZE * _PAGEMAP_ENTRY)
    return int.from_bytes(raw, "little")


def probe_soft_dirty() -> tuple[bool, str]:
    """Can this kernel track soft-dirty pages? Returns ``(ok, reason)``.

    Tested on a private page of this process: clear the bits (``clear_refs`` ``4`` on
    /proc/self), check bit 55 is clear, write the page, check bit 55 is set. Note that
    this clears the soft-dirty bits of this whole process (harmless: nothing else here
    uses them; the next write to each page takes one minor fault).
    """
    release = os.uname().release
    try:
        page = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as err:
        return False, f"cannot map a probe page: {err}"
    try:
        anchor = ctypes.c_char.from_buffer(page)
        address = ctypes.addressof(anchor)
        del anchor  # release the buffer export, or page.close() fails
        page[0] = 1  # fault it in
        try:
            pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            return False, f"cannot open /proc/self/pagemap: {err}"
        try:
            try:
                with open("/proc/self/clear_refs", "wb", buffering=0) as clear_refs:
                    clear_refs.write(b"4")
            except OSError as err:
                return False, f"cannot write /proc/self/clear_refs: {err}"
            before = _pagemap_entry(pagemap, address)
            page[0] = 2
            after = _pagemap_entry(pagemap, address)
        finally:
            os.close(pagemap)
    finally:
        page.close()
    if not after >> PRESENT_BIT & 1:
        return False, "probe page not present in /proc/self/pagemap after a write"
    if before >> SOFT_DIRTY_BIT & 1:
        return (
            False,
            f"clear_refs 4 did not clear bit {SOFT_DIRTY_BIT} of pagemap (kernel {release})",
        )
    if not after >> SOFT_DIRTY_BIT & 1:
        config = _kernel_config("CONFIG_MEM_SOFT_DIRTY")
        known = (
            f"CONFIG_MEM_SOFT_DIRTY is {config}"
            if config
            else "CONFIG_MEM_SOFT_DIRTY is likely off"
        )
        return False, (
            f"bit {SOFT_DIRTY_BIT} of /proc/self/pagemap stays 0 after writing a page "
            f"(kernel {release}: {known}); use the compare tracker"
        )
    return True, f"soft-dirty tracking works (kernel {release})"


def make_tracker(
    kind: str,
    *,
    n_pages: int,
    qemu_pid: int | None,
    ram_path: Path | None,
    threads: int = 1,
) -> DirtyTracker:
    """Build the tracker named by ``replication.tracker``.

    ``threads`` is the compare tracker's scan threads (ignored by soft-dirty).

    Raises:
        ConfigError: unknown ``kind``.
        ReplicationError: soft-dirty on a kernel that cannot track it (the probe's
            reason), no QEMU pid or RAM path for it, or QEMU's /proc files unusable.
    """
    if kind == "compare":
        return CompareTracker(n_pages, threads=threads)
    if kind == "soft-dirty":
        ok, reason = probe_soft_dirty()
        if not ok:
            raise ReplicationError(f"soft-dirty tracking unavailable: {reason}")
        if qemu_pid is None or ram_path is None:
            raise ReplicationError("soft-dirty tracking needs the QEMU pid and the RAM file path")
        source = ProcPagemap(qemu_pid, ram_path, n_pages)
        return SoftDirtyTracker(n_pages, source=source)
    raise ConfigError(
        f"unknown dirty-page tracker {kind!r} (expected one of {', '.join(TRACKER_KINDS)})",
        key="replication.tracker",
    )
