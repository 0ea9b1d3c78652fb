"""Dirty-page trackers side by side: the engine's stopped window and the primary's
memory, per tracker and guest RAM size, in one run (part of ``kemari bench sizing``).

For each tracker (uffd-wp, soft-dirty where the kernel has it, compare) and each RAM
size, a guest of that size boots with the uffd-wp helper loaded and runs ``memdirty``
(about 4000 dirty pages per 100 ms interval over a 32 MiB working set). Its sync points
run through the product's own stopped window
(:func:`~kemari_suite.bench.memsync.product_window`: stop, device-state capture, scan,
staging of the dirty pages, cont), built as the primary builds it: the same tracker, the
same buffers (:class:`~kemari_suite.checkpoint.sender.Buffers`).

Between sync points the guest runs, and pre-copy runs as the product's configuration
says (``replication.pipelining``, decided per tracker by the engine's own
:func:`~kemari_suite.checkpoint.syncpoint.precopy_on`, at the engine's
:func:`~kemari_suite.checkpoint.syncpoint.precopy_schedule`). A pass here is the
tracker's part of the engine's pass (scan on one thread, stage, commit: what
``EpochSender.precopy_round`` does before it encodes and sends); its time is reported
as ``precopy_ms_per_s``, the CPU it takes while the guest runs.

Memory: the anonymous resident memory (``RssAnon``) that building the tracker and its
buffers, the initial synchronization and the timed sync points added to the measuring
process. Guest RAM itself (a shared file) is not in it. Each (tracker, size) runs in its
own process, so one run's freed memory never hides the next one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kemari_suite.bench.fits import linear_fit, read_status
from kemari_suite.bench.memsync import (
    complete,
    initial_sync,
    pct,
    product_window,
    stage_and_commit,
    window_row,
    workload,
)
from kemari_suite.checkpoint.syncpoint import PRECOPY_MIN_PAGES, precopy_on, precopy_schedule
from kemari_suite.checkpoint.window import StoppedWindow
from kemari_suite.config import KemariConfig, load, with_overrides
from kemari_suite.errors import BenchmarkError
from kemari_suite.vm import wphelper
from kemari_suite.vm.spec import VMSpec

Progress = Callable[[str], None]

#: Dirty pages per second: about 4000 per 100 ms interval.
PAGES_PER_S = 40000
#: The interval between the timed sync points: fixed, not ``replication.max_interval_ms``
#: (whose default of 1000 ms would dirty the whole working set at every one), so that
#: each row compares trackers at about 4000 dirty pages per sync point (issue 15).
INTERVAL_MS = 100
WORKING_SET_MIB = 32
SIZES_MIB = (128, 1024, 4096)
QUICK_SIZES_MIB = (128, 4096)


def memdirty_guest(
    cfg: KemariConfig, prefix: str, memory_mib: int, pages_per_s: int, working_set_mib: int
) -> tuple[VMSpec, Path]:
    """The spec of a benchmark guest of ``memory_mib`` running ``memdirty`` (and the
    spin counter), and the run folder it gets."""
    from kemari_suite.vm.define import ensure_image
    from kemari_suite.vm.image import kernel_cmdline
    from kemari_suite.vm.qemu import choose_accel

    image = ensure_image(cfg)
    accel, _ = choose_accel(cfg.vm.accel)
    tag = f"{prefix}{os.getpid()}-{memory_mib}"
    spec = VMSpec(
        name=tag,
        kernel=image.kernel,
        initrd=image.initrd,
        append=kernel_cmdline(run=workload("compressible", pages_per_s, working_set_mib)),
        memory_mib=memory_mib,
        accel=accel,
    )
    return spec, cfg.paths.run_dir / f"kemari-{tag}"


def precopy_pass(window: StoppedWindow) -> tuple[int, float]:
    """The tracker's part of one engine pre-copy pass, with the guest running: scan on
    one thread, stage (a staging buffer at a time), commit. Pages, and seconds taken."""
    t = time.perf_counter()
    k = window.tracker.scan(window.pages, out=window.index, threads=1)
    stage_and_commit(window, window.index[:k].copy())
    return k, time.perf_counter() - t


async def _run_interval(
    window: StoppedWindow, cfg: KemariConfig, interval_s: float, precopy: bool, last_dirty: int
) -> tuple[int, float]:
    """Let the guest run one interval from now, pre-copying as the engine would; the
    pages pre-copied and the seconds the passes took."""
    start = time.monotonic()
    pages, busy = 0, 0.0
    if precopy and last_dirty >= PRECOPY_MIN_PAGES:
        period_s = cfg.replication.precopy_period_ms / 1000
        for at in precopy_schedule(start, interval_s, period_s):
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            k, took = await asyncio.to_thread(precopy_pass, window)
            pages, busy = pages + k, busy + took
    await asyncio.sleep(max(0.0, start + interval_s - time.monotonic()))
    return pages, busy


async def measure_one(
    cfg: KemariConfig, tracker: str, memory_mib: int, samples: int, interval_s: float
) -> dict[str, Any]:
    """One tracker on one guest: its stopped windows and the memory they cost."""
    from kemari_suite.vm.devstate import enable_ignore_shared
    from kemari_suite.vm.qemu import AsyncVM, wait_for_console

    spec, run_root = memdirty_guest(cfg, "trk", memory_mib, PAGES_PER_S, WORKING_SET_MIB)
    accel = spec.accel
    spec = wphelper.attach(cfg, spec)
    vm = AsyncVM(spec, run_root=run_root, shm_dir=cfg.paths.shm_dir)
    await vm.start()
    try:
        await asyncio.to_thread(wait_for_console, vm.paths.console, "KEMARI-BOOTED", 300)
        await asyncio.sleep(2.0)  # let memdirty start
        await enable_ignore_shared(vm)
        rows: list[dict[str, float]] = []
        before = read_status()["RssAnon"]
        with product_window(vm, cfg, tracker=tracker) as window:
            name, reason = window.tracker.name, window.tracker.reason
            staging_pages = len(window.staging)
            precopy = precopy_on(cfg.replication.pipelining, window.tracker)
            await initial_sync(window)
            last_dirty, t_rows, busy_s = 0, 0.0, 0.0
            for i in range(samples + 2):
                t = time.monotonic()
                pre, busy = await _run_interval(window, cfg, interval_s, precopy, last_dirty)
                r = await complete(window, await window.run(resume=True))
                last_dirty = r.dirty_pages + pre
                if i >= 2:  # the first scans carry the boot's leftovers
                    rows.append(
                        {
                            **window_row(r, overlapped=window.overlap),
                            "dirty": r.dirty_pages,
                            "precopied": pre,
                        }
                    )
                    t_rows, busy_s = t_rows + time.monotonic() - t, busy_s + busy
            early = window.early_stage
            extra_kib = read_status()["RssAnon"] - before
    finally:
        await vm.shutdown()
        with contextlib.suppress(OSError):
            run_root.rmdir()
    totals = [r["total"] for r in rows]
    return {
        "tracker": name,
        "reason": reason,
        "memory_mib": memory_mib,
        "accel": accel,
        "samples": len(rows),
        "stage_during_capture": early,
        "pause_ms_p50": pct(totals, 50),
        "pause_ms_p99": pct(totals, 99),
        "scan_ms_p50": pct([r["scan"] for r in rows], 50),
        "stage_ms_p50": pct([r["stage"] for r in rows], 50),
        "devstate_ms_p50": pct([r["devstate"] for r in rows], 50),
        "dirty_pages_p50": pct([r["dirty"] for r in rows], 50),
        "precopy": precopy,
        "precopy_period_ms": cfg.replication.precopy_period_ms if precopy else None,
        "precopied_pages_p50": pct([r["precopied"] for r in rows], 50),
        "precopy_ms_per_s": busy_s * 1e3 / t_rows if t_rows else 0.0,
        "staging_pages": staging_pages,
        "primary_extra_mib": extra_kib / 1024,
        "primary_extra_per_guest": extra_kib / 1024 / memory_mib,
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def available_trackers() -> tuple[list[str], dict[str, str]]:
    """The trackers this host can run, and why each other one cannot."""
    from kemari_suite.checkpoint.softdirty import probe_soft_dirty

    names, why_not = [], {}
    ok, why = wphelper.probe_kernel()
    if ok:
        names.append("uffd-wp")
    else:
        why_not["uffd-wp"] = why
    ok, why = probe_soft_dirty()
    if ok:
        names.append("soft-dirty")
    else:
        why_not["soft-dirty"] = why
    names.append("compare")
    return names, why_not


def run_trackers(
    cfg: KemariConfig,
    sizes_mib: Sequence[int] = SIZES_MIB,
    samples: int = 30,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every available tracker at every size, each in its own process."""
    say = progress or (lambda _m: None)
    names, why_not = available_trackers()
    rows: list[dict[str, Any]] = []
    # What the child needs of this config: where files go, the accelerator, the window.
    settings: dict[str, Any] = {
        "paths": {k: str(v) for k, v in dataclasses.asdict(cfg.paths).items()},
        "vm": {"accel": cfg.vm.accel},
        "replication": {
            "overlap_scan": cfg.replication.overlap_scan,
            "stage_during_capture": cfg.replication.stage_during_capture,
            "pipelining": cfg.replication.pipelining,
            "precopy_period_ms": cfg.replication.precopy_period_ms,
        },
    }
    if cfg.image.kernel and cfg.image.initrd:
        # A prebuilt guest (the kernel lab copies one in): no image build in the child.
        settings["image"] = {"kernel": cfg.image.kernel, "initrd": cfg.image.initrd}
    for m in sorted(sizes_mib):
        for name in names:
            say(f"trackers: {name} on a {m} MiB guest, {samples} sync points")
            rows.append(_child(name, m, samples, settings))
            if name != VARIANT_TRACKER or m not in (min(sizes_mib), max(sizes_mib)):
                continue
            # Right after it, the same guest with one setting flipped: the A/B behind
            # that setting's default (staging beside the capture; pre-copy).
            flips = variants(cfg) if m == min(sizes_mib) else []
            for key, value in flips + large_variants(cfg, m):
                say(f"trackers: {name} on a {m} MiB guest, {key} {value}")
                flipped = {**settings["replication"], key: value}
                row = _child(name, m, samples, {**settings, "replication": flipped})
                rows.append({**row, "variant": f"{key} {value}".lower()})
    return {"available": names, "unavailable": why_not, "rows": rows, "samples": samples}


#: The tracker whose settings are flipped one at a time beside its default row: it can
#: stage beside the capture (``caps.stage_during_capture``) and pre-copies by default.
VARIANT_TRACKER = "uffd-wp"


def large_variants(cfg: KemariConfig, memory_mib: int) -> list[tuple[str, Any]]:
    """On a guest too large for "auto" to stage beside the capture, that staging forced
    on: the A/B behind the size bound (``window.STAGE_BESIDE_MAX_PAGES``)."""
    from kemari_suite.checkpoint.window import STAGE_BESIDE_MAX_PAGES

    auto = cfg.replication.stage_during_capture == "auto"
    if auto and memory_mib * 256 > STAGE_BESIDE_MAX_PAGES:
        return [("stage_during_capture", True)]
    return []


def variants(cfg: KemariConfig) -> list[tuple[str, Any]]:
    """The settings flipped, one per extra row, against this configuration: the staging
    beside the capture; pre-copy (off if the tracker pre-copies, else on); and, with
    pre-copy on, passes every 25 ms against once half-way (or the other way round)."""
    rcfg = cfg.replication
    out: list[tuple[str, Any]] = [("stage_during_capture", not rcfg.stage_during_capture)]
    on = rcfg.pipelining is True or rcfg.pipelining == "auto"
    out.append(("pipelining", not on))
    if on:
        out.append(("precopy_period_ms", 0 if rcfg.precopy_period_ms else 25))
    return out


def _child(name: str, m: int, samples: int, settings: dict[str, Any]) -> dict[str, Any]:
    """One (tracker, size) in its own process: its row, or the row naming its error."""
    t = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "kemari_suite.bench.trackers", name, str(m), str(samples)],
        input=json.dumps(settings),
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"tracker": name, "memory_mib": m, "error": " | ".join(tail)}
    row: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    row["took_s"] = round(time.monotonic() - t, 1)
    return row


def tracker_summary(res: dict[str, Any], name: str) -> dict[str, Any]:
    """One tracker's figures in the shape ``--json`` prints."""
    rows = [
        r
        for r in res["rows"]
        if r.get("tracker") == name and "error" not in r and not r.get("variant")
    ]
    extra = [(r["memory_mib"] / 1024, r["primary_extra_mib"]) for r in rows]
    fit = linear_fit([x for x, _ in extra], [y for _, y in extra])
    slope = fit["slope"] if fit else None
    return {
        "pause_ms_p50": {str(r["memory_mib"]): r["pause_ms_p50"] for r in rows},
        "pause_ms_p99": {str(r["memory_mib"]): r["pause_ms_p99"] for r in rows},
        "scan_ms_p50": {str(r["memory_mib"]): r["scan_ms_p50"] for r in rows},
        "primary_extra_mib_per_gib": slope
        if slope is not None
        else (extra[0][1] / extra[0][0] if extra else None),
    }


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """``{"tracker": NAME, "pause_ms_p50": {...}, ..., "compare": {...}}``: the fastest
    tracker this host runs (the one ``auto`` picks) beside the compare tracker."""
    names = res["available"]
    first = names[0]
    reason = next(
        (r["reason"] for r in res["rows"] if r.get("tracker") == first and "reason" in r), ""
    )
    out: dict[str, Any] = {"tracker": first, "reason": reason, **tracker_summary(res, first)}
    default = next(
        (r for r in res["rows"] if r.get("tracker") == first and not r.get("variant")), None
    )
    if default is not None and "precopy" in default:
        out["precopy"] = precopy_label(default)
    out["compare"] = tracker_summary(res, "compare")
    for other in names[1:-1]:
        out[other] = tracker_summary(res, other)
    errors = [r for r in res["rows"] if "error" in r]
    if errors:
        out["errors"] = errors
    return out


def precopy_label(row: dict[str, Any]) -> str:
    """ "off", "half-way" or "every N ms" for a row (rows of older runs: "-")."""
    if "precopy" not in row:
        return "-"
    if not row["precopy"]:
        return "off"
    period = row.get("precopy_period_ms")
    return f"every {period} ms" if period else "half-way"


def _n(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_section(res: dict[str, Any]) -> str:
    """The trackers' table and targets, for sizing.md."""
    lines = [
        "## Trackers side by side (the engine's stopped window, guests under "
        f"{next((r.get('accel') for r in res['rows'] if r.get('accel')), '?')})",
        "",
        f"About {PAGES_PER_S * INTERVAL_MS // 1000} dirty pages per {INTERVAL_MS} ms "
        "interval over "
        f"{WORKING_SET_MIB} MiB; {res['samples']} sync points per row. Pre-copy as "
        "configured (the product's default: on for a tracker without a shadow); its "
        "passes' CPU time, taken while the guest runs, is the last column. Dirty pages: "
        "what the pause staged. Primary extra "
        "memory: the anonymous resident memory the tracker, its buffers and the sync "
        "points added (guest RAM itself not counted).",
        "",
        "| tracker | guest MiB | pause p50 ms | pause p99 ms | scan p50 ms | stage p50 ms "
        "| dirty pages p50 | primary extra MiB | extra / guest RAM | pre-copy "
        "| pre-copied pages p50 | pre-copy ms/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['tracker']} | {r['memory_mib']} | failed: {r['error']} |||||||")
            continue
        label = r["tracker"] + (f" ({r['variant']})" if r.get("variant") else "")
        lines.append(
            f"| {label} | {r['memory_mib']} | {_n(r['pause_ms_p50'])} | "
            f"{_n(r['pause_ms_p99'])} | {_n(r['scan_ms_p50'], '{:.2f}')} | "
            f"{_n(r['stage_ms_p50'])} | {_n(r['dirty_pages_p50'], '{:.0f}')} | "
            f"{_n(r['primary_extra_mib'], '{:.0f}')} | "
            f"{_n(r['primary_extra_per_guest'], '{:.2f}')}x | {precopy_label(r)} | "
            f"{_n(r.get('precopied_pages_p50'), '{:.0f}')} | "
            f"{_n(r.get('precopy_ms_per_s'))} |"
        )
    for name, why in res["unavailable"].items():
        lines.append(f"\n{name} is not measured here: {why}")
    for v in (r for r in res["rows"] if r.get("variant") and "error" not in r):
        base = next(
            (b for b in res["rows"] if b.get("tracker") == v["tracker"]
             and b.get("memory_mib") == v["memory_mib"] and not b.get("variant")
             and b.get("pause_ms_p50")),
            None,
        )  # fmt: skip
        if base is not None and v.get("pause_ms_p50") is not None:
            lines.append(
                f"\n{v['tracker']} ({v['variant']}), booted right after the row without "
                f"it: pause p50 {v['pause_ms_p50'] / base['pause_ms_p50']:.2f}x "
                f"({_n(v['pause_ms_p50'])} against {_n(base['pause_ms_p50'])} ms)."
            )
    lines += ["", "Targets (issue 15):", ""]
    lines += [f"- {t}" for t in targets(res)]
    return "\n".join(lines) + "\n"


def targets(res: dict[str, Any]) -> list[str]:
    """Each target of the fastest tracker, met or not, with its figures."""
    s = summary(res)
    p50, small, big = s["pause_ms_p50"], str(min(SIZES_MIB)), str(max(SIZES_MIB))
    out = []

    def check(label: str, ok: bool | None, detail: str) -> None:
        verdict = "not measured" if ok is None else ("met" if ok else "NOT met")
        out.append(f"{s['tracker']}: {label}: {verdict} ({detail})")

    a, b = p50.get(small), p50.get(big)
    check("pause p50 <= 6 ms at 128 MiB", None if a is None else a <= 6, f"{_n(a)} ms")
    check("pause p50 <= 8 ms at 4 GiB", None if b is None else b <= 8, f"{_n(b)} ms")
    growth = None if a is None or b is None or a == 0 else b / a
    check(
        "pause grows <= 1.5x from 128 MiB to 4 GiB",
        None if growth is None else growth <= 1.5,
        f"{_n(growth, '{:.2f}')}x",
    )
    per_gib = s["primary_extra_mib_per_gib"]
    check(
        "primary extra memory <= 0.25x guest RAM",
        None if per_gib is None else per_gib <= 256,
        f"{_n(per_gib, '{:.0f}')} MiB per GiB",
    )
    return out


def main() -> None:
    """``python -m kemari_suite.bench.trackers TRACKER MIB SAMPLES`` (the parent's
    settings as JSON on stdin): one row, as JSON, on the last stdout line."""
    name, mib, samples = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cfg = with_overrides(load(None), **json.loads(sys.stdin.read()))
    interval_s = INTERVAL_MS / 1e3
    try:
        row = asyncio.run(measure_one(cfg, name, mib, samples, interval_s))
    except Exception as err:
        raise BenchmarkError(f"trackers ({name} at {mib} MiB)", str(err)) from err
    print(json.dumps(row))


if __name__ == "__main__":
    main()


__all__ = [
    "INTERVAL_MS",
    "QUICK_SIZES_MIB",
    "SIZES_MIB",
    "available_trackers",
    "format_section",
    "large_variants",
    "measure_one",
    "run_trackers",
    "summary",
    "targets",
]
