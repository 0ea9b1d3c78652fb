"""Summarize a kill campaign recorded by `make e2e` (JSON lines) into markdown + JSON.

usage: python benchmarks/summarize_campaign.py RUNS.jsonl OUT_PREFIX [--min-trials N]

Everything in the two files it writes comes from the recorded runs, this machine and
this checkout: the notes are generated from the figures, never written by hand. With
``--min-trials`` it exits 1 (after writing both files) when fewer trials were recorded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from kemari_suite.bench.memsync import machine_info

REPO = Path(__file__).resolve().parents[1]
COMMAND = "make e2e"

#: What a trial of each scenario family is, and when it counts as correct, by the
#: prefix of its name (the campaigns' scenario names; see tests/e2e/linkcampaign.py).
#: The notes list the families present in a run, in this order.
FAMILIES: dict[str, str] = {
    "inject-": "`inject-<kind>-<direction>-tls-off`: one frame on the replication link "
    "forged (a MAC under another key), corrupted (one bit), replayed or reordered by a "
    "relay between the hosts, primary to secondary (p2s) or back (s2p); the link runs "
    "without TLS so the relay sees frames. Correct: the receiver rejected it for that "
    "reason, the link was reset, the secondary held exactly the last epoch it "
    "acknowledged (never the tampered one), the guest kept running and was protected "
    "again over a new connection.",
    "partition-": "`partition-<phase>-heal|kill`: the agent held at that fault point of "
    "a checkpoint's life, the link cut there, the agent let go into the cut; then the "
    "link healed within the heartbeat timeout (correct: still protected, further epochs "
    "committed) or the primary killed (correct: the client check above).",
    "witness-restart-": "`witness-restart-paired|solo`: the witness killed by PID and "
    "started again while the primary is protected, or runs alone after a cut. Correct: "
    "the holder kept its lease and state for two lease periods, never fenced. "
    "`...-stale-refused`: the primary then dies after its solo run; correct: the "
    "standby's takeover is refused as stale (the witness kept the solo run on disk).",
    "secondary-killed-mid-apply": "`secondary-killed-mid-apply`: the secondary dies at "
    "its fault point while applying pages. Correct: the primary goes on unprotected "
    "(the witness agreeing), a new secondary protects the guest again, no rewind.",
}


def checkout() -> dict[str, Any]:
    """The commit the campaign ran on, and whether the work tree had changes."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain")),
    }


def scenarios(runs: list[dict[str, Any]], commit: str = "unknown") -> dict[str, dict[str, Any]]:
    """scenario -> trials, correct, failures (with their details), fault fired, the
    commit they ran on, and the failover times and client figures where the scenario
    records them."""
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        s = out.setdefault(
            r["point"],
            {
                "trials": 0,
                "correct": 0,
                "failures": 0,
                "fault_fired": 0,
                "commit": commit,
                "failover_ms": [],
            },
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


def notes(
    points: dict[str, dict[str, Any]],
    total: int,
    failures: int,
    kill_points: frozenset[str] = frozenset(),
) -> list[str]:
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
        "Failover times are measured from the expiry of the heartbeat timeout.",
    ]
    families = [
        text for prefix, text in FAMILIES.items() if any(n.startswith(prefix) for n in points)
    ]
    if families:
        lines += ["", "Scenarios beyond the kill points (one line per trial):", ""]
        lines += [f"- {text}" for text in families]
        lines += [
            "- `...-final-failover`: the kill of the primary that ends each of those "
            "tests' pairs, checked by the client as above.",
        ]
    others = [
        n
        for n in points
        if n not in kill_points
        and not any(n.startswith(p) for p in FAMILIES)
        and not n.endswith("-final-failover")
    ]
    if others:
        lines += [
            "",
            f"{len(others)} other scenarios are end-to-end tests, correct when the test passed.",
        ]
    failed = {name: p for name, p in points.items() if p["failures"]}
    if failed:
        lines += ["", "Failed trials:"]
        for name, p in failed.items():
            for detail in p.get("failure_details", []):
                first = detail.strip().splitlines()[-1] if detail.strip() else "(no detail)"
                lines.append(f"- {name}: {first}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, help="the campaign's JSON lines")
    ap.add_argument("out", type=Path, help="output prefix (.md and .json are written)")
    ap.add_argument("--min-trials", type=int, default=0, help="exit 1 below this many trials")
    args = ap.parse_args()
    runs = [json.loads(x) for x in args.runs.read_text().splitlines() if x.strip()]
    out: Path = args.out
    where = checkout()
    points = scenarios(runs, where["commit"])
    machine = machine_info()
    total = sum(p["trials"] for p in points.values())
    failures = sum(p["failures"] for p in points.values())
    lines = [
        "# Failover campaign",
        "",
        f"Command: `{COMMAND}` (KEMARI_KILLS_PER_POINT kills of the primary per fault point; "
        "the other scenarios' trial counts scale with it)  ",
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
    # The kill campaign's own lines say whether a resume was expected.
    kill_points = frozenset(r["point"] for r in runs if "expected_resume" in r)
    lines += ["", *notes(points, total, failures, kill_points)]
    short = total < args.min_trials
    if args.min_trials:
        lines += [
            "",
            f"{total} trials recorded, {'fewer than' if short else 'at least'} the "
            f"{args.min_trials} asked for.",
        ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": COMMAND,
                "machine": machine,
                **where,
                "trials": total,
                "failures": failures,
                "min_trials": args.min_trials,
                "scenarios": points,
                "runs": runs,
            },
            indent=1,
        )
    )
    print("\n".join(lines))
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
