"""The demo's metric table and its self-contained ``report.html``.

The page holds: the metric table of each track (every method and mode, AP@100's relative gain
over cosine), the showcase queries (:mod:`quari.demo.showcase`) with the baseline's and QuARI's
top results side by side — relevant ones framed in green with a ✓ —, the plots ``quari eval
report`` drew, and the stages' timings. Every link is relative (thumbnails in the tracks'
``images/``, plots in ``eval/``), so the file works opened from disk, and nothing is fetched
from the network. Table cells carry ``data-*`` attributes with the raw values (tests read them).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from quari.eval.protocols import EvalResult
from quari.eval.report import compare, format_value
from quari.fileio import atomic_write

__all__ = [
    "HEADLINE_MODE",
    "METRIC_NAMES",
    "TRACKS",
    "TRACK_TITLES",
    "demo_table",
    "gain_text",
    "write_page",
]

TRACKS = ("t2i", "i2i")
TRACK_TITLES = {
    "t2i": "text → image: a class and 1–3 attributes measured from the pixels",
    "i2i": "image → image: other views (crop, rotation, contrast, noise) of the same item",
}
#: QuARI's mode in the showcase (the default of ``quari search`` and ``quari serve``).
HEADLINE_MODE = "adaptive"
METRIC_NAMES = {"ap@100": "AP@100", "ndcg@100": "nDCG@100", "mrr": "MRR", "p@10": "P@10",
                "r@100": "R@100"}  # fmt: skip


def demo_table(results: list[EvalResult]) -> list[dict[str, Any]]:
    """One row per track × method × mode: the metrics, ms per query and the relative gain of
    the primary metric over plain cosine on the same track (None for cosine itself), with
    ``beyond_chance``: whether the 95 % paired-bootstrap interval of the difference excludes 0
    (:func:`quari.eval.report.compare`; None for cosine).

    Example:
        >>> rows = demo_table(load_results("demo-out/eval/results.json"))  # doctest: +SKIP
        >>> rows[0]["track"], rows[0]["method"], rows[0]["metrics"]["ap@100"]  # doctest: +SKIP
        ('t2i', 'cosine', 0.1098)
    """
    base = {r.split: r for r in results if r.method.get("kind") == "cosine" and r.mode == "plain"}
    rows = []
    for r in results:
        cosine = base[r.split].primary if r.split in base else None
        is_base = r.method.get("kind") == "cosine"
        beyond = None if is_base or not cosine else compare(r, base[r.split]).significant
        rows.append(
            {
                "track": r.split.removesuffix("-test"),
                "method": str(r.method.get("name")),
                "mode": r.mode,
                "primary": r.primary_metric,
                "metrics": dict(r.metrics),
                "ms_per_query": float(r.timings.get("per_query_ms", float("nan"))),
                "queries": r.queries,
                "gallery": r.gallery_rows,
                "gain": None if is_base or not cosine else r.primary / cosine - 1.0,
                "beyond_chance": beyond,
            }
        )
    return rows


def gain_text(row: dict[str, Any]) -> tuple[str, str]:
    """A row's gain over cosine as shown ("+14 %") and its verdict: ``"up"`` / ``"down"``
    beyond chance, ``"n.s."`` inside the interval, ``""`` for cosine itself."""
    if row["gain"] is None:
        return "", ""
    text = f"{100 * row['gain']:+.0f} %"
    if not row["beyond_chance"]:
        return text, "n.s."
    return text, "up" if row["gain"] > 0 else "down"


def _table_html(rows: list[dict[str, Any]], track: str) -> str:
    metrics = [m for m in METRIC_NAMES if any(m in r["metrics"] for r in rows)]
    head = "".join(f"<th>{METRIC_NAMES[m]}</th>" for m in metrics)
    body = []
    for r in (r for r in rows if r["track"] == track):
        cells = "".join(
            f'<td data-metric="{m}" data-value="{r["metrics"][m]:.6f}">'
            f"{format_value(m, r['metrics'][m])}</td>"
            for m in metrics
        )
        gain = "" if r["gain"] is None else f' data-value="{r["gain"]:.6f}"'
        text, verdict = gain_text(r)
        cls = verdict if verdict != "n.s." else ""
        text += " (n.s.)" if verdict == "n.s." else ""
        body.append(
            f'<tr data-track="{track}" data-method="{html.escape(r["method"])}" '
            f'data-mode="{r["mode"]}"><td>{html.escape(r["method"])}</td><td>{r["mode"]}</td>'
            f"{cells}<td>{r['ms_per_query']:.2f}</td>"
            f'<td class="gain {cls}" data-metric="gain"{gain}>{text}</td></tr>'
        )
    first = next(r for r in rows if r["track"] == track)
    return (
        f'<h3>{html.escape(TRACK_TITLES[track])}</h3><p class="small">{first["queries"]} test '
        f"queries over {first['gallery']:,} gallery images. AP, nDCG, P and R ×100; MRR as a "
        "fraction; ms = search time per query; n.s.: the difference from cosine is inside the "
        "95 % interval of a paired bootstrap over the queries (not beyond chance).</p>"
        f'<table class="metrics" data-track="{track}"><thead><tr><th>method</th><th>mode</th>'
        f"{head}<th>ms / query</th><th>AP@100 vs cosine</th></tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _hits_html(hits: list[dict[str, Any]]) -> str:
    figs = []
    for h in hits:
        rel = h["relevant"]
        figs.append(
            f'<figure class="hit{" rel" if rel else ""}" data-row="{h["row"]}" '
            f'data-relevant="{str(rel).lower()}"><img src="{html.escape(h["src"])}" '
            f'alt="row {h["row"]}" title="{html.escape(h["title"])}">'
            f"<figcaption>{'✓' if rel else '&nbsp;'}</figcaption></figure>"
        )
    return "".join(figs)


def _showcase_html(shown: list[dict[str, Any]]) -> str:
    parts = []
    for q in shown:
        if "text" in q:
            query = f'<div class="qtext">“{html.escape(q["text"])}”</div>'
        else:
            query = f'<img class="qimg" src="{html.escape(q["image"])}" alt="query view">'
        rows = []
        for name, hits in q["hits"].items():
            ap = q["ap"].get(name)
            score = "" if ap is None else f"AP@100 {100 * ap:.1f}"
            found = sum(h["relevant"] for h in hits)
            rows.append(
                f'<div class="run" data-method="{html.escape(name)}"><div class="who">'
                f"<b>{html.escape(name)}</b><br>{score}<br>{found} of {len(hits)} relevant"
                f'</div><div class="hits">{_hits_html(hits)}</div></div>'
            )
        parts.append(
            f'<section class="query" data-query-id="{html.escape(q["query_id"])}" '
            f'data-track="{q["track"]}"><div class="q">{query}<div class="small">'
            f"{html.escape(q['query_id'])} · {q['relevant']} relevant</div></div>"
            f"{''.join(rows)}</section>"
        )
    return "".join(parts)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0 1rem}td,th{padding:.25rem .6rem;
text-align:right;border-bottom:1px solid #eee}td:first-child,td:nth-child(2),th:first-child,
th:nth-child(2){text-align:left}.gain.up{color:#1a7f37;font-weight:600}.gain.down{color:#b42318}
.small{color:#666;font-size:.85rem}.query{display:grid;grid-template-columns:11rem 1fr;
gap:.4rem 1rem;border-top:1px solid #eee;padding:.6rem 0}.q{grid-row:span 2}
.qtext{font-weight:600}.qimg{width:84px;height:84px;image-rendering:pixelated;
border:3px solid #4477aa}.run{display:flex;gap:.6rem;align-items:flex-start}
.who{width:7.5rem;font-size:.8rem;flex:none}.hits{display:flex;flex-wrap:wrap;gap:4px}
.hit{margin:0;text-align:center;font-size:.8rem;color:#1a7f37}.hit img{width:56px;height:56px;
image-rendering:pixelated;border:3px solid #ccc;display:block;background:#000}
.hit.rel img{border-color:#1a7f37}.plots img{max-width:100%;margin:.5rem 0}
code{background:#f4f4f4;padding:.1rem .3rem}
"""


def write_page(
    path: Path, results: list[EvalResult], shown: list[dict[str, Any]], info: dict[str, Any]
) -> Path:
    """Writes ``report.html``.

    Args:
        path: The page (its folder is where every relative link starts).
        results: The evaluation results.
        shown: The showcase (:func:`~quari.demo.showcase.pick_showcase`).
        info: ``size``, ``sizes``, ``serve`` (the command), ``stages`` (stage records).

    Returns:
        ``path``.
    """
    path = Path(path)
    rows = demo_table(results)
    tracks = [t for t in TRACKS if any(r["track"] == t for r in rows)]
    plots = sorted((path.parent / "eval").glob("*.png"))
    plot_html = "".join(
        f'<img src="{html.escape(Path(os.path.relpath(p, path.parent)).as_posix())}" '
        f'alt="{html.escape(p.stem)}">'
        for p in plots
    )
    stages = "".join(
        f"<tr><td>{html.escape(s['name'])}</td><td>{'reused' if s['reused'] else 'ran'}</td>"
        f"<td>{s['wall_s']:.0f}</td><td>{s['cpu_s']:.0f}</td>"
        f"<td>{' → '.join(f'{x:.1f}' for x in s['load'])}</td></tr>"
        for s in info.get("stages", [])
    )
    sizes = info.get("sizes", {})
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>quari demo</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style>
</head><body>
<h1>quari demo: query-adaptive retrieval on Fashion-MNIST</h1>
<p>Size <b>{html.escape(str(info.get("size", "")))}</b>: {sizes.get("train", "?"):,} training
images, {sizes.get("test", "?"):,} test images at {sizes.get("resolution", "?")} px. Embeddings
come from the <code>offline</code> encoder (EfficientNet-Lite0 + all-MiniLM-L6-v2 joined by a
fitted linear head; <b>not CLIP</b>). <b>cosine</b> is the frozen backbone, <b>linear</b> a
static linear adapter trained on the same pairs, <b>static low-rank</b> the same kind of map as
QuARI's (identity plus a low-rank term, same rank) held fixed for every query, <b>QuARI</b> the
query-adaptive model.</p>
<h2>Results on the test queries</h2>
{"".join(_table_html(rows, t) for t in tracks)}
<h2>Test queries: top {_top(shown)} of cosine and of QuARI ({HEADLINE_MODE})</h2>
<p class="small">Queries evenly spaced through the test files (not chosen by outcome). Relevant
results have a green frame and a ✓; hover a thumbnail for its class and attributes.</p>
{_showcase_html(shown)}
<h2>Plots</h2><div class="plots">{plot_html}</div>
<h2>Stages</h2><table><thead><tr><th>stage</th><th></th><th>wall s</th><th>CPU s</th>
<th>load</th></tr></thead><tbody>{stages}</tbody></table>
<p>Search the test gallery yourself: <code>{html.escape(str(info.get("serve", "")))}</code></p>
</body></html>
"""
    atomic_write(path, lambda f: f.write(page.encode()))
    data = json.dumps({"table": rows, "showcase": shown}, indent=1, default=str) + "\n"
    atomic_write(path.with_suffix(".json"), lambda f: f.write(data.encode()))
    return path


def _top(shown: list[dict[str, Any]]) -> int:
    return max((len(h) for q in shown for h in q["hits"].values()), default=0)
