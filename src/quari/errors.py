"""The error root: every error quari raises on purpose is a :class:`QuARIError`.

The kinds form a small tree, so callers catch as broadly or narrowly as they need::

    QuARIError
    ├── QuARIInputError        bad input: an argument, a query, a filter, a config value
    │   ├── NotFoundError      an id, a file or a column that does not exist
    │   └── LimitError         a request above a documented ceiling (k, upload bytes, pixels)
    ├── DataError              data on disk that is corrupt, inconsistent or stale
    │   └── StoreError         an embedding set's files (StaleIndexError, StaleMiningError …)
    ├── ModelError             a model that cannot be loaded or built
    │   ├── CheckpointError    a model folder or checkpoint file
    │   └── EncoderError       an encoder spec or its weights
    ├── MissingDependencyError an optional extra that is not installed
    ├── TrainingError          a training run that cannot go on
    └── LockError              a resource another writer holds

Each kind keeps the builtin base its callers relied on before the root existed
(``ValueError`` for input and data problems, ``RuntimeError`` for training, ``ImportError`` for
missing extras), so ``except ValueError`` keeps working.

:data:`ERROR_KINDS` is the one table that maps each kind to a CLI exit code and an HTTP status;
the command line and the HTTP service both read it through :func:`error_kind`.

Example:
    >>> error_kind(StoreError("img_emb_0.npy: truncated")).exit_code
    3
    >>> error_kind(NotFoundError("row 12 does not exist")).http_status
    404
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ERROR_KINDS",
    "UNEXPECTED",
    "CheckpointError",
    "DataError",
    "EncoderError",
    "ErrorKind",
    "LimitError",
    "LockError",
    "MissingDependencyError",
    "ModelError",
    "NotFoundError",
    "QuARIError",
    "QuARIInputError",
    "StoreError",
    "TrainingError",
    "error_kind",
    "missing_extra",
]


class QuARIError(Exception):
    """The root of every error quari raises on purpose; the message names the problem."""


class QuARIInputError(QuARIError, ValueError):
    """An argument has the wrong shape, dimension, dtype, range or values."""


class NotFoundError(QuARIInputError):
    """Something asked for by name or id does not exist (a row id, a file, a column)."""


class LimitError(QuARIInputError):
    """A request exceeds a documented ceiling (result count, upload size, image pixels)."""


class DataError(QuARIError, ValueError):
    """Data on disk is corrupt, inconsistent, or stale (built for another state of its source)."""


class StoreError(DataError):
    """An embedding set's files are missing, corrupt or inconsistent (the message names them)."""


class ModelError(QuARIError, ValueError):
    """A model cannot be loaded or built."""


class CheckpointError(ModelError):
    """A model folder or checkpoint file is missing, corrupt, or does not fit the model."""


class EncoderError(ModelError):
    """An encoder spec cannot be loaded: unknown kind, missing extra, unusable folder."""


class MissingDependencyError(QuARIError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class TrainingError(QuARIError, RuntimeError):
    """Training cannot go on: a non-finite loss, or a run folder that cannot be resumed or
    would be overwritten. The message names the step, the batch and what was kept."""


class LockError(QuARIError, RuntimeError):
    """Another process holds the resource for writing (an embedding set being appended to, a
    run folder being trained into)."""


@dataclass(frozen=True)
class ErrorKind:
    """How one kind of error is reported by the app layers.

    Attributes:
        name: Short name shown to users (``"bad input"`` …).
        exit_code: The CLI's exit status for this kind.
        http_status: The HTTP service's status code for this kind.
    """

    name: str
    exit_code: int
    http_status: int


#: Most specific first: :func:`error_kind` returns the first entry the error is an instance of.
ERROR_KINDS: tuple[tuple[type[BaseException], ErrorKind], ...] = (
    (NotFoundError, ErrorKind("not found", 2, 404)),
    (FileNotFoundError, ErrorKind("not found", 2, 404)),  # a path the user named
    (LimitError, ErrorKind("over a limit", 2, 413)),
    (QuARIInputError, ErrorKind("bad input", 2, 422)),
    (DataError, ErrorKind("bad data", 3, 500)),
    (ModelError, ErrorKind("model error", 4, 500)),
    (MissingDependencyError, ErrorKind("missing dependency", 5, 501)),
    (TrainingError, ErrorKind("training stopped", 6, 500)),
    (LockError, ErrorKind("busy", 7, 409)),
)
#: Anything else: a bug or an environment failure (the CLI logs the trace and exits 1).
UNEXPECTED = ErrorKind("unexpected error", 1, 500)


def error_kind(exc: BaseException) -> ErrorKind:
    """The :class:`ErrorKind` of ``exc`` (:data:`UNEXPECTED` for non-quari errors).

    Args:
        exc: Any exception.

    Returns:
        The matching table entry.
    """
    for cls, kind in ERROR_KINDS:
        if isinstance(exc, cls):
            return kind
    return UNEXPECTED


def missing_extra(
    what: str, extra: str, exc: BaseException | None = None
) -> MissingDependencyError:
    """The error for a feature whose optional dependencies are not installed.

    Args:
        what: The feature, as the user asked for it (``"hf: encoders"``, ``"--engine ray"``).
        extra: The quari extra that brings the dependencies (``"hf"``, ``"distributed"`` …).
        exc: The import failure, whose text is appended.

    Returns:
        A :class:`MissingDependencyError` to raise (``raise missing_extra(...) from exc``).

    Example:
        >>> str(missing_extra("quari serve", "serve"))
        "quari serve needs the 'serve' extra: pip install 'quari[serve]'"
    """
    detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return MissingDependencyError(
        f"{what} needs the '{extra}' extra: pip install 'quari[{extra}]'{detail}"
    )
