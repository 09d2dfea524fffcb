"""CUDA graphs for the hypernetwork's forward pass at small batches.

At batch 1 the forward pass is a chain of a few hundred small kernels whose launch cost, not
their arithmetic, sets the latency (GPU.md: 3.5 ms eager, 0.6 ms as one graph on an H200). A
graph per batch size, captured once with static input and output buffers, replays the whole
chain with one launch. A batch is padded up to the smallest captured size that holds it (the
padding rows repeat a real query, so they compute finite values) and the outputs are cloned
out of the static buffers before the next replay can overwrite them.

Use it through :meth:`quari.QuARIModel.enable_cuda_graphs`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from quari.validation import QuARIInputError

__all__ = ["PRECISIONS", "GraphedForward"]

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
            (fp32 matrix products on tensor cores, ~1e-3 relative error) or ``"bf16"``
            (autocast; ~1e-2 relative error in q′, U, V). Outputs are fp32 in every case.

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
        base = model._predict
        if compile:
            # Static shapes: one specialised compilation per captured batch size.
            base = torch.compile(model._predict, dynamic=False)
        precision = self.precision

        def predict(q: torch.Tensor) -> tuple[torch.Tensor, ...]:
            # The kernels recorded at capture time are what every replay runs, so the
            # precision switches only need to hold while capturing.
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = base(q)
            return tuple(t.float() for t in out)

        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32" or tf32
        try:
            self._record(model, sizes, warmup, predict)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32

    def _record(self, model, sizes: list[int], warmup: int, predict) -> None:
        # Largest first, sharing one memory pool: every output is cloned right after its
        # replay, so graphs that reuse each other's intermediate memory cannot clash.
        pool = torch.cuda.graph_pool_handle()
        gen = torch.Generator(device=self.device).manual_seed(0)
        for size in sizes:
            static_in = torch.randn(
                size, model.embedding_dim, device=self.device, dtype=self.dtype, generator=gen
            )
            static_in = torch.nn.functional.normalize(static_in, dim=-1)
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
        """(q′, U, V) for checked queries ``q`` (B ≤ the largest captured size)."""
        B = q.shape[0]
        size = next(s for s in self.batch_sizes if s >= B)
        graph, static_in, static_out = self._graphs[size]
        with torch.no_grad():
            static_in[:B].copy_(q)
            if size > B:
                static_in[B:].copy_(q[:1].expand(size - B, -1))
            graph.replay()
            return tuple(t[:B].clone() for t in static_out)


def _check_size(b) -> int:
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise QuARIInputError(f"batch_sizes: expected positive integers, got {b!r}")
    return b
