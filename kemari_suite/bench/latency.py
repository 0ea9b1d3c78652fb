"""Added latency per request/response for a small TCP service: Kemari vs Remus policy.

A client in the lab's client namespace asks the guest's ``counter`` service for its
value (connect, one reply, close) many times, timed on the host clock, in four runs of
one session: Base (the guest unprotected, its NIC on a plain TAP), the ``output``
policy (the product's default: a sync point at each frame the guest sends, frames
sent while one is in flight grouped into the next), the ``kemari`` policy (the seed's
rule: a sync point at each outbound I/O event, disk included) and the ``remus`` policy
(fixed 25 ms epochs, Remus's 40 checkpoints per second). Output commit holds every reply until its
epoch is acknowledged, so the added latency is what protection costs a client.

Base gets the device-state warm-up a protected guest gets (:mod:`kemari_suite.bench.warmup`),
checked with ``ktouch`` before the service starts; all three runs boot one image.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite import lab as labmod
from kemari_suite.bench import warmup as wu
from kemari_suite.bench.memsync import header_lines, machine_info, pct
from kemari_suite.bench.touchprobe import BenchImage, bench_image
from kemari_suite.config import KemariConfig
from kemari_suite.errors import BenchmarkError, KemariError
from kemari_suite.lab.netclient import tcp_request
from kemari_suite.lab.pair import COUNTER_PORT, LabPair, PairOptions
from kemari_suite.vm.image import kernel_cmdline
from kemari_suite.vm.qemu import AsyncVM, VMSpec, choose_accel, wait_for_console

WORKLOAD = f"counter -q -p {COUNTER_PORT} 100"
#: The protected runs, in order; Remus last (the others are set against it).
POLICIES = ("output", "kemari", "remus")


@dataclass
class Run:
    name: str
    requests: int = 0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    added_p50_ms: float | None = None
    samples_ms: list[float] = field(default_factory=list)
    #: The dirty-page tracker the primary ran, and why (protected runs).
    tracker: str = ""


def _measure(lay: labmod.LabLayout, n: int, warmup: int) -> list[float]:
    out: list[float] = []
    for i in range(n + warmup):
        t0 = time.perf_counter()
        try:
            tcp_request(lay.ns_client, lay.guest_ip, COUNTER_PORT, timeout=5)
        except KemariError as err:
            raise BenchmarkError("latency", f"request {i} failed: {err}") from err
        if i >= warmup:
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def _wait_service(lay: labmod.LabLayout, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            tcp_request(lay.ns_client, lay.guest_ip, COUNTER_PORT, timeout=2)
            return
        except KemariError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


async def _base(
    cfg: KemariConfig, bench: BenchImage, lay: labmod.LabLayout, n: int, warmup: int
) -> tuple[list[float], wu.WarmupCheck]:
    accel, _ = choose_accel(cfg.vm.accel)
    params = wu.DEFAULT
    # ktouch first (the warm-up's probe), then the service once it has exited.
    command = params.then(WORKLOAD) if bench.has_probe else WORKLOAD
    spec = VMSpec(
        name="latbase",
        kernel=bench.image.kernel,
        initrd=bench.image.initrd,
        append=kernel_cmdline(ip=f"{lay.guest_ip}/{lay.lan_prefix}", run=command),
        accel=accel,
        netdev=f"tap,ifname={lay.tap_primary},script=no,downscript=no",
        netns=lay.ns_primary,
    )
    vm = AsyncVM(
        spec,
        run_root=cfg.paths.run_dir / f"kemari-{lay.lab_id}-lat",
        shm_dir=cfg.paths.shm_dir / f"kemari-{lay.lab_id}-lat",
    )
    await vm.start()
    try:
        await asyncio.to_thread(wait_for_console, vm.paths.console, "KEMARI-BOOTED", 120)
        if bench.has_probe:
            check = await wu.warm_up(vm, params, accel=accel)
        else:
            captures, took = await wu.capture_for(vm, params.capture_s, params.interval_s)
            check = wu.WarmupCheck(
                accel, params.min_ratio, captures=captures, capture_s=took, error=bench.note
            )
        await asyncio.to_thread(_wait_service, lay, 60 + params.probe_s)
        await asyncio.sleep(5)  # let the guest's clocksource settle
        return await asyncio.to_thread(_measure, lay, n, warmup), check
    finally:
        await vm.shutdown()


def _protected(cfg: KemariConfig, lay: labmod.LabLayout, policy: str, n: int, warmup: int) -> Run:
    pair = LabPair(lay, cfg, PairOptions(workload=WORKLOAD, tapped_net=True, policy=policy))
    try:
        pair.start()
        st = pair.wait_state("primary", {"protected"}, 240)
        _wait_service(lay, 60)
        time.sleep(5)
        run = Run(policy, samples_ms=_measure(lay, n, warmup))
        run.tracker = f"{st.get('tracker')}: {st.get('tracker_reason')}"
        return run
    finally:
        pair.stop()


def run(
    cfg: KemariConfig,
    *,
    requests: int = 200,
    warmup: int = 20,
    profile: str = "10g",
    lab_id: str = "lt",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure Base, kemari and remus request/response latency; see the module doc."""
    say = progress or (lambda _m: None)
    runs: list[Run] = []
    bench = bench_image(cfg)
    # The agents boot the very image Base booted.
    agent_cfg = bench.config_for_agents(cfg)

    def fresh() -> labmod.LabLayout:
        # A new lab per run: a TAP reopened by another process needs its bridge port to
        # relearn, and the client's neighbour cache would hold the old guest's state.
        labmod.down(lab_id)
        return labmod.up(lab_id, profile)

    try:
        say("base: unprotected guest, plain TAP, device-state warm-up first")
        samples, check = asyncio.run(_base(cfg, bench, fresh(), requests, warmup))
        say(f"base: warm-up {check.describe()}")
        runs.append(Run("base", samples_ms=samples))
        for policy in POLICIES:
            say(f"{policy} policy, output committed")
            lay = fresh()
            runs.append(_protected(agent_cfg, lay, policy, requests, warmup))
    finally:
        labmod.down(lab_id)
    base_p50 = pct(runs[0].samples_ms, 50)
    for r in runs:
        r.requests = len(r.samples_ms)
        r.p50_ms = pct(r.samples_ms, 50)
        r.p90_ms = pct(r.samples_ms, 90)
        r.p99_ms = pct(r.samples_ms, 99)
        if r.p50_ms is not None and base_p50 is not None:
            r.added_p50_ms = r.p50_ms - base_p50
    return {
        "profile": profile,
        "remus_interval_ms": cfg.tap.remus_interval_ms,
        "runs": [asdict(r) | {"samples_ms": None} for r in runs],
        "base_warmup": check.to_dict(),
        **verdicts(runs),
    }


def verdicts(runs: list[Run]) -> dict[str, bool]:
    """``<policy>_adds_less_than_remus`` for every protected run but Remus's: its added
    p50 latency is below Remus's."""
    by = {r.name: r for r in runs}
    remus = by.get("remus")
    out: dict[str, bool] = {}
    for r in runs:
        if r.name in ("base", "remus"):
            continue
        out[f"{r.name}_adds_less_than_remus"] = (
            remus is not None
            and r.added_p50_ms is not None
            and remus.added_p50_ms is not None
            and r.added_p50_ms < remus.added_p50_ms
        )
    return out


def write_results(res: dict[str, Any], folder: Path, command: str) -> Path:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    (folder / "latency.json").write_text(
        json.dumps({"command": command, "machine": machine, **res}, indent=1)
    )
    lines = [
        *header_lines(
            "Added request/response latency: Kemari vs Remus policy",
            command,
            machine,
            f". Link profile {res['profile']}; Remus epochs {res['remus_interval_ms']} ms.",
        ),
        "",
        "| run | requests | p50 ms | p90 ms | p99 ms | added p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        added = "-" if r["added_p50_ms"] is None else f"{r['added_p50_ms']:.2f}"
        lines.append(
            f"| {r['name']} | {r['requests']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {added} |"
        )
    for key, ok in sorted(res.items()):
        if key.endswith("_adds_less_than_remus"):
            policy = key.removesuffix("_adds_less_than_remus")
            lines += [
                "",
                f"The {policy} policy adds less latency than Remus with "
                f"{res['remus_interval_ms']} ms epochs: {'met' if ok else 'NOT met'}.",
            ]
    trackers = dict.fromkeys(r.get("tracker") for r in res["runs"] if r.get("tracker"))
    lines += ["", *(f"Dirty-page tracker of the protected runs: {t}." for t in trackers)]
    bw = res.get("base_warmup") or {}
    lines += ["", f"Base warm-up (device-state captures first): {wu.describe(bw) if bw else '-'}."]
    loud = wu.alarm(wu.summarize([bw] if bw else []))
    if loud:
        lines += ["", f"**{loud}**"]
    md = folder / "latency.md"
    md.write_text("\n".join(lines) + "\n")
    return md
