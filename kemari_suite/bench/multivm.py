"""``kemari bench multivm``: several protected VMs on one pair against each alone.

Four VMs (``vm1``..``vm4``: three primaries on lab host A, one on B) each run the memory
workload (``memdirty``, compressible pages) and the service workload (``counter`` at
full speed, serving its value over TCP). In one run:

0. all four guests boot and run unprotected (their primaries start with no standby),
   and keep running throughout: every window shares the CPU the same way;
1. **alone**: each VM in turn is the only *protected* VM on the pair: its standby
   starts, it is protected, warmed up, measured for a window, and its standby killed
   (it goes on unprotected);
2. **together**: all four protected at once, warmed up, measured over one window;
3. **host loss**: host A is killed (every agent and QEMU there, by PID); every VM must
   be served again with no acknowledged record lost (:func:`~kemari_suite.lab.pair.
   after_host_loss`).

Per VM: the pause p50 of the sync points in each window (``checkpoints.jsonl``, by
``t_wall``) and its throughput, the counter's increments per host second read over the
LAN at both ends of the window. ``pause_ratio`` = together / alone, ``throughput_ratio``
= alone / together: both must be at most :data:`BOUND`. With more vCPUs than cores the
agents of the other protected VMs still compete for CPU in the together window
(``cores`` and ``vcpus`` are in the result).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite import lab as labmod
from kemari_suite.bench.memsync import header_lines, machine_info
from kemari_suite.config import KemariConfig
from kemari_suite.errors import BenchmarkError, KemariError
from kemari_suite.lab.configs import COUNTER_PORT
from kemari_suite.lab.pair import (
    SEVERAL_HEARTBEAT_TIMEOUT_MS,
    SEVERAL_MEMORY_MIB,
    HostLoss,
    LabPair,
    PairOptions,
    after_host_loss,
    kill_host,
    several_pairs,
)
from kemari_suite.vm.define import ensure_image

LAB_ID = "bmv"
BOUND = 1.2
VMS = 4
MEMORY_MIB = SEVERAL_MEMORY_MIB
WORKLOAD = f"memdirty -m 16 -r 2000 -P compressible & counter -q -p {COUNTER_PORT} 0"
HEARTBEAT_TIMEOUT_MS = SEVERAL_HEARTBEAT_TIMEOUT_MS

Progress = Callable[[str], None]


@dataclass
class Window:
    """One VM over one measurement window."""

    pause_ms_p50: float | None = None
    sync_points: int = 0
    #: Counter increments per host second.
    throughput: float | None = None


@dataclass
class VmFigures:
    name: str
    primary_host: str
    alone: Window = field(default_factory=Window)
    together: Window = field(default_factory=Window)
    pause_ratio: float | None = None
    throughput_ratio: float | None = None
    ok: bool = False


@dataclass
class MultiVmResult:
    vms: list[VmFigures] = field(default_factory=list)
    host_loss: list[HostLoss] = field(default_factory=list)
    bound: float = BOUND
    window_s: float = 0.0
    cores: int = 0
    vcpus: int = 0
    ok: bool = False
    error: str | None = None
    timeline: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(
    cfg: KemariConfig,
    *,
    window_s: float = 10.0,
    warmup_s: float = 5.0,
    profile: str = "1g",
    lab_id: str = LAB_ID,
    progress: Progress | None = None,
) -> MultiVmResult:
    """Run the benchmark (see the module docstring); never prints.

    Raises:
        KemariError: a step failed (lab, image, agents); the lab is torn down first.
    """
    say = progress or (lambda _m: None)
    res = MultiVmResult(window_s=window_s, cores=os.cpu_count() or 0, vcpus=VMS)
    t0 = time.monotonic()

    def mark(step: str) -> None:
        res.timeline.append({"t": round(time.monotonic() - t0, 3), "step": step})
        say(step)

    names = [f"vm{i}" for i in range(1, VMS + 1)]
    ensure_image(cfg, progress=lambda m: say(f"image: {m}"))
    lay = labmod.fresh(lab_id, profile, say=mark)
    r = cfg.replication
    template = PairOptions(
        memory_mib=MEMORY_MIB,
        workload=WORKLOAD,
        heartbeat_interval_ms=r.heartbeat_interval_ms,
        heartbeat_timeout_ms=max(r.heartbeat_timeout_ms, HEARTBEAT_TIMEOUT_MS),
        max_interval_ms=r.max_interval_ms,
        tapped_net=True,
    )
    pairs: list[LabPair] = []
    try:
        pairs = several_pairs(lay, cfg, template, names, on_b=1)
        res.vms = [
            VmFigures(name=p.opts.vm_name, primary_host=p.opts.host_of("primary")) for p in pairs
        ]
        pairs[0].start_witness()
        # Every guest runs from the start, unprotected (no standby yet): the CPU is
        # shared the same way in every window, so the ratios measure protection.
        for p in pairs:
            p.start_primary()
        for p in pairs:
            p.wait_state("primary", {"unprotected"}, 600)
            p.wait_counter(120)
        mark(f"{VMS} guests running unprotected")
        for p, figures in zip(pairs, res.vms, strict=True):
            mark(f"alone: {p.opts.vm_name} protected, the others not")
            _protect([p], warmup_s)
            figures.alone = _measure([p], window_s)[0]
            mark(f"alone: {p.opts.vm_name} {_describe(figures.alone)}")
            p.kill("secondary")
            p.wait_state("primary", {"unprotected"}, 120)
        mark(f"together: {VMS} VMs protected")
        _protect(pairs, warmup_s)
        for figures, w in zip(res.vms, _measure(pairs, window_s), strict=True):
            figures.together = w
            judge(figures)
            mark(f"together: {figures.name} {_describe(w)}")
        seen: dict[str, int] = {}
        for p in pairs:
            with contextlib.suppress(KemariError):
                seen[p.opts.vm_name] = p.read_counter()
        mark("host A lost: kill -9 of every agent and QEMU there")
        kill_host(pairs, "primary")
        for p in pairs:
            res.host_loss.append(after_host_loss(p, seen.get(p.opts.vm_name), "primary"))
            v = res.host_loss[-1]
            mark(f"{v.name}: {v.outcome}, resumed {v.resumed}, lost {v.records_lost}")
        res.ok = all(f.ok for f in res.vms) and all(v.resumed for v in res.host_loss)
    except KemariError as err:
        res.error = str(err)
        raise
    finally:
        for p in pairs:
            p.stop()
        labmod.down(lab_id)
    return res


def _protect(pairs: list[LabPair], warmup_s: float) -> None:
    """Start the standbys of ``pairs`` (their primaries run, unprotected, and connect
    again every second), wait until every VM is protected and serves its counter, then
    ``warmup_s``."""
    for p in pairs:
        p.start_secondary()
    for p in pairs:
        p.wait_state("primary", {"protected"}, 600)
        p.wait_counter(120)
    time.sleep(warmup_s)


def _measure(pairs: list[LabPair], seconds: float) -> list[Window]:
    """Every VM of ``pairs`` over one window of ``seconds`` (all at once).

    Raises:
        BenchmarkError: a counter did not answer at either end of the window.
    """
    t_wall0 = time.time()
    start = [_timed_counter(p) for p in pairs]
    time.sleep(seconds)
    end = [_timed_counter(p) for p in pairs]
    t_wall1 = time.time()
    out = []
    for p, (v0, m0), (v1, m1) in zip(pairs, start, end, strict=True):
        pauses = [
            float(rec["pause_ms"])
            for rec in p.artifact_records("primary", "checkpoints.jsonl")
            if isinstance(rec.get("t_wall"), int | float)
            and t_wall0 <= rec["t_wall"] <= t_wall1
            and isinstance(rec.get("pause_ms"), int | float)
        ]
        out.append(
            Window(
                pause_ms_p50=statistics.median(pauses) if pauses else None,
                sync_points=len(pauses),
                throughput=(v1 - v0) / (m1 - m0) if m1 > m0 else None,
            )
        )
    return out


def _timed_counter(pair: LabPair) -> tuple[int, float]:
    """The counter and the host's monotonic clock halfway through reading it."""
    t = time.monotonic()
    try:
        value = pair.wait_counter(30)
    except KemariError as err:
        raise BenchmarkError("multivm", f"{pair.opts.vm_name}: {err}") from err
    return value, (t + time.monotonic()) / 2


def judge(f: VmFigures) -> None:
    """Set ``f``'s ratios and verdict from its two windows (both ratios <= BOUND)."""
    a, t = f.alone, f.together
    if a.pause_ms_p50 and t.pause_ms_p50 is not None:
        f.pause_ratio = round(t.pause_ms_p50 / a.pause_ms_p50, 3)
    if a.throughput is not None and t.throughput:
        f.throughput_ratio = round(a.throughput / t.throughput, 3)
    f.ok = (
        f.pause_ratio is not None
        and f.throughput_ratio is not None
        and f.pause_ratio <= BOUND
        and f.throughput_ratio <= BOUND
    )


def _describe(w: Window) -> str:
    p50 = "-" if w.pause_ms_p50 is None else f"{w.pause_ms_p50:.1f} ms"
    rate = "-" if w.throughput is None else f"{w.throughput:,.0f}/s"
    return f"pause p50 {p50} over {w.sync_points} sync points, throughput {rate}"


def write_report(res: MultiVmResult, folder: Path, command: str) -> Path:
    """``multivm.json`` (the result, the command and the machine) and ``multivm.md`` in
    ``folder``; returns the markdown's path."""
    folder.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    data = {"command": command, "machine": machine, **res.to_dict()}
    (folder / "multivm.json").write_text(json.dumps(data, indent=1))

    def f(v: float | None, spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    lines = [
        *header_lines(
            f"{len(res.vms)} VMs protected on one host pair, against each alone",
            command,
            machine,
            f". {res.vcpus} guests of {MEMORY_MIB} MiB under TCG on {res.cores} cores, each "
            f"running `{WORKLOAD}`; windows of {res.window_s:g} s, all in one run.",
        ),
        "",
        "| vm | primary on | pause p50 ms alone | together | pause ratio | sync points "
        "alone / together | throughput alone /s | together /s | throughput ratio | "
        f"within {res.bound}x |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in res.vms:
        a, t = v.alone, v.together
        lines.append(
            f"| {v.name} | {v.primary_host} | {f(a.pause_ms_p50)} | {f(t.pause_ms_p50)} "
            f"| {f(v.pause_ratio, '.2f')} | {a.sync_points} / {t.sync_points} "
            f"| {f(a.throughput, ',.0f')} | {f(t.throughput, ',.0f')} "
            f"| {f(v.throughput_ratio, '.2f')} | {'yes' if v.ok else 'no'} |"
        )
    lines += [
        "",
        "Pause ratio = together / alone; throughput ratio = alone / together (the counter's "
        f"increments per host second, read over the LAN). Both must be at most {res.bound}. "
        f"The machine has {res.cores} cores for {res.vcpus} guest vCPUs and their agents: "
        "a VM protected alone still shares the CPU with the other guests, which run "
        "unprotected, but not with their agents.",
        "",
        "## Loss of host A (every agent and QEMU there killed)",
        "",
        "| vm | primary was on | outcome | served again | records lost |",
        "|---|---|---|---|---|",
    ]
    for h in res.host_loss:
        lines.append(
            f"| {h.name} | {h.primary_host} | {h.outcome} | {'yes' if h.resumed else 'no'} "
            f"| {'-' if h.records_lost is None else h.records_lost} |"
        )
    met = sum(1 for v in res.vms if v.ok)
    survived = all(h.resumed for h in res.host_loss) and bool(res.host_loss)
    lines += [
        "",
        f"Verdict: {met} of {len(res.vms)} VMs within {res.bound}x of themselves alone; "
        + (
            "every VM served again after the host loss."
            if survived
            else "NOT every VM was served again after the host loss."
        )
        + (f" Error: {res.error}" if res.error else ""),
    ]
    out = folder / "multivm.md"
    out.write_text("\n".join(lines) + "\n")
    return out
