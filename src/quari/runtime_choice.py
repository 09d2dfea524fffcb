"""``auto`` and ``fp32``: the runtime measured fastest on this machine, chosen once and kept.

:func:`choose_runtime` builds the candidate runtimes of :mod:`quari.runtime`, admits those that
keep the fp32 rankings (:func:`~quari.runtime_guard.quality_guard`), times them against
``eager`` per batch size in interleaved rounds, and returns the winner — or a
:class:`BatchDispatch` when the winners differ by batch size. The choice is kept on disk, so
a model is measured once per machine. ``model.set_runtime("auto" | "fp32")`` and
``quari serve`` (whose default is ``fp32``) come here.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quari.errors import QuARIInputError
from quari.fileio import atomic_write
from quari.runtime import (
    _BUILDERS,
    Runtime,
    build_runtime,
    cache_dir,
    cpu_flags,
    cpu_model,
    has_native_bf16,
    model_fingerprint,
)
from quari.runtime_guard import probe_set, quality_guard
from quari.validation import as_embeddings

if TYPE_CHECKING:
    from quari.hypernet import QuARIModel

__all__ = ["MAX_ROUNDS", "TIMING_BUDGET_S", "BatchDispatch", "choose_runtime"]

# How much faster than eager a candidate must measure before ``auto`` takes it (timings on a
# shared machine wobble by a few per cent).
_MIN_GAIN = 1.1


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
    measure afresh. A file that cannot be read is measured over; a choice made while a
    candidate failed to build is not kept.

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
            path = None  # nor a choice to keep: the next start tries it again
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
