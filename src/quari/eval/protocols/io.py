"""File helpers the protocols share: keyed embedding files and cached gallery sets.

**Keyed embeddings** (``--query-embeddings``, ``--image-embeddings``): a parquet file with one
key column (``query_id``, ``query`` text, ``inat24_image_id`` … — whichever the protocol looks
items up by) and an ``embedding`` column (list<float32>, all of one length). Precomputed
embeddings let a benchmark run without an encoder (and without a model hub).

**Cached sets**: galleries that do not exist as an embedding set in the release (ILIAS's HDF5
features, INQUIRE-Rerank's parquet) are written once as an :class:`~quari.store.EmbeddingSet`
in a cache folder and reused; ``quari_eval_source.json`` in the folder records what it was
built from, and a different source rebuilds it. A build goes to a temporary sibling folder
first and is renamed into place, so an interrupted build leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from quari.errors import DataError, NotFoundError, QuARIInputError
from quari.fileio import atomic_write, read_json
from quari.store import EmbeddingSet

__all__ = [
    "SOURCE_FILE",
    "cached_set",
    "default_cache_dir",
    "file_fingerprint",
    "read_keyed_embeddings",
    "read_parquet",
    "write_keyed_embeddings",
]

SOURCE_FILE = "quari_eval_source.json"


def default_cache_dir() -> Path:
    """``$QUARI_CACHE_DIR``, else ``~/.cache/quari``."""
    return Path(os.environ.get("QUARI_CACHE_DIR") or Path.home() / ".cache" / "quari")


def file_fingerprint(paths: Sequence[Path]) -> list[list[Any]]:
    """[name, size, mtime] of each file — cheap change detection for large inputs."""
    out = []
    for path in paths:
        if not Path(path).is_file():
            raise NotFoundError(f"{path}: no such file")
        st = Path(path).stat()
        out.append([str(Path(path).resolve()), st.st_size, int(st.st_mtime)])
    return out


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value (names cache folders)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_parquet(path: Path, what: str) -> pa.Table:
    """A whole parquet file; a missing or unreadable one raises an error naming ``what``."""
    if not path.is_file():
        raise NotFoundError(f"{path}: no such {what}")
    try:
        return pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise QuARIInputError(f"{path}: not a readable parquet file ({exc})") from None


def read_keyed_embeddings(
    path: str | os.PathLike[str], keys: Sequence[str], dim: int | None = None
) -> tuple[str, dict[Any, np.ndarray]]:
    """Reads a keyed-embeddings parquet file.

    Args:
        path: The parquet file.
        keys: Accepted key columns, in order of preference (the first present is used).
        dim: Required embedding length, if known.

    Returns:
        (key column used, key → (E,) float32 vector).

    Raises:
        NotFoundError: no such file.
        QuARIInputError: no key column, no ``embedding`` column, ragged or non-finite vectors,
            repeated keys.
    """
    path = Path(path)
    table = read_parquet(path, "embeddings file")
    key = next((k for k in keys if k in table.column_names), None)
    if key is None or "embedding" not in table.column_names:
        raise QuARIInputError(
            f"{path}: an embeddings file needs an 'embedding' column and one key column of "
            f"{list(keys)}; it has {table.column_names}"
        )
    names = table.column(key).to_pylist()
    try:
        vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    except ValueError:
        raise QuARIInputError(f"{path}: embeddings have different lengths") from None
    if vectors.ndim != 2 or (dim is not None and vectors.shape[1] != dim):
        want = f" of length {dim}" if dim is not None else ""
        raise QuARIInputError(f"{path}: expected embeddings{want}, got shape {vectors.shape}")
    bad = np.flatnonzero(~np.isfinite(vectors).all(1))
    if bad.size:
        raise QuARIInputError(f"{path}: the embedding of {key} {names[bad[0]]!r} holds NaN or Inf")
    out = dict(zip(names, vectors, strict=True))
    if len(out) != len(names):
        raise QuARIInputError(f"{path}: a {key} appears more than once")
    return key, out


def write_keyed_embeddings(
    path: str | os.PathLike[str], key: str, names: Sequence[Any], vectors: np.ndarray
) -> Path:
    """Writes a keyed-embeddings parquet file (the format :func:`read_keyed_embeddings` reads)."""
    path = Path(path)
    vectors = np.asarray(vectors, dtype=np.float32)
    table = pa.table(
        {key: list(names), "embedding": pa.array(list(vectors), pa.list_(pa.float32()))}
    )
    atomic_write(path, lambda f: pq.write_table(table, f))
    return path


def cached_set(
    folder: Path, source: dict[str, Any], build: Callable[[Path], EmbeddingSet]
) -> EmbeddingSet:
    """The embedding set in ``folder`` built from ``source``; built by ``build(tmp)`` if absent
    or built from another source.

    Args:
        folder: Where the set lives.
        source: What it is built from (files and their fingerprints, options); compared with
            the record in the folder.
        build: Writes the set into the given (empty) folder and returns it.

    Raises:
        DataError: ``folder`` exists but was not written by this function (never deleted).
    """
    record = folder / SOURCE_FILE
    if record.is_file():
        if read_json(record, DataError) == json.loads(json.dumps(source, default=str)):
            return EmbeddingSet.open(folder)
        shutil.rmtree(folder)  # ours (it has our record), from another source: rebuild
    elif folder.exists() and any(folder.iterdir()):
        raise DataError(
            f"{folder}: exists and is not a quari evaluation cache; choose another cache folder"
        )
    tmp = folder.with_name(f".{folder.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        text = json.dumps(source, indent=1, default=str) + "\n"
        atomic_write(tmp / SOURCE_FILE, lambda f: f.write(text.encode()))
        if folder.exists():
            folder.rmdir()
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EmbeddingSet.open(folder)
