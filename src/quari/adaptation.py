"""Per-query adapted spaces as factors, and all the scoring math on them.

An :class:`Adaptation` holds, for a batch of B queries, the adapted query q′ and the factors of
the map T (column convention, transformed item = T d):

* paper variant:      T = U Vᵀ            (pure rank r)
* reference variant:  T = I + α U Vᵀ      (α = ``anchor_scale``; the released checkpoints)

U writes the output space, V reads the input space; both are (B, E, r). The score of a gallery
item d for query b is cos(q′_b, T_b d). Nothing here forms an E×E matrix except :meth:`dense`,
which exists as a test oracle.

Two exact evaluations of the same score are used, each where it is cheapest
(``docs/method.md`` §4); write T = c·I + Ũ Vᵀ with Ũ = αU:

* **Gram form** (:meth:`Adaptation.score`, differentiable, used by training and re-ranking):
  with z = Vᵀd, a = Ũᵀd, num = c·q′ᵀd + (Ũᵀq′)ᵀz and
  ‖Td‖² = c²‖d‖² + 2c·aᵀz + zᵀ(ŨᵀŨ)z.
* **QR form** (:meth:`Adaptation.scan`, inference; :class:`quari.scoring.ScoringPlan`): with
  Ũ = QR, every quantity becomes a linear projection of d followed by a cheap epilogue —
  numerator w = Tᵀq′, ‖Td‖² = ‖m‖² + c²(‖d‖² − ‖y‖²) with y = Qᵀd and m = (cQ + V Rᵀ)ᵀd. One
  GEMM of the gallery against [w | cQ + VRᵀ | Q] (r columns for the paper variant, 1 + 2r for
  the reference) serves all B queries per chunk read; no N×B×r intermediate outlives one block
  of ~12 MiB.

A :class:`StaticBlend` mixes a static cosine into the score, s = (1 − a)·cos(q′, T d) +
a·cos(W q, W d) with one E×E map W for every query (a model's whitening,
:mod:`quari.whitening`); every path above adds it exactly: its numerator is one more linear
projection of d per query, its norm ‖W d‖ one shared projection per gallery block.

Gallery vectors need not be unit norm: cos(q′, T(s·d)) = cos(q′, T d) for s > 0, so inputs are
effectively normalised. A zero vector scores 0 (as ``F.normalize`` would make it).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from quari.errors import QuARIInputError
from quari.scoring import (
    EPS,
    RunningTopK,
    ScoringPlan,
    TopK,
    checked_chunks,
    default_block_rows,
    raise_nonfinite,
)
from quari.validation import as_embeddings, as_tensor, check_k

__all__ = ["Adaptation", "StaticBlend", "TopK"]  # TopK: from quari.scoring


@dataclass(frozen=True)
class StaticBlend:
    """A static cosine mixed into a batch's adapted scores (module docstring):
    s = (1 − a)·cos(q′, T d) + a·cos(W q, W d).

    Attributes:
        matrix: W (E, E), the same for every query and item.
        queries: (B, E) Wᵀŵ with ŵ = W q / ‖W q‖: the numerator is its inner product with d.
        weight: a, in [0, 1].
        row_norms: Optional (N,) ‖W d‖ of the rows a :meth:`Adaptation.scan` streams, by their
            offset in the stream (:meth:`quari.retriever.Retriever` keeps them per set): the
            scan reads them instead of forming the E×E product per block.

    Example:
        >>> W, q, d = torch.eye(4), torch.randn(2, 4), torch.randn(5, 4)
        >>> blend = StaticBlend.of(W, q, 0.5)
        >>> cos = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T
        >>> torch.allclose(blend.scores(d), cos, atol=1e-6)
        True
    """

    matrix: torch.Tensor
    queries: torch.Tensor
    weight: float
    row_norms: torch.Tensor | None = None

    @classmethod
    def of(cls, matrix: torch.Tensor, queries: torch.Tensor, weight: float) -> StaticBlend:
        """The blend of raw (B, E) ``queries`` under ``matrix`` W at ``weight`` a."""
        if not 0.0 <= weight <= 1.0:
            raise QuARIInputError(f"the static blend's weight must be in [0, 1], got {weight}")
        W = matrix.to(queries)
        return cls(W, F.normalize(queries @ W.T, dim=-1) @ W, float(weight))

    def scores(self, d: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """cos(W q, W d) of (N, E) shared items, (B, N), or (B, M, E) per-query ones, (B, M).
        ``start``: the items are rows ``start …`` of the scanned stream (use
        :attr:`row_norms`, when held, for their ‖W d‖)."""
        w = self.queries.to(d.dtype)
        if start is not None and self.row_norms is not None:
            norm = self.row_norms[start : start + d.shape[0]]
            if norm.shape[0] != d.shape[0]:
                raise QuARIInputError(
                    f"blend: row_norms hold {self.row_norms.shape[0]} rows; the scan streams "
                    f"rows up to {start + d.shape[0]}"
                )
            norm = norm.to(d.device, d.dtype).clamp_min(EPS)
        else:
            norm = torch.linalg.vector_norm(d @ self.matrix.to(d.dtype).T, dim=-1).clamp_min(EPS)
        if d.ndim == 2:
            return (w @ d.T) / norm
        return (d @ w[..., None])[..., 0] / norm

    def mix(self, adapted: torch.Tensor, d: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """(1 − a)·``adapted`` + a·:meth:`scores` (float32)."""
        a = self.weight
        return ((1 - a) * adapted.to(d.dtype) + a * self.scores(d, start)).float()

    def map(self, fn) -> StaticBlend:
        """The same blend with ``fn`` applied to its tensors (a device move, a detach)."""
        return replace(self, matrix=fn(self.matrix), queries=fn(self.queries))

    def take(self, index: Any) -> StaticBlend:
        """The blend of some of the batch's queries."""
        return replace(self, queries=self.queries[index])

    def with_row_norms(self, row_norms: torch.Tensor | None) -> StaticBlend:
        """The same blend reading ``row_norms`` (see the attribute) in scans."""
        return replace(self, row_norms=row_norms)

    def matrix_key(self) -> tuple[tuple[int, ...], float, float]:
        """W's shape and sums (E² additions): what a cache of ‖W d‖ is keyed by, so that a
        model changed in place — or another W — is noticed without keeping a copy of W."""
        W = self.matrix.double()
        return tuple(self.matrix.shape), float(W.sum()), float(W.square().sum())

    @staticmethod
    def norms_of(
        matrix: torch.Tensor, chunks: Iterable[tuple[int, Any]], rows: int
    ) -> torch.Tensor:
        """(rows,) float32 ‖W d‖ of every row a stream of ``(offset, array)`` chunks holds —
        what :attr:`row_norms` caches (one E×E product per row, once)."""
        out = torch.empty(rows)
        W = matrix.float().cpu()
        for offset, chunk in checked_chunks(chunks, W.shape[1]):
            out[offset : offset + chunk.shape[0]] = torch.linalg.vector_norm(
                chunk.float() @ W.T, dim=-1
            )
        return out


class Adaptation:
    """The query-adapted spaces of a batch of B queries, held as factors.

    Args:
        refined_query: (B, E) adapted queries q′ (normalised here).
        U: (B, E, r) output-side factor.
        V: (B, E, r) input-side factor.
        variant: ``"paper"`` (T = U Vᵀ) or ``"reference"`` (T = I + α U Vᵀ).
        anchor_scale: α of the reference variant; must be 0 for the paper variant.
        normalized: ``refined_query`` is already unit-norm (as the model makes it): skip
            normalising it again.
        blend: A :class:`StaticBlend` of the same B queries mixed into every score (None:
            the adapted cosine alone).

    Example:
        >>> B, E, r = 2, 16, 4
        >>> ad = Adaptation(torch.randn(B, E), torch.randn(B, E, r), torch.randn(B, E, r))
        >>> ad.score(torch.randn(10, E)).shape
        torch.Size([2, 10])
        >>> ad.rerank(torch.arange(10).expand(B, 10), torch.randn(B, 10, E), k=3).ids.shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        refined_query: torch.Tensor,
        U: torch.Tensor,
        V: torch.Tensor,
        variant: str = "paper",
        anchor_scale: float = 0.0,
        *,
        normalized: bool = False,
        blend: StaticBlend | None = None,
    ) -> None:
        if variant not in ("paper", "reference"):
            raise QuARIInputError(f"variant must be 'paper' or 'reference', got {variant!r}")
        if variant == "paper" and anchor_scale:
            raise QuARIInputError(
                "the paper variant has no anchor (T = U Vᵀ); anchor_scale must be 0"
            )
        if U.ndim != 3 or U.shape != V.shape:
            raise QuARIInputError(
                f"U and V must both be (B, E, r); got U {tuple(U.shape)}, V {tuple(V.shape)}"
            )
        B, E, r = U.shape
        if r > E:
            raise QuARIInputError(f"rank r = {r} cannot exceed the embedding dimension E = {E}")
        if refined_query.shape != (B, E):
            raise QuARIInputError(
                f"refined_query must be (B, E) = ({B}, {E}) to match U, got "
                f"{tuple(refined_query.shape)}"
            )
        self.refined_query = refined_query if normalized else F.normalize(refined_query, dim=-1)
        self.U = U
        self.V = V
        self.variant = variant
        self.anchor_scale = float(anchor_scale)
        if blend is not None and blend.queries.shape != (B, E):
            raise QuARIInputError(
                f"blend: its queries must be (B, E) = ({B}, {E}), got {tuple(blend.queries.shape)}"
            )
        self.blend = blend

    @classmethod
    def random(
        cls,
        batch: int,
        dim: int,
        rank: int,
        variant: str = "paper",
        *,
        seed: int = 0,
        scale: float = 1.0,
        anchor_scale: float = 0.8,
    ) -> Adaptation:
        """Random dense factors shaped like a model's output — for tests and benchmarks.

        Reference-variant factors are Frobenius-normalised, as the model makes them.
        """
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(batch, dim, generator=g)
        U = torch.randn(batch, dim, rank, generator=g) * scale
        V = torch.randn(batch, dim, rank, generator=g) * scale
        if variant != "reference":
            return cls(q, U, V, variant)
        U = U / torch.linalg.matrix_norm(U)[:, None, None]
        V = V / torch.linalg.matrix_norm(V)[:, None, None]
        return cls(q, U, V, "reference", anchor_scale=anchor_scale)

    @classmethod
    def identity(cls, queries: Any) -> Adaptation:
        """T = I and q′ = q: plain cosine similarity in the backbone space — the baseline —
        through the same exact scoring paths (score, rerank, scan) as an adapted query.

        Args:
            queries: (B, E) query embeddings (normalised here).
        """
        q = as_embeddings(queries, np.shape(queries)[-1], "queries", normalize=True)
        zeros = q.new_zeros(*q.shape, 1)
        return cls(q, zeros, zeros, "reference", anchor_scale=0.0)

    # -- shape and bookkeeping ------------------------------------------------------------------
    def __len__(self) -> int:
        return self.U.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.U.shape[1]

    @property
    def rank(self) -> int:
        return self.U.shape[2]

    @property
    def device(self) -> torch.device:
        return self.U.device

    @property
    def _identity_weight(self) -> float:
        """c in T = c·I + Ũ Vᵀ."""
        return 1.0 if self.variant == "reference" else 0.0

    @property
    def _output_factor(self) -> torch.Tensor:
        """Ũ = αU (reference) or U (paper), so that T = c·I + Ũ Vᵀ."""
        return self.U * self.anchor_scale if self.variant == "reference" else self.U

    def __repr__(self) -> str:
        return (
            f"Adaptation(queries={len(self)}, dim={self.embedding_dim}, rank={self.rank}, "
            f"variant={self.variant!r}, anchor_scale={self.anchor_scale}"
            + ("" if self.blend is None else f", blend={self.blend.weight}")
            + ")"
        )

    def to(self, device: torch.device | str) -> Adaptation:
        """A copy with every tensor on ``device``."""
        return Adaptation(
            self.refined_query.to(device),
            self.U.to(device),
            self.V.to(device),
            self.variant,
            self.anchor_scale,
            blend=None if self.blend is None else self.blend.map(lambda t: t.to(device)),
        )

    def with_blend(self, blend: StaticBlend | None) -> Adaptation:
        """The same adaptation with ``blend`` mixed in instead of its own (sharing the factors
        and, once computed, the scoring plan: the blend is not part of it)."""
        out = Adaptation(
            self.refined_query, self.U, self.V, self.variant, self.anchor_scale,
            normalized=True, blend=blend,
        )  # fmt: skip
        if "plan" in self.__dict__:  # cached_property's slot
            out.__dict__["plan"] = self.__dict__["plan"]
        return out

    def detach(self) -> Adaptation:
        """A copy cut from the autograd graph."""
        return Adaptation(
            self.refined_query.detach(),
            self.U.detach(),
            self.V.detach(),
            self.variant,
            self.anchor_scale,
            blend=None if self.blend is None else self.blend.map(torch.Tensor.detach),
        )

    # -- closed forms -------------------------------------------------------------------------
    def adapted_query(self) -> torch.Tensor:
        """w = Tᵀq′ (B, E): q′ᵀ(T d) = wᵀd, so an inner-product index queried with w ranks by
        the numerator of the adapted cosine — the candidate stage of adaptive retrieval. With a
        :class:`StaticBlend` the blend's numerator joins at its weight (the two cosines'
        item norms left out: a candidate query, not an exact score)."""
        w = self.V @ (self._output_factor.transpose(1, 2) @ self.refined_query[..., None])
        w = w[..., 0]
        if self._identity_weight:
            w = w + self._identity_weight * self.refined_query
        if self.blend is not None:
            a = self.blend.weight
            w = (1 - a) * F.normalize(w, dim=-1) + a * F.normalize(self.blend.queries, dim=-1)
        return w

    def dense(self) -> torch.Tensor:
        """T (B, E, E) in column convention (T @ d) — a test oracle; costs O(B·E²) memory.
        A :class:`StaticBlend` is not part of T.

        The reference implementation's ``W_image`` is the row-convention matrix: W = Tᵀ.
        """
        T = self._output_factor @ self.V.transpose(1, 2)
        if self._identity_weight:
            T = T + self._identity_weight * torch.eye(
                self.embedding_dim, dtype=T.dtype, device=T.device
            )
        return T

    # -- scoring --------------------------------------------------------------------------------
    def score(self, gallery: Any) -> torch.Tensor:
        """Exact cosine scores cos(q′_b, T_b d) (blended with :attr:`blend`'s, if any).

        Without gradients this uses the QR form (error ∝ κ(T)·ε, like :meth:`scan`); when the
        factors require grad it uses the differentiable Gram form, because the QR backward is
        ill-defined for rank-deficient factors (as an untrained hypernetwork's can be).

        Args:
            gallery: (N, E) items shared by all queries, or (B, M, E) per-query candidates;
                any float dtype (fp16/bf16 are upcast, accumulation is fp32), numpy or torch.

        Returns:
            (B, N) or (B, M) float32 scores in [−1, 1].

        Raises:
            QuARIInputError: wrong dimension, batch size, NaN or Inf in the gallery.
        """
        d = as_embeddings(
            gallery,
            self.embedding_dim,
            "gallery",
            ndim=(2, 3),
            dtype=self._compute_dtype,
            device=self.device,
            allow_empty=True,
        )
        if d.ndim == 3 and d.shape[0] != len(self):
            raise QuARIInputError(
                f"gallery: per-query candidates must have batch size {len(self)} (one row per "
                f"query), got shape {tuple(d.shape)}"
            )
        tracked = (self.refined_query, self.U, self.V)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
            scores = self._gram_scores(d)
        else:
            scores = self.plan.scores(d).float()
        return scores if self.blend is None else self.blend.mix(scores, d)

    @property
    def _compute_dtype(self) -> torch.dtype:
        """fp32 accumulation at least (fp64 when the factors are fp64)."""
        return torch.promote_types(self.U.dtype, torch.float32)

    def _gram_scores(self, d: torch.Tensor) -> torch.Tensor:
        """Differentiable scores of a checked (N, E) or (B, M, E) tensor (Gram form)."""
        dtype = d.dtype
        Ut, V, r, c = (
            self._output_factor.to(dtype),
            self.V.to(dtype),
            self.rank,
            self._identity_weight,
        )
        q = self.refined_query.to(dtype)
        # Everything linear in d in one projection: z = Vᵀd, and for the reference variant
        # a = Ũᵀd and q′ᵀd. A shared gallery is projected once for all B queries.
        cols = torch.cat([V, Ut, q[..., None]], dim=2) if c else V
        p = torch.einsum("ne,bek->bnk", d, cols) if d.ndim == 2 else d @ cols
        z = p[..., :r]
        # The low-rank part of numerator and norm both come from z, so their ratio is invariant
        # to z's scale and stays accurate where Td is tiny (d nearly in T's null space).
        num = (z * (Ut.transpose(1, 2) @ q[..., None]).transpose(1, 2)).sum(-1)  # (Ũᵀq′)ᵀz
        den2 = ((z @ (Ut.transpose(1, 2) @ Ut)) * z).sum(-1)  # zᵀ(ŨᵀŨ)z
        if c:
            a = p[..., r : 2 * r]
            num = num + c * p[..., -1]
            den2 = den2 + (2 * c) * (a * z).sum(-1)
            den2 = den2 + (c * c) * torch.linalg.vector_norm(d, dim=-1).square()
        return (num / den2.clamp_min(0).sqrt().clamp_min(EPS)).float()

    def rerank(self, candidate_ids: Any, candidate_vectors: Any, k: int) -> TopK:
        """Exact QuARI top-k among each query's own candidates.

        Args:
            candidate_ids: (B, M) int ids; −1 marks padding (as FAISS returns it) and never wins.
            candidate_vectors: (B, M, E) the candidates' gallery vectors (any float dtype).
            k: Results per query; k > M returns M.

        Returns:
            :class:`TopK` with (B, min(k, M)) ids and scores, best first.
        """
        k = check_k(k)
        ids = as_tensor(candidate_ids, "candidate_ids").to(self.device)
        if ids.ndim != 2 or ids.shape[0] != len(self) or ids.is_floating_point():
            raise QuARIInputError(
                f"candidate_ids: expected (B, M) integers with B = {len(self)}, got "
                f"{tuple(ids.shape)} {ids.dtype}"
            )
        vecs = as_embeddings(
            candidate_vectors,
            self.embedding_dim,
            "candidate_vectors",
            ndim=3,
            dtype=self._compute_dtype,
            device=self.device,
            allow_empty=True,
        )
        if vecs.shape[:2] != ids.shape:
            raise QuARIInputError(
                f"candidate_vectors {tuple(vecs.shape)} does not match candidate_ids "
                f"{tuple(ids.shape)} in its first two axes"
            )
        scores = self.plan.scores(vecs).float()
        if self.blend is not None:
            scores = self.blend.mix(scores, vecs)
        scores = scores.masked_fill(ids < 0, float("-inf"))
        top = torch.topk(scores, min(k, ids.shape[1]), dim=1)
        out_ids = torch.gather(ids.long(), 1, top.indices)
        out_ids = out_ids.masked_fill(torch.isneginf(top.values), -1)
        return TopK(out_ids, top.values)

    # -- full scan ------------------------------------------------------------------------------
    @cached_property
    def plan(self) -> ScoringPlan:
        """The QR-form :class:`~quari.scoring.ScoringPlan` (projection columns and epilogue),
        computed once per Adaptation; the factors must not change in place afterwards."""
        return ScoringPlan.from_factors(
            self.refined_query,
            self._output_factor,
            self.V,
            self._identity_weight,
            self._compute_dtype,
        )

    def scan(
        self,
        chunks: Iterable[tuple[int, Any]],
        k: int,
        *,
        block_rows: int | None = None,
    ) -> TopK:
        """Exact top-k over a whole gallery streamed as chunks, all B queries per chunk read.

        Args:
            chunks: Iterable of ``(offset, array)``: ``array`` (n, E) holds gallery rows
                ``offset … offset+n−1`` (numpy memmap slices, tensors; any float dtype).
                Returned ids are these global row numbers.
            k: Results per query; if the gallery has fewer than k rows, all rows are returned.
            block_rows: Rows per GEMM block (default: sized so one block and its projections
                take ~12 MiB). Memory use is bounded by the chunk size plus two blocks per
                worker thread (on CPU, one worker per torch thread).

        On a CUDA adaptation (fp32 factors) the scan runs on the GPU (:mod:`quari.kernels`):
        fp16/bf16 rows go through the fused Triton kernel — or, where Triton is missing or
        ``QUARI_DISABLE_TRITON`` is set, a half-precision GEMM with fp32 output — against the
        projection rounded to the rows' dtype, so scores are within ~1e-3 (bf16) or ~1e-4
        (fp16) of exact; rows in other dtypes are scored in fp32. Host chunks are copied to
        the device in segments of at most 512 MiB. An adaptation with a :class:`StaticBlend`
        scans with the torch path on any device (the fused kernel scores the adapted cosine
        alone).

        Returns:
            :class:`TopK` with (B, min(k, N)) ids and scores, best first.

        Raises:
            QuARIInputError: a chunk with the wrong dimension, or a gallery row holding
                NaN/Inf (named by its global row id).

        Example:
            >>> gallery = np.random.rand(1000, 16).astype(np.float16)
            >>> ad = Adaptation(torch.randn(2, 16), torch.randn(2, 16, 4), torch.randn(2, 16, 4))
            >>> top = ad.scan(((i, gallery[i:i + 256]) for i in range(0, 1000, 256)), k=5)
            >>> top.ids.shape
            torch.Size([2, 5])
        """
        k = check_k(k)
        blend = self.blend
        if self.device.type == "cuda" and self._compute_dtype == torch.float32 and blend is None:
            # GPU: fused kernel for fp16/bf16 rows, torch path otherwise (quari.kernels.scan).
            from quari.kernels.scan import scan_topk

            return scan_topk(self.plan, chunks, k, block_rows=block_rows)
        plan, E, B = self.plan, self.embedding_dim, len(self)
        proj = plan.projection
        if block_rows is None:
            block_rows = default_block_rows(E, proj.flat.shape[1])
        blocks = (
            (offset + start, chunk[start : start + block_rows])
            for offset, chunk in checked_chunks(chunks, E)
            for start in range(0, chunk.shape[0], block_rows)
        )
        local = threading.local()  # one reused fp32 buffer per thread

        def block_topk(start: int, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            buf = getattr(local, "buf", None)
            if buf is None or buf.shape[0] < part.shape[0]:
                buf = local.buf = torch.empty(max(block_rows, part.shape[0]), E, device=self.device)
            block = buf[: part.shape[0]]
            block.copy_(part)  # device transfer and upcast to fp32 in one pass
            z = (block @ proj.flat).view(block.shape[0], B, -1)
            norm2 = None
            if self._identity_weight:
                norm2 = torch.linalg.vector_norm(block, dim=-1, keepdim=True).square_()
            scores = plan.epilogue(z, norm2)  # (n, B)
            if blend is not None:
                scores = blend.mix(scores.T, block, start).T
            if not torch.isfinite(scores).all():
                raise_nonfinite(block, start)
            top = torch.topk(scores, min(k, part.shape[0]), dim=0)
            return top.values.T, top.indices.T + start

        best = RunningTopK(len(self), k, self.device)
        workers = torch.get_num_threads() if self.device.type == "cpu" else 1
        if workers == 1:
            for start, part in blocks:
                best.add(*block_topk(start, part))
            return best.result()
        # On CPU, one block per worker thread, each with one intra-op thread, runs ~20 % faster
        # than one block at a time on all threads: skinny GEMMs and the fp16→fp32 copy
        # parallelise poorly inside one call. At most 2 blocks per worker are in flight.
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            pending: deque[Future] = deque()
            try:
                for start, part in blocks:
                    pending.append(pool.submit(block_topk, start, part))
                    if len(pending) >= 2 * workers:
                        best.add(*pending.popleft().result())
                while pending:
                    best.add(*pending.popleft().result())
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        return best.result()
