"""Optional GPU paths, always with a torch fallback.

* :func:`scan_topk` — exact top-k over a gallery on a device: the fused Triton kernel
  (``scan_triton``) for fp16/bf16 rows where Triton is available, else a torch path (half GEMM
  with fp32 output, then the epilogue). :meth:`quari.Adaptation.scan` calls it for CUDA
  adaptations; set ``QUARI_DISABLE_TRITON=1`` to force the torch path.
* :func:`~quari.kernels.scan.select_topk` — the exact per-segment selection (block maxima
  for wide batches on CUDA, ``torch.topk`` otherwise).
* CUDA graphs (``graphs``): the hypernetwork at small batches
  (:meth:`quari.QuARIModel.enable_cuda_graphs`) and ``GraphedScan``, the scan of a resident
  gallery with no host work per call.

Triton is imported lazily, on first use, so importing quari never needs it and tests can set
``TRITON_INTERPRET=1`` before it loads.
"""

from __future__ import annotations

from quari.kernels.availability import interpreting, triton_available, triton_disabled
from quari.kernels.scan import scan_topk, select_backend

__all__ = ["interpreting", "scan_topk", "select_backend", "triton_available", "triton_disabled"]
