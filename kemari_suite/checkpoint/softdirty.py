"""The soft-dirty tracker: dirty pages from the kernel, checked against the shadow.

The kernel marks every page a process writes after ``clear_refs`` (write ``4`` to
``/proc/<pid>/clear_refs``) in bit 55 of its ``/proc/<pid>/pagemap`` entry. QEMU maps
guest RAM from a shared file, so those bits of QEMU's RAM mapping are the guest's
writes (and QEMU's own), whatever the RAM size. Needs ``CONFIG_MEM_SOFT_DIRTY=y``:
:func:`probe_soft_dirty` says whether this kernel has it, and why not.

The kernel side sits behind :class:`PagemapSource` (:class:`ProcPagemap` for a real
QEMU), so tests and benchmarks drive :class:`SoftDirtyTracker` with a fake one.
"""

from __future__ import annotations

import ctypes
import gzip
import mmap
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from kemari_suite.checkpoint.shadow import WORDS_PER_PAGE, ShadowTracker, TrackerCaps
from kemari_suite.errors import ReplicationError
from kemari_suite.vm.guestram import PAGE_SIZE

#: Bit 55 of a /proc/<pid>/pagemap entry: the page was written since the last clear.
SOFT_DIRTY_BIT = 55
#: Bit 63: the page is present in RAM (mapped in the process's page tables).
PRESENT_BIT = 63
_SOFT_DIRTY_MASK = np.uint64(1 << SOFT_DIRTY_BIT)
_PAGEMAP_ENTRY = 8


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


class SoftDirtyTracker(ShadowTracker):
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
        self._words = np.zeros((batch_pages, WORDS_PER_PAGE), dtype=bool)
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


# --------------------------------------------------------------------------- probe


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


__all__ = [
    "PRESENT_BIT",
    "SOFT_DIRTY_BIT",
    "PagemapSource",
    "ProcPagemap",
    "SoftDirtyTracker",
    "find_ram_mapping",
    "probe_soft_dirty",
]
