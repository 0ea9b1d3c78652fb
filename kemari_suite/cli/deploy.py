"""``kemari deploy``: provision host pairs with the playbooks, through ansible-runner.

Registered in :mod:`kemari_suite.cli.main` with ``app.add_typer(deploy.app,
name="deploy")``; also runs alone as ``python -m kemari_suite.cli.deploy``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kemari_suite.cli.common import guard

app = typer.Typer(
    add_completion=False,
    invoke_without_command=True,
    help="Provision Kemari host pairs: run playbooks/site.yml against an inventory.",
)
out = Console()
err = Console(stderr=True)


@app.callback()
def deploy(
    inventory: Annotated[
        Path, typer.Option("--inventory", "-i", help="Ansible inventory (file or directory).")
    ],
    check: Annotated[
        bool, typer.Option("--check", help="Dry run: report what would change.")
    ] = False,
    diff: Annotated[bool, typer.Option("--diff", help="Show the changes to files.")] = False,
    limit: Annotated[
        str | None, typer.Option("--limit", "-l", help="Only these hosts (Ansible pattern).")
    ] = None,
    artifacts: Annotated[
        Path | None,
        typer.Option(help="Folder for run folders (default: <inventory dir>/.kemari/runs)."),
    ] = None,
    playbook: Annotated[
        Path | None,
        typer.Option(help="The playbook (default: playbooks/site.yml of this checkout)."),
    ] = None,
    extra_vars: Annotated[
        list[str] | None,
        typer.Option("--extra-vars", "-e", help="KEY=VALUE or a JSON object (repeatable)."),
    ] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True)] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Run the playbooks through ansible-runner; each run gets an artifact folder."""
    from kemari_suite.deploy.runner import PLAYBOOK, DeployEvent, DeployOptions, EventKind, deploy

    extravars: dict[str, object] = {}
    for item in extra_vars or []:
        if item.lstrip().startswith("{"):
            try:
                extravars.update(json.loads(item))
            except json.JSONDecodeError as e:
                err.print(f"[bold red]error:[/] --extra-vars {item!r}: {e}")
                raise typer.Exit(2) from e
        elif "=" in item:
            key, value = item.split("=", 1)
            extravars[key] = value
        else:
            err.print(f"[bold red]error:[/] --extra-vars {item!r}: expected KEY=VALUE or JSON")
            raise typer.Exit(2)
    options = DeployOptions(
        inventory=inventory,
        check=check,
        diff=diff,
        limit=limit,
        artifacts=artifacts,
        playbook=playbook or PLAYBOOK,
        extravars=extravars,
        verbosity=verbose,
    )

    if json_out:
        result = guard(lambda: deploy(options))
    else:
        with err.status("starting ansible-playbook") as status:
            current = {"play": "", "task": ""}

            def show(ev: DeployEvent) -> None:
                if ev.kind is EventKind.PLAY:
                    current["play"] = ev.name
                elif ev.kind is EventKind.TASK:
                    current["task"] = ev.name
                    status.update(f"[bold]{current['play']}[/] • {ev.name}")
                elif ev.kind is EventKind.CHANGED:
                    word = "would change" if check else "changed"
                    err.print(f"[yellow]{word}[/] {ev.host}: {ev.name}", highlight=False)
                elif ev.kind in (EventKind.FAILED, EventKind.UNREACHABLE):
                    err.print(
                        f"[bold red]{ev.kind.value}[/] {ev.host}: {ev.name}: {ev.message}",
                        highlight=False,
                    )

            result = guard(lambda: deploy(options, progress=show))

    if json_out:
        out.print_json(json.dumps(result.to_dict()))
    else:
        t = Table(title=f"deploy {'(check) ' if check else ''}{result.status.value}")
        for col in ("host", "ok", "changed", "failed", "unreachable", "skipped"):
            t.add_column(col, justify="left" if col == "host" else "right")
        for host, s in result.stats.items():
            t.add_row(
                host, str(s.ok), str(s.changed), str(s.failed), str(s.unreachable), str(s.skipped)
            )
        out.print(t)
        out.print(f"artifacts: {result.artifact_dir}", highlight=False)
        if result.failures:
            ft = Table(title="failures", show_lines=True)
            for col in ("host", "task", "reason"):
                ft.add_column(col)
            for f in result.failures:
                ft.add_row(f.host, f.task, f.reason)
            err.print(ft)
    guard(result.raise_for_failure)


if __name__ == "__main__":
    app()
