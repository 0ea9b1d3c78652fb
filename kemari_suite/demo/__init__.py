"""The failover demo: boot a guest in the lab, protect it, kill the primary, watch it live on.

1. a lab (primary, secondary and client namespaces; a shaped replication link),
2. the guest image (built once, cached),
3. witness, secondary and primary agents in their namespaces; the guest boots on the
   primary and runs ``counter``, a monotonic counter served over TCP,
4. the client reads the counter over the LAN while checkpoints flow,
5. ``kill -9`` of the primary's agent and QEMU,
6. the secondary wins the witness's lease, resumes the last committed checkpoint, and
   the client reads the counter again, from the same guest now running there.

The counter is read over the network (or from the replica's RAM at the moment of the
failover), never from the serial console, which repeats output after a failover.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kemari_suite import lab as labmod
from kemari_suite.config import KemariConfig
from kemari_suite.errors import KemariError
from kemari_suite.lab.pair import LabPair, PairOptions
from kemari_suite.vm.define import ensure_image
from kemari_suite.vm.qemu import choose_accel, wait_for_console

DEMO_LAB_ID = "dm"


@dataclass
class DemoResult:
    resumed: bool = False
    failover_ms: float | None = None
    #: From the kill to the first answer the client got from the resumed guest, on the
    #: host clock (the client asks every 20 ms, each try waiting up to 0.5 s).
    client_outage_ms: float | None = None
    heartbeat_timeout_ms: int = 0
    checkpoints: int = 0
    last_committed_epoch: int = -1
    counter_at_last_commit: int | None = None
    counter_before_kill: int | None = None
    counter_after_resume: int | None = None
    boot_s: float | None = None
    #: The initial synchronization, from the primary's artifacts: seconds from its
    #: SYNCING state to PROTECTED (events.jsonl).
    protect_s: float | None = None
    #: Bytes the initial synchronization sent: the full copy (pre-copied into the
    #: first epoch) and the first checkpoint (checkpoints.jsonl, trigger "initial").
    initial_sync_bytes: int | None = None
    #: How long the first checkpoint stopped the guest (QEMU's own timestamps if seen).
    initial_pause_ms: float | None = None
    memory_mib: int = 0
    accel: str = ""
    #: The dirty-page tracker the primary ran, and why (its probe, or the config).
    tracker: str = ""
    tracker_reason: str = ""
    profile: str = ""
    image_cached: bool = False
    pause_ms_p50: float | None = None
    pause_ms_p99: float | None = None
    error: str | None = None
    timeline: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def run_demo(
    cfg: KemariConfig,
    *,
    profile: str = "1g",
    lab_id: str = DEMO_LAB_ID,
    run_seconds: float = 4.0,
    progress: Callable[[str], None] | None = None,
    keep: bool = False,
) -> DemoResult:
    """Run the failover demo and return what happened (never prints).

    Raises:
        KemariError: a step failed (lab, image, agents); the lab is torn down first.
    """
    say = progress or (lambda _m: None)
    res = DemoResult(profile=profile)
    res.accel, why = choose_accel(cfg.vm.accel)
    t_start = time.monotonic()

    def mark(step: str, **kw: Any) -> None:
        res.timeline.append({"t": round(time.monotonic() - t_start, 3), "step": step, **kw})
        say(step)

    mark(f"accelerator: {res.accel} ({why})")
    mark("building the guest image (cached after the first run)")
    image = ensure_image(cfg, progress=lambda m: say(f"image: {m}"))
    res.image_cached = image.cached
    mark(f"lab {lab_id}: primary, secondary and client namespaces, {profile} replication link")
    lay = labmod.fresh(lab_id, profile, say=mark)
    # The guest NIC goes through the frame proxy: the client never sees a counter value
    # whose checkpoint is not on the secondary (output commit).
    # The product's heartbeat and interval defaults (the lab's own are for tests).
    r = cfg.replication
    opts = PairOptions(
        heartbeat_interval_ms=r.heartbeat_interval_ms,
        heartbeat_timeout_ms=r.heartbeat_timeout_ms,
        max_interval_ms=r.max_interval_ms,
        tapped_net=True,
    )
    res.heartbeat_timeout_ms = opts.heartbeat_timeout_ms
    res.memory_mib = opts.memory_mib
    pair = LabPair(lay, cfg, opts)
    try:
        mark("starting the witness and the secondary")
        pair.start()
        mark("booting the guest on the primary")
        t_boot = time.monotonic()
        # The primary's console appears once QEMU runs; wait for the init marker.
        deadline = time.monotonic() + 120
        console = pair.console_path("primary")
        while not console.exists():
            if not pair.alive("primary"):
                raise KemariError(f"primary agent exited:\n{pair.output('primary')[-3000:]}")
            if time.monotonic() > deadline:
                raise KemariError("the primary did not start QEMU in 120 s")
            time.sleep(0.05)
        wait_for_console(console, "KEMARI-BOOTED", 120, alive=lambda: pair.alive("primary"))
        res.boot_s = round(time.monotonic() - t_boot, 2)
        mark(f"guest booted in {res.boot_s:.2f} s under {res.accel}")
        pair.wait_state("primary", {"protected"}, 180)
        sync = initial_sync(
            pair.artifact_records("primary", "events.jsonl"),
            pair.artifact_records("primary", "checkpoints.jsonl"),
        )
        res.protect_s, res.initial_sync_bytes, res.initial_pause_ms = sync
        mark(_protected_line(res))
        first = pair.wait_counter(60)
        mark(f"client reads the counter over the LAN: {first}")
        t_end = time.monotonic() + run_seconds
        while time.monotonic() < t_end:
            time.sleep(0.5)
            with contextlib.suppress(KemariError):
                value = pair.read_counter()
                st = pair.status("primary")
                mark(f"counter {value}, epoch {st['last_committed_epoch']} committed")
        st = pair.status("primary")
        res.checkpoints = int(st["checkpoints"])
        res.tracker, res.tracker_reason = st.get("tracker") or "", st.get("tracker_reason") or ""
        mark(f"dirty-page tracker: {res.tracker} ({res.tracker_reason})")
        with contextlib.suppress(KemariError):
            res.counter_before_kill = pair.read_counter()
        mark("kill -9 of the primary's agent and QEMU")
        prober = OutageProbe(pair)
        t_kill = time.monotonic()
        pair.kill("primary")
        prober.start(t_kill)
        sec = pair.wait_state("secondary", {"active"}, opts.heartbeat_timeout_ms / 1000 + 60)
        report = sec.get("failover") or {}
        res.failover_ms = report.get("failover_ms")
        res.last_committed_epoch = int(report.get("epoch", sec.get("last_committed_epoch", -1)))
        res.counter_at_last_commit = (report.get("probes") or {}).get("counter")
        mark(
            f"secondary resumed epoch {res.last_committed_epoch} "
            f"{time.monotonic() - t_kill:.2f} s after the kill "
            f"({res.failover_ms:.0f} ms after the heartbeat timeout)"
            if res.failover_ms is not None
            else "secondary resumed"
        )
        res.counter_after_resume = pair.wait_counter(30)
        outage = prober.wait(30)
        res.client_outage_ms = round(outage * 1e3, 1) if outage is not None else None
        if outage is not None:
            mark(f"the client was answered again {outage:.2f} s after the kill")
        # Resumed from the last committed checkpoint, and never behind anything the
        # client saw before the kill (output commit).
        res.resumed = (
            res.counter_after_resume is not None
            and res.counter_at_last_commit is not None
            and res.counter_after_resume >= res.counter_at_last_commit
            and (
                res.counter_before_kill is None
                or res.counter_after_resume >= res.counter_before_kill
            )
        )
        mark(
            f"counter after resume: {res.counter_after_resume} "
            f"(at the last committed checkpoint: {res.counter_at_last_commit})"
        )
        pauses = checkpoint_pauses(pair)
        res.pause_ms_p50 = percentile(pauses, 50)
        res.pause_ms_p99 = percentile(pauses, 99)
    except KemariError as err:
        res.error = str(err)
        raise
    finally:
        if not keep:
            pair.stop()
            labmod.down(lab_id)
    return res


class OutageProbe:
    """Asks the guest's counter from the client namespace every 20 ms from a moment
    on, and keeps when the first answer came: the outage a client sees."""

    def __init__(self, pair: LabPair, every_s: float = 0.02, try_s: float = 0.5) -> None:
        self.pair, self.every_s, self.try_s = pair, every_s, try_s
        self.answered: float | None = None
        self._t0 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outage-probe", daemon=True)

    def start(self, t0: float) -> None:
        self._t0 = t0
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.pair.read_counter(timeout=self.try_s)
            except KemariError:
                self._stop.wait(self.every_s)
                continue
            self.answered = time.monotonic()
            return

    def wait(self, timeout: float) -> float | None:
        """Seconds from ``t0`` to the first answer (None: none within ``timeout``)."""
        self._thread.join(timeout)
        self._stop.set()
        return None if self.answered is None else self.answered - self._t0


def initial_sync(
    events: list[dict[str, Any]], checkpoints: list[dict[str, Any]]
) -> tuple[float | None, int | None, float | None]:
    """(seconds, bytes sent, first pause in ms) of the primary's first initial
    synchronization, read from its artifacts: the time from its first ``syncing`` state
    to the ``protected`` state after it (``events.jsonl``), and the ``initial``
    checkpoint's pre-copied and sent bytes and pause (``checkpoints.jsonl``). None for
    what the records do not show."""
    seconds: float | None = None
    t_sync: float | None = None
    for ev in events:
        if ev.get("event") != "state" or not isinstance(ev.get("t"), int | float):
            continue
        if ev.get("state") == "syncing" and t_sync is None:
            t_sync = float(ev["t"])
        elif ev.get("state") == "protected" and t_sync is not None:
            seconds = float(ev["t"]) - t_sync
            break
    first = next((c for c in checkpoints if c.get("trigger") == "initial"), None)
    sent: int | None = None
    pause: float | None = None
    if first is not None:
        parts = (first.get("precopy_bytes", 0), first.get("bytes_sent"))
        if all(isinstance(p, int) for p in parts):
            sent = sum(parts)
        raw = first.get("guest_pause_ms")
        raw = first.get("pause_ms") if raw is None else raw
        pause = float(raw) if isinstance(raw, int | float) else None
    return seconds, sent, pause


def _protected_line(res: DemoResult) -> str:
    if res.protect_s is None:
        return "protected (the primary's artifacts do not show the initial synchronization)"
    line = f"protected: the initial synchronization of {res.memory_mib} MiB"
    line += f" took {res.protect_s:.2f} s"
    if res.initial_sync_bytes is not None:
        line += f" and sent {res.initial_sync_bytes / (1 << 20):.1f} MiB"
    if res.initial_pause_ms is not None:
        line += f"; its last step stopped the guest for {res.initial_pause_ms:.1f} ms"
    return line


def checkpoint_pauses(pair: LabPair) -> list[float]:
    """Every sync point's pause (ms) in the primary's ``checkpoints.jsonl``."""
    out: list[float] = []
    for rec in pair.artifact_records("primary", "checkpoints.jsonl"):
        with contextlib.suppress(TypeError, ValueError, KeyError):
            out.append(float(rec["pause_ms"]))
    return out
