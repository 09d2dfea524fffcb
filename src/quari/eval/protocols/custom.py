"""Your own labelled queries over your own embedding set (``quari eval custom``).

The queries are a parquet file, one row per query (the format the real-image tracks and the
demo share):

=================  ==============================================================================
``query_id``       string, unique
``label``          optional display text
``text``           the query as text (needs an encoder: the set's text tower)        ┐ exactly
``image``          an image file, relative to the parquet file's folder (encoder)    │ one of
``embedding``      list<float32>, the query embedding                               │ these per
``row``            int64, a gallery row used as the query (its stored vector)       ┘ row
``relevant``       list<int64>, the relevant gallery row ids                        ┐ exactly
``relevant_where`` a ``--where`` filter over the set's metadata, e.g. ``label == "bird"``┘ one
``group``          optional string: per-group breakdowns
=================  ==============================================================================

A column may be absent when no row uses it. R is the number of relevant rows (all of them:
the metric penalises relevant rows outside the top k). A ``row`` query is searched like any
other: its own row is not removed from the results, so list it in ``relevant`` only if
finding it counts.

Example:
    >>> ev = CustomEvaluator("queries.parquet", "my-set", k=50)  # doctest: +SKIP
    >>> ev.evaluate(model, mode="adaptive", encoder=enc).metrics  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from quari.embed.images import load_image
from quari.encoders import Encoder
from quari.errors import QuARIInputError
from quari.eval.metrics import Ties
from quari.eval.protocols.base import Evaluator, QuerySet
from quari.eval.protocols.io import read_parquet
from quari.filters import parse_where
from quari.store import EmbeddingSet

__all__ = ["QUERY_KINDS", "CustomEvaluator", "read_custom_queries"]

QUERY_KINDS = ("text", "image", "embedding", "row")
_RELEVANCE = ("relevant", "relevant_where")


def read_custom_queries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads and checks a custom-query parquet file.

    Returns:
        One dict per query with ``query_id``, ``label``, ``kind`` (one of
        :data:`QUERY_KINDS`), ``value`` (the query: text, absolute image path, vector or row),
        ``relevant`` (list of ints) or ``relevant_where`` (str), and ``group``.

    Raises:
        NotFoundError: no such file.
        QuARIInputError: naming the row and the problem (no query or two, no relevance or two,
            a repeated query_id, a bad type).
    """
    path = Path(path)
    table = read_parquet(path, "query file")
    names = table.column_names
    if "query_id" not in names:
        raise QuARIInputError(f"{path}: no query_id column (columns: {names})")
    if not any(k in names for k in QUERY_KINDS):
        raise QuARIInputError(f"{path}: needs one of the query columns {list(QUERY_KINDS)}")
    if not any(k in names for k in _RELEVANCE):
        raise QuARIInputError(f"{path}: needs a relevant or relevant_where column")
    out, seen = [], set()
    for i, row in enumerate(table.to_pylist()):
        where = f"{path}: row {i} (query_id {row.get('query_id')!r})"
        qid = row["query_id"]
        if qid is None or str(qid) == "":
            raise QuARIInputError(f"{path}: row {i} has no query_id")
        qid = str(qid)
        if qid in seen:
            raise QuARIInputError(f"{where}: the query_id appears twice")
        seen.add(qid)
        kinds = [k for k in QUERY_KINDS if row.get(k) is not None]
        if len(kinds) != 1:
            raise QuARIInputError(
                f"{where}: give exactly one of {list(QUERY_KINDS)}, got {kinds or 'none'}"
            )
        rels = [k for k in _RELEVANCE if row.get(k) is not None]
        if len(rels) != 1:
            raise QuARIInputError(f"{where}: give exactly one of relevant and relevant_where")
        kind, value = kinds[0], row[kinds[0]]
        if kind == "text" and not (isinstance(value, str) and value.strip()):
            raise QuARIInputError(f"{where}: text must be a non-empty string")
        if kind == "image":
            value = path.parent / str(value)
        if kind == "row" and (isinstance(value, bool) or not isinstance(value, int)):
            raise QuARIInputError(f"{where}: row must be an integer row id")
        entry: dict[str, Any] = {
            "query_id": qid,
            "label": row.get("label") or qid,
            "kind": kind,
            "value": value,
            "group": "" if row.get("group") is None else str(row["group"]),
        }
        if rels[0] == "relevant":
            ids = row["relevant"]
            if not isinstance(ids, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in ids
            ):
                raise QuARIInputError(f"{where}: relevant must be a list of row ids")
            entry["relevant"] = ids
        else:
            entry["relevant_where"] = str(row["relevant_where"])
        out.append(entry)
    return out


class CustomEvaluator(Evaluator):
    """Labelled queries of your own over an embedding set.

    Args:
        queries: The query parquet file (module docstring).
        gallery: The embedding set (folder or open set).
        k: Cut-off of the ranked lists (metrics: AP@k, nDCG@k, MRR, P@10, R@k).
        split: Label recorded in results.
        ties: Tie rule (default scikit-learn's, as the benchmarks).
    """

    protocol = "custom"
    primary_metric = "ap@100"

    def __init__(
        self,
        queries: str | os.PathLike[str],
        gallery: str | os.PathLike[str] | EmbeddingSet,
        *,
        k: int = 100,
        split: str = "custom",
        ties: Ties = "sklearn",
    ) -> None:
        super().__init__(split=split, k=k, ties=ties)
        self.path = Path(queries)
        self._gallery = gallery if isinstance(gallery, EmbeddingSet) else EmbeddingSet.open(gallery)
        self.metrics = (f"ap@{k}", f"ndcg@{k}", "mrr", f"p@{min(10, k)}", f"r@{k}")
        self.primary_metric = f"ap@{k}"

    @property
    def gallery(self) -> EmbeddingSet:
        return self._gallery

    def load_queries(self, encoder: Encoder | None = None) -> QuerySet:
        rows = read_custom_queries(self.path)
        eset = self.gallery
        E = eset.dim
        vectors = np.zeros((len(rows), E), dtype=np.float32)
        seconds = 0.0
        for kind in QUERY_KINDS:
            at = [i for i, r in enumerate(rows) if r["kind"] == kind]
            if not at:
                continue
            values = [rows[i]["value"] for i in at]
            if kind in ("text", "image") and encoder is None:
                raise QuARIInputError(
                    f"{self.path}: {kind} queries (e.g. {rows[at[0]]['query_id']!r}) need an "
                    "encoder (--encoder, the set's own)"
                )
            t0 = time.perf_counter()
            if kind == "text":
                got = encoder.encode_texts(values)
            elif kind == "image":
                got = encoder.encode_images([load_image(v).image for v in values])
            elif kind == "embedding":
                got = self._embeddings(values, [rows[i]["query_id"] for i in at])
            else:
                bad = [v for v in values if not 0 <= v < eset.rows]
                if bad:
                    raise QuARIInputError(
                        f"{self.path}: query row {bad[0]} is outside the set (0 … {eset.rows - 1})"
                    )
                got = eset.gather(np.asarray(values, dtype=np.int64)).astype(np.float32)
            if kind in ("text", "image"):
                seconds += time.perf_counter() - t0
            vectors[at] = np.asarray(got, dtype=np.float32)
        relevant = [self._relevant(r) for r in rows]
        groups = {"group": [r["group"] for r in rows]} if any(r["group"] for r in rows) else {}
        return QuerySet(
            [r["query_id"] for r in rows],
            vectors,
            relevant,
            np.asarray([r.size for r in relevant]),
            groups,
            None,
            seconds,
        )

    def _embeddings(self, values: list[Any], ids: list[str]) -> np.ndarray:
        out = []
        for qid, v in zip(ids, values, strict=True):
            vec = np.asarray(v, dtype=np.float32)
            if vec.shape != (self.gallery.dim,) or not np.isfinite(vec).all():
                raise QuARIInputError(
                    f"{self.path}: query {qid!r}: the embedding must be {self.gallery.dim} "
                    f"finite numbers (got shape {vec.shape})"
                )
            out.append(vec)
        return np.stack(out)

    def _relevant(self, row: dict[str, Any]) -> np.ndarray:
        eset = self.gallery
        if "relevant_where" in row:
            try:
                return eset.select(parse_where(row["relevant_where"]))
            except QuARIInputError as exc:
                raise QuARIInputError(f"{self.path}: query {row['query_id']!r}: {exc}") from None
        ids = np.unique(np.asarray(row["relevant"], dtype=np.int64))
        bad = ids[(ids < 0) | (ids >= eset.rows)]
        if bad.size:
            raise QuARIInputError(
                f"{self.path}: query {row['query_id']!r}: relevant row {int(bad[0])} is outside "
                f"the set (0 … {eset.rows - 1})"
            )
        return ids
