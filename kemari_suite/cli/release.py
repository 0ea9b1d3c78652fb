"""``kemari release``: the operator's way out of HELD (output held with no secondary).

Registered in :mod:`kemari_suite.cli.main` as ``app.command()(release)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from kemari_suite import config as configmod
from kemari_suite.cli.common import guard

out = Console()


def _request(config: Path | None, **args: Any) -> Any:
    from kemari_suite.node import control_path
    from kemari_suite.service import control

    cfg = guard(lambda: configmod.load(config))
    return guard(lambda: control.request(control_path(cfg), "release", timeout=60.0, **args))


def release(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML config file (defaults if omitted).")
    ] = None,
    solo: Annotated[
        bool,
        typer.Option(
            "--solo",
            help="Declare the secondary dead: tell the tiebreaker (if any), release the held "
            "output, resume a guest paused at replication.held_limit_mib, and run on "
            "unprotected (an alert is raised). Only for a primary in state held.",
        ),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Output held with no secondary (state held): without --solo, show what is held and
    change nothing (output stays held until the secondary returns, and the guest is paused
    once replication.held_limit_mib is reached); with --solo, go on unprotected."""
    res = _request(config, solo=solo)
    if json_out:
        out.print_json(json.dumps(res, default=str))
        return
    held, limit = res.get("held_bytes", 0), res.get("held_limit_bytes", 0)
    paused = " (guest paused at the bound)" if res.get("held_paused") else ""
    if res.get("released"):
        out.print(
            f"released {res.get('released_bytes', 0)} held bytes; the primary runs "
            f"{res.get('state')}, with no secondary"
        )
        return
    out.print(
        f"state {res.get('state')}: {held} of {limit} bytes held{paused}. Output stays held "
        "until the secondary returns; `kemari release --solo` declares it dead and goes on "
        "unprotected."
    )


__all__ = ["release"]
