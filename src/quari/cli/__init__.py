"""The ``quari`` command line (typer). A thin layer: every command calls the library.

Commands live in one module per area (``search.py``: sets, indexes, search; ``train.py``:
mine, train); each registers on
the shared :data:`app`. Errors the library raises on bad input (wrong dimensions, corrupt files,
stale indexes …) are printed as one line naming the problem, with exit code 2 — no traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from quari import __version__
from quari.checkpoint import CheckpointError
from quari.encoders import EncoderError
from quari.store import StoreError
from quari.validation import QuARIInputError

app = typer.Typer(
    help="quari: query-adaptive retrieval (QuARI) over embedding sets.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    """Turns the library's input/storage errors into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (
            QuARIInputError,
            StoreError,
            CheckpointError,
            EncoderError,
            FileNotFoundError,
        ) as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.command()
def version() -> None:
    """Print the quari version."""
    console.print(__version__)


@app.command()
def demo() -> None:
    """Run the end-to-end demo on the embedded default (not yet available)."""
    console.print("quari demo: not yet — the end-to-end demo lands with its own issue.")


def main() -> None:
    """Console-script entry point."""
    app()


# Command modules register themselves on `app` (imported last: they import from here).
from quari.cli import embed, search, train  # noqa: E402, F401
