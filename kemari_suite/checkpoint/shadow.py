"""What every dirty-page tracker shares: declared capabilities and the shadow copy.

:class:`TrackerCaps` is what a tracker tells the engine about itself, so the engine
never asks which tracker it holds. :class:`ShadowTracker` keeps the *shadow*, the last
version sent of every page, and builds on it everything that is the same for every
tracker (reset, baseline, stage, previous, commit); a tracker adds its own ``scan``
(and ``rearm`` when it keeps kernel state). The contract they implement, and the one
rule that keeps the replica exact, are in :mod:`.tracker`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Self

import numpy as np

from kemari_suite.errors import ReplicationError
from kemari_suite.vm.guestram import PAGE_SIZE

#: ``uint64`` words in one page (the unit of the word-by-word compare).
WORDS_PER_PAGE = PAGE_SIZE // 8


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
    #: The scan is cheap and re-arms itself, and :meth:`DirtyTracker.rescan` reports
    #: only what was written since: the window may scan and stage beside QEMU's
    #: device-state capture, then rescan once the capture is done and stage again
    #: only what QEMU wrote meanwhile.
    stage_during_capture: bool = False


class ShadowTracker:
    """The shadow copy and everything built on it: reset, stage, previous, commit.

    A base, not a tracker: a subclass sets ``name`` and ``caps`` and adds ``scan``
    (and ``rearm``, ``close`` and the ``_before_reset``/``_after_commit`` hooks when it
    keeps more state than the shadow).

    Raises (constructor):
        ValueError: ``n_pages`` not positive.
    """

    #: Set by each subclass (class constants, not state).
    name: str
    caps: TrackerCaps

    def __init__(self, n_pages: int) -> None:
        if n_pages <= 0:
            raise ValueError(f"n_pages must be positive, not {n_pages}")
        self.n_pages = n_pages
        #: Why this tracker runs; set by make_tracker.
        self.reason = ""
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

    def rescan(self, out: np.ndarray, *, threads: int | None = None) -> int:
        """Not offered (``caps.stage_during_capture`` is False): a shadow's scan reads
        every page, so the window never scans twice.

        Raises:
            ReplicationError: always.
        """
        raise ReplicationError(f"the {self.name} tracker has no cheap rescan")

    def verification(self) -> dict[str, int] | None:
        """None: not checked against another tracker."""
        return None

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


__all__ = ["WORDS_PER_PAGE", "ShadowTracker", "TrackerCaps"]
