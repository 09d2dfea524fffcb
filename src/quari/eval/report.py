"""Reports from evaluation results: markdown tables and PNG plots (``quari eval report``).

From any number of result files (``quari eval --out``) :func:`write_report` writes
``report.md`` and, per protocol and split:

* ``<protocol>-<split>-methods.png`` — the primary metric per method · mode (bars);
* ``<protocol>-<split>-latency.png`` — the primary metric against the search time per query
  (log x), like the paper's Figure 4;
* ``<protocol>-<split>-rank.png`` / ``-steps.png`` — the primary metric against the QuARI
  models' rank r / refinement steps L, when the results hold models that differ in it.

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
from pathlib import Path
from typing import Any

from quari.errors import QuARIInputError, missing_extra
from quari.eval.protocols.base import EvalResult
from quari.fileio import atomic_write

__all__ = ["format_value", "plot_results", "results_table", "write_report"]


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
    results: Sequence[EvalResult], out: str | os.PathLike[str], *, plots: bool = True
) -> Path:
    """Writes ``report.md`` (and the PNGs) into ``out``.

    Args:
        results: Results of any protocols (grouped by protocol and split in the report).
        out: Output folder (created).
        plots: Draw the plots (needs matplotlib).

    Returns:
        The path of ``report.md``.
    """
    if not results:
        raise QuARIInputError("no results to report")
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
        f"({env.get('torch_threads')} threads), device {env.get('device')}.",
        "",
    ]
    text = "\n".join(lines)
    path = out / "report.md"
    atomic_write(path, lambda f: f.write(text.encode()))
    return path
