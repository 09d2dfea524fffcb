"""Candidate indexes over embedding sets: one interface, backends chosen by spec string.

``from quari.index import CandidateIndex`` is the entry point: ``CandidateIndex.build(eset,
"faiss:auto")``, ``CandidateIndex.load(eset)``. See :mod:`quari.index.base` for the interface
and the registry, :mod:`quari.index.faiss` for the default backend, :mod:`quari.index.milvus`
for Milvus servers and Milvus Lite.
"""

from __future__ import annotations

from quari.index.base import (
    DEFAULT_SPEC,
    CandidateIndex,
    RowFilter,
    Selection,
    StaleIndexError,
    backend_for,
    list_backends,
    register_backend,
    selected_rows,
)
from quari.index.faiss import FaissIndex, IndexConfig, choose_factory

__all__ = [
    "DEFAULT_SPEC",
    "CandidateIndex",
    "FaissIndex",
    "IndexConfig",
    "RowFilter",
    "Selection",
    "StaleIndexError",
    "backend_for",
    "choose_factory",
    "list_backends",
    "register_backend",
    "selected_rows",
]
