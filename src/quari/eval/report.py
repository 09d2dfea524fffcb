"""Reports from evaluation results: markdown tables and PNG plots (``quari eval report``).

From any number of result files (``quari eval --out``) :func:`write_report` writes
``report.md`` and, per protocol and split:

* ``<protocol>-<split>-methods.png`` — the primary metric per method · mode (bars);
* ``<protocol>-<split>-latency.png`` — the primary metric against the search time per query
  (log x), like the paper's Figure 4;
* ``<protocol>-<split>-rank.png`` / ``-steps.png`` — the primary metric against the QuARI
  models' rank r / refinement steps L, when the results hold models that differ in it.

Beside each protocol's table it puts every method's difference from a baseline (by default the
frozen backbone, the ``plain`` result) on the primary metric, with a 95 % confidence interval
from a paired bootstrap over the queries both were asked (:func:`compare`): with a few hundred
queries a gain of a few per cent is often inside it, and the report says so.

The tables print AP, nDCG, precision and recall ×100 and MRR as a fraction, as the INQUIRE and
ILIAS papers do. Plots need matplotlib (the ``[eval]`` extra); it runs on the Agg backend, so no
display is needed.

Example:
    >>> write_report(load_results("results.json"), "report/")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quari.errors import QuARIInputError, missing_extra
from quari.eval.protocols.base import EvalResult
from quari.fileio import atomic_write

__all__ = [
    "Comparison",
    "compare",
    "comparison_table",
    "format_value",
    "plot_results",
    "results_table",
    "write_report",
]


def format_value(metric: str, value: float) -> str:
    """MRR as a fraction (0.571), every other metric ×100 (35.6)."""
    return f"{value:.3f}" if metric.lower().startswith(("mrr", "rr")) else f"{100 * value:.1f}"


def _by_protocol(results: Sequence[EvalResult]) -> dict[tuple[str, str], list[EvalResult]]:
    groups: dict[tuple[str, str], list[EvalResult]] = defaultdict(list)
    for r in results:
        groups[(r.protocol, r.split)].append(r)
    return dict(groups)


def results_table(results: Sequence[EvalResult]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of one protocol's results: method, mode, every metric, ms per query."""
    metrics: list[str] = []
    for r in results:
        metrics += [m for m in r.metrics if m not in metrics]
    header = ["method", "mode", *metrics, "ms / query", "queries"]
    rows = []
    for r in results:
        rows.append(
            [str(r.method.get("name", "?")), r.mode]
            + [format_value(m, r.metrics[m]) if m in r.metrics else "–" for m in metrics]
            + [f"{r.timings.get('per_query_ms', float('nan')):.2f}", str(r.queries)]
        )
    return header, rows


@dataclass(frozen=True)
class Comparison:
    """One method against a baseline on one metric, over the queries both answered.

    Attributes:
        metric: The compared metric (per-query values, as fractions).
        delta: Mean over the shared queries of (method − baseline).
        low, high: The ``confidence`` interval of ``delta`` (paired bootstrap over queries).
        confidence: The interval's level (0.95 by default).
        queries: The number of shared queries.
        relative: ``delta`` over the baseline's mean on those queries (``nan`` at 0).
    """

    metric: str
    delta: float
    low: float
    high: float
    confidence: float
    queries: int
    relative: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0: the difference is unlikely to be the queries' luck."""
        return self.low > 0 or self.high < 0


def compare(
    result: EvalResult,
    baseline: EvalResult,
    *,
    metric: str | None = None,
    confidence: float = 0.95,
    resamples: int = 9999,
    seed: int = 0,
) -> Comparison:
    """How much ``result`` beats ``baseline`` on ``metric``, with a paired bootstrap interval.

    Queries are matched by id, so two runs over the same query set compare query by query
    (the paired test: the per-query differences are resampled, which removes the spread that
    comes from some queries being hard for every method). The interval is SciPy's BCa
    bootstrap of the mean difference, seeded, so a report is reproducible.

    Args:
        result: The method's result.
        baseline: What it is compared with (e.g. the frozen backbone's ``plain`` result).
        metric: A per-query metric both hold (default: ``result``'s primary metric).
        confidence: Level of the interval.
        resamples: Bootstrap resamples.
        seed: Seed of the resampling.

    Returns:
        A :class:`Comparison`.

    Raises:
        QuARIInputError: the metric is missing from either result, or they share no query.

    Example:
        >>> c = compare(model_result, cosine_result)  # doctest: +SKIP
        >>> f"{100 * c.delta:+.1f} [{100 * c.low:+.1f}, {100 * c.high:+.1f}]"  # doctest: +SKIP
        '+2.3 [+0.4, +4.1]'
    """
    metric = metric or result.primary_metric
    values = []
    for r, role in ((result, "result"), (baseline, "baseline")):
        if metric not in r.per_query or "query_id" not in r.per_query:
            raise QuARIInputError(f"{role} {r.label}: no per-query {metric!r} to compare")
        values.append(dict(zip(r.per_query["query_id"], r.per_query[metric], strict=True)))
    shared = [q for q in values[1] if q in values[0]]  # the baseline's order: reproducible
    if not shared:
        raise QuARIInputError(
            f"{result.label} and {baseline.label} share no query id: nothing to compare"
        )
    ours = np.array([values[0][q] for q in shared], dtype=np.float64)
    base = np.array([values[1][q] for q in shared], dtype=np.float64)
    diff = ours - base
    delta = float(diff.mean())
    if np.ptp(diff) == 0:  # every query moved by the same amount (often 0): no spread to resample
        low = high = delta
    else:
        from scipy.stats import bootstrap  # the [eval] extra; only reports need it

        ci = bootstrap(
            (diff,), np.mean, n_resamples=resamples, confidence_level=confidence,
            method="BCa", rng=np.random.default_rng(seed),
        ).confidence_interval  # fmt: skip
        low, high = float(ci.low), float(ci.high)
    mean_base = float(base.mean())
    relative = delta / mean_base if mean_base else float("nan")
    return Comparison(metric, delta, low, high, confidence, len(shared), relative)


def comparison_table(
    results: Sequence[EvalResult], baseline: EvalResult
) -> tuple[list[str], list[list[str]]]:
    """(header, rows): each result other than ``baseline`` against it on its primary metric —
    the difference (in the table's units), its relative size, the interval, and whether the
    interval excludes 0 (a row of dashes where they share no query)."""
    metric = baseline.primary_metric
    header = ["method", "mode", f"Δ {metric}", "relative", "95 % interval", "beyond chance"]
    rows = []
    for r in results:
        if r is baseline:
            continue
        try:
            c = compare(r, baseline, metric=metric)
        except QuARIInputError:  # other queries (e.g. a --max-queries run): nothing to pair
            name = str(r.method.get("name", "?"))
            rows.append([name, r.mode, "–", "–", "–", "no shared queries"])
            continue
        verdict = "no" if not c.significant else ("better" if c.delta > 0 else "worse")
        rows.append(
            [
                str(r.method.get("name", "?")),
                r.mode,
                _signed(metric, c.delta),
                f"{100 * c.relative:+.1f} %".replace("-", "−"),
                f"[{_signed(metric, c.low)}, {_signed(metric, c.high)}]",
                verdict,
            ]
        )
    return header, rows


def _signed(metric: str, value: float) -> str:
    text = format_value(metric, abs(value))
    return ("−" if value < 0 and float(text) != 0 else "+") + text


def _baseline(results: Sequence[EvalResult], name: str | None) -> EvalResult | None:
    """The result named ``name`` (any mode; ``plain`` first), else the first ``plain`` one."""
    plain_first = sorted(results, key=lambda r: r.mode != "plain")
    if name is not None:
        return next((r for r in plain_first if r.method.get("name") == name), None)
    return next((r for r in results if r.mode == "plain"), None)


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "result"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise missing_extra("report plots", "eval", exc) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_results(results: Sequence[EvalResult], out: Path, stem: str) -> list[Path]:
    """Draws the plots of one protocol's results (module docstring); returns the files."""
    plt = _pyplot()
    metric = results[0].primary_metric
    label = f"{metric} (×100)" if not metric.startswith("mrr") else metric
    scale = 1.0 if metric.startswith("mrr") else 100.0
    written = []

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(results) + 2), 3.6), dpi=100)
    names = [r.label for r in results]
    values = [scale * r.primary for r in results]
    ax.bar(range(len(values)), values, color="#4477aa")
    ax.set_xticks(range(len(values)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(label)
    ax.set_title(f"{results[0].protocol} ({results[0].split})")
    for x, v in enumerate(values):
        ax.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=7)
    written.append(_save(fig, plt, out / f"{stem}-methods.png"))

    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=100)
    methods = list(dict.fromkeys(str(r.method.get("name", "?")) for r in results))
    markers = {"plain": "o", "rerank": "s", "adaptive": "^", "scan": "D"}
    colours = plt.get_cmap("tab10")
    for r in results:
        ms = max(float(r.timings.get("per_query_ms", 0.0)), 1e-3)
        name = str(r.method.get("name", "?"))
        ax.scatter(
            [ms],
            [scale * r.primary],
            s=40,
            label=r.label,
            marker=markers.get(r.mode, "o"),
            color=colours(methods.index(name) % 10),
        )
    ax.set_xscale("log")
    ax.set_xlabel("search time per query (ms, log scale)")
    ax.set_ylabel(label)
    ax.set_title(f"{results[0].protocol}: accuracy vs. cost")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    written.append(_save(fig, plt, out / f"{stem}-latency.png"))

    for field in ("rank", "steps"):
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in results:
            if isinstance(r.method.get(field), (int, float)):
                series[r.mode].append((float(r.method[field]), scale * r.primary))
        if not any(len({x for x, _ in pts}) > 1 for pts in series.values()):
            continue
        fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=100)
        for mode, pts in sorted(series.items()):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=mode)
        ax.set_xlabel("rank r" if field == "rank" else "refinement steps L")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.set_title(f"{results[0].protocol}: {metric} vs {field}")
        written.append(_save(fig, plt, out / f"{stem}-{field}.png"))
    return written


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


def write_report(
    results: Sequence[EvalResult],
    out: str | os.PathLike[str],
    *,
    plots: bool = True,
    baseline: str | None = None,
) -> Path:
    """Writes ``report.md`` (and the PNGs) into ``out``.

    Args:
        results: Results of any protocols (grouped by protocol and split in the report).
        out: Output folder (created).
        plots: Draw the plots (needs matplotlib).
        baseline: Method name every other result is compared with, per protocol and split
            (:func:`compare`; needs SciPy, the ``[eval]`` extra). Default: the first ``plain``
            result there (the frozen backbone); no comparison where there is none.

    Returns:
        The path of ``report.md``.

    Raises:
        QuARIInputError: no results, or ``baseline`` names no method in any protocol.
    """
    if not results:
        raise QuARIInputError("no results to report")
    if baseline is not None and not any(r.method.get("name") == baseline for r in results):
        names = sorted({str(r.method.get("name", "?")) for r in results})
        raise QuARIInputError(f"baseline {baseline!r} is none of the methods {names}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# quari evaluation report", ""]
    for (protocol, split), rs in sorted(_by_protocol(results).items()):
        stem = _slug(f"{protocol}-{split}")
        first = rs[0]
        lines += [
            f"## {protocol} ({split})",
            "",
            f"{first.queries} queries over {first.gallery_rows:,} gallery rows; k = {first.k}; "
            f"primary metric **{first.primary_metric}**. AP, nDCG, P and R ×100; MRR as a "
            "fraction; time = search per query (encoding excluded).",
            "",
            *_markdown(*results_table(rs)),
            "",
        ]
        base = _baseline(rs, baseline)
        if base is not None and len(rs) > 1:
            lines += [
                f"**Against {base.label}**: the difference in {first.primary_metric} over the "
                "queries both answered, with a 95 % interval from a paired bootstrap over "
                "queries; *beyond chance* when the interval excludes 0.",
                "",
                *_markdown(*comparison_table(rs, base)),
                "",
            ]
        fields = sorted({f for r in rs for f in r.groups})
        for field in fields:
            labels = sorted({label for r in rs for label in r.groups.get(field, {})})
            header = ["method", "mode", *labels]
            rows = [
                [str(r.method.get("name", "?")), r.mode]
                + [
                    format_value(r.primary_metric, r.groups[field][g][r.primary_metric])
                    if g in r.groups.get(field, {})
                    else "–"
                    for g in labels
                ]
                for r in rs
            ]
            lines += [f"**{first.primary_metric} by {field}**", "", *_markdown(header, rows), ""]
        notes = sorted({n for r in rs for n in r.notes})
        lines += [f"- note: {n}" for n in notes] + ([""] if notes else [])
        if plots:
            for path in plot_results(rs, out, stem):
                lines += [f"![{path.stem}]({path.name})", ""]
    env = results[0].environment
    lines += [
        "---",
        f"quari {env.get('quari')}, torch {env.get('torch')}, {env.get('cpu')} "
        f"(torch threads: {env.get('torch_threads')}), device {env.get('device')}.",
        "",
    ]
    text = "\n".join(lines)
    path = out / "report.md"
    atomic_write(path, lambda f: f.write(text.encode()))
    return path
