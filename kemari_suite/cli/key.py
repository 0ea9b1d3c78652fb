"""``kemari key``: pre-shared key files.

Registered in :mod:`kemari_suite.cli.main` as ``app.add_typer(key_app, name="key")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kemari_suite.cli.common import EXIT_ERROR
from kemari_suite.protocol.keys import generate_key, write_key_file

app = typer.Typer(no_args_is_help=True, help="Pre-shared key files.")
out = Console()
err = Console(stderr=True)


@app.callback()
def key() -> None:
    """Pre-shared key files (replication.key_file, the witness's pair keys)."""


@app.command()
def generate(
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Key file to write (mode 0600, atomically). Without it the key goes to stdout.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key file.")] = False,
) -> None:
    """A new random key (32 random bytes, as hex) for replication.key_file
    (both hosts of a pair need the same file) or a witness pair key."""
    if output is None:
        # Plain print: no markup, no wrapping, nothing but the key on the line.
        typer.echo(generate_key())
        return
    try:
        path = write_key_file(output, force=force)
    except FileExistsError:
        err.print(
            f"[bold red]error:[/] {output} exists: pass --force to replace it "
            "(the peer must then get the new key too)",
            highlight=False,
        )
        raise typer.Exit(EXIT_ERROR) from None
    except OSError as e:
        err.print(f"[bold red]error:[/] cannot write {output}: {e.strerror}", highlight=False)
        raise typer.Exit(EXIT_ERROR) from e
    out.print(f"wrote a new key to {path} (mode 0600)", highlight=False)


__all__ = ["app", "generate"]
