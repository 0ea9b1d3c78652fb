"""``kemari bench [--quick] [--scenarios ...] -o DIR [--json]``: the lmbench/IOzone suite.

:func:`suite_command` is a plain function so that the ``bench`` typer group can use it
as its callback; it prints through rich Consoles and turns a :class:`KemariError` into
exit code 2. With ``json_out`` its last line on stdout is one JSON object with
``ratios`` (each Kemari scenario -> its ratio to Base per benchmark) and ``warmup_ok``
(whether every Base boot's device-state warm-up took hold; when not, a warning goes to
stderr as well, and the report opens with it).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kemari_suite import config as configmod
from kemari_suite.cli.common import guard

err = Console(stderr=True)

_COLUMNS = ("fork", "exec", "sh", "pagefault", "ctxsw")


def _split(names: list[str] | None) -> list[str] | None:
    """Accept ``--scenarios a --scenarios b`` as well as ``--scenarios a,b``."""
    if not names:
        return None
    flat = [n.strip() for item in names for n in item.split(",") if n.strip()]
    return flat or None


def suite_command(
    config: Path | None,
    quick: bool,
    scenarios: list[str] | None,
    out: Path,
    json_out: bool,
) -> None:
    """Run the benchmark suite and write results.json, report.md, report.html and plots."""
    from kemari_suite.bench import warmup
    from kemari_suite.bench.suite import SuiteProgress, run_suite

    if os.geteuid() != 0:
        err.print("[bold red]error:[/] the suite builds network namespaces: run it as root")
        raise typer.Exit(2)

    def run() -> dict[str, Any]:
        cfg = configmod.load(config)
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            console=err,
            transient=json_out,
        ) as bar:
            task = bar.add_task("starting", total=1.0)

            def progress(p: SuiteProgress) -> None:
                bar.update(task, description=p.message, completed=p.done, total=max(p.total, 1.0))

            return run_suite(
                cfg,
                quick=quick,
                scenarios=_split(scenarios),
                out_dir=out,
                progress=progress,
                command=" ".join(["kemari", *sys.argv[1:]]),
            )

    res = guard(run)
    failed = {n: s["error"] for n, s in res["scenarios"].items() if s.get("error")}
    wu = res.get("warmup") or {}
    loud = warmup.alarm(wu)
    if loud:
        err.print(f"[bold red]{loud}[/]", highlight=False)
    if json_out:
        summary = {
            "ratios": res["ratios"],
            "io_ratios": res["io_ratios"],
            "targets": {n: t["all_met"] for n, t in res["targets"].items()},
            "failed": failed,
            "warmup_ok": bool(wu.get("ok")),
            "warmup_ratio": wu.get("ratio_median"),
            "out": str(out),
        }
        # Plain print: the last line must be exactly one JSON object, unwrapped.
        print(json.dumps(summary), flush=True)
        return
    console = Console()
    t = Table(title="Kemari / Base (host-timed)")
    t.add_column("scenario")
    for c in _COLUMNS:
        t.add_column(c, justify="right")
    for name, r in res["ratios"].items():
        t.add_row(name, *("-" if r.get(c) is None else f"{r[c]:.2f}" for c in _COLUMNS))
    console.print(t)
    for name, why in failed.items():
        console.print(f"[bold red]{name} failed:[/] {why}", highlight=False)
    if not loud and wu.get("ratio_median") is not None:
        console.print(
            f"Base warm-up took hold: ktouch {wu['cold_rate_median']:,.0f} -> "
            f"{wu['warm_rate_median']:,.0f} loops/s ({wu['ratio_median']:.1f}x)",
            highlight=False,
        )
    console.print(f"report: {out / 'report.md'}  {out / 'report.html'}")
