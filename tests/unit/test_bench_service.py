"""The service campaign's bookkeeping: outage, gaps and the report (no VM here; the
campaign itself runs in tests/e2e/test_debian_service.py)."""

from __future__ import annotations

from pathlib import Path

from kemari_suite.bench.service import Client, Request, warmup_figures, write_results


def _client(reqs: list[tuple[float, float, int]]) -> Client:
    c = Client("ns", "10.0.0.2")
    c.requests = [Request(f"r{i}", b"x", t0, t1, code) for i, (t0, t1, code) in enumerate(reqs)]
    return c


def test_outage_counts_only_requests_sent_after_the_kill() -> None:
    # An answer already on its way at t=10 (sent at 9.9) says nothing about the outage.
    c = _client([(9.9, 10.05, 201), (10.1, 13.0, 0), (10.2, 14.2, 201), (14.3, 14.4, 201)])
    assert c.first_success_after(10.0) == 14.2
    assert c.first_success_after(20.0) is None


def test_longest_gap_and_committed() -> None:
    c = _client([(0, 1.0, 201), (1, 2.0, 201), (2, 6.5, 201), (6.5, 7.0, 0), (7, 7.2, 204)])
    assert c.longest_gap(0.0, 8.0) == 4.5
    assert abs(c.longest_gap(6.6, 7.3) - 0.6) < 1e-9
    assert set(c.committed()) == {"r0", "r1", "r2", "r4"}


def test_report_states_the_figures(tmp_path: Path) -> None:
    m = {"seconds": 10, "stored": 100, "failed": 0, "per_s": 10.0}
    res = {
        "profile": "10g",
        "memory_mib": 256,
        "vcpus": 2,
        "policy": "kemari",
        "unprotected": m | {"per_s": 100.0, "latency_p50_ms": 30.0, "latency_p99_ms": 60.0},
        "protected": m
        | {
            "latency_p50_ms": 200.0,
            "latency_p99_ms": 400.0,
            "sync": {
                "syncs_per_s": 30.0,
                "paused_share": 0.7,
                "pause_p50_ms": 23.0,
                "pause_p99_ms": 33.0,
                "ack_p50_ms": 3.0,
                "dirty_pages_p50": 160,
                "triggers": {"policy": 300},
            },
        },
        "throughput_ratio": 0.1,
        "kills": [
            {
                "victim": "primary",
                "outage_s": 4.0,
                "agent_failover_ms": 350.0,
                "reprotected_s": 10.0,
                "spot_checked": 5,
                "spot_missing": [],
            }
        ],
        "switchovers": [
            {
                "from": "primary",
                "pause_ms": 120.0,
                "peer_resume_ms": 70.0,
                "client_longest_gap_s": 0.4,
                "client_failed": 0,
            }
        ],
        "outage_p50_s": 4.0,
        "outage_max_s": 4.0,
        "check": {
            "committed": 1000,
            "missing_live": [],
            "fsck_clean": True,
            "offline_missing": [],
            "offline_mismatched": [],
        },
        "ok": True,
    }
    md = write_results(res, tmp_path, "kemari bench service").read_text()
    assert "| unprotected (warm: the baseline) | 100.0 |" in md
    assert "Protected / unprotected throughput: 0.10" in md
    assert "never captured" not in md  # no cold figure recorded, no cold row
    assert "| 1 | primary | 4.00 | 350 | 10 | 5/5 |" in md
    assert "| primary host | 120 | 70 | 0.40 | 0 |" in md
    assert "70.0% of the time" in md
    assert "nothing lost" in md
    assert (tmp_path / "service.json").exists()


def test_report_shows_the_cold_and_warm_baselines(tmp_path: Path) -> None:
    m = {"seconds": 10, "stored": 100, "failed": 0, "latency_p50_ms": 1.0, "latency_p99_ms": 2.0}
    cold, warm = m | {"per_s": 40.0}, m | {"per_s": 50.0}
    wu = warmup_figures(cold, warm)
    assert wu["cold_per_s"] == 40.0 and wu["warm_per_s"] == 50.0 and wu["ratio"] == 1.25
    assert warmup_figures(m | {"per_s": 0.0}, warm)["ratio"] is None
    res = {
        "profile": "10g",
        "memory_mib": 256,
        "vcpus": 2,
        "unprotected_cold": cold,
        "unprotected": warm,
        "protected": m | {"per_s": 10.0},
        "warmup": wu,
        "throughput_ratio": 0.2,
        "kills": [],
        "outage_p50_s": None,
        "outage_max_s": None,
        "check": {
            "committed": 0,
            "missing_live": [],
            "fsck_clean": True,
            "offline_missing": [],
            "offline_mismatched": [],
        },
        "ok": True,
    }
    md = write_results(res, tmp_path, "kemari bench service").read_text()
    assert "| unprotected, never captured (cold) | 40.0 |" in md
    assert "| unprotected (warm: the baseline) | 50.0 |" in md
    assert "warm / cold 1.25" in md
