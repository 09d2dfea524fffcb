"""Training pairs over embedding sets: sources, mixtures, image-level splits, batches.

A training pair is (query embedding → target image row). A *caption set* is an
:class:`~quari.store.EmbeddingSet` with text embeddings: row i pairs ``text_emb`` row i (the
query) with ``img_emb`` row i (the target).

**Several captions per image** (COCO: 5): store one row per caption, the image's embedding
repeated on each of its rows, and a metadata column (e.g. ``image_id``) naming the image;
pass that column as ``image_key``. Rows sharing a key are one image: they are never split
between training and validation, the validation gallery holds each image once, and in a batch
another caption's copy of the positive image is masked out rather than treated as a negative.
This keeps clip-retrieval's row-aligned layout (every row has an image and a caption), and
the semi-positive miner collapses the repeated image rows (``quari.training.mining``).

**Mixtures**: several training sets, each with a ratio; every epoch draws
round(ratio_s / Σ ratio · epoch_pairs) pairs from set s (cycling through a fresh permutation of
its training rows when it has fewer), then shuffles them together. Without ratios, every set
contributes each of its training pairs once per epoch.

**Determinism**: the pairs of global step g are a pure function of (seed, epoch, step), so a
run resumed from a checkpoint at step g sees exactly the batches an uninterrupted run would
(:class:`ResumableBatchSampler` starts at the trainer's restored position). Under DDP the
global batch of world·B pairs is drawn once and rank r takes its r-th slice of B.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from quari.store import EmbeddingSet, StoreError
from quari.training.config import TrainConfig
from quari.training.mining import load_semipositives, mine_semipositives, mining_status
from quari.validation import QuARIInputError

__all__ = ["PairBatches", "ResumableBatchSampler", "Source", "TrainingData"]


@dataclass
class Source:
    """One embedding set's part in a run.

    Attributes:
        path: The set's folder.
        groups: (rows,) int64 image id of every row (0 … images − 1, first-seen order).
        train_rows / val_rows: Row ids (ascending) in each split; disjoint by image.
        ratio: Mixture ratio (None: proportional to size).
        semipos_ids / semipos_weights: (rows, P) mined semi-positives, or None.
        semipos_valid: (rows, P) bool — the id exists and is not a validation image.
        relevance: (rows,) int64 key of the ``relevance_key`` columns (equal across sets for
            equal values), or None without a relevance key.
    """

    path: Path
    groups: np.ndarray
    train_rows: np.ndarray
    val_rows: np.ndarray
    ratio: float | None = None
    semipos_ids: np.ndarray | None = None
    semipos_weights: np.ndarray | None = None
    semipos_valid: np.ndarray | None = None
    relevance: np.ndarray | None = None

    @property
    def images(self) -> int:
        return int(self.groups.max()) + 1 if self.groups.size else 0


def _open(path: Path) -> EmbeddingSet:
    return EmbeddingSet.open(path)


def _groups(eset: EmbeddingSet, image_key: str | None) -> np.ndarray:
    """Image id per row: the factorised ``image_key`` column, or the row itself."""
    if image_key is None:
        return np.arange(eset.rows, dtype=np.int64)
    if not eset.has_metadata:
        raise StoreError(f"{eset.root}: has no metadata, so no image key column {image_key!r}")
    names = eset.metadata_table(eset.shards[0]).schema.names
    if image_key not in names:
        raise QuARIInputError(
            f"{eset.root}: no metadata column {image_key!r} (image key); columns: {names}"
        )
    values = np.concatenate(
        [eset.metadata_table(s).column(image_key).to_numpy() for s in eset.shards]
    )
    if values.dtype == object:  # strings (or mixed): compare as text
        values = values.astype(str)
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    # Renumber in order of first appearance, so ids do not depend on how keys sort.
    rank = np.empty_like(first)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse].astype(np.int64)


def _check_columns(eset: EmbeddingSet, columns: tuple[str, ...], what: str) -> None:
    names = eset.metadata_table(eset.shards[0]).schema.names if eset.has_metadata else []
    missing = [c for c in columns if c not in names]
    if missing:
        raise QuARIInputError(
            f"{eset.root}: no metadata column {missing[0]!r} ({what}); columns: {names}"
        )


def _attach_relevance(
    sources: list[Source], sets: dict[Path, EmbeddingSet], key: tuple[str, ...]
) -> None:
    """Sets every source's ``relevance``: one int per distinct value combination of the
    ``key`` columns, numbered over all sources together."""
    combined = []
    for source in sources:
        eset = sets[source.path]
        _check_columns(eset, key, "--relevance-key")
        table = eset.metadata(np.arange(eset.rows), list(key))
        columns = [table.column(name).to_pylist() for name in key]
        combined.append(["\x1f".join(map(str, v)) for v in zip(*columns, strict=True)])
    _, keys = np.unique(np.concatenate([np.asarray(c, dtype=object) for c in combined]).astype(str),
                        return_inverse=True)  # fmt: skip
    start = 0
    for source, values in zip(sources, combined, strict=True):
        source.relevance = keys[start : start + len(values)].astype(np.int64)
        start += len(values)


def _split_groups(n_groups: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean (n_groups,) mask of validation images: a seeded ⌈fraction·n⌉ of them."""
    n_val = max(1, math.ceil(fraction * n_groups))
    mask = np.zeros(n_groups, dtype=bool)
    mask[np.random.default_rng([seed, 7]).permutation(n_groups)[:n_val]] = True
    return mask


class TrainingData:
    """The checked plan of a run: training sources, the validation split and queries.

    Built by :meth:`from_config`, which raises on every bad input before any training starts.
    Embedding sets are opened lazily in each process (the object pickles without its memory
    maps, as DDP spawn needs).

    Example:
        >>> data = TrainingData.from_config(config)  # doctest: +SKIP
        >>> data.summary()["train_pairs"]  # doctest: +SKIP
    """

    def __init__(
        self,
        sources: list[Source],
        val: Source,
        *,
        encoder: str,
        dim: int,
        image_key: str | None,
        val_max_queries: int,
        seed: int,
        relevance_key: tuple[str, ...] | None = None,
    ) -> None:
        self.sources = sources
        self.val = val
        self.encoder = encoder
        self.dim = dim
        self.image_key = image_key
        self.relevance_key = relevance_key
        self.val_max_queries = val_max_queries
        self.seed = seed
        self._sets: dict[Path, EmbeddingSet] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_sets"] = {}
        return state

    def open(self, path: Path) -> EmbeddingSet:
        """The embedding set at ``path`` (opened once per process)."""
        if path not in self._sets:
            self._sets[path] = _open(path)
        return self._sets[path]

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: TrainConfig, *, progress: bool = True) -> TrainingData:
        """Opens and checks every set, splits by image, loads (or mines) semi-positives.

        Raises:
            QuARIInputError: sets from different encoders or dimensions, a set without text
                embeddings, a missing image-key column, an empty training or validation split.
            StoreError: unreadable sets; stale semi-positives that cannot be re-mined.
        """
        train_paths = [s.path for s in config.train]
        if len(set(map(_norm, train_paths))) != len(train_paths):
            raise QuARIInputError("the same training set is given twice")
        sets = {p: _open(p) for p in train_paths}
        val_path = config.val
        if val_path is not None and _norm(val_path) not in {_norm(p) for p in train_paths}:
            sets[val_path] = _open(val_path)
        first = next(iter(sets.values()))
        for path, eset in sets.items():
            if eset.encoder != first.encoder or eset.dim != first.dim:
                raise QuARIInputError(
                    f"{path}: encoder {eset.encoder!r} (dim {eset.dim}) differs from "
                    f"{first.root}: {first.encoder!r} (dim {first.dim}); a model is trained "
                    "for one embedding space — embed every set with the same encoder"
                )
            if not eset.has_text:
                raise QuARIInputError(
                    f"{path}: has no text embeddings (text_emb/); training pairs are "
                    "caption → image, so every training and validation set needs them"
                )
            if eset.rows == 0:
                raise QuARIInputError(f"{path}: the set is empty")

        sources, val_parts = [], []
        for spec in config.train:
            eset = sets[spec.path]
            groups = _groups(eset, config.image_key)
            held_out = val_path is None or _norm(val_path) == _norm(spec.path)
            if held_out:
                is_val = _split_groups(int(groups.max()) + 1, config.val_fraction, config.seed)
            else:
                is_val = np.zeros(int(groups.max()) + 1, dtype=bool)
            row_val = is_val[groups]
            source = Source(
                spec.path,
                groups,
                np.flatnonzero(~row_val),
                np.flatnonzero(row_val),
                spec.ratio,
            )
            if source.train_rows.size == 0:
                raise QuARIInputError(
                    f"{spec.path}: the training split is empty ({eset.rows} rows, "
                    f"{source.images} images, all held out for validation)"
                )
            if config.semipos:
                cls._attach_semipositives(source, eset, config, progress)
            sources.append(source)
            if held_out:
                val_parts.append(source)
        if val_path is not None and not val_parts:
            eset = sets[val_path]
            groups = _groups(eset, config.image_key)
            everything = np.arange(eset.rows, dtype=np.int64)
            val_parts = [Source(val_path, groups, np.empty(0, np.int64), everything)]
        # Validation images drawn from several training sets: one gallery over all of them.
        val = _MergedSource(val_parts) if len(val_parts) > 1 else val_parts[0]
        if val.val_rows.size == 0:
            raise QuARIInputError(f"{val.path}: the validation split is empty")
        if config.relevance_key is not None:
            for part in val_parts:
                _check_columns(sets[part.path], config.relevance_key, "--relevance-key")
            _attach_relevance(sources, sets, config.relevance_key)
        return cls(
            sources,
            val,
            encoder=first.encoder,
            dim=first.dim,
            image_key=config.image_key,
            val_max_queries=config.val_max_queries,
            seed=config.seed,
            relevance_key=config.relevance_key,
        )

    @staticmethod
    def _attach_semipositives(
        source: Source, eset: EmbeddingSet, config: TrainConfig, progress: bool
    ) -> None:
        status = mining_status(eset, config.mining)
        if status == "complete":
            semi = load_semipositives(eset, config.mining)
        else:
            # Missing or partial: mine (resuming); stale: re-mine — the set changed since.
            semi = mine_semipositives(
                eset, config.mining, overwrite=status == "stale", progress=progress
            )
        groups = source.groups
        is_val = np.zeros(source.images, dtype=bool)
        is_val[groups[source.val_rows]] = True
        exists = semi.ids >= 0
        # A validation image must not leak into training, even as a soft positive.
        valid = exists & ~is_val[groups[np.maximum(semi.ids, 0)]]
        source.semipos_ids = np.maximum(semi.ids, 0)
        source.semipos_weights = np.where(valid, semi.weights, 0.0).astype(np.float32)
        source.semipos_valid = valid

    # -- facts ------------------------------------------------------------------------------------
    @property
    def train_pairs(self) -> int:
        return int(sum(s.train_rows.size for s in self.sources))

    @property
    def probabilities(self) -> np.ndarray:
        """Share of each source in a batch."""
        if self.sources[0].ratio is None:
            sizes = np.array([s.train_rows.size for s in self.sources], dtype=np.float64)
        else:
            sizes = np.array([s.ratio for s in self.sources], dtype=np.float64)
        return sizes / sizes.sum()

    def summary(self) -> dict[str, Any]:
        """JSON-ready description for logs and the model card."""
        return {
            "encoder": self.encoder,
            "dim": self.dim,
            "image_key": self.image_key,
            "train": [
                {
                    "path": str(s.path),
                    "pairs": int(s.train_rows.size),
                    "share": round(float(p), 4),
                }
                for s, p in zip(self.sources, self.probabilities, strict=True)
            ],
            "train_pairs": self.train_pairs,
            "val": {
                "path": str(self.val.path),
                "queries": int(self.val_queries[0].shape[0]),
                "images": int(self.val_queries[1].shape[0]),
                "relevance": self.relevance_description,
            },
        }

    # -- validation -----------------------------------------------------------------------------
    @cached_property
    def val_queries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query rows, gallery rows, target) of the validation retrieval task.

        Gallery: one row per validation image; query q's relevant image is gallery row
        ``target[q]``. Capped at ``val_max_queries`` queries by dropping whole images (seeded).
        Rows index the validation source (``self.val``; merged sources use
        :attr:`val_locations`).
        """
        val = self.val
        rows = val.val_rows
        images, first = np.unique(val.groups[rows], return_index=True)
        if rows.size > self.val_max_queries:
            order = np.random.default_rng([self.seed, 11]).permutation(images.size)
            counts = np.bincount(np.searchsorted(images, val.groups[rows]), minlength=images.size)
            keep = order[np.cumsum(counts[order]) <= self.val_max_queries]
            keep = keep if keep.size else order[:1]
            chosen = np.zeros(images.size, dtype=bool)
            chosen[keep] = True
            rows = rows[chosen[np.searchsorted(images, val.groups[rows])]]
            images, first = np.unique(val.groups[rows], return_index=True)
        target = np.searchsorted(images, val.groups[rows])
        return rows, rows[first], target

    @property
    def relevance_description(self) -> str:
        """How validation decides relevance, in words (logs and the model card)."""
        if self.relevance_key is not None:
            return "same " + " and ".join(self.relevance_key)
        return f"same {self.image_key}" if self.image_key else "the caption's own image"

    def val_relevance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query keys (Q,), gallery keys (G,)) int64: a validation image is relevant to a
        query exactly when their keys are equal.

        Without ``relevance_key`` the gallery key is the image's row in the gallery and the
        query key its own image's (the ``target`` of :attr:`val_queries`); with it, the key
        numbers each distinct combination of the relevance columns.
        """
        rows, gallery_rows, target = self.val_queries
        if self.relevance_key is None:
            return torch.from_numpy(target.astype(np.int64)), torch.arange(gallery_rows.size)
        columns = [self._metadata(self.val, np.concatenate([rows, gallery_rows]), name)
                   for name in self.relevance_key]  # fmt: skip
        combined = np.array(["\x1f".join(map(str, v)) for v in zip(*columns, strict=True)])
        _, keys = np.unique(combined, return_inverse=True)
        keys = keys.astype(np.int64)
        return torch.from_numpy(keys[: rows.size]), torch.from_numpy(keys[rows.size :])

    def _metadata(self, source: Source, rows: np.ndarray, column: str) -> list[Any]:
        if isinstance(source, _MergedSource):
            out: list[Any] = [None] * rows.size
            which, local = source.locate(rows)
            for i, part in enumerate(source.parts):
                at = np.flatnonzero(which == i)
                if at.size:
                    got = self.open(part.path).metadata(local[at], [column])
                    for j, value in zip(at, got.column(column).to_pylist(), strict=True):
                        out[j] = value
            return out
        return self.open(source.path).metadata(rows, [column]).column(column).to_pylist()

    def val_vectors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validation (queries (Q, E), gallery (G, E), target (Q,)) as fp32 tensors."""
        rows, gallery_rows, target = self.val_queries
        queries = self._gather(self.val, rows, "text")
        gallery = self._gather(self.val, gallery_rows, "image")
        return queries, gallery, torch.from_numpy(target.astype(np.int64))

    def train_sample(self, max_rows: int = 100_000) -> torch.Tensor:
        """Image and caption embeddings of up to ``max_rows`` training rows (seeded, spread
        over the sets by their sizes), stacked: (2·rows, E) unit-norm fp32 — what the run's
        whitening is fitted on (:func:`quari.whitening.fit_whitening`)."""
        rng = np.random.default_rng([self.seed, 12])
        total = sum(s.train_rows.size for s in self.sources)
        parts = []
        for source in self.sources:
            n = round(max_rows * source.train_rows.size / max(total, 1))
            rows = source.train_rows
            if rows.size > n:
                rows = np.sort(rng.choice(rows, n, replace=False))
            parts += [self._gather(source, rows, kind) for kind in ("image", "text")]
        return torch.cat(parts)

    def _gather(self, source: Source, rows: np.ndarray, kind: str) -> torch.Tensor:
        if isinstance(source, _MergedSource):
            out = np.empty((rows.size, self.dim), dtype=np.float32)
            which, local = source.locate(rows)
            for i, part in enumerate(source.parts):
                sel = which == i
                if sel.any():
                    out[sel] = self.open(part.path).gather(local[sel], kind)
            vectors = torch.from_numpy(out)
        else:
            vectors = torch.from_numpy(self.open(source.path).gather(rows, kind).astype(np.float32))
        return torch.nn.functional.normalize(vectors, dim=-1)

    # -- training batches -----------------------------------------------------------------------
    def batches(
        self,
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        epoch_pairs: int | None = None,
    ) -> PairBatches:
        """The training batches of one process (see :class:`PairBatches`)."""
        return PairBatches(self, batch_size, world_size, rank, epoch_pairs)


class _MergedSource(Source):
    """Validation images from several training sets, seen as one source (rows renumbered
    by concatenating the parts; groups offset so images stay distinct)."""

    def __init__(self, parts: list[Source]) -> None:
        offsets = np.cumsum([0] + [p.groups.size for p in parts])
        group_offsets = np.cumsum([0] + [p.images for p in parts])
        groups = np.concatenate([p.groups + g for p, g in zip(parts, group_offsets, strict=False)])
        val_rows = np.concatenate([p.val_rows + o for p, o in zip(parts, offsets, strict=False)])
        name = Path(" + ".join(str(p.path) for p in parts))
        super().__init__(name, groups, np.empty(0, np.int64), val_rows)
        self.parts = parts
        self.offsets = offsets

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        return which, rows - self.offsets[which]


def _norm(path: Path) -> Path:
    return Path(path).resolve()


class PairBatches(Dataset):
    """Map-style dataset of whole batches: item ``(epoch, step)`` is this rank's slice of the
    global batch of that step.

    Args:
        data: The run's :class:`TrainingData`.
        batch_size: Pairs per rank.
        world_size, rank: DDP placement.
        epoch_pairs: Pairs per epoch (default: every training pair once).

    Each item is a dict of tensors: ``query`` (B, E) unit caption embeddings, ``image`` (B, E),
    ``group`` (B,) global image ids, ``source``/``row`` (B,) where the pair came from, with a
    relevance key ``relevance`` (B,) the pairs' keys (:attr:`Source.relevance`), and with
    semi-positives ``semipos`` (B, P, E), ``semipos_weights`` (B, P), ``semipos_valid`` (B, P).
    """

    def __init__(
        self,
        data: TrainingData,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        epoch_pairs: int | None = None,
    ) -> None:
        self.data = data
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.epoch_pairs = epoch_pairs or data.train_pairs
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = self.epoch_pairs // self.global_batch
        if self.steps_per_epoch == 0:
            raise QuARIInputError(
                f"an epoch of {self.epoch_pairs} training pairs holds no full batch of "
                f"{self.global_batch} ({world_size} device(s) × batch size {batch_size}); "
                "lower the batch size or add training data"
            )
        # Image ids made global across sources, so the loss can compare them.
        self._group_offsets = np.cumsum([0] + [s.images for s in data.sources])
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, row) of every pair of ``epoch``, in order (cached per epoch)."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1], self._plan[2]
        seed = self.data.seed
        probs = self.data.probabilities
        counts = np.floor(probs * self.epoch_pairs).astype(np.int64)
        counts[np.argmax(probs)] += self.epoch_pairs - counts.sum()
        sources, rows = [], []
        for s, (source, n) in enumerate(zip(self.data.sources, counts, strict=True)):
            rng = np.random.default_rng([seed, epoch, s])
            pool = source.train_rows
            reps = -(-int(n) // pool.size)
            drawn = np.concatenate([rng.permutation(pool) for _ in range(reps)])[:n]
            rows.append(drawn)
            sources.append(np.full(n, s, dtype=np.int64))
        order = np.random.default_rng([seed, epoch, 1 << 20]).permutation(self.epoch_pairs)
        src, row = np.concatenate(sources)[order], np.concatenate(rows)[order]
        self._plan = (epoch, src, row)
        return src, row

    def pairs(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, row) of this rank's pairs at ``step`` of ``epoch``."""
        src, row = self.plan(epoch)
        start = step * self.global_batch + self.rank * self.batch_size
        part = slice(start, start + self.batch_size)
        return src[part], row[part]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, step = key
        src, row = self.pairs(epoch, step)
        B, E = src.size, self.data.dim
        query = np.empty((B, E), dtype=np.float32)
        image = np.empty((B, E), dtype=np.float32)
        group = np.empty(B, dtype=np.int64)
        relevance = np.empty(B, dtype=np.int64)
        has_relevance = self.data.sources[0].relevance is not None
        semi = self.data.sources[0].semipos_ids is not None
        if semi:
            P = self.data.sources[0].semipos_ids.shape[1]
            semipos = np.empty((B, P, E), dtype=np.float32)
            weights = np.empty((B, P), dtype=np.float32)
            valid = np.empty((B, P), dtype=bool)
        for s in np.unique(src):
            source = self.data.sources[int(s)]
            eset = self.data.open(source.path)
            sel = src == s
            rows = row[sel]
            query[sel] = eset.gather(rows, "text")
            image[sel] = eset.gather(rows, "image")
            group[sel] = source.groups[rows] + self._group_offsets[int(s)]
            if has_relevance:
                relevance[sel] = source.relevance[rows]
            if semi:
                semipos[sel] = eset.gather(source.semipos_ids[rows], "image")
                weights[sel] = source.semipos_weights[rows]
                valid[sel] = source.semipos_valid[rows]
        batch = {
            # Stored fp16 rows are unit only to ~1e-3; the noise is defined on unit queries.
            "query": torch.nn.functional.normalize(torch.from_numpy(query), dim=-1),
            "image": torch.from_numpy(image),
            "group": torch.from_numpy(group),
            "source": torch.from_numpy(src.astype(np.int64)),
            "row": torch.from_numpy(row.astype(np.int64)),
        }
        if has_relevance:
            batch["relevance"] = torch.from_numpy(relevance)
        if semi:
            batch["semipos"] = torch.from_numpy(semipos)
            batch["semipos_weights"] = torch.from_numpy(weights)
            batch["semipos_valid"] = torch.from_numpy(valid)
        return batch


class ResumableBatchSampler(Sampler):
    """Yields ``(epoch, step)`` keys for the rest of the current epoch.

    Args:
        steps_per_epoch: Steps in a full epoch.
        position: Returns ``(epoch, first step)`` when iteration starts — the trainer's
            restored position on resume, ``(epoch, 0)`` otherwise.
    """

    def __init__(self, steps_per_epoch: int, position: Callable[[], tuple[int, int]]) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.position = position

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.position()
        for step in range(start, self.steps_per_epoch):
            yield epoch, step


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning treats as resumable. Its position is not stored here: the
    sampler derives it from the restored global step, which prefetching cannot get wrong."""

    def state_dict(self) -> dict[str, Any]:
        return {"position": "from global_step"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
