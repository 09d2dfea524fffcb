"""Milvus plumbing for :mod:`quari.index.milvus`: options, the collection's schema and marker,
connections to a server or Milvus Lite, error translation, and id scans.

Everything that talks to ``pymilvus`` directly lives here or in the backend; ``pymilvus`` is
imported on first use (extra ``[milvus]``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from quari import __version__
from quari.errors import LockError, QuARIInputError, StoreError, missing_extra
from quari.store import EmbeddingSet
from quari.validation import check_fields

__all__ = [
    "MARK",
    "MAX_CANDIDATES",
    "PRIMARY",
    "VECTOR",
    "VECTOR_INDEX",
    "MilvusConfig",
    "collection_name",
    "collection_properties",
    "collection_schema",
    "connect",
    "count_rows",
    "disconnect",
    "fingerprint_hash",
    "milvus_errors",
    "pymilvus_module",
    "recorded_state",
    "scalar_fields",
    "stored_ids",
]

#: Milvus returns at most this many results per query (its ``topk`` ceiling).
MAX_CANDIDATES = 16_384
PRIMARY, VECTOR = "id", "vector"
#: Collection property present only on collections quari created.
MARK = "quari.created_by"
#: Collection property: the vector index quari built (type and parameters, as JSON).
VECTOR_INDEX = "quari.vector_index"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}\Z")
_ARROW_TO_MILVUS = {
    pa.int8(): "INT8", pa.int16(): "INT16", pa.int32(): "INT32", pa.int64(): "INT64",
    pa.uint8(): "INT16", pa.uint16(): "INT32", pa.uint32(): "INT64",
    pa.float16(): "FLOAT", pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.bool_(): "BOOL",
    pa.string(): "VARCHAR", pa.large_string(): "VARCHAR",
}  # fmt: skip
_MAX_VARCHAR = 65_535
# Open quari clients per Milvus Lite database in this process, and the databases whose
# in-process server quari started (it stops only those, after their last client closes).
_LITE_USERS: Counter[str] = Counter()
_LITE_STARTED: set[str] = set()


@dataclass(frozen=True)
class MilvusConfig:
    """Options of a Milvus candidate index.

    Args:
        fields: Metadata columns copied into the collection as scalar fields (filters on other
            columns fall back to a list of row ids, up to ``id_filter_limit``).
        index_type: Milvus vector index: ``FLAT`` (exact), ``IVF_FLAT``, ``HNSW``,
            ``AUTOINDEX`` (the server's choice) …
        index_params: Build parameters (``{"nlist": 1024}``, ``{"M": 16, "efConstruction": 200}``).
        search_params: Search parameters (``{"nprobe": 32}``, ``{"ef": 256}``).
        batch_rows: Rows per insert request.
        timeout: Seconds to wait for the server on each call.
        id_filter_limit: Largest id list sent as ``id in [...]`` when a filter has no
            Milvus form.
    """

    fields: tuple[str, ...] = ()
    index_type: str = "AUTOINDEX"
    index_params: dict[str, Any] = field(default_factory=dict)
    search_params: dict[str, Any] = field(default_factory=dict)
    batch_rows: int = 4096
    timeout: float = 60.0
    id_filter_limit: int = 65_536

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> MilvusConfig:
        """A config from keyword options (``fields`` also as ``"a,b"``), naming unknown ones."""
        check_fields(cls, options, "Milvus index option")
        options = dict(options)
        names = options.get("fields", ())
        names = names.split(",") if isinstance(names, str) else names
        options["fields"] = tuple(str(f).strip() for f in names if str(f).strip())
        config = cls(**options)
        if config.batch_rows < 1 or config.id_filter_limit < 0:
            raise QuARIInputError("batch_rows must be positive and id_filter_limit ≥ 0")
        return config


def scalar_fields(eset: EmbeddingSet, names: tuple[str, ...]) -> dict[str, str]:
    """The Milvus scalar type of each named metadata column (checked in every shard).

    Raises:
        QuARIInputError: no metadata, an unknown column, a name Milvus cannot take, or a type
            with no Milvus scalar field.
    """
    if not names:
        return {}
    if not eset.has_metadata:
        raise QuARIInputError(f"{eset.root}: the set has no metadata to copy as fields {names}")
    out: dict[str, str] = {}
    for shard in eset.shards:
        schema = eset.metadata_table(shard).schema
        for name in names:
            if name in (PRIMARY, VECTOR) or not _NAME.match(name):
                raise QuARIInputError(
                    f"metadata column {name!r} cannot be a Milvus field (the names must be "
                    f"identifiers other than {PRIMARY!r} and {VECTOR!r})"
                )
            if name not in schema.names:
                raise QuARIInputError(
                    f"{eset.root}: no metadata column {name!r} (columns: {schema.names})"
                )
            kind = schema.field(name).type
            if pa.types.is_null(kind):
                continue  # an all-null shard fits any nullable field
            if pa.types.is_dictionary(kind):
                kind = kind.value_type
            milvus = _ARROW_TO_MILVUS.get(kind)
            if milvus is None or out.setdefault(name, milvus) != milvus:
                what = f"type {kind}" if milvus is None else "types that differ between shards"
                raise QuARIInputError(
                    f"metadata column {name!r} has {what}, which no Milvus scalar field holds"
                )
    for name in names:
        out.setdefault(name, "VARCHAR")  # null in every shard
    return out


def collection_name(given: str, name: str) -> str:
    """The collection a spec names, or ``quari_<index name>``; checked against Milvus' rule."""
    collection = given or f"quari_{name}"
    if not _NAME.match(collection):
        raise QuARIInputError(
            f"bad Milvus collection name {collection!r}: letters, digits and _ only, not "
            "starting with a digit"
        )
    return collection


def collection_schema(dim: int, field_types: dict[str, str]) -> Any:
    """``id`` INT64 primary, ``vector`` FLOAT_VECTOR(dim), nullable scalar fields."""
    pymilvus = pymilvus_module()
    schema = pymilvus.MilvusClient.create_schema(
        auto_id=False, enable_dynamic_field=False, description="quari candidate index"
    )
    schema.add_field(PRIMARY, pymilvus.DataType.INT64, is_primary=True)
    schema.add_field(VECTOR, pymilvus.DataType.FLOAT_VECTOR, dim=dim)
    for name, kind in field_types.items():
        extra = {"max_length": _MAX_VARCHAR} if kind == "VARCHAR" else {}
        schema.add_field(name, getattr(pymilvus.DataType, kind), nullable=True, **extra)
    return schema


def fingerprint_hash(fingerprint: list[list[Any]]) -> str:
    """sha256 of a set fingerprint (what the collection properties record)."""
    return hashlib.sha256(json.dumps(fingerprint, separators=(",", ":")).encode()).hexdigest()


def collection_properties(fingerprint: list[list[Any]]) -> dict[str, str]:
    """The properties that say quari built a collection, from which state of which set."""
    return {
        MARK: f"quari {__version__}",
        "quari.set_fingerprint": fingerprint_hash(fingerprint),
        "quari.set_shards": str(len(fingerprint)),
        "quari.set_rows": str(sum(int(r) for r, _ in fingerprint)),
    }


def recorded_state(props: dict[str, str], now: list[list[Any]]) -> list[list[Any]] | None:
    """The state of the set (``now``'s fingerprint or a prefix of it: the set only grew since)
    that a collection's properties record, or None when they record another set."""
    try:
        shards = int(props.get("quari.set_shards", "-1"))
    except ValueError:
        return None
    if 0 <= shards <= len(now) and (
        fingerprint_hash(now[:shards]) == props.get("quari.set_fingerprint")
    ):
        return now[:shards]
    return None


# -- connections --------------------------------------------------------------------------------
def pymilvus_module() -> Any:
    """``pymilvus``, or the error that names the extra."""
    try:
        import pymilvus
    except ImportError as exc:
        raise missing_extra("the Milvus index backend", "milvus", exc) from exc
    return pymilvus


def connect(uri: str, timeout: float, *, lite: bool) -> Any:
    """A ``MilvusClient`` for a server URI or a Milvus Lite database path.

    Servers read a token from ``QUARI_MILVUS_TOKEN`` (never stored). Release it with
    :func:`disconnect`; a Milvus Lite server (threads in this process, holding the database's
    lock) that this call started stops when quari's last client of it closes — one that was
    already running (opened by other code in this process) is left running.

    Raises:
        StoreError: the server cannot be reached, the database cannot be opened.
        LockError: another process has the Lite database open.
    """
    if lite and importlib.util.find_spec("milvus_lite") is None:
        raise missing_extra("the milvus-lite index backend", "milvus")
    pymilvus = pymilvus_module()
    token = "" if lite else os.environ.get("QUARI_MILVUS_TOKEN", "")
    # Unlocked now means no server has the database open yet: the one pymilvus starts is ours.
    starts_server = lite and not _locked(Path(uri))
    try:
        client = pymilvus.MilvusClient(uri=uri, token=token, timeout=timeout)
    except pymilvus.MilvusException as exc:
        if lite and _locked(Path(uri)):
            raise LockError(
                f"Milvus Lite database {uri} is open in another process (Milvus Lite allows "
                "one process per database)"
            ) from exc
        what = "open Milvus Lite database" if lite else "connect to Milvus at"
        raise StoreError(f"cannot {what} {uri}: {_message(exc)}") from exc
    if lite:
        _LITE_USERS[uri] += 1
        if starts_server:
            _LITE_STARTED.add(uri)
    return client


def disconnect(client: Any, uri: str, *, lite: bool) -> None:
    """Closes a client from :func:`connect`."""
    client.close()
    if lite and _LITE_USERS[uri] > 0:
        _LITE_USERS[uri] -= 1
        if _LITE_USERS[uri] == 0:
            del _LITE_USERS[uri]
            if uri in _LITE_STARTED:
                _LITE_STARTED.discard(uri)
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(uri)


@contextmanager
def milvus_errors(where: str, what: str, expr: str = "") -> Iterator[None]:
    """Turns Milvus client errors into a :class:`StoreError` naming the collection."""
    pymilvus = pymilvus_module()
    try:
        yield
    except pymilvus.MilvusException as exc:
        detail = f" (filter: {expr})" if expr else ""
        raise StoreError(f"{where}: {what} failed: {_message(exc)}{detail}") from exc


# -- reading ------------------------------------------------------------------------------------
def count_rows(client: Any, collection: str) -> int:
    """Entities in the collection (strong consistency: every acknowledged insert counts)."""
    res = client.query(
        collection, filter="", output_fields=["count(*)"], consistency_level="Strong"
    )
    return int(res[0]["count(*)"])


def stored_ids(client: Any, collection: str, start: int) -> np.ndarray:
    """Sorted ids ≥ ``start`` the collection holds, each once. Ids held twice (a server accepts
    a retried insert twice) are deleted here, so the caller inserts them again, once."""
    out: list[int] = []
    it = client.query_iterator(
        collection,
        filter=f"{PRIMARY} >= {int(start)}",
        output_fields=[PRIMARY],
        batch_size=16_384,
        consistency_level="Strong",
    )
    try:
        while batch := it.next():
            out.extend(int(r[PRIMARY]) for r in batch)
    finally:
        it.close()
    ids, counts = np.unique(np.asarray(out, dtype=np.int64), return_counts=True)
    if (counts > 1).any():
        client.delete(collection, ids=ids[counts > 1].tolist())
    return ids[counts == 1]


def _message(exc: Exception) -> str:
    return str(getattr(exc, "message", None) or exc)


def _locked(path: Path) -> bool:
    """Whether another process holds the Milvus Lite database's lock file."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: cannot tell
        return False
    lock = path / "LOCK"
    if not lock.is_file():
        return False
    with open(lock, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False
