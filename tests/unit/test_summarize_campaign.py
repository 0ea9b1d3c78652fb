"""The campaign summary counts every scenario from the recorded runs alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_per_scenario_counts_failures_and_commit(tmp_path: Path) -> None:
    runs = [
        {"point": "stopped", "ok": True, "hit": True, "failover_ms": 400.0, "client_rewinds": 0},
        {
            "point": "stopped",
            "ok": False,
            "hit": True,
            "failover_ms": None,
            "client_rewinds": 1,
            "detail": "rewound\nclient saw 41 after 42",
        },
        {"point": "test_witness_restart", "ok": True, "hit": True, "failover_ms": None},
    ]
    jsonl = tmp_path / "runs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in runs))
    out = subprocess.run(
        [sys.executable, "benchmarks/summarize_campaign.py", str(jsonl), str(tmp_path / "fc")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "fc.json").read_text())
    assert data["trials"] == 3 and data["failures"] == 1
    assert len(data["commit"]) == 40
    stopped = data["scenarios"]["stopped"]
    assert (stopped["trials"], stopped["correct"], stopped["failures"]) == (2, 1, 1)
    assert stopped["client_rewinds"] == 1
    assert data["scenarios"]["test_witness_restart"]["correct"] == 1
    md = (tmp_path / "fc.md").read_text()
    assert "| stopped | 2 | 1 | 1 | 2 | 400 |" in md
    assert "- stopped: client saw 41 after 42" in md


def _summarize(tmp_path: Path, runs: list[dict], *extra: str) -> subprocess.CompletedProcess[str]:
    jsonl = tmp_path / "runs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in runs))
    return subprocess.run(
        [
            sys.executable,
            "benchmarks/summarize_campaign.py",
            str(jsonl),
            str(tmp_path / "fc"),
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def test_new_scenarios_each_counted_with_their_commit_and_described(tmp_path: Path) -> None:
    base = {"hit": True, "failover_ms": None, "detail": ""}
    runs = [
        {"point": "stopped", "ok": True, "expected_resume": True, **base},
        {"point": "inject-forged-p2s-tls-off", "ok": True, **base},
        {"point": "inject-forged-p2s-tls-off", "ok": False, **base, "detail": "not reset"},
        {"point": "partition-before-ack-kill", "ok": True, **base, "client_rewinds": 0},
        {"point": "witness-restart-solo", "ok": True, **base},
        {"point": "inject-final-failover", "ok": True, **base, "client_rewinds": 0},
        {"point": "test_something_else", "ok": True, **base},
    ]
    out = _summarize(tmp_path, runs)
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "fc.json").read_text())
    inject = data["scenarios"]["inject-forged-p2s-tls-off"]
    assert (inject["trials"], inject["correct"], inject["failures"]) == (2, 1, 1)
    assert all(s["commit"] == data["commit"] for s in data["scenarios"].values())
    md = (tmp_path / "fc.md").read_text()
    # Only the families that ran are described, and the leftovers are counted.
    assert "`inject-<kind>-<direction>-tls-off`" in md
    assert "`partition-<phase>-heal|kill`" in md
    assert "`witness-restart-paired|solo`" in md
    assert "secondary-killed-mid-apply`" not in md
    assert "1 other scenarios are end-to-end tests" in md
    assert "- inject-forged-p2s-tls-off: not reset" in md


def test_min_trials_fails_a_short_campaign_after_writing_it(tmp_path: Path) -> None:
    runs = [{"point": "stopped", "ok": True, "hit": True, "failover_ms": None}] * 3
    short = _summarize(tmp_path, runs, "--min-trials", "4")
    assert short.returncode == 1
    assert "3 trials recorded, fewer than the 4 asked for." in (tmp_path / "fc.md").read_text()
    assert json.loads((tmp_path / "fc.json").read_text())["min_trials"] == 4
    assert _summarize(tmp_path, runs, "--min-trials", "3").returncode == 0
