"""Prepacked GEMM weights for the CPU passes at small batches.

At small batches each transformer GEMM has few rows (1 + r per query, folded) and the GEMM
library spends a large share of every call reordering the weight into its kernel's layout;
here that is done once and kept (docs/method.md §3.5): fp32 packs for the default ``eager``
pass (:class:`PackedLinears`, used by :meth:`quari.QuARIModel.eager_factors`) — MKL's on
Intel CPUs, oneDNN's elsewhere (:func:`fp32_pack_library`) — and oneDNN's bf16 packs for the
``bf16`` runtime (:class:`Bf16PackedLinear`).
"""

from __future__ import annotations

import os
import platform
import threading
from collections import OrderedDict
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from quari.hypernet.model import QuARIModel

__all__ = [
    "FP32_PACKS_ENV",
    "ONEDNN_MIN_WIDTH",
    "PACK_MAX_ROWS",
    "PACK_SETS",
    "Bf16PackedLinear",
    "PackedLinears",
    "fp32_pack_library",
    "mkl_packing_available",
    "onednn_packing_available",
]

#: Largest row count (queries × sequence length) whose GEMMs read weights packed for that row
#: count (MKL's fp32 packs, oneDNN's bf16 packs): at these sizes packing the weight is a large
#: share of each GEMM call (the paper-sized reference pass at batch 1 runs ~15 % faster
#: prepacked on an Intel Xeon, docs/results.md); at larger sizes the library's own packing is
#: amortised and the gain vanishes. oneDNN's fp32 packs serve every row count.
PACK_MAX_ROWS = 1024

#: Row counts whose packed weights are kept at once (least recently used dropped first). Each
#: set is resident memory the size of the transformer's weights.
PACK_SETS = 4

#: Smallest transformer width whose fp32 GEMMs read oneDNN's packs: below it a call's fixed
#: cost outweighs the saving (a 2-core AMD EPYC, reference variant at batch 1: width 32 1.5×
#: slower packed, 128 and 256 even, 384 1.27× and 512 1.35× faster; docs/results.md).
ONEDNN_MIN_WIDTH = 256

#: Environment variable that overrides :func:`fp32_pack_library`: ``mkl``, ``mkldnn`` or ``off``.
FP32_PACKS_ENV = "QUARI_FP32_PACKS"


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


@cache
def _cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, …), or "" if unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()  # Windows and macOS name the vendor here; "" if unknown


def fp32_pack_library() -> str | None:
    """The library whose prepacked fp32 weights the default pass reads, or None for none.

    MKL's packed sgemm on Intel CPUs; oneDNN's prepacked linear on every other CPU, where
    MKL runs slower kernels (a 2-core AMD EPYC: the paper-sized reference pass at batch 1
    1.27–1.36× faster through oneDNN than through MKL's packs, docs/results.md); None where this
    torch has neither. The environment variable ``QUARI_FP32_PACKS`` (``mkl``, ``mkldnn``
    or ``off``) overrides the choice; a library this torch lacks counts as ``off``.

    Returns:
        ``"mkl"``, ``"mkldnn"`` or None.

    Example:
        >>> fp32_pack_library() in ("mkl", "mkldnn", None)
        True
    """
    chosen = os.environ.get(FP32_PACKS_ENV, "").strip().lower()
    if chosen not in ("", "mkl", "mkldnn", "off"):
        raise ValueError(f"{FP32_PACKS_ENV}={chosen!r}: expected mkl, mkldnn or off")
    if not chosen:
        intel = "intel" in _cpu_vendor().lower()
        chosen = "mkl" if intel and mkl_packing_available() else "mkldnn"
    if chosen == "off" or _packed_ops(chosen) is None:
        return None
    return chosen


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
    """x ↦ x Wᵀ + b in fp32 through ``library``'s prepacked weight.

    The same fp32 arithmetic as ``F.linear`` (it differs by summation order only, ~1e-7).
    MKL packs for exactly ``rows`` input rows (other row counts fall back to the unpacked
    weight inside the op); oneDNN's layout (``rows`` None) serves every row count.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor, rows: int | None, library: str
    ) -> None:
        pack, self._linear = _packed_ops(library)
        self.weight, self.bias, self.rows = weight, bias, rows
        self.mkl = library == "mkl"
        self.packed = pack(weight.detach(), rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mkl:
            return self._linear(x, self.packed, self.weight, self.bias, self.rows)
        return self._linear(x, self.packed, self.bias, "none", [], "")


class PackedLinears:
    """The default fp32 pass's prepacked transformer weights.

    A GEMM with few rows — the hypernetwork at small batches, 1 + r rows per query — spends a
    large share of its time reordering the weight matrix into the layout its kernel reads;
    the library can do that once and keep it (:func:`fp32_pack_library` picks which). MKL
    (``cblas_sgemm_pack``) packs per row count: a set is made the first time a row count of
    at most :data:`PACK_MAX_ROWS` is seen (~30 ms for the paper-sized model) and at most
    :data:`PACK_SETS` are kept. oneDNN's one set serves every batch (its key is None), for
    transformers at least :data:`ONEDNN_MIN_WIDTH` wide. All are dropped when any weight
    changes (its data pointer or in-place version counter) or the model is moved, cast,
    trained or reloaded.

    Args:
        library: ``"mkl"`` or ``"mkldnn"`` to insist on one (a benchmark's side-by-side);
            None (default): :func:`fp32_pack_library` at each call.
    """

    def __init__(self, library: str | None = None) -> None:
        if library not in (None, *_OPS):
            raise ValueError(f"library={library!r}: expected one of {sorted(_OPS)} or None")
        self.library = library
        self._sets: OrderedDict[int | None, dict[str, _PackedLinear]] = OrderedDict()
        self._stamp: tuple[tuple[int, int], ...] | None = None
        self._library: str | None = None
        # Threads that share a model (a server's workers) share the cache: one update at a time.
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # Copies and pickles start empty: packs are a cache of the weights.
        return {"library": self.library}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state.get("library"))

    def clear(self) -> None:
        """Drops every packed set."""
        with self._lock:
            self._sets.clear()
            self._stamp = self._library = None

    def linears(self, model: QuARIModel, q: torch.Tensor) -> dict[str, _PackedLinear] | None:
        """The packed maps for queries ``q`` (a :meth:`~quari.QuARIModel.predict_factors`
        ``linears`` argument), or ``None`` where packing does not apply or pay: training,
        autograd, not fp32 on the CPU, no packing library, (MKL) more than
        :data:`PACK_MAX_ROWS` rows, or (oneDNN) a transformer narrower than
        :data:`ONEDNN_MIN_WIDTH`."""
        if model.training or q.device.type != "cpu" or q.dtype != torch.float32:
            return None
        if torch.is_grad_enabled() and (
            q.requires_grad or any(p.requires_grad for p in model.parameters())
        ):
            return None  # the packed op has no backward
        library = fp32_pack_library() if self.library is None else self.library
        if library is not None and _packed_ops(library) is None:
            library = None  # an insisted-on library this torch lacks
        rows = q.shape[0] * model.inference_tokens if library == "mkl" else None
        if library is None or (rows is not None and rows > PACK_MAX_ROWS):
            return None
        if library == "mkldnn" and model.config.hidden_dim < ONEDNN_MIN_WIDTH:
            return None
        table = model.transformer_linears()
        if any(w.is_inference() for w, _ in table.values()):
            return None  # made under inference_mode: no version counter tells of edits
        # In-place edits bump a tensor's version counter (torch has no public spelling of it).
        stamp = tuple((t.data_ptr(), t._version) for pair in table.values() for t in pair)  # noqa: SLF001
        with self._lock:
            if stamp != self._stamp or self._library != library:
                self._sets.clear()
                self._stamp, self._library = stamp, library
            packed = self._sets.get(rows)
            if packed is None:
                packed = {n: _PackedLinear(w, b, rows, library) for n, (w, b) in table.items()}
                self._sets[rows] = packed
                while len(self._sets) > PACK_SETS:
                    self._sets.popitem(last=False)
            else:
                self._sets.move_to_end(rows)
            return packed
