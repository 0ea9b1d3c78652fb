"""``kemari check``: validate a configuration and a VM definition without starting anything.

Registered in :mod:`kemari_suite.cli.main` as ``app.command()(check.check)``. Exit 0 and
"ok" when sound (accepted unprotected outputs are printed as warnings); exit 2 with every
reason otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kemari_suite.cli.common import EXIT_ERROR

out = Console()
err = Console(stderr=True)


def check(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="The agent's TOML config.")
    ] = None,
    vm: Annotated[
        Path | None,
        typer.Option("--vm", help="A VM definition (TOML, see docs/vm-definition.md)."),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option("--host", help="Check the VM definition as this host sees it."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Validate without starting anything: the config, the VM definition, every guest
    output (each must be behind the taps, or accepted with unprotected_output) and the
    keys (at least 32 bytes, key files readable by their owner alone)."""
    from kemari_suite.tap.preflight import preflight

    report = preflight(config, vm, host=host)
    if json_out:
        # Plain print: one JSON object on one line, whatever the terminal width.
        typer.echo(json.dumps(report.as_dict()))
    else:
        for w in report.warnings:
            err.print(f"[yellow]warning:[/] {w}", highlight=False)
        for e in report.errors:
            err.print(f"[bold red]error:[/] {e}", highlight=False)
        if report.ok:
            what = " and ".join(str(p) for p in (config, vm) if p is not None)
            out.print(f"[green]ok[/]: {what}", highlight=False)
    if not report.ok:
        raise typer.Exit(EXIT_ERROR)


__all__ = ["check"]
