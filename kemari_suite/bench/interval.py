"""``kemari bench interval``: choose ``replication.max_interval_ms`` by measurement.

Under the default sync policy (``output``) a guest that sends nothing is synchronized
only when its epoch reaches the interval bound (or the write-log bound). The bound
costs CPU-bound work the share of time the guest is stopped at those sync points; a
longer bound costs a bigger epoch to send, and more guest progress redone after a
failover (never output: output waits for its checkpoint). The sweep runs the suite's
Base row and the default Kemari row (10g link, built-in disk) at each interval, in the
same run, and reports per interval the lmbench ratios to Base, sync points per second,
the stopped share and the pause, and which intervals meet the targets (every column at
most :data:`MAX_RATIO`, and below the seed's published ratios).

Results: the suite's own files in the output folder (``results.json``, ``report.md``,
plots), plus ``sweep.json`` and ``sweep.md`` with the table below and the choice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from kemari_suite.bench.memsync import header_lines, machine_info
from kemari_suite.bench.report import target_check
from kemari_suite.bench.scenarios import SCENARIO_DIR, Scenario, load_scenarios
from kemari_suite.bench.suite import SuiteProgress, run_suite
from kemari_suite.config import KemariConfig
from kemari_suite.errors import ConfigError

#: The issue's ceiling for every lmbench column (host-timed, ratio to Base).
MAX_RATIO = 1.05
#: The Kemari row whose interval is swept (the product's default configuration).
SWEPT_ROW = "kemari-10g-builtin"
DEFAULT_INTERVALS = (100, 250, 500, 1000)
COLUMNS = ("fork", "exec", "sh", "pagefault", "ctxsw")


def sweep_rows(intervals: Sequence[int], folder: Path = SCENARIO_DIR) -> list[Scenario]:
    """The Base row and :data:`SWEPT_ROW` once per interval.

    Raises:
        ConfigError: an interval below 10 ms, or the scenario files lack a row.
    """
    if not intervals or min(intervals) < 10:
        raise ConfigError(f"intervals must be 10 ms or more, not {list(intervals)}")
    rows = {s.name: s for s in load_scenarios(folder)}
    if SWEPT_ROW not in rows:
        raise ConfigError(f"no scenario {SWEPT_ROW!r} in {folder}")
    base = next(s for s in rows.values() if s.kind == "base")
    swept = rows[SWEPT_ROW]
    out = [base]
    for i, ms in enumerate(sorted(set(intervals))):
        out.append(
            replace(
                swept,
                name=f"interval-{ms}ms",
                title=f"{swept.title}, interval {ms} ms",
                max_interval_ms=ms,
                order=100 + i,
            )
        )
    return out


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Per interval: ratios, sync figures, whether the targets hold; and the choice
    (the shortest interval that meets every target, None if none does)."""
    rows: list[dict[str, Any]] = []
    for name, sc in res["scenarios"].items():
        if sc.get("kind") != "kemari":
            continue
        ratios = res["ratios"].get(name) or {}
        sync = sc.get("lmbench_sync") or {}
        worst = max((v for v in ratios.values() if v is not None), default=None)
        below_seed = bool(ratios) and target_check(name, ratios)["all_met"]
        rows.append(
            {
                "scenario": name,
                "max_interval_ms": sc.get("max_interval_ms"),
                "ratios": ratios,
                "worst_ratio": worst,
                "syncs_per_s": sync.get("syncs_per_s"),
                "stopped_share": sc.get("lmbench_stopped_share"),
                "pause_ms_p50": (sync.get("pause_ms") or {}).get("p50"),
                "below_seed": below_seed,
                "meets": worst is not None and worst <= MAX_RATIO and below_seed,
                "error": sc.get("error"),
            }
        )
    rows.sort(key=lambda r: r["max_interval_ms"] or 0)
    chosen = next((r["max_interval_ms"] for r in rows if r["meets"]), None)
    return {"max_ratio": MAX_RATIO, "rows": rows, "chosen_ms": chosen}


def write_sweep(
    summary: dict[str, Any], folder: Path, command: str, machine: dict[str, Any] | None = None
) -> Path:
    """``sweep.json`` and ``sweep.md`` in ``folder``; returns the markdown's path.
    ``machine``: the run that measured (default: this one)."""
    machine = machine or machine_info()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.json").write_text(
        json.dumps({"command": command, "machine": machine, **summary}, indent=1)
    )

    def f(v: Any, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    lines = [
        *header_lines(
            "The sync interval bound, chosen by measurement",
            command,
            machine,
            f". Rows: the suite's Base and `{SWEPT_ROW}` (sync policy "
            "output) at each interval, in one run; lmbench ratios to Base, host-timed. The "
            "full suite report of this run is `report.md` beside this file.",
        ),
        "",
        "| interval ms | " + " | ".join(COLUMNS) + " | worst | sync points/s "
        "| stopped share | pause p50 ms | below the seed | meets |",
        "|---" * (len(COLUMNS) + 7) + "|",
    ]
    for r in summary["rows"]:
        cols = " | ".join(f(r["ratios"].get(c)) for c in COLUMNS)
        share = None if r["stopped_share"] is None else 100 * r["stopped_share"]
        lines.append(
            f"| {r['max_interval_ms']} | {cols} | {f(r['worst_ratio'])} | "
            f"{f(r['syncs_per_s'], '.1f')} | {f(share, '.1f')}% | "
            f"{f(r['pause_ms_p50'], '.1f')} | {'yes' if r['below_seed'] else 'no'} | "
            f"{'yes' if r['meets'] else 'no'}"
            + (f" ({r['error'].splitlines()[0]})" if r.get("error") else "")
            + " |"
        )
    chosen = summary["chosen_ms"]
    lines += [
        "",
        f"Targets: every column at most {summary['max_ratio']:.2f}x and below the seed's "
        "Kemari(10GbE)+DRBD ratio.",
        "",
        (
            f"Shortest interval that meets them: **{chosen} ms**."
            if chosen is not None
            else "No interval in this run met them."
        ),
    ]
    md = folder / "sweep.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def run_sweep(
    cfg: KemariConfig,
    *,
    intervals: Sequence[int] = DEFAULT_INTERVALS,
    quick: bool,
    out_dir: Path,
    command: str,
    progress: Callable[[SuiteProgress], None] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run the sweep; (its summary, the path of ``sweep.md``).

    Raises:
        ConfigError: bad intervals or scenario files.
        KemariError: the suite could not run (see :func:`run_suite`).
    """
    res = run_suite(
        cfg,
        quick=quick,
        scenarios=None,
        out_dir=out_dir,
        progress=progress,
        lab_id="iv",
        command=command,
        rows=sweep_rows(intervals),
    )
    summary = summarize(res)
    return summary, write_sweep(summary, out_dir, command)


def report_again(folder: Path) -> tuple[dict[str, Any], Path]:
    """Summarize the sweep recorded in ``folder/results.json`` again (its command,
    machine and commit kept), rewriting ``sweep.json`` and ``sweep.md``.

    Raises:
        ConfigError: no readable results.json there.
    """
    try:
        res = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"no sweep results: {err}", path=str(folder / "results.json")) from err
    meta = res.get("meta") or {}
    summary = summarize(res)
    return summary, write_sweep(summary, folder, meta.get("command", "?"), meta.get("machine"))


__all__ = ["report_again", "run_sweep", "summarize", "sweep_rows", "write_sweep"]
