"""Dirty-page tracking: which guest pages differ from what the secondary was sent.

The contract (:class:`DirtyTracker`, with the capabilities each tracker declares in
:class:`TrackerCaps`), the buffers a sync point needs, and :func:`make_tracker`, which
picks one by probing (``replication.tracker = "auto"``: uffd-wp, then soft-dirty, then
compare) and says why. Three trackers implement it, each in its own module:

- :class:`~.uffdwp.UffdWpTracker` (:mod:`.uffdwp`) reads the pages QEMU wrote from
  userfaultfd write-protect marks with one ``PAGEMAP_SCAN`` ioctl, which protects them
  again. Its cost follows the dirty set, and it keeps no shadow. Needs Linux 6.7 and
  the helper loaded into QEMU (:mod:`kemari_suite.vm.wphelper`).

- :class:`~.compare.CompareTracker` (:mod:`.compare`) keeps a *shadow* copy of guest
  RAM and compares it with RAM in chunks. Works on every kernel. The scan is
  memory-bound (it reads RAM and the shadow).
- :class:`~.softdirty.SoftDirtyTracker` (:mod:`.softdirty`) asks the kernel which pages
  QEMU wrote since the last clear (``/proc/<pid>/clear_refs`` and bit 55 of
  ``/proc/<pid>/pagemap``), then compares only those candidates with the shadow to drop
  false positives. Needs ``CONFIG_MEM_SOFT_DIRTY=y``: see
  :func:`~.softdirty.probe_soft_dirty`.

The last two keep the shadow (:class:`~.shadow.ShadowTracker`), which is also the base
for XOR-delta encoding (:meth:`DirtyTracker.previous`). ``replication.tracker_verify``
runs the compare tracker beside a fast one and fails on any page it missed
(:mod:`.verifying`).

The one rule that keeps the replica exact: **the shadow holds the bytes that were staged
(and so sent), never bytes re-read from RAM.** QEMU may write guest RAM at any time,
even while the VM is stopped, and pre-copy runs while the guest runs. A page that changes
while it is compared or copied is either reported now or, since the shadow only ever
receives staged bytes, reported by the next scan. Nothing is lost; at worst a page is
sent twice.

A sync point drives a tracker like this (the stopped part is
:class:`~.window.StoppedWindow`, the only place that stops the guest for it)::

    # once; with the VM stopped if tracker.caps.reset_needs_stop:
    staged = tracker.stage(ram, all_idx, staging)
    tracker.reset(staged)                         # send exactly these bytes as the full copy
    ...
    # optional pre-copy while the guest runs (pipelining):
    n = tracker.scan(ram, out=idx, threads=1)
    staged = tracker.stage(ram, idx[:n], staging)
    base = tracker.previous(idx[:n], prev)       # before commit: XOR-delta base
    tracker.commit(idx[:n], staged)              # when the bytes are handed to the sender
    # the sync point, VM stopped (beside the device-state capture if
    # tracker.caps.scan_during_capture, else after it and a rearm()):
    tracker.rearm()                               # soft-dirty: new interval (no-op for compare)
    n = tracker.scan(ram, out=idx)
    staged = tracker.stage(ram, idx[:n], staging) # then `cont`; encode and send after
    ...

Every buffer a sync point touches is allocated up front (:func:`allocate_pages`): a
fresh page-sized array costs page faults (65 ms at p99 on the test machines) in the
window where the VM is stopped. The only allocations left in a scan are index-sized
(8 bytes per dirty page) temporaries inside numpy.

A tracker is not thread-safe: one caller drives it. :class:`~.compare.CompareTracker`
may use helper threads internally for one scan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from kemari_suite.checkpoint.compare import CompareTracker
from kemari_suite.checkpoint.shadow import TrackerCaps
from kemari_suite.checkpoint.softdirty import (
    PRESENT_BIT,
    SOFT_DIRTY_BIT,
    PagemapSource,
    ProcPagemap,
    SoftDirtyTracker,
    find_ram_mapping,
    probe_soft_dirty,
)
from kemari_suite.checkpoint.uffdwp import PagemapScan, UffdWpTracker, protect_ram
from kemari_suite.checkpoint.verifying import TrackerMissed, VerifyingTracker
from kemari_suite.errors import ConfigError, ReplicationError
from kemari_suite.vm.guestram import PAGE_SIZE
from kemari_suite.vm.wphelper import probe_kernel

TRACKER_KINDS = ("auto", "uffd-wp", "soft-dirty", "compare")
#: The order in which ``auto`` tries them.
PROBE_ORDER = ("uffd-wp", "soft-dirty", "compare")


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


class DirtyTracker(Protocol):
    """Finds changed guest pages and keeps the last version sent of every page."""

    #: "uffd-wp", "soft-dirty" or "compare" ("...+verify" with tracker_verify).
    name: str
    #: Why this tracker runs (the probe's answer, or the config); set by make_tracker.
    reason: str
    n_pages: int
    caps: TrackerCaps

    def reset(self, pages: np.ndarray) -> None:
        """Take ``pages`` as the secondary's full copy of every page (the initial sync).

        Pass the bytes that are sent (staged, by the one rule), or send
        :meth:`baseline` afterwards (exactly these bytes). When
        ``caps.reset_needs_stop``, call it (and stage what it takes) with the VM
        stopped.
        """
        ...

    def baseline(self) -> np.ndarray:
        """Read-only view of the shadow: the last version sent of every page."""
        ...

    def scan(self, pages: np.ndarray, *, out: np.ndarray, threads: int | None = None) -> int:
        """Write the indices of pages that differ from the shadow into ``out``.

        ``out`` is an ``int64`` array of at least ``n_pages``; the result is
        ``out[:count]``, ascending. Returns ``count``. ``threads`` caps the helper
        threads of one scan (1 while the guest runs), at most what the tracker was
        built with; trackers without helpers ignore it.
        """
        ...

    def rescan(self, out: np.ndarray, *, threads: int | None = None) -> int:
        """Only the pages written since the last scan or rescan, into ``out``
        (ascending); they stay pending for the next scan as well. Offered only when
        ``caps.stage_during_capture`` (the stopped window's second, cheap scan, after
        QEMU's capture); others raise ReplicationError. ``threads`` as for :meth:`scan`.
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

    def verification(self) -> dict[str, int] | None:
        """With ``replication.tracker_verify``: the scans checked against the compare
        tracker, the pages reported and how many of those had not changed
        (over-reporting; a missed page stops the primary instead). None otherwise."""
        ...

    def close(self) -> None:
        """Release threads and file descriptors. Idempotent."""
        ...


def _uffd_wp(
    n_pages: int, qemu_pid: int | None, ram_path: Path | None, wp_socket: Path | None, why_not: str
) -> UffdWpTracker:
    ok, reason = probe_kernel()
    if not ok:
        raise ReplicationError(f"uffd-wp tracking unavailable: {reason}")
    if wp_socket is None:
        raise ReplicationError(
            f"uffd-wp tracking unavailable: its helper is not loaded into QEMU ({why_not or 'off'})"
        )
    if qemu_pid is None or ram_path is None:
        raise ReplicationError("uffd-wp tracking needs the QEMU pid and the RAM file path")
    size = n_pages * PAGE_SIZE

    def arm() -> None:
        protect_ram(wp_socket, ram_path, size)

    address = protect_ram(wp_socket, ram_path, size)
    tracker = UffdWpTracker(n_pages, scanner=PagemapScan(qemu_pid, address, n_pages), arm=arm)
    tracker.reason = reason
    return tracker


def _one(
    kind: str,
    *,
    n_pages: int,
    qemu_pid: int | None,
    ram_path: Path | None,
    threads: int,
    wp_socket: Path | None,
    wp_unavailable: str,
) -> DirtyTracker:
    if kind == "uffd-wp":
        return _uffd_wp(n_pages, qemu_pid, ram_path, wp_socket, wp_unavailable)
    if kind == "soft-dirty":
        ok, reason = probe_soft_dirty()
        if not ok:
            raise ReplicationError(f"soft-dirty tracking unavailable: {reason}")
        if qemu_pid is None or ram_path is None:
            raise ReplicationError("soft-dirty tracking needs the QEMU pid and the RAM file path")
        source = ProcPagemap(qemu_pid, ram_path, n_pages)
        sd = SoftDirtyTracker(n_pages, source=source)
        sd.reason = reason
        return sd
    if kind == "compare":
        return CompareTracker(n_pages, threads=threads)
    raise ConfigError(
        f"unknown dirty-page tracker {kind!r} (expected one of {', '.join(TRACKER_KINDS)})",
        key="replication.tracker",
    )


def make_tracker(
    kind: str,
    *,
    n_pages: int,
    qemu_pid: int | None,
    ram_path: Path | None,
    threads: int = 1,
    wp_socket: Path | None = None,
    wp_unavailable: str = "",
    verify: bool = False,
) -> DirtyTracker:
    """Build the tracker named by ``replication.tracker`` for QEMU process ``qemu_pid``
    mapping guest RAM from ``ram_path``; its ``reason`` says why it runs.

    ``auto`` tries uffd-wp, soft-dirty, then compare, and keeps the first that works.
    ``wp_socket`` is where the uffd-wp helper inside that QEMU listens (None: not
    loaded, because of ``wp_unavailable``). ``threads`` is the most helper threads one
    scan may use (pass the stop-time scan's count; pre-copy asks for fewer per scan).
    ``verify`` wraps the tracker in a :class:`~.verifying.VerifyingTracker`.

    Raises:
        ConfigError: unknown ``kind``.
        ReplicationError: a tracker named explicitly cannot run here (the probe's
            reason), no QEMU pid or RAM path for it, or QEMU's /proc files unusable.
    """

    def build(name: str) -> DirtyTracker:
        return _one(
            name,
            n_pages=n_pages,
            qemu_pid=qemu_pid,
            ram_path=ram_path,
            threads=threads,
            wp_socket=wp_socket,
            wp_unavailable=wp_unavailable,
        )

    tracker: DirtyTracker
    if kind == "auto":
        passed: list[str] = []
        for candidate in PROBE_ORDER:
            try:
                tracker = build(candidate)
            except ReplicationError as err:
                passed.append(str(err))
                continue
            tracker.reason = "; ".join(
                [f"chosen by probing ({tracker.reason or 'works everywhere'})", *passed]
            )
            break
    else:
        tracker = build(kind)
        tracker.reason = f"replication.tracker = {kind!r}" + (
            f" ({tracker.reason})" if tracker.reason else ""
        )
    if verify and tracker.name != "compare":
        checked = VerifyingTracker(tracker, CompareTracker(n_pages, threads=threads))
        checked.reason = f"{tracker.reason}; checked by the compare tracker (tracker_verify)"
        return checked
    return tracker


__all__ = [
    "PRESENT_BIT",
    "PROBE_ORDER",
    "SOFT_DIRTY_BIT",
    "TRACKER_KINDS",
    "CompareTracker",
    "DirtyTracker",
    "PagemapSource",
    "ProcPagemap",
    "SoftDirtyTracker",
    "TrackerCaps",
    "TrackerMissed",
    "UffdWpTracker",
    "VerifyingTracker",
    "allocate_index",
    "allocate_pages",
    "find_ram_mapping",
    "make_tracker",
    "probe_soft_dirty",
]
