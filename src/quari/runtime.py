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
largest score error. ``auto`` (:func:`choose_runtime`) admits a reduced-precision runtime only
with a top-10 agreement of at least :data:`~quari.runtime_guard.REQUIRED_AGREEMENT` on a
planted probe set (:func:`~quari.runtime_guard.probe_set`), and only if it is measured faster
than ``eager`` on this machine; the
chosen runtime and the measurements are in ``model.runtime_report``. ``fp32`` makes the same
choice among the exact runtimes only (on our 2-core test CPUs ONNX Runtime's batch-1 pass
measured 0.70–0.92× eager's time from run to run, and tied it or won from batch 32, so
``fp32`` gave ``onnx+eager``, ``onnx`` or plain ``eager``; docs/results.md, CPU runtimes).
Both keep their choice on disk (:func:`choose_runtime`): a model measures once per machine.

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
import math
import os
import statistics
import time
import warnings
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from quari.errors import MissingDependencyError, QuARIInputError, missing_extra
from quari.fileio import atomic_write
from quari.hypernet.packing import (
    PACK_MAX_ROWS,
    PACK_SETS,
    Bf16PackedLinear,
    onednn_packing_available,
)
from quari.runtime_guard import probe_set, quality_guard
from quari.validation import as_embeddings

if TYPE_CHECKING:
    from quari.hypernet import QuARIModel

__all__ = [
    "CHUNK_ROWS",
    "RUNTIMES",
    "BatchDispatch",
    "Runtime",
    "build_runtime",
    "cache_dir",
    "choose_runtime",
    "chunk_size",
    "chunked",
    "cpu_flags",
    "cpu_model",
    "has_native_bf16",
]

RUNTIMES = ("eager", "compile", "onnx", "bf16", "int8", "fp32", "auto")

# How much faster than eager a candidate must measure before ``auto`` takes it (timings on a
# shared machine wobble by a few per cent).
_MIN_GAIN = 1.1


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


#: Token rows (queries × sequence length) per chunk of a large batch: the activations of a
#: chunk stay in cache, those of a whole large batch do not (bench_core: the pass ran ~1.5×
#: slower per query at batch 256 than at batch 32 before chunking).
CHUNK_ROWS = 2048


def chunk_size(model: QuARIModel) -> int:
    """The most queries one chunk of ``model``'s inference pass takes (≥ 1): about
    :data:`CHUNK_ROWS` token rows (1 + r folded, 1 + 2r otherwise, per query)."""
    return max(1, CHUNK_ROWS // model.inference_tokens)


def chunked(model: QuARIModel, run, q: torch.Tensor):
    """``run(q)`` → (q′, U, V) over near-equal chunks of at most :func:`chunk_size` queries,
    concatenated (each query's outputs depend on that query alone, so this is exact)."""
    batch, most = q.shape[0], chunk_size(model)
    if batch <= most:
        return run(q)
    size = -(-batch // -(-batch // most))  # ceil(batch / chunks): no small remainder chunk
    parts = [run(part) for part in q.split(size)]
    return tuple(torch.cat(outputs) for outputs in zip(*parts, strict=True))


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
        :func:`chunk_size` queries."""
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


def choose_runtime(
    model: QuARIModel,
    *,
    exact: bool = False,
    candidates: tuple[str, ...] | None = None,
    batch_sizes: tuple[int, ...] = (1, 32),
    repeats: int = 3,
    probe: tuple[Any, Any] | None = None,
    cache: bool = True,
) -> Runtime:
    """``auto`` (and ``fp32``): the fastest runtime on this machine that keeps the fp32 rankings.

    Each candidate is built, checked by :func:`~quari.runtime_guard.quality_guard` on
    ``probe`` (reduced precision needs :data:`~quari.runtime_guard.REQUIRED_AGREEMENT`) and
    timed against ``eager`` at ``batch_sizes`` on the probe queries: rounds in which every
    runtime runs once (so a load change on a shared machine hits all alike), at least
    ``repeats`` of them and more where a round is quick (about :data:`TIMING_BUDGET_S` per
    batch size, at most :data:`MAX_ROUNDS`), the median per runtime. At each batch size the
    fastest one wins if it is at least 1.1× faster than ``eager`` there (else ``eager``);
    when the winners differ by batch size the result is a :class:`BatchDispatch` over them.

    The choice is kept on disk (``cache_dir()/runtime/<key>.json``, the key covering the
    model's weights, the candidates, this CPU, the thread count and the library versions), so
    the next start with the same model on the same machine rebuilds the winners without
    measuring again (its report then names the file under ``"cached"``); delete the file to
    measure afresh. A file that cannot be read is measured over.

    Args:
        model: The model.
        exact: Only fp32 runtimes (``fp32``): reduced-precision candidates are skipped
            unbuilt, whatever their guard would say.
        candidates: Runtimes to try. Default: ``onnx`` where ONNX Runtime is installed (its
            first export takes a while, then it is cached), and unless ``exact``, ``bf16``
            where the CPU has bf16 instructions (``compile`` and ``int8`` are only used when
            named).
        batch_sizes: Batch sizes to time.
        repeats: The fewest timing rounds per batch size.
        probe: (queries, gallery) for the guard (default:
            :func:`~quari.runtime_guard.probe_set`).
        cache: Read and keep the choice on disk (only with the default ``probe``).

    Returns:
        The chosen runtime; ``.report`` holds every candidate's guard and timings, the
        winner per batch size (``"by_batch"``) and ``"exact"``.

    Example:
        >>> from quari import HyperNetConfig, QuARIModel
        >>> model = QuARIModel(HyperNetConfig(embedding_dim=32, rank=4, hidden_dim=16,
        ...                                   num_layers=1, num_heads=2)).eval()
        >>> choose_runtime(model, exact=True, candidates=("int8",)).name  # never reduced
        'eager'
    """
    if candidates is None:
        candidates = ("bf16",) if has_native_bf16() and not exact else ()
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            pass
        else:
            candidates += ("onnx",)
    unknown = sorted(set(candidates) - set(_BUILDERS))
    if unknown:
        raise QuARIInputError(f"auto: unknown candidate runtime(s) {unknown}")
    report: dict[str, Any] = {"candidates": {}, "batch_sizes": list(batch_sizes), "exact": exact}
    if exact:
        for name in candidates:
            if not _BUILDERS[name].exact:
                report["candidates"][name] = {"error": "reduced precision (exact: fp32 only)"}
        candidates = tuple(n for n in candidates if _BUILDERS[n].exact)
    if not any(name != "eager" for name in candidates):  # nothing to measure eager against
        eager = Runtime(model)
        eager.report = {**report, "chosen": "eager"}
        return eager
    path = _choice_path(model, exact, candidates, batch_sizes) if cache and probe is None else None
    if path is not None and (kept := _cached_choice(model, path)) is not None:
        return kept
    queries, gallery = probe if probe is not None else probe_set(model.embedding_dim)
    q = as_embeddings(queries, model.embedding_dim, "probe queries", normalize=True)
    batches = {b: q[torch.arange(b) % q.shape[0]] for b in batch_sizes}
    admitted: dict[str, Runtime] = {"eager": Runtime(model)}
    for name in candidates:
        if name == "eager":
            continue
        entry: dict[str, Any] = {}
        report["candidates"][name] = entry
        try:
            runtime = build_runtime(model, name)
        except Exception as exc:  # a missing extra, a failed compile: not a candidate
            entry["error"] = f"{type(exc).__name__}: {exc}"
            continue
        guard = quality_guard(model, runtime, queries, gallery)
        entry["guard"] = guard.to_dict()
        if runtime.exact or guard.passed:
            admitted[name] = runtime
    with torch.inference_mode():
        timed = {b: _time_runtimes(admitted, x, repeats) for b, x in batches.items()}
    ms = {name: {b: timed[b][name] for b in batch_sizes} for name in admitted}
    base = report["eager_ms"] = ms["eager"]
    for name in admitted.keys() - {"eager"}:
        gain = math.exp(statistics.fmean(math.log(base[b] / ms[name][b]) for b in batch_sizes))
        report["candidates"][name].update(ms=ms[name], speedup=gain)
    # Per batch size, the fastest admitted runtime if it beats eager by the margin: a runtime
    # can win at batch 32 and lose at batch 1 (bf16 on some CPUs), so none wins everywhere.
    winners = {}
    for b in batch_sizes:
        name = min(admitted, key=lambda n: ms[n][b])
        winners[b] = name if base[b] / ms[name][b] >= _MIN_GAIN else "eager"
    report["by_batch"] = winners
    best = _dispatch(model, {b: admitted[n] for b, n in winners.items()})
    report["chosen"] = best.name
    best.report = report
    if path is not None:
        atomic_write(path, lambda f: f.write(json.dumps(report, indent=1).encode()))
    return best


#: Seconds of timing rounds per batch size that :func:`choose_runtime` aims for, and the
#: most rounds it runs (batch 1 of the paper-sized model: ~12 rounds of eager + ONNX Runtime).
TIMING_BUDGET_S, MAX_ROUNDS = 2.0, 25


def _time_runtimes(runtimes: dict[str, Runtime], q: torch.Tensor, repeats: int) -> dict:
    """Median ms per call of each runtime on ``q``, over interleaved rounds (after a warm-up
    round that also sizes how many rounds fit :data:`TIMING_BUDGET_S`)."""
    start = time.perf_counter()
    for runtime in runtimes.values():
        runtime(q)
    rounds = min(MAX_ROUNDS, max(repeats, int(TIMING_BUDGET_S / (time.perf_counter() - start))))
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(rounds):
        for name, runtime in runtimes.items():
            start = time.perf_counter()
            runtime(q)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def _dispatch(model: QuARIModel, by_batch: dict[int, Runtime]) -> Runtime:
    """The one runtime that won every batch size, or a :class:`BatchDispatch` over them."""
    names = {r.name for r in by_batch.values()}
    return next(iter(by_batch.values())) if len(names) == 1 else BatchDispatch(model, by_batch)


def _choice_path(
    model: QuARIModel, exact: bool, candidates: tuple[str, ...], batch_sizes: tuple[int, ...]
) -> Path:
    """Where :func:`choose_runtime` keeps its choice: a file named by everything that can
    change it — the model (its fingerprint covers config, weights, quari and torch), the
    candidates and batch sizes, this CPU, the thread count and ONNX Runtime's version."""
    from importlib import metadata

    try:
        ort = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        ort = None
    facts = {
        "model": model_fingerprint(model),
        "exact": exact,
        "candidates": sorted(candidates),
        "batch_sizes": sorted(batch_sizes),
        "cpu": cpu_model(),
        "flags": sorted(cpu_flags()),
        "threads": torch.get_num_threads(),
        "onnxruntime": ort,
    }
    key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
    return cache_dir() / "runtime" / f"{key}.json"


def _int_keys(obj: dict) -> dict:
    return {int(k) if k.isdigit() else k: v for k, v in obj.items()}


def _cached_choice(model: QuARIModel, path: Path) -> Runtime | None:
    """The runtime a kept choice names, rebuilt; None when there is none or it is unusable."""
    try:
        # JSON keys are strings: batch sizes (the only all-digit keys) get their ints back.
        report = json.loads(path.read_text(), object_hook=_int_keys)
        by_batch = {int(b): n for b, n in report["by_batch"].items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(f"{path}: unreadable kept runtime choice ({exc}); measuring again",
                      stacklevel=3)  # fmt: skip
        return None
    try:
        built = {n: build_runtime(model, n) for n in set(by_batch.values())}
    except Exception:  # e.g. the export cache was cleared and cannot be rebuilt here
        return None
    best = _dispatch(model, {b: built[n] for b, n in by_batch.items()})
    best.report = {**report, "by_batch": by_batch, "cached": str(path)}
    return best


class BatchDispatch(Runtime):
    """``auto``/``fp32`` when different runtimes win at different batch sizes: a batch of b
    queries runs on the winner at the largest measured batch size ≤ b (the smallest measured
    size's winner below it). Named after its runtimes in batch order, e.g. ``eager+bf16``.

    Args:
        model: The model.
        by_batch: Measured batch size → the runtime that won there.
    """

    def __init__(self, model: QuARIModel, by_batch: dict[int, Runtime]) -> None:
        super().__init__(model)
        self.by_batch = dict(sorted(by_batch.items()))
        order = list(dict.fromkeys(r.name for r in self.by_batch.values()))
        self.name = "+".join(order)
        self.exact = all(r.exact for r in self.by_batch.values())

    def pick(self, batch: int) -> Runtime:
        """The runtime that serves a batch of ``batch`` queries."""
        chosen = next(iter(self.by_batch.values()))
        for size, runtime in self.by_batch.items():
            if size <= batch:
                chosen = runtime
        return chosen

    def __call__(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.pick(q.shape[0])(q)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "by_batch": {b: r.name for b, r in self.by_batch.items()}}
