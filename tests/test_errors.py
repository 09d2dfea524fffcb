"""The error root: one tree of kinds, one table of exit codes and HTTP statuses."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from quari import errors
from quari.errors import (
    ERROR_KINDS,
    UNEXPECTED,
    QuARIError,
    StoreError,
    error_kind,
    missing_extra,
)


def test_every_kind_is_a_quari_error_and_keeps_its_builtin_base():
    assert issubclass(errors.QuARIInputError, ValueError)
    assert issubclass(errors.DataError, ValueError)
    assert issubclass(errors.TrainingError, RuntimeError)
    assert issubclass(errors.MissingDependencyError, ImportError)
    for cls, _ in ERROR_KINDS:
        assert issubclass(cls, QuARIError) or cls is FileNotFoundError


def test_old_import_paths_name_the_same_classes():
    from quari.checkpoint import CheckpointError
    from quari.encoders import EncoderError
    from quari.index import StaleIndexError
    from quari.layout import StoreError as LayoutStoreError
    from quari.store import StoreError as StoreStoreError
    from quari.training.errors import TrainingError
    from quari.training.mining import StaleMiningError
    from quari.validation import QuARIInputError

    assert CheckpointError is errors.CheckpointError and EncoderError is errors.EncoderError
    assert LayoutStoreError is StoreStoreError is StoreError
    assert TrainingError is errors.TrainingError and QuARIInputError is errors.QuARIInputError
    assert issubclass(StaleIndexError, StoreError) and issubclass(StaleMiningError, StoreError)


@pytest.mark.parametrize(
    ("exc", "code", "status"),
    [
        (errors.QuARIInputError("k must be positive"), 2, 422),
        (errors.NotFoundError("row 9 does not exist"), 2, 404),
        (errors.LimitError("upload over 10 MiB"), 2, 413),
        (FileNotFoundError("nowhere.npy"), 2, 404),
        (StoreError("img_emb_0.npy: truncated"), 3, 500),
        (errors.CheckpointError("config.json: missing"), 4, 500),
        (errors.EncoderError("unknown encoder"), 4, 500),
        (missing_extra("quari serve", "serve"), 5, 501),
        (errors.TrainingError("loss is NaN at step 3"), 6, 500),
        (errors.LockError("another writer holds the set"), 7, 409),
        (RuntimeError("a bug"), 1, 500),
    ],
)
def test_the_table_gives_each_kind_its_exit_code_and_http_status(exc, code, status):
    kind = error_kind(exc)
    assert (kind.exit_code, kind.http_status) == (code, status)
    assert (kind is UNEXPECTED) == (not isinstance(exc, (QuARIError, FileNotFoundError)))


def test_missing_extra_names_the_extra_and_the_cause():
    err = missing_extra("hf: encoders", "hf", ImportError("No module named 'transformers'"))
    assert "pip install 'quari[hf]'" in str(err) and "transformers" in str(err)


def _cli_raising(exc: BaseException) -> typer.Typer:
    from quari.cli import friendly_errors

    app = typer.Typer()

    @app.command()
    @friendly_errors
    def boom() -> None:
        raise exc

    @app.command()
    def other() -> None:  # a second command keeps typer from collapsing to one
        pass

    return app


def test_cli_reports_quari_errors_in_one_line_with_their_exit_code():
    out = CliRunner().invoke(_cli_raising(errors.LockError("set is busy")), ["boom"])
    assert out.exit_code == 7 and "error: set is busy" in out.output
    assert "Traceback" not in out.output


def test_cli_logs_unexpected_errors_and_prints_where(tmp_path, monkeypatch):
    monkeypatch.setenv("QUARI_LOG_DIR", str(tmp_path / "logs"))
    out = CliRunner().invoke(_cli_raising(ZeroDivisionError("division by zero")), ["boom"])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "unexpected error: ZeroDivisionError: division by zero" in " ".join(out.output.split())
    (log,) = (tmp_path / "logs").iterdir()
    assert "Traceback" in log.read_text() and "ZeroDivisionError" in log.read_text()
    assert log.name in out.output.replace("\n", "")
