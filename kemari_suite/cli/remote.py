"""``kemari remote``: operate a provisioned host pair over SSH (fabric).

Registered in :mod:`kemari_suite.cli.main` with ``app.add_typer(remote.app,
name="remote")``; also runs alone as ``python -m kemari_suite.cli.remote``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer
from rich.console import Console
from rich.table import Table

from kemari_suite.cli.common import guard

if TYPE_CHECKING:
    from kemari_suite.remote.ops import RemotePair, Which

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Operate a provisioned Kemari host pair over SSH (host keys are checked).",
)
out = Console()
err = Console(stderr=True)

InventoryOpt = Annotated[
    Path, typer.Option("--inventory", "-i", help="The Ansible inventory of the pair.")
]
PairOpt = Annotated[
    str | None, typer.Option("--pair", help="The pair's group (when the inventory has several).")
]
KnownHostsOpt = Annotated[
    Path | None,
    typer.Option(
        "--known-hosts",
        help="known_hosts file (default: the inventory's kemari_known_hosts, the "
        "UserKnownHostsFile of ansible_ssh_common_args, or ~/.ssh/known_hosts).",
    ),
]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="SSH connect timeout, seconds.")]
OnlyOpt = Annotated[
    str, typer.Option("--only", help="both, primary or secondary.", show_default=True)
]


def _pair(
    inventory: Path, pair: str | None, known_hosts: Path | None, timeout: float
) -> RemotePair:
    from kemari_suite.deploy import inventory as inv
    from kemari_suite.remote.ops import RemotePair

    p = guard(lambda: inv.load(inventory).pair(pair))
    return RemotePair(p, known_hosts=known_hosts, connect_timeout=timeout)


def _which(only: str) -> Which:
    if only not in ("both", "primary", "secondary"):
        err.print(f"[bold red]error:[/] --only {only!r}: both, primary or secondary")
        raise typer.Exit(2)
    return cast("Which", only)


@app.command()
def status(
    inventory: InventoryOpt,
    pair: PairOpt = None,
    known_hosts: KnownHostsOpt = None,
    timeout: TimeoutOpt = 10.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The state of both hosts: reachable, unit, config, agent."""
    with _pair(inventory, pair, known_hosts, timeout) as rp:
        st = guard(rp.status)
    if json_out:
        out.print_json(json.dumps(st.to_dict(), default=str))
    else:
        t = Table(title=f"pair {st.group}")
        for col in ("host", "role", "address", "state", "enabled", "active"):
            t.add_column(col)
        for h in st.hosts:
            colour = {"running": "green", "stopped": "yellow"}.get(h.state, "red")
            t.add_row(
                h.host,
                h.role,
                h.endpoint,
                f"[{colour}]{h.state}[/]",
                h.unit_enabled,
                h.unit_active,
            )
        out.print(t)
        for h in st.hosts:
            if not h.reachable:
                continue
            if h.agent:
                detail = ", ".join(f"{k}={v}" for k, v in h.agent.items())
            else:
                detail = h.agent_error or "-"
            out.print(f"{h.host} ({h.unit}): agent {detail}", highlight=False)
    for e in st.errors:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
    if st.errors:
        raise typer.Exit(2)


@app.command()
def start(
    inventory: InventoryOpt,
    pair: PairOpt = None,
    known_hosts: KnownHostsOpt = None,
    timeout: TimeoutOpt = 10.0,
    only: OnlyOpt = "both",
) -> None:
    """Start the agents: the standby first, then the primary."""
    which = _which(only)
    with _pair(inventory, pair, known_hosts, timeout) as rp:
        done = guard(lambda: rp.start(which))
    for r in done:
        out.print(f"started on {r.host}", highlight=False)


@app.command()
def stop(
    inventory: InventoryOpt,
    pair: PairOpt = None,
    known_hosts: KnownHostsOpt = None,
    timeout: TimeoutOpt = 10.0,
    only: OnlyOpt = "both",
) -> None:
    """Stop the agents: the standby first (so it cannot take over), then the primary."""
    which = _which(only)
    with _pair(inventory, pair, known_hosts, timeout) as rp:
        done = guard(lambda: rp.stop(which))
    for r in done:
        out.print(f"stopped on {r.host}", highlight=False)


@app.command()
def failover(
    inventory: InventoryOpt,
    pair: PairOpt = None,
    known_hosts: KnownHostsOpt = None,
    timeout: TimeoutOpt = 10.0,
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm that the primary is really down.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Even though the primary still runs its agent.")
    ] = False,
) -> None:
    """Resume the guest on the secondary (``kemari failover --yes`` there)."""
    if not yes:
        err.print(
            "[bold red]error:[/] a failover with a live primary runs two guests; make sure "
            "the primary is down, then add --yes"
        )
        raise typer.Exit(2)
    with _pair(inventory, pair, known_hosts, timeout) as rp:
        res = guard(lambda: rp.failover(force=force))
    out.print_json(json.dumps(res, default=str))


@app.command()
def logs(
    inventory: InventoryOpt,
    pair: PairOpt = None,
    known_hosts: KnownHostsOpt = None,
    timeout: TimeoutOpt = 10.0,
    out_path: Annotated[
        Path, typer.Option("--out", help="Folder (or .tar.gz path) for the tarball.")
    ] = Path("."),
) -> None:
    """Collect both hosts' journals, units, configs (key redacted) and agent artifacts."""
    with _pair(inventory, pair, known_hosts, timeout) as rp:
        bundle = guard(lambda: rp.collect_logs(out_path))
    out.print(f"{bundle.path} ({', '.join(bundle.hosts)})", highlight=False)
    for e in bundle.errors:
        err.print(f"[bold red]not collected:[/] {e}", highlight=False)


if __name__ == "__main__":
    app()
