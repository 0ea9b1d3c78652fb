"""Record every end-to-end scenario's outcome for `make e2e` (KEMARI_RECORD)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    record = os.environ.get("KEMARI_RECORD")
    if not record or report.when != "call" or "test_kill_primary_at" in report.nodeid:
        return  # the kill campaign records its own, richer lines
    name = report.nodeid.split("::")[-1]
    scenario = re.sub(r"\[\d+-?", "[", name).replace("[]", "")
    line = {"point": scenario, "ok": report.passed, "hit": True, "failover_ms": None}
    with Path(record).open("a") as f:
        f.write(json.dumps(line) + "\n")
