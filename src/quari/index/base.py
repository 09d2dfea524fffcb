"""The candidate-index interface and the registry of its backends.

A candidate index proposes, for each query vector, the K rows of an
:class:`~quari.store.EmbeddingSet` with the largest inner product; quari then rescores them
exactly from the set's own vectors (so a compressed index costs recall, never precision). Ids
are always the set's global row ids.

Backends are chosen by a spec string, resolved through a registry
(:func:`register_backend`), the way encoders are (``docs/architecture.md``):

=================================  ================================================
``faiss`` / ``faiss:auto``         FAISS, factory chosen by size (the default)
``faiss:<factory>``                FAISS with that factory string (``faiss:HNSW32``)
``milvus://HOST:PORT/COLLECTION``  a Milvus server (``[milvus]`` extra)
``milvus-lite:PATH.db``            Milvus Lite, embedded (``[milvus]`` extra)
=================================  ================================================

An index is described beside its set in ``index/<name>.json`` (backend, spec, the set's
fingerprint when built …); :meth:`CandidateIndex.load` reads it and hands over to the backend
that built it, which refuses a stale index or, with ``update=True``, adds the rows appended
since.

Example:
    >>> index = CandidateIndex.build(eset, "faiss:auto")  # doctest: +SKIP
    >>> scores, ids = CandidateIndex.load(eset).search(queries, k=1000)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

import numpy as np
import pyarrow.compute as pc

from quari.errors import QuARIInputError, StoreError
from quari.fileio import atomic_write, read_json
from quari.filters import Node, to_expression
from quari.store import EmbeddingSet

__all__ = [
    "DEFAULT_SPEC",
    "CandidateIndex",
    "RowFilter",
    "Selection",
    "StaleIndexError",
    "backend_for",
    "list_backends",
    "register_backend",
    "selected_rows",
]

DEFAULT_SPEC = "faiss:auto"


@dataclass(frozen=True)
class RowFilter:
    """A metadata filter in both forms a backend may use.

    Attributes:
        ids: Sorted global row ids that pass (what a local index filters by).
        condition: The parsed ``--where`` filter (:func:`quari.filters.parse_filter`), for
            backends that evaluate filters in their own engine; None when the filter was given
            as a pyarrow expression.
    """

    ids: np.ndarray
    condition: Node | None = None


#: Rows a search may be restricted to: sorted row ids, a pyarrow filter expression, a parsed
#: ``--where`` filter (a :mod:`quari.filters` tree), or a :class:`RowFilter` holding both the
#: ids and the parsed filter (what the Retriever passes). Backends evaluate or translate it.
Selection: TypeAlias = "np.ndarray | pc.Expression | Node | RowFilter"


def selected_rows(eset: EmbeddingSet, selection: Selection | None) -> np.ndarray | None:
    """The sorted row ids a selection stands for (None for no selection).

    Example:
        >>> selected_rows(eset, parse_filter("group == 2"))  # doctest: +SKIP
        array([  3,   9, ...])
    """
    if selection is None:
        return None
    if isinstance(selection, RowFilter):
        return selection.ids
    if isinstance(selection, pc.Expression):
        return eset.select(selection)
    if isinstance(selection, np.ndarray):
        return selection
    return eset.select(to_expression(selection))


class StaleIndexError(StoreError):
    """The index was built for a different state of its embedding set."""


class CandidateIndex(ABC):
    """A candidate index over one embedding set; backends subclass it.

    Class methods dispatch on the spec string (:meth:`build`) or on the description saved
    beside the set (:meth:`load`, :meth:`exists`), so ``CandidateIndex.build(eset)`` builds
    the default FAISS index and ``CandidateIndex.load(eset)`` opens whatever was built.

    Attributes:
        eset: The embedding set the index covers.
        name: File name stem of its description, ``index/<name>.json``.
        info: The description (backend, spec, rows, the set's fingerprint at build time …).
    """

    #: Scheme of the backend's spec strings (``"faiss"``, ``"milvus"`` …).
    backend: ClassVar[str] = ""

    def __init__(self, eset: EmbeddingSet, info: dict[str, Any], name: str = "image") -> None:
        self.eset = eset
        self.info = info
        self.name = name

    # -- dispatch -------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        eset: EmbeddingSet,
        spec: str | None = None,
        *,
        name: str = "image",
        progress: bool = True,
        save: bool = True,
        **options: Any,
    ) -> CandidateIndex:
        """Builds an index over every row of ``eset``.

        Args:
            eset: The embedding set.
            spec: Backend spec string (default ``faiss:auto``; see the module docstring).
            name: File name stem of the description under ``<set>/index/``.
            progress: Show a progress bar.
            save: Write the index (and its description) beside the set.
            **options: Backend options (FAISS: ``nprobe``, ``ef_search``, ``train_rows`` …,
                see :class:`~quari.index.faiss.IndexConfig`).

        Returns:
            The built index.

        Raises:
            QuARIInputError: an unknown backend or a bad spec or option.
            StoreError: an empty set.
        """
        backend, target = backend_for(spec or DEFAULT_SPEC)
        if cls is not CandidateIndex and not issubclass(backend, cls):
            raise QuARIInputError(f"{cls.__name__}.build cannot build a {spec!r} index")
        if eset.rows == 0:
            raise StoreError(f"{eset.root}: the set is empty; nothing to index")
        return backend.create(eset, target, name=name, progress=progress, save=save, **options)

    @classmethod
    def load(
        cls, eset: EmbeddingSet, *, name: str = "image", update: bool = False, **options: Any
    ) -> CandidateIndex:
        """Opens the index described in ``<set>/index/<name>.json``.

        Args:
            eset: The set it was built for.
            name: File name stem.
            update: If the set only grew since the build, add the new rows (and save).
            **options: Backend options for opening (FAISS: ``mmap``).

        Raises:
            StaleIndexError: the set changed since the build (and cannot be updated).
            StoreError: missing or unreadable index files.
        """
        path = description_path(eset, name)
        if not path.is_file():
            raise StoreError(f"{path}: no index; build one with `quari index build`")
        info = read_json(path, StoreError)
        if not isinstance(info, dict):
            raise StoreError(f"{path}: not an index description")
        backend, _ = backend_for(str(info.get("backend", "faiss")))
        index = backend.open(eset, info, name, **options)
        reason = index.stale_reason()
        if reason is not None:
            grew = _grew(info.get("fingerprint"), eset.fingerprint)
            if not (grew and update):
                hint = (
                    "load it with update=True (or run `quari index build --update`) to add "
                    "the new rows"
                    if grew
                    else "rebuild it with `quari index build`"
                )
                raise StaleIndexError(f"{path}: stale — {reason}; {hint}")
            index.add_new_rows(progress=False)
            index.save()
        return index

    @classmethod
    def exists(cls, eset: EmbeddingSet, name: str = "image") -> bool:
        """Whether an index called ``name`` is described beside ``eset``."""
        return description_path(eset, name).is_file()

    # -- what a backend implements --------------------------------------------------------------
    @classmethod
    @abstractmethod
    def create(
        cls,
        eset: EmbeddingSet,
        target: str,
        *,
        name: str,
        progress: bool,
        save: bool,
        **options: Any,
    ) -> CandidateIndex:
        """Builds the index for the spec remainder ``target`` (after ``<backend>:``)."""

    @classmethod
    @abstractmethod
    def open(
        cls, eset: EmbeddingSet, info: dict[str, Any], name: str, **options: Any
    ) -> CandidateIndex:
        """Opens a saved index from its description ``info`` (staleness is checked after)."""

    @property
    @abstractmethod
    def rows(self) -> int:
        """Rows the index holds (ids 0 … rows − 1)."""

    @abstractmethod
    def search(
        self, queries: Any, k: int, *, selection: Selection | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product.

        Args:
            queries: (B, E) query vectors (any scale: inner-product ranking ignores it).
            k: Results per query.
            selection: Only rows in the selection can be returned — filtering happens inside
                the search, not after it.

        Returns:
            ``(scores, ids)``, each (B, k) (float32, int64); missing results have id −1.
        """

    def fetch_vectors(self, ids: np.ndarray) -> np.ndarray:
        """The vectors the index stores for ``ids`` (n,) → (n, E), for backends that keep
        exact copies (rescoring where the set's files are not at hand).

        Raises:
            QuARIInputError: the backend keeps no exact vectors.
        """
        raise QuARIInputError(
            f"the {self.backend!r} index backend does not return stored vectors; rescore "
            "from the embedding set"
        )

    def close(self) -> None:
        """Releases connections the backend holds (nothing for local files)."""
        return None

    @abstractmethod
    def add_new_rows(self, progress: bool = True) -> int:
        """Adds the rows appended to the set since the index was built; returns how many."""

    @abstractmethod
    def save(self) -> None:
        """Writes the index (where the backend stores it) and its description."""

    # -- shared ---------------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """The spec string that rebuilds this index (``faiss:IVF4096,Flat`` …)."""
        return str(self.info.get("spec", self.backend))

    def stale_reason(self) -> str | None:
        """Why the index no longer matches its set, or None when it does."""
        built_for, now = self.info.get("fingerprint"), self.eset.fingerprint
        if built_for == now and self.rows == self.eset.rows:
            return None
        how = "(appended since)" if _grew(built_for, now) else "(changed since)"
        return f"built for {self.info.get('rows')} rows, the set now has {self.eset.rows} {how}"

    def describe(self) -> dict[str, Any]:
        """The index's description as saved beside the set (a copy)."""
        return dict(self.info)

    def write_description(self) -> None:
        """Writes ``index/<name>.json`` atomically."""
        text = json.dumps(self.info, indent=2, default=str) + "\n"
        atomic_write(description_path(self.eset, self.name), lambda f: f.write(text.encode()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, rows={self.rows}, set={self.eset.root})"


def description_path(eset: EmbeddingSet, name: str) -> Path:
    """``<set>/index/<name>.json``."""
    return eset.root / "index" / f"{name}.json"


def _grew(built_for: Any, now: list[list[Any]]) -> bool:
    """Whether the set only had shards appended since ``built_for``."""
    return (
        isinstance(built_for, list)
        and len(built_for) <= len(now)
        and (built_for == now[: len(built_for)])
    )


# -- registry -----------------------------------------------------------------------------------
_BACKENDS: dict[str, tuple[str, str]] = {}


def register_backend(scheme: str, target: str, summary: str = "") -> None:
    """Registers a backend class for spec strings starting with ``scheme``.

    Args:
        scheme: ``"faiss"`` for ``faiss:…``, ``"milvus"`` for ``milvus://…``.
        target: ``"module:Class"``, imported on first use (optional extras stay optional).
        summary: One line for ``quari index backends``.
    """
    _BACKENDS[scheme] = (target, summary)


def list_backends() -> dict[str, str]:
    """Registered schemes and their one-line summaries."""
    return {scheme: summary for scheme, (_, summary) in sorted(_BACKENDS.items())}


def backend_for(spec: str) -> tuple[type[CandidateIndex], str]:
    """The backend class for a spec string, and the spec's remainder after the scheme.

    Example:
        >>> backend_for("faiss:HNSW32")[1]
        'HNSW32'
    """
    if not isinstance(spec, str) or not spec.strip():
        raise QuARIInputError(f"index backend spec must be a non-empty string, got {spec!r}")
    scheme, sep, rest = spec.partition("://")
    if not sep:
        scheme, _, rest = spec.partition(":")
    if scheme not in _BACKENDS:
        raise QuARIInputError(
            f"unknown index backend {spec!r}; known: {', '.join(sorted(_BACKENDS))}"
        )
    module, _, attr = _BACKENDS[scheme][0].partition(":")
    backend = getattr(importlib.import_module(module), attr)
    return backend, rest


register_backend("faiss", "quari.index.faiss:FaissIndex", "FAISS on local disk (the default)")
register_backend(
    "milvus",
    "quari.index.milvus:MilvusIndex",
    "a Milvus server: milvus://HOST:PORT[/COLLECTION] ([milvus] extra)",
)
register_backend(
    "milvus-lite",
    "quari.index.milvus:MilvusLiteIndex",
    "Milvus Lite, embedded: milvus-lite:PATH.db[/COLLECTION] ([milvus] extra)",
)
