"""What one running service holds and does, apart from HTTP wiring: the retriever (loaded
once, shared read-only), its settings, the micro-batcher, item images and metrics; request
validation into :class:`~quari.serve.batching.Query` objects; answers as response bodies."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from quari.embed.images import load_image
from quari.errors import LimitError, QuARIInputError
from quari.filters import parse_where
from quari.retriever import MODES, Retriever
from quari.serve.batching import Answer, MicroBatcher, Query, run_batch
from quari.serve.images import ItemImages, parse_item_id
from quari.serve.metrics import Metrics
from quari.serve.schemas import (
    Hit,
    Info,
    SearchOptions,
    SearchRequest,
    SearchResponse,
    decode_base64,
    jsonable,
)
from quari.serve.settings import ServeSettings
from quari.validation import as_embeddings

__all__ = ["DEFAULT_CANDIDATES", "Service"]

#: Index candidates per query when a request names none (the library's default).
DEFAULT_CANDIDATES = 1000


class Service:
    """One service instance (see the module docstring).

    Args:
        retriever: The set, model, index and encoder to serve.
        settings: Limits and batching.
    """

    def __init__(self, retriever: Retriever, settings: ServeSettings) -> None:
        self.retriever = retriever
        self.settings = settings
        self.eset = retriever.eset
        self.default_mode = settings.default_mode or (
            "adaptive" if retriever.model is not None else "plain"
        )
        self._check_mode(self.default_mode, "default_mode")
        self.metrics = Metrics(lambda: self.batcher.depth)
        self.batcher: MicroBatcher[Query, Answer] = MicroBatcher(
            lambda queries: run_batch(retriever, queries),
            window_s=settings.window_s,
            max_batch=settings.batch_cap,
            max_queue=settings.max_queue,
            on_batch=self.metrics.batches.observe,
        )
        self.images = ItemImages(
            self.eset,
            settings.image_root,
            thumbnail_px=settings.thumbnail_px,
            cache_size=settings.thumbnail_cache,
            max_pixels=settings.max_image_pixels,
        )
        self.ready = False

    # -- life --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Warms up on the inference thread: maps the set, reads metadata, runs the encoder
        and the adapter once, so the first request is not the slow one."""
        self.batcher.open()
        await self.batcher.call(self._warm_up)
        self.ready = True

    def _warm_up(self) -> None:
        if self.eset.rows == 0:
            return
        first = self.eset.gather([0]).astype(np.float32)
        self.retriever.adapt(first, self.default_mode)
        if self.eset.has_metadata:
            self.eset.metadata([0])
        if self.retriever.encoder is not None:
            self.retriever.encode(texts=["warm-up"])

    async def stop(self) -> None:
        """Answers every queued query, then stops the inference thread."""
        self.ready = False
        await self.batcher.close()

    # -- requests ----------------------------------------------------------------------------
    def _check_mode(self, mode: str, name: str = "mode") -> None:
        if mode not in MODES:
            raise QuARIInputError(f"{name}: must be one of {MODES}, got {mode!r}")
        if mode != "plain" and self.retriever.model is None:
            raise QuARIInputError(
                f"{name}: {mode!r} needs a QuARI model; this service was started without "
                "--model and answers mode 'plain' only"
            )

    def _options(self, options: SearchOptions) -> dict[str, Any]:
        s = self.settings
        mode = options.mode or self.default_mode
        self._check_mode(mode)
        if options.k > s.max_k:
            raise LimitError(f"k: {options.k} is above the maximum of {s.max_k} (max_k)")
        candidates = options.candidates or min(DEFAULT_CANDIDATES, s.max_candidates)
        if candidates > s.max_candidates:
            raise LimitError(
                f"candidates: {candidates} is above the maximum of "
                f"{s.max_candidates} (max_candidates)"
            )
        where = options.where
        if where is not None:
            if len(where) > s.max_filter_chars:
                raise LimitError(
                    f"where: {len(where):,} characters, above the maximum of "
                    f"{s.max_filter_chars:,} (max_filter_chars)"
                )
            if not self.eset.has_metadata:
                raise QuARIInputError("where: the set has no metadata to filter on")
            parse_where(where)  # errors (syntax, depth) are answered now, not in a batch
        weight = options.blend_weight
        if weight is not None and weight > 0 and not self.has_blend:
            raise QuARIInputError(
                f"blend_weight: {weight:g} needs a model trained with the static blend; this "
                "service's model has none (send 0 or leave it out)"
            )
        return {
            "mode": mode,
            "k": options.k,
            "candidates": candidates,
            "where": where,
            "blend_weight": weight,
        }

    @property
    def has_blend(self) -> bool:
        """Whether the model has a fitted static blend (a per-query ``blend_weight`` above 0
        can be served)."""
        config = getattr(self.retriever.model, "config", None)
        return bool(getattr(config, "blend_weight", 0.0))

    def _needs_encoder(self, what: str) -> None:
        if self.retriever.encoder is None:
            raise QuARIInputError(
                f"{what}: this service has no encoder (start it with --encoder); send an "
                "embedding or an item_id instead"
            )

    async def image_query(self, options: SearchOptions, data: bytes) -> Query:
        """Validates an image query (uploaded bytes) and decodes it off the event loop."""
        opts = self._options(options)
        self._needs_encoder("image")
        if len(data) > self.settings.max_upload_bytes:
            raise LimitError(
                f"image: {len(data):,} bytes, above the maximum of "
                f"{self.settings.max_upload_bytes:,} (max_upload_bytes)"
            )
        decoded = await run_in_threadpool(
            load_image, data, max_pixels=self.settings.max_image_pixels
        )
        return Query("image", decoded.image, **opts)

    async def query(self, req: SearchRequest) -> Query:
        """Validates a JSON search request into a :class:`Query`.

        Raises:
            QuARIInputError: naming the field and the problem (``LimitError`` above a limit,
                ``NotFoundError`` for an unknown item).
        """
        kind = req.kind
        if kind == "image":
            return await self.image_query(req, decode_base64(req.image or "", "image"))
        opts = self._options(req)
        if kind == "text":
            self._needs_encoder("text")
            text = req.text or ""
            if len(text) > self.settings.max_text_chars:
                raise LimitError(
                    f"text: {len(text):,} characters, above the maximum of "
                    f"{self.settings.max_text_chars:,} (max_text_chars)"
                )
            if not text.strip():
                raise QuARIInputError("text: empty query")
            return Query("text", text, **opts)
        if kind == "item_id":
            return Query("item", parse_item_id(req.item_id, self.eset.rows), **opts)
        vector = as_embeddings(np.asarray([req.embedding], np.float32), self.eset.dim, "embedding")
        if not bool(vector.any()):
            raise QuARIInputError("embedding: all zeros (a query needs a direction)")
        return Query("embedding", vector[0].numpy(), **opts)

    async def search(self, query: Query, started: float) -> SearchResponse:
        """Answers one query through the micro-batcher."""
        batched = await self.batcher.submit(query)
        answer = batched.value
        res = answer.result
        timings = {"queue": batched.queued, **answer.timings}
        self.metrics.search(timings)
        hits = []
        rows = res.metadata[0].to_pylist() if res.metadata is not None else None
        valid = res.ids[0] >= 0
        for rank, (row, score) in enumerate(
            zip(res.ids[0][valid], res.scores[0][valid], strict=True)
        ):
            meta = rows[rank] if rows is not None else {}
            meta = {k: jsonable(v) for k, v in meta.items() if k not in ("row", "score")}
            hits.append(Hit(rank=rank + 1, id=int(row), score=float(score), metadata=meta))
        timings_ms = {stage: round(1000 * t, 3) for stage, t in timings.items()}
        timings_ms["total"] = round(1000 * (time.perf_counter() - started), 3)
        return SearchResponse(
            mode=res.mode,
            k=query.k,
            query="item_id" if query.kind == "item" else query.kind,
            results=hits,
            notes=res.notes,
            timings_ms=timings_ms,
            batch_size=batched.batch_size,
        )

    def item(self, item_id: str) -> dict[str, Any]:
        """``GET /items/{id}``: the row's metadata."""
        row = parse_item_id(item_id, self.eset.rows)
        meta: dict[str, Any] = {}
        if self.eset.has_metadata:
            meta = self.eset.metadata([row]).to_pylist()[0]
        return {
            "id": row,
            "metadata": {k: jsonable(v) for k, v in meta.items()},
            "image": f"/items/{row}/image" if self.images.has_paths else None,
        }

    def info(self) -> Info:
        """``GET /info``."""
        has_encoder = self.retriever.encoder is not None
        columns: list[str] = []
        if self.eset.has_metadata and self.eset.rows:
            columns = self.eset.metadata_table(self.eset.shards[0]).column_names
        return Info(
            set=self.eset.root.name,
            rows=self.eset.rows,
            dim=self.eset.dim,
            encoder=self.eset.encoder,
            has_model=self.retriever.model is not None,
            runtime=getattr(self.retriever.model, "runtime", None),
            blend_weight=self.retriever.model.blend_weight if self.has_blend else None,
            text_queries=has_encoder,
            image_queries=has_encoder,
            images=self.images.has_paths,
            modes=[m for m in MODES if m == "plain" or self.retriever.model is not None],
            default_mode=self.default_mode,
            max_k=self.settings.max_k,
            max_upload_bytes=self.settings.max_upload_bytes,
            batching=self.settings.batching,
            columns=columns,
        )
