"""CPU runtimes of the hypernetwork's inference pass, and the quality guard that admits them.

:meth:`quari.QuARIModel.set_runtime` picks how ``model(q)`` computes q′, U and V on a CPU:

=========== ================================ ============================================
name        arithmetic                       what runs
=========== ================================ ============================================
``eager``   fp32 (the default; exact)        PyTorch, the folded inference pass, on
                                             prepacked weights (MKL's at small batches
                                             on Intel CPUs, oneDNN's elsewhere;
                                             ``quari.hypernet.packing``)
``compile`` fp32 (exact to rounding)         ``torch.compile`` (inductor) of that pass,
                                             one compilation per batch size
``onnx``    fp32 (exact to rounding)         ONNX Runtime on the exported pass (extra
                                             ``onnx``; the export is cached on disk)
``bf16``    bf16 transformer GEMMs           the pass with bf16 copies of the transformer's
                                             weights (oneDNN-prepacked at small batches);
                                             residual stream, norms, encoder and decoders
                                             stay fp32 (pays on CPUs with AVX512-BF16 / AMX)
``int8``    int8 transformer GEMMs           PyTorch's dynamic int8 quantisation of the
                                             transformer's linear maps (fbgemm / x86)
``fp32``    fp32 (exact to rounding)         the faster of ``eager`` and ``onnx`` per batch
                                             size, measured here (``quari serve``'s default)
``auto``    the fastest that passes          measured here, on this model, per batch size
=========== ================================ ============================================

Reduced-precision runtimes change the numbers. :func:`quari.runtime_guard.quality_guard`
measures how much: the top-k agreement of the gallery rankings with the fp32 pass and the
largest score error. ``auto`` and ``fp32`` are chosen by measurement
(:func:`quari.runtime_choice.choose_runtime`, which keeps the choice on disk: a model is
measured once per machine): ``auto`` admits a reduced-precision runtime only with a top-10
agreement of at least :data:`~quari.runtime_guard.REQUIRED_AGREEMENT` on a planted probe set
(:func:`~quari.runtime_guard.probe_set`), and only if it is measured faster than ``eager`` on
this machine; the chosen runtime and the measurements are in ``model.runtime_report``.
``fp32`` makes the same choice among the exact runtimes only (on our 2-core test CPUs ONNX
Runtime's batch-1 pass measured 0.70–0.92× eager's time from run to run, and tied it or won
from batch 32, so ``fp32`` gave ``onnx+eager``, ``onnx`` or plain ``eager``;
docs/results.md, CPU runtimes).

Runtimes other than ``eager`` hold converted or exported copies of the weights, taken when
the runtime is built. The model drops them (back to ``eager``) when it is moved or cast, put
in training mode or given a new state dict; after changing weights in place, call
``set_runtime`` again.

Example:
    >>> from quari import HyperNetConfig, QuARIModel
    >>> model = QuARIModel(HyperNetConfig(embedding_dim=32, rank=4, hidden_dim=16,
    ...                                   num_layers=1, num_heads=2, num_steps=2)).eval()
    >>> model.set_runtime("bf16").runtime
    'bf16'
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from quari.errors import MissingDependencyError, QuARIInputError, missing_extra
from quari.fileio import atomic_write
from quari.hypernet.chunks import chunked
from quari.hypernet.packing import (
    PACK_MAX_ROWS,
    PACK_SETS,
    Bf16PackedLinear,
    onednn_packing_available,
)

if TYPE_CHECKING:
    from quari.hypernet import QuARIModel

__all__ = [
    "RUNTIMES",
    "Runtime",
    "build_runtime",
    "cache_dir",
    "cpu_flags",
    "cpu_model",
    "has_native_bf16",
]

RUNTIMES = ("eager", "compile", "onnx", "bf16", "int8", "fp32", "auto")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@cache
def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor()
    for line in text.splitlines():
        if line.startswith(("model name", "Hardware")):
            return line.split(":", 1)[1].strip()
    return ""


def has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16); elsewhere bf16
    GEMMs are emulated and slower than fp32, so ``auto`` does not try them."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cache_dir() -> Path:
    """Where exported artefacts are kept: ``$QUARI_CACHE_DIR``, else ``~/.cache/quari``."""
    env = os.environ.get("QUARI_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "quari"


class Runtime:
    """How a model's inference pass runs; built by :func:`build_runtime`.

    Attributes:
        name: One of :data:`RUNTIMES` (never ``"auto"`` or ``"fp32"``: those resolve to
            another, or to a :class:`BatchDispatch` named after its runtimes).
        exact: fp32 arithmetic, the eager numbers to rounding (``False``: reduced precision).
    """

    name = "eager"
    exact = True
    #: ``auto`` only: every candidate's guard report and timings (:func:`choose_runtime`).
    report: dict[str, Any] | None = None

    def __init__(self, model: QuARIModel) -> None:
        self.model = model

    def accepts(self, model: QuARIModel, q: torch.Tensor) -> bool:
        """Whether this runtime serves checked queries ``q`` for ``model`` now: eval mode,
        fp32 on the CPU, and no autograd (the eager pass serves everything else)."""
        if model is not self.model or model.training:
            return False
        if q.device.type != "cpu" or q.dtype != torch.float32:
            return False
        return not torch.is_grad_enabled() or not (
            q.requires_grad or any(p.requires_grad for p in model.parameters())
        )

    def __call__(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q′, U, V) for checked, normalised (B, E) fp32 queries, in chunks of
        :func:`~quari.hypernet.chunks.chunk_size` queries."""
        return chunked(self.model, self.run, q)

    def run(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q′, U, V) for one chunk of queries: the default eager pass."""
        return self.model.eager_factors(q)

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts about this runtime."""
        return {"runtime": self.name, "exact": self.exact}


class CompiledRuntime(Runtime):
    """``torch.compile`` (inductor, C++ on CPU) of the eager pass.

    Each new batch size compiles once (tens of seconds for the paper-sized model on two
    cores; inductor keeps its own on-disk cache) — after torch's recompile limit, further
    sizes run eagerly. The weights stay the live parameters.
    """

    name = "compile"

    def __init__(self, model: QuARIModel, *, dynamic: bool | None = False) -> None:
        super().__init__(model)
        self.dynamic = dynamic
        self._compiled = torch.compile(model.predict_factors, dynamic=dynamic)

    def run(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._compiled(q)


class _Bf16Linear:
    """x ↦ x Wᵀ + b in bf16 (bf16 out): a weight copy taken once, the input cast per call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight = weight.detach().to(torch.bfloat16)
        self.bias = bias.detach().to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias)


class Bf16Runtime(Runtime):
    """The eager pass with the transformer's GEMMs in bf16.

    The transformer's four affine maps per layer (≈97 % of the FLOPs) read bf16 copies of
    their weights and return bf16; the residual stream, LayerNorms, the query encoder and
    the decoders stay fp32 (the residual sum promotes the bf16 updates back to fp32), so
    q′, U and V come out fp32. The attention runs on the bf16 projections.

    Small batches (at most :data:`~quari.hypernet.packing.PACK_MAX_ROWS` token rows) read the
    copies reordered once per row count by oneDNN, as the fp32 pass reads its packs: at
    batch 1 the paper-sized reference pass ran ~20 % faster so (docs/results.md, CPU
    runtimes); at larger batches the per-call reorder is amortised and plain ``F.linear``
    measured faster.
    """

    name = "bf16"
    exact = False

    def __init__(self, model: QuARIModel) -> None:
        super().__init__(model)
        self.linears = {n: _Bf16Linear(w, b) for n, (w, b) in model.transformer_linears().items()}
        self._pack_ok = onednn_packing_available()
        self._packs = lru_cache(maxsize=PACK_SETS)(self._pack)

    def _pack(self, rows: int) -> dict[str, Bf16PackedLinear]:
        # From the copies taken when the runtime was built, like the unpacked maps.
        return {n: Bf16PackedLinear(f.weight, f.bias, rows) for n, f in self.linears.items()}

    def _linears_for(self, rows: int) -> dict[str, Any]:
        if self._pack_ok and rows <= PACK_MAX_ROWS:
            try:
                return self._packs(rows)
            except RuntimeError:
                self._pack_ok = False  # oneDNN cannot reorder bf16 on this CPU: stay unpacked
        return self.linears

    def run(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = q.shape[0] * self.model.inference_tokens
        return self.model.predict_factors(q, linears=self._linears_for(rows))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "native_bf16": has_native_bf16()}


class Int8Runtime(Runtime):
    """The eager pass with the transformer's affine maps dynamically quantised to int8.

    Weights: int8, one scale per output channel, taken once; activations: quantised per
    call from their observed range (PyTorch's ``quantize_dynamic``, fbgemm / x86 kernels).
    PyTorch has deprecated its eager quantisation in favour of torchao; where it is gone this
    runtime raises :class:`~quari.errors.MissingDependencyError`.
    """

    name = "int8"
    exact = False

    def __init__(self, model: QuARIModel) -> None:
        super().__init__(model)
        try:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        except ImportError as exc:  # pragma: no cover - depends on the torch release
            raise MissingDependencyError(
                f"runtime 'int8' needs torch.ao.quantization, which this torch "
                f"({torch.__version__}) does not have: {exc}"
            ) from exc
        names, layers = [], nn.ModuleList()
        for name, (w, b) in model.transformer_linears().items():
            layer = nn.Linear(w.shape[1], w.shape[0])
            layer.weight.data.copy_(w.detach())
            layer.bias.data.copy_(b.detach())
            names.append(name)
            layers.append(layer)
        with warnings.catch_warnings():
            # The deprecation notice of torch.ao.quantization: stated in the docstring.
            warnings.simplefilter("ignore")
            quantised = quantize_dynamic(
                layers, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
            )
        self.linears = dict(zip(names, quantised, strict=True))

    def run(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.predict_factors(q, linears=self.linears)


class _Exportable(nn.Module):
    """The inference pass as a module with one input, for ``torch.onnx.export``."""

    def __init__(self, model: QuARIModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.predict_factors(q)


def model_fingerprint(model: QuARIModel) -> str:
    """sha256 of the config, the weights and the versions an exported graph depends on."""
    import quari

    digest = hashlib.sha256()
    facts = {
        "config": model.config.to_dict(),
        "quari": quari.__version__,
        "torch": torch.__version__,
    }
    digest.update(json.dumps(facts, sort_keys=True).encode())
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class OnnxRuntime(Runtime):
    """ONNX Runtime (CPU execution provider) on the exported fp32 pass.

    The pass is exported with ``torch.onnx.export`` (batch size dynamic) to
    ``cache_dir()/onnx/<fingerprint>.onnx`` — the fingerprint covers the config, the
    weights and the quari/torch versions, so a changed model exports again — and loaded into
    an ``InferenceSession`` with ``torch.get_num_threads()`` intra-op threads. ONNX Runtime
    prepacks the weights once, which pays most at small batches.

    Args:
        model: The model (exported in eval mode).
        cache: Folder of the exported graphs (default: ``cache_dir() / "onnx"``).
        threads: Intra-op threads (default: ``torch.get_num_threads()``).

    Raises:
        MissingDependencyError: ``onnxruntime`` or ``onnx`` is not installed (extra ``onnx``).
    """

    name = "onnx"

    def __init__(
        self, model: QuARIModel, *, cache: Path | None = None, threads: int | None = None
    ) -> None:
        super().__init__(model)
        try:
            import onnx  # noqa: F401  (the exporter needs it)
            import onnxruntime as ort
        except ImportError as exc:
            raise missing_extra("runtime 'onnx'", "onnx", exc) from exc
        folder = Path(cache) if cache is not None else cache_dir() / "onnx"
        self.path = folder / f"{model_fingerprint(model)}.onnx"
        self.exported = not self.path.is_file()
        if self.exported:
            self._export(model, self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # ONNX Runtime's idle threads spin by default, holding the cores after each call: the
        # torch work that follows (the scoring, the next eager pass) ran ~30 ms slower at batch
        # 1 on two cores, for ~1 ms gained by ONNX Runtime itself (docs/results.md, CPU runtimes).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )

    @staticmethod
    def _export(model: QuARIModel, path: Path) -> None:
        was_training = model.training
        model.eval()
        example = torch.zeros(2, model.embedding_dim)
        example[:, 0] = 1.0
        try:
            with torch.inference_mode(False), torch.no_grad():
                program = torch.onnx.export(
                    _Exportable(model).eval(),
                    (example,),
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    input_names=["queries"],
                    output_names=["refined_query", "U", "V"],
                    verbose=False,
                )
        finally:
            model.train(was_training)
        proto = program.model_proto.SerializeToString()
        atomic_write(path, lambda f: f.write(proto))

    def run(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self._session.run(None, {"queries": q.detach().contiguous().numpy()})
        refined, U, V = (torch.from_numpy(x) for x in out)
        return refined, U, V

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(self.path), "exported_now": self.exported}


_BUILDERS: dict[str, type[Runtime]] = {
    "eager": Runtime,
    "compile": CompiledRuntime,
    "onnx": OnnxRuntime,
    "bf16": Bf16Runtime,
    "int8": Int8Runtime,
}


def build_runtime(model: QuARIModel, name: str = "eager", **options: Any) -> Runtime:
    """Builds runtime ``name`` for ``model`` (see the module docstring for the names).

    Args:
        model: The model.
        name: One of :data:`RUNTIMES`.
        **options: Passed on: ``compile``: ``dynamic``; ``onnx``: ``cache``, ``threads``;
            ``auto`` and ``fp32``: the keyword arguments of :func:`choose_runtime`.

    Returns:
        The runtime (``auto``, ``fp32``: the chosen one, with its report in ``.report``).

    Raises:
        QuARIInputError: an unknown name or option.
        MissingDependencyError: the runtime's optional dependency is missing.
    """
    if name in ("auto", "fp32"):
        from quari.runtime_choice import choose_runtime  # it builds runtimes with this function

        return choose_runtime(model, exact=name == "fp32", **options)
    if name not in _BUILDERS:
        raise QuARIInputError(f"runtime must be one of {RUNTIMES}, got {name!r}")
    try:
        return _BUILDERS[name](model, **options)
    except TypeError as exc:
        if options:
            raise QuARIInputError(
                f"runtime {name!r}: bad options {sorted(options)} ({exc})"
            ) from exc
        raise
