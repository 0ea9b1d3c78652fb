"""The power-loss campaign's bookkeeping (pure): the plan, what counts as lost, the
summary and the report. The trials themselves run in the kernel lab (make e2e)."""

from __future__ import annotations

from pathlib import Path

from kemari_suite.klab.campaign import ACKS, Trial, plan, summary, write_report


def test_the_plan_alternates_victims_and_draws_moments_from_the_seed() -> None:
    a, b = list(plan(10, seed=3)), list(plan(10, seed=3))
    assert a == b
    assert [v for v, _ in a] == ["primary", "secondary"] * 5
    assert all(ACKS[0] <= n <= ACKS[1] for _, n in a)
    assert len({n for _, n in a}) > 3
    assert a != list(plan(10, seed=4))


def trial(n: int, victim: str, **run: object) -> Trial:
    t = Trial(n=n, backend="drbd", victim=victim, acks=10, run=dict(run))
    t.ok = bool(run) and run.get("ok", True) is True
    return t


def test_a_record_missing_live_or_offline_is_lost() -> None:
    kept = trial(0, "primary", resumed=True, records_acked=30, records_found=31,
                 records_offline=31)  # fmt: skip
    assert kept.lost == 0
    offline_short = trial(1, "primary", resumed=True, records_acked=30, records_found=31,
                          records_offline=28)  # fmt: skip
    assert offline_short.lost == 2
    never_served = trial(2, "primary", resumed=False, records_acked=30, records_found=0)
    assert never_served.lost is None  # a failure, but no count
    assert Trial(n=3, backend="drbd", victim="primary", acks=5).lost is None


def test_the_summary_counts_setup_errors_apart(tmp_path: Path) -> None:
    trials = [
        trial(0, "primary", resumed=True, records_acked=30, records_found=30,
              records_offline=30),
        trial(1, "secondary", resumed=True, records_acked=12, records_found=12,
              records_offline=11, ok=False),
        Trial(n=2, backend="drbd", victim="primary", acks=40, error="l1a did not boot"),
    ]  # fmt: skip
    s = summary(trials)
    assert s["trials"] == 3 and s["completed"] == 2 and s["records_lost"] == 1
    assert s["all_ok"] is False
    assert s["by_backend"]["drbd"]["primary"] == {
        "trials": 2, "completed": 1, "ok": 1, "setup_errors": 1, "lost": 0,
    }  # fmt: skip
    md = write_report(trials, tmp_path, "drbd", ["# head"]).read_text()
    assert md.startswith("# head\n")
    assert "1 acknowledged records lost in 2 completed trials; NOT every trial passed" in md
    assert "l1a did not boot" in md
