"""Summarize a kill campaign recorded by `make e2e` (JSON lines) into markdown + JSON.

usage: python benchmarks/summarize_campaign.py RUNS.jsonl OUT_PREFIX

Everything in the two files it writes comes from the recorded runs, this machine and
this checkout: the notes are generated from the figures, never written by hand.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from kemari_suite.bench.memsync import machine_info

REPO = Path(__file__).resolve().parents[1]
COMMAND = "make e2e"


def checkout() -> dict[str, Any]:
    """The commit the campaign ran on, and whether the work tree had changes."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain")),
    }


def scenarios(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """scenario -> trials, correct, failures (with their details), fault fired, and the
    failover times and client figures where the scenario records them."""
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        s = out.setdefault(
            r["point"],
            {"trials": 0, "correct": 0, "failures": 0, "fault_fired": 0, "failover_ms": []},
        )
        s["trials"] += 1
        s["correct"] += int(bool(r["ok"]))
        s["fault_fired"] += int(bool(r.get("hit", True)))
        if not r["ok"]:
            s["failures"] += 1
            s.setdefault("failure_details", []).append(str(r.get("detail", ""))[-500:])
        if r.get("failover_ms") is not None:
            s["failover_ms"].append(round(float(r["failover_ms"]), 1))
        if "client_rewinds" in r:
            s["client_rewinds"] = s.get("client_rewinds", 0) + int(r["client_rewinds"])
    return out


def notes(points: dict[str, dict[str, Any]], total: int, failures: int) -> list[str]:
    by_client = any("client_rewinds" in p for p in points.values())
    check = (
        [
            "client's: a client on the LAN reads the guest's counter all through the run, and",
            "the first value it receives from the resumed guest must be at or after the last",
            "value it received before the kill, with no value ever going backwards.",
        ]
        if by_client
        else [
            "replica's: the resumed guest's counter must be at or after its value in the last",
            "committed checkpoint (these runs predate the client-side check).",
        ]
    )
    lines = [
        f"{total} trials in {len(points)} scenarios; {failures} failed.",
        "",
        "`precopy` kills land before any checkpoint committed: correct behaviour is that the",
        "secondary does not resume (and says so). In every other kill point the check is the",
        *check,
        "Failover times are measured from the expiry of the heartbeat timeout. Other",
        "scenarios are end-to-end tests, correct when the test passed.",
    ]
    failed = {name: p for name, p in points.items() if p["failures"]}
    if failed:
        lines += ["", "Failed trials:"]
        for name, p in failed.items():
            for detail in p.get("failure_details", []):
                first = detail.strip().splitlines()[-1] if detail.strip() else "(no detail)"
                lines.append(f"- {name}: {first}")
    return lines


def main() -> None:
    runs = [json.loads(x) for x in Path(sys.argv[1]).read_text().splitlines() if x.strip()]
    out = Path(sys.argv[2])
    points = scenarios(runs)
    machine = machine_info()
    where = checkout()
    total = sum(p["trials"] for p in points.values())
    failures = sum(p["failures"] for p in points.values())
    lines = [
        "# Failover kill campaign",
        "",
        f"Command: `{COMMAND}` (KEMARI_KILLS_PER_POINT kills of the primary per fault point)  ",
        f"Machine: {machine['cpu']} ({machine['cpus']} CPUs), kernel {machine['kernel']}, "
        f"{machine['date']}  ",
        f"Commit: {where['commit'][:12]}{' (with uncommitted changes)' if where['dirty'] else ''}",
        "",
        "| scenario | trials | correct | failures | fault fired "
        "| failover ms p50 (after timeout) |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in points.items():
        fo = p["failover_ms"]
        med = f"{statistics.median(fo):.0f}" if fo else "-"
        lines.append(
            f"| {name} | {p['trials']} | {p['correct']} | {p['failures']} | "
            f"{p['fault_fired']} | {med} |"
        )
    lines += ["", *notes(points, total, failures)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": COMMAND,
                "machine": machine,
                **where,
                "trials": total,
                "failures": failures,
                "scenarios": points,
                "runs": runs,
            },
            indent=1,
        )
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
