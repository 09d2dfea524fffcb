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

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from quari.adaptation import Adaptation
from quari.filters import parse_where
from quari.hypernet import QuARIModel
from quari.index import CandidateIndex
from quari.store import EmbeddingSet
from quari.validation import QuARIInputError, as_embeddings, check_k

__all__ = ["MODES", "Retriever", "SearchResult"]

Mode = Literal["plain", "rerank", "adaptive", "scan"]
MODES: tuple[str, ...] = ("plain", "rerank", "adaptive", "scan")


@dataclass
class SearchResult:
    """Results of :meth:`Retriever.search` for B queries.

    Attributes:
        ids: (B, k) global row ids, best first; −1 where fewer than k rows qualify.
        scores: (B, k) float32 scores (−inf where the id is −1).
        mode: The search mode used.
        metadata: Per query, the metadata rows of its valid ids (None without metadata).
        notes: Human-readable remarks (e.g. a filter that fewer than k rows pass).
    """

    ids: np.ndarray
    scores: np.ndarray
    mode: str
    metadata: list[pa.Table] | None = None
    notes: list[str] = field(default_factory=list)

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
    """Embeds nothing itself: takes query embeddings, adapts them, retrieves from a set.

    Args:
        eset: The embedding set (gallery).
        model: A QuARI model (needed for every mode but ``plain``).
        index: A candidate index over ``eset`` (needed for ``plain``, ``rerank``, ``adaptive``).
        device: Where the model and the scoring run.
        batch_size: Queries adapted and scored together.
        exact_below: A filter passed by at most this many rows is answered exactly over those
            rows instead of through the index.

    Example:
        >>> r = Retriever(eset, model, CandidateIndex.load(eset))  # doctest: +SKIP
        >>> res = r.search(q, k=10, mode="adaptive", where='label == "cat"')  # doctest: +SKIP
    """

    def __init__(
        self,
        eset: EmbeddingSet,
        model: QuARIModel | None = None,
        index: CandidateIndex | None = None,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        exact_below: int = 50_000,
    ) -> None:
        if model is not None:
            if model.embedding_dim != eset.dim:
                raise QuARIInputError(
                    f"the model expects {model.embedding_dim}-d embeddings, the set "
                    f"{eset.root} holds {eset.dim}-d"
                )
            encoder = model.metadata.get("encoder")
            if encoder and eset.encoder != "unknown" and encoder != eset.encoder:
                raise QuARIInputError(
                    f"the model was trained for encoder {encoder!r}, the set {eset.root} was "
                    f"embedded with {eset.encoder!r}"
                )
            model = model.to(device).eval()
        if index is not None and index.eset is not eset and index.eset.root != eset.root:
            raise QuARIInputError("the index belongs to a different embedding set")
        self.eset, self.model, self.index = eset, model, index
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.exact_below = exact_below

    def search(
        self,
        queries: Any,
        k: int = 10,
        *,
        mode: Mode = "adaptive",
        candidates: int = 1000,
        where: str | pc.Expression | None = None,
        with_metadata: bool = True,
    ) -> SearchResult:
        """Retrieves the top-k rows for each query.

        Args:
            queries: (B, E) query embeddings from the set's encoder (text or image tower).
            k: Results per query.
            mode: ``"plain"``, ``"rerank"``, ``"adaptive"`` or ``"scan"`` (module docstring).
            candidates: K, the index candidates per query (per probe in ``adaptive``).
            where: Metadata filter (pyarrow expression or filter string).
            with_metadata: Attach the metadata rows of the results.

        Returns:
            A :class:`SearchResult`.
        """
        k, candidates = check_k(k), check_k(candidates)
        if mode not in MODES:
            raise QuARIInputError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "plain" and self.model is None:
            raise QuARIInputError(f"mode {mode!r} needs a QuARI model")
        q = as_embeddings(queries, self.eset.dim, "queries", normalize=True)
        notes: list[str] = []
        selection = None
        if where is not None:
            expr = parse_where(where) if isinstance(where, str) else where
            selection = self.eset.select(expr)
            if selection.size < k:
                notes.append(
                    f"only {selection.size} rows pass the filter {expr}; fewer than k = {k} results"
                )
        exact = mode == "scan" or (selection is not None and selection.size <= self.exact_below)
        if not exact and self.index is None:
            raise QuARIInputError(f"mode {mode!r} needs a candidate index (or use mode='scan')")
        ids, scores = [], []
        for start in range(0, q.shape[0], self.batch_size):
            batch = q[start : start + self.batch_size]
            ad = self._adapt(batch, mode)
            if exact:
                top_ids, top_scores = self._exact(ad, k, selection)
            else:
                top_ids, top_scores = self._via_index(ad, batch, k, mode, candidates, selection)
                if selection is not None:
                    # A restrictive selector can leave queries short (HNSW graph or IVF probe
                    # limits) although enough rows pass: answer those exactly instead.
                    short = np.flatnonzero((top_ids >= 0).sum(1) < min(k, selection.size))
                    if short.size:
                        sub = self._adapt(batch[torch.from_numpy(short)], mode)
                        top_ids[short], top_scores[short] = self._exact(sub, k, selection)
            ids.append(top_ids)
            scores.append(top_scores)
        result = SearchResult(np.concatenate(ids), np.concatenate(scores), mode, notes=notes)
        if with_metadata:
            result.metadata = [
                self._metadata(row, score)
                for row, score in zip(result.ids, result.scores, strict=True)
            ]
        return result

    # -- internals -----------------------------------------------------------------------------
    def _adapt(self, batch: torch.Tensor, mode: str) -> Adaptation:
        if mode == "plain":
            return Adaptation.identity(batch.to(self.device))
        with torch.inference_mode():
            return self.model(batch.to(self.device))

    def _exact(
        self, ad: Adaptation, k: int, selection: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scan over the whole set, or over the selected rows."""
        with torch.inference_mode():
            if selection is None:
                top = ad.scan(self.eset.iter_chunks(), k)
                return _pad(top.ids.cpu().numpy(), top.scores.cpu().numpy(), k)
            if selection.size == 0:
                return _pad(np.empty((len(ad), 0), np.int64), np.empty((len(ad), 0), np.float32), k)
            top = ad.scan(self.eset.iter_gathered(selection), k)
            return _pad(selection[top.ids.cpu().numpy()], top.scores.cpu().numpy(), k)

    def _via_index(
        self,
        ad: Adaptation,
        q: torch.Tensor,
        k: int,
        mode: str,
        K: int,
        selection: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Index candidates (on q, and on w for adaptive), then exact rescoring."""
        K = max(K, k)
        _, cand = self.index.search(q.numpy(), K, selection=selection)
        if mode == "adaptive":
            w = torch.nn.functional.normalize(ad.adapted_query().float(), dim=-1).cpu().numpy()
            _, cand_w = self.index.search(w, K, selection=selection)
            cand = _unique_rows(np.concatenate([cand, cand_w], axis=1))
        valid = cand >= 0
        vectors = np.zeros((*cand.shape, self.eset.dim), dtype=np.float16)
        vectors[valid] = self.eset.gather(cand[valid])
        with torch.inference_mode():
            top = ad.rerank(torch.from_numpy(cand), torch.from_numpy(vectors), k)
        return _pad(top.ids.cpu().numpy(), top.scores.cpu().numpy(), k)

    def _metadata(self, ids: np.ndarray, scores: np.ndarray) -> pa.Table:
        valid = ids >= 0
        table = self.eset.metadata(ids[valid])
        if "row" not in table.column_names:
            table = table.add_column(0, "row", pa.array(ids[valid]))
        return table.add_column(1, "score", pa.array(scores[valid], pa.float32()))


def _unique_rows(ids: np.ndarray) -> np.ndarray:
    """Per row, keeps the first occurrence of each id; repeats and −1 become −1."""
    order = np.sort(ids, axis=1)
    dup = np.zeros_like(order, dtype=bool)
    dup[:, 1:] = order[:, 1:] == order[:, :-1]
    return np.where(dup, -1, order)


def _pad(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads (B, m ≤ k) results to (B, k) with id −1 / score −inf."""
    B, m = ids.shape
    out_ids = np.full((B, k), -1, dtype=np.int64)
    out_scores = np.full((B, k), -np.inf, dtype=np.float32)
    out_ids[:, :m], out_scores[:, :m] = ids, scores
    return out_ids, out_scores
