"""Per-query adapted spaces as factors, and all the scoring math on them.

An :class:`Adaptation` holds, for a batch of B queries, the adapted query q′ and the factors of
the map T (column convention, transformed item = T d):

* paper variant:      T = U Vᵀ            (pure rank r)
* reference variant:  T = I + α U Vᵀ      (α = ``anchor_scale``; the released checkpoints)

U writes the output space, V reads the input space; both are (B, E, r). The score of a gallery
item d for query b is cos(q′_b, T_b d). Nothing here forms an E×E matrix except :meth:`dense`,
which exists as a test oracle.

Two exact evaluations of the same score are used, each where it is cheapest
(``docs/DESIGN.md``, "The math"); write T = c·I + Ũ Vᵀ with Ũ = αU:

* **Gram form** (:meth:`Adaptation.score`, differentiable, used by training and re-ranking):
  with z = Vᵀd, a = Ũᵀd, num = c·q′ᵀd + (Ũᵀq′)ᵀz and
  ‖Td‖² = c²‖d‖² + 2c·aᵀz + zᵀ(ŨᵀŨ)z.
* **QR form** (:meth:`Adaptation.scan`, inference): with Ũ = QR, every quantity becomes a linear
  projection of d followed by a cheap epilogue — numerator w = Tᵀq′, ‖Td‖² = ‖m‖² +
  c²(‖d‖² − ‖y‖²) with y = Qᵀd and m = (cQ + V Rᵀ)ᵀd. One GEMM of the gallery against
  [w | Q | cQ + VRᵀ] (1 + r columns for the paper variant, 1 + 2r for the reference) serves all
  B queries per chunk read; no N×B×r intermediate outlives a block that fits in cache.

Gallery vectors need not be unit norm: cos(q′, T(s·d)) = cos(q′, T d) for s > 0, so inputs are
effectively normalised. A zero vector scores 0 (as ``F.normalize`` would make it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from quari.validation import QuARIInputError, as_embeddings, as_tensor, check_k, nonfinite_rows

__all__ = ["Adaptation", "TopK"]

_EPS = 1e-12  # the clamp F.normalize uses, so zero-norm items behave like the reference code
# Target size of the per-block intermediates of a scan (fp32 rows × projection columns); small
# enough to stay in cache, large enough that each GEMM runs at full speed.
_BLOCK_BYTES = 8 << 20


class TopK(NamedTuple):
    """Top-k result per query: ``ids`` (B, k) int64 and ``scores`` (B, k) float32, best first.

    Slots a query could not fill (fewer valid candidates than k) hold id −1 and score −inf.
    """

    ids: torch.Tensor
    scores: torch.Tensor


class Adaptation:
    """The query-adapted spaces of a batch of B queries, held as factors.

    Args:
        refined_query: (B, E) adapted queries q′ (normalised here).
        U: (B, E, r) output-side factor.
        V: (B, E, r) input-side factor.
        variant: ``"paper"`` (T = U Vᵀ) or ``"reference"`` (T = I + α U Vᵀ).
        anchor_scale: α of the reference variant; must be 0 for the paper variant.

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
        self.refined_query = F.normalize(refined_query, dim=-1)
        self.U = U
        self.V = V
        self.variant = variant
        self.anchor_scale = float(anchor_scale)

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
            f"variant={self.variant!r}, anchor_scale={self.anchor_scale})"
        )

    def to(self, device: torch.device | str) -> Adaptation:
        """A copy with every tensor on ``device``."""
        return Adaptation(
            self.refined_query.to(device),
            self.U.to(device),
            self.V.to(device),
            self.variant,
            self.anchor_scale,
        )

    def detach(self) -> Adaptation:
        """A copy cut from the autograd graph."""
        return Adaptation(
            self.refined_query.detach(),
            self.U.detach(),
            self.V.detach(),
            self.variant,
            self.anchor_scale,
        )

    # -- closed forms -------------------------------------------------------------------------
    def adapted_query(self) -> torch.Tensor:
        """w = Tᵀq′ (B, E): q′ᵀ(T d) = wᵀd, so an inner-product index queried with w ranks by
        the numerator of the adapted cosine — the candidate stage of adaptive retrieval."""
        w = self.V @ (self._output_factor.transpose(1, 2) @ self.refined_query[..., None])
        w = w[..., 0]
        if self._identity_weight:
            w = w + self._identity_weight * self.refined_query
        return w

    def dense(self) -> torch.Tensor:
        """T (B, E, E) in column convention (T @ d) — a test oracle; costs O(B·E²) memory.

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
        """Cosine scores cos(q′_b, T_b d) in the Gram form (differentiable).

        Args:
            gallery: (N, E) items shared by all queries, or (B, M, E) per-query candidates;
                any float dtype (fp16/bf16 are upcast, accumulation is fp32), numpy or torch.

        Returns:
            (B, N) or (B, M) float32 scores in [−1, 1].

        Raises:
            QuARIInputError: wrong dimension, batch size, NaN or Inf in the gallery.
        """
        E = self.embedding_dim
        d = as_embeddings(
            gallery, E, "gallery", ndim=(2, 3), dtype=None, device=self.device, allow_empty=True
        )
        if d.ndim == 3 and d.shape[0] != len(self):
            raise QuARIInputError(
                f"gallery: per-query candidates must have batch size {len(self)} (one row per "
                f"query), got shape {tuple(d.shape)}"
            )
        dtype = torch.promote_types(self.U.dtype, torch.float32)
        d = d.to(dtype)
        q, Ut, V = self.refined_query.to(dtype), self._output_factor.to(dtype), self.V.to(dtype)
        c = self._identity_weight
        b = (Ut.transpose(1, 2) @ q[..., None])[..., 0]  # (B, r) = Ũᵀq′
        G = Ut.transpose(1, 2) @ Ut  # (B, r, r)
        shared = d.ndim == 2
        # z[b, n] = V_bᵀ d_n ; shared galleries project once for all queries.
        z = torch.einsum("ne,ber->bnr", d, V) if shared else d @ V
        num = (z * b[:, None]).sum(-1)
        den2 = ((z @ G) * z).sum(-1)
        if c:
            a = torch.einsum("ne,ber->bnr", d, Ut) if shared else d @ Ut
            dd = (d * d).sum(-1)
            qd = q @ d.T if shared else (d @ q[..., None])[..., 0]
            num = num + c * qd
            den2 = den2 + 2 * c * (a * z).sum(-1) + c * c * (dd if not shared else dd[None])
        return (num / den2.clamp_min(0).sqrt().clamp_min(_EPS)).float()

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
            dtype=None,
            device=self.device,
            allow_empty=True,
        )
        if vecs.shape[:2] != ids.shape:
            raise QuARIInputError(
                f"candidate_vectors {tuple(vecs.shape)} does not match candidate_ids "
                f"{tuple(ids.shape)} in its first two axes"
            )
        with torch.no_grad():
            scores = self.score(vecs)
        scores = scores.masked_fill(ids < 0, float("-inf"))
        top = torch.topk(scores, min(k, ids.shape[1]), dim=1)
        out_ids = torch.gather(ids.long(), 1, top.indices)
        out_ids = out_ids.masked_fill(torch.isneginf(top.values), -1)
        return TopK(out_ids, top.values)

    # -- full scan ------------------------------------------------------------------------------
    @cached_property
    def _scan_projection(self) -> tuple[torch.Tensor, int]:
        """The QR-form projection: (E, B·(1+m)) fp32 columns [w_b for all b | per-query blocks]
        and m (the per-query column count after the numerator)."""
        with torch.no_grad():
            # float64 for the small per-query algebra, fp32 for the GEMM against the gallery.
            Ut, V = self._output_factor.double(), self.V.double()
            Q, R = torch.linalg.qr(Ut)  # Ũ = QR, Q (B, E, r), R (B, r, r)
            VRt = V @ R.transpose(1, 2)  # (B, E, r): ‖Ũ z‖ = ‖R Vᵀ d‖
            w = self.adapted_query().double()  # (B, E)
            c = self._identity_weight
            blocks = [VRt + c * Q, Q] if c else [VRt]  # m-columns first, then y-columns
            per_query = torch.cat(blocks, dim=2)  # (B, E, m)
            B, E, m = per_query.shape
            cols = torch.cat([w.T, per_query.permute(1, 0, 2).reshape(E, B * m)], dim=1)
        return cols.float().contiguous(), m

    def _scan_block(self, block: torch.Tensor, cols: torch.Tensor, m: int) -> torch.Tensor:
        """Scores (n, B) of one fp32 block of gallery rows, via the QR form."""
        B, r, c = len(self), self.rank, self._identity_weight
        proj = block @ cols  # (n, B·(1+m))
        num = proj[:, :B]
        z = proj[:, B:].view(-1, B, m)
        den2 = torch.linalg.vector_norm(z[..., :r], dim=-1).square_()
        if c:
            # ‖d‖² − ‖Qᵀd‖² ≥ 0 is the part of d outside span(Q); clamp the rounding.
            outside = (block * block).sum(-1, keepdim=True) - torch.linalg.vector_norm(
                z[..., r:], dim=-1
            ).square_()
            den2 += (c * c) * outside.clamp_min_(0)
        return num / den2.sqrt_().clamp_min_(_EPS)

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
            block_rows: Rows per GEMM block (default: sized so the block's intermediates stay
                near 8 MiB). Memory use is bounded by the chunk size plus one block.

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
        cols, m = self._scan_projection
        B, E = len(self), self.embedding_dim
        if block_rows is None:
            block_rows = max(256, min(1 << 16, _BLOCK_BYTES // (4 * (E + cols.shape[1]))))
        best_scores = torch.full((B, 0), float("-inf"), device=self.device)
        best_ids = torch.full((B, 0), -1, dtype=torch.long, device=self.device)
        buf = torch.empty(0, E, device=self.device)
        for offset, chunk in _checked_chunks(chunks, E):
            for start in range(0, chunk.shape[0], block_rows):
                part = chunk[start : start + block_rows]
                n = part.shape[0]
                if buf.shape[0] < n:
                    buf = torch.empty(n, E, device=self.device)
                block = buf[:n]
                block.copy_(part)  # device transfer and upcast to fp32 in one pass
                scores = self._scan_block(block, cols, m)  # (n, B)
                if not torch.isfinite(scores).all():
                    # Checking the (n, B) scores is far cheaper than the (n, E) inputs, and any
                    # NaN/Inf in a row reaches its score.
                    bad = nonfinite_rows(block)
                    row = offset + start + (int(bad[0]) if bad.numel() else 0)
                    raise QuARIInputError(f"gallery row {row} contains NaN or Inf")
                top = torch.topk(scores, min(k, n), dim=0)  # (k', B)
                ids = top.indices.T + (offset + start)
                merged_scores = torch.cat([best_scores, top.values.T], dim=1)
                merged_ids = torch.cat([best_ids, ids], dim=1)
                keep = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1)
                best_scores = keep.values
                best_ids = torch.gather(merged_ids, 1, keep.indices)
        return TopK(best_ids, best_scores)


def _checked_chunks(
    chunks: Iterable[tuple[int, Any]], dim: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields (offset, tensor) pairs, checking each chunk's shape and offset."""
    for item in chunks:
        try:
            offset, array = item
        except (TypeError, ValueError):
            raise QuARIInputError(
                f"scan: chunks must yield (offset, array) pairs, got {type(item).__name__}"
            ) from None
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
            raise QuARIInputError(f"scan: chunk offset must be a non-negative int, got {offset!r}")
        t = as_tensor(array, f"gallery chunk at offset {offset}")
        if t.ndim != 2 or t.shape[1] != dim:
            raise QuARIInputError(
                f"gallery chunk at offset {offset}: expected shape (n, {dim}), got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise QuARIInputError(
                f"gallery chunk at offset {offset}: expected a float dtype, got {t.dtype}"
            )
        if t.shape[0]:
            yield int(offset), t
