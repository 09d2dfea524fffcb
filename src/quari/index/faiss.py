"""The FAISS candidate-index backend (``faiss:auto``, ``faiss:<factory>``), and the FAISS
building blocks that semi-positive mining shares.

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

The index lives beside its set in ``index/<name>.faiss``; ``index/<name>.json`` records the
backend, factory, build time and the set's fingerprint (:mod:`quari.index.base`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from quari import __version__
from quari.errors import QuARIInputError, StoreError
from quari.fileio import atomic_write
from quari.index.base import CandidateIndex, Selection, StaleIndexError, selected_rows
from quari.store import EmbeddingSet
from quari.validation import as_embeddings, check_fields, check_k

__all__ = [
    "FaissIndex",
    "IndexConfig",
    "build_faiss",
    "choose_factory",
    "faiss_search",
    "new_faiss_index",
]


@dataclass(frozen=True)
class IndexConfig:
    """Options of a FAISS candidate index.

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

    @classmethod
    def from_options(cls, factory: str | None, options: dict[str, Any]) -> IndexConfig:
        """A config from a spec's factory and keyword options, naming unknown options."""
        check_fields(cls, options, "FAISS index option", exclude=("factory",))
        return cls(factory=factory, **options)


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
    takes hours there) at similar recall with nprobe 32; pass ``faiss:HNSW32`` for the
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


# -- building blocks (shared with semi-positive mining) -----------------------------------------
def new_faiss_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index for a factory string, with a clear error for a bad one."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise QuARIInputError(f"invalid FAISS factory string {factory!r}: {exc}") from exc


def build_faiss(
    dim: int,
    factory: str,
    chunks: Iterable[np.ndarray],
    *,
    train_sample: Any = None,
    total: int | None = None,
    progress: bool = False,
    desc: str = "index",
    name_row: Callable[[int], str] = lambda position: f"vector {position}",
) -> faiss.Index:
    """Builds an inner-product index from vectors streamed in chunks (bounded memory).

    Args:
        dim: Vector dimension.
        factory: FAISS factory string.
        chunks: (n, dim) arrays, added in order: index position i is the i-th vector.
        train_sample: Vectors to train a quantizer on (IVF/PQ/SQ; a callable returning them is
            called only when the index needs training).
        total: Vectors to expect, for the progress bar.
        progress: Show a progress bar.
        desc: Progress bar label.
        name_row: Names the vector at an index position in error messages.

    Returns:
        The filled index.

    Raises:
        StoreError: a vector holds NaN or Inf (named by ``name_row``).
    """
    index = new_faiss_index(dim, factory)
    if not index.is_trained:
        sample = train_sample() if callable(train_sample) else train_sample
        if sample is None or len(sample) == 0:
            raise QuARIInputError(f"FAISS factory {factory!r} needs training vectors")
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    bar = tqdm(total=total, unit="rows", desc=desc, disable=not progress, leave=False)
    position = 0
    for chunk in chunks:
        vectors = _finite(chunk, position, name_row)
        index.add(vectors)
        position += len(vectors)
        bar.update(len(vectors))
    bar.close()
    return index


def _finite(chunk: Any, position: int, name_row: Callable[[int], str]) -> np.ndarray:
    """The chunk as contiguous fp32, refused if a row holds NaN or Inf (FAISS would index it
    silently and return garbage neighbours)."""
    vectors = np.ascontiguousarray(chunk, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(vectors.sum(axis=1)))
    if bad.size:
        raise StoreError(f"{name_row(position + int(bad[0]))} contains NaN or Inf")
    return vectors


def search_parameters(
    index: faiss.Index, *, nprobe: int, ef_search: int, allowed: np.ndarray | None = None
) -> faiss.SearchParameters:
    """Per-search parameters: IVF probes or HNSW breadth, and a bitmap of allowed positions
    (filtering inside the search, so candidates are not spent on excluded rows)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
    elif hasattr(index, "hnsw"):
        params = faiss.SearchParametersHNSW(efSearch=ef_search)
    else:
        params = faiss.SearchParameters()
    if allowed is not None:
        mask = np.zeros(index.ntotal, dtype=bool)
        mask[allowed] = True
        bitmap = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        selector.referenced_bitmap = bitmap  # keep the buffer alive with the selector
        params.sel = selector
        params.referenced_selector = selector
    return params


def faiss_search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    *,
    nprobe: int = 32,
    ef_search: int = 256,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` with :func:`search_parameters`: ``(scores, positions)``, each (B, k)."""
    params = search_parameters(index, nprobe=nprobe, ef_search=ef_search, allowed=allowed)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)


# -- the backend ---------------------------------------------------------------------------------
class FaissIndex(CandidateIndex):
    """A FAISS inner-product index over an :class:`~quari.store.EmbeddingSet` (ids = row ids).

    Build with ``CandidateIndex.build(eset, "faiss:auto")``, open with
    ``CandidateIndex.load(eset)``.

    Example:
        >>> index = CandidateIndex.build(eset, "faiss:HNSW32", ef_search=128)  # doctest: +SKIP
        >>> scores, ids = index.search(queries, k=1000)  # doctest: +SKIP
    """

    backend = "faiss"

    def __init__(
        self,
        eset: EmbeddingSet,
        index: faiss.Index,
        info: dict[str, Any],
        config: IndexConfig,
        name: str = "image",
    ) -> None:
        super().__init__(eset, info, name)
        self.index = index
        self.config = config

    @property
    def factory(self) -> str:
        return str(self.info["factory"])

    @property
    def rows(self) -> int:
        return int(self.index.ntotal)

    def index_path(self) -> Path:
        return self.eset.root / "index" / f"{self.name}.faiss"

    @classmethod
    def create(
        cls,
        eset: EmbeddingSet,
        target: str,
        *,
        name: str,
        progress: bool,
        save: bool,
        **options: Any,
    ) -> FaissIndex:
        factory = None if target in ("", "auto") else target
        config = IndexConfig.from_options(factory, options)
        factory = factory or choose_factory(eset.rows, eset.dim, config.memory_budget)
        t0 = time.perf_counter()

        def train_sample() -> np.ndarray:
            probe = new_faiss_index(eset.dim, factory)
            ivf = faiss.try_extract_index_ivf(probe)
            # k-means wants ≥ ~40 points per list; PQ/SQ are happy with far fewer.
            wanted = max(config.train_rows, 40 * ivf.nlist if ivf is not None else 0)
            if ivf is not None and eset.rows < ivf.nlist:
                raise QuARIInputError(
                    f"FAISS factory {factory!r} has {ivf.nlist} lists but the set only "
                    f"{eset.rows} rows; use fewer lists or faiss:auto"
                )
            rng = np.random.default_rng(config.seed)
            sample = np.sort(rng.choice(eset.rows, min(eset.rows, wanted), replace=False))
            return eset.gather(sample)

        chunks = (chunk for _, chunk in eset.iter_chunks(config.batch_rows))
        index = build_faiss(
            eset.dim,
            factory,
            chunks,
            train_sample=train_sample,
            total=eset.rows,
            progress=progress,
            desc=f"index {name}",
            name_row=lambda row: f"{eset.root}: row {row}",
        )
        info = {
            "format": "quari-index",
            "backend": cls.backend,
            "spec": f"faiss:{factory}",
            "factory": factory,
            "metric": "inner_product",
            "dim": eset.dim,
            "rows": int(index.ntotal),
            "fingerprint": eset.fingerprint,
            "encoder": eset.encoder,
            "build_seconds": round(time.perf_counter() - t0, 3),
            "quari_version": __version__,
            "config": asdict(config),
        }
        built = cls(eset, index, info, config, name)
        built._check_rows()
        if save:
            built.save()
        return built

    @classmethod
    def open(
        cls, eset: EmbeddingSet, info: dict[str, Any], name: str, *, mmap: bool = False
    ) -> FaissIndex:
        """Reads ``index/<name>.faiss`` (memory-mapped with ``mmap``: IVF indexes only)."""
        path = eset.root / "index" / f"{name}.faiss"
        if not path.is_file():
            raise StoreError(f"{path}: missing; rebuild the index with `quari index build`")
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
        except RuntimeError as exc:
            raise StoreError(f"{path}: unreadable index ({exc})") from exc
        try:
            config = IndexConfig(**info.get("config", {}))
        except TypeError as exc:
            raise StoreError(f"{path}: bad index description ({exc})") from exc
        info.setdefault("spec", f"faiss:{info.get('factory')}")
        loaded = cls(eset, index, info, config, name)
        if index.ntotal != info.get("rows") or index.d != eset.dim:
            raise StaleIndexError(
                f"{path}: holds {index.ntotal}×{index.d}, its description says "
                f"{info.get('rows')}×{eset.dim}; rebuild it"
            )
        return loaded

    def add_new_rows(self, progress: bool = True) -> int:
        start = self.rows
        bar = tqdm(total=self.eset.rows - start, unit="rows", desc=f"index {self.name}",
                   disable=not progress, leave=False)  # fmt: skip
        for offset, chunk in self.eset.iter_chunks(self.config.batch_rows):
            if offset + chunk.shape[0] <= start:
                continue
            first = max(0, start - offset)
            part = _finite(chunk[first:], offset + first, lambda r: f"{self.eset.root}: row {r}")
            self.index.add(part)
            bar.update(part.shape[0])
        bar.close()
        self._check_rows()
        self.info.update(rows=self.rows, fingerprint=self.eset.fingerprint)
        return self.rows - start

    def _check_rows(self) -> None:
        if self.index.ntotal != self.eset.rows:  # pragma: no cover - guards the id invariant
            raise StoreError(f"index holds {self.index.ntotal} rows, the set {self.eset.rows}")

    def save(self) -> None:
        """Writes ``index/<name>.faiss`` and its description (each atomically)."""
        # Streamed through a callback: serialize_index would hold a second copy in memory.
        atomic_write(
            self.index_path(),
            lambda f: faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write)),
        )
        self.info["config"] = asdict(self.config)
        self.write_description()

    def search(
        self, queries: Any, k: int, *, selection: Selection | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        k = check_k(k)
        q = as_embeddings(queries, self.eset.dim, "queries").numpy()
        selection = selected_rows(self.eset, selection)
        return faiss_search(
            self.index,
            q,
            k,
            nprobe=self.config.nprobe,
            ef_search=self.config.ef_search,
            allowed=selection,
        )
