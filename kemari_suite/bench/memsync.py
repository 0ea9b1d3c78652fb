"""The memsync benchmark: sync-point pauses, guest throughput, bytes per page, failover.

Everything is timed on the host's clock (QEMU stops the guest's clock while the VM is
stopped, so guest timers never see the pauses). One run of :func:`run` measures, on one
link profile and in the same session:

- **floor**: the product's own stopped window (:class:`StoppedWindow`: stop, device
  state, one full compare scan with the engine's two threads, beside the capture when
  ``replication.overlap_scan``, staging of the dirty pages, cont), on a running guest
  with the same workload; no encoding or transfer. Staging is in the floor now (the
  ``stage`` part of each row) because the floor runs the product's window; earlier
  floors left it out and scanned with one thread;
- **baseline**: the guest's CPU-bound spin counter per host second, unprotected, after
  the same device-state warm-up a protected guest gets (:mod:`kemari_suite.bench.warmup`:
  ``ktouch`` timed cold and warm around a few seconds of captures, and checked);
- **protected** (compressible pages, then incompressible pages, both with TLS 1.3 on
  the replication link as shipped, then compressible pages again on the MAC-only link,
  ``replication.tls = off``), each with the product's defaults, pre-copy included; then
  both patterns with pre-copy off (the A/B behind its default): the same counter under
  protection, and every checkpoint's pause, dirty pages and bytes sent. The two
  compressible runs with TLS on and off give TLS's cost on the pause and the guest's
  throughput;
- **link**: TLS's cost on the link alone, MAC-only beside TLS, one epoch of
  incompressible pages at a time over loopback (:mod:`kemari_suite.bench.linkcost`);
- **failover**: heartbeat-timeout expiry to the guest running on the secondary.

The guest runs ``memdirty`` (dirtying a steady number of pages per second) and
``counter 0`` (a spin loop whose progress is the throughput probe).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kemari_suite import lab as labmod
from kemari_suite.bench import linkcost
from kemari_suite.bench import warmup as wu
from kemari_suite.bench.touchprobe import BenchImage, bench_image
from kemari_suite.checkpoint.sender import Buffers
from kemari_suite.checkpoint.tracker import make_tracker
from kemari_suite.checkpoint.window import StoppedWindow, WindowResult
from kemari_suite.config import KemariConfig
from kemari_suite.errors import BenchmarkError, KemariError
from kemari_suite.lab.pair import LabPair, PairOptions
from kemari_suite.vm import guestmem
from kemari_suite.vm.devstate import DeviceStateCapturer, enable_ignore_shared
from kemari_suite.vm.guestram import GuestRAM
from kemari_suite.vm.image import kernel_cmdline
from kemari_suite.vm.qemu import AsyncVM, VMSpec, choose_accel, wait_for_console

Progress = Callable[[str], None]

#: The parts of a floor row (ms), in the window's order (see :func:`window_row`).
FLOOR_PARTS = ("stop", "devstate", "scan", "stage", "cont")
#: (pattern, ``replication.tls``, ``replication.pipelining``, tracker) of each protected
#: run; the first has the failover. The product's defaults first ("auto": the tracker
#: the probe picks, and pre-copy as the engine decides for it); then pre-copy off, the
#: A/B behind its default, with both page patterns (a pass compresses every page it
#: resends: the incompressible pattern is the costly case); then the compare tracker,
#: whose shadow gives every page an XOR base (the most a cache of previous versions
#: could save in bytes per page).
PHASES: tuple[tuple[str, str, bool | str, str], ...] = (
    ("compressible", "on", "auto", "auto"),
    ("incompressible", "on", "auto", "auto"),
    ("compressible", "off", "auto", "auto"),
    ("compressible", "on", False, "auto"),
    ("incompressible", "on", False, "auto"),
    ("compressible", "on", "auto", "compare"),
)


def workload(pattern: str, pages_per_s: int, mib: int) -> str:
    return f"memdirty -m {mib} -r {pages_per_s} -P {pattern} & counter -q 0"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


@dataclass
class Phase:
    """One protected run's figures."""

    pattern: str
    #: ``replication.tls`` of the run: "on" (TLS 1.3) or "off" (MAC-only).
    tls: str = "on"
    #: ``replication.pipelining`` (pre-copy between sync points).
    pipelining: bool = False
    #: The tracker the primary ran (its status), and why.
    tracker: str = ""
    tracker_reason: str = ""
    window_s: float = 0.0
    checkpoints: int = 0
    pause_ms_p50: float | None = None
    pause_ms_p99: float | None = None
    pause_ms_max: float | None = None
    paused_share: float | None = None
    dirty_pages_p50: float | None = None
    bytes_per_dirty_page: float | None = None
    transfer_ms_p50: float | None = None
    ack_ms_p50: float | None = None
    spin_rate: float | None = None
    throughput_ratio: float | None = None
    throughput_loss: float | None = None
    parts_ms_p50: dict[str, float] = field(default_factory=dict)


@dataclass
class Result:
    profile: str
    memory_mib: int
    pages_per_100ms: int
    accel: str
    floor_ms_p50: float | None = None
    floor_ms_p99: float | None = None
    floor_parts_ms_p50: dict[str, float] = field(default_factory=dict)
    baseline_spin_rate: float | None = None
    #: The baseline guest's device-state warm-up and its check
    #: (:meth:`kemari_suite.bench.wu.WarmupCheck.to_dict`).
    warmup: dict[str, Any] = field(default_factory=dict)
    phases: list[Phase] = field(default_factory=list)
    failover_ms: float | None = None
    heartbeat_timeout_ms: int = 0
    #: The link alone, MAC-only then TLS (:class:`linkcost.LinkCost` as dicts).
    link: list[dict[str, Any]] = field(default_factory=list)
    #: TLS minus MAC-only, compressible pages (:func:`linkcost.tls_cost`).
    tls_cost: dict[str, float] = field(default_factory=dict)
    #: Why the link rows are missing (the protected runs are kept).
    link_error: str | None = None
    checks: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- the product's window


@contextlib.contextmanager
def product_window(
    vm: AsyncVM, cfg: KemariConfig, *, tracker: str = "compare"
) -> Iterator[StoppedWindow]:
    """The engine's stopped window for a running ``vm``, built as the primary builds it.

    Guest RAM mapped, the ``tracker`` with the engine's two scan threads, staging and
    index buffers allocated up front, a device-state capturer, the scan beside the
    capture as ``replication.overlap_scan`` says. Its parts are the window's attributes
    (``tracker``, ``pages``, ``staging``); all are closed on exit. Call
    :func:`initial_sync` before the first :meth:`StoppedWindow.run`, and commit each
    result (``window.tracker.commit(result.idx, result.staged)``) as the engine does.

    Raises:
        KemariError: the RAM file, the tracker or the capturer could not be set up.
    """
    with contextlib.ExitStack() as stack:
        ram = stack.enter_context(GuestRAM(vm.paths.ram))
        n = ram.n_pages
        trk = make_tracker(
            tracker,
            n_pages=n,
            qemu_pid=vm.pid,
            ram_path=vm.paths.ram,
            threads=2,
            wp_socket=vm.paths.wp_socket if vm.spec.wp_helper else None,
            wp_unavailable=vm.spec.wp_helper_reason,
        )
        stack.callback(trk.close)
        cap = DeviceStateCapturer(vm, vm.paths.migration_socket)
        stack.callback(cap.close)
        buffers = Buffers.allocate(n, trk.caps)
        window = StoppedWindow(
            vm,
            cap,
            trk,
            ram.pages,
            staging=buffers.staging,
            index=buffers.index,
            overlap_scan=cfg.replication.overlap_scan,
            stage_during_capture=cfg.replication.stage_during_capture,
            scan_threads=2,
        )
        stack.callback(window.close)
        yield window


async def initial_sync(window: StoppedWindow) -> None:
    """Give the window's tracker its baseline as the engine does: a tracker with a
    shadow takes every page, staged, with the guest stopped around it when the tracker
    says so (``caps.reset_needs_stop``); one without is armed."""
    tracker = window.tracker
    if not tracker.caps.keeps_shadow:
        tracker.reset(window.pages)
        return
    all_idx = np.arange(tracker.n_pages, dtype=np.int64)
    stop = tracker.caps.reset_needs_stop
    if stop:
        await window.vm.execute("stop")
    try:
        tracker.reset(tracker.stage(window.pages, all_idx, window.staging))
    finally:
        if stop:
            await window.vm.execute("cont")


def stage_and_commit(
    window: StoppedWindow,
    idx: np.ndarray,
    apply: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> None:
    """Stage pages ``idx`` a staging buffer at a time and commit each piece, as the
    engine does when it sends pages from RAM; ``apply(part, staged)`` sees each piece
    before its commit (what the secondary would write)."""
    step = len(window.staging)
    for start in range(0, len(idx), step):
        part = idx[start : start + step]
        staged = window.tracker.stage(window.pages, part, window.staging)
        if apply is not None:
            apply(part, staged)
        window.tracker.commit(part, staged)


async def complete(window: StoppedWindow, res: WindowResult) -> WindowResult:
    """Commit a window's pages as the engine does, and the result as the engine times it.

    A spill (more dirty pages than the staging buffer holds) left the guest stopped:
    its pages are staged piece by piece (the engine sends each piece) and the guest
    resumed; the returned result's pause and stage times include that.
    """
    if res.staged is not None:
        window.tracker.commit(res.idx, res.staged)
        return res
    t = time.perf_counter()
    stage_and_commit(window, res.idx)
    t_staged = time.perf_counter()
    await window.cont()
    t_end = time.perf_counter()
    return dataclasses.replace(
        res,
        stage_ms=res.stage_ms + (t_staged - t) * 1e3,
        pause_ms=(t_end - res.t_start) * 1e3,
        t_end=t_end,
        resumed=True,
    )


def window_row(res: WindowResult, *, overlapped: bool) -> dict[str, float]:
    """One stopped window's timing row (ms): ``total`` (stop..cont), ``stop``,
    ``devstate``, ``scan``, ``stage`` and ``cont``.

    ``cont`` is what the pause holds beyond the other parts (``cont`` itself, plus the
    epoch switch when there is one). With ``overlapped`` (the window ran the scan beside
    the capture: ``StoppedWindow.overlap``), ``devstate`` lasts until both finished and
    ``scan`` is the scan's own time inside it, so it is not subtracted again.
    """
    serial = res.stop_ms + res.devstate_ms + res.stage_ms + (0.0 if overlapped else res.scan_ms)
    return {
        "total": res.pause_ms,
        "stop": res.stop_ms,
        "devstate": res.devstate_ms,
        "scan": res.scan_ms,
        "stage": res.stage_ms,
        "cont": res.pause_ms - serial,
    }


# --------------------------------------------------------------------------- floor, runs


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": source_commit(),
    }


def header_lines(title: str, command: str, machine: dict[str, Any], tail: str = "") -> list[str]:
    """The head every benchmark report starts with: its title, the command that measured
    it, the commit and the machine (from :func:`machine_info`); ``tail`` continues the
    machine line (what the run measured, in the report's own words)."""
    return [
        f"# {title}",
        "",
        f"Command: `{command}`  ",
        f"Commit: `{machine.get('commit') or 'unknown'}`  ",
        f"Machine: {machine.get('cpu') or '?'} ({machine.get('cpus')} CPUs), kernel "
        f"{machine.get('kernel')}, {machine.get('date')}{tail}",
    ]


def source_commit() -> str | None:
    """The git commit the running code comes from, with ``-dirty`` when the checkout
    has changes to tracked files other than results (a benchmark that writes its own
    files under benchmarks/results/ does not make the next one's code dirty); None
    outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    status = ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [*status, "--", ".", ":(exclude)benchmarks/results"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


class SpinProbe:
    """Reads the guest's spin counter from a RAM file."""

    def __init__(self, ram_path: Path) -> None:
        self.ram = GuestRAM(ram_path, populate=False)
        self.offset: int | None = None

    def value(self) -> int | None:
        pages = self.ram.pages
        if self.offset is not None:
            v = guestmem.read_value(pages, self.offset)
            if v is not None:
                return v
        hits = guestmem.locate_probes(pages, guestmem.COUNTER_MAGIC)
        if not hits:
            return None
        best = max(hits, key=lambda h: h.value)
        self.offset = best.offset
        return best.value

    def rate(self, seconds: float) -> float:
        """Increments per host second over ``seconds``."""
        v0, t0 = self.value(), time.monotonic()
        time.sleep(seconds)
        v1, t1 = self.value(), time.monotonic()
        if v0 is None or v1 is None:
            raise BenchmarkError("memsync", "spin counter not found in guest RAM")
        return (v1 - v0) / (t1 - t0)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.value() is None:
            if time.monotonic() > deadline:
                raise BenchmarkError("memsync", "the guest's spin counter never appeared")
            time.sleep(0.2)

    def close(self) -> None:
        self.ram.close()


async def _floor_and_baseline(
    cfg: KemariConfig,
    bench: BenchImage,
    lay: labmod.LabLayout,
    wl: str,
    samples: int,
    settle: float,
    window: float,
    say: Progress,
    *,
    warm: bool = True,
) -> tuple[list[dict[str, float]], float, wu.WarmupCheck | None]:
    """The floor and (with ``warm``) the warmed baseline, on one unprotected guest."""
    image = bench.image
    accel, _ = choose_accel(cfg.vm.accel)
    params = wu.DEFAULT
    if warm and bench.has_probe:
        # ktouch first (the warm-up's probe), then the workload once it has exited.
        wl = params.then(wl)
    run_root = cfg.paths.run_dir / f"kemari-{lay.lab_id}-bench"
    shm = cfg.paths.shm_dir / f"kemari-{lay.lab_id}-bench"
    spec = VMSpec(
        name="bench",
        kernel=image.kernel,
        initrd=image.initrd,
        append=kernel_cmdline(ip=f"{lay.guest_ip}/{lay.lan_prefix}", run=wl),
        memory_mib=cfg.vm.memory_mib,
        accel=accel,
        netdev=f"tap,ifname={lay.tap_primary},script=no,downscript=no",
        netns=lay.ns_primary,
    )
    vm = AsyncVM(spec, run_root=run_root, shm_dir=shm)
    await vm.start()
    try:
        await asyncio.to_thread(wait_for_console, vm.paths.console, "KEMARI-BOOTED", 120)
        check: wu.WarmupCheck | None = None
        if warm:
            say("baseline: device-state warm-up (as a protected guest gets)")
            if bench.has_probe:
                check = await wu.warm_up(vm, params, accel=accel, say=say)
            else:
                n, took = await wu.capture_for(vm, params.capture_s, params.interval_s)
                check = wu.WarmupCheck(
                    accel, params.min_ratio, captures=n, capture_s=took, error=bench.note
                )
            say(f"baseline: warm-up {check.describe()}")
        probe = SpinProbe(vm.paths.ram)
        try:
            # The spin counter starts once ktouch has exited.
            await asyncio.to_thread(probe.wait, 60 + (params.probe_s if warm else 0))
            say(f"baseline: settling {settle:.0f} s (the guest clocksource settles)")
            await asyncio.sleep(settle)
            rate = await asyncio.to_thread(probe.rate, window)
        finally:
            probe.close()
        say(f"floor: {samples} x the product's stopped window (compare tracker)")
        await enable_ignore_shared(vm)
        rows: list[dict[str, float]] = []
        with product_window(vm, cfg) as win:
            await initial_sync(win)
            for _ in range(samples):
                await asyncio.sleep(0.1)
                r = await complete(win, await win.run(resume=True))
                rows.append(window_row(r, overlapped=win.overlap))
        return rows, rate, check
    finally:
        await vm.shutdown()


def _checkpoints(pair: LabPair, since: float, until: float) -> list[dict[str, Any]]:
    rows = []
    for f in (pair.run_dir("primary") / "artifacts").glob("*/checkpoints.jsonl"):
        for line in f.read_text().splitlines():
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if since <= r["t_wall"] <= until:
                    rows.append(r)
    return rows


def _protected(
    cfg: KemariConfig,
    lay: labmod.LabLayout,
    opts: PairOptions,
    pattern: str,
    warmup: float,
    window: float,
    baseline: float,
    say: Progress,
    *,
    failover: bool,
) -> tuple[Phase, float | None]:
    pair = LabPair(lay, cfg, opts)
    phase = Phase(pattern=pattern, tls=opts.tls, pipelining=opts.pipelining is True)
    failover_ms = None
    try:
        pair.start()
        st = pair.wait_state("primary", {"protected"}, 240)
        phase.tracker, phase.tracker_reason = (
            st.get("tracker") or "",
            st.get("tracker_reason") or "",
        )
        # What the agent does, not what was asked ("auto" decides by the tracker).
        phase.pipelining = bool(st.get("precopy", phase.pipelining))
        probe = SpinProbe(pair.shm_dir("primary") / f"kemari-{opts.vm_name}.ram")
        try:
            probe.wait(60)
            say(
                f"protected ({pattern}, tls {opts.tls}, {phase.tracker}, pre-copy "
                f"{'on' if phase.pipelining else 'off'}): warming up {warmup:.0f} s"
            )
            time.sleep(warmup)
            t0 = time.time()
            rate = probe.rate(window)
            t1 = time.time()
        finally:
            probe.close()
        rows = _checkpoints(pair, t0, t1)
        if not rows:
            raise BenchmarkError("memsync", "no checkpoint in the measurement window")
        pauses = [r["pause_ms"] for r in rows]
        dirty = [r["dirty_pages"] + r.get("precopied_pages", 0) for r in rows]
        sent = sum(r["bytes_sent"] + r.get("precopy_bytes", 0) - r["devstate_bytes"] for r in rows)
        phase.window_s = t1 - t0
        phase.checkpoints = len(rows)
        phase.pause_ms_p50 = pct(pauses, 50)
        phase.pause_ms_p99 = pct(pauses, 99)
        phase.pause_ms_max = max(pauses)
        phase.paused_share = sum(pauses) / 1e3 / (t1 - t0)
        phase.dirty_pages_p50 = pct([float(d) for d in dirty], 50)
        phase.bytes_per_dirty_page = sent / max(1, sum(dirty))
        phase.transfer_ms_p50 = pct([r["transfer_ms"] for r in rows], 50)
        phase.ack_ms_p50 = pct([r["ack_ms"] for r in rows], 50)
        phase.spin_rate = rate
        phase.throughput_ratio = rate / baseline if baseline else None
        phase.throughput_loss = 1 - phase.throughput_ratio if phase.throughput_ratio else None
        for part in ("stop_ms", "devstate_ms", "scan_ms", "stage_ms"):
            v = pct([r[part] for r in rows], 50)
            if v is not None:
                phase.parts_ms_p50[part] = v
        if failover:
            say("failover: kill -9 of the primary")
            pair.kill("primary")
            st = pair.wait_state("secondary", {"active"}, opts.heartbeat_timeout_ms / 1000 + 60)
            failover_ms = (st.get("failover") or {}).get("failover_ms")
    finally:
        pair.stop()
    return phase, failover_ms


def run(
    cfg: KemariConfig,
    *,
    profile: str = "1g",
    pages_per_100ms: int = 4000,
    working_set_mib: int = 32,
    warmup: float = 8.0,
    window: float = 10.0,
    floor_samples: int = 50,
    link_epochs: int = 20,
    lab_id: str = "bm",
    progress: Progress | None = None,
) -> Result:
    """Run the memsync benchmark on one link profile (see the module docstring).

    Raises:
        BenchmarkError: a phase produced no usable figures.
        KemariError: the lab or the agents failed.
    """
    say = progress or (lambda _m: None)
    accel, _ = choose_accel(cfg.vm.accel)
    res = Result(
        profile=profile,
        memory_mib=cfg.vm.memory_mib,
        pages_per_100ms=pages_per_100ms,
        accel=accel,
        heartbeat_timeout_ms=cfg.replication.heartbeat_timeout_ms,
    )
    rate = pages_per_100ms * 10
    bench = bench_image(cfg)
    # The agents boot the very image the baseline booted.
    agent_cfg = bench.config_for_agents(cfg)
    if lab_id in labmod.list_labs():
        labmod.down(lab_id)
    lay = labmod.up(lab_id, profile)
    try:
        say(f"{profile}: baseline and floor on an unprotected guest")
        rows, baseline, check = asyncio.run(
            _floor_and_baseline(
                cfg,
                bench,
                lay,
                workload("compressible", rate, working_set_mib),
                floor_samples,
                warmup,
                window,
                say,
            )
        )
        res.floor_ms_p50 = pct([r["total"] for r in rows], 50)
        res.floor_ms_p99 = pct([r["total"] for r in rows], 99)
        res.floor_parts_ms_p50 = {
            k: float(statistics.median(r[k] for r in rows)) for k in FLOOR_PARTS
        }
        res.baseline_spin_rate = baseline
        res.warmup = check.to_dict() if check is not None else {}
        for pattern, tls, precopy, tracker in PHASES:
            opts = PairOptions(
                memory_mib=cfg.vm.memory_mib,
                workload=workload(pattern, rate, working_set_mib),
                mode=cfg.replication.mode,
                max_interval_ms=cfg.replication.max_interval_ms,
                pipelining=precopy,
                tracker=tracker,
                tracker_verify=False,
                heartbeat_timeout_ms=cfg.replication.heartbeat_timeout_ms,
                compression=cfg.replication.compression,
                tls=tls,
                # A pair of its own per phase: the witness remembers who took over
                # after the first phase's failover, and would refuse the next primary.
                vm_name=f"memsync{len(res.phases)}",
            )
            phase, fo = _protected(
                agent_cfg,
                lay,
                opts,
                pattern,
                warmup,
                window,
                baseline,
                say,
                failover=not res.phases,
            )
            res.phases.append(phase)
            if fo is not None:
                res.failover_ms = fo
    finally:
        labmod.down(lab_id)
    res.tls_cost = linkcost.tls_cost(res.phases)
    say(f"link: MAC-only beside TLS, {link_epochs} epochs of {pages_per_100ms} pages")
    try:
        res.link = [asdict(c) for c in linkcost.run(pages_per_100ms, link_epochs)]
    except KemariError as err:
        # Minutes of protected runs are worth more than this row: record, go on.
        res.link_error = str(err)
    _check(res)
    return res


def run_floor(
    cfg: KemariConfig,
    *,
    samples: int = 100,
    pages_per_100ms: int = 4000,
    working_set_mib: int = 32,
    lab_id: str = "fl",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Only the floor: the product's stopped window with the compare tracker (stop,
    device state, full scan, stage, cont; see the module doc).

    Returns p50/p99 of the total and the p50 of each part, in ms.
    """
    say = progress or (lambda _m: None)
    if lab_id in labmod.list_labs():
        labmod.down(lab_id)
    lay = labmod.up(lab_id, "unlimited")
    try:
        wl = workload("compressible", pages_per_100ms * 10, working_set_mib)
        # No baseline here, so no warm-up: the floor's own windows capture device state.
        rows, _, _ = asyncio.run(
            _floor_and_baseline(cfg, bench_image(cfg), lay, wl, samples, 8.0, 1.0, say, warm=False)
        )
    finally:
        labmod.down(lab_id)
    totals = [r["total"] for r in rows]
    return {
        "samples": len(rows),
        "memory_mib": cfg.vm.memory_mib,
        "floor_ms_p50": pct(totals, 50),
        "floor_ms_p99": pct(totals, 99),
        "parts_ms_p50": {k: float(statistics.median(r[k] for r in rows)) for k in FLOOR_PARTS},
    }


def precopy_pair(phases: list[Phase], pattern: str) -> tuple[Phase, Phase] | None:
    """(pre-copy on, pre-copy off): the first TLS-on run of ``pattern`` and its twin that
    differs in pre-copy alone (same tracker); None without both."""
    first = next((p for p in phases if p.pattern == pattern and p.tls == "on"), None)
    if first is None:
        return None
    twin = next(
        (
            p
            for p in phases
            if p is not first
            and (p.pattern, p.tls, p.tracker) == (first.pattern, first.tls, first.tracker)
            and p.pipelining != first.pipelining
        ),
        None,
    )
    if twin is None:
        return None
    return (first, twin) if first.pipelining else (twin, first)


def _check(res: Result) -> None:
    """Compare with the targets of the memsync issue; record, never assert."""
    c = res.checks
    comp = next((p for p in res.phases if p.pattern == "compressible" and p.tls == "on"), None)
    for pattern, key in (
        ("compressible", "precopy_pays"),
        ("incompressible", "precopy_pays_incompressible"),
    ):
        pair = precopy_pair(res.phases, pattern)
        if pair is None:
            continue
        pre, off = pair
        a, b = off.pause_ms_p50, pre.pause_ms_p50
        ra, rb = off.throughput_ratio, pre.throughput_ratio
        if a is not None and b is not None and ra is not None and rb is not None:
            # Pre-copy pays when it shortens the pause without costing throughput.
            c[key] = b < a and rb >= ra
    if comp is not None and res.floor_ms_p50 is not None and comp.pause_ms_p50 is not None:
        c["pause_p50_within_3ms_of_floor"] = comp.pause_ms_p50 <= res.floor_ms_p50 + 3
        if comp.pause_ms_p99 is not None:
            c["pause_p99_within_2x_floor"] = comp.pause_ms_p99 <= 2 * res.floor_ms_p50
        if comp.throughput_loss is not None and comp.paused_share is not None:
            c["throughput_loss_within_paused_share_plus_5pts"] = (
                comp.throughput_loss <= comp.paused_share + 0.05
            )
        if comp.bytes_per_dirty_page is not None:
            c["compressible_bytes_per_page_at_most_1500"] = comp.bytes_per_dirty_page <= 1500
    if res.failover_ms is not None:
        c["failover_within_1s_of_timeout"] = res.failover_ms <= 1000
    if res.warmup:
        c["baseline_warmup_took_hold"] = bool(res.warmup.get("ok"))
    tls_rows = [row for row in res.link if row["tls"] == "on"]
    if tls_rows:
        c["link_tls_is_1_3"] = all(row["tls_version"] == "TLSv1.3" for row in tls_rows)


def to_dict(res: Result) -> dict[str, Any]:
    return asdict(res)


def write_results(results: list[Result], folder: Path, command: str) -> Path:
    """Write JSON and a markdown table under ``folder``; returns the markdown path."""
    folder.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    data = {"command": command, "machine": machine, "results": [asdict(r) for r in results]}
    (folder / "memsync.json").write_text(json.dumps(data, indent=1))
    lines = [
        *header_lines("memsync benchmark", command, machine),
        "",
        "| profile | pattern | tls | tracker | pre-copy | floor p50 ms | pause p50 ms "
        "| pause p99 ms | paused share | throughput vs base | bytes/dirty page "
        "| failover ms (after timeout) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if v is None else fmt.format(v)

    for r in results:
        fo = f"{f(r.failover_ms)} ({r.heartbeat_timeout_ms} ms timeout)"
        for i, p in enumerate(r.phases):
            lines.append(
                f"| {r.profile} | {p.pattern} | {p.tls} | {p.tracker} "
                f"| {'on' if p.pipelining else 'off'} | {f(r.floor_ms_p50)} "
                f"| {f(p.pause_ms_p50)} | {f(p.pause_ms_p99)} | {f(p.paused_share, '{:.1%}')} "
                f"| {f(p.throughput_ratio, '{:.2f}')} | {f(p.bytes_per_dirty_page, '{:.0f}')} "
                f"| {fo if i == 0 else ''} |"
            )
    reasons = dict.fromkeys(
        f"{p.tracker}: {p.tracker_reason}" for r in results for p in r.phases if p.tracker
    )
    lines += ["", "Trackers (why each ran):", "", *(f"- {why}" for why in reasons)]
    lines += [
        "",
        "The floor is the stopped window alone on an unprotected guest, with the compare "
        "tracker (the slowest); the last row runs that tracker in the product.",
    ]
    lines += linkcost.markdown([(r.profile, r.tls_cost, r.link, r.link_error) for r in results])
    lines += ["", "Baseline warm-up (device-state captures first; docs/benchmarks.md):", ""]
    for r in results:
        if r.warmup:
            lines.append(f"- {r.profile}: {wu.describe(r.warmup)}")
        loud = wu.alarm(wu.summarize([r.warmup] if r.warmup else []), "baseline")
        if loud:
            lines.append(f"- **{r.profile}: {loud}**")
    lines += ["", "Checks against the targets:", ""]
    for r in results:
        for k, v in r.checks.items():
            lines.append(f"- {r.profile}: {k}: {'met' if v else 'NOT met'}")
    md = folder / "memsync.md"
    md.write_text("\n".join(lines) + "\n")
    return md


__all__ = ["PHASES", "Result", "run", "stage_and_commit", "write_results"]
