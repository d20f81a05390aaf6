"""What a person sees from `wam`: the two consoles (results on stdout, notes and errors on stderr) and
user errors as one line with exit code 2 instead of a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from wam.platform.errors import UserError

# soft_wrap: a long line (a path, a URI) is never broken with newlines; tables still fit the terminal
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


class Options:
    debug = False  # `wam --debug`: user errors show their traceback too


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn configuration mistakes into a one-line error and exit code 2, not a traceback (`--debug` keeps it)."""
    try:
        yield
    except (UserError, FileNotFoundError) as err:
        if Options.debug:
            raise
        fail(str(err), 2)


def fail(message: str, code: int = 1) -> None:
    """Print `error: message` (never parsed as markup: messages hold paths and brackets) and exit."""
    err_console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code) from None


def human(n: float, unit: str = "") -> str:
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".strip()
