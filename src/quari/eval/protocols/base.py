"""What every evaluation protocol shares: query sets, the evaluator, and the result record.

An :class:`Evaluator` owns a gallery (an :class:`~quari.store.EmbeddingSet`) and a labelled
:class:`QuerySet`, and runs one method through :class:`quari.retriever.Retriever` — so modes,
filters and exact rescoring are the product's own — then scores the ranked lists with
:mod:`quari.eval.metrics` (the min(R, k) AP normaliser; ties grouped by score as
scikit-learn, and so the INQUIRE and ILIAS code, group them). The :class:`EvalResult` keeps
everything a report needs to be redrawn without re-running: the metrics, every query's values,
per-group breakdowns, the method's description (kind, rank, steps …), the mode, the time per
query per stage, and the environment.

Example:
    >>> result = evaluator.evaluate(load_model("runs/quari"), mode="rerank")  # doctest: +SKIP
    >>> result.metrics[result.primary_metric]  # doctest: +SKIP
    >>> result.save("results/quari-rerank.json")  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from quari import __version__
from quari.adapters import CosineAdapter, QueryAdapter
from quari.encoders import Encoder
from quari.errors import QuARIInputError
from quari.eval.metrics import Ties, per_query_metrics, relevance_matrix
from quari.fileio import atomic_write, read_json
from quari.index import CandidateIndex
from quari.retriever import MODES, STAGES, Retriever
from quari.store import EmbeddingSet

__all__ = [
    "RESULT_FORMAT",
    "EvalResult",
    "Evaluator",
    "QuerySet",
    "describe_method",
    "environment",
    "group_means",
    "load_results",
    "save_results",
]

RESULT_FORMAT = "quari-eval-result"
RESULT_VERSION = 1


@dataclass
class QuerySet:
    """Labelled queries over one gallery.

    Attributes:
        ids: Query ids (strings), in order.
        embeddings: (Q, E) float32 query embeddings.
        relevant: Per query, the gallery row ids that are relevant.
        n_relevant: (Q,) R, the relevant items each query has in total (the AP normaliser
            min(R, k) uses it; it may exceed the relevant rows the gallery holds, as
            INQUIRE-Fullrank counts every annotated positive).
        groups: Breakdown fields: name → one label per query (e.g. ``supercategory``).
        selections: Per query, a filter that restricts its candidates (INQUIRE-Rerank's fixed
            100), or None.
        encode_seconds: Time spent embedding the queries (0 for precomputed embeddings).
    """

    ids: list[str]
    embeddings: np.ndarray
    relevant: list[np.ndarray]
    n_relevant: np.ndarray
    groups: dict[str, list[str]] = field(default_factory=dict)
    selections: list[pc.Expression] | None = None
    encode_seconds: float = 0.0

    def __post_init__(self) -> None:
        Q = len(self.ids)
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        self.n_relevant = np.asarray(self.n_relevant, dtype=np.int64)
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != Q:
            raise QuARIInputError(f"query embeddings must be ({Q}, E), got {self.embeddings.shape}")
        if len(self.relevant) != Q or self.n_relevant.shape != (Q,):
            raise QuARIInputError("every query needs its relevant rows and its count R")
        for name, labels in self.groups.items():
            if len(labels) != Q:
                raise QuARIInputError(f"group {name!r} has {len(labels)} labels for {Q} queries")
        if self.selections is not None and len(self.selections) != Q:
            raise QuARIInputError("give one candidate selection per query")

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, keep: Sequence[int]) -> QuerySet:
        """The queries at positions ``keep`` (in that order)."""
        keep = list(keep)
        return QuerySet(
            [self.ids[i] for i in keep],
            self.embeddings[keep],
            [self.relevant[i] for i in keep],
            self.n_relevant[keep],
            {k: [v[i] for i in keep] for k, v in self.groups.items()},
            None if self.selections is None else [self.selections[i] for i in keep],
            self.encode_seconds * len(keep) / max(1, len(self)),
        )


@dataclass
class EvalResult:
    """One method evaluated under one protocol and mode (what ``quari eval`` writes as JSON).

    Attributes:
        protocol: e.g. ``"inquire-fullrank"``, ``"ilias-i2i"``, ``"custom"``.
        split: The query split (``"test"``, ``"val"`` …).
        primary_metric: The protocol's headline metric (a key of ``metrics``).
        metrics: Metric name → mean over queries, as fractions in [0, 1].
        per_query: ``"query_id"`` → ids, and every metric → one value per query.
        groups: Breakdown field → label → {metric: mean, ``"queries"``: count}.
        method: Description of what was evaluated (``name``, ``kind``, ``rank``, ``steps`` …).
        mode: The retrieval mode.
        k: Cut-off of the ranked lists.
        candidates: Index candidates per query (K).
        queries: Number of queries.
        gallery_rows: Rows in the gallery searched.
        timings: ``encode_s``, ``search_s``, ``metric_s``, ``wall_s``, ``per_query_ms``
            (search time per query) and ``stages_ms`` (per query, by Retriever stage).
        environment: quari/torch/numpy versions, platform, CPU, threads, device.
        notes: Remarks (e.g. positives not found in the gallery).
        created: UTC time of the run (ISO 8601).
    """

    protocol: str
    split: str
    primary_metric: str
    metrics: dict[str, float]
    per_query: dict[str, list[Any]]
    groups: dict[str, dict[str, dict[str, float]]]
    method: dict[str, Any]
    mode: str
    k: int
    candidates: int
    queries: int
    gallery_rows: int
    timings: dict[str, Any]
    environment: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    created: str = ""

    @property
    def primary(self) -> float:
        """The value of the primary metric."""
        return self.metrics[self.primary_metric]

    @property
    def label(self) -> str:
        """``method name · mode`` (the row name in tables)."""
        return f"{self.method.get('name', '?')} · {self.mode}"

    def to_dict(self) -> dict[str, Any]:
        return {"format": RESULT_FORMAT, "format_version": RESULT_VERSION, **asdict(self)}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the result as JSON (atomically)."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=1, default=_json_default) + "\n"
        atomic_write(path, lambda f: f.write(text.encode()))
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "result") -> EvalResult:
        """Inverse of :meth:`to_dict`.

        Raises:
            QuARIInputError: not a quari evaluation result, or one from a newer quari.
        """
        if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
            raise QuARIInputError(
                f'{where}: not a quari evaluation result ("format": "{RESULT_FORMAT}")'
            )
        if int(data.get("format_version", 0)) > RESULT_VERSION:
            raise QuARIInputError(f"{where}: written by a newer quari; upgrade to read it")
        fields = {k: v for k, v in data.items() if k not in ("format", "format_version")}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise QuARIInputError(f"{where}: malformed evaluation result ({exc})") from None


def load_results(path: str | os.PathLike[str]) -> list[EvalResult]:
    """Reads a result file written by ``quari eval`` (one result, or a list of them)."""
    path = Path(path)
    if not path.is_file():
        raise QuARIInputError(f"{path}: no such result file")
    data = read_json(path, QuARIInputError)
    items = data.get("results", [data]) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise QuARIInputError(f"{path}: expected one evaluation result or a list of them")
    return [EvalResult.from_dict(item, f"{path} [{i}]") for i, item in enumerate(items)]


def save_results(results: Sequence[EvalResult], path: str | os.PathLike[str]) -> Path:
    """Writes several results as ``{"results": [...]}`` (what ``quari eval --out`` writes)."""
    path = Path(path)
    payload = {"results": [r.to_dict() for r in results]}
    text = json.dumps(payload, indent=1, default=_json_default) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Facts about where a run happened (versions, CPU, threads, device)."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.device(device)
    return {
        "quari": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def describe_method(adapter: QueryAdapter | None, name: str | None = None) -> dict[str, Any]:
    """A JSON-ready description of an adapter: ``name``, ``kind`` and its shape facts
    (``rank``, ``steps``, ``hidden_dim``, ``layers``, ``variant`` for QuARI, and the
    ``blend_weight`` it scores with when it has a static blend; ``out_dim`` for a linear
    adapter), plus the adapter's own ``metadata`` (training data, metrics …)."""
    if adapter is None or isinstance(adapter, CosineAdapter):
        return {"name": name or "cosine", "kind": "cosine"}
    meta = dict(getattr(adapter, "metadata", {}) or {})
    desc: dict[str, Any] = {"kind": meta.pop("adapter", None) or "quari"}
    config = getattr(adapter, "config", None)
    if config is not None and hasattr(config, "rank"):
        desc.update(
            kind="quari",
            rank=config.rank,
            steps=config.num_steps,
            hidden_dim=config.hidden_dim,
            layers=config.num_layers,
            variant=config.variant,
        )
        weight = getattr(adapter, "blend_weight", 0.0)
        if weight or getattr(config, "blend_weight", 0.0):
            desc["blend_weight"] = weight  # the weight it scored with (set_blend_weight's)
    if hasattr(adapter, "out_dim"):
        desc["out_dim"] = int(adapter.out_dim)
    desc["name"] = name or desc["kind"]
    desc["metadata"] = {k: v for k, v in meta.items() if k != "metrics"}
    return desc


def group_means(
    per_query: dict[str, np.ndarray],
    labels: Sequence[str],
    *,
    units: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Mean of every metric per group label.

    Args:
        per_query: Metric name → (Q,) values.
        labels: One group label per query.
        units: Optional unit per query (ILIAS: the instance). Given, every unit's queries are
            averaged first and the group mean is over units, as ILIAS's category tables do.

    Returns:
        Label → {metric: mean, ``"queries"``: count (``"units"`` too when given)}.
    """
    labels = np.asarray(labels, dtype=object)
    out: dict[str, dict[str, float]] = {}
    for label in sorted(set(labels.tolist()), key=str):
        sel = labels == label
        entry: dict[str, float] = {"queries": int(sel.sum())}
        if units is None:
            entry.update({m: float(v[sel].mean()) for m, v in per_query.items()})
        else:
            unit_of = np.asarray(units, dtype=object)[sel]
            names = sorted(set(unit_of.tolist()), key=str)
            entry["units"] = len(names)
            for m, v in per_query.items():
                vals = v[sel]
                entry[m] = float(np.mean([vals[unit_of == u].mean() for u in names]))
        out[str(label)] = entry
    return out


class Evaluator(ABC):
    """One protocol's queries, gallery and metrics; :meth:`evaluate` runs a method.

    Subclasses set :attr:`protocol`, :attr:`primary_metric`, :attr:`metrics` and the cut-off
    :attr:`k`, and implement :meth:`load_queries` (and :attr:`gallery`).

    Attributes:
        split: The query split evaluated.
        ties: How tied scores count (``"sklearn"``: one threshold, as the official code).
        fixed_candidates: Every query's candidates are fixed by the protocol (re-ranking
            benchmarks): the mode then changes nothing but the scores.
    """

    protocol: ClassVar[str] = ""
    primary_metric: ClassVar[str] = ""
    metrics: tuple[str, ...] = ()
    fixed_candidates: ClassVar[bool] = False

    def __init__(self, *, split: str, k: int, ties: Ties = "sklearn") -> None:
        self.split = split
        self.k = int(k)
        self.ties = ties
        self._queries: QuerySet | None = None
        self.notes: list[str] = []

    @property
    @abstractmethod
    def gallery(self) -> EmbeddingSet:
        """The embedding set searched."""

    @abstractmethod
    def load_queries(self, encoder: Encoder | None = None) -> QuerySet:
        """The labelled queries (embedded with ``encoder`` when they are texts or images)."""

    def queries(self, encoder: Encoder | None = None) -> QuerySet:
        """The queries, loaded once."""
        if self._queries is None:
            self._queries = self.load_queries(encoder)
        return self._queries

    def groups_of(
        self, per_query: dict[str, np.ndarray], queries: QuerySet
    ) -> dict[str, dict[str, dict[str, float]]]:
        """Per-group breakdowns (default: plain means per label of every group field)."""
        return {name: group_means(per_query, labels) for name, labels in queries.groups.items()}

    def evaluate(
        self,
        model: QueryAdapter | Retriever | None = None,
        *,
        mode: str = "plain",
        name: str | None = None,
        method: dict[str, Any] | None = None,
        encoder: Encoder | None = None,
        index: CandidateIndex | None = None,
        gallery: EmbeddingSet | None = None,
        candidates: int = 1000,
        batch_size: int = 32,
        device: str = "cpu",
        progress: bool = False,
        max_queries: int | None = None,
    ) -> EvalResult:
        """Runs every query through a :class:`~quari.retriever.Retriever` and scores it.

        Args:
            model: A query adapter (QuARI model, linear adapter, baseline), a ready
                ``Retriever`` over this evaluator's gallery, or None (plain cosine).
            mode: ``plain``, ``rerank``, ``adaptive`` or ``scan``.
            name: The method's display name (default: its kind).
            method: Extra description merged into the result's ``method`` (e.g. the spec).
            encoder: Embeds text/image queries (protocols whose queries are not embeddings).
            index: Candidate index over the gallery (None: small galleries are scanned).
            gallery: Another set with the same rows in the same order (a DBA-transformed copy).
            candidates: K, index candidates per query.
            batch_size: Queries searched together.
            device: Torch device for the adapter and scoring.
            progress: Show a progress bar.
            max_queries: Evaluate only the first this many queries (quick runs; the result
                records the count, and a note says the split was cut).

        Returns:
            The :class:`EvalResult`.
        """
        if mode not in MODES:
            raise QuARIInputError(f"mode must be one of {MODES}, got {mode!r}")
        t_start = time.perf_counter()
        queries = self.queries(encoder)
        notes = list(self.notes)
        if max_queries is not None and max_queries < len(queries):
            if max_queries < 1:
                raise QuARIInputError(f"max_queries must be positive, got {max_queries}")
            notes.append(f"only the first {max_queries} of {len(queries)} queries evaluated")
            queries = queries.subset(range(max_queries))
        if len(queries) == 0:
            raise QuARIInputError(f"{self.protocol} ({self.split}): no queries to evaluate")
        eset = gallery if gallery is not None else self.gallery
        if eset.rows != self.gallery.rows:
            raise QuARIInputError(
                f"the replacement gallery {eset.root} has {eset.rows} rows, the protocol's "
                f"{self.gallery.rows}: it must hold the same rows in the same order"
            )
        if isinstance(model, Retriever):
            retriever, adapter = model, model.model
        else:
            adapter = model if model is not None else CosineAdapter(eset.dim, eset.encoder)
            retriever = Retriever(eset, adapter, index, device=device, batch_size=batch_size)
        ids, scores, stages, search_s = self._search(
            retriever, queries, mode, candidates, batch_size, progress
        )
        t_metric = time.perf_counter()
        rel, _ = relevance_matrix(ids, queries.relevant)
        per_query = per_query_metrics(
            rel, queries.n_relevant, self.metrics, scores=scores, ties=self.ties
        )
        groups = self.groups_of(per_query, queries)
        metric_s = time.perf_counter() - t_metric
        Q = len(queries)
        description = describe_method(adapter, name)
        description.update(method or {})
        timings = {
            "encode_s": queries.encode_seconds,
            "search_s": search_s,
            "metric_s": metric_s,
            "wall_s": time.perf_counter() - t_start,
            "per_query_ms": 1e3 * search_s / Q,
            "stages_ms": {s: 1e3 * stages[s] / Q for s in STAGES},
            "batch_size": batch_size,
        }
        return self.result(
            queries, per_query, groups, description, mode, candidates, eset.rows, timings,
            notes, device,
        )  # fmt: skip

    def result(
        self,
        queries: QuerySet,
        per_query: dict[str, np.ndarray],
        groups: dict[str, dict[str, dict[str, float]]],
        method: dict[str, Any],
        mode: str,
        candidates: int,
        gallery_rows: int,
        timings: dict[str, Any],
        notes: list[str],
        device: str = "cpu",
    ) -> EvalResult:
        """Assembles the :class:`EvalResult` of per-query metric values of ``queries``."""
        return EvalResult(
            protocol=self.protocol,
            split=self.split,
            primary_metric=self.primary_metric,
            metrics={m: float(v.mean()) for m, v in per_query.items()},
            per_query={
                "query_id": list(queries.ids),
                **{m: v.tolist() for m, v in per_query.items()},
            },
            groups=groups,
            method=method,
            mode=mode,
            k=self.k,
            candidates=candidates,
            queries=len(queries),
            gallery_rows=gallery_rows,
            timings=timings,
            environment=environment(device),
            notes=notes,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )

    def _search(
        self,
        retriever: Retriever,
        queries: QuerySet,
        mode: str,
        candidates: int,
        batch_size: int,
        progress: bool,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, float], float]:
        """(ids, scores) of every query, the summed stage timings and the search seconds."""
        Q, k = len(queries), self.k
        ids = np.full((Q, k), -1, dtype=np.int64)
        scores = np.full((Q, k), -np.inf, dtype=np.float32)
        stages = dict.fromkeys(STAGES, 0.0)
        # Fixed per-query candidates go one query at a time (each has its own filter).
        step = 1 if queries.selections is not None else batch_size
        bar = tqdm(total=Q, desc=f"{self.protocol} · {mode}", unit="q", disable=not progress)
        t0 = time.perf_counter()
        for start in range(0, Q, step):
            part = slice(start, start + step)
            where = queries.selections[start] if queries.selections is not None else None
            result = retriever.search(
                queries.embeddings[part],
                k,
                mode=mode,
                candidates=candidates,
                where=where,
                with_metadata=False,
            )
            width = result.ids.shape[1]  # min(k, rows): the retriever never pads past its set
            ids[part, :width], scores[part, :width] = result.ids, result.scores
            for stage, seconds in result.timings.items():
                stages[stage] = stages.get(stage, 0.0) + seconds
            bar.update(result.ids.shape[0])
        search_s = time.perf_counter() - t0
        bar.close()
        return ids, scores, stages, search_s
