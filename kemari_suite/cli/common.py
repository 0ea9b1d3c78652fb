"""What every ``kemari`` command group shares: turning a library error into an exit code.

Library code raises :class:`~kemari_suite.errors.KemariError` and never prints or exits;
:func:`guard` is where the CLI turns one into one red line on stderr and exit code 2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console

from kemari_suite.errors import KemariError

T = TypeVar("T")

#: Exit code of a command that failed with a KemariError.
EXIT_ERROR = 2
#: Exit code after Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130

err = Console(stderr=True)


def guard(fn: Callable[[], T]) -> T:
    """Run ``fn``; a KemariError becomes one red line and exit code 2, Ctrl-C exit 130.

    Raises:
        typer.Exit: ``fn`` raised a KemariError or was interrupted.
    """
    try:
        return fn()
    except KemariError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(EXIT_ERROR) from e
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "guard"]
