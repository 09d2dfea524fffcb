"""ILIAS (Kordopatis-Zilos et al., CVPR 2025) and mini-ILIAS: image→image and text→image
instance retrieval at scale, mAP@1k.

Inputs, as the official release lays them out (``ilias-vrg/ilias``, ``ilias_data/``)::

    image_ids/image_query_ids.txt       comma-separated, column 0 the id
                                        (``<instance>/query/Q000_00.jpg``)
    image_ids/text_query_ids.txt        one id per line (``<instance>/query/T000.txt``)
    image_ids/positive_ids.txt          ``id,scale,clutter`` (``<instance>/pos/P000_00.jpg``)
    image_ids/mini_ilias_yfcc100m_ids.txt   the 5M mini-ILIAS distractors (``<shard>/<key>``)
    misc/taxonomy.json                  optional: coarse → mid → fine → [instances]
    features_image_queries.hdf5, features_text_queries.hdf5, features_positives.hdf5,
    features_distractors_00000.hdf5 …   datasets ``index`` (ascii ids) and ``features`` (fp16)

The id lists are parsed line by line (never ``np.loadtxt``, which returns a string instead of
a list for a one-line file and fails on one-column input). The **gallery** is the positives
followed by the distractors (files in name order; mini-ILIAS keeps the distractors whose key —
the part after the last ``/`` — is in the mini list, as the official ``dataset.py::filter``
matches), imported once into an :class:`~quari.store.EmbeddingSet` in a cache folder with
metadata ``id`` and ``instance`` (:func:`import_gallery`; ``quari eval ilias-import``), so
search runs through the normal store, index and Retriever. Queries are **not** in the gallery.

A query's instance is the first path component of its id; its relevant items are that
instance's positives (positives of other instances are negatives), R = |positives| from
``positive_ids.txt``. Metric: AP@1000 with the min(R, k) normaliser and scikit-learn's tie rule
(``evaluation/src/dataset.py``), averaged over **queries** (the official mAP); ``r@1000`` is
ILIAS's "oracle". Image→image and text→image are separate evaluators (``track``), never mixed.
Per-category breakdowns (with ``misc/taxonomy.json``) average within each instance first, as
ILIAS's category tables do.

Example:
    >>> ev = IliasEvaluator("ilias_data", track="t2i", mini=True)  # doctest: +SKIP
    >>> ev.evaluate(model, mode="rerank").metrics["ap@1000"]  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from quari.encoders import Encoder
from quari.errors import DataError, NotFoundError, QuARIInputError, missing_extra
from quari.eval.metrics import Ties
from quari.eval.protocols.base import Evaluator, QuerySet, group_means
from quari.eval.protocols.io import cached_set, default_cache_dir, digest, file_fingerprint
from quari.store import EmbeddingSet

__all__ = [
    "IliasEvaluator",
    "distractor_files",
    "import_gallery",
    "instance_of",
    "key_of",
    "read_features",
    "read_ids",
    "read_taxonomy",
]

TRACKS = {
    "i2i": ("image_query_ids.txt", "features_image_queries.hdf5"),
    "t2i": ("text_query_ids.txt", "features_text_queries.hdf5"),
}
MINI_IDS = "mini_ilias_yfcc100m_ids.txt"
_DISTRACTORS = re.compile(r"^features_distractors_(\d+)\.hdf5$")


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:
        raise missing_extra("ILIAS features (HDF5)", "eval", exc) from exc
    return h5py


def instance_of(item_id: str) -> str:
    """The instance of an ILIAS query or positive id: its first path component."""
    return item_id.split("/", 1)[0]


def key_of(item_id: str) -> str:
    """The key part of a distractor id ``<shard>/<key>`` (the whole id if it has no ``/``)."""
    return item_id.rsplit("/", 1)[-1]


def read_ids(path: str | os.PathLike[str], column: int = 0) -> list[str]:
    """One column of a comma-separated id list (``.gz`` too); blank lines are skipped.

    Works for one-line and one-column files alike (the cases ``np.loadtxt`` gets wrong).

    Raises:
        NotFoundError: no such file.
        DataError: a line with fewer columns.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such id list")
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = [p.strip() for p in line.split(",")]
            if len(parts) <= column:
                raise DataError(f"{path}: line {n} has no column {column}: {line!r}")
            out.append(parts[column])
    return out


def read_taxonomy(path: str | os.PathLike[str]) -> dict[str, str]:
    """``misc/taxonomy.json`` → instance → its coarse category (the top-level key)."""
    data = json.loads(Path(path).read_text())
    out: dict[str, str] = {}

    def walk(node: Any, top: str) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value, top)
        elif isinstance(node, list):
            for item in node:
                if isinstance(item, str):
                    out[item] = top
                else:
                    walk(item, top)

    if not isinstance(data, dict):
        raise DataError(f"{path}: expected coarse categories as a JSON object")
    for coarse, node in data.items():
        walk(node, str(coarse))
    return out


def read_features(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray]:
    """(ids, (n, E) features) of one ILIAS HDF5 file (datasets ``index`` and ``features``)."""
    ids, chunks = [], []
    for part_ids, part in _iter_features(Path(path), 1 << 30):
        ids += part_ids
        chunks.append(part)
    return ids, np.concatenate(chunks) if chunks else np.empty((0, 0), np.float16)


def _iter_features(path: Path, rows: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """Streams an HDF5 feature file in blocks of ``rows``: (ids, features)."""
    h5py = _h5py()
    if not path.is_file():
        raise NotFoundError(f"{path}: no such feature file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        if "index" not in f or "features" not in f:
            raise DataError(f"{path}: expected HDF5 datasets 'index' and 'features'")
        index, features = f["index"], f["features"]
        if features.ndim != 2 or index.shape[0] != features.shape[0]:
            raise DataError(
                f"{path}: 'index' has {index.shape[0]} ids, 'features' shape {features.shape}"
            )
        for start in range(0, features.shape[0], rows):
            ids = [
                x.decode() if isinstance(x, bytes) else str(x) for x in index[start : start + rows]
            ]
            yield ids, np.asarray(features[start : start + rows])


def distractor_files(features: str | os.PathLike[str]) -> list[Path]:
    """``features_distractors_*.hdf5`` in numeric order."""
    found = [
        (int(m.group(1)), p) for p in Path(features).iterdir() if (m := _DISTRACTORS.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def import_gallery(
    features: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    mini_ids: str | os.PathLike[str] | None = None,
    shard_rows: int = 1 << 17,
    progress: bool = True,
) -> EmbeddingSet:
    """Writes positives + distractors as an embedding set (metadata ``id``, ``instance``).

    Args:
        features: The folder with ``features_positives.hdf5`` and ``features_distractors_*``.
        out: The new set's folder (must not hold a set).
        mini_ids: The mini-ILIAS id list: keep only distractors whose key is listed.
        shard_rows: Rows per shard (bounds the memory of one append).
        progress: Show a progress bar.

    Returns:
        The set: positives first (in file order), then the kept distractors.
    """
    features = Path(features)
    keep = None if mini_ids is None else {key_of(x) for x in read_ids(mini_ids)}
    files = [features / "features_positives.hdf5", *distractor_files(features)]
    eset: EmbeddingSet | None = None
    buf_ids: list[str] = []
    buf_instances: list[str] = []
    buf: list[np.ndarray] = []

    def flush() -> None:
        nonlocal eset, buf_ids, buf_instances, buf
        if not buf_ids:
            return
        vectors = np.concatenate(buf)
        if eset is None:
            eset = EmbeddingSet.create(out, dim=vectors.shape[1], encoder="unknown")
        eset.append(vectors, {"id": buf_ids, "instance": buf_instances})
        buf_ids, buf_instances, buf = [], [], []

    bar = tqdm(desc="import ILIAS gallery", unit="row", disable=not progress)
    for n, path in enumerate(files):
        for ids, part in _iter_features(path, shard_rows):
            if n and keep is not None:  # distractors only: positives are all kept
                mask = np.fromiter((key_of(i) in keep for i in ids), bool, len(ids))
                ids, part = [i for i, m in zip(ids, mask, strict=True) if m], part[mask]
            buf_ids += ids
            # positives (file 0) carry their instance; distractors belong to none
            buf_instances += [instance_of(i) for i in ids] if n == 0 else [""] * len(ids)
            buf.append(part)
            bar.update(len(ids))
            if len(buf_ids) >= shard_rows:
                flush()
    flush()
    bar.close()
    if eset is None:
        raise DataError(f"{features}: the feature files hold no gallery rows")
    return eset


class IliasEvaluator(Evaluator):
    """ILIAS or mini-ILIAS, one track (``i2i`` or ``t2i``), mAP@1k.

    Args:
        root: The ILIAS data folder (``image_ids/``, optional ``misc/taxonomy.json``).
        features: The folder holding the HDF5 feature files (default: ``root``).
        track: ``"i2i"`` (image queries) or ``"t2i"`` (text queries).
        mini: mini-ILIAS (5M distractors from ``image_ids/mini_ilias_yfcc100m_ids.txt``).
        gallery: An already imported gallery set (default: imported into ``cache`` once).
        cache: Folder for imported galleries (default: ``default_cache_dir() / "eval"``).
        k: Cut-off (official: 1000).
        ties: Tie rule (official: scikit-learn's).
        progress: Progress bar while importing.
    """

    primary_metric = "ap@1000"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        features: str | os.PathLike[str] | None = None,
        track: str = "i2i",
        mini: bool = False,
        gallery: str | os.PathLike[str] | EmbeddingSet | None = None,
        cache: str | os.PathLike[str] | None = None,
        k: int = 1000,
        ties: Ties = "sklearn",
        progress: bool = False,
    ) -> None:
        if track not in TRACKS:
            raise QuARIInputError(f"ILIAS tracks are i2i and t2i, got {track!r}")
        super().__init__(split="mini" if mini else "full", k=k, ties=ties)
        self.root = Path(root)
        self.features = Path(features) if features is not None else self.root
        self.track = track
        self.mini = mini
        self.protocol = f"{'mini-' if mini else ''}ilias-{track}"
        self.metrics = (f"ap@{k}", f"r@{k}", "mrr")
        self.primary_metric = f"ap@{k}"
        self.cache = Path(cache) if cache is not None else default_cache_dir() / "eval"
        self.progress = progress
        self._gallery = EmbeddingSet.open(gallery) if isinstance(gallery, (str, Path)) else gallery

    @property
    def gallery(self) -> EmbeddingSet:
        """The imported gallery (positives + distractors), imported on first use."""
        if self._gallery is None:
            files = [self.features / "features_positives.hdf5", *distractor_files(self.features)]
            mini = self.root / "image_ids" / MINI_IDS if self.mini else None
            if mini is not None and not mini.is_file():
                raise NotFoundError(f"{mini}: the mini-ILIAS id list is needed for --mini")
            source = {
                "protocol": "ilias",
                "files": file_fingerprint(files),
                "mini": None if mini is None else file_fingerprint([mini]),
            }
            name = f"ilias-{'mini' if self.mini else 'full'}-{digest(source)}"
            self._gallery = cached_set(
                self.cache / name,
                source,
                lambda tmp: import_gallery(
                    self.features, tmp, mini_ids=mini, progress=self.progress
                ),
            )
        return self._gallery

    def load_queries(self, encoder: Encoder | None = None) -> QuerySet:
        id_file, feature_file = TRACKS[self.track]
        t0 = time.perf_counter()
        wanted = read_ids(self.root / "image_ids" / id_file)
        have_ids, have = read_features(self.features / feature_file)
        row = {x: i for i, x in enumerate(have_ids)}
        missing = [x for x in wanted if x not in row]
        if missing:
            raise DataError(
                f"{self.features / feature_file}: no features for query {missing[0]!r} "
                f"({len(missing)} of {len(wanted)} missing)"
            )
        vectors = have[[row[x] for x in wanted]].astype(np.float32)
        positives = read_ids(self.root / "image_ids" / "positive_ids.txt")
        per_instance: dict[str, int] = {}
        for p in positives:
            per_instance[instance_of(p)] = per_instance.get(instance_of(p), 0) + 1
        eset = self.gallery
        rows_of: dict[str, list[int]] = {}
        for shard in eset.shards:  # positives only: distractors have an empty instance
            column = pc.cast(eset.metadata_table(shard).column("instance"), pa.string())
            positive = pc.fill_null(pc.not_equal(column, ""), False)
            hits = np.flatnonzero(positive.to_numpy(zero_copy_only=False))
            for name, row in zip(
                column.take(pa.array(hits)).to_pylist(), hits + shard.offset, strict=True
            ):
                rows_of.setdefault(name, []).append(int(row))
        relevant, counts, query_instances = [], [], []
        for q in wanted:
            inst = instance_of(q)
            query_instances.append(inst)
            relevant.append(np.asarray(rows_of.get(inst, []), dtype=np.int64))
            counts.append(max(per_instance.get(inst, 0), len(rows_of.get(inst, []))))
        absent = sum(counts) - sum(r.size for r in relevant)
        if absent:
            self.notes.append(f"{absent} listed positives have no gallery row; they count in R")
        groups = {"instance": query_instances}
        taxonomy = self.root / "misc" / "taxonomy.json"
        if taxonomy.is_file():
            coarse = read_taxonomy(taxonomy)
            unknown = sorted({i for i in query_instances if i not in coarse})
            if unknown:
                raise DataError(f"{taxonomy}: no category for instance {unknown[0]!r}")
            groups["category"] = [coarse[i] for i in query_instances]
        seconds = time.perf_counter() - t0
        return QuerySet(list(wanted), vectors, relevant, np.asarray(counts), groups, None, seconds)

    def groups_of(
        self, per_query: dict[str, np.ndarray], queries: QuerySet
    ) -> dict[str, dict[str, dict[str, float]]]:
        """Per category, instance-first means (ILIAS's tables); the per-instance breakdown is
        not stored (the per-query values hold it)."""
        if "category" not in queries.groups:
            return {}
        return {
            "category": group_means(
                per_query, queries.groups["category"], units=queries.groups["instance"]
            )
        }
