"""The uffd-wp tracker: written pages from the kernel, no shadow, cost following the dirty set.

The helper inside QEMU (:mod:`kemari_suite.vm.wphelper`) registers guest RAM with a
userfaultfd in asynchronous write-protect mode. From then on, the first write to a
protected page (by a vCPU, by QEMU's device emulation, or by the kernel on QEMU's
behalf) lifts its protection; nothing waits. One ``PAGEMAP_SCAN`` ioctl on
``/proc/<qemu>/pagemap`` returns the ranges whose protection was lifted
(``PAGE_IS_WRITTEN``) and protects them again in the same call
(``PM_SCAN_WP_MATCHING``), so a write after the scan is reported by the next one. A scan
walks page tables, not guest RAM: about a millisecond for a GiB with few pages written.

No shadow: the tracker only knows *which* pages were written, not what was sent
(``caps.keeps_shadow`` and ``caps.gives_previous`` are false; pages are encoded without
an XOR base). Pages a scan reported stay *pending* until :meth:`commit`: a sync point
that failed after its scan reports them again at the next one.

Arming (:meth:`UffdWpTracker.reset`) protects every page first; the full copy taken
after it may run with the guest running, since a write during the copy is reported.
Scans may also run while the guest runs (pre-copy), for the same reason.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kemari_suite.checkpoint.shadow import TrackerCaps
from kemari_suite.errors import ReplicationError
from kemari_suite.vm.guestram import PAGE_SIZE
from kemari_suite.vm.wphelper import PAGEMAP_SCAN, PmScanArg

PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WRITTEN = 1 << 1
#: Regions one ioctl can return before it stops and is called again after the last one.
VEC_REGIONS = 4096
#: Guest pages (1 GiB) from which a scan with two threads walks the halves at once.
SPLIT_PAGES = 1 << 18
_PAGE_SHIFT = 12


#: QEMU's own userfaultfd users: one range takes one userfaultfd, so they exclude ours.
QEMU_UFFD_CAPABILITIES = ("postcopy-ram", "background-snapshot")


class QMPExecutor(Protocol):
    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any: ...


async def refuse_qemu_userfaultfd(vm: QMPExecutor, kind: str, helper: Path | None) -> None:
    """Refuse to protect a QEMU whose own userfaultfd users are on, when the uffd-wp
    tracker may run in it (its helper loaded; ``kind`` "auto" or "uffd-wp").

    Raises:
        ReplicationError: naming the migration capabilities that are on.
    """
    if helper is None or kind not in ("auto", "uffd-wp"):
        return
    caps = await vm.execute("query-migrate-capabilities")
    on = [
        c["capability"]
        for c in caps or []
        if c.get("state") and c.get("capability") in QEMU_UFFD_CAPABILITIES
    ]
    if on:
        raise ReplicationError(
            f"QEMU has migration capabilities {', '.join(on)} on, which use a userfaultfd "
            "over guest RAM: they cannot run beside the uffd-wp tracker's helper (turn "
            "them off, or set replication.tracker to soft-dirty or compare)"
        )


def protect_ram(sock: Path, ram_path: Path, size: int, *, timeout: float = 10) -> int:
    """Ask the helper inside QEMU to write-protect guest RAM; returns its address there.

    Raises:
        ReplicationError: the helper is not there, or refused (its reason quoted).
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            s.sendall(f"PROTECT {ram_path} {size}\n".encode())
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError as err:
        raise ReplicationError(
            f"uffd-wp helper at {sock} did not answer ({err}): is it loaded into QEMU?"
        ) from err
    text = reply.decode(errors="replace").strip()
    if not text.startswith("OK "):
        raise ReplicationError(f"uffd-wp helper refused to protect {ram_path}: {text or 'EOF'}")
    return int(text[3:], 16)


class PagemapScan:
    """``PAGEMAP_SCAN`` over one process's guest RAM mapping: written pages, re-protected.

    Raises (constructor):
        ReplicationError: /proc/<pid>/pagemap cannot be opened.
    """

    def __init__(self, pid: int, address: int, n_pages: int) -> None:
        self.pid = pid
        self.address = address
        self.n_pages = n_pages
        self._end = address + n_pages * PAGE_SIZE
        self._vec = np.zeros((VEC_REGIONS, 3), dtype=np.uint64)
        self._arg = PmScanArg(size=ctypes.sizeof(PmScanArg))
        # The second half's walker, made on the first split scan.
        self._pool: ThreadPoolExecutor | None = None
        self._arg2: PmScanArg | None = None
        self._vec2: np.ndarray | None = None
        self._out2: np.ndarray | None = None
        try:
            self._fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise ReplicationError(f"cannot open /proc/{pid}/pagemap: {err}") from err

    def written(self, out: np.ndarray, *, threads: int = 1) -> int:
        """Indices of pages written since the last call into ``out``, ascending; count.

        They are write-protected again by the same call. With ``threads`` > 1 and RAM of
        at least :data:`SPLIT_PAGES`, the two halves are walked at once (the ioctl
        releases the GIL; the kernel walks each half's page tables on its own core).

        Raises:
            ReplicationError: the ioctl failed (QEMU gone, or its RAM not registered).
        """
        if threads < 2 or self.n_pages < SPLIT_PAGES:
            return self._walk(self.address, self._end, self._arg, self._vec, out)
        mid = self.address + self.n_pages // 2 * PAGE_SIZE
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, "kemari-wpscan")
            self._arg2 = PmScanArg(size=ctypes.sizeof(PmScanArg))
            self._vec2 = np.zeros((VEC_REGIONS, 3), dtype=np.uint64)
            self._out2 = np.zeros(self.n_pages - self.n_pages // 2, dtype=np.int64)
        assert self._arg2 is not None and self._vec2 is not None and self._out2 is not None
        upper = self._pool.submit(self._walk, mid, self._end, self._arg2, self._vec2, self._out2)
        try:
            n = self._walk(self.address, mid, self._arg, self._vec, out)
        finally:
            m = upper.result()
        out[n : n + m] = self._out2[:m]
        return n + m

    def _walk(self, start: int, end: int, arg: PmScanArg, vec: np.ndarray, out: np.ndarray) -> int:
        n = 0
        while start < end:
            arg.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
            arg.start, arg.end, arg.walk_end = start, end, 0
            arg.vec, arg.vec_len, arg.max_pages = vec.ctypes.data, VEC_REGIONS, 0
            arg.category_inverted, arg.category_anyof_mask = 0, 0
            arg.category_mask = arg.return_mask = PAGE_IS_WRITTEN
            try:
                regions = fcntl.ioctl(self._fd, PAGEMAP_SCAN, arg)
            except OSError as err:
                raise ReplicationError(f"PAGEMAP_SCAN on /proc/{self.pid}/pagemap: {err}") from err
            if regions:
                n = self._expand(vec[:regions], out, n)
            if regions < len(vec):
                # Room was left in ``vec``: the kernel walked to ``end``. Its walk_end is
                # not to be trusted then: it keeps the point where the kernel's own
                # 512-region buffer last filled, and a second call from there would
                # report again a page written since this one protected it.
                return n
            # ``vec`` is full: go on after the last region reported. (Pages between it
            # and the kernel's stop were not written; a new write there is news.)
            resume = int(vec[regions - 1, 1])
            if resume <= start:
                raise ReplicationError(f"PAGEMAP_SCAN on /proc/{self.pid}/pagemap made no progress")
            start = resume
        return n

    def _expand(self, vec: np.ndarray, out: np.ndarray, n: int) -> int:
        first = ((vec[:, 0] - np.uint64(self.address)) >> np.uint64(_PAGE_SHIFT)).astype(np.int64)
        lengths = ((vec[:, 1] - vec[:, 0]) >> np.uint64(_PAGE_SHIFT)).astype(np.int64)
        total = int(lengths.sum())
        if len(vec) == 1:
            out[n : n + total] = np.arange(first[0], first[0] + total, dtype=np.int64)
            return n + total
        # Each region's pages are its first index plus 0, 1, 2...: a running count
        # minus where the region starts in the output.
        offsets = np.cumsum(lengths) - lengths
        seg = out[n : n + total]
        seg[:] = np.arange(total, dtype=np.int64)
        seg += np.repeat(first - offsets, lengths)
        return n + total

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class UffdWpTracker:
    """Dirty pages from userfaultfd write-protect marks; no shadow.

    ``scanner`` is the kernel side (:class:`PagemapScan` over a QEMU registered by its
    helper). ``arm`` write-protects all of guest RAM (the helper's PROTECT): it runs at
    :meth:`reset`.

    Raises (constructor):
        ValueError: ``n_pages`` not positive.
    """

    name = "uffd-wp"
    caps = TrackerCaps(
        keeps_shadow=False,
        gives_previous=False,
        scan_during_capture=False,
        reset_needs_stop=False,
        stage_during_capture=True,
    )

    def __init__(
        self, n_pages: int, *, scanner: PagemapScan, arm: Callable[[], None] | None = None
    ) -> None:
        if n_pages <= 0:
            raise ValueError(f"n_pages must be positive, not {n_pages}")
        self.n_pages = n_pages
        self.reason = ""
        self._scanner = scanner
        self._arm = arm
        self._pending = np.zeros(n_pages, dtype=bool)
        self._npending = 0
        self._new = np.zeros(n_pages, dtype=np.int64)
        self._armed = False

    def _check_out(self, out: np.ndarray) -> None:
        if out.dtype != np.int64 or out.ndim != 1 or len(out) < self.n_pages:
            raise ValueError(
                f"out must be a 1-D int64 array of at least {self.n_pages} entries, "
                f"not {out.dtype} {out.shape}"
            )

    def reset(self, pages: np.ndarray | None = None) -> None:
        """Arm: protect every page and forget pending ones. Take the full copy *after*.

        Raises:
            ReplicationError: the helper or the scan failed.
        """
        if self._arm is not None:
            self._arm()
        # Whatever was written before now is part of the full copy that follows.
        self._scanner.written(self._new)
        self._pending.fill(False)
        self._npending = 0
        self._armed = True

    def baseline(self) -> np.ndarray:
        raise ReplicationError("the uffd-wp tracker keeps no shadow (no baseline to read)")

    def scan(self, pages: np.ndarray, *, out: np.ndarray, threads: int | None = None) -> int:
        """Pages written since the last scan, plus pending ones; ascending; the count.

        Raises:
            ReplicationError: before :meth:`reset`; the scan failed.
            ValueError: ``out`` too small or of the wrong type.
        """
        if not self._armed:
            raise ReplicationError("uffd-wp tracker is not armed: reset() must come first")
        self._check_out(out)
        split = 1 if threads is None else threads
        if self._npending == 0:
            n = self._scanner.written(out, threads=split)
            self._pending[out[:n]] = True
            self._npending = n
            return n
        k = self._scanner.written(self._new, threads=split)
        self._pending[self._new[:k]] = True
        n = int(np.count_nonzero(self._pending))
        np.copyto(out[:n], np.flatnonzero(self._pending))
        self._npending = n
        return n

    def rescan(self, out: np.ndarray, *, threads: int | None = None) -> int:
        """Only the pages written since the last scan or rescan (re-protected by the same
        call), ascending; the count. They stay pending, so a sync point that never
        commits them finds them again.

        Raises:
            ReplicationError: before :meth:`reset`; the scan failed.
            ValueError: ``out`` too small or of the wrong type.
        """
        if not self._armed:
            raise ReplicationError("uffd-wp tracker is not armed: reset() must come first")
        self._check_out(out)
        n = self._scanner.written(out, threads=1 if threads is None else threads)
        new = out[:n]
        self._npending += int(np.count_nonzero(~self._pending[new]))
        self._pending[new] = True
        return n

    def stage(self, pages: np.ndarray, idx: np.ndarray, staging: np.ndarray) -> np.ndarray:
        """Copy ``pages[idx]`` into ``staging[:len(idx)]``; return that view.

        Raises:
            ValueError: ``staging`` too small, an index out of range.
        """
        k = len(idx)
        if staging.shape[0] < k:
            raise ValueError(f"staging holds {staging.shape[0]} pages, {k} to stage")
        if k and (int(idx[0]) < 0 or int(idx.max()) >= self.n_pages):
            raise ValueError(f"page index out of range 0..{self.n_pages - 1}")
        out = staging[:k]
        np.take(pages, idx, axis=0, out=out, mode="clip")
        return out

    def previous(self, idx: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        """None: no shadow, so no previous version (pages go without an XOR base)."""
        return None

    def commit(self, idx: np.ndarray, staged: np.ndarray | None = None) -> None:
        """Pages ``idx`` were handed to the sender: no longer pending."""
        if len(idx):
            # O(len(idx)), not a pass over every page's mark at each commit.
            self._npending -= int(np.count_nonzero(self._pending[idx]))
            self._pending[idx] = False

    def verification(self) -> dict[str, int] | None:
        """None: not checked against another tracker."""
        return None

    def rearm(self) -> None:
        """Nothing to do: the scan itself re-protects."""

    def close(self) -> None:
        self._scanner.close()


__all__ = [
    "QEMU_UFFD_CAPABILITIES",
    "PagemapScan",
    "UffdWpTracker",
    "protect_ram",
    "refuse_qemu_userfaultfd",
]
