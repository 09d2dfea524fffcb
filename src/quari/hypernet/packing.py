"""Prepacked GEMM weights for the CPU passes at small batches.

At small batches each transformer GEMM has few rows (1 + r per query, folded) and the GEMM
library spends a large share of every call reordering the weight into its kernel's layout;
here that is done once per row count and kept (docs/method.md §3.5): MKL's fp32 packs for the
default ``eager`` pass (:class:`PackedLinears`, used by
:meth:`quari.QuARIModel.eager_factors`) and oneDNN's bf16 packs for the ``bf16`` runtime
(:class:`Bf16PackedLinear`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from functools import cache
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from quari.hypernet.model import QuARIModel

__all__ = [
    "PACK_MAX_ROWS",
    "PACK_SETS",
    "Bf16PackedLinear",
    "PackedLinears",
    "mkl_packing_available",
    "onednn_packing_available",
]

#: Largest row count (queries × sequence length) whose GEMMs read prepacked weights: at these
#: sizes packing the weight is a large share of each GEMM call (the paper-sized reference pass
#: at batch 1 runs ~15 % faster prepacked, docs/results.md); at larger sizes MKL's own packing
#: is amortised and the gain vanishes.
PACK_MAX_ROWS = 1024

#: Row counts whose packed weights are kept at once (least recently used dropped first). Each
#: set is resident memory the size of the transformer's weights.
PACK_SETS = 4


#: (reorder, packed linear) ATen operators per library: MKL's packed sgemm (x86 builds) and
#: oneDNN's prepacked linear (what inductor's weight freezing emits for frozen fp32 and bf16
#: linears). They are underscore-named operators, not private Python members; there is no
#: public spelling.
_OPS = {
    "mkl": ("_mkl_reorder_linear_weight", "_mkl_linear"),
    "mkldnn": ("_reorder_linear_weight", "_linear_pointwise"),
}


@cache
def _packed_ops(library: str) -> tuple[Any, Any] | None:
    """``library``'s (reorder, packed linear) ops, or None where this torch lacks them."""
    if not getattr(torch.backends, library).is_available():
        return None
    try:
        ops = getattr(torch.ops, library)
        reorder, linear = (getattr(ops, name) for name in _OPS[library])
        return reorder, linear
    except (AttributeError, RuntimeError):
        return None


def mkl_packing_available() -> bool:
    """Whether this torch has MKL's packed sgemm (x86 builds): ``mkl::_mkl_linear``."""
    return _packed_ops("mkl") is not None


def onednn_packing_available() -> bool:
    """Whether this torch has oneDNN's prepacked linear: ``mkldnn::_linear_pointwise``."""
    return _packed_ops("mkldnn") is not None


class Bf16PackedLinear:
    """x ↦ x Wᵀ + b in bf16 (bf16 out) through oneDNN, its weight reordered once for inputs of
    ``rows`` rows.

    The same bf16 arithmetic as ``F.linear`` on bf16 tensors (which reorders the weight on
    every call); inputs of other row counts are served too.

    Args:
        weight: (out, in) bf16 weight.
        bias: (out,) bf16 bias.
        rows: The row count the layout is chosen for.

    Raises:
        RuntimeError: oneDNN cannot pack bf16 on this CPU.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, rows: int) -> None:
        pack, self._linear = _packed_ops("mkldnn")
        self.bias = bias
        self.packed = pack(weight, rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x.to(torch.bfloat16), self.packed, self.bias, "none", [], "")


class _PackedLinear:
    """x ↦ x Wᵀ + b through MKL's packed sgemm, for inputs of exactly ``rows`` rows.

    The same fp32 arithmetic as ``F.linear`` (it differs by summation order only, ~1e-7);
    other row counts fall back to the unpacked weight inside the op.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, rows: int) -> None:
        pack, self._linear = _packed_ops("mkl")
        self.weight, self.bias, self.rows = weight, bias, rows
        self.packed = pack(weight.detach(), rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.packed, self.weight, self.bias, self.rows)


class PackedLinears:
    """The default fp32 pass's prepacked transformer weights, one set per row count.

    A GEMM with few rows — the hypernetwork at small batches, 1 + r rows per query — spends a
    large share of its time reordering the weight matrix into the layout its kernel reads;
    MKL can do that once (``cblas_sgemm_pack``) and keep it. A set is made the first time a
    row count of at most :data:`PACK_MAX_ROWS` is seen (~30 ms for the paper-sized model), at
    most :data:`PACK_SETS` are kept, and all are dropped when any weight changes (its data
    pointer or in-place version counter) or the model is moved, cast, trained or reloaded.
    """

    def __init__(self) -> None:
        self._sets: OrderedDict[int, dict[str, _PackedLinear]] = OrderedDict()
        self._stamp: tuple[tuple[int, int], ...] | None = None
        # Threads that share a model (a server's workers) share the cache: one update at a time.
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {}  # copies and pickles start empty: packs are a cache of the weights

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def clear(self) -> None:
        """Drops every packed set."""
        with self._lock:
            self._sets.clear()
            self._stamp = None

    def linears(self, model: QuARIModel, q: torch.Tensor) -> dict[str, _PackedLinear] | None:
        """The packed maps for queries ``q`` (a :meth:`~quari.QuARIModel.predict_factors`
        ``linears`` argument), or ``None`` where packing does not apply or pay: training,
        autograd, not fp32 on the CPU, no MKL, or more than :data:`PACK_MAX_ROWS` rows."""
        if model.training or q.device.type != "cpu" or q.dtype != torch.float32:
            return None
        if torch.is_grad_enabled() and (
            q.requires_grad or any(p.requires_grad for p in model.parameters())
        ):
            return None  # the packed op has no backward
        rows = q.shape[0] * model.inference_tokens
        if rows > PACK_MAX_ROWS or not mkl_packing_available():
            return None
        table = model.transformer_linears()
        if any(w.is_inference() for w, _ in table.values()):
            return None  # made under inference_mode: no version counter tells of edits
        # In-place edits bump a tensor's version counter (torch has no public spelling of it).
        stamp = tuple((t.data_ptr(), t._version) for pair in table.values() for t in pair)  # noqa: SLF001
        with self._lock:
            if stamp != self._stamp:
                self._sets.clear()
                self._stamp = stamp
            packed = self._sets.get(rows)
            if packed is None:
                packed = {n: _PackedLinear(w, b, rows) for n, (w, b) in table.items()}
                self._sets[rows] = packed
                while len(self._sets) > PACK_SETS:
                    self._sets.popitem(last=False)
            else:
                self._sets.move_to_end(rows)
            return packed
