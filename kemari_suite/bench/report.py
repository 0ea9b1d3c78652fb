"""The suite's figures: summaries, ratios to Base, the published table, the report files.

:func:`summarize` turns the raw measurements of every scenario (timed loops and the
primary's checkpoint records) into the ``results.json`` tree; :func:`write_report`
renders that tree as ``report.md``, ``report.html`` and PNG plots. Everything here is
pure except the writers, so the arithmetic is unit-tested on made-up numbers.

Reading the ratios: for each benchmark, ``host ratio = Kemari / Base`` of the medians of
host-timed microseconds per operation. It factors into

- the *pause factor* (Kemari host time / Kemari guest time): the share of wall time the
  VM was stopped, which the guest's own clock never sees, and
- the *guest-internal ratio* (Kemari guest time / Base guest time): how much slower the
  guest ran while it ran (the agents' threads competing for the host's cores, caches).
"""

from __future__ import annotations

import base64
import html
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite.bench import warmup
from kemari_suite.bench.markers import IOZONE, LMBENCH, Loop
from kemari_suite.bench.scenarios import Scenario

#: The published Xen Kemari table (microseconds per operation).
PUBLISHED_US: dict[str, dict[str, float]] = {
    "Base": {"fork": 114, "exec": 349, "sh": 1197, "pagefault": 1.2845, "ctxsw": 8.2},
    "Kemari(10GbE) + FC": {
        "fork": 141,
        "exec": 403,
        "sh": 1280,
        "pagefault": 1.2835,
        "ctxsw": 11.6,
    },
    "Kemari(10GbE) + DRBD": {
        "fork": 161,
        "exec": 415,
        "sh": 1388,
        "pagefault": 1.3145,
        "ctxsw": 11.6,
    },
    "Kemari(1GbE) + FC": {"fork": 151, "exec": 410, "sh": 1335, "pagefault": 1.3370, "ctxsw": 11.5},
    "Kemari(1GbE) + DRBD": {
        "fork": 162,
        "exec": 413,
        "sh": 1318,
        "pagefault": 1.3239,
        "ctxsw": 11.6,
    },
}
#: The target: every Kemari(10g) ratio below the published Kemari(10GbE)+DRBD ratio.
TARGET_RATIOS: dict[str, float] = {
    "fork": 1.41,
    "exec": 1.19,
    "sh": 1.16,
    "pagefault": 1.02,
    "ctxsw": 1.41,
}
#: The published IOzone sync table: mode -> (sync interval ms, dirtied pages).
PUBLISHED_IOZONE: dict[str, tuple[float, float]] = {
    "iozone_wbuf": (400.0, 3000.0),
    "iozone_osync": (10.0, 80.0),
}
LABELS = {
    "fork": "fork",
    "exec": "exec",
    "sh": "sh",
    "pagefault": "P/F",
    "ctxsw": "C/S",
    "iozone_wbuf": "buffered + fsync",
    "iozone_osync": "O_SYNC",
}


def published_ratios(row: str) -> dict[str, float]:
    base = PUBLISHED_US["Base"]
    return {b: PUBLISHED_US[row][b] / base[b] for b in LMBENCH}


# ---- raw measurements of one scenario ---------------------------------------------------


@dataclass
class ScenarioRaw:
    """What one scenario produced (over one or more passes), before any arithmetic."""

    scenario: Scenario
    loops: list[Loop] = field(default_factory=list)
    #: The primary's checkpoint records (Kemari rows), whole runs of every pass.
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    #: Per pass: seconds from starting the pass to protection (Kemari) or boot (Base).
    ready_after_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    #: Per pass: CPU time of processes outside this run, as a share of the machine,
    #: while the rounds ran.
    other_cpu_share: list[float] = field(default_factory=list)
    #: Per pass: 1-minute load average before and after.
    loadavg: list[tuple[float, float]] = field(default_factory=list)
    #: Per pass: the guest's KB-READY fields (clocksource, calibrated TSC MHz).
    guest_ready: list[str] = field(default_factory=list)
    #: Set when no pass produced a measurement.
    error: str | None = None
    guest_commands: list[str] = field(default_factory=list)
    #: Per pass (Base rows): the device-state warm-up's check, in its results.json form
    #: (:meth:`kemari_suite.bench.warmup.WarmupCheck.to_dict`).
    warmup: list[dict[str, Any]] = field(default_factory=list)
    #: The dirty-page tracker the primary ran, and why (Kemari rows, from its status).
    tracker: str = ""

    def merge(self, part: ScenarioRaw) -> None:
        """Add one pass's figures (a pass that failed adds its error to ``failures``)."""
        self.loops += part.loops
        self.checkpoints += part.checkpoints
        self.calibration = self.calibration or part.calibration
        self.skipped |= part.skipped
        self.failures += part.failures
        self.ready_after_s += part.ready_after_s
        self.elapsed_s += part.elapsed_s
        self.other_cpu_share += part.other_cpu_share
        self.loadavg += part.loadavg
        self.guest_ready += part.guest_ready
        self.warmup += part.warmup
        self.tracker = self.tracker or part.tracker
        self.guest_commands += [c for c in part.guest_commands if c not in self.guest_commands]
        if part.error:
            self.failures.append(part.error)
        self.error = None if self.loops else ("; ".join(self.failures) or None)


# ---- arithmetic -------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """Median, min, max and the relative spread (max - min) / median of ``values``."""
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None, "rel_spread": None}
    med = float(statistics.median(values))
    lo, hi = float(min(values)), float(max(values))
    return {
        "n": len(values),
        "median": med,
        "min": lo,
        "max": hi,
        "rel_spread": (hi - lo) / med if med else None,
    }


def pause_interval(cp: dict[str, Any]) -> tuple[float, float]:
    """Wall-clock (start, end) of a checkpoint's pause.

    The record's ``t_wall`` is taken after the epoch was sent (``transfer_ms`` after the
    resume); the pause lasted ``pause_ms`` before that resume.
    """
    if cp.get("stopped_at") is not None and cp.get("guest_pause_ms") is not None:
        # QEMU's own STOP/RESUME timestamps: exact, no QMP round trips.
        start = float(cp["stopped_at"])
        return start, start + float(cp["guest_pause_ms"]) / 1e3
    end = float(cp["t_wall"]) - float(cp.get("transfer_ms", 0.0)) / 1e3
    return end - float(cp["pause_ms"]) / 1e3, end


def pause_ms(cp: dict[str, Any]) -> float:
    """A checkpoint's pause: QEMU's timestamps where recorded, the agent's clock else."""
    g = cp.get("guest_pause_ms")
    return float(g) if g is not None else float(cp["pause_ms"])


def paused_within(checkpoints: Iterable[dict[str, Any]], a: float, b: float) -> tuple[float, int]:
    """Seconds the VM was stopped within wall window [a, b], and sync points starting in it."""
    total, n = 0.0, 0
    for cp in checkpoints:
        s, e = pause_interval(cp)
        total += max(0.0, min(e, b) - max(s, a))
        if a <= s <= b:
            n += 1
    return total, n


def sync_stats(
    checkpoints: Sequence[dict[str, Any]], windows: Sequence[tuple[float, float]]
) -> dict[str, Any]:
    """Syncs per second, paused share and pause percentiles over the measured windows."""
    length = sum(b - a for a, b in windows)
    paused, n = 0.0, 0
    pauses: list[float] = []
    triggers: dict[str, int] = {}
    for a, b in windows:
        p, k = paused_within(checkpoints, a, b)
        paused += p
        n += k
        for cp in checkpoints:
            s, _e = pause_interval(cp)
            if a <= s <= b:
                pauses.append(pause_ms(cp))
                t = str(cp.get("trigger", "?"))
                triggers[t] = triggers.get(t, 0) + 1
    return {
        "window_s": length,
        "checkpoints": n,
        "syncs_per_s": n / length if length > 0 else None,
        "paused_share": paused / length if length > 0 else None,
        "pause_ms": spread(pauses) | _percentiles(pauses),
        "triggers": triggers,
    }


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    s = sorted(values)

    def q(p: float) -> float:
        k = (len(s) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def io_sync_points(
    checkpoints: Sequence[dict[str, Any]], windows: Sequence[tuple[float, float]]
) -> dict[str, Any]:
    """Sync interval and dirtied pages per sync point inside the IOzone loops' windows.

    The interval of a sync point is the time since the previous sync point started
    (whether or not that one was inside the window); dirtied pages are those found at
    the stop plus those pre-copied during the epoch.
    """
    ordered = sorted(checkpoints, key=lambda c: pause_interval(c)[0])
    starts = [pause_interval(c)[0] for c in ordered]
    points: list[tuple[float, int]] = []
    for a, b in windows:
        for i, cp in enumerate(ordered):
            if i == 0 or not a <= starts[i] <= b:
                continue
            dirtied = int(cp.get("dirty_pages", 0)) + int(cp.get("precopied_pages", 0))
            points.append(((starts[i] - starts[i - 1]) * 1e3, dirtied))
    intervals = [p[0] for p in points]
    dirty = [float(p[1]) for p in points]
    return {
        "sync_points": len(points),
        "sync_interval_ms_mean": statistics.fmean(intervals) if intervals else None,
        "sync_interval_ms_median": statistics.median(intervals) if intervals else None,
        "dirtied_pages_mean": statistics.fmean(dirty) if dirty else None,
        "dirtied_pages_median": statistics.median(dirty) if dirty else None,
        "points": [[round(i, 3), d] for i, d in points],
    }


def clock_fast_passes(loops: Sequence[Loop], slack: float = 0.1) -> set[int]:
    """Passes in which some loop took clearly longer by the guest's clock than by the
    host's (beyond ``slack`` and 5 ms of marker-stamping jitter)."""
    return {lp.pass_no for lp in loops if lp.guest_ns / 1e9 > lp.host_s * (1 + slack) + 0.005}


def stopped_share(loops: Sequence[Loop]) -> float | None:
    """Share of the loops' host time the guest's clock did not advance: the VM was
    stopped (about 0 for Base; the marker lines themselves cost about a millisecond)."""
    host = sum(lp.host_s for lp in loops)
    guest = sum(lp.guest_ns for lp in loops) / 1e9
    return 1 - guest / host if host > 0 else None


def _loop_record(lp: Loop, checkpoints: Sequence[dict[str, Any]] | None) -> dict[str, Any]:
    """One timed loop, with the pauses inside it (host seconds stopped, sync points)."""
    rec: dict[str, Any] = {
        "pass": lp.pass_no,
        "round": lp.round,
        "iters": lp.iters,
        "ops": lp.ops,
        "host_s": round(lp.host_s, 6),
        "guest_s": round(lp.guest_ns / 1e9, 6),
        "wall_start": round(lp.wall_start, 6),
        "wall_end": round(lp.wall_end, 6),
    }
    if checkpoints is not None:
        paused, n = paused_within(checkpoints, lp.wall_start, lp.wall_end)
        rec["paused_s"] = round(paused, 6)
        rec["sync_points"] = n
    return rec


def _policy_text(entry: dict[str, Any]) -> str:
    """How a protected row synchronized, in words (older results name no policy)."""
    policy = entry.get("policy") or "kemari"
    if policy == "remus":
        return f"remus, fixed {entry.get('remus_interval_ms')} ms epochs"
    if policy == "output":
        return "output (the default: a sync point where output becomes visible)"
    return "kemari (the seed's: a sync point at every outbound I/O, disk included)"


def summarize_scenario(raw: ScenarioRaw) -> dict[str, Any]:
    """The results.json entry of one scenario."""
    sc = raw.scenario
    out: dict[str, Any] = {
        "title": sc.title,
        "tracker": raw.tracker,
        "kind": sc.kind,
        "profile": sc.profile,
        "disk": sc.disk,
        "tiebreaker": sc.tiebreaker if sc.protected else None,
        "max_interval_ms": sc.max_interval_ms if sc.protected else None,
        "policy": sc.policy if sc.protected else None,
        "remus_interval_ms": sc.remus_interval_ms
        if sc.protected and sc.policy == "remus"
        else None,
        "published_row": sc.published,
        "guest_commands": raw.guest_commands,
        "ready_after_s": raw.ready_after_s,
        "elapsed_s": raw.elapsed_s,
        "other_cpu_share": raw.other_cpu_share,
        "loadavg": [list(x) for x in raw.loadavg],
        "guest_ready": raw.guest_ready,
        "warmup": raw.warmup,
        "calibration": raw.calibration,
        "skipped": raw.skipped,
        "failures": raw.failures,
        "error": raw.error,
        "rounds": sorted({(lp.pass_no, lp.round) for lp in raw.loops}),
        "benchmarks": {},
    }
    # A guest clock running faster than the host's means a miscalibrated guest TSC: its
    # pass's guest-internal figures (and the stopped share from them) are left out.
    fast = sorted(clock_fast_passes(raw.loops))
    out["guest_clock_fast_passes"] = fast
    sane = [lp for lp in raw.loops if lp.pass_no not in fast]
    for bench in (*LMBENCH, *IOZONE):
        loops = [lp for lp in raw.loops if lp.bench == bench]
        gloops = [lp for lp in sane if lp.bench == bench]
        if not loops:
            continue
        entry: dict[str, Any] = {
            "unit": "us/op",
            "ops": [lp.ops for lp in loops],
            "host_s": [lp.host_s for lp in loops],
            "host_us_per_op": spread([lp.host_us_per_op for lp in loops]),
            "guest_us_per_op": spread([lp.guest_us_per_op for lp in gloops]),
            "host_values": [lp.host_us_per_op for lp in loops],
            "guest_values": [lp.guest_us_per_op for lp in gloops],
        }
        entry["loops"] = [
            _loop_record(lp, raw.checkpoints if sc.protected else None) for lp in loops
        ]
        entry["stopped_share"] = stopped_share(gloops)
        if bench in IOZONE:
            entry["bytes"] = loops[0].bytes
            entry["host_mib_s"] = spread([lp.host_mib_s or 0.0 for lp in loops])
            entry["guest_mib_s"] = spread([lp.guest_mib_s or 0.0 for lp in loops])
        if sc.protected and raw.checkpoints:
            windows = [(lp.wall_start, lp.wall_end) for lp in loops]
            st = sync_stats(raw.checkpoints, windows)
            entry["paused_share"] = st["paused_share"]
            entry["syncs_per_s"] = st["syncs_per_s"]
            if bench in IOZONE:
                entry["sync_points"] = io_sync_points(raw.checkpoints, windows)
        out["benchmarks"][bench] = entry
    out["stopped_share"] = stopped_share(sane)
    out["lmbench_stopped_share"] = stopped_share([lp for lp in sane if lp.bench in LMBENCH])
    if sc.protected and raw.checkpoints and raw.loops:
        windows = [(lp.wall_start, lp.wall_end) for lp in raw.loops]
        st = sync_stats(raw.checkpoints, windows)
        out["sync"] = {k: v for k, v in st.items()}
        lm = [(lp.wall_start, lp.wall_end) for lp in raw.loops if lp.bench in LMBENCH]
        out["lmbench_sync"] = sync_stats(raw.checkpoints, lm)
        out["pauses_ms"] = [
            pause_ms(cp)
            for cp in raw.checkpoints
            if any(a <= pause_interval(cp)[0] <= b for a, b in windows)
        ]
    return out


def _median(entry: dict[str, Any] | None, key: str, stat: str = "median") -> float | None:
    if not entry:
        return None
    v = entry.get(key, {}).get(stat)
    return float(v) if v is not None else None


def ratios(
    base: dict[str, Any],
    row: dict[str, Any],
    key: str = "host_us_per_op",
    stat: str = "median",
) -> dict[str, float | None]:
    """Kemari over Base, per benchmark, of the ``stat`` ("median" or "min") of ``key``
    (None when missing)."""
    out: dict[str, float | None] = {}
    for bench in (*LMBENCH, *IOZONE):
        b = _median(base["benchmarks"].get(bench), key, stat)
        k = _median(row["benchmarks"].get(bench), key, stat)
        out[bench] = k / b if b and k is not None else None
    return out


def target_check(name: str, host_ratios: dict[str, float | None]) -> dict[str, Any]:
    """Where a Kemari(10g) row is (not) below the published Kemari(10GbE)+DRBD ratios."""
    rows = {}
    for bench, target in TARGET_RATIOS.items():
        r = host_ratios.get(bench)
        rows[bench] = {"ratio": r, "target": target, "met": r is not None and r < target}
    return {"scenario": name, "benchmarks": rows, "all_met": all(v["met"] for v in rows.values())}


def summarize(raws: Sequence[ScenarioRaw], *, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole results.json tree. The first base row is the reference for ratios."""
    scenarios = {r.scenario.name: summarize_scenario(r) for r in raws}
    base_name = next((r.scenario.name for r in raws if not r.scenario.protected), None)
    base = scenarios.get(base_name) if base_name else None
    out: dict[str, Any] = {
        "meta": meta or {},
        "base": base_name,
        "published": {
            "us_per_op": PUBLISHED_US,
            "target_ratios": TARGET_RATIOS,
            "iozone": {
                m: {"sync_interval_ms": v[0], "dirtied_pages": v[1]}
                for m, v in PUBLISHED_IOZONE.items()
            },
        },
        "scenarios": scenarios,
        # Every Base boot's device-state warm-up, checked (see bench/warmup.py).
        "warmup": warmup.summarize([c for r in raws if not r.scenario.protected for c in r.warmup]),
        "ratios": {},
        "io_ratios": {},
        "ratios_min": {},
        "guest_ratios": {},
        "pause_factor": {},
        "targets": {},
    }
    if base is None or base.get("error"):
        return out
    for raw in raws:
        sc = raw.scenario
        row = scenarios[sc.name]
        if not sc.protected or row.get("error"):
            continue
        host = ratios(base, row)
        guest = ratios(base, row, "guest_us_per_op")
        out["ratios"][sc.name] = {b: host[b] for b in LMBENCH}
        out["io_ratios"][sc.name] = {b: host[b] for b in IOZONE}
        out["ratios_min"][sc.name] = ratios(base, row, stat="min")
        out["guest_ratios"][sc.name] = guest
        pf: dict[str, float | None] = {}
        for bench, entry in row["benchmarks"].items():
            # Over the same loops as the stopped share, so that the two always agree.
            share = entry.get("stopped_share")
            pf[bench] = 1 / (1 - share) if share is not None and share < 1 else None
        out["pause_factor"][sc.name] = pf
        if "10g" in sc.name:
            out["targets"][sc.name] = target_check(sc.name, host)
    return out


# ---- rendering --------------------------------------------------------------------------


def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    if digits == 0 and abs(v) < 10:
        digits = 2 if abs(v) >= 1 else 3
    return f"{v:.{digits}f}"


def _cell(entry: dict[str, Any] | None, key: str = "host_us_per_op") -> str:
    if not entry:
        return "-"
    s = entry.get(key) or {}
    med = s.get("median")
    if med is None:
        return "-"
    return f"{_fmt(med)} ({_fmt(s['min'])}-{_fmt(s['max'])})"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def explain_target(name: str, res: dict[str, Any]) -> list[str]:
    """One sentence per benchmark whose Kemari(10g) ratio is not below the target."""
    check = res["targets"].get(name)
    if not check:
        return []
    row = res["scenarios"][name]
    sync = row.get("sync") or {}
    guest = res["guest_ratios"].get(name, {})
    pf = res["pause_factor"].get(name, {})
    lines = []
    for bench, c in check["benchmarks"].items():
        if c["met"]:
            continue
        if c["ratio"] is None:
            lines.append(f"- {LABELS[bench]}: no measurement (see the scenario's error).")
            continue
        entry = row["benchmarks"].get(bench, {})
        stopped = entry.get("stopped_share")
        g = guest.get(bench)
        lines.append(
            f"- {LABELS[bench]}: ratio {c['ratio']:.3f}, target below {c['target']:.2f}. "
            f"The guest's clock stood still for {_pct(stopped)} of this benchmark's host time "
            f"(the VM stopped at {_fmt(entry.get('syncs_per_s'), 1)} sync points/s, pause p50 "
            f"{_fmt((sync.get('pause_ms') or {}).get('p50'), 1)} ms over the row): the pauses "
            f"alone make it {_fmt(pf.get(bench))}x slower. While it ran, the guest took "
            f"{_fmt(g)}x its Base time (guest-internal ratio"
            + (
                ": the agents' threads compete with the vCPU for the host's cores)."
                if g is not None and g >= 1.03
                else "; within noise of Base)."
            )
        )
    return lines


def target_floor(name: str, res: dict[str, Any]) -> list[str]:
    """The ratio the sync-point pauses alone impose on a row's lmbench loops, and the
    targets below it (which no saving elsewhere can meet at that sync rate)."""
    row = res["scenarios"].get(name) or {}
    share = row.get("lmbench_stopped_share")
    if share is None or share >= 1:
        return []
    floor = 1 / (1 - share)
    sync = row.get("lmbench_sync") or {}
    below = [LABELS[b] for b, t in TARGET_RATIOS.items() if t <= floor]
    guest = res["guest_ratios"].get(name, {})
    g = [guest[b] for b in LMBENCH if guest.get(b) is not None]
    text = (
        f"- Pause floor of {row.get('title', name)}: over its lmbench loops the guest's clock "
        f"stood still {_pct(share)} of the time ({_fmt(sync.get('syncs_per_s'), 1)} sync "
        f"points/s, pause p50 {_fmt((sync.get('pause_ms') or {}).get('p50'), 1)} ms), so no "
        f"CPU-bound loop can take less than {floor:.2f}x its Base time"
    )
    text += (
        f"; the targets for {', '.join(below)} lie at or below that floor."
        if below
        else "; every target lies above that floor."
    )
    if g:
        text += (
            f" The rest of the overhead is the guest running {min(g):.2f}-{max(g):.2f}x "
            "slower between sync points (guest-internal ratio)."
        )
    return ["", text]


def _machine_lines(res: dict[str, Any]) -> list[str]:
    m = res.get("meta", {})
    mach = m.get("machine", {})
    return [
        f"- Command: `{m.get('command', '')}`",
        f"- Commit: `{mach.get('commit') or 'unknown'}`",
        f"- Machine: {mach.get('cpu', '?')} ({mach.get('cpus', '?')} CPUs), kernel "
        f"{mach.get('kernel', '?')}, accelerator {m.get('accel', '?')}, {mach.get('date', '')}",
        f"- Guest: {m.get('memory_mib', '?')} MiB, 1 vCPU, kernel {m.get('guest_kernel', '?')}; "
        f"`{m.get('guest_command', '')}`",
        f"- Mode: {'quick' if m.get('quick') else 'full'}: {m.get('passes', '?')} passes over "
        "the scenarios (Base first, Kemari rows in alternating order, and Base once more at "
        f"the end), {m.get('rounds', '?')} "
        "rounds kept per scenario and pass after one shortened warm-up round; each round runs "
        f"every benchmark once. Loops were calibrated to about {m.get('loop_s', '?')} s of "
        "guest time in the first Base boot; every boot ran the same iteration counts.",
        f"- Suite time: {_fmt(m.get('elapsed_s'), 0)} s. The suite and everything it started "
        f"(QEMU, agents) ran at nice {m.get('nice', '?')}; the console tail thread "
        f"{'ran real-time (SCHED_FIFO)' if m.get('tail_realtime') else 'ran at normal priority'}.",
        f"- Workloads: {m.get('tools', '')}.",
    ]


def _m_warm(res: dict[str, Any]) -> dict[str, Any]:
    """The warm-up's parameters, as the run recorded them."""
    w = res.get("meta", {}).get("warmup")
    return w if isinstance(w, dict) else {}


def _warm_cell(row: dict[str, Any]) -> str:
    """A row's warm-up per pass: ``cold -> warm (ratio)``, or why there is none."""
    if row.get("kind") == "kemari":
        return "captured at every sync point"
    cells = []
    for c in row.get("warmup") or []:
        ratio = "-" if c.get("ratio") is None else f"{c['ratio']:.1f}x"
        cell = f"{_fmt(c.get('cold_rate'))} -> {_fmt(c.get('warm_rate'))} ({ratio})"
        if not c.get("ok"):
            cell = f"**{cell} {str(c.get('status', '')).upper()}**"
        cells.append(cell)
    return ", ".join(cells) or "**none**"


def _trackers(res: dict[str, Any]) -> list[str]:
    """The trackers the Kemari rows ran (each with the reason), as recorded."""
    seen = (sc.get("tracker") for sc in res.get("scenarios", {}).values())
    return list(dict.fromkeys(t for t in seen if t))


def render_markdown(res: dict[str, Any], plots: dict[str, str]) -> str:
    """report.md from the results tree; ``plots`` maps a plot name to its file name."""
    sc = res["scenarios"]
    names = list(sc)
    kemari = [n for n in names if sc[n]["kind"] == "kemari"]
    L: list[str] = ["# Kemari Suite: lmbench and IOzone comparison", ""]
    loud = warmup.alarm(res.get("warmup") or {"ok": False, "problems": ["not recorded"]})
    if loud:
        L += [f"**{loud}**", ""]
    L += _machine_lines(res)
    L += [
        "",
        "Every time below is measured on the **host's clock**, from markers the guest",
        "prints before and after each timed loop (QEMU stops the guest's clock while the VM",
        "is stopped, so guest timers cannot see Kemari's pauses). Guest-internal figures are",
        "shown separately and labelled as such. Cells are `median (min-max)` over the kept",
        "rounds. Every Kemari row uses the same maximum sync interval "
        f"({', '.join(sorted({str(sc[n]['max_interval_ms']) for n in kemari})) or '-'} ms).",
        "Sync policies: "
        + ("; ".join(f"{sc[n]['title']}: {_policy_text(sc[n])}" for n in kemari) or "-")
        + ".",
        "",
        "## lmbench-style, microseconds per operation",
        "",
        "| | fork | exec | sh | P/F | C/S |",
        "|---|---|---|---|---|---|",
    ]
    for row, vals in PUBLISHED_US.items():
        L.append(
            f"| published: {row} | "
            + " | ".join(_fmt(vals[b], 1 if b != "pagefault" else 4) for b in LMBENCH)
            + " |"
        )
    for n in names:
        r = sc[n]
        if r.get("error"):
            L.append(f"| measured: {r['title']} | " + " | ".join("error" for _ in LMBENCH) + " |")
            continue
        L.append(
            f"| measured: {r['title']} | "
            + " | ".join(_cell(r["benchmarks"].get(b)) for b in LMBENCH)
            + " |"
        )
    L += [
        "",
        "## Ratios to Base (host-timed), beside the published ratios",
        "",
        "| | fork | exec | sh | P/F | C/S |",
        "|---|---|---|---|---|---|",
    ]
    for row in PUBLISHED_US:
        if row == "Base":
            continue
        pr = published_ratios(row)
        L.append(f"| published: {row} | " + " | ".join(f"{pr[b]:.2f}" for b in LMBENCH) + " |")
    for n in kemari:
        rr = res["ratios"].get(n)
        cells = [_fmt(rr.get(b)) if rr else "-" for b in LMBENCH]
        L.append(f"| measured: {sc[n]['title']} | " + " | ".join(cells) + " |")
    L += [
        "",
        "The same, as the ratio of the fastest rounds (less sensitive to other load on the",
        "host, which only ever slows a round down):",
        "",
        "| | fork | exec | sh | P/F | C/S |",
        "|---|---|---|---|---|---|",
    ]
    for n in kemari:
        rm = res["ratios_min"].get(n)
        cells = [_fmt(rm.get(b)) if rm else "-" for b in LMBENCH]
        L.append(f"| measured (minima): {sc[n]['title']} | " + " | ".join(cells) + " |")
    L += ["", "Guest-internal ratios (blind to the pauses; for comparison only):", ""]
    L += ["| | fork | exec | sh | P/F | C/S |", "|---|---|---|---|---|---|"]
    for n in kemari:
        gr = res["guest_ratios"].get(n)
        L.append(
            f"| {sc[n]['title']} | "
            + " | ".join(_fmt(gr.get(b)) if gr else "-" for b in LMBENCH)
            + " |"
        )
    if "ratios" in plots:
        L += ["", f"![overhead ratio per benchmark and scenario]({plots['ratios']})"]
    L += ["", "## Target: Kemari(10g) below the published Kemari(10GbE) + DRBD ratios", ""]
    L += ["| | " + " | ".join(LABELS[b] for b in LMBENCH) + " |", "|---|---|---|---|---|---|"]
    L.append("| target (below) | " + " | ".join(f"{TARGET_RATIOS[b]:.2f}" for b in LMBENCH) + " |")
    for n, check in res["targets"].items():
        cells = []
        for b in LMBENCH:
            c = check["benchmarks"][b]
            r = "-" if c["ratio"] is None else f"{c['ratio']:.3f}"
            cells.append(f"{r} {'met' if c['met'] else '**not met**'}")
        L.append(f"| {sc[n]['title']} | " + " | ".join(cells) + " |")
    for n in res["targets"]:
        lines = explain_target(n, res)
        if lines:
            L += ["", f"Where {sc[n]['title']} misses the target:", "", *lines]
        L += target_floor(n, res)
    L += [
        "",
        "## Sync points per Kemari row (over the timed loops)",
        "",
        "| | syncs/s | paused share (records) | stopped share (guest clock) | pause p50 ms "
        "| pause p99 ms | pause max ms | sync points | triggers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in kemari:
        s = sc[n].get("sync")
        if not s:
            L.append(f"| {sc[n]['title']} | - | - | - | - | - | - | - | - |")
            continue
        p = s["pause_ms"]
        trig = ", ".join(f"{k} {v}" for k, v in sorted(s["triggers"].items()))
        L.append(
            f"| {sc[n]['title']} | {_fmt(s['syncs_per_s'], 1)} | {_pct(s['paused_share'])} "
            f"| {_pct(sc[n].get('stopped_share'))} "
            f"| {_fmt(p['p50'], 1)} | {_fmt(p['p99'], 1)} | {_fmt(p['max'], 1)} "
            f"| {s['checkpoints']} | {trig} |"
        )
    if "pauses" in plots:
        L += ["", f"![pause-time distribution]({plots['pauses']})"]
    L += [
        "",
        "## IOzone-style writes",
        "",
        "| | sync interval [ms] | dirtied pages per sync point |",
        "|---|---|---|",
    ]
    for mode, (iv, pages) in PUBLISHED_IOZONE.items():
        L.append(f"| published: {LABELS[mode]} | {iv:.0f} | {pages:.0f} |")
    for n in kemari:
        for mode in IOZONE:
            e = sc[n]["benchmarks"].get(mode) or {}
            sp = e.get("sync_points") or {}
            L.append(
                f"| measured: {sc[n]['title']}, {LABELS[mode]} "
                f"| {_fmt(sp.get('sync_interval_ms_mean'), 1)} "
                f"| {_fmt(sp.get('dirtied_pages_mean'), 0)} |"
            )
    L += [
        "",
        "(mean over the sync points that started inside the writer's timed loops; the",
        "interval is measured from the previous sync point's start)",
        "",
        "| | "
        + " | ".join(f"{LABELS[m]} MiB/s (host)" for m in IOZONE)
        + " | "
        + " | ".join(f"{LABELS[m]} time ratio" for m in IOZONE)
        + " |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        r = sc[n]
        ir = res["io_ratios"].get(n, {})
        cells = [_cell(r["benchmarks"].get(m), "host_mib_s") for m in IOZONE]
        cells += [_fmt(ir.get(m)) if ir else "-" for m in IOZONE]
        L.append(f"| {r['title']} | " + " | ".join(cells) + " |")
    if "dirty" in plots:
        L += ["", f"![dirtied pages against sync interval]({plots['dirty']})"]
    L += [
        "",
        "## Guest-internal figures (labelled: the guest's clock, blind to the pauses)",
        "",
        "| | " + " | ".join(LABELS[b] for b in (*LMBENCH, *IOZONE)) + " |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = sc[n]
        L.append(
            f"| {r['title']} | "
            + " | ".join(
                _cell(r["benchmarks"].get(b), "guest_us_per_op") for b in (*LMBENCH, *IOZONE)
            )
            + " |"
        )
    L += [
        "",
        "## Run conditions (per pass)",
        "",
        "| | ready after s | scenario s | other load on the host | load average "
        "| warm-up: ktouch loops/s cold -> warm (ratio) | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = sc[n]
        ready = ", ".join(_fmt(v, 1) for v in r.get("ready_after_s") or []) or "-"
        other = ", ".join(_pct(v) for v in r.get("other_cpu_share") or []) or "-"
        load = ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in r.get("loadavg") or []) or "-"
        errors = r.get("error") or "; ".join(r.get("failures") or []) or "-"
        L.append(
            f"| {r['title']} | {ready} | {_fmt(r.get('elapsed_s'), 0)} | {other} | {load} "
            f"| {_warm_cell(r)} | {html.escape(errors.splitlines()[0])} |"
        )
    wu = res.get("warmup") or {}
    L += [
        "",
        '"Other load" is the CPU time of processes outside this run (other sessions, tests)',
        "while the scenario was measured, as a share of all the host's CPUs; where it is high,",
        "the figures of that row are noisy.",
        "",
        "*Warm-up*: before its loops, every Base boot gets device-state captures (one every "
        f"{_fmt(_m_warm(res).get('interval_s'), 1)} s for {_fmt(_m_warm(res).get('capture_s'), 1)} "
        "s), as a protected guest gets at every sync point; the probe `ktouch` (one word "
        "written per page of a working set) is timed before and after on the host's clock. "
        "The warm-up took hold when the warm rate is at least "
        f"{_fmt(wu.get('min_ratio'), 1)}x the cold one. Over this run: "
        f"{'every' if wu.get('ok') else '**not every**'} Base boot's warm-up took hold "
        f"({wu.get('checks', 0)} checked; median cold {_fmt(wu.get('cold_rate_median'))}, "
        f"warm {_fmt(wu.get('warm_rate_median'))} loops/s, "
        f"ratio {_fmt(wu.get('ratio_median'), 1)}x). Kemari rows are captured at every sync "
        "point from the moment they are protected. See docs/benchmarks.md (the cold-guest "
        "trap).",
        "",
    ]
    L += [
        "## How to read this",
        "",
        "- The lab's two hosts are network namespaces on one machine: the secondary's work "
        "(receiving, decoding and applying pages) and the agents' threads share the same "
        "cores as the primary's vCPU, which two real hosts would not.",
        "- *Paused share (records)* sums the engine's own `pause_ms` (from sending `stop` to "
        "`cont` returning); *stopped share (guest clock)* is 1 - guest time / host time over "
        "the same loops, i.e. how long the guest's clock really stood still.",
        "- *Pause factor* = Kemari host time / Kemari guest time; *guest-internal ratio* = "
        "Kemari guest time / Base guest time; the host ratio is about their product.",
        "- The published figures come from Xen Kemari, which synchronized at the guest's "
        "outbound I/O events; the lmbench loops do no I/O. Every Kemari row here is "
        "synchronized at least every max_interval_ms whatever the workload does (the rule "
        "of this comparison), so a CPU-bound loop pays every periodic pause: the pause floor "
        "above.",
        *[f"- Dirty-page tracker of the Kemari rows: {t}." for t in _trackers(res)],
        "",
    ]
    notes = res.get("meta", {}).get("notes") or []
    if notes:
        L += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(L)


def render_html(markdown: str, res: dict[str, Any], folder: Path, plots: dict[str, str]) -> str:
    """report.html: the tables of report.md as HTML, the plots embedded (and linked)."""
    body: list[str] = []
    in_table = False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-", ":"} and c for c in cells):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells) + "</tr>")
                continue
            body.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("![") and "](" in line:
            alt = line[2 : line.index("]")]
            name = line[line.index("](") + 2 : -1]
            data = base64.b64encode((folder / name).read_bytes()).decode()
            body.append(
                f'<figure><a href="{html.escape(name)}"><img alt="{html.escape(alt)}" '
                f'src="data:image/png;base64,{data}"></a><figcaption>{html.escape(alt)}</figcaption></figure>'
            )
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("- "):
            body.append(f"<p class=li>&bull; {_inline(line[2:])}</p>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    if in_table:
        body.append("</table>")
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
        "padding:.25em .6em;text-align:right}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}p.li{margin:.2em 0}code{background:#f4f4f4}"
    )
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        "<title>Kemari Suite: lmbench and IOzone comparison</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    # `code` and **bold** only: enough for the report's own markdown.
    parts = out.split("`")
    out = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = out.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


# ---- plots ------------------------------------------------------------------------------


def make_plots(res: dict[str, Any], folder: Path) -> dict[str, str]:
    """Write the PNG plots; returns {plot name: file name} for those with data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = res["scenarios"]
    kemari = [n for n in sc if sc[n]["kind"] == "kemari" and n in res["ratios"]]
    made: dict[str, str] = {}
    if kemari:
        # Two panels: the writers' ratios are several times larger than the lmbench ones.
        fig, axes = plt.subplots(
            1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [len(LMBENCH), len(IOZONE)]}
        )
        width = 0.8 / len(kemari)
        pub = published_ratios("Kemari(10GbE) + DRBD")
        for ax, benches, source in (
            (axes[0], LMBENCH, "ratios"),
            (axes[1], IOZONE, "io_ratios"),
        ):
            centre = [x + (len(kemari) - 1) * width / 2 for x in range(len(benches))]
            for i, n in enumerate(kemari):
                vals = [res[source].get(n, {}).get(b) or math.nan for b in benches]
                ax.bar([x + i * width for x in range(len(benches))], vals, width, label=n)
            if source == "ratios":
                ax.scatter(
                    centre,
                    [pub[b] for b in LMBENCH],
                    marker="_",
                    s=1200,
                    linewidths=2,
                    color="black",
                    zorder=5,
                    label="published Kemari(10GbE)+DRBD",
                )
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_xticks(centre)
            ax.set_xticklabels([LABELS[b] for b in benches])
        axes[0].set_ylabel("Kemari / Base (host-timed)")
        axes[0].set_title("lmbench-style (time per operation)")
        axes[1].set_title("IOzone-style (time per pass)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
        fig.suptitle("Overhead ratio per benchmark and scenario")
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        fig.savefig(folder / "ratios.png", dpi=110)
        plt.close(fig)
        made["ratios"] = "ratios.png"
    pauses = {n: sc[n].get("pauses_ms") or [] for n in kemari}
    if any(pauses.values()):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for n, vals in pauses.items():
            if not vals:
                continue
            s = sorted(vals)
            ax.step(
                s,
                [(i + 1) / len(s) for i in range(len(s))],
                where="post",
                label=f"{n} (n={len(s)})",
            )
        ax.set_xscale("log")
        ax.set_xlabel("pause per sync point [ms] (host clock)")
        ax.set_ylabel("fraction of sync points")
        ax.set_title("Pause-time distribution (CDF) over the timed loops")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "pauses.png", dpi=110)
        plt.close(fig)
        made["pauses"] = "pauses.png"
    have_points = any(
        ((sc[n]["benchmarks"].get(m) or {}).get("sync_points") or {}).get("points")
        for n in kemari
        for m in IOZONE
    )
    if have_points:
        fig, ax = plt.subplots(figsize=(8, 5))
        markers = {"iozone_wbuf": "o", "iozone_osync": "^"}
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, n in enumerate(kemari):
            for m in IOZONE:
                pts = ((sc[n]["benchmarks"].get(m) or {}).get("sync_points") or {}).get(
                    "points"
                ) or []
                if not pts:
                    continue
                ax.scatter(
                    [max(p[0], 0.1) for p in pts],
                    [max(p[1], 0.5) for p in pts],
                    s=12,
                    alpha=0.6,
                    marker=markers[m],
                    color=colors[i % len(colors)],
                    label=f"{n}, {LABELS[m]}",
                )
        for m, (iv, pages) in PUBLISHED_IOZONE.items():
            ax.scatter([iv], [pages], marker="*", s=250, color="black", zorder=5)
            ax.annotate(
                f"published {LABELS[m]}",
                (iv, pages),
                textcoords="offset points",
                xytext=(8, 4),
                fontsize=8,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Room right of the published buffered point (400 ms) for its label.
        ax.set_xlim(right=max(ax.get_xlim()[1], 3000.0))
        ax.set_xlabel("sync interval [ms] (since the previous sync point)")
        ax.set_ylabel("dirtied pages per sync point")
        ax.set_title("IOzone-style writes: dirtied pages against sync interval")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "iozone_dirty.png", dpi=110)
        plt.close(fig)
        made["dirty"] = "iozone_dirty.png"
    return made


def write_report(res: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Write results.json, report.md, report.html and the plots into ``folder``."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    plots = make_plots(res, folder)
    res = res | {"plots": plots}
    md = render_markdown(res, plots)
    paths = {
        "results": folder / "results.json",
        "markdown": folder / "report.md",
        "html": folder / "report.html",
    }
    paths["results"].write_text(json.dumps(res, indent=1, default=str) + "\n")
    paths["markdown"].write_text(md)
    paths["html"].write_text(render_html(md, res, folder, plots))
    for name in plots.values():
        paths[name] = folder / name
    return paths


__all__ = [
    "PUBLISHED_IOZONE",
    "PUBLISHED_US",
    "TARGET_RATIOS",
    "ScenarioRaw",
    "clock_fast_passes",
    "explain_target",
    "io_sync_points",
    "make_plots",
    "pause_interval",
    "paused_within",
    "published_ratios",
    "ratios",
    "render_html",
    "render_markdown",
    "spread",
    "summarize",
    "summarize_scenario",
    "sync_stats",
    "target_check",
    "target_floor",
    "write_report",
]
