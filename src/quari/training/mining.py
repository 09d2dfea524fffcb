"""Semi-positive mining: the nearest backbone neighbours of every target image
(docs/method.md §5.3).

For every row of an embedding set: its ``k`` = 100 nearest neighbours by cosine of the stored
image embeddings (FAISS inner product over L2-normalised fp32 copies; exact ``Flat`` for small
sets, ``IVF…,Flat`` for large ones), leaving out the row itself and its *exact duplicates*;
softmax(sims / τ) over those ``k`` neighbours (τ = 0.07, as the reference code — A4); the
first ``keep`` = 2 neighbours and their softmax probabilities (not renormalised) are the
semi-positives and their weights.

*Exact duplicates*: rows with identical stored bytes are collapsed to their first row before
indexing (a caption set stores its image once per caption, so without this the neighbour list
would hold each neighbour image several times), and neighbours whose cosine with the target is
≥ 1 − 1e-6 (re-encodings that differ by a few fp16 ulps) are dropped as well. Duplicates are
removed before the softmax — they would otherwise take most of its mass and, as semi-positives,
teach nothing. Semi-positive ids point at the first row of their group of identical rows.

Files, beside the set (each written atomically, so a killed run resumes by skipping the
shards already written)::

    <set>/semipos/semipos.json           k, keep, τ, index factory, the set's fingerprint
    <set>/semipos/semipos_{shard}.npz    ids (n, keep) int64 global row ids (−1: none),
                                         weights (n, keep) float32

A manifest whose parameters or fingerprint differ from the current run is *stale*:
:func:`load_semipositives` refuses it and :func:`mine_semipositives` asks for ``overwrite``.

Where a CUDA device is present, exact (``Flat``) mining runs on it: the distinct rows held on
the GPU, one matrix product and top-k per chunk of targets — the same neighbours as FAISS's
CPU ``Flat`` (up to the order of near-ties). Exact mining of 100,000 images is ≈ 15 TFLOP:
145 s on two CPU cores, and three such sets in parallel took 248 s of a GPU machine's 16 CPU
cores — CPU time a GPU run waited on; a GPU's fp32 rate puts it at seconds (not yet timed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from quari import __version__
from quari.errors import QuARIInputError, StoreError
from quari.fileio import atomic_write, read_json
from quari.index.faiss import build_faiss, faiss_search
from quari.kernels.scan import select_topk
from quari.store import EmbeddingSet

if TYPE_CHECKING:
    import faiss

__all__ = [
    "MiningConfig",
    "SemiPositives",
    "StaleMiningError",
    "load_semipositives",
    "mine_semipositives",
    "mining_device",
    "mining_status",
]

FOLDER = "semipos"
MANIFEST = "semipos.json"
FORMAT = "quari-semipos"
# Cosine at or above which a neighbour counts as an exact duplicate of the target.
DUPLICATE_COS = 1.0 - 1e-6


class StaleMiningError(StoreError):
    """Semi-positives on disk were mined with other parameters or for another state of the set."""


@dataclass(frozen=True)
class MiningConfig:
    """How semi-positives are mined.

    Args:
        k: Neighbours in the softmax (paper: 100).
        keep: Neighbours kept as semi-positives (paper: 2).
        temperature: τ of softmax(sims / τ) (reference code: 0.07; the paper leaves it open).
        factory: FAISS factory string; ``None`` = ``Flat`` up to ``exact_limit`` rows, else
            ``IVF{n},Flat`` with n ≈ 4√rows. Any inner-product factory works (PQ/SQ indexes
            return approximate similarities).
        exact_limit: Largest set mined exactly by default.
        nprobe: IVF lists probed per query.
        train_rows: Rows sampled to train an IVF quantizer.
        chunk_rows: Query rows per FAISS search (bounds memory).
        seed: Seed of the IVF training sample.

    Example:
        >>> MiningConfig().k, MiningConfig().temperature
        (100, 0.07)
    """

    k: int = 100
    keep: int = 2
    temperature: float = 0.07
    factory: str | None = None
    exact_limit: int = 200_000
    nprobe: int = 64
    train_rows: int = 200_000
    chunk_rows: int = 8192
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("k", "keep", "exact_limit", "nprobe", "train_rows", "chunk_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QuARIInputError(f"{name} must be a positive integer, got {value!r}")
        if self.keep > self.k:
            raise QuARIInputError(f"keep ({self.keep}) cannot exceed k ({self.k})")
        if not self.temperature > 0:
            raise QuARIInputError(f"temperature must be positive, got {self.temperature}")

    def factory_for(self, rows: int) -> str:
        """The FAISS factory used for a set of ``rows`` rows."""
        if self.factory:
            return self.factory
        if rows <= self.exact_limit:
            return "Flat"
        return f"IVF{1 << max(8, round(math.log2(4 * math.sqrt(rows))))},Flat"

    def signature(self, rows: int) -> dict[str, Any]:
        """The parameters that decide the result (what a stale check compares)."""
        return {
            "k": self.k,
            "keep": self.keep,
            "temperature": self.temperature,
            "factory": self.factory_for(rows),
        }


@dataclass(frozen=True)
class SemiPositives:
    """Mined semi-positives of every row of a set.

    ``ids`` (rows, keep) int64 global row ids (−1 where a row has fewer neighbours than
    ``keep``) and ``weights`` (rows, keep) float32 (0 where the id is −1).
    """

    ids: np.ndarray
    weights: np.ndarray


def _folder(eset: EmbeddingSet) -> Path:
    return eset.root / FOLDER


def _shard_path(eset: EmbeddingSet, index: int) -> Path:
    return _folder(eset) / f"semipos_{index}.npz"


def _manifest(eset: EmbeddingSet, config: MiningConfig) -> dict[str, Any]:
    return {
        "format": FORMAT,
        **config.signature(eset.rows),
        "rows": eset.rows,
        "fingerprint": eset.fingerprint,
        "quari_version": __version__,
    }


def _read_manifest(eset: EmbeddingSet) -> dict[str, Any] | None:
    path = _folder(eset) / MANIFEST
    if not path.is_file():
        return None
    data = read_json(path, StoreError)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError(f"{path}: not a quari semi-positives manifest")
    return data


def _stale_reason(found: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    for key in ("k", "keep", "temperature", "factory"):
        if found.get(key) != wanted[key]:
            return f"mined with {key}={found.get(key)!r}, now {key}={wanted[key]!r}"
    if found.get("fingerprint") != wanted["fingerprint"]:
        return (
            f"mined for {found.get('rows')} rows, the set now has {wanted['rows']} rows "
            "or changed files"
        )
    return None


def mining_status(eset: EmbeddingSet, config: MiningConfig | None = None) -> str:
    """``"missing"``, ``"stale"``, ``"partial"`` or ``"complete"`` for ``eset`` and ``config``."""
    config = config or MiningConfig()
    found = _read_manifest(eset)
    if found is None:
        return "missing"
    if _stale_reason(found, _manifest(eset, config)):
        return "stale"
    done = all(_shard_path(eset, s.index).is_file() for s in eset.shards)
    return "complete" if done else "partial"


def _canonical_rows(eset: EmbeddingSet, chunk_rows: int) -> np.ndarray:
    """canonical[r] = the first row whose stored image vector has exactly r's bytes.

    Rows are hashed (a random linear hash of their 16/32-bit words, mod 2⁶⁴) and grouped by
    hash; every grouping is then confirmed byte for byte, so a hash collision only costs a
    missed merge, never a wrong one.
    """
    word = np.uint16 if np.dtype(eset.dtype).itemsize == 2 else np.uint32
    mult = np.random.default_rng(12345).integers(1, 2**63, eset.dim, dtype=np.uint64) | 1
    hashes = np.empty(eset.rows, dtype=np.uint64)
    for offset, chunk in eset.iter_chunks(chunk_rows):
        words = np.ascontiguousarray(chunk).view(word).astype(np.uint64)
        with np.errstate(over="ignore"):
            hashes[offset : offset + chunk.shape[0]] = (words * mult).sum(axis=1)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    canonical = first[inverse].astype(np.int64)
    merged = np.flatnonzero(canonical != np.arange(eset.rows))
    for start in range(0, merged.size, chunk_rows):
        part = merged[start : start + chunk_rows]
        same = (eset.gather(part) == eset.gather(canonical[part])).all(axis=1)
        canonical[part[~same]] = part[~same]
    return canonical


def _build_index(
    eset: EmbeddingSet, distinct: np.ndarray, config: MiningConfig, progress: bool
) -> faiss.Index:
    """An inner-product index over the unit-normalised ``distinct`` rows (index position i
    holds row ``distinct[i]``), built by the FAISS backend's building blocks."""

    def train_sample() -> np.ndarray:
        rng = np.random.default_rng(config.seed)
        n_train = min(distinct.size, config.train_rows)
        return _unit_rows(eset.gather(np.sort(rng.choice(distinct, n_train, replace=False))))

    chunks = (_unit_rows(chunk) for _, chunk in eset.iter_gathered(distinct, config.chunk_rows))
    return build_faiss(
        eset.dim,
        config.factory_for(eset.rows),
        chunks,
        train_sample=train_sample,
        total=distinct.size,
        progress=progress,
        name_row=lambda position: f"{eset.root}: row {int(distinct[position])}",
    )


class _FaissSearch:
    """Neighbour search through a FAISS index: ``search(queries, k) -> (sims, positions)``."""

    def __init__(self, index: faiss.Index, nprobe: int) -> None:
        self.index, self.nprobe = index, nprobe
        self.ntotal = int(index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss_search(self.index, queries, k, nprobe=self.nprobe)


class _TorchFlatSearch:
    """Exact inner-product search over the unit-normalised ``distinct`` rows on ``device``
    (what FAISS's ``Flat`` computes, as one matrix product and top-k per query chunk)."""

    #: Scores held at once (fp32: 1 GiB), whatever the chunk and set sizes.
    MAX_SCORES = 1 << 28

    def __init__(
        self, eset: EmbeddingSet, distinct: np.ndarray, config: MiningConfig, device: str
    ) -> None:
        self.device = torch.device(device)
        self.ntotal = int(distinct.size)
        self.base = torch.empty((self.ntotal, eset.dim), dtype=torch.float32, device=self.device)
        for start, chunk in eset.iter_gathered(distinct, config.chunk_rows):
            unit = torch.from_numpy(_unit_rows(chunk))
            self.base[start : start + unit.shape[0]] = unit.to(self.device)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        step = max(1, self.MAX_SCORES // self.ntotal)
        parts = [select_topk(q[i : i + step] @ self.base.T, k) for i in range(0, len(q), step)]
        sims, pos = (torch.cat(column) for column in zip(*parts, strict=True))
        return sims.cpu().numpy(), pos.cpu().numpy()


def mining_device(factory: str) -> str | None:
    """The torch device exact mining runs on: ``"cuda"`` for a ``Flat`` factory where CUDA is
    available, else None (FAISS on the CPU)."""
    return "cuda" if factory == "Flat" and torch.cuda.is_available() else None


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """fp32, L2-normalised rows (so inner products are cosines; zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12))


def _select(
    rows: np.ndarray, sims: np.ndarray, ids: np.ndarray, config: MiningConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drops self, duplicates and padding; returns (ids, weights, neighbours left) per row."""
    valid = (ids >= 0) & (ids != rows[:, None]) & (sims < DUPLICATE_COS)
    # Stable: keep FAISS's descending order among the valid neighbours, then the top k.
    order = np.argsort(~valid, axis=1, kind="stable")[:, : config.k]
    sims = np.take_along_axis(sims, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    valid = np.take_along_axis(valid, order, axis=1)
    logits = np.where(valid, sims.astype(np.float64) / config.temperature, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    top[~np.isfinite(top)] = 0.0
    expo = np.exp(logits - top)
    probs = expo / np.maximum(expo.sum(axis=1, keepdims=True), 1e-300)
    out_ids = np.where(valid[:, : config.keep], ids[:, : config.keep], -1)
    out_w = np.where(valid[:, : config.keep], probs[:, : config.keep], 0.0).astype(np.float32)
    return out_ids.astype(np.int64), out_w, valid.sum(axis=1)


def _search_distinct(
    index: _FaissSearch | _TorchFlatSearch,
    distinct: np.ndarray,
    queries: np.ndarray,
    rows: np.ndarray,
    config: MiningConfig,
    extra: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Searches k + 1 + ``extra`` neighbours (room for self and near-duplicates); rows left
    with fewer than k distinct neighbours are searched again with 4× the room."""
    total = index.ntotal
    k = min(total, config.k + 1 + extra)
    sims, pos = index.search(queries, k)
    ids = np.where(pos >= 0, distinct[np.maximum(pos, 0)], -1)
    out_ids, out_w, left = _select(rows, sims, ids, config)
    short = left < config.k
    if k < total and short.any():
        out_ids[short], out_w[short] = _search_distinct(
            index, distinct, queries[short], rows[short], config, extra * 4
        )
    return out_ids, out_w


def _mine_shard(
    eset: EmbeddingSet,
    index: _FaissSearch | _TorchFlatSearch,
    distinct: np.ndarray,
    canonical: np.ndarray,
    rows: np.ndarray,
    config: MiningConfig,
) -> dict[str, np.ndarray]:
    """Semi-positives of ``rows``: each distinct vector is searched once, then broadcast."""
    targets, inverse = np.unique(canonical[rows], return_inverse=True)
    ids = np.empty((targets.size, config.keep), dtype=np.int64)
    weights = np.empty((targets.size, config.keep), dtype=np.float32)
    for start in range(0, targets.size, config.chunk_rows):
        part = targets[start : start + config.chunk_rows]
        queries = _unit_rows(eset.gather(part))
        ids[start : start + part.size], weights[start : start + part.size] = _search_distinct(
            index, distinct, queries, part, config
        )
    return {"ids": ids[inverse], "weights": weights[inverse]}


def mine_semipositives(
    eset: EmbeddingSet,
    config: MiningConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = "auto",
) -> SemiPositives:
    """Mines (or resumes mining) the semi-positives of every row and saves them beside the set.

    Shards whose file already exists under a matching manifest are skipped, so a killed run
    picks up where it stopped.

    Args:
        eset: The embedding set (its image embeddings are the targets and the candidates).
        config: Mining parameters (default: k = 100, keep = 2, τ = 0.07).
        overwrite: Replace semi-positives mined with other parameters or for an older state
            of the set (otherwise that raises :class:`StaleMiningError`).
        progress: Show progress bars.
        device: Where the neighbour search runs: ``"auto"`` (a CUDA device for exact
            mining where one is present, :func:`mining_device`), None (FAISS on the CPU), or
            a torch device for exact mining there (``"cpu"`` too; the factory must be
            ``Flat``).

    Returns:
        The :class:`SemiPositives` of all rows.

    Raises:
        StaleMiningError: stale files exist and ``overwrite`` is false.
        StoreError: the set is empty.

    Example:
        >>> semi = mine_semipositives(EmbeddingSet.open("coco"))  # doctest: +SKIP
        >>> semi.ids.shape  # doctest: +SKIP
        (591753, 2)
    """
    config = config or MiningConfig()
    if eset.rows < 2:
        raise StoreError(f"{eset.root}: needs at least 2 rows to mine neighbours")
    factory = config.factory_for(eset.rows)
    if device == "auto":
        device = mining_device(factory)
    elif device is not None and factory != "Flat":
        raise QuARIInputError(
            f"device={device!r}: torch mining is exact (factory Flat); this set mines with "
            f"{factory!r} — leave device to 'auto'"
        )
    wanted = _manifest(eset, config)
    found = _read_manifest(eset)
    if found is not None and (reason := _stale_reason(found, wanted)):
        if not overwrite:
            raise StaleMiningError(
                f"{_folder(eset)}: existing semi-positives are stale ({reason}); "
                "re-mine with overwrite (`quari mine --overwrite`)"
            )
        for path in _folder(eset).glob("semipos_*.npz"):
            path.unlink()
        found = None
    if found is None:
        text = json.dumps(wanted, indent=2) + "\n"
        atomic_write(_folder(eset) / MANIFEST, lambda f: f.write(text.encode()))
    todo = [s for s in eset.shards if not _shard_path(eset, s.index).is_file()]
    if todo:
        canonical = _canonical_rows(eset, config.chunk_rows)
        distinct = np.flatnonzero(canonical == np.arange(eset.rows))
        if device is None:
            index = _FaissSearch(_build_index(eset, distinct, config, progress), config.nprobe)
        else:
            index = _TorchFlatSearch(eset, distinct, config, device)
        bar = tqdm(total=sum(s.rows for s in todo), unit="rows", desc="mine", disable=not progress)
        for shard in todo:
            rows = np.arange(shard.offset, shard.offset + shard.rows, dtype=np.int64)
            payload = _mine_shard(eset, index, distinct, canonical, rows, config)
            atomic_write(_shard_path(eset, shard.index), lambda f, p=payload: np.savez(f, **p))
            bar.update(shard.rows)
        bar.close()
    return load_semipositives(eset, config)


def load_semipositives(eset: EmbeddingSet, config: MiningConfig | None = None) -> SemiPositives:
    """Reads the semi-positives mined for ``eset``.

    Raises:
        StoreError: none mined yet, or mining was interrupted (run :func:`mine_semipositives`).
        StaleMiningError: mined with other parameters or for an older state of the set.
    """
    config = config or MiningConfig()
    found = _read_manifest(eset)
    if found is None:
        raise StoreError(
            f"{eset.root}: no semi-positives mined; run `quari mine {eset.root}` first"
        )
    if reason := _stale_reason(found, _manifest(eset, config)):
        raise StaleMiningError(
            f"{_folder(eset)}: semi-positives are stale ({reason}); re-mine with "
            f"`quari mine {eset.root} --overwrite`"
        )
    ids, weights = [], []
    for shard in eset.shards:
        path = _shard_path(eset, shard.index)
        if not path.is_file():
            raise StoreError(
                f"{path}: missing (mining was interrupted); run `quari mine {eset.root}` to "
                "finish it"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                shard_ids, shard_w = data["ids"], data["weights"]
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(f"{path}: unreadable semi-positives file ({exc})") from exc
        if shard_ids.shape != (shard.rows, config.keep) or shard_w.shape != shard_ids.shape:
            raise StoreError(
                f"{path}: holds {shard_ids.shape} ids, expected ({shard.rows}, {config.keep})"
            )
        ids.append(shard_ids.astype(np.int64, copy=False))
        weights.append(shard_w.astype(np.float32, copy=False))
    return SemiPositives(np.concatenate(ids), np.concatenate(weights))
