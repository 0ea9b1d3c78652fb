"""The stopped window: the only place the engine stops the guest for a sync point.

::

    stop ──► capture device state ──┬──► stage dirty pages ──► switch epoch ──► cont?
             scan (beside the capture│when the tracker allows it, else after it)

    with ``replication.stage_during_capture`` and a tracker whose scan is cheap and
    re-arms itself (uffd-wp: ``caps.stage_during_capture``); by default ("auto") only
    for guests up to :data:`STAGE_BESIDE_MAX_PAGES`: a walk of QEMU's page tables
    beside its save slows the save by about the walk's length, and the rescan walks
    them again, so on larger guests the serial order is the shorter pause:

    stop ──► capture device state ──┬──► rescan, stage again what QEMU wrote ──► ...
             scan, stage (beside it)│    meanwhile (usually nothing)

Everything that needs the guest stopped happens here, in this order, and nothing
else does: encoding and sending run after the resume (see :mod:`.sender`). RAM is
staged after the device state because QEMU may still write guest RAM while the VM
is stopped (a virtio transmission completing as its backend drains); a page changed
after staging is caught by the next scan, since the tracker's shadow only ever takes
staged bytes. Staging beside the capture keeps that rule: the rescan after the capture
reports every page written since the first scan, and those are staged again (the
tracker's marks are re-armed by each scan, so nothing written in between escapes).

The engine and every benchmark that times a pause use this one class, so a benchmark
times exactly what the product does. It is given its collaborators (a QMP executor,
a device-state capturer, a tracker, RAM and preallocated buffers), not the agent, and
is unit-tested with fakes of each.

Failure: any exception after ``stop`` is re-raised as :class:`WindowError` carrying
whether the guest is still stopped, so the caller decides (resume unprotected, or
keep output held) instead of leaving the guest stopped by accident. ``stop``, the
capture and ``cont`` each get ``qmp_timeout_s``: a QEMU that does not answer in time is
hung (:class:`QMPTimeout`, ``WindowError.hung``), and the caller kills it as a failed
host instead of stalling. Every step has its fault point (``window-stop``,
``window-capture``, ``window-scan``, ``window-stage``, ``stopped``, ``window-cont``).

A guest that powered itself off (or panicked) since the last sync point is no failure:
QEMU stops it, ``stop`` is then a no-op, and ``cont`` is refused until a reset. The
window completes with the guest left stopped (``resumed`` false), the epoch holding what
the guest did on its way down, and the guest's own event is handled by the caller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from kemari_suite.checkpoint.tracker import DirtyTracker
from kemari_suite.errors import ReplicationError
from kemari_suite.testing import faults


class QMPExecutor(Protocol):
    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any: ...


class Capturer(Protocol):
    async def capture(self) -> bytes: ...


#: Dirty pages from which the window stages in two halves at once.
STAGE_SPLIT_PAGES = 1024
#: QEMU run states in which the guest stopped itself: a poweroff (QEMU runs with
#: ``-no-shutdown``) or a panic. QEMU refuses ``cont`` there until a reset; no failure of
#: this host is implied.
SELF_STOPPED = frozenset({"shutdown", "guest-panicked"})

#: With ``stage_during_capture = "auto"``, the largest guest (pages) staged beside the
#: capture: 1 GiB. Pause p50 in paired runs here (uffd-wp, pre-copy on): 128 MiB 4.3
#: beside against 4.5-5.4 ms after; 1 GiB 6.3 against 6.1; 4 GiB 9.2-9.5 against
#: 5.6-6.8 (the save alone took 4.5-5.1 ms beside the walk, 1.7 ms without it).
STAGE_BESIDE_MAX_PAGES = (1 << 30) // 4096

#: How long ``stop``, the capture and ``cont`` may take unless the caller says otherwise.
QMP_TIMEOUT_S = 5.0


class QMPTimeout(ReplicationError):
    """QEMU did not answer ``command`` within ``timeout_s``: it is hung."""

    def __init__(self, command: str, timeout_s: float) -> None:
        super().__init__(f"QEMU did not answer {command} in {timeout_s * 1e3:.0f} ms (hung)")
        self.command = command
        self.timeout_s = timeout_s


class WindowError(ReplicationError):
    """A step inside the stopped window failed.

    ``stopped`` tells whether the guest is still stopped (the caller must resume it or
    say why it stays stopped); ``step`` names the step that failed; ``hung`` is true when
    QEMU did not answer in time (resuming it is pointless: it is a failed host).
    """

    def __init__(self, step: str, cause: BaseException, *, stopped: bool) -> None:
        super().__init__(f"stopped window failed at {step}: {cause}")
        self.step = step
        self.stopped = stopped
        self.hung = isinstance(cause, QMPTimeout)


@dataclass
class WindowResult:
    """What one stopped window captured, and what each step cost (milliseconds)."""

    devstate: bytes
    #: Indices of the dirty pages (a copy: the index buffer is reused).
    idx: np.ndarray
    #: Their bytes, a view into the preallocated staging buffer; None when there were
    #: more than it holds (a *spill*): the guest was left stopped, for the caller to
    #: send them piece by piece from RAM before it resumes.
    staged: np.ndarray | None
    stop_ms: float
    devstate_ms: float
    scan_ms: float
    #: The staging the pause waited for: with ``stage_during_capture``, only the rescan
    #: and the pages staged again after the capture (the rest ran beside it).
    stage_ms: float
    #: From before ``stop`` to after ``cont``; 0.0 when the guest was left stopped.
    pause_ms: float
    #: perf_counter() at ``stop`` and right after the window (resume or not).
    t_start: float
    t_end: float
    #: Wall clock at ``stop`` (to find QEMU's own STOP/RESUME events).
    t_start_wall: float
    resumed: bool
    #: QEMU's device-state capture alone (``devstate_ms`` lasts until the scan beside
    #: it finished too).
    capture_ms: float = 0.0

    @property
    def dirty_pages(self) -> int:
        return len(self.idx)

    @property
    def spilled(self) -> bool:
        return self.staged is None


class StoppedWindow:
    """Runs sync points' stopped windows for one VM.

    ``staging`` is a preallocated ``(pages, PAGE)`` buffer (all of RAM for a tracker
    with a shadow, a fraction otherwise: :func:`~.sender.staging_pages`) and ``index``
    an ``int64`` buffer of ``n_pages`` slots; neither is allocated inside the window.
    When a scan finds more dirty pages than ``staging`` holds, the window stages none and
    leaves the guest stopped (``WindowResult.staged`` is None) whatever ``resume`` says.
    """

    def __init__(
        self,
        vm: QMPExecutor,
        capturer: Capturer,
        tracker: DirtyTracker,
        pages: np.ndarray,
        *,
        staging: np.ndarray,
        index: np.ndarray,
        overlap_scan: bool = True,
        stage_during_capture: bool | Literal["auto"] = False,
        scan_threads: int = 2,
        qmp_timeout_s: float = QMP_TIMEOUT_S,
    ) -> None:
        self.vm = vm
        self.capturer = capturer
        self.tracker = tracker
        self.pages = pages
        self.staging = staging
        self.index = index
        self.overlap_scan = overlap_scan
        self.stage_during_capture = stage_during_capture
        # The rescan's own index buffer (allocated here, never in the window).
        self._rescan_index = np.zeros_like(index)
        self.scan_threads = scan_threads
        self.qmp_timeout_s = qmp_timeout_s
        # The scan's own thread, never queued behind other executor work.
        self._exec = concurrent.futures.ThreadPoolExecutor(1, "kemari-stopscan")

    @property
    def overlap(self) -> bool:
        """The scan runs beside the capture (and with ``early_stage`` the staging too).

        Read from the tracker in place now, so a tracker swapped in (a checker wrapped
        around the fast one) brings its own caps.
        """
        return self.overlap_scan and (self.tracker.caps.scan_during_capture or self.early_stage)

    @property
    def early_stage(self) -> bool:
        """The staging runs beside the capture and a rescan follows it (asked for, or
        "auto" and a guest of at most :data:`STAGE_BESIDE_MAX_PAGES`; and the tracker
        can)."""
        wanted = self.stage_during_capture
        if wanted == "auto":
            wanted = len(self.pages) <= STAGE_BESIDE_MAX_PAGES
        return bool(self.overlap_scan and wanted and self.tracker.caps.stage_during_capture)

    def close(self) -> None:
        self._exec.shutdown(wait=False)

    async def qmp(self, command: str) -> None:
        """Run ``stop`` or ``cont`` within the QMP timeout.

        Raises:
            QMPTimeout: no answer in time (QEMU hung).
            Exception: whatever the executor raises for a refused command.
        """
        try:
            await asyncio.wait_for(self.vm.execute(command), self.qmp_timeout_s)
        except TimeoutError as err:
            raise QMPTimeout(command, self.qmp_timeout_s) from err

    async def cont(self) -> bool:
        """End a stopped window: ``cont`` within the QMP timeout (fault point
        ``window-cont``). False when QEMU refused it because the guest stopped itself
        (:meth:`self_stopped`): the guest stays down, and its own event (a poweroff that
        landed between the last sync point and this one) is the caller's to handle.

        Raises:
            QMPTimeout: QEMU did not answer; InjectedFault; the executor's errors.
        """
        faults.hit("window-cont")
        try:
            await self.qmp("cont")
        except QMPTimeout:
            raise
        except Exception:
            if await self.self_stopped():
                return False
            raise
        return True

    async def self_stopped(self) -> str:
        """QEMU's run state when the guest stopped itself (:data:`SELF_STOPPED`), else
        "" (running, paused by the engine, or QEMU not answering)."""
        with contextlib.suppress(Exception):
            res = await asyncio.wait_for(self.vm.execute("query-status"), self.qmp_timeout_s)
            status = str(res.get("status", "")) if isinstance(res, dict) else ""
            if status in SELF_STOPPED:
                return status
        return ""

    async def _capture(self) -> bytes:
        faults.hit("window-capture")
        try:
            return await asyncio.wait_for(self.capturer.capture(), self.qmp_timeout_s)
        except TimeoutError as err:
            raise QMPTimeout("migrate (device-state capture)", self.qmp_timeout_s) from err

    async def _stage(self, idx: np.ndarray) -> np.ndarray:
        """Stage ``idx`` into the staging buffer; a large set in two halves at once, one
        on the scan's thread (numpy's copy releases the GIL; the vCPUs are idle)."""
        k = len(idx)
        if k < STAGE_SPLIT_PAGES or self.scan_threads < 2:
            return self.tracker.stage(self.pages, idx, self.staging)
        h = k // 2
        other = asyncio.get_running_loop().run_in_executor(
            self._exec, self.tracker.stage, self.pages, idx[h:], self.staging[h:]
        )
        try:
            self.tracker.stage(self.pages, idx[:h], self.staging)
        finally:
            await other
        return self.staging[:k]

    def _timed_scan(self) -> tuple[int, float]:
        faults.hit("window-scan")
        t = time.perf_counter()
        k = self.tracker.scan(self.pages, out=self.index, threads=self.scan_threads)
        return k, time.perf_counter() - t

    def _beside_capture(self) -> tuple[int, float, bool | None]:
        """On the scan's thread, beside the capture: scan and, with ``early_stage``,
        stage what fits; the count, the scan's seconds and whether the pages were
        staged (None: not tried)."""
        k, scan_s = self._timed_scan()
        if not self.early_stage:
            return k, scan_s, None
        if k > len(self.staging):
            return k, scan_s, False
        self.tracker.stage(self.pages, self.index[:k], self.staging)
        return k, scan_s, True

    def _stage_again(self, k: int, staged: bool) -> tuple[int, bool]:
        """After the capture: the pages QEMU wrote since the first scan, staged again.

        Returns the count in ``index`` (and ``staging`` when staged) and whether they
        are staged (False: more than the staging buffer holds).
        """
        faults.hit("window-scan")
        # The capture is done and the vCPUs idle: the rescan may use the scan's threads
        # (it walks every page table again, 2-3 ms at 4 GiB on one thread here).
        n = self.tracker.rescan(self._rescan_index, threads=self.scan_threads)
        if n == 0:
            return k, staged
        new = self._rescan_index[:n]
        idx = self.index[:k]
        pos = np.minimum(np.searchsorted(idx, new), max(k - 1, 0))
        if staged and k and bool(np.all(idx[pos] == new)):
            # Staged before QEMU wrote them again: take their bytes once more.
            self.staging[pos] = self.pages[new]
            return k, True
        union = np.union1d(idx, new)
        m = len(union)
        self.index[:m] = union
        if m > len(self.staging):
            return m, False
        self.tracker.stage(self.pages, self.index[:m], self.staging)
        return m, True

    async def run(
        self,
        *,
        resume: bool,
        while_stopped: Callable[[], Awaitable[None] | None] | None = None,
    ) -> WindowResult:
        """Stop, capture, scan, stage, call ``while_stopped`` (the epoch switch), and
        resume when ``resume`` is true.

        Raises:
            WindowError: a step failed; ``.stopped`` says whether the guest is stopped.
        """
        t0 = time.perf_counter()
        t0_wall = time.time()
        step = "stop"
        stopped = False
        try:
            await self.qmp("stop")
            stopped = True
            faults.hit("window-stop")
            t_stop = time.perf_counter()
            step = "capture"
            early: bool | None = None
            if self.overlap:
                # The scan needs no device state and QEMU's capture no guest RAM
                # (x-ignore-shared): run them side by side, the scan (and with
                # early_stage the staging) on its own thread.
                beside = asyncio.get_running_loop().run_in_executor(
                    self._exec, self._beside_capture
                )
                try:
                    devstate = await self._capture()
                    cap_s = time.perf_counter() - t_stop
                finally:
                    step = "scan"
                    k, scan_s, early = await beside
                    step = "capture"
                t_dev = time.perf_counter()
                dev_s = t_dev - t_stop
                t_scan = t_dev
            else:
                devstate = await self._capture()
                t_dev = time.perf_counter()
                step = "scan"
                self.tracker.rearm()
                k, _ = self._timed_scan()
                t_scan = time.perf_counter()
                scan_s, dev_s = t_scan - t_dev, t_dev - t_stop
                cap_s = dev_s
            step = "stage"
            faults.hit("window-stage")
            if early is not None:
                k, early = self._stage_again(k, early)
            idx = self.index[:k].copy()
            staged: np.ndarray | None = None
            if early:
                staged = self.staging[:k]
            elif early is None and k <= len(self.staging):
                staged = await self._stage(idx)
            else:
                # More than the staging buffer holds: the guest stays stopped while
                # the caller sends them from RAM (the bound on the agent's memory).
                resume = False
            t_stage = time.perf_counter()
            step = "epoch switch"
            if while_stopped is not None:
                res = while_stopped()
                if res is not None:
                    await res
            faults.hit("stopped")
            if resume:
                step = "cont"
                resume = await self.cont()
                stopped = not resume
            t_end = time.perf_counter()
        except Exception as err:
            raise WindowError(step, err, stopped=stopped) from err
        return WindowResult(
            devstate=devstate,
            idx=idx,
            staged=staged,
            stop_ms=(t_stop - t0) * 1e3,
            devstate_ms=dev_s * 1e3,
            scan_ms=scan_s * 1e3,
            stage_ms=(t_stage - t_scan) * 1e3,
            pause_ms=(t_end - t0) * 1e3 if resume else 0.0,
            t_start=t0,
            t_end=t_end,
            t_start_wall=t0_wall,
            resumed=resume,
            capture_ms=cap_s * 1e3,
        )


__all__ = [
    "QMP_TIMEOUT_S",
    "STAGE_BESIDE_MAX_PAGES",
    "QMPTimeout",
    "StoppedWindow",
    "WindowError",
    "WindowResult",
]
