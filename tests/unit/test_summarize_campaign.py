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
