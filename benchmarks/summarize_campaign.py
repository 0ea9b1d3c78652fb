"""Summarize a kill campaign recorded by `make e2e` (JSON lines) into markdown + JSON.

usage: python benchmarks/summarize_campaign.py RUNS.jsonl OUT_PREFIX
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from kemari_suite.bench.memsync import machine_info


def main() -> None:
    runs = [json.loads(x) for x in Path(sys.argv[1]).read_text().splitlines() if x.strip()]
    out = Path(sys.argv[2])
    points: dict[str, dict[str, object]] = {}
    for r in runs:
        p = points.setdefault(r["point"], {"runs": 0, "ok": 0, "hit": 0, "failover_ms": []})
        p["runs"] += 1  # type: ignore[operator]
        p["ok"] += int(r["ok"])  # type: ignore[operator]
        p["hit"] += int(r["hit"])  # type: ignore[operator]
        if r.get("failover_ms") is not None:
            p["failover_ms"].append(r["failover_ms"])  # type: ignore[union-attr]
    machine = machine_info()
    lines = [
        "# Failover kill campaign",
        "",
        "Command: `make e2e` (KEMARI_KILLS_PER_POINT kills of the primary per fault point)  ",
        f"Machine: {machine['cpu']} ({machine['cpus']} CPUs), kernel {machine['kernel']}, "
        f"{machine['date']}",
        "",
        "| point | kills | fault fired | resumed correctly | failover ms p50 (after timeout) |",
        "|---|---|---|---|---|",
    ]
    for name, p in points.items():
        fo = p["failover_ms"]
        med = f"{statistics.median(fo):.0f}" if fo else "-"  # type: ignore[arg-type]
        lines.append(f"| {name} | {p['runs']} | {p['hit']} | {p['ok']} | {med} |")
    lines += [
        "",
        "`precopy` kills land before any checkpoint committed: correct behaviour is that the",
        "secondary does not resume (and says so). Every other point must resume with the",
        "counter at or after its value in the last committed checkpoint.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"machine": machine, "points": points, "runs": runs}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
