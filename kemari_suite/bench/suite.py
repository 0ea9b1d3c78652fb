"""The benchmark suite: lmbench- and IOzone-style workloads, Base against Kemari.

For every scenario (``benchmarks/scenarios/*.toml``) the same guest boots with the same
init command, ``kbench`` (``guest/workloads/kbench.c``), which warms up and then runs
rounds of every benchmark until the VM is stopped. The first Base boot calibrates each
loop to about ``loop_s`` seconds of guest time; every later boot gets those iteration
counts. The host tails the console (:mod:`kemari_suite.bench.markers`) and times each
loop from its START and END lines on the host's clock.

- **Base** boots the guest alone (no agents, no taps) in the lab's primary namespace, its
  disk a plain raw file. It is warmed as the protected rows are, with device-state
  captures (:mod:`kemari_suite.bench.warmup`): its init runs ``ktouch`` first, the host
  measures ktouch's rate cold, captures device state for a few seconds, measures it
  warm, and the run records whether the warm-up took hold; then ``kbench`` runs.
- **Kemari** rows start the witness, secondary and primary agents in a lab whose
  replication link is shaped to the scenario's profile (:class:`LabPair`), with the
  guest NIC behind the output-commit proxy and the scenario's disk backend; rounds count
  only once the primary is protected.

The scenarios run in ``passes`` passes (:func:`schedule`: Base first, the Kemari rows in
alternating order, one more Base run at the end). In every boot the first round is a
warm-up and is dropped (TCG translates code the first time it runs); then ``rounds``
rounds are kept. A boot whose guest kernel calibrated its TSC far from the host's
frequency is booted again (:class:`GuestClockSkew`). Per Kemari row, the primary's
checkpoint records give the sync points per second, the paused share, the pause
distribution, and for the IOzone loops the sync interval and dirtied pages per sync point.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kemari_suite import lab as labmod
from kemari_suite.bench import report, warmup
from kemari_suite.bench.markers import Assembly, ConsoleTail, assemble
from kemari_suite.bench.memsync import machine_info
from kemari_suite.bench.scenarios import (
    FULL,
    QUICK,
    SCENARIO_DIR,
    Scenario,
    SuiteParams,
    load_scenarios,
    select,
)
from kemari_suite.bench.touchprobe import BenchImage, bench_image
from kemari_suite.config import KemariConfig
from kemari_suite.errors import BenchmarkError, KemariError
from kemari_suite.lab.pair import LabPair, PairOptions
from kemari_suite.vm.image import kernel_cmdline
from kemari_suite.vm.qemu import VM, VMSpec, choose_accel, console_tail

#: Rounds before this one are warm-up and never kept.
FIRST_KEPT_ROUND = 2
#: A guest whose kernel calibrated its TSC this far from the host's frequency keeps a
#: clock that runs fast or slow (and fires its timers too often or too rarely).
MAX_TSC_SKEW = 0.10
#: Boots of one scenario pass, when the guest's TSC calibration went wrong.
BOOT_ATTEMPTS = 3


class GuestClockSkew(BenchmarkError):
    """The guest kernel calibrated its TSC far from the host's frequency at boot.

    Seen here on a guest booted under protection: sync-point pauses during the kernel's
    TSC calibration gave 658 MHz on a 2594 MHz host, and the guest's clock ran four
    times too fast. The host-timed figures would still be right, but the guest's timers
    fire at the wrong rate, so the suite boots that pass again.
    """

    def __init__(self, scenario: str, guest_mhz: float, host_mhz: float) -> None:
        super().__init__(
            scenario,
            f"guest TSC calibrated at {guest_mhz:.0f} MHz on a {host_mhz:.0f} MHz host",
        )
        self.guest_mhz = guest_mhz
        self.host_mhz = host_mhz


def host_mhz() -> float | None:
    """The host's CPU (TSC) frequency from /proc/cpuinfo, or None."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                with contextlib.suppress(ValueError):
                    return float(line.split(":", 1)[1])
    return None


def tsc_skewed(ready_fields: tuple[str, ...], host: float | None) -> float | None:
    """The guest's calibrated MHz from its KB-READY fields if it is more than
    :data:`MAX_TSC_SKEW` away from ``host``; None when it is fine or unknown."""
    for f in ready_fields:
        if f.startswith("cpu_mhz="):
            try:
                guest = float(f.split("=", 1)[1])
            except ValueError:
                return None
            if host and abs(guest - host) / host > MAX_TSC_SKEW:
                return guest
    return None


@dataclass(frozen=True)
class SuiteProgress:
    """Where the suite is: ``done`` of ``total`` units, and what it does now."""

    message: str
    done: float
    total: float


Progress = Callable[[SuiteProgress], None]


# ---- host CPU accounting ------------------------------------------------------------------


def _proc_cpu_s(pid: int, tick: float) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    f = stat.rsplit(")", 1)[1].split()
    # Fields 14-17 (utime stime cutime cstime), counted from 1 with pid and comm first.
    return sum(int(x) for x in f[11:15]) * tick


def _tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


@dataclass(frozen=True)
class CpuSample:
    t: float
    busy_s: float
    mine_s: float


def cpu_sample() -> CpuSample:
    """The host's busy CPU seconds, and those of this process and its descendants."""
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    busy = (sum(vals[:8]) - idle) * tick
    mine = sum(_proc_cpu_s(p, tick) for p in _tree_pids(os.getpid()))
    return CpuSample(time.monotonic(), busy, mine)


def other_share(a: CpuSample, b: CpuSample, cpus: int) -> float | None:
    """CPU share of the machine used by processes outside this run between two samples."""
    dt = b.t - a.t
    if dt <= 0 or cpus <= 0:
        return None
    return max(0.0, ((b.busy_s - a.busy_s) - (b.mine_s - a.mine_s)) / (dt * cpus))


def _loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


# ---- one scenario -------------------------------------------------------------------------


class _Pass:
    """Runs one pass of one scenario and fills a :class:`report.ScenarioRaw` with it."""

    def __init__(
        self,
        cfg: KemariConfig,
        image: BenchImage,
        params: SuiteParams,
        sc: Scenario,
        *,
        pass_no: int,
        attempt: int = 1,
        iters: dict[str, int] | None,
        lab_id: str,
        raw_dir: Path,
        say: Callable[[str, float], None],
    ) -> None:
        self.cfg = cfg
        self.image = image
        self.params = params
        self.sc = sc
        self.pass_no = pass_no
        self.command = params.guest_command(iters)
        self.warm = warmup.DEFAULT
        self.lab_id = lab_id
        self.raw_dir = raw_dir
        self.say = say
        self.raw = report.ScenarioRaw(scenario=sc, guest_commands=[self.command])
        self.samples: list[CpuSample] = []
        self.load0 = _loadavg()
        self.tag = f"{sc.name}.pass{pass_no}" + (f".boot{attempt}" if attempt > 1 else "")
        self.host_mhz = host_mhz()
        #: Whether the console tail got real-time scheduling (None: never started).
        self.tail_realtime: bool | None = None

    def run(self) -> report.ScenarioRaw:
        t0 = time.monotonic()
        if self.lab_id in labmod.list_labs():
            labmod.down(self.lab_id)
        lay = labmod.up(self.lab_id, self.sc.profile)
        try:
            if self.sc.protected:
                self._kemari(lay, t0)
            else:
                self._base(lay, t0)
        finally:
            labmod.down(self.lab_id)
            self.raw.elapsed_s = time.monotonic() - t0
        return self.raw

    # ---- waiting for rounds ---------------------------------------------------------------

    def _collect(self, tail: ConsoleTail, after: float, alive: Callable[[], None]) -> Assembly:
        """Wait until ``rounds`` complete rounds began after host time ``after``.

        Raises:
            BenchmarkError: the guest reported a failure, stopped, or ran out of time.
        """
        p = self.params
        deadline = time.monotonic() + p.scenario_timeout_s
        # Two samples only (walking /proc in between would hold the GIL while the tail
        # thread stamps markers): the window is the whole measured part of the pass.
        self.samples.append(cpu_sample())
        seen = -1
        while True:
            if tail.error is not None:
                raise BenchmarkError(self.sc.name, f"console tail failed: {tail.error}")
            asm = assemble(tail.markers())
            if asm.ready is not None:
                skew = tsc_skewed(asm.ready.fields, self.host_mhz)
                if skew is not None and self.host_mhz is not None:
                    raise GuestClockSkew(self.sc.name, skew, self.host_mhz)
            kept = [r for r in asm.accepted_rounds(after, p.benchmarks) if r >= FIRST_KEPT_ROUND]
            if len(kept) != seen:
                seen = len(kept)
                self.say(f"round {min(seen + 1, p.rounds)}/{p.rounds}", 1 + seen)
            if len(kept) >= p.rounds:
                self.samples.append(cpu_sample())
                asm.loops = [
                    replace(lp, pass_no=self.pass_no) for lp in asm.loops_of(kept[: p.rounds])
                ]
                return asm
            if asm.failures:
                raise BenchmarkError(self.sc.name, f"guest benchmark failed: {asm.failures}")
            if asm.done:
                raise BenchmarkError(self.sc.name, "the guest stopped running benchmarks")
            alive()
            if time.monotonic() > deadline:
                raise BenchmarkError(
                    self.sc.name,
                    f"only {len(kept)} of {p.rounds} rounds in {p.scenario_timeout_s:.0f} s",
                )
            time.sleep(0.25)

    def _finish(self, asm: Assembly) -> None:
        r = self.raw
        r.loops = asm.loops
        r.calibration = asm.calibration
        r.skipped = asm.skipped
        r.failures = asm.failures
        if asm.loops and len(self.samples) >= 2:
            share = other_share(self.samples[0], self.samples[-1], os.cpu_count() or 1)
            if share is not None:
                r.other_cpu_share.append(share)
        r.loadavg.append((self.load0, _loadavg()))
        if asm.ready is not None:
            r.guest_ready.append(f"pass {self.pass_no}: " + " ".join(asm.ready.fields))

    # ---- Base -----------------------------------------------------------------------------

    def _base(self, lay: labmod.LabLayout, t0: float) -> None:
        cfg, p = self.cfg, self.params
        run_root = cfg.paths.run_dir / f"kemari-{self.lab_id}-base"
        shm = cfg.paths.shm_dir / f"kemari-{self.lab_id}-base"
        shutil.rmtree(run_root, ignore_errors=True)
        run_root.mkdir(parents=True, exist_ok=True)
        disk = run_root / "disk.img"
        with disk.open("wb") as f:
            f.truncate(p.disk_mib << 20)
        accel, _ = choose_accel(cfg.vm.accel)
        # ktouch first (the warm-up's probe), then kbench once it has exited.
        command = self.warm.then(self.command) if self.image.has_probe else self.command
        self.raw.guest_commands = [command]
        spec = VMSpec(
            name="kbench",
            kernel=self.image.image.kernel,
            initrd=self.image.image.initrd,
            append=kernel_cmdline(ip=f"{lay.guest_ip}/{lay.lan_prefix}", run=command),
            memory_mib=cfg.vm.memory_mib,
            vcpus=1,
            accel=accel,
            netdev=f"tap,ifname={lay.tap_primary},script=no,downscript=no",
            netns=lay.ns_primary,
            blockdev=f"driver=file,filename={disk}",
        )
        vm = VM(spec, run_root=run_root, shm_dir=shm)
        tail = ConsoleTail(vm.paths.console).start()
        try:
            self.say("booting", 0)
            vm.start()
            self.raw.ready_after_s.append(time.monotonic() - t0)
            self.say("warm-up: device-state captures", 0)
            check = vm.call(self._warm_up(vm, accel))
            self.raw.warmup.append(check.to_dict())
            self.say(f"warm-up {check.describe()}", 0)
            after = time.monotonic()
            self.say("warming up", 1)

            def alive() -> None:
                if not vm.alive():
                    raise BenchmarkError(
                        self.sc.name, f"QEMU exited:\n{console_tail(vm.paths.console)}"
                    )

            asm = self._collect(tail, after, alive)
            self._finish(asm)
        finally:
            tail.stop()
            self.tail_realtime = tail.realtime
            self._save(vm.paths.console, None)
            vm.shutdown()
            shutil.rmtree(run_root, ignore_errors=True)
            shutil.rmtree(shm, ignore_errors=True)

    async def _warm_up(self, vm: VM, accel: str) -> warmup.WarmupCheck:
        """The device-state warm-up of the Base guest, checked with ktouch when the image
        has it (else only the captures, and the check says it measured nothing)."""
        if self.image.has_probe:
            return await warmup.warm_up(vm.avm, self.warm, accel=accel)
        w = self.warm
        try:
            n, took = await warmup.capture_for(vm.avm, w.capture_s, w.interval_s)
        except KemariError as err:
            return warmup.WarmupCheck(accel, w.min_ratio, error=str(err))
        return warmup.WarmupCheck(
            accel, w.min_ratio, captures=n, capture_s=took, error=self.image.note
        )

    # ---- Kemari ---------------------------------------------------------------------------

    def _kemari(self, lay: labmod.LabLayout, t0: float) -> None:
        cfg, p, sc = self.cfg, self.params, self.sc
        opts = PairOptions(
            vm_name="guest",
            memory_mib=cfg.vm.memory_mib,
            vcpus=1,
            workload=self.command,
            mode=cfg.replication.mode,
            max_interval_ms=sc.max_interval_ms,
            heartbeat_interval_ms=cfg.replication.heartbeat_interval_ms,
            heartbeat_timeout_ms=cfg.replication.heartbeat_timeout_ms,
            tiebreaker=sc.tiebreaker,
            tracker=cfg.replication.tracker,
            compression=cfg.replication.compression,
            pipelining=cfg.replication.pipelining,
            disk=sc.disk,
            disk_mib=p.disk_mib,
            # A tapped disk requires every output tapped: the NIC goes behind the proxy.
            tapped_net=True,
            policy=sc.policy,
            remus_interval_ms=sc.remus_interval_ms,
        )
        # Files of an earlier run in this lab (console, artifacts, disks) must not mix in.
        root = cfg.paths.run_dir / f"kemari-{self.lab_id}-pair"
        shutil.rmtree(root, ignore_errors=True)
        for role in ("primary", "secondary", "witness"):
            shutil.rmtree(
                cfg.paths.run_dir / f"kemari-{self.lab_id}-{role[:3]}", ignore_errors=True
            )
        # The agents boot the very image Base booted.
        pair = LabPair(lay, self.image.config_for_agents(cfg), opts)
        tail = ConsoleTail(pair.console_path("primary")).start()
        try:
            self.say("starting the agents", 0)
            pair.start()
            pair.wait_state("primary", {"protected"}, 240)
            self.raw.ready_after_s.append(time.monotonic() - t0)
            protected_at = time.monotonic()
            self.say("protected; warming up", 1)

            def alive() -> None:
                for role in ("primary", "secondary"):
                    if not pair.alive(role):
                        raise BenchmarkError(
                            sc.name, f"the {role} agent exited:\n{pair.output(role)[-2000:]}"
                        )

            asm = self._collect(tail, protected_at + p.settle_s, alive)
            st = pair.status("primary")
            if st.get("state") != "protected":
                raise BenchmarkError(sc.name, f"primary left protection: {st.get('state')}")
            self.raw.tracker = f"{st.get('tracker')}: {st.get('tracker_reason')}"
            first_wall = min(lp.wall_start for lp in asm.loops)
            if float(st.get("since", 0.0)) > first_wall:
                raise BenchmarkError(
                    sc.name, "primary re-entered protection during the measurement"
                )
            self.raw.checkpoints = _read_checkpoints(pair.run_dir("primary"))
            self._finish(asm)
        except KemariError:
            self._save_failure(pair)
            raise
        finally:
            tail.stop()
            self.tail_realtime = tail.realtime
            self._save(pair.console_path("primary"), pair.run_dir("primary"))
            pair.stop()
            shutil.rmtree(root, ignore_errors=True)
            for role in ("primary", "secondary", "witness"):
                shutil.rmtree(pair.run_dir(role), ignore_errors=True)

    def _save_failure(self, pair: LabPair) -> None:
        """The agents' output and logs, and QEMU's stderr, of a pass that failed."""
        parts = []
        for role in ("primary", "secondary", "witness"):
            parts.append(f"==== {role}: output\n{pair.output(role)[-20000:]}\n")
            logs = sorted(pair.run_dir(role).glob("artifacts/*/agent.log"))
            logs += sorted(pair.run_dir(role).glob("*/qemu.stderr"))
            for log in logs:
                with contextlib.suppress(OSError):
                    text = log.read_text(errors="replace")[-20000:]
                    parts.append(f"==== {role}: {log.name}\n{text}\n")
        with contextlib.suppress(OSError):
            (self.raw_dir / f"{self.tag}.agents.txt").write_text("".join(parts))

    def _save(self, console: Path, primary_run_dir: Path | None) -> None:
        """Keep the raw evidence: the guest console and the checkpoint records."""
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copyfile(console, self.raw_dir / f"{self.tag}.console.log")
        if primary_run_dir is not None:
            rows = _read_checkpoints(primary_run_dir)
            with gzip.open(self.raw_dir / f"{self.tag}.checkpoints.jsonl.gz", "wt") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)


def _read_checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for f in sorted((run_dir / "artifacts").glob("*/checkpoints.jsonl")):
        for line in f.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


# ---- the suite ----------------------------------------------------------------------------


def pass_order(chosen: list[Scenario], pass_no: int) -> list[Scenario]:
    """Base first, then the Kemari rows: in report order in odd passes, reversed in even
    ones, so that a drift of the host's load over the run does not favour one row."""
    base = [s for s in chosen if not s.protected]
    kemari = sorted((s for s in chosen if s.protected), key=lambda s: (s.order, s.name))
    return base + (kemari if pass_no % 2 else kemari[::-1])


def schedule(chosen: list[Scenario], passes: int) -> list[tuple[int, Scenario]]:
    """(pass, scenario) in running order: :func:`pass_order` for each pass, then one more
    Base run at the end, so that Base brackets the Kemari rows (it is every ratio's
    denominator, and a burst of other load on the host during one Base run would
    otherwise skew every row)."""
    plan = [(k, sc) for k in range(1, passes + 1) for sc in pass_order(chosen, k)]
    if any(sc.protected for sc in chosen):
        plan += [(passes + 1, sc) for sc in chosen if not sc.protected]
    return plan


def run_suite(
    cfg: KemariConfig,
    *,
    quick: bool,
    scenarios: list[str] | None,
    out_dir: Path,
    progress: Progress | None = None,
    lab_id: str = "bs",
    scenario_dir: Path | None = None,
    params: SuiteParams | None = None,
    command: str | None = None,
    rows: list[Scenario] | None = None,
) -> dict[str, Any]:
    """Run the scenarios (``rows`` instead of the scenario files: a sweep), write
    results.json, report.md, report.html and the plots into ``out_dir``, and return the
    results tree (its ``ratios`` maps each Kemari scenario to its ratio to Base per
    lmbench benchmark).

    Every pass runs Base, then each Kemari row (see :func:`pass_order`). The first Base
    boot calibrates the loops; every later boot gets the same iteration counts. A Kemari
    pass that fails is recorded in the row's failures; a row with no measurement at all
    is left out of ``ratios`` and the report says why.

    Raises:
        ConfigError: the scenario files are invalid or a named scenario is unknown.
        BenchmarkError: the first Base pass failed (nothing to compare with).
        KemariError: the guest image or a lab could not be set up.
    """
    t_suite = time.monotonic()
    p = params or (QUICK if quick else FULL)
    chosen = rows or select(load_scenarios(scenario_dir or SCENARIO_DIR), scenarios)
    per = p.rounds + 1
    total = float(len(schedule(chosen, p.passes)) * per)
    emit: Progress = progress or (lambda _p: None)

    emit(SuiteProgress("guest image", 0, total))
    image = bench_image(cfg)
    # Children inherit the nice value of the thread that starts them (this one).
    old_nice = os.getpriority(os.PRIO_PROCESS, 0)
    with contextlib.suppress(OSError):
        if p.nice < old_nice:
            os.setpriority(os.PRIO_PROCESS, 0, p.nice)
    # The console tail thread must get the GIL quickly when a marker arrives.
    old_switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        return _run_passes(cfg, p, chosen, image, out_dir, emit, t_suite, lab_id, quick, command)
    finally:
        sys.setswitchinterval(old_switch)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, old_nice)


def _run_passes(
    cfg: KemariConfig,
    p: SuiteParams,
    chosen: list[Scenario],
    image: BenchImage,
    out_dir: Path,
    emit: Progress,
    t_suite: float,
    lab_id: str,
    quick: bool,
    command: str | None,
) -> dict[str, Any]:
    per = p.rounds + 1
    plan = schedule(chosen, p.passes)
    total = float(len(plan) * per)
    done = 0.0
    raw_dir = out_dir / "raw"
    shutil.rmtree(raw_dir, ignore_errors=True)
    raw_dir.mkdir(parents=True, exist_ok=True)
    raws = {sc.name: report.ScenarioRaw(scenario=sc) for sc in chosen}
    iters: dict[str, int] | None = None
    rt_flags: list[bool] = []
    for pass_no in range(1, max(k for k, _ in plan) + 1):
        for sc in [s for k, s in plan if k == pass_no]:

            def say(
                msg: str, units: float, _sc: Scenario = sc, _done: float = done, _k: int = pass_no
            ) -> None:
                emit(
                    SuiteProgress(
                        f"pass {_k} {_sc.name}: {msg}",
                        _done + min(units, per),
                        total,
                    )
                )

            notes: list[str] = []
            for attempt in range(1, BOOT_ATTEMPTS + 1):
                runner = _Pass(
                    cfg,
                    image,
                    p,
                    sc,
                    pass_no=pass_no,
                    attempt=attempt,
                    iters=iters,
                    lab_id=lab_id,
                    raw_dir=raw_dir,
                    say=say,
                )
                try:
                    part = runner.run()
                except GuestClockSkew as err:
                    notes.append(f"pass {pass_no}, boot {attempt}: {err.reason}; booted again")
                    say(f"{err.reason}; booting again", 0)
                    if attempt < BOOT_ATTEMPTS:
                        continue
                    part = runner.raw
                    part.error = f"pass {pass_no}: {err}"
                except KemariError as err:
                    if not sc.protected and iters is None:
                        raise BenchmarkError(
                            sc.name, f"Base failed, nothing to compare with: {err}"
                        ) from err
                    part = runner.raw
                    part.error = f"pass {pass_no}: {err}"
                    say(f"failed: {str(err).splitlines()[0]}", per)
                break
            part.failures[:0] = notes
            if iters is None and not sc.protected:
                # Every later boot does exactly the work the first Base boot calibrated.
                iters = dict(part.calibration)
            if runner.tail_realtime is not None:
                rt_flags.append(runner.tail_realtime)
            raws[sc.name].merge(part)
            done += per
    accel, why = choose_accel(cfg.vm.accel)
    meta = {
        "command": command or " ".join(["kemari", *sys.argv[1:]]),
        "machine": machine_info(),
        "accel": accel,
        "accel_reason": why,
        "memory_mib": cfg.vm.memory_mib,
        "replication": {
            # The configured choice; each Kemari row records the tracker that ran.
            "tracker": cfg.replication.tracker,
            "mode": cfg.replication.mode,
            "compression": cfg.replication.compression,
            "pipelining": cfg.replication.pipelining,
            "heartbeat_timeout_ms": cfg.replication.heartbeat_timeout_ms,
        },
        "guest_kernel": image.image.kernel_version,
        "image_key": image.image.key,
        "guest_command": p.guest_command(iters),
        "warmup": {
            **asdict(warmup.DEFAULT),
            "probe_in_image": image.has_probe,
            "guest_command": warmup.DEFAULT.guest_command() if image.has_probe else None,
        },
        "quick": quick,
        "params": asdict(p),
        "rounds": p.rounds,
        "passes": p.passes,
        "loop_s": p.loop_s,
        "iterations": iters,
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "tail_realtime": bool(rt_flags) and all(rt_flags),
        "elapsed_s": time.monotonic() - t_suite,
        "tools": "built-in kbench (lmbench/IOzone-style, guest/workloads/kbench.c); "
        "no lmbench, iozone or fio binary in the guest image",
        "notes": [],
    }
    ordered = sorted(raws.values(), key=lambda r: (r.scenario.protected, r.scenario.order))
    res = report.summarize(ordered, meta=meta)
    report.write_report(res, out_dir)
    emit(SuiteProgress("report written", total, total))
    return res


__all__ = [
    "BOOT_ATTEMPTS",
    "FIRST_KEPT_ROUND",
    "MAX_TSC_SKEW",
    "CpuSample",
    "GuestClockSkew",
    "Progress",
    "SuiteProgress",
    "cpu_sample",
    "host_mhz",
    "other_share",
    "pass_order",
    "run_suite",
    "schedule",
    "tsc_skewed",
]
