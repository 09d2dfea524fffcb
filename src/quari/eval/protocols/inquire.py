"""INQUIRE (Vendrow et al., NeurIPS 2024): the Fullrank and Rerank protocols.

**INQUIRE-Fullrank** ranks the whole iNat24 gallery (5M images) for every expert text query.
Inputs, in the official repository's layout (``inquire-benchmark/INQUIRE``)::

    data/inquire/inquire_queries_{val,test}.csv   ,query_id,query_text,supercategory,category,
                                                  iconic_group  (the first, unnamed column is
                                                  a pandas index)
    data/inquire/inquire_annotations.csv          query_id,image_id,image_path  (positives only;
                                                  image_path like train/<class>/<uuid>.jpg)
    data/inat24/embs/<model>/img_emb/img_emb_*.npy      clip-retrieval layout (the official
    data/inat24/embs/<model>/metadata/metadata_*.parquet  embedding tars); metadata column
                                                        ``image_path`` *without* ``.jpg``

The gallery folder opens as an :class:`~quari.store.EmbeddingSet` as it is. A gallery row is
relevant to a query when its ``image_path`` (a ``.jpg`` suffix ignored on both sides) is one of
the query's annotated positives. Metric: AP@50 with R = **every** annotated positive of the
query (positives outside the top 50 — or missing from the gallery — count against it), plus
nDCG@50, MRR, P@50 and R@50, as ``src/eval_fullrank.py`` computes them. Queries are texts:
embed them with ``encoder`` (the gallery's text tower) or give precomputed embeddings keyed by
``query_id`` (or by the query text, column ``query``).

**INQUIRE-Rerank** re-orders a fixed top-100 per query (HF ``evendrow/INQUIRE-Rerank``, read
from a local copy of its parquet files: ``data/validation-*.parquet``, ``data/test-*.parquet``,
17 columns). Metric as ``src/eval_rerank_with_clip.py``: AP over all 100 candidates with
R = the positives among them (reported as ``ap@100``; ``ap@50`` beside it for the papers that
print that name), nDCG and MRR; scikit-learn's tie rule. The candidates' embeddings come from
an ``encoder`` applied to the ``image`` column or from a precomputed file keyed by
``inat24_image_id``; they are written once as an embedding set in a cache folder, and every
query is searched through the Retriever restricted to its own 100 rows.

Example:
    >>> ev = InquireFullrank.from_root("INQUIRE", "siglip-so400m-14-384", split="test",
    ...                                query_embeddings="queries.parquet")  # doctest: +SKIP
    >>> ev.evaluate(model, mode="adaptive").metrics["ap@50"]  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from quari.embed.images import load_image
from quari.encoders import Encoder
from quari.errors import DataError, NotFoundError, QuARIInputError
from quari.eval.metrics import Ties, per_query_metrics
from quari.eval.protocols.base import EvalResult, Evaluator, QuerySet
from quari.eval.protocols.io import (
    cached_set,
    default_cache_dir,
    digest,
    file_fingerprint,
    read_keyed_embeddings,
)
from quari.store import EmbeddingSet

__all__ = [
    "RERANK_COLUMNS",
    "InquireFullrank",
    "InquireRerank",
    "read_annotations",
    "read_queries",
    "read_rerank_split",
]

#: The INQUIRE-Rerank release's columns (HF ``evendrow/INQUIRE-Rerank``, current revision).
RERANK_COLUMNS = (
    "image",
    "query",
    "relevant",
    "clip_score",
    "inat24_image_id",
    "inat24_file_name",
    "supercategory",
    "category",
    "iconic_group",
    "inat24_species_id",
    "inat24_species_name",
    "latitude",
    "longitude",
    "location_uncertainty",
    "date",
    "license",
    "rights_holder",
)
_QUERY_COLUMNS = ("query_id", "query_text", "supercategory", "category", "iconic_group")
_SPLITS = {"val": "validation", "validation": "validation", "test": "test"}


def _read_csv(path: Path, required: Sequence[str]) -> pa.Table:
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    try:
        # Strings stay strings (an all-empty iconic_group column must not become null-typed).
        table = pacsv.read_csv(path)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing columns {missing} (has {table.column_names})")
    return table


def read_queries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads ``inquire_queries_{val,test}.csv`` (the leading unnamed index column ignored).

    Returns:
        One dict per query: ``query_id`` (str), ``query_text``, ``supercategory``, ``category``,
        ``iconic_group`` ("" where empty).
    """
    path = Path(path)
    table = _read_csv(path, _QUERY_COLUMNS)
    rows = []
    for i, row in enumerate(table.select(list(_QUERY_COLUMNS)).to_pylist()):
        if row["query_id"] is None or not str(row["query_text"] or "").strip():
            raise DataError(f"{path}: row {i + 2} has no query_id or an empty query_text")
        rows.append({k: "" if v is None else str(v) for k, v in row.items()})
    ids = [r["query_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: a query_id appears twice")
    return rows


def read_annotations(path: str | os.PathLike[str]) -> dict[str, set[str]]:
    """Reads ``inquire_annotations.csv``: query_id → its positives' ``image_path`` values
    (``.jpg`` suffix removed)."""
    table = _read_csv(Path(path), ("query_id", "image_path"))
    out: dict[str, set[str]] = {}
    for qid, image in zip(
        table.column("query_id").to_pylist(), table.column("image_path").to_pylist(), strict=True
    ):
        out.setdefault(str(qid), set()).add(_stem(str(image)))
    return out


def _stem(path: str) -> str:
    return path[:-4] if path.lower().endswith(".jpg") else path


def _query_vectors(
    texts: list[str],
    ids: list[str],
    encoder: Encoder | None,
    embeddings: Path | None,
    dim: int,
) -> tuple[np.ndarray, float]:
    """(Q, E) embeddings of text queries: looked up by id (or text) in a keyed file, else
    encoded; and the seconds encoding took."""
    if embeddings is not None:
        key, table = read_keyed_embeddings(embeddings, ("query_id", "query"), dim)
        lookup = ids if key == "query_id" else texts
        missing = [x for x in lookup if _key(x, table) is None]
        if missing:
            raise QuARIInputError(
                f"{embeddings}: no embedding for {key} {missing[0]!r} ({len(missing)} missing)"
            )
        return np.stack([_key(x, table) for x in lookup]), 0.0
    if encoder is None:
        raise QuARIInputError(
            "INQUIRE queries are texts: give an encoder (--encoder, the gallery's text tower) "
            "or precomputed query embeddings (--query-embeddings)"
        )
    t0 = time.perf_counter()
    vectors = np.asarray(encoder.encode_texts(texts), dtype=np.float32)
    return vectors, time.perf_counter() - t0


def _key(value: str, table: dict[Any, np.ndarray]) -> np.ndarray | None:
    """A keyed vector, matching ids written as int or as str."""
    if value in table:
        return table[value]
    try:
        return table.get(int(value))
    except (TypeError, ValueError):
        return None


class InquireFullrank(Evaluator):
    """INQUIRE-Fullrank: text → whole-gallery retrieval, AP@50 with R = all annotated positives.

    Args:
        queries_csv: ``inquire_queries_{split}.csv``.
        annotations_csv: ``inquire_annotations.csv``.
        gallery: The embedding folder (clip-retrieval layout) or an open set.
        split: Label recorded in results (``"test"`` or ``"val"``).
        query_embeddings: Precomputed query embeddings (keyed by ``query_id`` or ``query``).
        k: Cut-off (official: 50).
        ties: Tie rule (official: scikit-learn's).
    """

    protocol = "inquire-fullrank"
    primary_metric = "ap@50"

    def __init__(
        self,
        queries_csv: str | os.PathLike[str],
        annotations_csv: str | os.PathLike[str],
        gallery: str | os.PathLike[str] | EmbeddingSet,
        *,
        split: str = "test",
        query_embeddings: str | os.PathLike[str] | None = None,
        k: int = 50,
        ties: Ties = "sklearn",
    ) -> None:
        super().__init__(split=split, k=k, ties=ties)
        self.queries_csv = Path(queries_csv)
        self.annotations_csv = Path(annotations_csv)
        self._gallery = gallery if isinstance(gallery, EmbeddingSet) else EmbeddingSet.open(gallery)
        self.query_embeddings = None if query_embeddings is None else Path(query_embeddings)
        self.metrics = (f"ap@{k}", f"ndcg@{k}", "mrr", f"p@{k}", f"r@{k}")
        self.primary_metric = f"ap@{k}"

    @classmethod
    def from_root(
        cls,
        root: str | os.PathLike[str],
        embeddings: str,
        *,
        split: str = "test",
        **kwargs: Any,
    ) -> InquireFullrank:
        """The evaluator for a checkout of the official repository with its embeddings.

        Args:
            root: The repository root (holding ``data/inquire`` and ``data/inat24/embs``).
            embeddings: A model key under ``data/inat24/embs`` (e.g. ``vit-h-14-378``) or a
                path to an embedding folder.
            split: ``"test"`` or ``"val"``.
            **kwargs: Passed to the constructor.
        """
        root = Path(root)
        if split not in ("val", "test"):
            raise QuARIInputError(f"INQUIRE-Fullrank splits are val and test, got {split!r}")
        gallery = Path(embeddings)
        if not gallery.is_dir():
            gallery = root / "data" / "inat24" / "embs" / embeddings
        data = root / "data" / "inquire"
        return cls(
            data / f"inquire_queries_{split}.csv",
            data / "inquire_annotations.csv",
            gallery,
            split=split,
            **kwargs,
        )

    @property
    def gallery(self) -> EmbeddingSet:
        return self._gallery

    def load_queries(self, encoder: Encoder | None = None) -> QuerySet:
        rows = read_queries(self.queries_csv)
        positives = read_annotations(self.annotations_csv)
        eset = self.gallery
        if not eset.has_metadata:
            raise DataError(f"{eset.root}: the gallery has no metadata (image_path column)")
        names = eset.metadata_table(eset.shards[0]).schema.names
        if "image_path" not in names:
            raise DataError(f"{eset.root}: gallery metadata has no image_path column ({names})")
        # Only the annotated positives are looked up (a 5M-row gallery stays in Arrow).
        wanted = pa.array(sorted({p for ps in positives.values() for p in ps}), pa.string())
        row_of: dict[str, int] = {}
        for shard in eset.shards:
            column = pc.cast(eset.metadata_table(shard).column("image_path"), pa.string())
            stems = pc.replace_substring_regex(column, r"\.[jJ][pP][gG]$", "")
            hits = np.flatnonzero(pc.is_in(stems, value_set=wanted).to_numpy(zero_copy_only=False))
            names = stems.take(pa.array(hits)).to_pylist()
            row_of.update(zip(names, (hits + shard.offset).tolist(), strict=True))
        relevant, counts, absent = [], [], 0
        for row in rows:
            wanted = positives.get(row["query_id"], set())
            found = [row_of[p] for p in wanted if p in row_of]
            absent += len(wanted) - len(found)
            relevant.append(np.asarray(sorted(found), dtype=np.int64))
            counts.append(len(wanted))  # R: every annotated positive, found or not
        if absent:
            self.notes.append(
                f"{absent} annotated positives are not in the gallery; they still count in R"
            )
        ids = [r["query_id"] for r in rows]
        texts = [r["query_text"] for r in rows]
        vectors, seconds = _query_vectors(texts, ids, encoder, self.query_embeddings, eset.dim)
        groups = {g: [r[g] or "(none)" for r in rows] for g in ("supercategory", "iconic_group")}
        return QuerySet(ids, vectors, relevant, np.asarray(counts), groups, None, seconds)


def read_rerank_split(path: str | os.PathLike[str], split: str) -> tuple[pa.Table, list[Path]]:
    """Reads one split of the INQUIRE-Rerank parquet release.

    Args:
        path: The release folder (``data/<split>-*.parquet`` below it, or the files directly in
            it) or one parquet file.
        split: ``"val"``/``"validation"`` or ``"test"``.

    Returns:
        (the table — every column but ``image`` — and the files read).

    Raises:
        NotFoundError: no files for the split.
        DataError: missing columns, ``relevant`` not 0/1.
    """
    path = Path(path)
    name = _SPLITS.get(split)
    if name is None:
        raise QuARIInputError(f"INQUIRE-Rerank splits are val and test, got {split!r}")
    if path.is_file():
        files = [path]
    else:
        files = sorted((path / "data").glob(f"{name}-*.parquet")) or sorted(
            path.glob(f"{name}-*.parquet")
        )
    if not files:
        raise NotFoundError(f"{path}: no {name}-*.parquet files (INQUIRE-Rerank release)")
    columns = [c for c in RERANK_COLUMNS if c != "image"]
    parts = []
    for f in files:
        schema = pq.read_schema(f)
        missing = [c for c in ("query", "relevant", "inat24_image_id") if c not in schema.names]
        if missing:
            raise DataError(f"{f}: missing INQUIRE-Rerank columns {missing}")
        parts.append(pq.read_table(f, columns=[c for c in columns if c in schema.names]))
    table = pa.concat_tables(parts, promote_options="permissive")
    rel = table.column("relevant").to_numpy()
    if not np.isin(rel, (0, 1)).all():
        raise DataError(f"{files[0]}: 'relevant' must hold 0 or 1")
    return table, files


class InquireRerank(Evaluator):
    """INQUIRE-Rerank: re-order each query's fixed 100 candidates; AP over the 100 with R =
    the positives among them.

    Args:
        release: The local copy of the parquet release (folder or file).
        split: ``"test"`` or ``"val"``.
        image_embeddings: Precomputed candidate embeddings keyed by ``inat24_image_id``.
        query_embeddings: Precomputed query embeddings keyed by ``query`` (the text).
        encoder: Embeds the candidate images (``image`` column) when no image embeddings are
            given (queries are embedded by the encoder given to :meth:`evaluate`).
        cache: Folder for the candidates' embedding set (default: ``default_cache_dir()``).
        k: Candidates ranked per query (official: 100, all of them).
        ties: Tie rule (official: scikit-learn's).
    """

    protocol = "inquire-rerank"
    primary_metric = "ap@100"
    fixed_candidates = True

    def __init__(
        self,
        release: str | os.PathLike[str],
        *,
        split: str = "test",
        image_embeddings: str | os.PathLike[str] | None = None,
        query_embeddings: str | os.PathLike[str] | None = None,
        encoder: Encoder | None = None,
        cache: str | os.PathLike[str] | None = None,
        k: int = 100,
        ties: Ties = "sklearn",
    ) -> None:
        super().__init__(split=_SPLITS.get(split, split), k=k, ties=ties)
        self.release = Path(release)
        self.table, self.files = read_rerank_split(self.release, split)
        self.image_embeddings = None if image_embeddings is None else Path(image_embeddings)
        self.query_embeddings = None if query_embeddings is None else Path(query_embeddings)
        self.encoder = encoder
        self.cache = Path(cache) if cache is not None else default_cache_dir() / "eval"
        self.metrics = (f"ap@{k}", f"ndcg@{k}", "mrr", "ap@50", "ndcg@50")
        self.primary_metric = f"ap@{k}"
        self._gallery: EmbeddingSet | None = None
        counts = pc.value_counts(self.table.column("query")).field("counts").to_numpy()
        if counts.size and counts.max() > k:
            raise QuARIInputError(
                f"a query of {self.release} has {int(counts.max())} candidates; k = {k} must "
                "cover them all"
            )

    @property
    def gallery(self) -> EmbeddingSet:
        """The candidates (each image once) as an embedding set, built once in the cache."""
        if self._gallery is None:
            ids = np.unique(self.table.column("inat24_image_id").to_numpy())
            source = {
                "protocol": self.protocol,
                "files": file_fingerprint(self.files),
                "image_embeddings": None
                if self.image_embeddings is None
                else file_fingerprint([self.image_embeddings]),
                "encoder": None if self.image_embeddings is not None else self._encoder_id(),
            }
            folder = self.cache / f"inquire-rerank-{self.split}-{digest(source)}"
            self._gallery = cached_set(folder, source, lambda tmp: self._write_gallery(tmp, ids))
        return self._gallery

    def _encoder_id(self) -> str:
        if self.encoder is None:
            raise QuARIInputError(
                "INQUIRE-Rerank needs the candidates' embeddings: give image embeddings keyed "
                "by inat24_image_id (--image-embeddings) or an encoder (--encoder)"
            )
        return self.encoder.id

    def _write_gallery(self, folder: Path, ids: np.ndarray) -> EmbeddingSet:
        if self.image_embeddings is not None:
            _, table = read_keyed_embeddings(self.image_embeddings, ("inat24_image_id",))
            missing = [int(i) for i in ids if int(i) not in table]
            if missing:
                raise QuARIInputError(
                    f"{self.image_embeddings}: no embedding for inat24_image_id {missing[0]} "
                    f"({len(missing)} of {ids.size} missing)"
                )
            vectors = np.stack([table[int(i)] for i in ids])
            encoder_id = "unknown"
        else:
            encoder_id = self._encoder_id()
            vectors = self._encode_images(ids)
        eset = EmbeddingSet.create(folder, dim=vectors.shape[1], encoder=encoder_id)
        names = _first_of(self.table, ids, "inat24_file_name")
        eset.append(vectors, {"inat24_image_id": ids.astype(np.int64), "inat24_file_name": names})
        return eset

    def _encode_images(self, ids: np.ndarray, batch: int = 128) -> np.ndarray:
        """Embeds each candidate image once, streaming the release in record batches (the
        decoded images of a whole split would not fit in memory)."""
        assert self.encoder is not None
        vectors: dict[int, np.ndarray] = {}
        for f in self.files:
            reader = pq.ParquetFile(f)
            for part in reader.iter_batches(batch, columns=["inat24_image_id", "image"]):
                new_ids, images = [], []
                for image_id, cell in zip(
                    part.column(0).to_pylist(), part.column(1).to_pylist(), strict=True
                ):
                    if image_id in vectors or image_id in new_ids:
                        continue
                    data = cell.get("bytes") if isinstance(cell, dict) else None
                    if not data:
                        raise DataError(f"{f}: image {image_id} has no bytes")
                    new_ids.append(image_id)
                    images.append(load_image(data).image)
                if images:
                    encoded = np.asarray(self.encoder.encode_images(images), np.float32)
                    vectors.update(zip(new_ids, encoded, strict=True))
        return np.stack([vectors[int(i)] for i in ids])

    def load_queries(self, encoder: Encoder | None = None) -> QuerySet:
        table = self.table
        texts_all = table.column("query").to_pylist()
        image_ids = table.column("inat24_image_id").to_numpy()
        labels = table.column("relevant").to_numpy()
        order = list(dict.fromkeys(texts_all))  # queries in order of first appearance
        position = {t: i for i, t in enumerate(order)}
        which = np.asarray([position[t] for t in texts_all])
        eset = self.gallery
        row_of = {
            int(v): i
            for i, v in enumerate(
                eset.metadata(np.arange(eset.rows)).column("inat24_image_id").to_pylist()
            )
        }
        relevant, counts, selections, groups = [], [], [], []
        supercategory = (
            table.column("supercategory").to_pylist()
            if "supercategory" in table.column_names
            else [""] * len(texts_all)
        )
        for q in range(len(order)):
            sel = np.flatnonzero(which == q)
            candidates = image_ids[sel]
            relevant.append(np.asarray([row_of[int(i)] for i in candidates[labels[sel] == 1]]))
            counts.append(int(labels[sel].sum()))  # R: the positives among the candidates
            selections.append(pc.field("inat24_image_id").isin(pa.array(candidates, pa.int64())))
            groups.append(str(supercategory[sel[0]] or ""))
        vectors, seconds = _query_vectors(
            order, order, encoder or self.encoder, self.query_embeddings, eset.dim
        )
        return QuerySet(
            list(order),
            vectors,
            relevant,
            np.asarray(counts),
            {"supercategory": groups},
            selections,
            seconds,
        )

    def initial_ranking(self) -> EvalResult:
        """The release's own order (``clip_score``: the ViT-H/14-378 first stage that chose the
        candidates) scored like any method — the "initial ranking" row of re-ranking tables.
        Its mode is ``"fixed"`` and it has no search time."""
        table = self.table
        texts = table.column("query").to_pylist()
        order = list(dict.fromkeys(texts))
        position = {t: i for i, t in enumerate(order)}
        which = np.asarray([position[t] for t in texts])
        labels = table.column("relevant").to_numpy()
        clip = table.column("clip_score").to_numpy()
        rel = np.zeros((len(order), self.k), dtype=bool)
        scores = np.full((len(order), self.k), -np.inf)
        for q in range(len(order)):
            sel = np.flatnonzero(which == q)
            rel[q, : sel.size], scores[q, : sel.size] = labels[sel] == 1, clip[sel]
        t0 = time.perf_counter()
        per_query = per_query_metrics(rel, None, self.metrics, scores=scores, ties=self.ties)
        queries = self.queries()
        timings = {"metric_s": time.perf_counter() - t0, "per_query_ms": 0.0}
        method = {"name": "initial (clip_score)", "kind": "initial"}
        return self.result(
            queries, per_query, self.groups_of(per_query, queries), method, "fixed", self.k,
            self.gallery.rows, timings, list(self.notes),
        )  # fmt: skip


def _first_of(table: pa.Table, ids: np.ndarray, column: str) -> list[str]:
    if column not in table.column_names:
        return [""] * ids.size
    first: dict[int, str] = {}
    for i, v in zip(
        table.column("inat24_image_id").to_pylist(), table.column(column).to_pylist(), strict=True
    ):
        first.setdefault(int(i), "" if v is None else str(v))
    return [first[int(i)] for i in ids]
