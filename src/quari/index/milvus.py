"""The Milvus candidate-index backend (``milvus://HOST:PORT[/COLLECTION]``,
``milvus-lite:PATH.db[/COLLECTION]``; extra ``[milvus]``).

For collections of 10⁸–10⁹ images that already live in a vector database: quari writes the set's
vectors into a Milvus collection (a server, standalone or distributed, or Milvus Lite embedded in
the process — the same client API) and asks it for candidates; exact rescoring still reads the
set's fp16 rows (or, with ``Retriever(rescore_from="index")``, the collection's copies).

The collection holds ``id`` (INT64 primary key = the set's global row id), ``vector``
(FLOAT_VECTOR: the fp16 rows widened exactly; Milvus Lite has no FLOAT16_VECTOR) and the
metadata columns named in ``fields`` as nullable scalar fields, so ``--where`` filters run inside
Milvus (:mod:`quari.index.milvus_filters`). Its properties mark it as quari's and record which
state of which set it holds (a hash of the set's fingerprint), so a collection built from
another set is refused even without ``index/<name>.json``, and quari never writes to or deletes
from a collection it did not create.

Builds are resumable and duplicate-free: rows go in by id in batches; a rerun after a crash
asks the collection which ids it already holds and inserts only the others (and removes
duplicates a retried request may have left), so the collection ends with every row once.
``--update`` adds the rows appended to the set since, the same way.

Example:
    >>> index = CandidateIndex.build(eset, "milvus-lite:/data/milvus.db", fields=["label"],
    ...                              index_type="FLAT")  # doctest: +SKIP
    >>> scores, ids = index.search(q, k=1000, selection=RowFilter(ids, tree))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from tqdm.auto import tqdm

from quari import __version__
from quari.errors import LimitError, QuARIInputError, StoreError
from quari.filters import to_expression
from quari.index.base import CandidateIndex, RowFilter, Selection, StaleIndexError
from quari.index.milvus_client import (
    MARK,
    MAX_CANDIDATES,
    PRIMARY,
    VECTOR,
    VECTOR_INDEX,
    MilvusConfig,
    collection_name,
    collection_properties,
    collection_schema,
    connect,
    count_rows,
    disconnect,
    fingerprint_hash,
    milvus_errors,
    pymilvus_module,
    recorded_state,
    scalar_fields,
    stored_ids,
)
from quari.index.milvus_filters import to_milvus
from quari.store import EmbeddingSet
from quari.validation import as_embeddings, check_k

__all__ = ["MAX_CANDIDATES", "MilvusConfig", "MilvusIndex", "MilvusLiteIndex"]


class MilvusIndex(CandidateIndex):
    """Candidates from a Milvus collection (ids = the set's row ids); a server by URI.

    Build with ``CandidateIndex.build(eset, "milvus://host:19530/photos", fields=[...])``,
    open with ``CandidateIndex.load(eset)``; :meth:`close` (or ``with``) releases the client.
    """

    backend = "milvus"
    lite = False

    def __init__(
        self,
        eset: EmbeddingSet,
        client: Any,
        info: dict[str, Any],
        config: MilvusConfig,
        name: str = "image",
    ) -> None:
        super().__init__(eset, info, name)
        self.client = client
        self.config = config
        self._rows = int(info.get("rows", 0))

    # -- where the collection is ----------------------------------------------------------------
    @classmethod
    def locate(cls, target: str, name: str) -> tuple[str, str]:
        """``(uri, collection)`` of a spec remainder ``HOST:PORT[/COLLECTION]``."""
        host, _, collection = target.partition("/")
        if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", host or "-"):
            raise QuARIInputError(
                f"bad Milvus address {target!r}: expected milvus://HOST:PORT[/COLLECTION]"
            )
        return f"http://{host}", collection_name(collection, name)

    @classmethod
    def prepare_location(cls, info: dict[str, Any], eset: EmbeddingSet) -> None:
        """Hook for backends with local storage (Milvus Lite)."""
        return None

    @classmethod
    def resolve_uri(cls, info: dict[str, Any], eset: EmbeddingSet) -> str:
        """The URI to connect to, from the description."""
        return str(info["uri"])

    @classmethod
    def spec_for(cls, info: dict[str, Any]) -> str:
        return f"milvus://{str(info['uri']).removeprefix('http://')}/{info['collection']}"

    @property
    def collection(self) -> str:
        return str(self.info["collection"])

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        eset: EmbeddingSet,
        target: str,
        *,
        name: str,
        progress: bool,
        save: bool,
        overwrite: bool = False,
        **options: Any,
    ) -> MilvusIndex:
        """Builds (or resumes building) the collection; ``overwrite`` first drops a collection
        of that name that quari created (never one it did not)."""
        config = MilvusConfig.from_options(options)
        uri, collection = cls.locate(target, name)
        t0 = time.perf_counter()
        info = {
            "format": "quari-index",
            "backend": cls.backend,
            "uri": uri,
            "collection": collection,
            "metric": "inner_product",
            "dim": eset.dim,
            "fields": scalar_fields(eset, config.fields),
            "rows": 0,
            "fingerprint": eset.fingerprint,
            "encoder": eset.encoder,
            "created_collection": True,
            "quari_version": __version__,
            "config": asdict(config),
        }
        info["spec"] = cls.spec_for(info)
        cls.prepare_location(info, eset)
        client = connect(cls.resolve_uri(info, eset), config.timeout, lite=cls.lite)
        index = cls(eset, client, info, config, name)
        try:
            present = index._prepare_collection(overwrite)
            inserted = index._insert_missing(present, progress)
            index._finish_build()
        except BaseException:
            index.close()
            raise
        info.update(
            rows=index.rows,
            build_seconds=round(time.perf_counter() - t0, 3),
            build={"rows_present": int(present.sum()), "rows_inserted": inserted},
        )
        if save:
            index.save()
        return index

    def _prepare_collection(self, overwrite: bool) -> np.ndarray:
        """Creates the collection, or checks the one there; returns which rows it holds."""
        present = np.zeros(self.eset.rows, dtype=bool)
        with self._calls("collection setup"):
            exists = self.client.has_collection(self.collection)
            if exists:
                props = self._check_ours()
                if overwrite:
                    self.client.drop_collection(self.collection)
                    exists = False
                elif recorded_state(props, self.eset.fingerprint) is None:
                    raise StoreError(
                        f"{self._where()} was built from another set (or from a state of this "
                        "one that has since changed); pass overwrite=True (`quari index build "
                        "--overwrite`) to drop and rebuild it, or choose another collection"
                    )
                else:
                    self._check_schema()
            properties = collection_properties(self.info["fingerprint"])
            if not exists:
                self.client.create_collection(
                    self.collection,
                    schema=collection_schema(self.eset.dim, self.info["fields"]),
                    properties=properties,
                    consistency_level="Bounded",
                )
                self._ensure_index()
                return present
            # A build resumed: the collection now stands for the whole set, half-filled.
            self.client.alter_collection_properties(self.collection, properties)
            self._ensure_index()
            held = stored_ids(self.client, self.collection, 0)
        present[held[held < self.eset.rows]] = True
        return present

    def _insert_missing(self, present: np.ndarray, progress: bool) -> int:
        """Inserts every row not in ``present`` (by row id, in batches); returns how many."""
        bar = tqdm(total=int((~present).sum()), unit="rows", desc=f"milvus {self.collection}",
                   disable=not progress, leave=False)  # fmt: skip
        inserted = 0
        for offset, chunk in self.eset.iter_chunks(self.config.batch_rows):
            missing = np.flatnonzero(~present[offset : offset + chunk.shape[0]])
            if missing.size == 0:
                continue
            ids = offset + missing
            rows = self._rows_for(ids, np.asarray(chunk[missing], dtype=np.float32))
            with self._calls(f"insert of rows {ids[0]}…{ids[-1]}"):
                self.client.insert(self.collection, rows)
            inserted += ids.size
            bar.update(ids.size)
        bar.close()
        return inserted

    def _rows_for(self, ids: np.ndarray, vectors: np.ndarray) -> list[dict[str, Any]]:
        columns = {}
        if self.info["fields"]:
            table = self.eset.metadata(ids, columns=list(self.info["fields"]))
            columns = {name: table.column(name).to_pylist() for name in self.info["fields"]}
        return [
            {PRIMARY: int(row), VECTOR: vectors[i], **{k: v[i] for k, v in columns.items()}}
            for i, row in enumerate(ids.tolist())
        ]

    def _ensure_index(self) -> None:
        """Creates the vector index — again, when the collection has one of another type or
        parameters (a rebuild with another index reuses the inserted rows) — and loads the
        collection (a server searches and queries loaded collections only)."""
        pymilvus = pymilvus_module()
        wanted = json.dumps(
            {"type": self.config.index_type, "params": self.config.index_params}, sort_keys=True
        )
        props = self.client.describe_collection(self.collection).get("properties") or {}
        has_index = VECTOR in self.client.list_indexes(self.collection)
        if has_index and props.get(VECTOR_INDEX) != wanted:
            self.client.release_collection(self.collection)
            self.client.drop_index(self.collection, VECTOR)
            has_index = False
        if not has_index:
            params = pymilvus.MilvusClient.prepare_index_params()
            params.add_index(
                field_name=VECTOR,
                index_type=self.config.index_type,
                metric_type="IP",
                params=dict(self.config.index_params),
            )
            self.client.create_index(self.collection, params)
            self.client.alter_collection_properties(self.collection, {VECTOR_INDEX: wanted})
        self.client.load_collection(self.collection)

    def _finish_build(self) -> None:
        """Flushes the inserts and checks the row count."""
        with self._calls("flush"):
            self.client.flush(self.collection)
            self.client.load_collection(self.collection)
            self._rows = count_rows(self.client, self.collection)
        if self._rows != self.eset.rows:
            raise StoreError(
                f"{self._where()} holds {self._rows} rows after the build, the set {self.eset.rows}"
            )

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, eset: EmbeddingSet, info: dict[str, Any], name: str, **options: Any
    ) -> MilvusIndex:
        try:
            config = MilvusConfig.from_options({**info.get("config", {}), **options})
        except (TypeError, QuARIInputError) as exc:
            raise StoreError(f"index/{name}.json: bad Milvus index description ({exc})") from exc
        info.setdefault("spec", cls.spec_for(info))
        client = connect(cls.resolve_uri(info, eset), config.timeout, lite=cls.lite)
        index = cls(eset, client, info, config, name)
        try:
            index._check_opened()
        except BaseException:
            index.close()
            raise
        return index

    def _check_opened(self) -> None:
        with self._calls("open"):
            if not self.client.has_collection(self.collection):
                raise StoreError(
                    f"{self._where()} does not exist (dropped since the build?); rebuild it "
                    f"with `quari index build --backend {self.spec}`"
                )
            props = self._check_ours()
            self._check_schema()
            metric = self.client.describe_index(self.collection, VECTOR).get("metric_type")
            if str(metric).upper() != "IP":
                raise StoreError(
                    f"{self._where()} ranks by {metric}, quari needs inner product (IP); rebuild it"
                )
            if props.get("quari.set_fingerprint") != fingerprint_hash(self.info["fingerprint"]):
                state = recorded_state(props, self.eset.fingerprint)
                if state is None:
                    raise StaleIndexError(
                        f"{self._where()} holds vectors of another set (or of another state of "
                        f"this one) than index/{self.name}.json describes; rebuild it"
                    )
                # Updated since the description was written (a crash between the two): the
                # collection's own record is the newer one.
                self.info["fingerprint"] = state
            self.client.load_collection(self.collection)
            self._rows = count_rows(self.client, self.collection)

    def _check_ours(self) -> dict[str, str]:
        """The collection's properties; refuses a collection quari did not create."""
        props = dict(self.client.describe_collection(self.collection).get("properties") or {})
        if MARK not in props:
            raise StoreError(
                f"{self._where()} exists and was not created by quari; quari never writes to or "
                "deletes from such a collection — choose another collection name"
            )
        return props

    def _check_schema(self) -> None:
        """Refuses a collection whose vectors or scalar fields are not the index's."""
        described = self.client.describe_collection(self.collection)
        fields = {f.get("name"): f for f in described.get("fields", [])}
        vec = fields.pop(VECTOR, None)
        dim = int(vec.get("params", {}).get("dim", -1)) if vec else -1
        if dim != self.eset.dim:
            raise StoreError(
                f"{self._where()} holds {dim}-d vectors, the set {self.eset.root} {self.eset.dim}-d"
            )
        fields.pop(PRIMARY, None)
        scalars = {n: getattr(f.get("type"), "name", str(f.get("type"))) for n, f in fields.items()}
        if scalars != self.info["fields"]:
            raise StoreError(
                f"{self._where()} has the scalar fields {scalars}, the index wants "
                f"{self.info['fields']}; pass overwrite=True (`quari index build --overwrite`) "
                "to rebuild it with these fields"
            )

    # -- state ----------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self._rows

    def add_new_rows(self, progress: bool = True) -> int:
        start = int(self.info.get("rows", self._rows))
        present = np.zeros(self.eset.rows, dtype=bool)
        present[:start] = True
        with self._calls("id scan"):
            held = stored_ids(self.client, self.collection, start)  # an update resumed
        present[held[held < self.eset.rows]] = True
        self.info["fingerprint"] = self.eset.fingerprint
        inserted = self._insert_missing(present, progress)
        self._finish_build()
        self.info.update(rows=self._rows)
        return inserted

    def save(self) -> None:
        """Records the set's state in the collection's properties, then writes
        ``index/<name>.json``."""
        with self._calls("property update"):
            self.client.alter_collection_properties(
                self.collection, collection_properties(self.info["fingerprint"])
            )
        self.info["config"] = asdict(self.config)
        self.write_description()

    # -- searching ------------------------------------------------------------------------------
    def search(
        self, queries: Any, k: int, *, selection: Selection | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product, filtered inside Milvus.

        Results are checked against the passing row ids whenever those are known (a
        :class:`RowFilter`, or a filter whose Milvus form passes a superset); queries left
        short by the check are asked again for more (over-fetch, doubling up to
        :data:`MAX_CANDIDATES`), so an exact index returns what a local one would.
        """
        k = check_k(k)
        if k > MAX_CANDIDATES:
            raise LimitError(f"Milvus returns at most {MAX_CANDIDATES} candidates, asked for {k}")
        q = as_embeddings(queries, self.eset.dim, "queries").numpy()
        scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        ids = np.full((q.shape[0], k), -1, dtype=np.int64)
        expr, allowed, exact = self._filter(selection)
        if allowed is not None and allowed.size == 0:
            return scores, ids
        limit = k
        if allowed is not None and not exact:  # expect the superset's share of misses
            with self._calls("count", expr):
                passed = self.client.query(
                    self.collection, filter=expr, output_fields=["count(*)"]
                )[0]["count(*)"]
            limit = min(MAX_CANDIDATES, max(k, math.ceil(k * int(passed) / allowed.size)))
        todo = np.arange(q.shape[0])
        while todo.size:
            with self._calls("search", expr):
                hits = self.client.search(
                    self.collection,
                    data=list(q[todo]),
                    limit=limit,
                    anns_field=VECTOR,
                    filter=expr,
                    output_fields=[PRIMARY],
                    search_params={"metric_type": "IP", "params": dict(self.config.search_params)},
                )
            short = []
            for b, row in zip(todo, hits, strict=True):
                found = np.fromiter((h["id"] for h in row), np.int64, len(row))
                dist = np.fromiter((h["distance"] for h in row), np.float32, len(row))
                if allowed is not None:
                    # The ids are the truth: drops what a superset translation (or a server's
                    # own reading of nulls or float32 fields) let through.
                    pos = np.minimum(np.searchsorted(allowed, found), allowed.size - 1)
                    keep = allowed[pos] == found
                    found, dist = found[keep][:k], dist[keep][:k]
                    if found.size < min(k, allowed.size) and len(row) == limit:
                        short.append(b)  # Milvus had more to give
                ids[b, : found.size], scores[b, : found.size] = found, dist
            todo = np.asarray(short, dtype=np.int64)
            if limit >= MAX_CANDIDATES:
                break
            limit = min(MAX_CANDIDATES, 2 * limit)
        return scores, ids

    def _filter(self, selection: Selection | None) -> tuple[str, np.ndarray | None, bool]:
        """The Milvus expression for a selection, the sorted ids to check results against
        (None when unknown and not needed), and whether the expression is exact."""
        if selection is None:
            return "", None, True
        condition = allowed = None
        if isinstance(selection, RowFilter):
            condition, allowed = selection.condition, selection.ids
        elif isinstance(selection, pc.Expression):
            allowed = self.eset.select(selection)
        elif isinstance(selection, np.ndarray):
            allowed = np.sort(selection.astype(np.int64, copy=False))
        else:
            condition = selection
        problem = "the filter was given as row ids or a pyarrow expression"
        if condition is not None:
            try:
                nullable = dict.fromkeys(self.info["fields"], True)
                translated = to_milvus(condition, nullable, primary=PRIMARY)
            except QuARIInputError as exc:
                problem = str(exc)
                if allowed is None:
                    allowed = self.eset.select(to_expression(condition))
            else:
                if allowed is None and not translated.exact:
                    allowed = self.eset.select(to_expression(condition))
                return translated.expr, allowed, translated.exact
        if allowed.size > self.config.id_filter_limit:
            raise QuARIInputError(
                f"{problem}, and the {allowed.size:,} passing rows are too many to send as ids "
                f"(id_filter_limit = {self.config.id_filter_limit:,}); filter on the "
                f"collection's fields ({', '.join(self.info['fields']) or 'none'}) or rebuild "
                "the index with the columns you filter on as fields"
            )
        return f"{PRIMARY} in [{', '.join(map(str, allowed.tolist()))}]", allowed, True

    def fetch_vectors(self, ids: np.ndarray) -> np.ndarray:
        """The collection's copies of the rows ``ids`` (float32; the fp16 rows exactly)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        unique, inverse = np.unique(ids, return_inverse=True)
        found = np.zeros((unique.size, self.eset.dim), dtype=np.float32)
        seen = np.zeros(unique.size, dtype=bool)
        for start in range(0, unique.size, 8192):
            part = unique[start : start + 8192]
            with self._calls("vector fetch"):
                rows = self.client.get(self.collection, ids=part.tolist(), output_fields=[VECTOR])
            for r in rows:
                j = int(np.searchsorted(unique, int(r[PRIMARY])))
                found[j], seen[j] = np.asarray(r[VECTOR], dtype=np.float32), True
        if not seen.all():
            raise StaleIndexError(
                f"{self._where()} lacks row {int(unique[~seen][0])}; rebuild or update the index"
            )
        return found[inverse]

    # -- plumbing -------------------------------------------------------------------------------
    def close(self) -> None:
        """Closes the client (safe to call twice); the last client of a Milvus Lite database
        also stops its in-process server."""
        client, self.client = self.client, None
        if client is not None:
            disconnect(client, self.resolve_uri(self.info, self.eset), lite=self.lite)

    def __enter__(self) -> MilvusIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _where(self) -> str:
        return f"Milvus collection {self.collection!r} at {self.info['uri']}"

    def _calls(self, what: str, expr: str = "") -> Any:
        if self.client is None:
            raise StoreError(f"{self._where()}: the index was closed")
        return milvus_errors(self._where(), what, expr)


class MilvusLiteIndex(MilvusIndex):
    """Candidates from a Milvus Lite database (a folder ``*.db``), embedded in this process.

    One process at a time may open a database; its path is recorded relative to the set when
    it lies inside the set's folder, so the set can move with it.
    """

    backend = "milvus-lite"
    lite = True

    @classmethod
    def locate(cls, target: str, name: str) -> tuple[str, str]:
        """``(path, collection)`` of a spec remainder ``PATH.db[/COLLECTION]``."""
        m = re.fullmatch(r"(?P<path>.+?\.db)(?:/(?P<collection>[^/]*))?", target.strip())
        if m is None:
            raise QuARIInputError(
                f"bad Milvus Lite location {target!r}: expected milvus-lite:PATH.db[/COLLECTION]"
            )
        path = str(Path(m["path"]).expanduser().absolute())
        return path, collection_name(m["collection"] or "", name)

    @classmethod
    def prepare_location(cls, info: dict[str, Any], eset: EmbeddingSet) -> None:
        path = Path(info["uri"])
        path.parent.mkdir(parents=True, exist_ok=True)
        root = eset.root.absolute()
        if path.is_relative_to(root):
            info["uri"], info["uri_relative_to_set"] = path.relative_to(root).as_posix(), True

    @classmethod
    def resolve_uri(cls, info: dict[str, Any], eset: EmbeddingSet) -> str:
        path = Path(info["uri"])
        return str(eset.root.absolute() / path if info.get("uri_relative_to_set") else path)

    @classmethod
    def spec_for(cls, info: dict[str, Any]) -> str:
        return f"milvus-lite:{info['uri']}/{info['collection']}"
