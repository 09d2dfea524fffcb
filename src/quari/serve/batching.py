"""Micro-batching: concurrent queries share one encoder call and one hypernetwork pass.

Two parts:

* :func:`run_batch` (synchronous, no web code) answers a list of :class:`Query` objects the way
  :meth:`~quari.retriever.Retriever.search` answers each alone: texts are encoded together,
  images together, item ids gathered together; all non-``plain`` queries are adapted in one
  model pass (``plain`` ones through the cosine baseline); then queries that agree on
  (mode, k, candidates, filter, blend weight) are retrieved together — a query's own weight
  of a blended model's static blend swaps the blend of its share of the pass. A failure stays
  with the queries it concerns.
* :class:`MicroBatcher` (asyncio) collects queries for a short window, up to a size cap, and
  runs each batch on one inference thread — the model and encoder are never run concurrently.

Example:
    >>> batcher = MicroBatcher(lambda qs: [q * 2 for q in qs], window_s=0.002, max_batch=8)
    >>> asyncio.run(batcher.submit(21)).value  # doctest: +SKIP
    42
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from quari.adaptation import StaticBlend
from quari.errors import QuARIError
from quari.retriever import STAGES, Retriever, SearchResult, take_queries

__all__ = ["Answer", "Batched", "MicroBatcher", "Overloaded", "Query", "run_batch"]

KINDS = ("text", "image", "embedding", "item")
Q = TypeVar("Q")
R = TypeVar("R")


@dataclass(frozen=True)
class Query:
    """One search request, validated.

    Attributes:
        kind: ``"text"``, ``"image"`` (a decoded RGB PIL image), ``"embedding"`` (a float32
            (E,) array) or ``"item"`` (a row id of the set).
        value: The query itself.
        mode: Search mode.
        k: Results wanted.
        candidates: Index candidates per query.
        where: Filter string, or None.
        blend_weight: The static blend's weight for this query (None: the model's own).
    """

    kind: str
    value: Any
    mode: str
    k: int
    candidates: int
    where: str | None = None
    blend_weight: float | None = None

    @property
    def group(self) -> tuple[Hashable, ...]:
        """Queries with equal groups are retrieved in one call."""
        return (self.mode, self.k, self.candidates, self.where, self.blend_weight)


@dataclass
class Answer:
    """The answer to one :class:`Query`.

    Attributes:
        result: A one-query :class:`~quari.retriever.SearchResult`.
        timings: Seconds per stage (:data:`~quari.retriever.STAGES`), each the time of the
            batched call this query took part in.
    """

    result: SearchResult
    timings: dict[str, float] = field(default_factory=dict)


def _groups(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    out: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return out


def _embed(retriever: Retriever, kind: str, values: list[Any]) -> np.ndarray:
    """(n, E) float32 query vectors for queries of one kind."""
    if kind == "embedding":
        return np.stack([np.asarray(v, np.float32) for v in values])
    if kind == "item":
        return retriever.eset.gather(np.asarray(values, np.int64)).astype(np.float32)
    if kind == "text":
        # The page asks for the baseline and QuARI side by side: the same text twice.
        unique = list(dict.fromkeys(values))
        vectors = retriever.encode(texts=unique).numpy()
        where = {t: i for i, t in enumerate(unique)}
        return vectors[[where[v] for v in values]]
    if kind == "image":
        return retriever.encode(images=values).numpy()
    raise QuARIError(f"unknown query kind {kind!r}; expected one of {KINDS}")


def run_batch(retriever: Retriever, queries: Sequence[Query]) -> list[Answer | Exception]:
    """Answers a batch of queries with batched encoder, model and retrieval calls.

    Each answer equals ``retriever.search`` on that query alone (same ids, scores equal up
    to floating-point summation order).

    Args:
        retriever: The service's retriever.
        queries: The batch.

    Returns:
        Per query, its :class:`Answer` or the exception that stopped it.
    """
    n = len(queries)
    out: list[Answer | Exception | None] = [None] * n
    timings = [dict.fromkeys(STAGES, 0.0) for _ in range(n)]
    vectors = np.zeros((n, retriever.eset.dim), np.float32)

    def fail(rows: list[int], exc: Exception) -> None:
        for i in rows:
            out[i] = exc

    def timed(rows: list[int], stage: str, t0: float) -> None:
        dt = time.perf_counter() - t0
        for i in rows:
            timings[i][stage] = dt

    for kind, rows in _groups([q.kind for q in queries]).items():
        t0 = time.perf_counter()
        try:
            vectors[rows] = _embed(retriever, str(kind), [queries[i].value for i in rows])
        except Exception as exc:
            fail(rows, exc)
        timed(rows, "encode", t0)

    # One pass per adapter: the QuARI model serves rerank, adaptive and scan alike.
    adapted: dict[int, tuple[Any, int]] = {}
    alive = [i for i in range(n) if out[i] is None]
    for rows in _groups([queries[i].mode == "plain" for i in alive]).values():
        rows = [alive[j] for j in rows]
        t0 = time.perf_counter()
        try:
            ad = retriever.adapt(torch.from_numpy(vectors[rows]), queries[rows[0]].mode)
        except Exception as exc:
            fail(rows, exc)
            continue
        finally:
            timed(rows, "adapt", t0)
        adapted.update({i: (ad, j) for j, i in enumerate(rows)})

    alive = [i for i in range(n) if out[i] is None]
    for rows in _groups([queries[i].group for i in alive]).values():
        rows = [alive[j] for j in rows]
        q = queries[rows[0]]
        ad = adapted[rows[0]][0]
        try:
            ad = take_queries(ad, [adapted[i][1] for i in rows])
            if q.blend_weight is not None and q.mode != "plain":
                ad = _reblended(retriever, ad, vectors[rows], q.blend_weight)
            res = retriever.retrieve(
                torch.from_numpy(vectors[rows]),
                q.k,
                adaptation=ad,
                mode=q.mode,  # type: ignore[arg-type]
                candidates=q.candidates,
                where=q.where,
            )
        except Exception as exc:
            fail(rows, exc)
            continue
        for b, i in enumerate(rows):
            for stage in ("candidates", "rescore", "metadata"):
                timings[i][stage] = res.timings.get(stage, 0.0)
            one = SearchResult(
                res.ids[b : b + 1],
                res.scores[b : b + 1],
                res.mode,
                metadata=None if res.metadata is None else [res.metadata[b]],
                notes=list(res.notes),
                timings=timings[i],
            )
            out[i] = Answer(one, timings[i])
    return [a if a is not None else QuARIError("query not answered") for a in out]


def _reblended(retriever: Retriever, ad: Any, raw: np.ndarray, weight: float) -> Any:
    """``ad`` (the model's adaptation of the ``raw`` query vectors) scored with the static
    blend at ``weight`` instead of the model's: the same factors and, when the model blends,
    the same blend query (it does not depend on the weight); a model searched at weight 0 has
    none, so it is built from the model's W."""
    if weight == 0:
        return ad if ad.blend is None else ad.with_blend(None)
    if ad.blend is not None:
        return ad.with_blend(replace(ad.blend, weight=weight))
    W = retriever.model.whitening  # present: the service checked the model has a blend
    return ad.with_blend(StaticBlend.of(W, torch.from_numpy(raw).to(W.device), weight))


def _inference_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="quari-inference")


class Overloaded(Exception):
    """More queries are waiting than the service allows (``max_queue``), or it is stopping."""


@dataclass
class Batched(Generic[R]):
    """What :meth:`MicroBatcher.submit` returns: the value, how long the query waited for its
    batch to start, and the batch's size."""

    value: R
    queued: float
    batch_size: int


@dataclass
class _Job(Generic[Q]):
    item: Q
    future: asyncio.Future[Any]
    submitted: float


class MicroBatcher(Generic[Q, R]):
    """Collects items for up to ``window_s`` (at most ``max_batch``) and runs
    ``run(items) -> results`` on one worker thread, one batch at a time.

    While a batch runs, new items queue; the next batch starts as soon as the worker is free
    and takes what has queued (up to the cap), so the batch size follows the load.
    ``window_s = 0`` and ``max_batch = 1`` answer one item per call.

    Args:
        run: The batch function; returns one result or exception per item, in order.
        window_s: How long the first item of a batch waits for more.
        max_batch: Most items per call.
        max_queue: Most items waiting; :meth:`submit` raises :class:`Overloaded` beyond it.
        on_batch: Called with each batch's size (for metrics).
    """

    def __init__(
        self,
        run: Callable[[list[Q]], Sequence[R | Exception]],
        *,
        window_s: float = 0.003,
        max_batch: int = 32,
        max_queue: int = 1024,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.run = run
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.executor = _inference_thread()
        self.closing = False
        self._queue: asyncio.Queue[_Job[Q] | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> None:
        """Takes items again after :meth:`close` (a restarted app)."""
        if self.closing:
            self.closing = False
            self.executor = _inference_thread()
            self._queue = self._task = self._loop = None

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return self._queue.qsize() if self._queue is not None else 0

    def _ensure_started(self) -> asyncio.Queue[_Job[Q] | None]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._queue is None or self._task is None or self._task.done():
            # First use, a new event loop (the old loop's task died with it), or a worker
            # loop that ended by surprise: never leave requests waiting on nothing.
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._serve(self._queue), name="quari-batcher")
        return self._queue

    async def submit(self, item: Q) -> Batched[R]:
        """Queues one item and waits for its result.

        Raises:
            Overloaded: the queue is full, or the batcher is closing.
            Exception: whatever ``run`` returned for this item.
        """
        if self.closing:
            raise Overloaded("the service is shutting down")
        queue = self._ensure_started()
        if queue.qsize() >= self.max_queue:
            raise Overloaded(f"{queue.qsize()} queries are waiting (max_queue {self.max_queue})")
        job = _Job(item, asyncio.get_running_loop().create_future(), time.perf_counter())
        queue.put_nowait(job)
        return await job.future

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Runs ``fn()`` on the inference thread (between batches) and returns its result."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def _next_batch(self, queue: asyncio.Queue[_Job[Q] | None]) -> tuple[list[_Job[Q]], bool]:
        """The next batch, and whether the stop sentinel came after it."""
        first = await queue.get()
        if first is None:
            return [], True
        batch, loop = [first], asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        while len(batch) < self.max_batch:
            try:
                if queue.empty():
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    job = await asyncio.wait_for(queue.get(), left)
                else:
                    job = queue.get_nowait()
            except asyncio.TimeoutError:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    async def _serve(self, queue: asyncio.Queue[_Job[Q] | None]) -> None:
        stop = False
        while not stop:
            batch, stop = await self._next_batch(queue)
            # Requests that timed out or went away while queued are not computed.
            batch = [job for job in batch if not job.future.done()]
            if not batch:
                continue
            started = time.perf_counter()
            try:
                if self.on_batch is not None:
                    self.on_batch(len(batch))
                results = await self.call(lambda b=batch: self.run([j.item for j in b]))
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for {len(batch)} items")
            except Exception as exc:  # the batch function itself failed: every item fails
                results = [exc] * len(batch)
            for job, res in zip(batch, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(res, Exception):
                    job.future.set_exception(res)
                else:
                    job.future.set_result(Batched(res, started - job.submitted, len(batch)))

    async def close(self) -> None:
        """Stops taking items, answers every item already queued, and ends the worker."""
        self.closing = True
        if self._queue is not None and self._task is not None and not self._task.done():
            self._queue.put_nowait(None)
            await self._task
        self.executor.shutdown(wait=True)
