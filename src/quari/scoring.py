"""Scoring primitives shared by :class:`~quari.adaptation.Adaptation` and :mod:`quari.kernels`.

Write the per-query map as T = c·I + Ũ Vᵀ (paper variant: c = 0, Ũ = U; reference variant:
c = 1, Ũ = αU) and Ũ = Q R (thin QR). Every score cos(q′, T d) is then a linear projection of d
followed by a cheap *epilogue* (``docs/method.md`` §4):

* paper:     z′ = R Vᵀ d (r columns);  score = bᵀz′ / ‖z′‖ with b = Qᵀq′;
* reference: [wᵀd | m | y] with w = Tᵀq′, m = (cQ + V Rᵀ)ᵀ d, y = Qᵀ d (1 + 2r columns);
  score = wᵀd / sqrt(‖m‖² + c²·max(‖d‖² − ‖y‖², 0)).

A :class:`ScoringPlan` holds those projection columns for a batch of queries (:class:`Projection`
— per query, and flattened so that one GEMM of a gallery block serves every query), the
epilogue, and a memo of derived device forms (half-precision copies, the GPU kernel's packed
layout). :class:`RunningTopK` merges per-block top-k results; :func:`checked_chunks` validates
the ``(offset, array)`` chunks a scan streams.

Example:
    >>> import torch
    >>> B, E, r = 2, 16, 4
    >>> plan = ScoringPlan.from_factors(torch.randn(B, E), torch.randn(B, E, r),
    ...                                 torch.randn(B, E, r), identity_weight=0.0)
    >>> gallery = torch.randn(10, E)
    >>> z = (gallery @ plan.projection.flat).view(10, B, -1)
    >>> plan.epilogue(z, None).shape
    torch.Size([10, 2])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

from quari.errors import QuARIInputError
from quari.validation import as_tensor, nonfinite_rows

__all__ = [
    "EPS",
    "HALF_DTYPES",
    "Projection",
    "RunningTopK",
    "ScoringPlan",
    "TopK",
    "as_plan",
    "checked_chunks",
    "default_block_rows",
    "raise_nonfinite",
]

#: The clamp ``F.normalize`` uses, so zero-norm items score 0 as in the reference code.
EPS = 1e-12
HALF_DTYPES = (torch.float16, torch.bfloat16)
# Target bytes of one CPU scan block (fp32 rows + their projections), processed by one worker
# thread. Measured on a 2-core Xeon: ~12 MiB (≈3.8k rows at B = 1, ≈1.1k at B = 32) keeps the
# block in cache while the GEMM still runs at full speed; much smaller or larger blocks cost
# 20-80 %.
_BLOCK_BYTES = 12 << 20
T = TypeVar("T")


class TopK(NamedTuple):
    """Top-k result per query: ``ids`` (B, k) int64 and ``scores`` (B, k) float32, best first.

    Slots a query could not fill (fewer valid candidates than k) hold id −1 and score −inf.
    """

    ids: torch.Tensor
    scores: torch.Tensor


class Projection(NamedTuple):
    """The QR-form projection columns of a batch of queries.

    ``per_query`` (B, E, k) holds each query's columns: for the reference variant the numerator
    column w = Tᵀq′ first, then [cQ + VRᵀ | Q]; for the paper variant only VRᵀ, the numerator
    being ``num_weights`` (B, r)ᵀ z′. ``flat`` is the same as (E, B·k) for galleries shared by
    all queries.
    """

    per_query: torch.Tensor
    flat: torch.Tensor
    num_weights: torch.Tensor | None


def default_block_rows(dim: int, columns: int) -> int:
    """Gallery rows per CPU scan block: ~12 MiB of fp32 rows plus their projections."""
    return max(256, min(1 << 16, _BLOCK_BYTES // (4 * (dim + columns))))


class ScoringPlan:
    """The projection and epilogue that score a gallery for a batch of adapted queries.

    Build it with :meth:`from_factors` (an :class:`~quari.adaptation.Adaptation` builds its own
    as ``adaptation.plan``). The factors must not change in place afterwards.

    Args:
        projection: The QR-form :class:`Projection`.
        rank: r, the rank of the low-rank part.
        identity_weight: c in T = c·I + Ũ Vᵀ (0 for the paper variant, 1 for the reference).
    """

    def __init__(self, projection: Projection, rank: int, identity_weight: float) -> None:
        self.projection = projection
        self.rank = int(rank)
        self.identity_weight = float(identity_weight)
        self._memo: dict[Any, Any] = {}

    @classmethod
    def from_factors(
        cls,
        refined_query: torch.Tensor,
        output_factor: torch.Tensor,
        V: torch.Tensor,
        identity_weight: float,
        dtype: torch.dtype | None = None,
    ) -> ScoringPlan:
        """The plan for T = c·I + Ũ Vᵀ and unit adapted queries q′.

        Args:
            refined_query: (B, E) unit-norm q′.
            output_factor: (B, E, r) Ũ (αU for the reference variant).
            V: (B, E, r) input-side factor.
            identity_weight: c.
            dtype: dtype of the projection (default: fp32, or fp64 for fp64 factors).

        Returns:
            The plan, on the factors' device.
        """
        c = float(identity_weight)
        dtype = dtype or torch.promote_types(output_factor.dtype, torch.float32)
        with torch.no_grad():
            # float64 for the small per-query algebra, ``dtype`` for the GEMM with the gallery.
            Ut, Vd, q = output_factor.double(), V.double(), refined_query.double()
            Q, R = torch.linalg.qr(Ut)  # Ũ = QR, Q (B, E, r), R (B, r, r)
            VRt = Vd @ R.transpose(1, 2)  # (B, E, r): ‖Ũ z‖ = ‖R Vᵀ d‖
            if c == 0:
                # Paper variant: the numerator is bᵀz′ with b = Qᵀq′, from the same z′ = R Vᵀd
                # as the norm, so the score is invariant to z′'s scale (accurate where Td is
                # tiny) and the GEMM keeps exactly r columns per query.
                b = (Q.transpose(1, 2) @ q[..., None])[..., 0]
                per_query, num_weights = VRt, b.to(dtype)
            else:
                # Reference variant: ‖Td‖ ≥ (1 − α)‖d‖ for Frobenius-normalised factors, so a
                # separate numerator column w = Tᵀq′ is well conditioned, and cheaper than a
                # dot over 2r columns.
                w = Vd @ (Ut.transpose(1, 2) @ q[..., None]) + c * q[..., None]
                per_query, num_weights = torch.cat([w, VRt + c * Q, Q], dim=2), None
            B, E, k = per_query.shape
            per_query = per_query.to(dtype)
            flat = per_query.permute(1, 0, 2).reshape(E, B * k).contiguous()
        return cls(Projection(per_query.contiguous(), flat, num_weights), Ut.shape[2], c)

    # -- facts ----------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        """B, the number of queries."""
        return self.projection.per_query.shape[0]

    @property
    def dim(self) -> int:
        """E, the embedding dimension."""
        return self.projection.per_query.shape[1]

    @property
    def device(self) -> torch.device:
        return self.projection.per_query.device

    @property
    def dtype(self) -> torch.dtype:
        """The projection's dtype (fp32 unless the factors were fp64)."""
        return self.projection.per_query.dtype

    @property
    def reference(self) -> bool:
        """Whether T has an identity part (the reference variant's layout, 1 + 2r columns)."""
        return self.identity_weight != 0

    # -- scoring --------------------------------------------------------------------------------
    def epilogue(self, z: torch.Tensor, norm2: torch.Tensor | None) -> torch.Tensor:
        """Scores (X, B) from projections ``z`` (X, B, k) and, for the reference layout, ‖d‖²
        broadcastable to (X, B); ``z`` is overwritten as scratch space."""
        r, c = self.rank, self.identity_weight
        weights = self.projection.num_weights
        if weights is not None:  # paper: z = z′
            num = (z * weights).sum(-1)
            den2 = torch.linalg.vector_norm(z, dim=-1).square_()
        else:  # reference: z = [wᵀd | m | y]
            num = z[..., 0]
            den2 = torch.linalg.vector_norm(z[..., 1 : r + 1], dim=-1).square_()
            # ‖d‖² − ‖Qᵀd‖² ≥ 0 is the part of d outside span(Q); clamp the rounding.
            outside = norm2 - torch.linalg.vector_norm(z[..., r + 1 :], dim=-1).square_()
            den2 += (c * c) * outside.clamp_min_(0)
        return num / den2.sqrt_().clamp_min_(EPS)

    def scores(self, d: torch.Tensor) -> torch.Tensor:
        """(B, N) or (B, M) scores of a checked (N, E) gallery or (B, M, E) candidates, in the
        projection's dtype."""
        with torch.no_grad():
            proj = self.projection
            norm2 = torch.linalg.vector_norm(d, dim=-1).square() if self.reference else None
            if d.ndim == 2:  # (N, B, k): one GEMM for all queries
                z = (d @ proj.flat).view(d.shape[0], self.batch, -1)
                return self.epilogue(z, None if norm2 is None else norm2[:, None]).T
            z = (d @ proj.per_query).transpose(0, 1)  # (M, B, k)
            return self.epilogue(z, None if norm2 is None else norm2.T).T

    # -- derived forms --------------------------------------------------------------------------
    def derived(self, key: Any, build: Callable[[], T]) -> T:
        """A form derived from the projection, built on first use and kept with the plan.

        Args:
            key: Hashable name of the form (e.g. ``("packed", torch.bfloat16, 4)``).
            build: Makes it when it is not there yet.

        Returns:
            The cached form.
        """
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def half_projection(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-query columns rounded to ``dtype`` (fp16/bf16) for the tensor cores.

        Each query's columns are first scaled by a power of two s (exact: no extra rounding)
        that brings their largest entry near 1, so fp16 neither overflows nor flushes to
        subnormals. Paper scores are invariant to s; the reference layout's ‖d‖² term must be
        multiplied by s².

        Returns:
            ``(columns, s2)``: (B, E, k) columns in ``dtype`` and (B,) fp32 s² (cached).
        """

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            cols = self.projection.per_query
            peak = cols.abs().amax(dim=(1, 2))
            exponent = torch.where(peak > 0, torch.round(torch.log2(peak)), torch.zeros_like(peak))
            scale = torch.exp2(-exponent.clamp(-60, 60))
            return (cols * scale[:, None, None]).to(dtype), scale.square()

        return self.derived(("half", dtype), build)

    def __repr__(self) -> str:
        layout = "reference" if self.reference else "paper"
        return f"ScoringPlan(queries={self.batch}, dim={self.dim}, rank={self.rank}, {layout})"


def as_plan(scorer: Any) -> ScoringPlan:
    """The :class:`ScoringPlan` of ``scorer``: the plan itself, or an object's ``.plan``
    (an :class:`~quari.adaptation.Adaptation`)."""
    if isinstance(scorer, ScoringPlan):
        return scorer
    plan = getattr(scorer, "plan", None)
    if not isinstance(plan, ScoringPlan):
        raise QuARIInputError(
            f"expected an Adaptation or a ScoringPlan, got {type(scorer).__name__}"
        )
    return plan


class RunningTopK:
    """The best k (score, id) pairs per query seen so far, merged block by block.

    Equal scores are ordered by id (lower first), and where equal scores straddle the k-th
    place the lower ids are kept, so the result does not depend on how the candidates were
    split into blocks or in which order the blocks were merged — a scan split over processes
    (:mod:`quari.scan_ray`) returns exactly what one process returns.

    Args:
        batch: B, the number of queries.
        k: Results kept per query.
        device: Where the merged results live.
    """

    def __init__(self, batch: int, k: int, device: torch.device) -> None:
        self.k = k
        self.scores = torch.full((batch, 0), float("-inf"), device=device)
        self.ids = torch.full((batch, 0), -1, dtype=torch.long, device=device)

    def add(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        """Merges (B, m) ``scores`` and ``ids``, each row sorted best first (a topk result)."""
        if self.scores.shape[1] == 0 and scores.shape[1] <= self.k:
            self.scores, self.ids = scores, ids  # the first block: nothing to merge with
            return
        merged_scores = torch.cat([self.scores, scores], dim=1)
        merged_ids = torch.cat([self.ids, ids], dim=1)
        k = min(self.k, merged_scores.shape[1])
        keep = torch.topk(merged_scores, k, dim=1)
        self.scores, self.ids = keep.values, torch.gather(merged_ids, 1, keep.indices)
        # torch.topk keeps an arbitrary subset of the scores tied with the k-th: where it left
        # one out, redo those queries with the (score, id) order. Rare, so cheap.
        cut = keep.values[:, -1:]
        tied = (merged_scores == cut).sum(1) > (keep.values == cut).sum(1)
        if tied.any():
            rows = tied.nonzero()[:, 0]
            order = _score_then_id(merged_scores[rows], merged_ids[rows])[:, :k]
            self.scores[rows] = torch.gather(merged_scores[rows], 1, order)
            self.ids[rows] = torch.gather(merged_ids[rows], 1, order)

    def result(self) -> TopK:
        order = _score_then_id(self.scores, self.ids)
        return TopK(torch.gather(self.ids, 1, order), torch.gather(self.scores, 1, order))


def _score_then_id(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row, the order by score (descending), then id (ascending; −1 padding last)."""
    key = torch.where(ids < 0, torch.iinfo(torch.int64).max, ids)
    by_id = torch.argsort(key, dim=1, stable=True)
    by_score = torch.argsort(torch.gather(scores, 1, by_id), dim=1, descending=True, stable=True)
    return torch.gather(by_id, 1, by_score)


def checked_chunks(
    chunks: Iterable[tuple[int, Any]], dim: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields the non-empty ``(offset, tensor)`` pairs of a scan, checking shape and offset.

    Raises:
        QuARIInputError: an item that is not a pair, a negative or non-integer offset, a chunk
            that is not (n, ``dim``) floating point.
    """
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


def raise_nonfinite(rows: torch.Tensor, offset: int) -> None:
    """Raises for scores found non-finite, naming the first bad gallery row by global id.

    A NaN or Inf anywhere in a row makes its scores non-finite, and one reduction over the
    (B, n) scores is far cheaper than checking the (n, E) rows — so the rows are only examined
    here, once something is known to be wrong.

    Args:
        rows: The (n, E) rows that were scored.
        offset: Global id of ``rows[0]``.

    Raises:
        QuARIInputError: always — naming the row, or the factors when no row is at fault.
    """
    bad = nonfinite_rows(rows)
    if bad.numel():
        raise QuARIInputError(f"gallery row {offset + int(bad[0])} contains NaN or Inf")
    raise QuARIInputError("non-finite scores: the adaptation's factors hold NaN or Inf")
