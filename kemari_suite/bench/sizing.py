"""Sizing: what protecting a VM costs per GiB of guest RAM, with the compare tracker.

The compare tracker finds dirty pages by comparing all of guest RAM with a shadow copy,
at every sync point, while the VM is stopped. So the pause grows with RAM size, and
the primary agent holds copies of RAM. One run of :func:`run_sizing` measures, for each
RAM size:

- **scan** (no VM): the tracker's full compare scan of a RAM file of that size in
  /dev/shm, mapped twice as with QEMU (a writable "guest" mapping dirties pages, the
  tracker reads a read-only mapping), clean and with a fraction of the pages dirtied at
  random between scans; with 1 thread (pre-copy) and 2 threads (the stopped-VM scan of
  the primary), plus staging the dirty pages into the preallocated staging buffer;
- **vm** (where it fits in the time budget): a real guest of that size running
  ``memdirty``, its sync points run through the product's own stopped window
  (:class:`~kemari_suite.checkpoint.window.StoppedWindow`: stop, device-state capture,
  full compare scan with 2 threads, beside the capture when
  ``replication.overlap_scan``, staging of the dirty pages, cont); the shadow is
  committed after cont, as the primary does;
- **memory**: the primary agent's resident memory before and after building the tracker
  and buffers exactly as :meth:`Primary._attach` does (plus the initial full sync that
  faults the shadow in), and the secondary's replica file and the undo log of an open
  epoch.

Per-GiB figures are least-squares lines over the measured points. Nothing is assumed:
every figure comes from the run.

Usage: ``.venv/bin/python -m kemari_suite.bench.sizing [--sizes 128,256,512,1024]
[--vm-sizes ...] [--samples N] [--vm-samples N] [--out benchmarks/results]``
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shlex
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kemari_suite.bench import trackers
from kemari_suite.bench.fits import linear_fit, read_status, status_delta_mib
from kemari_suite.bench.memsync import (
    complete,
    header_lines,
    initial_sync,
    machine_info,
    pct,
    product_window,
    window_row,
)
from kemari_suite.checkpoint.tracker import (
    CompareTracker,
    allocate_index,
    allocate_pages,
    make_tracker,
    probe_soft_dirty,
)
from kemari_suite.config import KemariConfig, with_overrides
from kemari_suite.errors import KemariError
from kemari_suite.vm.guestram import PAGE_SIZE, GuestRAM

Progress = Callable[[str], None]

MIB = 1024 * 1024
#: Fractions of guest pages dirtied between two scans.
DIRTY_FRACTIONS = (0.0, 0.01, 0.10)
#: (fraction, pattern) cases of the scan measurement: "random" scatters the dirty pages
#: over all of RAM (nearly every 1 MiB chunk then fails the memcmp pre-check), "cluster"
#: puts them in one contiguous run (most chunks stay clean).
SCAN_CASES: tuple[tuple[float, str], ...] = (
    (0.0, "random"),
    (0.01, "random"),
    (0.10, "random"),
    (0.01, "cluster"),
)


def fit_at(fit: dict[str, Any] | None, x: float) -> float | None:
    """The fitted line's value at ``x``."""
    if fit is None:
        return None
    return float(fit["slope"] * x + fit["intercept"])


def gib_where_pause_reaches(
    scan_fit: dict[str, Any] | None, fixed_ms: float, limit_ms: float
) -> float | None:
    """RAM (GiB) at which ``fixed_ms`` + the fitted scan time reaches ``limit_ms``.

    None without a fit or with a flat or falling slope.
    """
    if scan_fit is None or scan_fit["slope"] <= 0:
        return None
    return max(0.0, (limit_ms - fixed_ms - scan_fit["intercept"]) / scan_fit["slope"])


def _stats(values_s: Sequence[float]) -> dict[str, float]:
    """min/p50/p99 in ms of durations in seconds (min: the least-contended sample)."""
    ms = [v * 1e3 for v in values_s]
    return {
        "min": min(ms, default=0.0),
        "p50": float(pct(ms, 50) or 0.0),
        "p99": float(pct(ms, 99) or 0.0),
    }


def fraction_key(frac: float) -> str:
    """``0.0`` -> "clean", ``0.01`` -> "1%", ``0.1`` -> "10%"."""
    return "clean" if frac == 0 else f"{frac * 100:g}%"


def case_key(frac: float, pattern: str = "random") -> str:
    """``(0.0, _)`` -> "clean", ``(0.01, "random")`` -> "1% random"."""
    return "clean" if frac == 0 else f"{fraction_key(frac)} {pattern}"


# --------------------------------------------------------------------------- (a) scan


def _ram_file(shm_dir: Path, tag: str, n_pages: int) -> Path:
    shm_dir.mkdir(parents=True, exist_ok=True)
    path = shm_dir / f"kemari-sizing-{os.getpid()}-{tag}-{uuid.uuid4().hex[:6]}.ram"
    with path.open("wb") as f:
        f.truncate(n_pages * PAGE_SIZE)
    return path


def _fill(pages: np.ndarray, rng: np.random.Generator) -> None:
    """Write every page (random bytes, 64 MiB at a time) so tmpfs holds all of it."""
    flat = pages.reshape(-1)
    step = 64 * MIB
    for lo in range(0, len(flat), step):
        hi = min(lo + step, len(flat))
        flat[lo:hi] = np.frombuffer(rng.bytes(hi - lo), dtype=np.uint8)


def measure_scan(
    memory_mib: int,
    *,
    samples: int,
    shm_dir: Path,
    cases: Sequence[tuple[float, str]] = SCAN_CASES,
    seed: int = 1,
) -> dict[str, Any]:
    """Compare-scan and staging times on a RAM file of ``memory_mib`` (no VM).

    For each ``(fraction, pattern)`` case, ``samples`` times: dirty that many pages
    (scattered at random, or one contiguous run at a random place) through the guest
    mapping, scan with 1 and with 2 threads (alternating which goes first),
    stage the dirty pages, commit them (so the next scan starts clean).

    Raises:
        KemariError: a scan did not report exactly the pages dirtied.
    """
    n = memory_mib * MIB // PAGE_SIZE
    rng = np.random.default_rng(seed)
    path = _ram_file(shm_dir, "scan", n)
    rows: list[dict[str, Any]] = []
    try:
        with GuestRAM(path, writable=True) as guest, GuestRAM(path) as agent:
            _fill(guest.pages, rng)
            ram = agent.pages
            idx = allocate_index(n)
            staging = allocate_pages(n)
            with CompareTracker(n, threads=2) as tracker:
                tracker.reset(ram)
                for frac, pattern in cases:
                    k = round(n * frac)
                    t1: list[float] = []
                    t2: list[float] = []
                    st: list[float] = []
                    for i in range(samples):
                        if pattern == "cluster":
                            start = int(rng.integers(0, n - k + 1))
                            dirty = np.arange(start, start + k, dtype=np.int64)
                        else:
                            dirty = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
                        if k:
                            offs = rng.integers(0, PAGE_SIZE, k)
                            guest.pages[dirty, offs] ^= 0x5A
                        order = (1, 2) if i % 2 == 0 else (2, 1)
                        found = -1
                        for threads in order:
                            a = time.perf_counter()
                            found = tracker.scan(ram, out=idx, threads=threads)
                            (t1 if threads == 1 else t2).append(time.perf_counter() - a)
                            if found != k:
                                raise KemariError(
                                    f"sizing: scan found {found} dirty pages, {k} were dirtied"
                                )
                        a = time.perf_counter()
                        staged = tracker.stage(ram, idx[:found], staging)
                        st.append(time.perf_counter() - a)
                        tracker.commit(idx[:found].copy(), staged)
                    rows.append(
                        _case_stats(
                            {
                                "case": case_key(frac, pattern),
                                "pattern": pattern,
                                "dirty_fraction": frac,
                                "dirty_pages": k,
                                "raw_s": {"scan_t1": t1, "scan_t2": t2, "stage": st},
                            }
                        )
                    )
            del staging, idx
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        gc.collect()
    return {
        "memory_mib": memory_mib,
        "n_pages": n,
        "loadavg_1min": [round(os.getloadavg()[0], 2)],
        "cases": rows,
    }


def _case_stats(case: dict[str, Any]) -> dict[str, Any]:
    """Fill a scan case's p50/p99 figures from its raw samples (seconds)."""
    raw = case["raw_s"]
    s1, s2, sst = _stats(raw["scan_t1"]), _stats(raw["scan_t2"]), _stats(raw["stage"])
    case.update(
        samples=len(raw["scan_t2"]),
        scan_t1_ms=s1,
        scan_t2_ms=s2,
        stage_ms=sst,
        # What the stopped window spends on RAM: the 2-thread scan, then staging.
        scan_t2_plus_stage_ms_p50=s2["p50"] + sst["p50"],
    )
    return case


def merge_scans(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two :func:`measure_scan` results of one size, pooled (figures recomputed)."""
    if a["memory_mib"] != b["memory_mib"]:
        raise ValueError("cannot merge scans of different sizes")
    by_key = {c["case"]: c for c in b["cases"]}
    cases = []
    for c in a["cases"]:
        other = by_key[c["case"]]["raw_s"]
        raw = {k: [*v, *other[k]] for k, v in c["raw_s"].items()}
        cases.append(_case_stats({**c, "raw_s": raw}))
    return {**a, "loadavg_1min": [*a["loadavg_1min"], *b["loadavg_1min"]], "cases": cases}


# --------------------------------------------------------------------------- (c) memory


def measure_primary_memory(memory_mib: int, *, shm_dir: Path, seed: int = 2) -> dict[str, Any]:
    """The primary agent's resident memory for a guest of ``memory_mib``, measured in a
    fresh process: in a long-lived one, the allocator may hand back memory freed
    earlier (glibc raises its mmap threshold after large frees), so the growth of
    RssAnon would read low or zero."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_primary_memory_here, memory_mib, shm_dir=shm_dir, seed=seed).result()


def _primary_memory_here(memory_mib: int, *, shm_dir: Path, seed: int = 2) -> dict[str, Any]:
    """The primary agent's resident memory for a guest of ``memory_mib`` (this process).

    The guest RAM file is written first (QEMU's RAM, not the agent's). Then, as
    :meth:`Primary._attach` does: map it (:class:`GuestRAM`, pre-faulted: shared tmpfs
    pages, counted in the agent's VmRSS as RssShmem but not extra memory), build the
    tracker (compare, 2 threads), the staging and previous-version buffers and the index
    buffer; then the initial full sync (stage everything, reset the shadow from it),
    which faults the shadow in.
    """
    n = memory_mib * MIB // PAGE_SIZE
    rng = np.random.default_rng(seed)
    path = _ram_file(shm_dir, "primary", n)
    try:
        with GuestRAM(path, writable=True) as guest:
            _fill(guest.pages, rng)
        gc.collect()
        s0 = read_status()
        ram = GuestRAM(path)
        s1 = read_status()
        tracker = make_tracker("compare", n_pages=n, qemu_pid=None, ram_path=None, threads=2)
        staging = np.ones((n, PAGE_SIZE), dtype=np.uint8)
        prev = np.ones((n, PAGE_SIZE), dtype=np.uint8)
        idx = np.zeros(n, dtype=np.int64)
        s2 = read_status()
        all_idx = np.arange(n, dtype=np.int64)
        staged_all = tracker.stage(ram.pages, all_idx, staging)
        tracker.reset(staged_all)
        del all_idx, staged_all
        s3 = read_status()
        tracker.close()
        del tracker, staging, prev, idx
        ram.close()
        del ram
        gc.collect()
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    mapped = status_delta_mib(s0, s1)
    built = status_delta_mib(s1, s2)
    total = status_delta_mib(s0, s3)
    return {
        "memory_mib": memory_mib,
        "map_ram_shmem_mib": mapped["RssShmem"],
        "after_buffers_anon_mib": built["RssAnon"],
        "agent_anon_mib": total["RssAnon"],
        "agent_vmrss_mib": total["VmRSS"],
        "agent_shmem_mib": total["RssShmem"],
        "anon_per_ram": total["RssAnon"] / memory_mib,
        "status_kib": {"before": s0, "mapped": s1, "buffers": s2, "synced": s3},
    }


def measure_secondary_memory(
    memory_mib: int,
    *,
    shm_dir: Path,
    fractions: Sequence[float] = DIRTY_FRACTIONS[1:],
    seed: int = 3,
) -> dict[str, Any]:
    """The secondary's replica file and the undo log of one open epoch.

    As :meth:`Secondary._prepare_replica`: a sparse file of the guest's size, mapped
    writable; the initial full copy writes every page. Then, per dirty fraction, the
    undo log of an epoch that dirtied that many pages (the old rows and their indices,
    exactly as the receive path keeps them), measured as the agent's RssAnon growth.
    """
    n = memory_mib * MIB // PAGE_SIZE
    rng = np.random.default_rng(seed)
    path = _ram_file(shm_dir, "replica", n)
    undo: list[dict[str, Any]] = []
    try:
        with GuestRAM(path, writable=True) as replica:
            _fill(replica.pages, rng)
            replica_mib = os.stat(path).st_blocks * 512 / MIB
            for frac in fractions:
                k = round(n * frac)
                gc.collect()
                s0 = read_status()
                indices = np.sort(rng.choice(n, k, replace=False)).astype(np.intp)
                log = [(indices, replica.pages[indices])]
                s1 = read_status()
                held = sum(i.nbytes + r.nbytes for i, r in log) / MIB
                undo.append(
                    {
                        "dirty_fraction": frac,
                        "dirty_pages": k,
                        "anon_mib": status_delta_mib(s0, s1)["RssAnon"],
                        "held_mib": held,
                    }
                )
                del log, indices
            gc.collect()
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return {"memory_mib": memory_mib, "replica_file_mib": replica_mib, "undo": undo}


# --------------------------------------------------------------------------- (b) VM


async def _vm_sync_points(
    cfg: KemariConfig,
    memory_mib: int,
    samples: int,
    *,
    interval_s: float,
    pages_per_s: int,
    working_set_mib: int,
    say: Progress,
) -> dict[str, Any]:
    """Boot a guest of ``memory_mib`` with ``memdirty`` and time its sync points.

    ``fixed_ms_p50`` is the pause beyond the RAM work (pause - scan - stage): stop,
    device state and cont, less whatever of the capture the scan hid when it ran beside
    it. So at a measured size, fixed + scan + stage is the measured pause.
    """
    from kemari_suite.vm.devstate import DeviceStateCapturer, enable_ignore_shared
    from kemari_suite.vm.qemu import AsyncVM, wait_for_console

    spec, run_root = trackers.memdirty_guest(
        cfg, "sizing", memory_mib, pages_per_s, working_set_mib
    )
    accel = spec.accel
    vm = AsyncVM(spec, run_root=run_root, shm_dir=cfg.paths.shm_dir)
    t_boot = time.monotonic()
    await vm.start()
    try:
        await asyncio.to_thread(wait_for_console, vm.paths.console, "KEMARI-BOOTED", 180)
        boot_s = time.monotonic() - t_boot
        await asyncio.sleep(2.0)  # let memdirty start
        await enable_ignore_shared(vm)
        rows: list[dict[str, float]] = []
        # How each row's device state was captured: the first captures of a VM are
        # whole migrations (the warm-up), later ones the device sections alone.
        methods: list[str] = []
        with product_window(vm, cfg) as window:
            cap = window.capturer
            assert isinstance(cap, DeviceStateCapturer)
            overlapped = window.overlap
            await initial_sync(window)
            say(f"vm {memory_mib} MiB: booted in {boot_s:.0f} s, {samples} sync points")
            for i in range(samples + 2):
                await asyncio.sleep(interval_s)
                before = cap.migrations
                r = await complete(window, await window.run(resume=True))
                if i < 2:
                    continue  # the first scans after reset carry the boot's leftovers
                methods.append("migrate" if cap.migrations > before else cap.method)
                rows.append(
                    {
                        **window_row(r, overlapped=overlapped),
                        "dirty_pages": float(r.dirty_pages),
                        "devstate_bytes": float(len(r.devstate)),
                        "capture": r.capture_ms,
                    }
                )
    finally:
        await vm.shutdown()
        with contextlib.suppress(OSError):
            run_root.rmdir()
    totals = [r["total"] for r in rows]
    parts = ("stop", "devstate", "scan", "stage", "cont")
    fixed = [r["total"] - r["scan"] - r["stage"] for r in rows]
    return {
        "memory_mib": memory_mib,
        "accel": accel,
        "overlap_scan": overlapped,
        "boot_s": boot_s,
        "samples": len(rows),
        "interval_ms": interval_s * 1e3,
        "total_ms_min": min(totals, default=None),
        "total_ms_p50": pct(totals, 50),
        "total_ms_p99": pct(totals, 99),
        "fixed_ms_p50": pct(fixed, 50),
        "parts_ms_p50": {p: float(pct([r[p] for r in rows], 50) or 0.0) for p in parts},
        "dirty_pages_p50": pct([r["dirty_pages"] for r in rows], 50),
        "devstate_bytes_p50": pct([r["devstate_bytes"] for r in rows], 50),
        "devstate_by_method": devstate_by_method(rows, methods),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def devstate_by_method(rows: list[dict[str, float]], methods: list[str]) -> dict[str, Any]:
    """The device-state capture's own time (not the scan beside it) and size (p50) for
    each way it was captured (``methods[i]`` is ``rows[i]``'s), with the pauses of those
    rows (p50)."""
    out: dict[str, Any] = {}
    for m in dict.fromkeys(methods):
        mine = [r for r, k in zip(rows, methods, strict=True) if k == m]
        out[m] = {
            "samples": len(mine),
            "ms_p50": pct([r["capture"] for r in mine], 50),
            "bytes_p50": pct([r["devstate_bytes"] for r in mine], 50),
            "pause_ms_p50": pct([r["total"] for r in mine], 50),
        }
    return out


# --------------------------------------------------------------------------- the run


def compute_fits(res: dict[str, Any]) -> dict[str, Any]:
    """Per-GiB lines over the measured points of a :func:`run_sizing` result."""
    fits: dict[str, Any] = {}
    scan = res.get("scan", [])
    keys = list(dict.fromkeys(c["case"] for s in scan for c in s["cases"]))
    for key in keys:
        pts = [(s["memory_mib"] / 1024, c) for s in scan for c in s["cases"] if c["case"] == key]
        xs = [x for x, _ in pts]
        fits[f"scan_t1_ms_per_gib[{key}]"] = linear_fit(
            xs, [c["scan_t1_ms"]["p50"] for _, c in pts]
        )
        fits[f"scan_t2_ms_per_gib[{key}]"] = linear_fit(
            xs, [c["scan_t2_ms"]["p50"] for _, c in pts]
        )
        fits[f"scan_t2_plus_stage_ms_per_gib[{key}]"] = linear_fit(
            xs, [c["scan_t2_plus_stage_ms_p50"] for _, c in pts]
        )
        fits[f"scan_t2_min_ms_per_gib[{key}]"] = linear_fit(
            xs, [c["scan_t2_ms"].get("min", c["scan_t2_ms"]["p50"]) for _, c in pts]
        )
    stage_pts = [
        (c["dirty_pages"] / 1000, c["stage_ms"]["p50"])
        for s in scan
        for c in s["cases"]
        if c["dirty_pages"] > 0
    ]
    fits["stage_ms_per_1000_pages"] = linear_fit(
        [p for p, _ in stage_pts], [v for _, v in stage_pts]
    )
    vms = [v for v in res.get("vm", []) if "total_ms_p50" in v]
    fits["vm_pause_ms_per_gib"] = linear_fit(
        [v["memory_mib"] / 1024 for v in vms], [v["total_ms_p50"] for v in vms]
    )
    fits["vm_pause_min_ms_per_gib"] = linear_fit(
        [v["memory_mib"] / 1024 for v in vms],
        [v.get("total_ms_min", v["total_ms_p50"]) for v in vms],
    )
    fits["vm_scan_ms_per_gib"] = linear_fit(
        [v["memory_mib"] / 1024 for v in vms], [v["parts_ms_p50"]["scan"] for v in vms]
    )
    prim = res.get("memory", {}).get("primary", [])
    fits["primary_anon_mib_per_gib"] = linear_fit(
        [p["memory_mib"] / 1024 for p in prim], [p["agent_anon_mib"] for p in prim]
    )
    fits["primary_vmrss_mib_per_gib"] = linear_fit(
        [p["memory_mib"] / 1024 for p in prim], [p["agent_vmrss_mib"] for p in prim]
    )
    sec = res.get("memory", {}).get("secondary", [])
    fits["secondary_replica_mib_per_gib"] = linear_fit(
        [s["memory_mib"] / 1024 for s in sec], [s["replica_file_mib"] for s in sec]
    )
    for frac in sorted({u["dirty_fraction"] for s in sec for u in s["undo"]}):
        pts2 = [
            (s["memory_mib"] / 1024, u["held_mib"])
            for s in sec
            for u in s["undo"]
            if u["dirty_fraction"] == frac
        ]
        fits[f"secondary_undo_mib_per_gib[{fraction_key(frac)}]"] = linear_fit(
            [x for x, _ in pts2], [y for _, y in pts2]
        )
    return fits


def guidance(res: dict[str, Any], interval_ms: float) -> dict[str, Any]:
    """RAM sizes at which the pause reaches half of, and all of, the sync interval.

    The fixed part (the pause beyond scan and stage: stop + device state + cont) is the
    median over the VM runs, or 0 when no VM ran (then the figures are for RAM work
    alone).
    """
    fits = res.get("fits", {})
    fixed = [v["fixed_ms_p50"] for v in res.get("vm", []) if v.get("fixed_ms_p50") is not None]
    fixed_ms = float(np.median(fixed)) if fixed else 0.0
    out: dict[str, Any] = {"interval_ms": interval_ms, "fixed_ms": fixed_ms, "from_vm": bool(fixed)}
    rows: list[tuple[str, dict[str, Any] | None, float]] = [
        (key, fits.get(f"scan_t2_plus_stage_ms_per_gib[{key}]"), fixed_ms)
        for key in _case_keys(res)
    ]
    # The real VM's own line already holds its fixed part (in its intercept).
    rows.append(("vm", fits.get("vm_pause_ms_per_gib"), 0.0))
    for key, fit, fx in rows:
        out[key] = {
            "gib_at_half_interval": gib_where_pause_reaches(fit, fx, interval_ms / 2),
            "gib_at_interval": gib_where_pause_reaches(fit, fx, interval_ms),
            "pause_ms_at": {
                str(g): (None if fit is None else fx + (fit_at(fit, g) or 0.0))
                for g in (1, 2, 4, 8)
            },
        }
    return out


def run_sizing(
    cfg: KemariConfig,
    sizes_mib: Sequence[int] = (128, 256, 512, 1024),
    samples: int = 10,
    progress: Progress | None = None,
    *,
    vm_sizes_mib: Sequence[int] | None = None,
    vm_samples: int = 20,
    vm_budget_s: float = 300.0,
    tracker_sizes_mib: Sequence[int] = trackers.SIZES_MIB,
    tracker_samples: int = 30,
) -> dict[str, Any]:
    """Measure the trackers side by side (:mod:`.trackers`) and the compare tracker's
    cost per GiB of guest RAM (see the module doc); ``sizes_mib`` ``()`` skips the
    latter (``--quick``).

    ``vm_sizes_mib`` (default: ``sizes_mib``) are booted in ascending order while the VM
    part has used less than ``vm_budget_s``; ``()`` boots none. A VM that fails is
    recorded with its error, not raised.
    """
    say = progress or (lambda _m: None)
    shm = cfg.paths.shm_dir
    sizes = sorted(set(sizes_mib))
    vm_sizes = sorted(set(sizes if vm_sizes_mib is None else vm_sizes_mib))
    soft_ok, soft_reason = probe_soft_dirty()
    res: dict[str, Any] = {
        "machine": {**machine_info(), "loadavg_start": list(os.getloadavg())},
        "params": {
            "sizes_mib": sizes,
            "vm_sizes_mib": vm_sizes,
            "samples": samples,
            "vm_samples": vm_samples,
            "vm_budget_s": vm_budget_s,
            "dirty_fractions": list(DIRTY_FRACTIONS),
            "max_interval_ms": cfg.replication.max_interval_ms,
        },
        "soft_dirty": {"available": soft_ok, "reason": soft_reason},
        "trackers": {},
        "scan": [],
        "vm": [],
        "memory": {"primary": [], "secondary": []},
    }
    if tracker_sizes_mib:
        res["trackers"] = trackers.run_trackers(cfg, tracker_sizes_mib, tracker_samples, say)
    # Two passes, ascending then descending sizes, pooled: a load that changes during
    # the run (a shared machine) then weighs on every size alike and tilts no line.
    first = max(1, samples // 2)
    scans: dict[int, dict[str, Any]] = {}
    for n_samples, order in ((first, sizes), (samples - first, sizes[::-1])):
        if n_samples <= 0:
            continue
        for m in order:
            say(f"scan {m} MiB: {n_samples} samples x {len(SCAN_CASES)} dirty-page cases")
            got = measure_scan(m, samples=n_samples, shm_dir=shm, seed=len(scans) + m)
            scans[m] = merge_scans(scans[m], got) if m in scans else got
    res["scan"] = [scans[m] for m in sizes]
    for m in sizes:
        say(f"memory {m} MiB: primary buffers, secondary replica and undo log")
        res["memory"]["primary"].append(measure_primary_memory(m, shm_dir=shm))
        res["memory"]["secondary"].append(measure_secondary_memory(m, shm_dir=shm))
    t_vm = time.monotonic()
    for m in vm_sizes:
        used = time.monotonic() - t_vm
        if used > vm_budget_s:
            res["vm"].append({"memory_mib": m, "skipped": f"VM time budget spent ({used:.0f} s)"})
            continue
        say(f"vm {m} MiB: booting")
        res["vm"].append(_vm_run(with_overrides(cfg, vm={"memory_mib": m}), m, vm_samples, say))
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["machine"]["date_end"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    res["fits"] = compute_fits(res)
    res["guidance"] = guidance(res, cfg.replication.max_interval_ms)
    return res


def _vm_run(vcfg: KemariConfig, m: int, samples: int, say: Progress) -> dict[str, Any]:
    """:func:`_vm_sync_points` of ``vcfg``'s guest, or the row saying why it failed."""
    try:
        return asyncio.run(
            _vm_sync_points(
                vcfg,
                m,
                samples,
                interval_s=vcfg.replication.max_interval_ms / 1e3,
                pages_per_s=40000,
                working_set_mib=32,
                say=say,
            )
        )
    except (KemariError, OSError) as err:
        return {"memory_mib": m, "skipped": f"failed: {err}"}


# --------------------------------------------------------------------------- report


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _num(v: float, digits: int = 1) -> str:
    """``v`` with ``digits`` decimals, never "-0.0"."""
    text = f"{v:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _fit_text(fit: dict[str, Any] | None, unit: str) -> str:
    """ "60.0 ms/GiB, intercept 1.2 ms (R² 0.990, 4 points)": the intercept's unit is
    the numerator of ``unit``."""
    if fit is None:
        return "- (fewer than 2 sizes)"
    base = unit.split("/")[0].split(" per ")[0]
    return (
        f"{_num(fit['slope'])} {unit}, intercept {_num(fit['intercept'])} {base} "
        f"(R² {fit['r2']:.3f}, {fit['n']} points)"
    )


def format_report(res: dict[str, Any], command: str) -> str:
    """The markdown report of a :func:`run_sizing` result."""
    m = res["machine"]
    fits = res.get("fits", {})
    lines = [
        *header_lines(
            "Sizing: cost per GiB of guest RAM, per dirty-page tracker",
            command,
            m,
            " (load average at start "
            f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_start', []))}, at end "
            f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_end', []))})  ",
        ),
        f"Soft-dirty tracking: {'available' if res['soft_dirty']['available'] else 'NOT available'}"
        f" ({res['soft_dirty']['reason']})",
        "",
    ]
    if res.get("l1"):
        l1, host = res["l1"], res["l1"].get("host", {})
        lines[-1:-1] = [
            "",
            f"Kernel lab: run inside an L1 VM (kernel {l1.get('kernel')}, "
            f"{l1.get('memory_mib')} MiB, {l1.get('vcpus')} vCPUs, itself under "
            f"{l1.get('accel_of_the_l1')} on {host.get('cpu', '?')}, kernel "
            f"{host.get('kernel', '?')}); guests under "
            f"{'KVM (nested)' if l1.get('kvm_in_the_l1') else 'TCG'}; {l1.get('note')}.",
        ]
    if res.get("trackers"):
        lines += [trackers.format_section(res["trackers"])]
        if res.get("plot"):
            lines += [f"![pause p50 per tracker and guest RAM size]({res['plot']})", ""]
    if not res.get("scan"):
        return "\n".join(lines) + "\n"
    lines += [
        "## The compare tracker per GiB of guest RAM (least-squares lines over the points below)",
        "",
        "| figure | line (per GiB) |",
        "|---|---|",
    ]
    for key in _case_keys(res):
        lines.append(
            f"| full compare scan, 2 threads (stopped VM), {_label(key)} "
            f"| {_fit_text(fits.get(f'scan_t2_ms_per_gib[{key}]'), 'ms/GiB')} |"
        )
    for key in _case_keys(res):
        lines.append(
            f"| scan (2 threads) + stage, {_label(key)} "
            f"| {_fit_text(fits.get(f'scan_t2_plus_stage_ms_per_gib[{key}]'), 'ms/GiB')} |"
        )
    lines += [
        f"| full compare scan, 1 thread (pre-copy), clean "
        f"| {_fit_text(fits.get('scan_t1_ms_per_gib[clean]'), 'ms/GiB')} |",
        f"| staging dirty pages | "
        f"{_fit_text(fits.get('stage_ms_per_1000_pages'), 'ms per 1000 pages')} |",
        f"| real VM sync point (stop..cont), p50 "
        f"| {_fit_text(fits.get('vm_pause_ms_per_gib'), 'ms/GiB')} |",
        f"| real VM sync point (stop..cont), fastest of each size (least contention) "
        f"| {_fit_text(fits.get('vm_pause_min_ms_per_gib'), 'ms/GiB')} |",
        f"| full compare scan, 2 threads, clean RAM, fastest sample (least contention) "
        f"| {_fit_text(fits.get('scan_t2_min_ms_per_gib[clean]'), 'ms/GiB')} |",
        f"| full compare scan, 2 threads, 1% random dirty, fastest sample "
        f"| {_fit_text(fits.get('scan_t2_min_ms_per_gib[1% random]'), 'ms/GiB')} |",
        f"| primary agent, extra anonymous memory "
        f"| {_fit_text(fits.get('primary_anon_mib_per_gib'), 'MiB/GiB')} |",
        f"| primary agent, VmRSS growth (includes the shared RAM mapping) "
        f"| {_fit_text(fits.get('primary_vmrss_mib_per_gib'), 'MiB/GiB')} |",
        f"| secondary replica file (tmpfs) "
        f"| {_fit_text(fits.get('secondary_replica_mib_per_gib'), 'MiB/GiB')} |",
    ]
    for key in ("1%", "10%"):
        lines.append(
            f"| secondary undo log of an open epoch, {key} of pages dirty (bytes held) "
            f"| {_fit_text(fits.get(f'secondary_undo_mib_per_gib[{key}]'), 'MiB/GiB')} |"
        )
    lines += [
        "",
        "## Compare scan and staging, no VM (RAM file in /dev/shm; p50 / p99 ms, and min)",
        "",
        "| RAM MiB | dirty | dirty pages | scan 1 thread | scan 2 threads | scan 2 threads min "
        "| stage | scan(2)+stage p50 | samples | load (1 min) per pass |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in res.get("scan", []):
        for c in s["cases"]:
            lines.append(
                f"| {s['memory_mib']} | {_label(c['case'])} | {c['dirty_pages']} "
                f"| {_f(c['scan_t1_ms']['p50'])} / {_f(c['scan_t1_ms']['p99'])} "
                f"| {_f(c['scan_t2_ms']['p50'])} / {_f(c['scan_t2_ms']['p99'])} "
                f"| {_f(c['scan_t2_ms'].get('min'))} "
                f"| {_f(c['stage_ms']['p50'], '{:.2f}')} / {_f(c['stage_ms']['p99'], '{:.2f}')} "
                f"| {_f(c['scan_t2_plus_stage_ms_p50'])} | {c['samples']} "
                f"| {' / '.join(f'{x:.2f}' for x in s.get('loadavg_1min', []))} |"
            )
    lines += [
        "",
        "## Real VM sync points (stop, device state, scan, stage, cont; p50 ms)",
        "",
        "| RAM MiB | pause min | pause p50 | pause p99 | stop | devstate | scan | stage | cont "
        "| dirty pages p50 | boot s | samples | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in res.get("vm", []):
        if "skipped" in v:
            lines.append(f"| {v['memory_mib']} | not run: {v['skipped']} |||||||||||")
            continue
        p = v["parts_ms_p50"]
        lines.append(
            f"| {v['memory_mib']} | {_f(v.get('total_ms_min'))} | {_f(v['total_ms_p50'])} "
            f"| {_f(v['total_ms_p99'])} "
            f"| {_f(p['stop'])} | {_f(p['devstate'])} | {_f(p['scan'])} | {_f(p['stage'])} "
            f"| {_f(p['cont'])} | {_f(v['dirty_pages_p50'], '{:.0f}')} "
            f"| {_f(v['boot_s'], '{:.0f}')} "
            f"| {v['samples']} | {_f(v.get('loadavg_1min'), '{:.2f}')} |"
        )
    if not res.get("vm"):
        lines.append("| - | no VM in this run |||||||||||")
    by_method = [(v["memory_mib"], m, d) for v in res.get("vm", [])
                 for m, d in v.get("devstate_by_method", {}).items()]  # fmt: skip
    if by_method:
        lines += [
            "",
            "Device state by how it was captured (a VM's first captures are whole "
            "migrations, the warm-up; later ones QEMU's device sections alone):",
            "",
            "| RAM MiB | captured by | samples | capture alone p50 ms | bytes p50 | pause p50 ms |",
            "|---|---|---|---|---|---|",
        ]
        for mib, m, d in by_method:
            lines.append(
                f"| {mib} | {m} | {d['samples']} | {_f(d['ms_p50'])} "
                f"| {_f(d['bytes_p50'], '{:.0f}')} | {_f(d['pause_ms_p50'])} |"
            )
    if any(v.get("overlap_scan") for v in res.get("vm", [])):
        lines += [
            "",
            "The scan ran beside the device-state capture (`replication.overlap_scan`): "
            "the devstate column lasts until both finished, the scan column is the scan's "
            "own time within it.",
        ]
    lines += [
        "",
        "## Agent memory (MiB, from /proc/self/status)",
        "",
        "| RAM MiB | primary: extra RssAnon | per MiB of RAM | primary: VmRSS growth "
        "| of which RssShmem (RAM mapping) | secondary: replica file "
        + "".join(
            f"| undo log {fraction_key(u['dirty_fraction'])} dirty: held (RssAnon growth) "
            for u in _undo0(res)
        )
        + "|",
        "|---|---|---|---|---|---|" + "---|" * len(_undo0(res)),
    ]
    sec = {s["memory_mib"]: s for s in res.get("memory", {}).get("secondary", [])}
    for p in res.get("memory", {}).get("primary", []):
        s = sec.get(p["memory_mib"])
        undo = "".join(
            f"| {_f(u['held_mib'])} ({_f(u['anon_mib'])}) " for u in (s["undo"] if s else [])
        )
        lines.append(
            f"| {p['memory_mib']} | {_f(p['agent_anon_mib'])} | {_f(p['anon_per_ram'], '{:.2f}')} "
            f"| {_f(p['agent_vmrss_mib'])} | {_f(p['agent_shmem_mib'])} "
            f"| {_f(s['replica_file_mib'] if s else None)} {undo}|"
        )
    g = res.get("guidance")
    if g:
        src = (
            "the VM runs' median pause beyond scan and stage: stop + device state + cont"
            if g["from_vm"]
            else "no VM ran, so 0: RAM work only"
        )
        lines += [
            "",
            f"## Where the pause meets the {g['interval_ms']:.0f} ms maximum sync interval",
            "",
            f"Fixed part {g['fixed_ms']:.1f} ms ({src}) plus the fitted scan(2 threads) + "
            "stage line; the last row is the real VM's own pause line. A pause of half the "
            "interval stops the guest a third of the time, a pause equal to it half the "
            "time. Sizes beyond the measured range are extrapolated.",
            "",
            "| dirty | GiB at pause = interval/2 | GiB at pause = interval "
            "| pause at 1 / 2 / 4 / 8 GiB (ms) |",
            "|---|---|---|---|",
        ]
        for key in [*_case_keys(res), "vm"]:
            row = g.get(key)
            if row is None:
                continue
            at = " / ".join(_f(row["pause_ms_at"][str(x)], "{:.0f}") for x in (1, 2, 4, 8))
            lines.append(
                f"| {_label(key)} | {_f(row['gib_at_half_interval'], '{:.2f}')} "
                f"| {_f(row['gib_at_interval'], '{:.2f}')} | {at} |"
            )
    return "\n".join(lines) + "\n"


def _case_keys(res: dict[str, Any]) -> list[str]:
    """The scan cases of a result, in measurement order."""
    return list(dict.fromkeys(c["case"] for s in res.get("scan", []) for c in s["cases"]))


def _label(key: str) -> str:
    if key == "vm":
        return "real VM line (memdirty workload, no fixed part added)"
    return "clean RAM" if key == "clean" else f"{key} dirty"


def _undo0(res: dict[str, Any]) -> list[dict[str, Any]]:
    sec = res.get("memory", {}).get("secondary", [])
    return list(sec[0]["undo"]) if sec else []


TRACKER_PLOT = "sizing-trackers.png"


def plot_trackers(res: dict[str, Any], path: Path) -> bool:
    """Pause p50 (and p99 as a band) against guest RAM, one line per tracker."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in res["trackers"].get("rows", []) if "error" not in r]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name in dict.fromkeys(r["tracker"] for r in rows):
        mine = sorted((r for r in rows if r["tracker"] == name), key=lambda r: r["memory_mib"])
        xs = [r["memory_mib"] for r in mine]
        ax.plot(xs, [r["pause_ms_p50"] for r in mine], marker="o", label=f"{name} p50")
        ax.fill_between(
            xs, [r["pause_ms_p50"] for r in mine], [r["pause_ms_p99"] for r in mine], alpha=0.2
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("guest RAM (MiB)")
    ax.set_ylabel("sync-point pause (ms)")
    ax.set_title("Stopped window per tracker (band: p50 to p99)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_results(res: dict[str, Any], folder: Path, command: str) -> Path:
    """Write ``sizing.json``, ``sizing.md`` (and the trackers' plot) under ``folder``;
    returns the markdown path."""
    folder.mkdir(parents=True, exist_ok=True)
    if res.get("trackers") and plot_trackers(res, folder / TRACKER_PLOT):
        res = {**res, "plot": TRACKER_PLOT}
    (folder / "sizing.json").write_text(json.dumps({"command": command, **res}, indent=1) + "\n")
    md = folder / "sizing.md"
    md.write_text(format_report(res, command))
    return md


def bench_sizing_command(
    cfg: KemariConfig,
    *,
    sizes_mib: Sequence[int] = (128, 256, 512, 1024),
    vm_sizes_mib: Sequence[int] | None = None,
    samples: int = 10,
    vm_samples: int = 20,
    vm_budget_s: float = 300.0,
    tracker_sizes_mib: Sequence[int] = trackers.SIZES_MIB,
    tracker_samples: int = 30,
    out_dir: Path | None = Path("benchmarks/results"),
    command: str = "kemari bench sizing",
    progress: Progress | None = None,
) -> tuple[Path | None, dict[str, Any]]:
    """Run :func:`run_sizing` and write the results (unless ``out_dir`` is None);
    returns the markdown path and the result."""
    res = run_sizing(
        cfg,
        sizes_mib,
        samples,
        progress,
        vm_sizes_mib=vm_sizes_mib,
        vm_samples=vm_samples,
        vm_budget_s=vm_budget_s,
        tracker_sizes_mib=tracker_sizes_mib,
        tracker_samples=tracker_samples,
    )
    return (None if out_dir is None else write_results(res, out_dir, command)), res


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import sys

    from kemari_suite.config import load

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", "-c", type=Path, default=None)
    parser.add_argument("--sizes", type=_ints, default=[128, 256, 512, 1024])
    parser.add_argument("--vm-sizes", type=_ints, default=None)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--vm-samples", type=int, default=20)
    parser.add_argument("--vm-budget", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join([".venv/bin/python", "-m", "kemari_suite.bench.sizing", *raw])
    md, _res = bench_sizing_command(
        load(args.config),
        sizes_mib=args.sizes,
        vm_sizes_mib=args.vm_sizes,
        samples=args.samples,
        vm_samples=args.vm_samples,
        vm_budget_s=args.vm_budget,
        out_dir=args.out,
        command=command,
        progress=lambda msg: print(f"• {msg}", file=sys.stderr, flush=True),
    )
    if md is not None:
        print(md.read_text())


if __name__ == "__main__":
    main()


__all__ = [
    "bench_sizing_command",
    "compute_fits",
    "format_report",
    "guidance",
    "linear_fit",
    "run_sizing",
    "write_results",
]
