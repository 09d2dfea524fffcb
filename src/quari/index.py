"""Candidate indexes: FAISS over an embedding set, ids = the set's global row ids.

The index only proposes candidates; every score quari returns is recomputed from the exact
fp16 vectors of the set, so a compressed index (IVF-PQ) costs recall, never precision.

The factory is chosen by size and memory (autofaiss' idea as a small table; override it with
any FAISS factory string):

=====================  ==================================================
rows                   factory
=====================  ==================================================
≤ 1M                   ``Flat`` (exact)
≤ 20M                  ``IVF{n},Flat`` (n ≈ 2√N lists) — or ``IVF{n},SQ8`` when
                       fp32 vectors would not fit the memory budget
beyond                 ``IVF{n},PQ{m}`` (m = E/8 sub-quantizers, ≤ 96)
=====================  ==================================================

An index lives beside its set in ``index/<name>.faiss`` with ``index/<name>.json`` recording the
factory, the build time and the set's fingerprint; :meth:`CandidateIndex.load` refuses a stale
index (the set changed since the build), or with ``update=True`` adds the rows appended since.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from quari import __version__
from quari.fileio import atomic_write, read_json
from quari.store import EmbeddingSet, StoreError
from quari.validation import QuARIInputError, as_embeddings, check_k

__all__ = ["CandidateIndex", "IndexConfig", "StaleIndexError", "choose_factory"]


class StaleIndexError(StoreError):
    """The index was built for a different state of its embedding set."""


@dataclass(frozen=True)
class IndexConfig:
    """How to build and query a :class:`CandidateIndex`.

    Args:
        factory: FAISS factory string; ``None`` chooses by size (:func:`choose_factory`).
        nprobe: IVF lists probed per query.
        ef_search: HNSW search breadth.
        train_rows: Rows sampled to train IVF / PQ / SQ quantizers (at least 40 per IVF list).
        batch_rows: Rows added per batch (bounds build memory).
        memory_budget: Bytes the index may take in RAM (default: a third of physical memory).
        seed: Seed of the training sample.
    """

    factory: str | None = None
    nprobe: int = 32
    ef_search: int = 256
    train_rows: int = 200_000
    batch_rows: int = 1 << 16
    memory_budget: int | None = None
    seed: int = 0


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def choose_factory(rows: int, dim: int, memory_budget: int | None = None) -> str:
    """The default FAISS factory for ``rows`` vectors of dimension ``dim``.

    Flat (exact) up to 1M rows; IVF with ≈2√N lists up to 20M — ``Flat`` lists when fp32
    vectors fit the memory budget, else 8-bit ``SQ8`` codes; IVF-PQ beyond. IVF rather than
    HNSW in the middle band because it builds in minutes on a few cores (HNSW on 10M rows
    takes hours there) at similar recall with nprobe 32; pass ``factory="HNSW32"`` for the
    lowest latency when build time does not matter.

    Example:
        >>> choose_factory(100_000, 768), choose_factory(5_000_000, 768, 64 << 30)
        ('Flat', 'IVF4096,Flat')
    """
    budget = memory_budget if memory_budget is not None else _physical_memory() // 3
    if rows <= 1_000_000:
        return "Flat"
    nlist = 1 << min(16, max(10, round(math.log2(2 * math.sqrt(rows)))))
    if rows <= 20_000_000:
        return f"IVF{nlist},Flat" if rows * dim * 4 <= budget else f"IVF{nlist},SQ8"
    m = max(d for d in range(1, min(96, dim // 8) + 1) if dim % d == 0)
    return f"IVF{nlist},PQ{m}"


def _needs_training(index: faiss.Index) -> bool:
    return not index.is_trained


class CandidateIndex:
    """A FAISS inner-product index over an :class:`~quari.store.EmbeddingSet`.

    Build with :meth:`build`, open with :meth:`load`; :meth:`search` takes (B, E) queries and
    returns the top-k row ids, optionally restricted to a selection of rows.

    Example:
        >>> index = CandidateIndex.build(eset)  # doctest: +SKIP
        >>> scores, ids = index.search(queries, k=1000)  # doctest: +SKIP
    """

    def __init__(
        self,
        eset: EmbeddingSet,
        index: faiss.Index,
        info: dict[str, Any],
        config: IndexConfig,
        name: str = "image",
    ) -> None:
        self.eset = eset
        self.index = index
        self.info = info
        self.config = config
        self.name = name

    @property
    def factory(self) -> str:
        return str(self.info["factory"])

    @property
    def rows(self) -> int:
        return int(self.index.ntotal)

    def paths(self) -> tuple[Path, Path]:
        folder = self.eset.root / "index"
        return folder / f"{self.name}.faiss", folder / f"{self.name}.json"

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        eset: EmbeddingSet,
        config: IndexConfig | None = None,
        *,
        name: str = "image",
        progress: bool = True,
        save: bool = True,
    ) -> CandidateIndex:
        """Builds an index over every row of ``eset`` in bounded-memory batches.

        Args:
            eset: The embedding set.
            config: Factory and parameters (default: chosen by size).
            name: File name stem under ``<set>/index/``.
            progress: Show a progress bar.
            save: Write the index beside the set.
        """
        config = config or IndexConfig()
        if eset.rows == 0:
            raise StoreError(f"{eset.root}: the set is empty; nothing to index")
        factory = config.factory or choose_factory(eset.rows, eset.dim, config.memory_budget)
        try:
            index = faiss.index_factory(eset.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise QuARIInputError(f"invalid FAISS factory string {factory!r}: {exc}") from exc
        t0 = time.perf_counter()
        if _needs_training(index):
            rng = np.random.default_rng(config.seed)
            ivf = faiss.try_extract_index_ivf(index)
            # k-means wants ≥ ~40 points per list; PQ/SQ are happy with far fewer.
            wanted = max(config.train_rows, 40 * ivf.nlist if ivf is not None else 0)
            n_train = min(eset.rows, wanted)
            sample = np.sort(rng.choice(eset.rows, n_train, replace=False))
            index.train(np.ascontiguousarray(eset.gather(sample), dtype=np.float32))
        built = cls(eset, index, {"factory": factory}, config, name)
        built._add_rows(0, progress)
        built.info = {
            "format": "quari-index",
            "factory": factory,
            "metric": "inner_product",
            "dim": eset.dim,
            "rows": int(index.ntotal),
            "fingerprint": eset.fingerprint,
            "encoder": eset.encoder,
            "build_seconds": round(time.perf_counter() - t0, 3),
            "quari_version": __version__,
        }
        if save:
            built.save()
        return built

    def _add_rows(self, start: int, progress: bool) -> None:
        """Adds rows ``start …`` of the set, in order, so FAISS ids equal row ids."""
        total = self.eset.rows - start
        bar = tqdm(
            total=total, unit="rows", desc=f"index {self.name}", disable=not progress, leave=False
        )
        for offset, chunk in self.eset.iter_chunks(self.config.batch_rows):
            end = offset + chunk.shape[0]
            if end <= start:
                continue
            part = chunk[max(0, start - offset) :]
            self.index.add(np.ascontiguousarray(part, dtype=np.float32))
            bar.update(part.shape[0])
        bar.close()
        if self.index.ntotal != self.eset.rows:  # pragma: no cover - guards the id invariant
            raise StoreError(f"index holds {self.index.ntotal} rows, the set {self.eset.rows}")

    def save(self) -> None:
        """Writes ``index/<name>.faiss`` and its JSON description (atomically)."""
        index_path, info_path = self.paths()
        # Streamed through a callback: serialize_index would hold a second copy in memory.
        atomic_write(
            index_path, lambda f: faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write))
        )
        text = json.dumps({**self.info, "config": asdict(self.config)}, indent=2) + "\n"
        atomic_write(info_path, lambda f: f.write(text.encode()))

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def exists(cls, eset: EmbeddingSet, name: str = "image") -> bool:
        return (eset.root / "index" / f"{name}.faiss").is_file()

    @classmethod
    def load(
        cls, eset: EmbeddingSet, *, name: str = "image", update: bool = False, mmap: bool = False
    ) -> CandidateIndex:
        """Opens the index saved beside ``eset``.

        Args:
            eset: The set it was built for.
            name: File name stem.
            update: If the set only grew since the build, add the new rows (and save).
            mmap: Memory-map the index file instead of reading it (IVF indexes only).

        Raises:
            StaleIndexError: the set changed since the build (and cannot be updated).
            StoreError: missing or unreadable index files.
        """
        folder = eset.root / "index"
        index_path, info_path = folder / f"{name}.faiss", folder / f"{name}.json"
        if not index_path.is_file() or not info_path.is_file():
            raise StoreError(f"{index_path}: no index; build one with `quari index build`")
        info = read_json(info_path, StoreError)
        try:
            index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP if mmap else 0)
        except RuntimeError as exc:
            raise StoreError(f"{index_path}: unreadable index ({exc})") from exc
        config = IndexConfig(**info.pop("config", {}))
        loaded = cls(eset, index, info, config, name)
        built_for, now = info.get("fingerprint"), eset.fingerprint
        if index.ntotal != info.get("rows") or index.d != eset.dim:
            raise StaleIndexError(
                f"{index_path}: holds {index.ntotal}×{index.d}, its description "
                f"says {info.get('rows')}×{eset.dim}; rebuild it"
            )
        if built_for != now:
            grew = built_for == now[: len(built_for)]
            if not (grew and update):
                hint = (
                    "load it with update=True (or run `quari index build --update`) to add "
                    "the new rows"
                    if grew
                    else "rebuild it with `quari index build`"
                )
                raise StaleIndexError(
                    f"{index_path}: stale — built for {info.get('rows')} rows, the set now has "
                    f"{eset.rows} {'(appended since)' if grew else '(changed since)'}; {hint}"
                )
            loaded._add_rows(int(info["rows"]), progress=False)
            loaded.info.update(rows=int(index.ntotal), fingerprint=now)
            loaded.save()
        return loaded

    # -- searching -----------------------------------------------------------------------------
    def search(
        self, queries: Any, k: int, *, selection: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product.

        Args:
            queries: (B, E) query vectors (any scale: inner-product ranking ignores it).
            k: Results per query.
            selection: Optional sorted row ids; only these can be returned (a FAISS bitmap
                selector, so filtering happens inside the search, not after it).

        Returns:
            ``(scores, ids)``, each (B, k); missing results have id −1.
        """
        k = check_k(k)
        q = as_embeddings(queries, self.eset.dim, "queries").numpy()
        params = self._params(selection)
        scores, ids = self.index.search(np.ascontiguousarray(q, dtype=np.float32), k, params=params)
        return scores, ids

    def _params(self, selection: np.ndarray | None) -> faiss.SearchParameters | None:
        selector = None
        if selection is not None:
            mask = np.zeros(self.rows, dtype=bool)
            mask[selection] = True
            bitmap = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
            selector.referenced_bitmap = bitmap  # keep the buffer alive with the selector
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            params = faiss.SearchParametersIVF(nprobe=self.config.nprobe)
        elif hasattr(self.index, "hnsw"):
            params = faiss.SearchParametersHNSW(efSearch=self.config.ef_search)
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
            params.referenced_selector = selector
        return params
