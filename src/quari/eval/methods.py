"""Method specs: the strings ``quari eval --model`` takes, resolved against one evaluator.

================================  ===============================================================
``cosine``                        the frozen backbone (plain cosine)
``aqe`` / ``aqe:n=2,alpha=3``     αQE over the evaluator's gallery; without ``n``, n is tuned on
                                  the validation split (grid :data:`AQE_GRID`)
``dba`` / ``dba:k=5,alpha=3``     αDBA-transformed gallery + cosine; without ``k``, k is tuned
                                  on the validation split (grid :data:`DBA_GRID`)
a folder or ``hf:<repo>``         :func:`quari.checkpoint.load_model`: a QuARI model, a reference
                                  checkpoint, or a linear adapter
================================  ===============================================================

Baselines are tuned on the validation split only (a protocol without one — ILIAS, custom
queries — needs the parameter spelled out).

Example:
    >>> method = resolve_method("aqe:n=2", ev)  # doctest: +SKIP
    >>> ev.evaluate(method.adapter, mode="rerank", method=method.describe())  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quari.adapters import QueryAdapter
from quari.checkpoint import load_model
from quari.errors import QuARIInputError
from quari.eval.baselines import AlphaQE, dba_transform
from quari.eval.protocols.base import Evaluator, describe_method
from quari.eval.protocols.io import cached_set, default_cache_dir, digest
from quari.index import CandidateIndex
from quari.retriever import MODES
from quari.store import EmbeddingSet

__all__ = ["AQE_GRID", "DBA_GRID", "Method", "dba_set", "parse_spec", "resolve_method"]

AQE_GRID = (1, 2, 5, 10)
DBA_GRID = (1, 2, 5, 10)
IndexFor = Callable[[EmbeddingSet], CandidateIndex | None]


@dataclass
class Method:
    """A resolved method.

    Attributes:
        spec: The spec string as given.
        name: Display name.
        kind: ``cosine``, ``quari``, ``linear``, ``aqe`` or ``dba``.
        adapter: The query adapter (None: cosine).
        gallery: A replacement gallery (DBA), or None.
        index: The replacement gallery's index, if any.
        params: The baseline's parameters (after tuning).
        tuning: Validation results of each candidate parameter ({param: value, metric: …}).
    """

    spec: str
    name: str
    kind: str
    adapter: QueryAdapter | None
    gallery: EmbeddingSet | None = None
    index: CandidateIndex | None = None
    params: dict[str, Any] = field(default_factory=dict)
    tuning: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """The ``method`` record of a result."""
        desc = describe_method(self.adapter, self.name)
        desc.update(kind=self.kind, spec=self.spec, **self.params)
        if self.tuning:
            desc["tuning"] = self.tuning
        if self.gallery is not None:
            desc["gallery"] = str(self.gallery.root)
        return desc

    def modes(self, requested: list[str], fixed_candidates: bool = False) -> list[str]:
        """The modes to run: ``all`` means every mode that differs for this method (cosine and
        DBA: ``plain``; adapters: ``rerank``, ``adaptive``, ``scan``; with fixed candidates
        only ``plain`` or ``rerank`` change anything)."""
        adapted = self.adapter is not None
        if "all" in requested:
            if fixed_candidates:
                return ["rerank" if adapted else "plain"]
            return ["rerank", "adaptive", "scan"] if adapted else ["plain"]
        bad = [m for m in requested if m not in MODES]
        if bad:
            raise QuARIInputError(f"unknown mode {bad[0]!r}: use {', '.join(MODES)} or all")
        if adapted:
            return [m for m in requested if m != "plain"] or ["rerank"]
        return ["plain"] + [m for m in requested if m == "scan" and not fixed_candidates]


def parse_spec(spec: str) -> tuple[str, dict[str, float]]:
    """(kind, parameters) of a method spec; kind ``model`` for anything loadable.

    Example:
        >>> parse_spec("aqe:n=2,alpha=3"), parse_spec("cosine")[0], parse_spec("runs/x")[0]
        (('aqe', {'n': 2, 'alpha': 3.0}), 'cosine', 'model')
    """
    head, _, rest = spec.partition(":")
    if head not in ("cosine", "aqe", "dba") or (head == "cosine" and rest):
        return "model", {}
    allowed = {"aqe": ("n", "alpha"), "dba": ("k", "alpha")}.get(head, ())
    params: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise QuARIInputError(f"{spec}: expected {head}:{'=…,'.join(allowed)}=…")
        try:
            params[key] = float(value) if key == "alpha" else int(value)
        except ValueError:
            raise QuARIInputError(f"{spec}: {key} must be a number, got {value!r}") from None
    return head, params


def dba_set(
    eset: EmbeddingSet,
    k: int,
    alpha: float,
    *,
    index: CandidateIndex | None = None,
    cache: Path | None = None,
    progress: bool = False,
) -> EmbeddingSet:
    """The αDBA transform of ``eset``, written once to ``<cache>/<set>-dba-k{k}-a{α}-<hash>``."""
    source = {
        "dba": {"k": k, "alpha": alpha},
        "source": str(eset.root),
        "rows": eset.rows,
        "fingerprint": eset.fingerprint,
    }
    folder = (cache or default_cache_dir() / "eval") / (
        f"{eset.root.name}-dba-k{k}-a{alpha:g}-{digest(source)}"
    )
    return cached_set(
        folder,
        source,
        lambda tmp: dba_transform(eset, tmp, k=k, alpha=alpha, index=index, progress=progress),
    )


def resolve_method(
    spec: str,
    evaluator: Evaluator,
    *,
    index_for: IndexFor = lambda eset: None,
    validation: Evaluator | None = None,
    tune_mode: str = "rerank",
    cache: str | os.PathLike[str] | None = None,
    map_location: str = "cpu",
    progress: bool = False,
) -> Method:
    """Resolves a spec for ``evaluator`` (tuning baselines on ``validation``).

    Args:
        spec: See the module docstring.
        evaluator: The protocol it will run on (its gallery is what αQE and DBA work on).
        index_for: The candidate index to use for a gallery (None: exact scan).
        validation: The protocol's validation-split evaluator, for tuning.
        tune_mode: Mode the tuning runs in (αQE).
        cache: Where transformed galleries go (default ``default_cache_dir()/eval``).
        map_location: Device for loaded models.
        progress: Progress bars.

    Raises:
        QuARIInputError: a bad spec, or a baseline to tune without a validation split.
    """
    kind, params = parse_spec(spec)
    cache_dir = Path(cache) if cache is not None else None
    if kind == "cosine":
        return Method(spec, "cosine", "cosine", None)
    if kind == "model":
        model = load_model(spec, map_location=map_location)
        name = Path(spec).name if not spec.startswith("hf:") else spec[3:]
        adapter_kind = str(getattr(model, "metadata", {}).get("adapter", "quari"))
        return Method(spec, name or spec, adapter_kind, model)
    alpha = float(params.get("alpha", 3.0))
    key = "n" if kind == "aqe" else "k"

    def build(ev: Evaluator, value: int) -> Method:
        gallery = ev.gallery
        if kind == "aqe":
            adapter = AlphaQE(gallery, index_for(gallery), n=value, alpha=alpha)
            return Method(
                spec, f"αQE (n={value})", "aqe", adapter, params={"n": value, "alpha": alpha}
            )
        dba = dba_set(
            gallery, value, alpha, index=index_for(gallery), cache=cache_dir, progress=progress
        )
        return Method(
            spec,
            f"αDBA (k={value})",
            "dba",
            None,
            dba,
            index_for(dba),
            {"k": value, "alpha": alpha},
        )

    if key in params:
        return build(evaluator, int(params[key]))
    if validation is None:
        raise QuARIInputError(
            f"{spec}: {key} is tuned on a validation split, and {evaluator.protocol} has none "
            f"here; give it (e.g. {kind}:{key}=2)"
        )
    tuning = []
    for value in AQE_GRID if kind == "aqe" else DBA_GRID:
        candidate = build(validation, value)
        mode = tune_mode if candidate.adapter is not None else "plain"
        result = validation.evaluate(
            candidate.adapter,
            mode=mode,
            gallery=candidate.gallery,
            index=candidate.index or index_for(validation.gallery),
        )
        tuning.append(
            {
                key: value,
                "split": validation.split,
                "mode": mode,
                validation.primary_metric: result.primary,
            }
        )
    best = max(tuning, key=lambda t: t[validation.primary_metric])[key]
    method = build(evaluator, best)
    method.tuning = tuning
    return method
