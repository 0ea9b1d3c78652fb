"""Record every end-to-end scenario's outcome for `make e2e` (KEMARI_RECORD)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    record = os.environ.get("KEMARI_RECORD")
    # Under xdist the controller sees every worker's reports again: record once, where
    # the test ran (a worker, or the only process without xdist).
    # (xdist marks the controller's copies with the worker node).
    in_controller = getattr(report, "node", None) is not None
    if in_controller or not record or report.when != "call":
        return
    if "test_kill_primary_at" in report.nodeid or "test_link_campaign.py" in report.nodeid:
        return  # the campaigns record their own lines, one per trial
    name = report.nodeid.split("::")[-1]
    scenario = re.sub(r"\[\d+-?", "[", name).replace("[]", "")
    line = {"point": scenario, "ok": report.passed, "hit": True, "failover_ms": None}
    if not report.passed:
        line["detail"] = report.longreprtext[-500:]
    with Path(record).open("a") as f:
        f.write(json.dumps(line) + "\n")
