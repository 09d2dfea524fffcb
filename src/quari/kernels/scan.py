"""Exact top-k over a gallery on a device: fused kernel or torch, per chunk, same contract.

The gallery streams through in *segments* (at most ~1 GiB of fp32 scores, and at most
512 MiB of rows copied from host memory at a time). For each segment the chosen backend writes
the (B, n) fp32 scores — never the N×B×r projection — then :func:`select_topk` picks each
query's best k of the segment, merged into a running top-k across segments.

Backends, chosen per chunk by :func:`select_backend`:

* ``"triton"`` — the fused kernel (:mod:`quari.kernels.scan_triton`): fp16/bf16 rows, tensor
  cores in the gallery dtype, fp32 accumulation and epilogue.
* ``"torch"`` — fp16/bf16 rows: a GEMM in the gallery dtype with fp32 output (CUDA) against the
  projection rounded to that dtype, then the plan's epilogue block by block; other dtypes:
  fp32 rows against the fp32 projection, as on CPU.

Every entry point takes a :class:`~quari.scoring.ScoringPlan` or anything that has one (an
:class:`~quari.adaptation.Adaptation`); this package never imports the adaptation module.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch

from quari.errors import QuARIInputError
from quari.kernels.availability import interpreting, triton_available
from quari.scoring import (
    HALF_DTYPES,
    RunningTopK,
    ScoringPlan,
    TopK,
    as_plan,
    checked_chunks,
    raise_nonfinite,
)
from quari.validation import check_k

__all__ = ["scan_topk", "select_backend", "select_topk", "torch_scores"]
_SCORE_BYTES = 1 << 30  # fp32 scores of one segment
_HOST_COPY_BYTES = 512 << 20  # gallery rows copied to the device per segment
_TORCH_BLOCK_BYTES = 256 << 20  # the torch path's fp32 projections per block

# Configurations whose first launch failed (compile error, out of shared memory), keyed by the
# kernel's shape, so that later calls go straight to the fallback.
_failed: set[tuple] = set()


def select_backend(device: torch.device | str, dtype: torch.dtype, requested: str = "auto") -> str:
    """The backend that scores a chunk of ``dtype`` rows on ``device``.

    Args:
        device: Where the adaptation (and the scoring) lives.
        dtype: The chunk's dtype.
        requested: ``"auto"`` (the kernel for fp16/bf16 rows on CUDA when Triton is available
            and ``QUARI_DISABLE_TRITON`` is unset, else torch), ``"triton"`` or ``"torch"``.

    Returns:
        ``"triton"`` or ``"torch"``.

    Raises:
        QuARIInputError: an unknown ``requested``, or ``"triton"`` for rows that are not
            fp16/bf16.
        RuntimeError: ``"triton"`` where Triton is missing or disabled, or on a CPU device
            without ``TRITON_INTERPRET=1``.

    Example:
        >>> select_backend("cpu", torch.bfloat16)
        'torch'
    """
    device = torch.device(device)
    if requested not in ("auto", "triton", "torch"):
        raise QuARIInputError(f"backend must be 'auto', 'triton' or 'torch', got {requested!r}")
    half = dtype in HALF_DTYPES
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return "triton" if device.type == "cuda" and half and triton_available() else "torch"
    if not half:
        raise QuARIInputError(f"the fused kernel reads fp16/bf16 gallery rows, got {dtype}")
    if not triton_available():
        raise RuntimeError("the fused kernel needs Triton (pip install quari[gpu]), and "
                           "QUARI_DISABLE_TRITON must be unset")  # fmt: skip
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"the fused kernel runs on CUDA devices (or on CPU under TRITON_INTERPRET=1), "
            f"not on {device}"
        )
    return "triton"


def scan_topk(
    scorer: Any,
    chunks: Iterable[tuple[int, Any]] | torch.Tensor,
    k: int,
    *,
    backend: str = "auto",
    config: Any = None,
    block_rows: int | None = None,
    fallback: bool = True,
) -> TopK:
    """Exact top-k of every query over a gallery, scored on the adaptation's device.

    Args:
        scorer: The queries' :class:`~quari.scoring.ScoringPlan` (fp32), or their
            :class:`~quari.adaptation.Adaptation`.
        chunks: Iterable of ``(offset, array)`` pairs as for :meth:`Adaptation.scan`, or one
            (N, E) tensor (offset 0). Rows on the host are copied to the device per segment.
        k: Results per query; a gallery with fewer rows returns them all.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`select_backend`).
        config: A :class:`~quari.kernels.scan_triton.KernelConfig` for the kernel (default:
            chosen by batch size and rank).
        block_rows: Rows per GEMM block of the torch path (default: ~256 MiB of projections).
        fallback: If the kernel fails to build (compile error, too little shared memory),
            warn once and use the torch path; ``False`` raises instead (benchmarks, tests).

    Returns:
        :class:`~quari.scoring.TopK` with (B, min(k, N)) global row ids and scores, best
        first, on the plan's device.

    Raises:
        QuARIInputError: a bad chunk or k, or a gallery row holding NaN/Inf (named by its
            global row id).

    Example:
        >>> ad = Adaptation.random(2, 64, 8).to("cuda")  # doctest: +SKIP
        >>> top = scan_topk(ad, gallery_bf16_cuda, k=100)  # doctest: +SKIP
    """
    k = check_k(k)
    plan = as_plan(scorer)
    if isinstance(chunks, torch.Tensor):
        chunks = [(0, chunks)]
    device, B, E = plan.device, plan.batch, plan.dim
    best = RunningTopK(B, k, device)
    for offset, chunk in checked_chunks(chunks, E):
        half = chunk.dtype in HALF_DTYPES
        chosen = select_backend(device, chunk.dtype, backend)
        rows = max(1, _SCORE_BYTES // (4 * B))
        if chunk.device != device:
            rows = min(rows, max(1, _HOST_COPY_BYTES // (E * chunk.element_size())))
        for start in range(0, chunk.shape[0], rows):
            part = chunk[start : start + rows]
            part = part.to(device=device, dtype=part.dtype if half else torch.float32)
            scores = None
            if chosen == "triton":
                scores = _kernel_scores(plan, part, config, fallback)
            if scores is None:
                scores = torch_scores(plan, part, block_rows)
            finite = torch.isfinite(scores).all()  # checked after the top-k is queued
            values, indices = select_topk(scores, min(k, part.shape[0]))
            if not bool(finite):
                raise_nonfinite(part, offset + start)
            best.add(values, indices + (offset + start))
    return best.result()


def select_topk(
    scores: torch.Tensor, k: int, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row of ``scores`` through block maxima: ``torch.topk``'s result,
    faster for long rows.

    The row is cut into blocks of ``block`` scores. The k blocks with the largest maxima
    hold k distinct scores ≥ τ, the k-th largest block maximum, so the row's k-th best score
    is ≥ τ too, and every score in any other block (≤ its maximum ≤ τ) can at best tie with
    it. The top k of those k blocks (plus the ragged tail) is therefore an exact top k of the
    row, found by two selections over n / block and k · block scores instead of one over n.

    Args:
        scores: (B, n) scores.
        k: Results per row, 1 ≤ k ≤ n.
        block: Scores per block; ``None`` picks a power of two near √(n / k) on CUDA for
            B ≥ 8 rows of B·n ≥ 32M scores (H200: 0.06 against 0.15 ms/query at 10M × 8,
            0.03 against 0.11 at 10M × 32), and plain ``torch.topk`` otherwise (a single
            row's two selections cost more than one: 0.33 against 0.17 ms at 1M × 1).

    Returns:
        ``(values, indices)``, each (B, k), best first; ties may be broken differently
        from ``torch.topk``.

    Example:
        >>> values, ids = select_topk(torch.tensor([[0.1, 0.9, 0.3, 0.7]]), 2, block=2)
        >>> ids.tolist()
        [[1, 3]]
    """
    B, n = scores.shape
    if block is None:
        block = 1 << max(0, round(math.log2(max(1.0, n / k)) / 2))
        wide = B >= 8 and B * n >= 32 << 20 and scores.device.type == "cuda"
        block = block if block >= 8 and wide else 1
    full_blocks = n // block
    if block <= 1 or full_blocks <= k:
        return tuple(torch.topk(scores, k, dim=1))
    full = full_blocks * block
    maxima = scores[:, :full].reshape(B, full_blocks, block).amax(dim=2)
    chosen = torch.topk(maxima, k, dim=1).indices
    ids = (chosen[:, :, None] * block + torch.arange(block, device=scores.device)).flatten(1)
    if full < n:  # the ragged tail joins the candidates
        tail = torch.arange(full, n, device=scores.device).expand(B, -1)
        ids = torch.cat([ids, tail], dim=1)
    top = torch.topk(torch.gather(scores, 1, ids), k, dim=1)
    return top.values, torch.gather(ids, 1, top.indices)


def _kernel_scores(
    plan: ScoringPlan, part: torch.Tensor, config: Any, fallback: bool
) -> torch.Tensor | None:
    """(B, n) scores by the fused kernel; None where the torch path must do it instead (a rank
    the kernel does not cover, or — with ``fallback`` — kernels that fail to build)."""
    from quari.kernels import scan_triton

    if scan_triton.max_group(plan.rank, plan.reference) == 0:
        return None  # r > 256 (reference: r > 128): more columns than one tile holds
    cfg = scan_triton.resolve_config(config, plan)  # a bad explicit config raises
    # If a configuration fails to build (compile error, too little shared memory), try the
    # pointer-load version of it, then the torch path; each failure is remembered and told once.
    tries = [cfg] + ([replace(cfg, tma=False)] if cfg.tma and fallback else [])
    for attempt in tries:
        key = (attempt, plan.reference, plan.rank, part.dtype, str(part.device))
        if fallback and key in _failed:
            continue
        try:
            return scan_triton.fused_scores(part, plan, config=attempt)
        except Exception as exc:
            if not fallback:
                raise
            _failed.add(key)
            warnings.warn(
                f"quari: the fused scan kernel {attempt.describe()} failed to build "
                f"({type(exc).__name__}: {exc}); trying the next option",
                RuntimeWarning,
                stacklevel=4,
            )
    return None  # the torch path


def torch_scores(
    plan: ScoringPlan, part: torch.Tensor, block_rows: int | None = None
) -> torch.Tensor:
    """(B, n) scores of a device segment by GEMM blocks + the plan's epilogue — the torch
    backend, and the reference the kernel is checked against.

    Args:
        plan: The queries' plan.
        part: (n, E) rows on the plan's device; fp16/bf16 rows meet the projection rounded to
            their dtype, as in the kernel.
        block_rows: Rows per GEMM block (default: ~256 MiB of fp32 projections; the N×B×k
            intermediate never exceeds one block).
    """
    B, flat, s2 = plan.batch, plan.projection.flat, None
    half = part.dtype in HALF_DTYPES
    if half:
        # fp16/bf16 rows meet the projection rounded to their dtype, as in the kernel: the
        # tensor cores' input. Where the half GEMM with fp32 output is missing (CPU), the same
        # products are formed in fp32 (exact for half inputs).
        cols, s2 = plan.half_projection(part.dtype)
        flat = plan.derived(("flat", part.dtype), lambda: cols.permute(1, 0, 2).reshape(flat.shape))
    half_gemm = half and _mm_fp32_out(part.device)
    if half and not half_gemm:
        flat = flat.float()
    if block_rows is None:
        block_rows = max(256, _TORCH_BLOCK_BYTES // (4 * flat.shape[1]))
    scores = torch.empty(B, part.shape[0], dtype=torch.float32, device=part.device)
    for s in range(0, part.shape[0], block_rows):
        block = part[s : s + block_rows]
        if half_gemm:
            z = torch.mm(block, flat, out_dtype=torch.float32)
        else:
            block = block.float()
            z = block @ flat
        norm2 = None
        if plan.reference:
            norm2 = torch.linalg.vector_norm(block, dim=-1, dtype=torch.float32).square_()[:, None]
            if s2 is not None:
                norm2 = norm2 * s2
        z = z.view(block.shape[0], B, -1)
        scores[:, s : s + block.shape[0]] = plan.epilogue(z, norm2).T
    return scores


_MM_FP32_OUT: dict[str, bool] = {}


def _mm_fp32_out(device: torch.device) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` takes fp16/bf16 inputs here
    (CUDA in torch ≥ 2.8); elsewhere the rows are upcast to fp32 instead."""
    if device.type not in _MM_FP32_OUT:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            _MM_FP32_OUT[device.type] = torch.mm(a, a, out_dtype=torch.float32).dtype == (
                torch.float32
            )
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_FP32_OUT[device.type] = False
    return _MM_FP32_OUT[device.type]
