"""One kill of the primary in a lab, and what the secondary made of it.

Used by the failover tests (a few kills per point in CI) and by ``make e2e`` (at least
20 per point, results recorded under ``benchmarks/results/``).

The headline check is the client's: a client in the LAN namespace reads the guest's
counter all through the run, and every value it receives after the failover must be at
or after the last value it received before the kill (output commit: nothing the world
saw is rewound). The replica's own probe is recorded beside it, as evidence only.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kemari_suite.config import KemariConfig
from kemari_suite.errors import ConnectError, KemariError
from kemari_suite.lab.addressing import LabLayout
from kemari_suite.lab.pair import LabPair, PairOptions

#: point -> (which agent carries the fault, the count at which it fires). Except for
#: the pre-copy, points are armed once the guest's counter answers over the LAN, with a
#: random count so kills land at different moments of the run.
POINTS: dict[str, tuple[str, int]] = {
    "precopy": ("primary", 3),
    "stopped": ("primary", 5),
    "mid-transfer": ("primary", 5),
    "before-ack": ("primary", 5),
    "after-ack": ("primary", 5),
    "secondary-apply": ("secondary", 5),
    "random": ("primary", 0),
}


@dataclass
class KillResult:
    point: str
    hit: bool
    resumed: bool
    expected_resume: bool
    last_committed_epoch: int | None
    counter_at_last_commit: int | None
    counter_after_resume: int | None
    failover_ms: float | None
    detail: str = ""
    #: The last counter the client received before the primary died, the first it
    #: received from the resumed guest, and how often a value went backwards.
    client_last_before: int | None = None
    client_first_after: int | None = None
    client_rewinds: int = 0

    @property
    def ok(self) -> bool:
        if not self.hit:
            return False
        if not self.expected_resume:
            return not self.resumed
        return (
            self.resumed
            and self.client_rewinds == 0
            and self.client_last_before is not None
            and self.client_first_after is not None
            and self.client_first_after >= self.client_last_before
        )


class CounterWatcher:
    """A client reading the guest's counter over the LAN, over and over, in a thread;
    it remembers every value with the time it arrived.

    ``timeout`` bounds one read: with output commit an answer waits for its epoch's
    acknowledgement, which takes longer than a second on a loaded machine.
    """

    def __init__(self, pair: LabPair, interval: float = 0.05, timeout: float = 1.0) -> None:
        self.pair = pair
        self.interval = interval
        self.timeout = timeout
        self.seen: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="counter-watch", daemon=True)

    def __enter__(self) -> CounterWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = self.pair.read_counter(timeout=self.timeout)
            except (ConnectError, OSError):
                pass
            else:
                self.seen.append((time.monotonic(), value))
            self._stop.wait(self.interval)

    def last_before(self, t: float) -> int | None:
        before = [v for at, v in self.seen if at < t]
        return before[-1] if before else None

    def first_after(self, t: float) -> int | None:
        after = [v for at, v in self.seen if at >= t]
        return after[0] if after else None

    def wait_fresh(self, timeout: float) -> int | None:
        """Wait for a value that arrives from now on; it, or None after ``timeout``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            value = self.first_after(start)
            if value is not None:
                return value
            time.sleep(0.02)
        return None

    def rewinds(self) -> int:
        values = [v for _, v in self.seen]
        return sum(1 for a, b in itertools.pairwise(values) if b < a)


def kill_once(lab: LabLayout, base: KemariConfig, point: str, timeout_ms: int = 3000) -> KillResult:
    count = POINTS[point][1]
    # Output commit on: the client must receive only acknowledged output, or the
    # headline check would hold only as long as the failover outlasts the lost epochs.
    opts = PairOptions(heartbeat_timeout_ms=timeout_ms, tapped_net=True)
    pair = LabPair(lab, base, opts)
    if point == "precopy":
        opts.env_primary = {"KEMARI_FAULT": f"precopy:{count}"}
    try:
        pair.start()
        if point == "precopy":
            return _kill_in_precopy(pair, point, timeout_ms)
        pair.wait_state("primary", {"protected"}, 180)
        pair.wait_counter(120)
        pair.settle()
        with CounterWatcher(pair, timeout=3.0) as watch:
            if watch.wait_fresh(30) is None:
                raise ConnectError(f"{pair.lab.guest_ip}", "the client cannot read the counter")
            return _kill_watched(pair, watch, point, timeout_ms)
    except KemariError as err:
        return KillResult(point, True, False, point != "precopy", None, None, None, None, str(err))
    finally:
        pair.stop()


def _await_fault(pair: LabPair, who: str) -> str | None:
    """Wait until the primary is gone (the fault fired); None, or why it never fired."""
    deadline = time.monotonic() + 180
    while pair.alive("primary") and time.monotonic() < deadline:
        time.sleep(0.1)
    out = pair.output(who) + pair.output("primary")
    if "KEMARI-FAULT-HIT" in out and not pair.alive("primary"):
        # The agent is dead; make sure its QEMU is too (it dies by parent-death signal).
        pair.kill("primary")
        return None
    return f"fault never fired:\n{out[-2000:]}"


def _kill_in_precopy(pair: LabPair, point: str, timeout_ms: int) -> KillResult:
    missed = _await_fault(pair, "primary")
    if missed is not None:
        return KillResult(point, False, False, False, None, None, None, None, missed)
    # Nothing committed yet: the secondary must not resume anything.
    time.sleep(timeout_ms / 1000 + 2)
    st = pair.status("secondary")
    return KillResult(
        point,
        True,
        st["state"] == "active",
        False,
        st.get("last_committed_epoch"),
        None,
        None,
        None,
        str(st.get("reason")),
    )


def _kill_watched(pair: LabPair, watch: CounterWatcher, point: str, timeout_ms: int) -> KillResult:
    """Arm the fault (or kill at a random moment) while the client keeps reading."""
    who, count = POINTS[point]
    n = random.randint(1, 4 * count) if count else 0
    if point == "random":
        time.sleep(random.uniform(0.0, 3.0))
        pair.kill("primary")
        print("KEMARI-FAULT-HIT random", file=(pair.root / "primary.out").open("a"))
    elif who == "primary":
        pair.arm_fault("primary", point, n)
    else:
        pair.arm_fault("secondary", point, n, target=str(pair.primary_pidfile))
    missed = _await_fault(pair, who)
    dead_at = time.monotonic()
    if missed is not None:
        return KillResult(point, False, False, True, None, None, None, None, missed)
    st = pair.wait_state("secondary", {"active"}, timeout_ms / 1000 + 60)
    active_at = time.monotonic()
    rep = st.get("failover") or {}
    after = pair.wait_counter(60)
    # Let the client read the resumed guest a few times more.
    deadline = time.monotonic() + 10
    while watch.first_after(active_at) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    return KillResult(
        point,
        True,
        True,
        True,
        rep.get("epoch"),
        (rep.get("probes") or {}).get("counter"),
        after,
        rep.get("failover_ms"),
        client_last_before=watch.last_before(dead_at),
        client_first_after=watch.first_after(active_at),
        client_rewinds=watch.rewinds(),
    )


def record(results: list[KillResult], path: Path, extra: dict[str, Any]) -> None:
    by_point: dict[str, dict[str, Any]] = {}
    for r in results:
        d = by_point.setdefault(r.point, {"runs": 0, "ok": 0, "hit": 0, "failover_ms": []})
        d["runs"] += 1
        d["ok"] += int(r.ok)
        d["hit"] += int(r.hit)
        if r.failover_ms is not None:
            d["failover_ms"].append(round(r.failover_ms, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        old = json.loads(path.read_text())
        if isinstance(old, dict) and "runs" in old:
            pass
    path.write_text(
        json.dumps(
            {**extra, "points": by_point, "runs": [asdict(r) | {"ok": r.ok} for r in results]},
            indent=1,
        )
    )
