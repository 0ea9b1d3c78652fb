"""``replication.tracker_verify``: the compare tracker beside a fast one, failing on a miss.

A fast tracker (uffd-wp, soft-dirty) is trusted to report every page written since the
last scan. :class:`VerifyingTracker` checks that on every scan: the compare tracker
(a shadow of what was sent, compared with RAM) finds the pages that really differ, and
any of them the fast tracker did not report is a miss, raised as an error. Pages the
fast tracker reports that did not change (rewritten with the same bytes, or written
between its scan and the staging of the copy) are *over-reporting*: harmless, counted.

The compare scan runs first and the fast scan after it. A page that differs at the
compare scan was written after its copy was staged, so after the fast scan that
reported it before; the later fast scan reports it again. The opposite order would
flag writes that land between the two scans while the guest runs (pre-copy).

It costs what the compare tracker costs (a shadow, a full scan): a test and diagnosis
mode, not for production.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kemari_suite.checkpoint.compare import CompareTracker
from kemari_suite.checkpoint.shadow import TrackerCaps
from kemari_suite.errors import ReplicationError

if TYPE_CHECKING:
    from kemari_suite.checkpoint.tracker import DirtyTracker


class TrackerMissed(ReplicationError):
    """The fast tracker did not report pages whose bytes changed."""

    def __init__(self, tracker: str, missed: np.ndarray) -> None:
        first = ", ".join(str(int(p)) for p in missed[:8])
        super().__init__(
            f"the {tracker} tracker missed {len(missed)} changed page(s) that the compare "
            f"tracker found (first: {first})"
        )
        self.missed = missed


class VerifyingTracker:
    """``fast`` checked against a :class:`CompareTracker` on every scan.

    Raises (constructor):
        ValueError: the two track different sizes.
    """

    def __init__(self, fast: DirtyTracker, compare: CompareTracker) -> None:
        self.fast = fast
        self.compare = compare
        self.n_pages = compare.n_pages
        if fast.n_pages != self.n_pages:
            raise ValueError("the fast and compare trackers must track the same pages")
        self.name = f"{fast.name}+verify"
        self.reason = ""
        # The compare tracker's shadow needs the staged full copy, and a fast tracker that
        # arms at reset must arm with no write in between: reset with the guest stopped.
        self.caps = TrackerCaps(
            keeps_shadow=True, gives_previous=True, scan_during_capture=False, reset_needs_stop=True
        )
        self._fast_out = np.zeros(self.n_pages, dtype=np.int64)
        self._mask = np.zeros(self.n_pages, dtype=bool)
        #: Scans checked, pages the fast tracker reported that had not changed.
        self.scans = 0
        self.over_reported = 0
        self.reported = 0

    def verification(self) -> dict[str, int]:
        """The scans checked, pages reported, and pages reported that had not changed."""
        return {"scans": self.scans, "reported": self.reported, "over_reported": self.over_reported}

    def reset(self, pages: np.ndarray) -> None:
        self.fast.reset(pages)
        self.compare.reset(pages)

    def baseline(self) -> np.ndarray:
        return self.compare.baseline()

    def scan(self, pages: np.ndarray, *, out: np.ndarray, threads: int | None = None) -> int:
        """The fast tracker's pages, after checking that they hold every changed page.

        Raises:
            TrackerMissed: a page changed that the fast tracker did not report.
        """
        c = self.compare.scan(pages, out=out, threads=threads)
        f = self.fast.scan(pages, out=self._fast_out, threads=threads)
        fast = self._fast_out[:f]
        self._mask.fill(False)
        self._mask[fast] = True
        changed = out[:c]
        missed = changed[~self._mask[changed]]
        self.scans += 1
        self.reported += f
        self.over_reported += f - (c - len(missed))
        if len(missed):
            raise TrackerMissed(self.fast.name, missed.copy())
        out[:f] = fast
        return f

    def rescan(self, out: np.ndarray, *, threads: int | None = None) -> int:
        """Not offered: every scan is checked against a full compare.

        Raises:
            ReplicationError: always.
        """
        raise ReplicationError(f"the {self.name} tracker has no cheap rescan")

    def stage(self, pages: np.ndarray, idx: np.ndarray, staging: np.ndarray) -> np.ndarray:
        return self.compare.stage(pages, idx, staging)

    def previous(self, idx: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        return self.compare.previous(idx, out)

    def commit(self, idx: np.ndarray, staged: np.ndarray) -> None:
        self.compare.commit(idx, staged)
        self.fast.commit(idx, staged)

    def rearm(self) -> None:
        self.fast.rearm()
        self.compare.rearm()

    def close(self) -> None:
        self.fast.close()
        self.compare.close()


__all__ = ["TrackerMissed", "VerifyingTracker"]
