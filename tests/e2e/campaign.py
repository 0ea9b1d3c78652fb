"""One kill of the primary in a lab, and what the secondary made of it.

Used by the failover tests (a few kills per point in CI) and by ``make e2e`` (at least
20 per point, results recorded under ``benchmarks/results/``).
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kemari_suite.config import KemariConfig
from kemari_suite.errors import KemariError
from kemari_suite.lab.lab import LabLayout
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

    @property
    def ok(self) -> bool:
        if not self.hit:
            return False
        if not self.expected_resume:
            return not self.resumed
        return (
            self.resumed
            and self.counter_at_last_commit is not None
            and self.counter_after_resume is not None
            and self.counter_after_resume >= self.counter_at_last_commit
        )


def kill_once(lab: LabLayout, base: KemariConfig, point: str, timeout_ms: int = 3000) -> KillResult:
    who, count = POINTS[point]
    opts = PairOptions(heartbeat_timeout_ms=timeout_ms)
    pair = LabPair(lab, base, opts)
    if point == "precopy":
        opts.env_primary = {"KEMARI_FAULT": f"precopy:{count}"}
    expected_resume = point != "precopy"
    try:
        pair.start()
        if point != "precopy":
            pair.wait_state("primary", {"protected"}, 180)
            pair.wait_counter(120)
            pair.settle()
            n = random.randint(1, 4 * count) if count else 0
            if point == "random":
                time.sleep(random.uniform(0.0, 3.0))
                pair.kill("primary")
                print("KEMARI-FAULT-HIT random", file=(pair.root / "primary.out").open("a"))
            elif who == "primary":
                pair.arm_fault("primary", point, n)
            else:
                pair.arm_fault("secondary", point, n, target=str(pair.primary_pidfile))
        # Wait until the primary is gone (the fault fired) or give up.
        deadline = time.monotonic() + 180
        while pair.alive("primary") and time.monotonic() < deadline:
            time.sleep(0.1)
        out = pair.output(who) + pair.output("primary")
        hit = "KEMARI-FAULT-HIT" in out and not pair.alive("primary")
        if not hit:
            return KillResult(
                point,
                False,
                False,
                expected_resume,
                None,
                None,
                None,
                None,
                f"fault never fired:\n{out[-2000:]}",
            )
        # The agent is dead; make sure its QEMU is too (it dies by parent-death signal).
        pair.kill("primary")
        if not expected_resume:
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
        st = pair.wait_state("secondary", {"active"}, timeout_ms / 1000 + 60)
        rep = st.get("failover") or {}
        after = pair.wait_counter(60)
        return KillResult(
            point,
            True,
            True,
            True,
            rep.get("epoch"),
            (rep.get("probes") or {}).get("counter"),
            after,
            rep.get("failover_ms"),
        )
    except KemariError as err:
        return KillResult(point, True, False, expected_resume, None, None, None, None, str(err))
    finally:
        pair.stop()


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
