"""``kemari demo --pacemaker --json``, as a user runs it: the failover demo under a real
Corosync + Pacemaker cluster in the lab (kemari_suite.demo.pacemaker). Its last stdout
line is one JSON object; the cluster, not Kemari, must have promoted the survivor.

This is the CI scenario of the Pacemaker tests (about 100 s here); the other cluster
scenarios are in test_pacemaker.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kemari_suite.lab.cluster import missing_binaries
from tests.conftest import needs_root

pytestmark = [
    pytest.mark.e2e,
    needs_root,
    pytest.mark.skipif(
        bool(missing_binaries()), reason=f"not installed: {', '.join(missing_binaries())}"
    ),
]


def test_demo_pacemaker_json_last_line(guest_image) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        [sys.executable, "-m", "kemari_suite.cli.main", "demo", "--pacemaker", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    res = json.loads(last)
    assert res["promoted_by"] == "pacemaker"
    assert res["resumed"] is True, res
    assert res["quorum"] is True, res
    assert res["fenced"] is True, res
    assert isinstance(res["failover_ms"], float) and res["failover_ms"] > 0, res
    # Never behind what the client read before the kill (output commit).
    assert res["counter_after_resume"] >= res["counter_before_kill"] > 0, res


def test_pacemaker_runs_one_vm_only() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kemari_suite.cli.main", "demo", "--pacemaker", "--vms", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "separate demos" in proc.stderr
