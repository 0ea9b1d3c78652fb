"""The interval sweep's rows, its summary and its choice (the suite itself runs in
tests/e2e/test_bench_suite.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kemari_suite.bench.interval import MAX_RATIO, summarize, sweep_rows, write_sweep
from kemari_suite.errors import ConfigError


def test_rows_are_base_and_the_default_row_at_each_interval() -> None:
    rows = sweep_rows([500, 100, 500])
    assert [r.kind for r in rows] == ["base", "kemari", "kemari"]
    assert [r.max_interval_ms for r in rows[1:]] == [100, 500]
    assert [r.name for r in rows[1:]] == ["interval-100ms", "interval-500ms"]
    assert all(r.policy == "output" and r.disk == "builtin" for r in rows[1:])
    with pytest.raises(ConfigError, match="10 ms or more"):
        sweep_rows([5])


def _row(ms: int, worst: float, met: bool, share: float) -> dict[str, Any]:
    return {
        "kind": "kemari",
        "max_interval_ms": ms,
        "lmbench_stopped_share": share,
        "lmbench_sync": {"syncs_per_s": 1000 / ms, "pause_ms": {"p50": 7.0}},
        "ratios": worst,
        "met": met,
    }


def test_the_choice_is_the_shortest_interval_meeting_every_target(tmp_path: Path) -> None:
    scen = {
        "base": {"kind": "base"},
        "interval-100ms": _row(100, 1.07, False, 0.07),
        "interval-250ms": _row(250, 1.04, False, 0.03),  # above the seed's pagefault
        "interval-500ms": _row(500, 1.02, True, 0.015),
        "interval-1000ms": _row(1000, 1.01, True, 0.008),
    }
    res = {
        "scenarios": {k: {kk: vv for kk, vv in v.items() if kk not in ("ratios", "met")}
                      for k, v in scen.items()},
        "ratios": {k: {"fork": 1.0, "pagefault": v["ratios"]}
                   for k, v in scen.items() if k != "base"},
        "targets": {k: {"all_met": v["met"]} for k, v in scen.items() if k != "base"},
    }  # fmt: skip
    s = summarize(res)
    assert [r["max_interval_ms"] for r in s["rows"]] == [100, 250, 500, 1000]
    assert [r["meets"] for r in s["rows"]] == [False, False, True, True]
    assert s["chosen_ms"] == 500 and s["max_ratio"] == MAX_RATIO
    md = write_sweep(s, tmp_path, "kemari bench interval").read_text()
    assert "| 500 | 1.00 | - | - | 1.02 | - | 1.02 | 2.0 | 1.5% | 7.0 | yes | yes |" in md
    assert "**500 ms**" in md
    assert (tmp_path / "sweep.json").exists()
    res["targets"] = {k: {"all_met": False} for k in res["targets"]}
    assert summarize(res)["chosen_ms"] is None
