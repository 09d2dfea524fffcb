"""CUDA graphs: the hypernetwork's forward pass at small batches (:class:`GraphedForward`) and
the exact scan of a gallery resident on the GPU (:class:`GraphedScan`).

At batch 1 the forward pass is a chain of a few hundred small kernels whose launch cost, not
their arithmetic, sets the latency (H200: 6.3 ms eager, 2.6 ms as one fp32 graph; see
docs/results.md). A graph per batch size, captured once with static input and output buffers,
replays the whole chain with one launch. A batch is padded up to the smallest captured size
that holds it (the padding rows repeat a real query, so they compute finite values) and the
outputs are cloned out of the static buffers before the next replay can overwrite them.

The graph also normalises the queries and checks them for NaN/Inf, so that nothing before the
replay waits for the device: at batch 1 the host-side checks of the eager path (a
synchronising NaN test, a normalisation, three output copies) cost a fifth of the latency.

Use it through :meth:`quari.QuARIModel.enable_cuda_graphs`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from quari.errors import QuARIInputError
from quari.scoring import ScoringPlan, TopK, as_plan, raise_nonfinite
from quari.validation import as_embeddings, unit_rows

__all__ = ["PRECISIONS", "GraphedForward", "GraphedScan"]

PRECISIONS = ("fp32", "tf32", "bf16")


class GraphedForward:
    """One captured forward pass per batch size, replayed by :meth:`__call__`.

    Args:
        model: The :class:`~quari.hypernet.QuARIModel`, on a CUDA device; captured in eval
            mode (dropout off) whatever mode it is in now.
        batch_sizes: Batch sizes to capture.
        warmup: Eager passes on a side stream before each capture (cuBLAS and allocator
            initialisation must not happen inside the capture).
        compile: Capture ``torch.compile``'s fused version of the forward pass instead of the
            eager one: fewer, larger kernels per replay, at the cost of a compilation per
            batch size (tens of seconds each) when enabling.
        precision: Arithmetic of the captured pass: ``"fp32"`` (as eager), ``"tf32"``
            (fp32 matrix products on tensor cores, ~1e-3 relative error) or ``"bf16"`` (a
            bf16 copy of the weights, taken now, runs the pass — unlike autocast it keeps
            PyTorch's fused transformer inference kernels; ~1e-2 relative error in q′, U,
            V; enable again after changing the weights). Outputs are fp32 in every case.

    Raises:
        RuntimeError: the model is not on CUDA.
        QuARIInputError: a batch size that is not a positive integer.
    """

    def __init__(
        self,
        model,
        batch_sizes: Iterable[int],
        warmup: int = 2,
        compile: bool = False,
        precision: str = "fp32",
    ) -> None:
        if precision not in PRECISIONS:
            raise QuARIInputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        sizes = sorted(set(_check_size(b) for b in batch_sizes), reverse=True)
        if not sizes:
            raise QuARIInputError("batch_sizes: give at least one batch size to capture")
        param = next(model.parameters())
        if param.device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(
                "CUDA graphs need the model on a CUDA device (model.to('cuda')); it is on "
                f"{param.device}"
            )
        self.device, self.dtype = param.device, param.dtype
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple]] = {}
        was_training = model.training
        model.eval()
        try:
            # Normal (not inference-mode) buffers, so that replays may write them in any mode.
            with torch.inference_mode(False), torch.no_grad():
                self._capture(model, sizes, warmup, compile)
        finally:
            model.train(was_training)
        self.batch_sizes = tuple(sorted(self._graphs))

    def _capture(self, model, sizes: list[int], warmup: int, compile: bool) -> None:
        runner = model
        if self.precision == "bf16":
            runner = copy.deepcopy(model).to(torch.bfloat16)
        # Holds the bf16 copy (its weights are what the replays read); no self-reference.
        self._runner = runner if runner is not model else None
        base = runner.predict_factors
        if compile:
            # Static shapes: one specialised compilation per captured batch size.
            base = torch.compile(runner.predict_factors, dynamic=False)
        dtype = next(runner.parameters()).dtype

        def predict(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # One flag for every check the eager path makes (finite, not all zero), read after
            # the replay; the normalisation is scaled first, as eager's (unit_rows).
            finite = torch.isfinite(q).all() & q.any(dim=-1).all()
            out = base(unit_rows(q).to(dtype))
            # One flat fp32 buffer [q′ | U | V] per row: a single copy takes it out.
            return torch.cat([t.flatten(1) for t in out], dim=1).float(), finite

        tf32 = torch.backends.cuda.matmul.allow_tf32
        # The kernels recorded at capture time are what every replay runs, so the switch
        # only needs to hold while capturing.
        torch.backends.cuda.matmul.allow_tf32 = self.precision == "tf32" or tf32
        try:
            self._record(model, sizes, warmup, predict)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32

    def _record(self, model, sizes: list[int], warmup: int, predict) -> None:
        # Largest first, sharing one memory pool: every output is cloned right after its
        # replay, so graphs that reuse each other's intermediate memory cannot clash.
        pool = torch.cuda.graph_pool_handle()
        gen = torch.Generator(device=self.device).manual_seed(0)
        self._shape = (model.embedding_dim, model.config.rank)
        for size in sizes:
            static_in = torch.randn(
                size, model.embedding_dim, device=self.device, dtype=self.dtype, generator=gen
            )
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    predict(static_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                static_out = predict(static_in)
            self._graphs[size] = (graph, static_in, static_out)

    def accepts(self, model, q: torch.Tensor) -> bool:
        """Whether ``q`` (checked queries) can be served by a captured graph."""
        if model.training or q.device != self.device or q.dtype != self.dtype:
            return False
        if q.shape[0] > self.batch_sizes[-1]:
            return False
        # Autograd needs the eager pass: replayed outputs carry no history.
        return not torch.is_grad_enabled() or not (
            q.requires_grad or any(p.requires_grad for p in model.parameters())
        )

    def __call__(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q′, U, V) for queries ``q`` (B ≤ the largest captured size) that passed the
        shape checks; the graph normalises them.

        Raises:
            QuARIInputError: a query holds NaN or Inf (found after the replay).
        """
        B = q.shape[0]
        size = next(s for s in self.batch_sizes if s >= B)
        graph, static_in, (static_out, finite) = self._graphs[size]
        with torch.no_grad():
            static_in[:B].copy_(q)
            if size > B:
                static_in[B:].copy_(q[:1].expand(size - B, -1))
            graph.replay()
            flat = static_out[:B].clone()
        if not bool(finite):  # the one synchronisation, after the work is queued
            as_embeddings(q, q.shape[-1], "queries", normalize=True)  # raises, naming the row
        E, r = self._shape
        return flat[:, :E], flat[:, E : E + E * r].view(B, E, r), flat[:, E + E * r :].view(B, E, r)


def _check_size(b) -> int:
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise QuARIInputError(f"batch_sizes: expected positive integers, got {b!r}")
    return b


class GraphedScan:
    """Exact top-k scans of one gallery resident on the GPU, replayed as CUDA graphs.

    :func:`~quari.kernels.scan_topk` pays ~0.15 ms of host work per call (argument checks,
    kernel launches, a synchronisation per segment) — a third of the whole scan of 1M rows at
    batch 1 on an H200. This captures the fused kernel, the finiteness check and the top-k
    selection once per batch size; a call copies the queries' packed projection into the
    graph's input buffers and replays it. For repeated low-latency queries against a fixed
    gallery; :meth:`quari.Adaptation.scan` stays the general path.

    Args:
        gallery: (N, E) fp16/bf16 rows on a CUDA device (kept by reference: do not change
            them in place).
        k: Results per query (at most N).
        rank: r of the adaptations to be scanned.
        variant: ``"paper"`` or ``"reference"`` (the layout of the projection columns; the
            reference variant's α is part of the columns, so any α replays the same graph).
        batch_sizes: Query batch sizes to capture; a call must use one of them.
        config: Kernel configuration (default: chosen per batch size).

    Raises:
        RuntimeError: the gallery is not on CUDA, or Triton is missing.
        QuARIInputError: a bad k, gallery dtype or batch size.

    Example:
        >>> scan = GraphedScan(gallery_bf16_cuda, k=1000, rank=64)  # doctest: +SKIP
        >>> top = scan(model(query))  # doctest: +SKIP
    """

    def __init__(
        self,
        gallery: torch.Tensor,
        k: int,
        *,
        rank: int,
        variant: str = "paper",
        batch_sizes: Iterable[int] = (1,),
        config=None,
    ) -> None:
        from quari.kernels.availability import triton_available
        from quari.kernels.scan import select_topk
        from quari.kernels.scan_triton import fused_scores, pack_projection, resolve_config
        from quari.validation import check_k

        if gallery.device.type != "cuda" or not triton_available():
            raise RuntimeError(
                f"GraphedScan needs the gallery on a CUDA device and Triton; it is on "
                f"{gallery.device}, Triton {'available' if triton_available() else 'missing'}"
            )
        if gallery.ndim != 2 or gallery.dtype not in (torch.float16, torch.bfloat16):
            raise QuARIInputError(
                f"gallery: expected (N, E) fp16/bf16 rows, got {gallery.dtype} "
                f"{tuple(gallery.shape)}"
            )
        N, E = gallery.shape
        self.k = min(check_k(k), N)
        self.gallery = gallery.contiguous()
        if variant not in ("paper", "reference"):
            raise QuARIInputError(f"variant must be 'paper' or 'reference', got {variant!r}")
        self.rank, self.reference = rank, variant == "reference"
        self._pack = pack_projection
        self._graphs: dict[int, tuple] = {}
        pool = torch.cuda.graph_pool_handle()
        for size in sorted({_check_size(b) for b in batch_sizes}):
            # A stand-in plan whose packed projection becomes the graph's input buffers.
            dummy = _stand_in_plan(size, E, rank, self.reference, gallery.device)
            cfg = resolve_config(config, dummy)
            static = pack_projection(dummy, gallery.dtype, cfg.group)
            scores = torch.empty(size, N, dtype=torch.float32, device=gallery.device)

            def run(dummy=dummy, cfg=cfg, scores=scores):
                fused_scores(self.gallery, dummy, out=scores, config=cfg)
                return torch.isfinite(scores).all(), *select_topk(scores, self.k)

            stream = torch.cuda.Stream(gallery.device)
            stream.wait_stream(torch.cuda.current_stream(gallery.device))
            with torch.cuda.stream(stream):
                run()  # compiles the kernel and warms the allocator outside the capture
            torch.cuda.current_stream(gallery.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outputs = run()
            self._graphs[size] = (graph, cfg, static, outputs)
        self.batch_sizes = tuple(sorted(self._graphs))

    def __call__(self, adaptation):
        """Exact top-k of every query of ``adaptation`` over the gallery.

        Args:
            adaptation: An :class:`~quari.adaptation.Adaptation` (or its
                :class:`~quari.scoring.ScoringPlan`) on the gallery's device with the captured
                rank and variant, and a captured batch size.

        Returns:
            :class:`~quari.scoring.TopK` (B, k), best first.

        Raises:
            QuARIInputError: an adaptation that does not match the captured graphs, or a
                gallery row holding NaN/Inf.
        """
        plan = as_plan(adaptation)
        B = plan.batch
        if B not in self._graphs:
            raise QuARIInputError(
                f"GraphedScan captured batch sizes {self.batch_sizes}; got a batch of {B}"
            )
        want = (self.rank, self.reference, self.gallery.shape[1])
        have = (plan.rank, plan.reference, plan.dim)
        if have != want or plan.device != self.gallery.device:
            raise QuARIInputError(
                f"GraphedScan was captured for (rank, reference layout, dim) = {want} on "
                f"{self.gallery.device}; the adaptation has {have} on {plan.device}"
            )
        graph, cfg, static, (finite, values, ids) = self._graphs[B]
        packed = self._pack(plan, self.gallery.dtype, cfg.group)
        for name in ("main", "aux", "numer", "weights"):
            target = getattr(static, name)
            if target is not None:
                target.copy_(getattr(packed, name))
        graph.replay()
        top = TopK(ids.clone(), values.clone())
        if not bool(finite):
            raise_nonfinite(self.gallery, 0)  # names the first bad row
        return top


def _stand_in_plan(
    batch: int, dim: int, rank: int, reference: bool, device: torch.device
) -> ScoringPlan:
    """A plan of the right shape and layout, whose buffers a captured graph reads (every call
    copies the real plan's packed columns into them)."""
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    U, V = torch.randn(2, batch, dim, rank, generator=g)
    factors = (t.to(device) for t in (q, 0.8 * U / dim, V / dim))
    return ScoringPlan.from_factors(*factors, identity_weight=1.0 if reference else 0.0)
