"""The fused adaptive-scan kernel (Triton): projection, epilogue and scores in one pass.

One program scores a tile of ``BLOCK_M`` gallery rows for a group of ``G`` queries. It streams
the rows' E coordinates through the tensor cores against the group's QR-form projection
columns (:class:`quari.scoring.ScoringPlan`), keeps the (BLOCK_M, G·width) projections in registers,
and reduces them in the epilogue to one cosine score per (row, query):

* paper variant:     z′ = R Vᵀ d (r columns),  score = bᵀz′ / ‖z′‖
* reference variant: [m | y] = [(cQ + VRᵀ)ᵀd | Qᵀd] (2r columns) and wᵀd (1 column),
  score = wᵀd / sqrt(‖m‖² + c²·max(‖d‖² − ‖y‖², 0)), ‖d‖² summed from the tile in registers.

Only the (B, N) fp32 scores reach device memory (4 bytes per row and query against the 2·E
bytes per row read); the N×B×r projection never does. The caller selects the top k from the
scores (``quari.kernels.scan``).

Precision: the gallery's own dtype (fp16/bf16) feeds the tensor cores and the projection
columns are rounded to it; accumulation and the epilogue are fp32. Against the exact fp64
score this costs about 1e-3 absolute with bf16 columns (8-bit mantissa) and about 1e-4 with
fp16 — far below the spread of scores that ranking depends on, and the reason the FLOP floor
is the bf16 tensor-core rate.

Tiles arrive by TMA (host tensor descriptors; out-of-range rows read as zeros) or, where TMA
cannot be used (rows not 16-byte aligned, or a failed build), by pointer loads with the ragged
tail's row indices clamped. The grid is one program per (row tile, query group), groups
fastest so that the programs sharing a gallery tile run together and read it from L2; an
optional persistent grid loops over the same order.

Layout of the packed projection (:func:`pack_projection`), built once per plan from
:meth:`~quari.scoring.ScoringPlan.half_projection` (per-query power-of-two scaled columns in the
gallery dtype): queries are padded up to a multiple of G; query q owns the ``width``
contiguous columns ``q·width …`` of ``main`` (E, Bp·width), and for the reference variant the
same columns of ``aux``. ``weights``: paper — (Bp, width) fp32 holding b; reference — (Bp,)
fp32 holding each query's s². Reference numerator: ``numer`` (E, n_groups·16) holds w, query g
of group j at column ``j·16 + g·(16 // G)`` and zeros elsewhere, so that a (G, 16 // G)
reshape sums exactly one live column per query.

Under ``TRITON_INTERPRET=1`` (CPU tests) bf16 operands are widened to fp32 before ``tl.dot``:
the interpreter computes bf16 dots wrongly (numpy has no bf16), and products of bf16 values
are exact in fp32, so the widened dot computes the same function.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from quari.kernels.availability import interpreting
from quari.scoring import HALF_DTYPES, ScoringPlan, as_plan

__all__ = [
    "KernelConfig",
    "PackedProjection",
    "default_config",
    "fused_scores",
    "pack_projection",
    "resolve_config",
]

# Column budget of one program's accumulators: 256 fp32 columns × 128 rows is 128 registers a
# thread at 8 warps, the largest tile that stays clear of spills.
_MAX_COLUMNS = 256
_NUMER_WIDTH = 16  # the reference numerator columns of one group (tl.dot needs N ≥ 16)
#: The compiled kernel of each launch shape, for diagnostics (registers, spills, shared memory).
COMPILED: dict[tuple, object] = {}


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch options of the fused scan kernel.

    Args:
        block_m: Gallery rows per program (≥ 16, a power of two).
        block_k: Embedding coordinates per pipelined step (≥ 16, a power of two).
        group: Queries per program (a power of two); 0 picks the most that fit 256 columns.
        num_warps: Warps per program.
        num_stages: Software-pipelining depth of the row/projection loads.
        persistent: One program per multiprocessor slot looping over tiles (the loop nest is
            flattened so the next tile's loads overlap this tile's epilogue).
        programs_per_sm: Resident programs per multiprocessor in the persistent grid.
        tma: Load tiles with the tensor-memory accelerator (Hopper and later; host tensor
            descriptors) instead of per-thread pointer loads. Needs 16-byte aligned rows
            (E·2 bytes a multiple of 16); other shapes use pointer loads.

    Example:
        >>> KernelConfig(block_m=256, num_warps=8).block_m
        256
    """

    block_m: int = 128
    block_k: int = 64
    group: int = 0
    num_warps: int = 8
    num_stages: int = 3
    persistent: bool = False
    programs_per_sm: int = 1
    tma: bool = False

    def describe(self) -> str:
        """A short label, e.g. ``m128k64g4w8s3``."""
        tag = f"m{self.block_m}k{self.block_k}g{self.group}w{self.num_warps}s{self.num_stages}"
        tag += f"p{self.programs_per_sm}" if self.persistent else ""
        return tag + ("-tma" if self.tma else "")


class PackedProjection(NamedTuple):
    """The projection of one scoring plan in the kernel's layout (see the module docstring)."""

    main: torch.Tensor
    aux: torch.Tensor | None
    numer: torch.Tensor | None
    weights: torch.Tensor
    queries: int
    group: int
    width: int
    reference: bool


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def column_width(rank: int) -> int:
    """Columns each query's projection block occupies: r rounded up to a power of two ≥ 16."""
    return max(16, _next_pow2(rank))


def max_group(rank: int, reference: bool) -> int:
    """The most queries one program can hold in its 256 accumulator columns (0: none fit)."""
    per_query = column_width(rank) * (2 if reference else 1)
    return _MAX_COLUMNS // per_query if per_query <= _MAX_COLUMNS else 0


def default_config(queries: int, rank: int, reference: bool, dim: int) -> KernelConfig:
    """The launch configuration used when none is given.

    B = 1 is bandwidth-bound: a narrow tile (one query, 4 warps) with a deep pipeline and two
    programs per multiprocessor keeps loads in flight. At B ≥ 2 the gallery tile is shared by
    up to 256 projection columns (the 128×256 tensor-core tile), 8 warps, 3 stages, on a
    persistent grid for the paper variant. Tiles come
    by TMA (fewer registers: 90 at B = 1, 160 at B ≥ 4, against 156 and 178 with pointer
    loads, by the sm_90 build); where TMA cannot be used the pointer kernel takes over.
    """
    block_k = min(64, max(16, _next_pow2(dim)))
    group = min(max_group(rank, reference), _next_pow2(queries))
    if group <= 1 and not reference:
        return KernelConfig(block_m=128, block_k=block_k, group=1, num_warps=4, num_stages=4,
                            tma=True)  # fmt: skip
    # Paper variant: persistent (one resident program per SM looping over tiles, so the next
    # tile's loads overlap this tile's epilogue): 1.18-1.24x of the FLOP floor against
    # 1.24-1.36x per-tile in the H200 sweep at N = 10M, B = 8-128. The reference variant's
    # three dots per tile ran 15-30 % slower persistent there, so it keeps one program per tile.
    return KernelConfig(block_m=128, block_k=block_k, group=max(group, 1), num_warps=8,
                        tma=True, persistent=not reference, programs_per_sm=1)  # fmt: skip


def pack_projection(scorer: Any, dtype: torch.dtype, group: int) -> PackedProjection:
    """Rearranges a plan's projection into the kernel's layout, columns in ``dtype``.

    Args:
        scorer: The :class:`~quari.scoring.ScoringPlan` (or an Adaptation) to scan with.
        dtype: The gallery dtype (fp16 or bf16); the columns are rounded to it.
        group: Queries per program (a power of two).

    Returns:
        The :class:`PackedProjection` on the plan's device (cached per dtype and group).
    """
    plan = as_plan(scorer)
    return plan.derived(("packed", dtype, group), lambda: _pack(plan, dtype, group))


def _pack(plan: ScoringPlan, dtype: torch.dtype, group: int) -> PackedProjection:
    cols, s2 = plan.half_projection(dtype)
    B, E, _ = cols.shape
    r, width = plan.rank, column_width(plan.rank)
    reference = plan.reference
    n_groups = -(-B // group)
    padded = n_groups * group

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (B, E, r) → (E, padded·width)
        out = x.new_zeros(padded, E, width)
        out[:B, :, : x.shape[2]] = x
        return out.permute(1, 0, 2).reshape(E, padded * width).contiguous()

    if reference:
        main, aux = blocks(cols[:, :, 1 : r + 1]), blocks(cols[:, :, r + 1 :])
        q = torch.arange(B, device=cols.device)
        slot = (q // group) * _NUMER_WIDTH + (q % group) * (_NUMER_WIDTH // group)
        numer = cols.new_zeros(E, n_groups * _NUMER_WIDTH)
        numer[:, slot] = cols[:, :, 0].T
        weights = s2.new_zeros(padded)  # s² per query: ‖d‖² in the scaled columns' units
        weights[:B] = s2
    else:
        main, aux, numer = blocks(cols), None, None
        weights = s2.new_zeros(padded, width)
        weights[:B, :r] = plan.projection.num_weights
    return PackedProjection(main, aux, numer, weights.contiguous(), B, group, width, reference)


@triton.jit
def _group_sum(x, BLOCK_M: tl.constexpr, G: tl.constexpr, W: tl.constexpr):
    """(BLOCK_M, G·W) → (BLOCK_M, G): the sum of each query's W columns."""
    if G == 1:
        return tl.sum(x, axis=1)[:, None]
    return tl.sum(tl.reshape(x, (BLOCK_M, G, W)), axis=2)


@triton.jit
def _score_tile(
    tile,
    gallery_ptr,
    stride_g,
    main_ptr,
    aux_ptr,
    numer_ptr,
    weights_ptr,
    scores_ptr,
    stride_s,
    n_rows,
    n_queries,
    n_groups,
    c2,
    DIM: tl.constexpr,
    REFERENCE: tl.constexpr,
    G: tl.constexpr,
    W: tl.constexpr,
    NW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    COLS: tl.constexpr = G * W
    # Groups vary fastest: the programs that share a gallery tile run side by side, so the
    # tile comes from device memory once and from L2 for the other groups.
    row_tile = tile // n_groups
    grp = tile % n_groups
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    # Clamped rows instead of load masks: a ragged tail re-reads the last row (results masked
    # at the store) and the steady-state loads stay unpredicated.
    row_off = tl.minimum(rows, n_rows - 1).to(tl.int64) * stride_g
    cols = grp * COLS + tl.arange(0, COLS)
    ld_main = n_groups * COLS
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, COLS), dtype=tl.float32)
    if REFERENCE:
        acc_aux = tl.zeros((BLOCK_M, COLS), dtype=tl.float32)
        acc_num = tl.zeros((BLOCK_M, NW), dtype=tl.float32)
        ncols = grp * NW + tl.arange(0, NW)
        norm2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # Pointers advance by BLOCK_K each step: one 64-bit add per element, not a recomputation.
    d_ptrs = gallery_ptr + row_off[:, None] + ks[None, :]
    p_ptrs = main_ptr + ks[:, None] * ld_main + cols[None, :]
    if REFERENCE:
        a_ptrs = aux_ptr + ks[:, None] * ld_main + cols[None, :]
        n_ptrs = numer_ptr + ks[:, None] * (n_groups * NW) + ncols[None, :]
    for k0 in range(0, DIM, BLOCK_K):
        if EVEN_K:
            d = tl.load(d_ptrs)
            p = tl.load(p_ptrs)
        else:
            d = tl.load(d_ptrs, mask=(k0 + ks)[None, :] < DIM, other=0.0)
            p = tl.load(p_ptrs, mask=(k0 + ks)[:, None] < DIM, other=0.0)
        if UPCAST:
            d = d.to(tl.float32)
            p = p.to(tl.float32)
        acc = tl.dot(d, p, acc)
        if REFERENCE:
            if EVEN_K:
                a = tl.load(a_ptrs)
                nw = tl.load(n_ptrs)
            else:
                a = tl.load(a_ptrs, mask=(k0 + ks)[:, None] < DIM, other=0.0)
                nw = tl.load(n_ptrs, mask=(k0 + ks)[:, None] < DIM, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                nw = nw.to(tl.float32)
            acc_aux = tl.dot(d, a, acc_aux)
            acc_num = tl.dot(d, nw, acc_num)
            df = d.to(tl.float32)
            norm2 += tl.sum(df * df, axis=1)
            a_ptrs += BLOCK_K * ld_main
            n_ptrs += BLOCK_K * (n_groups * NW)
        d_ptrs += BLOCK_K
        p_ptrs += BLOCK_K * ld_main

    if REFERENCE:
        _finish_tile(
            acc, acc_aux, acc_num, norm2, row_tile, grp, weights_ptr, scores_ptr, stride_s,
            n_rows, n_queries, c2, REFERENCE, G, W, NW, BLOCK_M,
        )  # fmt: skip
    else:  # the paper variant has no aux/numerator accumulators or ‖d‖²: placeholders
        _finish_tile(
            acc, acc, acc, 0.0, row_tile, grp, weights_ptr, scores_ptr, stride_s,
            n_rows, n_queries, c2, REFERENCE, G, W, NW, BLOCK_M,
        )  # fmt: skip


@triton.jit
def _finish_tile(
    acc,
    acc_aux,
    acc_num,
    norm2,
    row_tile,
    grp,
    weights_ptr,
    scores_ptr,
    stride_s,
    n_rows,
    n_queries,
    c2,
    REFERENCE: tl.constexpr,
    G: tl.constexpr,
    W: tl.constexpr,
    NW: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The epilogue: projections (in registers) → one score per (row, query) → memory."""
    if REFERENCE:
        num = _group_sum(acc_num, BLOCK_M, G, NW // G)
        den2 = _group_sum(acc * acc, BLOCK_M, G, W)
        # Columns are scaled by s per query (see half_projection), so ‖d‖² enters as s²‖d‖².
        s2 = tl.load(weights_ptr + grp * G + tl.arange(0, G))
        outside = s2[None, :] * norm2[:, None] - _group_sum(acc_aux * acc_aux, BLOCK_M, G, W)
        # ‖d‖² − ‖Qᵀd‖² ≥ 0 is the part of d outside span(Q); clamp the rounding.
        den2 += c2 * tl.maximum(outside, 0.0)
    else:
        cols = grp * (G * W) + tl.arange(0, G * W)
        b = tl.load(weights_ptr + cols)  # (G·W,) fp32 numerator weights, zero on padding
        num = _group_sum(acc * b[None, :], BLOCK_M, G, W)
        den2 = _group_sum(acc * acc, BLOCK_M, G, W)
    score = num / tl.maximum(tl.sqrt(den2), 1e-12)  # quari.scoring.EPS: 0 for d = 0
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    q = grp * G + tl.arange(0, G)
    s_ptrs = scores_ptr + q[None, :].to(tl.int64) * stride_s + rows[:, None]
    tl.store(s_ptrs, score, mask=(rows[:, None] < n_rows) & (q[None, :] < n_queries))


@triton.jit
def _score_tile_tma(
    tile,
    g_desc,
    m_desc,
    a_desc,
    n_desc,
    weights_ptr,
    scores_ptr,
    stride_s,
    n_rows,
    n_queries,
    n_groups,
    c2,
    DIM: tl.constexpr,
    REFERENCE: tl.constexpr,
    G: tl.constexpr,
    W: tl.constexpr,
    NW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """As :func:`_score_tile`, the tiles arriving by the tensor-memory accelerator (TMA):
    no per-element address arithmetic, and out-of-range rows and coordinates read as zeros."""
    COLS: tl.constexpr = G * W
    row_tile = tile // n_groups
    grp = tile % n_groups
    row0 = row_tile * BLOCK_M
    acc = tl.zeros((BLOCK_M, COLS), dtype=tl.float32)
    if REFERENCE:
        acc_aux = tl.zeros((BLOCK_M, COLS), dtype=tl.float32)
        acc_num = tl.zeros((BLOCK_M, NW), dtype=tl.float32)
        norm2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, DIM, BLOCK_K):
        d = g_desc.load([row0, k0])
        p = m_desc.load([k0, grp * COLS])
        if UPCAST:
            d = d.to(tl.float32)
            p = p.to(tl.float32)
        acc = tl.dot(d, p, acc)
        if REFERENCE:
            a = a_desc.load([k0, grp * COLS])
            nw = n_desc.load([k0, grp * NW])
            if UPCAST:
                a = a.to(tl.float32)
                nw = nw.to(tl.float32)
            acc_aux = tl.dot(d, a, acc_aux)
            acc_num = tl.dot(d, nw, acc_num)
            df = d.to(tl.float32)
            norm2 += tl.sum(df * df, axis=1)
    if REFERENCE:
        _finish_tile(
            acc, acc_aux, acc_num, norm2, row_tile, grp, weights_ptr, scores_ptr, stride_s,
            n_rows, n_queries, c2, REFERENCE, G, W, NW, BLOCK_M,
        )  # fmt: skip
    else:  # the paper variant has no aux/numerator accumulators or ‖d‖²: placeholders
        _finish_tile(
            acc, acc, acc, 0.0, row_tile, grp, weights_ptr, scores_ptr, stride_s,
            n_rows, n_queries, c2, REFERENCE, G, W, NW, BLOCK_M,
        )  # fmt: skip


@triton.jit
def _fused_scan_kernel(
    gallery_ptr,
    stride_g,
    main_ptr,
    aux_ptr,
    numer_ptr,
    weights_ptr,
    scores_ptr,
    stride_s,
    n_rows,
    n_queries,
    n_groups,
    n_tiles,
    c2,
    DIM: tl.constexpr,
    REFERENCE: tl.constexpr,
    G: tl.constexpr,
    W: tl.constexpr,
    NW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    pid = tl.program_id(0)
    if PERSISTENT:
        for tile in tl.range(pid, n_tiles, tl.num_programs(0), flatten=True):
            _score_tile(
                tile, gallery_ptr, stride_g, main_ptr, aux_ptr, numer_ptr, weights_ptr, scores_ptr,
                stride_s, n_rows, n_queries, n_groups, c2,
                DIM, REFERENCE, G, W, NW, BLOCK_M, BLOCK_K, EVEN_K, UPCAST,
            )  # fmt: skip
    else:
        _score_tile(
            pid, gallery_ptr, stride_g, main_ptr, aux_ptr, numer_ptr, weights_ptr, scores_ptr,
            stride_s, n_rows, n_queries, n_groups, c2,
            DIM, REFERENCE, G, W, NW, BLOCK_M, BLOCK_K, EVEN_K, UPCAST,
        )  # fmt: skip


@triton.jit
def _fused_scan_kernel_tma(
    g_desc,
    m_desc,
    a_desc,
    n_desc,
    weights_ptr,
    scores_ptr,
    stride_s,
    n_rows,
    n_queries,
    n_groups,
    n_tiles,
    c2,
    DIM: tl.constexpr,
    REFERENCE: tl.constexpr,
    G: tl.constexpr,
    W: tl.constexpr,
    NW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    pid = tl.program_id(0)
    if PERSISTENT:
        for tile in tl.range(pid, n_tiles, tl.num_programs(0), flatten=True):
            _score_tile_tma(
                tile, g_desc, m_desc, a_desc, n_desc, weights_ptr, scores_ptr, stride_s, n_rows,
                n_queries, n_groups, c2, DIM, REFERENCE, G, W, NW, BLOCK_M, BLOCK_K, UPCAST,
            )  # fmt: skip
    else:
        _score_tile_tma(
            pid, g_desc, m_desc, a_desc, n_desc, weights_ptr, scores_ptr, stride_s, n_rows,
            n_queries, n_groups, c2, DIM, REFERENCE, G, W, NW, BLOCK_M, BLOCK_K, UPCAST,
        )  # fmt: skip


def resolve_config(config: KernelConfig | None, scorer: Any) -> KernelConfig:
    """``config`` (default: :func:`default_config`) with its query group fixed and checked.

    Args:
        config: A configuration, or None for the default.
        scorer: What will be scanned: a :class:`~quari.scoring.ScoringPlan`, or anything with
            ``batch``, ``rank``, ``reference`` and ``dim`` (or a ``plan``).
    """
    plan = scorer if hasattr(scorer, "reference") else as_plan(scorer)
    reference, rank, dim = plan.reference, plan.rank, plan.dim
    if config is None:
        config = default_config(plan.batch, rank, reference, dim)
    most = max_group(rank, reference)
    if most == 0:
        raise ValueError(f"rank {rank} is too large for the fused kernel (≤ 256)")
    group = config.group or min(most, _next_pow2(plan.batch))
    if group & (group - 1) or group > min(most, _NUMER_WIDTH):
        raise ValueError(f"group must be a power of two ≤ {min(most, _NUMER_WIDTH)}, got {group}")
    for name in ("block_m", "block_k"):
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two ≥ 16, got {value}")
    tma = config.tma and (dim * 2) % 16 == 0
    return replace(config, group=group, tma=tma)


def fused_scores(
    gallery: torch.Tensor,
    scorer: Any,
    *,
    out: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Scores of every gallery row for every query of a plan, by the fused kernel.

    Args:
        gallery: (N, E) fp16 or bf16 rows on the plan's device (CPU only under
            ``TRITON_INTERPRET=1``); the last axis must be contiguous.
        scorer: The :class:`~quari.scoring.ScoringPlan` (fp32), or an Adaptation.
        out: Optional (B, N) fp32 tensor (last axis contiguous) to write into.
        config: Tile shape and launch options (default: :func:`default_config`).

    Returns:
        (B, N) fp32 scores; NaN where a row holds NaN or Inf.

    Example:
        >>> scores = fused_scores(gallery_bf16, adaptation.plan)  # doctest: +SKIP
    """
    if gallery.dtype not in HALF_DTYPES or gallery.ndim != 2:
        raise ValueError(f"the fused kernel reads (N, E) fp16/bf16 rows, got {gallery.dtype}")
    if gallery.stride(1) != 1:
        gallery = gallery.contiguous()
    plan = as_plan(scorer)
    config = resolve_config(config, plan)
    packed = pack_projection(plan, gallery.dtype, config.group)
    N, E = gallery.shape
    B = packed.queries
    if out is None:
        out = torch.empty(B, N, dtype=torch.float32, device=gallery.device)
    elif out.shape != (B, N) or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"out must be a ({B}, {N}) fp32 tensor with contiguous rows")
    if N == 0:
        return out
    n_groups = packed.main.shape[1] // (config.group * packed.width)
    n_tiles = triton.cdiv(N, config.block_m) * n_groups
    grid = n_tiles
    if config.persistent:
        if gallery.device.type == "cuda":
            sms = torch.cuda.get_device_properties(gallery.device).multi_processor_count
        else:
            sms = 4
        grid = min(n_tiles, sms * config.programs_per_sm)
    if config.tma and (gallery.data_ptr() % 16 or (gallery.stride(0) * 2) % 16):
        config = replace(config, tma=False)  # TMA needs 16-byte aligned rows
    c2 = plan.identity_weight**2
    upcast = interpreting() and gallery.dtype == torch.bfloat16
    shape = dict(
        DIM=E, REFERENCE=packed.reference, G=config.group, W=packed.width, NW=_NUMER_WIDTH,
        BLOCK_M=config.block_m, BLOCK_K=config.block_k, UPCAST=upcast,
        PERSISTENT=config.persistent, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    aux = packed.aux if packed.aux is not None else packed.main
    numer = packed.numer if packed.numer is not None else packed.main
    if config.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        cols = config.group * packed.width
        compiled = _fused_scan_kernel_tma[(grid,)](
            TensorDescriptor.from_tensor(gallery, [config.block_m, config.block_k]),
            TensorDescriptor.from_tensor(packed.main, [config.block_k, cols]),
            TensorDescriptor.from_tensor(aux, [config.block_k, cols]),
            TensorDescriptor.from_tensor(numer, [config.block_k, _NUMER_WIDTH]),
            packed.weights, out, out.stride(0), N, B, n_groups, n_tiles, c2, **shape,
        )  # fmt: skip
    else:
        compiled = _fused_scan_kernel[(grid,)](
            gallery, gallery.stride(0), packed.main, aux, numer, packed.weights, out,
            out.stride(0), N, B, n_groups, n_tiles, c2, EVEN_K=E % config.block_k == 0, **shape,
        )  # fmt: skip
    if compiled is not None:  # None under the interpreter
        COMPILED[(config, packed.reference, gallery.dtype, E)] = compiled
    return out
