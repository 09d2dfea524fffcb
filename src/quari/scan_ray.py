"""The exact scan split over Ray tasks (``quari search --mode scan --engine ray``,
``Retriever(..., scan_engine="ray")``; extra ``[distributed]``).

The set's rows are cut into contiguous parts at chunk boundaries (shards for a whole-set scan,
stretches of the passing row ids for a filtered one), one Ray task per part. Each task opens the
set read-only by its path (every node must see the same folder — a shared filesystem — and the
task checks the set's fingerprint), streams its part through :meth:`quari.Adaptation.scan` —
the same code as a single-process scan, the GPU kernel where the task got a GPU — and returns
its top-k. The driver merges them with :class:`quari.scoring.RunningTopK`, whose ties go to the
lower row id, so the result equals the single-process scan's: the rows are read in the same
chunks and scored by the same projection (shipped with the adaptation, not recomputed).

A model with a static blend (docs/method.md §5.6) needs ‖W d‖ of every row: on a whole-set
scan each task computes its part's first and returns them, the engine keeps them (4 bytes per
row, keyed by W and the set's fingerprint) and ships each later task its part's slice — so only
the first scan pays the E×E product per row, as with the single-process Retriever's cache.

Example:
    >>> engine = RayScan(RayScanConfig(address="auto"))  # doctest: +SKIP
    >>> top = engine.scan(eset, model(queries), k=100)  # doctest: +SKIP
    >>> Retriever(eset, model, scan_engine=engine).search(queries, mode="scan")  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from quari.adaptation import Adaptation
from quari.errors import StoreError, missing_extra
from quari.scoring import RunningTopK, TopK
from quari.store import EmbeddingSet
from quari.validation import check_k

__all__ = ["RayScan", "RayScanConfig", "plan_parts"]

#: Rows per chunk: the chunking of a single-process scan (``EmbeddingSet.iter_chunks`` and
#: ``iter_gathered`` defaults), which the parts must keep for identical results.
CHUNK_ROWS = 1 << 16


@dataclass(frozen=True)
class RayScanConfig:
    """Where and how wide a distributed scan runs.

    Args:
        address: Ray cluster address (``"auto"``, ``"ray://head:10001"``); None starts a local
            Ray unless one is already running in this process.
        workers: Tasks per scan (parts of the set); default: the cluster's CPUs divided by
            ``cpus_per_task`` (or its GPUs, when tasks take GPUs).
        num_cpus: CPUs of a local Ray started here (default: all).
        cpus_per_task: CPUs (and torch threads) per task.
        gpus_per_task: GPUs per task; None takes one per task when the cluster has GPUs.
    """

    address: str | None = None
    workers: int | None = None
    num_cpus: int | None = None
    cpus_per_task: int = 1
    gpus_per_task: float | None = None


@dataclass(frozen=True)
class Part:
    """One task's share: rows ``start … stop − 1`` of the set, or positions ``start … stop − 1``
    of the filtered row ids."""

    start: int
    stop: int


def plan_parts(
    boundaries: np.ndarray, total: int, workers: int, chunk_rows: int = CHUNK_ROWS
) -> list[Part]:
    """Cuts ``0 … total`` into at most ``workers`` contiguous parts of about equal size, only
    at chunk starts: every multiple of ``chunk_rows`` after each boundary (shard offsets).

    Example:
        >>> plan_parts(np.array([0, 100, 250]), 300, 2, chunk_rows=64)
        [Part(start=0, stop=164), Part(start=164, stop=300)]
    """
    cuts = np.unique(
        np.concatenate(
            [
                np.arange(b, e, chunk_rows)
                for b, e in itertools.pairwise([*boundaries.tolist(), total])
            ]
        )
    )
    cuts = cuts[(cuts > 0) & (cuts < total)]
    workers = max(1, min(workers, cuts.size + 1))
    targets = np.arange(1, workers) * total / workers
    chosen = np.unique(cuts[np.clip(np.searchsorted(cuts, targets), 0, max(cuts.size - 1, 0))])
    edges = [0, *chosen.tolist(), total] if cuts.size else [0, total]
    return [Part(a, b) for a, b in itertools.pairwise(edges) if b > a]


class RayScan:
    """Exact top-k over a set on a Ray cluster: one task per part, merged on the driver.

    Args:
        config: Cluster and task sizes.
    """

    name = "ray"

    def __init__(self, config: RayScanConfig | None = None) -> None:
        self.config = config or RayScanConfig()
        self._started = False
        self._task: Any = None
        # ‖W d‖ of every row of the last set a blended adaptation scanned whole, assembled
        # from the tasks' parts: (key, (rows,) float32 norms). Later scans ship each task its
        # part's slice, so the tasks skip the E×E product per row (StaticBlend.row_norms).
        self._norms: tuple[Any, np.ndarray] | None = None

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError as exc:
            raise missing_extra("the Ray scan engine", "distributed", exc) from exc
        if not ray.is_initialized():
            local = self.config.address is None
            ray.init(
                address=self.config.address,
                num_cpus=self.config.num_cpus if local else None,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            self._started = True
        return ray

    def scan(
        self, eset: EmbeddingSet, adaptation: Adaptation, k: int, *, rows: np.ndarray | None = None
    ) -> TopK:
        """Exact top-k of every row (or of ``rows``) for the adaptation's queries.

        Args:
            eset: The set (its folder must be readable at the same path on every node).
            adaptation: The queries' adaptation (its scoring plan travels to the tasks).
            k: Results per query.
            rows: Sorted global row ids to scan instead of the whole set.

        Returns:
            :class:`~quari.scoring.TopK` with global row ids, on the CPU.
        """
        k = check_k(k)
        ray = self._ray()
        resources = ray.cluster_resources()
        gpus = self.config.gpus_per_task
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
        workers = self.config.workers or max(
            1,
            int(resources.get("GPU", 0) // gpus)
            if gpus
            else int(resources.get("CPU", 1) // self.config.cpus_per_task),
        )
        if rows is None:
            offsets = np.array([s.offset for s in eset.shards], dtype=np.int64)
            parts = plan_parts(offsets, eset.rows, workers)
        else:
            rows = np.asarray(rows, dtype=np.int64)
            parts = plan_parts(np.zeros(1, np.int64), rows.size, workers)
        if adaptation.device.type != "cpu":
            adaptation = adaptation.to("cpu")
        _ = adaptation.plan  # computed once here, so every task scores with the same numbers
        norms, key = self._stream_norms(eset, adaptation, rows)
        if norms is not None and adaptation.blend is not None:
            # each task gets its part's slice below, not every row's norms with the adaptation
            adaptation = adaptation.with_blend(adaptation.blend.with_row_norms(None))
        if self._task is None:
            self._task = ray.remote(_scan_part)
        task = self._task.options(num_cpus=self.config.cpus_per_task, num_gpus=gpus)
        shared = ray.put(adaptation)
        refs = [
            task.remote(
                str(eset.root.absolute()),
                eset.fingerprint,
                shared,
                k,
                part,
                None if rows is None else rows[part.start : part.stop],
                None if norms is None else norms[part.start : part.stop],
                self.config.cpus_per_task,
            )
            for part in parts
        ]
        best = RunningTopK(len(adaptation), k, torch.device("cpu"))
        computed = []
        for ids, scores, part_norms in ray.get(refs):  # in part order
            # ray.get hands back read-only arrays; torch wants writable memory
            best.add(torch.from_numpy(scores.copy()), torch.from_numpy(ids.copy()))
            computed.append(part_norms)
        if key is not None and norms is None and rows is None:
            self._norms = (key, np.concatenate(computed))
        return best.result()

    def _stream_norms(
        self, eset: EmbeddingSet, adaptation: Adaptation, rows: np.ndarray | None
    ) -> tuple[np.ndarray | None, Any]:
        """The ‖W d‖ of the rows a blended adaptation's scan streams (the whole set or
        ``rows``), when known — the caller's :attr:`~quari.adaptation.StaticBlend.row_norms`
        or this engine's cache — and the cache key (None without a blend)."""
        blend = adaptation.blend
        if blend is None:
            return None, None
        key = (blend.matrix_key(), eset.rows, eset.fingerprint)
        if blend.row_norms is not None:
            return blend.row_norms.detach().float().cpu().numpy(), key
        if self._norms is None or self._norms[0] != key:
            return None, key
        return (self._norms[1] if rows is None else self._norms[1][rows]), key

    def close(self) -> None:
        """Shuts down the Ray this engine started (a cluster it joined keeps running)."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def _scan_part(
    root: str,
    fingerprint: list[list[Any]],
    adaptation: Adaptation,
    k: int,
    part: Part,
    rows: np.ndarray | None,
    norms: np.ndarray | None,
    threads: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Ray task: the top-k of one part, as (ids, scores) numpy arrays with global row ids, and
    — for a blended adaptation not given the part's ``norms`` — the ‖W d‖ of the part's rows,
    computed first (the scan then reads them instead of forming them per block)."""
    torch.set_num_threads(max(1, int(threads)))
    eset = EmbeddingSet.open(root)
    if eset.fingerprint != fingerprint:
        raise StoreError(
            f"{root}: this node sees another state of the set than the driver (a shared "
            "filesystem must hold the same files everywhere)"
        )
    import ray

    def chunks() -> Any:
        """The part's chunks, at offsets from the part's start."""
        if rows is None:
            return (
                (offset - part.start, chunk)
                for offset, chunk in eset.iter_chunks(CHUNK_ROWS)
                if part.start <= offset < part.stop
            )
        return eset.iter_gathered(rows, CHUNK_ROWS)

    computed = None
    blend = adaptation.blend
    if blend is not None:
        if norms is None:
            computed = blend.norms_of(blend.matrix, chunks(), part.stop - part.start)
        adaptation = adaptation.with_blend(
            blend.with_row_norms(computed if norms is None else torch.from_numpy(norms))
        )
    if ray.get_gpu_ids() and torch.cuda.is_available():
        adaptation = adaptation.to("cuda")  # the fused kernel (quari.kernels)
    with torch.inference_mode():
        top = adaptation.scan(chunks(), k)
    ids, scores = top.ids.cpu().numpy(), top.scores.cpu().numpy()
    # part offsets → row ids (the filtered ids of the part when filtered; a part is never
    # empty); a −1 (no row) stays −1
    ids = np.where(ids < 0, -1, part.start + ids if rows is None else rows[np.maximum(ids, 0)])
    return ids, scores, None if computed is None else computed.numpy()
