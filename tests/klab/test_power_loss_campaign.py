"""A small power-loss campaign in the kernel lab (make e2e): two trials on the built-in
disk, the primary's L1 and then the standby's killed at a random moment; every
acknowledged record found live and on the surviving disk offline. The full campaigns
(20 trials per backend) run from `make e2e` through `kemari klab power-loss`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.klab.conftest import needs_lab

pytestmark = [*needs_lab, pytest.mark.slow, pytest.mark.timeout(3600)]


def test_no_acknowledged_record_is_lost_when_either_l1_loses_power(
    klab_nested_image: object, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kemari_suite.cli.main", "klab", "power-loss", "--backend",
         "builtin", "--trials", "2", "--seed", "7", "-o", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=3500, check=False,
    )  # fmt: skip
    res = json.loads(done.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (tmp_path / "power-loss-builtin.jsonl").open()]
    assert [r["victim"] for r in rows] == ["primary", "secondary"]
    completed = [r for r in rows if r["run"]]
    assert completed, rows  # at least one trial got as far as the kill
    for r in completed:
        assert r["ok"] and r["lost"] == 0, r
        assert r["run"]["records_offline"] >= r["run"]["records_acked"] > 0, r
    assert res["records_lost"] == 0 and res["ok"] is True, done.stderr[-3000:]
    assert (tmp_path / "power-loss-builtin.md").read_text().count("\n| ") >= 3
