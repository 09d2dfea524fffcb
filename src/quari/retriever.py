"""Search an embedding set with or without a QuARI model.

Four modes, all returning exact scores computed from the stored fp16 vectors:

``plain``     cosine in the backbone space (the baseline): index top-K on q, exact rescoring.
``rerank``    the paper's re-ranking: index top-K on q, exact QuARI scores on those K.
``adaptive``  index top-K on w = Tᵀq′ (the adapted inner-product query, which ranks by the
              numerator of the adapted cosine) united with the top-K on q, then exact QuARI
              scores — adaptive retrieval over the whole collection at index cost.
``scan``      exact QuARI scores over every row (chunked memmap reads, batched over queries).

Filters (a pyarrow expression, or a string for :func:`quari.filters.parse_where`) restrict
every mode to the rows whose metadata passes. The index searches with a FAISS bitmap selector
(filtering inside the search, so candidates are not wasted on filtered-out rows); a selective
filter (few rows pass) is answered exactly over the passing rows instead.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from quari.adaptation import Adaptation
from quari.adapters import CosineAdapter, QueryAdapter, adapter_device
from quari.encoders import Encoder
from quari.errors import QuARIInputError
from quari.filters import parse_filter, to_expression
from quari.index import CandidateIndex, RowFilter
from quari.store import EmbeddingSet
from quari.validation import as_embeddings, check_device, check_k

__all__ = ["MODES", "STAGES", "Retriever", "SearchResult", "take_queries"]

Mode = Literal["plain", "rerank", "adaptive", "scan"]
MODES: tuple[str, ...] = ("plain", "rerank", "adaptive", "scan")
#: The stages :attr:`SearchResult.timings` reports, in order.
STAGES: tuple[str, ...] = ("encode", "adapt", "candidates", "rescore", "metadata")


@dataclass
class SearchResult:
    """Results of :meth:`Retriever.search` for B queries.

    Attributes:
        ids: (B, k) global row ids, best first; −1 where fewer than k rows qualify.
        scores: (B, k) float32 scores (−inf where the id is −1).
        mode: The search mode used.
        metadata: Per query, the metadata rows of its valid ids (None without metadata).
        notes: Human-readable remarks (e.g. a filter that fewer than k rows pass).
        timings: Seconds spent per stage (:data:`STAGES`) for the whole batch.
    """

    ids: np.ndarray
    scores: np.ndarray
    mode: str
    metadata: list[pa.Table] | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to_records(self) -> list[list[dict[str, Any]]]:
        """Per query, a list of ``{"rank", "row", "score", **metadata}`` dicts."""
        out = []
        for b in range(len(self)):
            valid = self.ids[b] >= 0
            meta = self.metadata[b].to_pylist() if self.metadata is not None else None
            rows = []
            for rank, (row, score) in enumerate(
                zip(self.ids[b][valid], self.scores[b][valid], strict=True)
            ):
                rec = {"rank": rank + 1, "row": int(row), "score": float(score)}
                if meta is not None:
                    rec.update({k: v for k, v in meta[rank].items() if k not in rec})
                rows.append(rec)
            out.append(rows)
        return out


class Retriever:
    """Search one embedding set: [encoder] → query adapter → candidates → exact rescoring.

    Args:
        eset: The embedding set (gallery).
        model: A :class:`~quari.adapters.QueryAdapter` — a QuARI model or a baseline —
            needed for every mode but ``plain`` (which uses :class:`~quari.adapters.CosineAdapter`).
        index: A candidate index over ``eset`` (needed for ``plain``, ``rerank``, ``adaptive``).
        encoder: Embeds text and image queries (:func:`quari.encoders.load_encoder`); must be
            the encoder the set was embedded with. Without it, queries are embeddings.
        device: Where the adapter and the scoring run. An adapter already there is not moved
            (moving would drop a QuARI model's CUDA graphs).
        batch_size: Queries adapted and scored together.
        exact_below: A filter passed by at most this many rows is answered exactly over those
            rows instead of through the index.
        scan_below: Without an index, sets of at most this many rows find their candidates by
            an exact scan (the same candidates a Flat index gives); larger sets need an index.
        scan_engine: Where exact scans of more than ``exact_below`` rows run: ``"local"`` (this
            process), ``"ray"`` (:class:`quari.scan_ray.RayScan` on a local or already joined
            Ray cluster) or an engine object with that ``scan(eset, adaptation, k, rows=)``.
        rescore_from: Where candidates' exact vectors come from: ``"set"`` (the set's own rows)
            or ``"index"`` (the index's stored copies, e.g. a Milvus collection, for
            deployments whose set files are remote; :meth:`CandidateIndex.fetch_vectors`).

    Example:
        >>> r = Retriever(eset, model, CandidateIndex.load(eset))  # doctest: +SKIP
        >>> res = r.search(q, k=10, mode="adaptive", where='label == "cat"')  # doctest: +SKIP
        >>> Retriever(eset, model, index, encoder=enc).search(texts=["a red car"])  # doctest: +SKIP
    """

    def __init__(
        self,
        eset: EmbeddingSet,
        model: QueryAdapter | None = None,
        index: CandidateIndex | None = None,
        *,
        encoder: Encoder | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        exact_below: int = 50_000,
        scan_below: int = 250_000,
        scan_engine: str | Any = "local",
        rescore_from: Literal["set", "index"] = "set",
    ) -> None:
        self.device = check_device(device)
        if model is not None:
            if model.embedding_dim != eset.dim:
                raise QuARIInputError(
                    f"the model expects {model.embedding_dim}-d embeddings, the set "
                    f"{eset.root} holds {eset.dim}-d"
                )
            _check_encoder("model was trained", getattr(model, "metadata", {}).get("encoder"), eset)
            model = _on_device(model, self.device)
        if encoder is not None:
            if encoder.dim != eset.dim:
                raise QuARIInputError(
                    f"the encoder {encoder.id!r} makes {encoder.dim}-d embeddings, the set "
                    f"{eset.root} holds {eset.dim}-d"
                )
            _check_encoder("encoder is", encoder.id, eset)
        if index is not None and index.eset is not eset and index.eset.root != eset.root:
            raise QuARIInputError("the index belongs to a different embedding set")
        self.eset, self.model, self.index, self.encoder = eset, model, index, encoder
        self.baseline = CosineAdapter(eset.dim, eset.encoder)
        self.batch_size = batch_size
        self.exact_below = exact_below
        self.scan_below = scan_below
        self.scan_engine = _scan_engine(scan_engine)
        if rescore_from not in ("set", "index") or (rescore_from == "index" and index is None):
            raise QuARIInputError(
                f"rescore_from must be 'set' or 'index' (with an index), got {rescore_from!r}"
            )
        self.rescore_from = rescore_from
        # ‖W d‖ of every row for a blended model's W (StaticBlend.row_norms): (key, norms)
        self._blend_norms: tuple[tuple, torch.Tensor] | None = None

    # -- queries --------------------------------------------------------------------------------
    def encode(
        self, *, texts: Sequence[str] | None = None, images: Sequence[Any] | None = None
    ) -> torch.Tensor:
        """Embeds text or image queries with the retriever's encoder.

        Args:
            texts: Query strings.
            images: RGB PIL images (decode files with :func:`quari.embed.images.load_image`).

        Returns:
            (B, E) float32 unit-norm query embeddings.

        Raises:
            QuARIInputError: no encoder, both or neither of ``texts`` and ``images``, an
                empty list.
        """
        if self.encoder is None:
            raise QuARIInputError(
                "text and image queries need an encoder (Retriever(..., encoder=...) or "
                "--encoder); without one, pass query embeddings"
            )
        if (texts is None) == (images is None):
            raise QuARIInputError("give exactly one of texts and images")
        items = list(texts if texts is not None else images)
        if not items:
            raise QuARIInputError("no queries given")
        if texts is not None:
            bad = [i for i, t in enumerate(items) if not isinstance(t, str) or not t.strip()]
            if bad:
                raise QuARIInputError(f"texts: query {bad[0]} is empty or not a string")
            vectors = self.encoder.encode_texts(items)
        else:
            vectors = self.encoder.encode_images(items)
        return torch.from_numpy(np.asarray(vectors, dtype=np.float32))

    def search(
        self,
        queries: Any = None,
        k: int = 10,
        *,
        texts: Sequence[str] | None = None,
        images: Sequence[Any] | None = None,
        mode: Mode = "adaptive",
        candidates: int = 1000,
        where: str | pc.Expression | None = None,
        with_metadata: bool = True,
    ) -> SearchResult:
        """Retrieves the top-k rows for each query.

        Args:
            queries: (B, E) query embeddings from the set's encoder (text or image tower).
            k: Results per query (at most the set's rows: a larger k returns every row).
            texts: Text queries instead (needs an encoder).
            images: Image queries instead (PIL images; needs an encoder).
            mode: ``"plain"``, ``"rerank"``, ``"adaptive"`` or ``"scan"`` (module docstring).
            candidates: K, the index candidates per query (per probe in ``adaptive``; at most
                the set's rows).
            where: Metadata filter (pyarrow expression or filter string).
            with_metadata: Attach the metadata rows of the results.

        Returns:
            A :class:`SearchResult` with per-stage timings; ``ids``/``scores`` have
            min(k, rows) columns.
        """
        check_k(k), check_k(candidates, "candidates")
        self._check_mode(mode)
        given = sum(x is not None for x in (queries, texts, images))
        if given != 1:
            raise QuARIInputError("give exactly one of queries (embeddings), texts and images")
        timings = dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        if queries is None:
            queries = self.encode(texts=texts, images=images)
        timings["encode"] = time.perf_counter() - t0
        return self.retrieve(
            queries,
            k,
            mode=mode,
            candidates=candidates,
            where=where,
            with_metadata=with_metadata,
            timings=timings,
        )

    def adapt(self, queries: Any, mode: Mode = "adaptive") -> Adaptation:
        """Adapts query embeddings for ``mode``: through the QuARI model, or the cosine
        baseline for ``plain``. With :meth:`retrieve` this splits :meth:`search` so that a
        caller (the HTTP service's micro-batcher) can adapt many queries in one forward pass.

        Args:
            queries: (B, E) query embeddings (normalised here).
            mode: The search mode the adaptation is for.

        Returns:
            The queries' :class:`~quari.adaptation.Adaptation`, on the retriever's device.

        Example:
            >>> ad = r.adapt(q, "adaptive")  # doctest: +SKIP
            >>> r.retrieve(q, 10, adaptation=ad, mode="adaptive")  # doctest: +SKIP
        """
        self._check_mode(mode)
        q = as_embeddings(queries, self.eset.dim, "queries", normalize=True)
        return self._adapt(q, mode, dict.fromkeys(STAGES, 0.0))

    def retrieve(
        self,
        queries: Any,
        k: int = 10,
        *,
        adaptation: Adaptation | None = None,
        mode: Mode = "adaptive",
        candidates: int = 1000,
        where: str | pc.Expression | None = None,
        with_metadata: bool = True,
        timings: dict[str, float] | None = None,
    ) -> SearchResult:
        """:meth:`search` for query embeddings, optionally already adapted (:meth:`adapt`).

        Args:
            queries: (B, E) query embeddings (the index's candidate stage searches with them).
            k: Results per query.
            adaptation: The queries' adaptation for ``mode`` (row b adapts query b); None
                adapts them here.
            mode: As in :meth:`search`.
            candidates: As in :meth:`search`.
            where: As in :meth:`search`.
            with_metadata: As in :meth:`search`.
            timings: Stage times to add to (the caller's ``encode`` and ``adapt``, say).

        Returns:
            A :class:`SearchResult`, equal to :meth:`search` on the same queries.
        """
        # Both are clamped to the rows that exist: memory follows the work, not the number typed.
        rows = max(1, self.eset.rows)
        k, candidates = min(check_k(k), rows), min(check_k(candidates, "candidates"), rows)
        self._check_mode(mode)
        timings = {**dict.fromkeys(STAGES, 0.0), **(timings or {})}
        q = as_embeddings(queries, self.eset.dim, "queries", normalize=True)
        if adaptation is not None and len(adaptation) != q.shape[0]:
            raise QuARIInputError(
                f"adaptation: {len(adaptation)} queries adapted, {q.shape[0]} queries given"
            )
        notes: list[str] = []
        selection = index_selection = None
        if where is not None:
            condition = parse_filter(where) if isinstance(where, str) else None
            expr = to_expression(condition) if condition is not None else where
            selection = self.eset.select(expr)
            # The index gets the parsed filter too: backends with their own engine (Milvus)
            # filter by it rather than by a list of ids.
            index_selection = RowFilter(selection, condition)
            if selection.size < k:
                notes.append(
                    f"only {selection.size} rows pass the filter {expr}; fewer than k = {k} results"
                )
        exact = mode == "scan" or (selection is not None and selection.size <= self.exact_below)
        if not exact and self.index is None:
            if self.eset.rows > self.scan_below:
                raise QuARIInputError(
                    f"mode {mode!r} on {self.eset.rows:,} rows needs a candidate index: build "
                    f"one with `quari index build {self.eset.root}` (sets of up to "
                    f"{self.scan_below:,} rows are searched without one)"
                )
            notes.append(
                "no candidate index: candidates found by an exact scan (build one with "
                "`quari index build` for large sets)"
            )
        ids, scores = [], []
        for start in range(0, q.shape[0], self.batch_size):
            batch = q[start : start + self.batch_size]
            ad = (
                self._adapt(batch, mode, timings)
                if adaptation is None
                else take_queries(adaptation, slice(start, start + self.batch_size))
            )
            if exact:
                top_ids, top_scores = self._exact(ad, k, selection, timings)
            else:
                top_ids, top_scores = self._via_index(
                    ad, batch, k, mode, candidates, index_selection, timings
                )
                if selection is not None:
                    # A restrictive selector can leave queries short (HNSW graph or IVF probe
                    # limits) although enough rows pass: answer those exactly instead.
                    short = np.flatnonzero((top_ids >= 0).sum(1) < min(k, selection.size))
                    if short.size:
                        sub = take_queries(ad, torch.from_numpy(short))
                        top_ids[short], top_scores[short] = self._exact(sub, k, selection, timings)
            ids.append(top_ids)
            scores.append(top_scores)
        result = SearchResult(
            np.concatenate(ids), np.concatenate(scores), mode, notes=notes, timings=timings
        )
        if with_metadata:
            t0 = time.perf_counter()
            result.metadata = [
                self._metadata(row, score)
                for row, score in zip(result.ids, result.scores, strict=True)
            ]
            timings["metadata"] = time.perf_counter() - t0
        return result

    # -- internals -----------------------------------------------------------------------------
    def _check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise QuARIInputError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "plain" and self.model is None:
            raise QuARIInputError(f"mode {mode!r} needs a QuARI model")

    def _adapt(self, batch: torch.Tensor, mode: str, timings: dict[str, float]) -> Adaptation:
        t0 = time.perf_counter()
        adapter = self.baseline if mode == "plain" else self.model
        with torch.inference_mode():
            ad = adapter(batch.to(self.device))
        timings["adapt"] += time.perf_counter() - t0
        return ad

    def _exact(
        self,
        ad: Adaptation,
        k: int,
        selection: np.ndarray | None,
        timings: dict[str, float],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scan over the whole set, or over the selected rows."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.scan_engine is not None and (
                selection is None or selection.size > self.exact_below
            ):
                top = self.scan_engine.scan(self.eset, ad, k, rows=selection)
                out = _pad(top.ids.cpu().numpy(), top.scores.cpu().numpy(), k)
            elif selection is None:
                top = self._with_row_norms(ad, None).scan(self.eset.iter_chunks(), k)
                out = _pad(top.ids.cpu().numpy(), top.scores.cpu().numpy(), k)
            elif selection.size == 0:
                empty = np.empty((len(ad), 0), np.int64)
                out = _pad(empty, empty.astype(np.float32), k)
            else:
                ad = self._with_row_norms(ad, selection)
                top = ad.scan(self.eset.iter_gathered(selection), k)
                out = _pad(selection[top.ids.cpu().numpy()], top.scores.cpu().numpy(), k)
        timings["rescore"] += time.perf_counter() - t0
        return out

    def _with_row_norms(self, ad: Adaptation, selection: np.ndarray | None) -> Adaptation:
        """``ad`` with its static blend reading the set's ‖W d‖ from a per-set cache (computed
        on the first scan: one E×E product per row, 4 bytes per row kept), so that later scans
        skip that product; ``ad`` itself when it has no blend."""
        blend = ad.blend
        if blend is None:
            return ad
        W = blend.matrix
        key = (W.data_ptr(), blend.matrix_key(), self.eset.rows, self.eset.fingerprint)
        if self._blend_norms is None or self._blend_norms[0] != key:
            norms = blend.norms_of(W, self.eset.iter_chunks(), self.eset.rows)
            self._blend_norms = (key, norms)
        norms = self._blend_norms[1]
        if selection is not None:
            norms = norms[torch.from_numpy(selection)]
        return ad.with_blend(blend.with_row_norms(norms.to(ad.device)))

    def _via_index(
        self,
        ad: Adaptation,
        q: torch.Tensor,
        k: int,
        mode: str,
        K: int,
        selection: RowFilter | None,
        timings: dict[str, float],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Index candidates (on q, and on w for adaptive), then exact rescoring."""
        t0 = time.perf_counter()
        K = max(K, k)
        cand = self._candidates(q, K, selection)
        if mode == "adaptive":
            w = torch.nn.functional.normalize(ad.adapted_query().float(), dim=-1).cpu()
            cand_w = self._candidates(w, K, selection)
            cand = _unique_rows(np.concatenate([cand, cand_w], axis=1))
        t1 = time.perf_counter()
        timings["candidates"] += t1 - t0
        valid = cand >= 0
        # Gathered in the set's own dtype (fp16 usually, fp32 sets exist): rescoring upcasts.
        vectors = np.zeros((*cand.shape, self.eset.dim), dtype=np.dtype(self.eset.dtype))
        if self.rescore_from == "index":
            vectors[valid] = self.index.fetch_vectors(cand[valid])
        else:
            vectors[valid] = self.eset.gather(cand[valid])
        with torch.inference_mode():
            top = ad.rerank(torch.from_numpy(cand), torch.from_numpy(vectors), k)
        out = _pad(top.ids.cpu().numpy(), top.scores.cpu().numpy(), k)
        timings["rescore"] += time.perf_counter() - t1
        return out

    def _candidates(self, vectors: torch.Tensor, K: int, selection: RowFilter | None) -> np.ndarray:
        """(B, K) candidate row ids by inner product: from the index, or — for small sets
        without one — by an exact scan (unit-norm rows: the ranking of a Flat index)."""
        if self.index is not None:
            return self.index.search(vectors.numpy(), K, selection=selection)[1]
        with torch.inference_mode():
            ad = Adaptation.identity(vectors)
            if selection is None:
                return _pad(ad.scan(self.eset.iter_chunks(), K).ids.numpy(), None, K)[0]
            rows = selection.ids
            top = ad.scan(self.eset.iter_gathered(rows), K).ids.numpy()
            return _pad(np.where(top >= 0, rows[np.maximum(top, 0)], -1), None, K)[0]

    def _metadata(self, ids: np.ndarray, scores: np.ndarray) -> pa.Table:
        valid = ids >= 0
        table = self.eset.metadata(ids[valid])
        if "row" not in table.column_names:
            table = table.add_column(0, "row", pa.array(ids[valid]))
        return table.add_column(1, "score", pa.array(scores[valid], pa.float32()))


def _scan_engine(engine: str | Any) -> Any:
    """None for the local scan, else an object with ``scan(eset, adaptation, k, rows=)``."""
    if engine == "local":
        return None
    if engine == "ray":
        from quari.scan_ray import RayScan

        return RayScan()
    if isinstance(engine, str) or not callable(getattr(engine, "scan", None)):
        raise QuARIInputError(
            f"scan_engine must be 'local', 'ray' or a scan engine, got {engine!r}"
        )
    return engine


def _check_encoder(what: str, encoder: str | None, eset: EmbeddingSet) -> None:
    """Refuses a model or encoder made for another embedding space than the set's."""
    if encoder and eset.encoder != "unknown" and encoder != eset.encoder:
        raise QuARIInputError(
            f"the {what} for encoder {encoder!r}, the set {eset.root} was embedded with "
            f"{eset.encoder!r}"
        )


def _on_device(adapter: Any, device: torch.device) -> Any:
    """The adapter on ``device``, in eval mode; moved only when it is elsewhere (a move
    replaces a QuARI model's parameters and drops its CUDA graphs)."""
    if isinstance(adapter, torch.nn.Module):
        here = adapter_device(adapter)
        if here is not None and not _same_device(here, device):
            adapter = adapter.to(device)
        adapter.eval()
    return adapter


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device when device 0 is the current one."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (
        b.index if b.index is not None else current
    )


def take_queries(ad: Adaptation, rows: slice | Sequence[int] | torch.Tensor) -> Adaptation:
    """The adaptations of some of a batch's queries, values unchanged — to hand each part of
    one :meth:`Retriever.adapt` call to its own :meth:`Retriever.retrieve`.

    Args:
        ad: The batch's adaptation.
        rows: The queries to keep (a slice, or their positions in the batch).

    Returns:
        An :class:`~quari.adaptation.Adaptation` of those queries, in that order.

    Example:
        >>> take_queries(Adaptation.random(4, 8, 2), [3, 0]).refined_query.shape
        torch.Size([2, 8])
    """
    index = rows if isinstance(rows, slice) else torch.as_tensor(rows, device=ad.device)
    return Adaptation(
        ad.refined_query[index],
        ad.U[index],
        ad.V[index],
        ad.variant,
        ad.anchor_scale,
        normalized=True,
        blend=None if ad.blend is None else ad.blend.take(index),
    )


def _unique_rows(ids: np.ndarray) -> np.ndarray:
    """Per row, keeps the first occurrence of each id; repeats and −1 become −1."""
    order = np.sort(ids, axis=1)
    dup = np.zeros_like(order, dtype=bool)
    dup[:, 1:] = order[:, 1:] == order[:, :-1]
    return np.where(dup, -1, order)


def _pad(ids: np.ndarray, scores: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads (B, m ≤ k) results to (B, k) with id −1 / score −inf."""
    B, m = ids.shape
    out_ids = np.full((B, k), -1, dtype=np.int64)
    out_scores = np.full((B, k), -np.inf, dtype=np.float32)
    out_ids[:, :m] = ids
    if scores is not None:
        out_scores[:, :m] = scores
    return out_ids, out_scores
