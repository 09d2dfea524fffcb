"""The ``quari`` command line (typer). A thin layer: every command calls the library.

Commands live in one module per area (``search.py``: sets, indexes, search; ``train.py``:
mine, train; ``embed.py``: embedding and encoders; ``eval.py``; ``serve.py``; ``demo.py``: the
end-to-end demo); each registers on the shared :data:`app`.
Errors are reported through :func:`friendly_errors` and the error table of :mod:`quari.errors`:
a quari error prints one line naming the problem and exits with its kind's code (2 bad input,
3 bad data, 4 model, 5 missing extra, 6 training stopped, 7 busy); anything unexpected prints a
short message with the path of a log file holding the full trace, and exits 1.
"""

from __future__ import annotations

import datetime
import functools
import os
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import typer
from rich.console import Console

from quari import __version__
from quari.errors import QuARIError, QuARIInputError, error_kind

app = typer.Typer(
    rich_markup_mode=None,  # help texts hold literal brackets: [milvus], PATH[/COLLECTION]
    help="quari: query-adaptive retrieval (QuARI) over embedding sets.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def log_dir() -> Path:
    """Where unexpected errors' traces are written: ``$QUARI_LOG_DIR``, else a ``quari-logs``
    folder in the system's temporary directory."""
    return Path(os.environ.get("QUARI_LOG_DIR") or Path(tempfile.gettempdir()) / "quari-logs")


def _log_trace(exc: BaseException) -> Path | None:
    """Writes the full traceback of ``exc`` to a new file in :func:`log_dir`; None if that fails."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        folder = log_dir()
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"crash-{stamp}-", suffix=".log", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write("".join(traceback.format_exception(exc)))
        return Path(name)
    except OSError:
        return None


#: ``--blend-weight`` of the commands that search with a model (search, serve).
BLEND_WEIGHT_HELP = (
    "Score with this weight a of the model's whitened-cosine blend instead of its trained one "
    "(0: QuARI's score alone, e.g. for text-only search; docs/method.md §5.6)."
)


def with_blend_weight(model: Any, weight: float | None) -> Any:
    """``model`` scoring with ``--blend-weight`` (:meth:`quari.QuARIModel.set_blend_weight`);
    ``model`` as it is without the option."""
    if weight is None:
        return model
    if not hasattr(model, "set_blend_weight"):
        raise QuARIInputError(
            f"--blend-weight needs a QuARI model; got {type(model).__name__ if model else 'none'}"
        )
    return model.set_blend_weight(weight)


def friendly_errors(fn: F) -> F:
    """Reports errors as one line and the exit code of their kind (``quari.errors.ERROR_KINDS``).

    A :class:`~quari.errors.QuARIError` (or a missing file the user named) prints its message;
    any other exception prints its type and message and where the full trace was logged, and
    exits 1; Ctrl-C exits 130. Typer's own exits and usage errors pass through.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]", highlight=False)
            raise typer.Exit(130) from None
        except (QuARIError, FileNotFoundError) as exc:
            kind = error_kind(exc)
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(kind.exit_code) from None
        except Exception as exc:
            where = _log_trace(exc)
            logged = f"; full trace in {where}" if where else ""
            message = str(exc).splitlines()[0][:300] if str(exc) else ""
            err_console.print(
                f"[bold red]unexpected error:[/] {type(exc).__name__}: {message}{logged}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(error_kind(exc).exit_code) from None

    return wrapper  # type: ignore[return-value]


@app.command()
def version() -> None:
    """Print the quari version."""
    console.print(__version__)


def main() -> None:
    """Console-script entry point."""
    app()


# Command modules register themselves on `app` (imported last: they import from here).
from quari.cli import demo, embed, eval, search, serve, train  # noqa: E402, F401
