"""The test queries ``report.html`` shows, with the top results of the baseline and of QuARI.

Queries are taken evenly spaced through each track's test query file (no choosing by outcome):
two thirds text→image, one third image→image. Each gets the top results of plain cosine and of
QuARI (in the headline mode), every result with its thumbnail (a path relative to the report,
so the page works when opened from disk), its class and attributes, and whether it is
relevant; and each method's AP@100 for that query, from the evaluation results.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from quari.adapters import QueryAdapter
from quari.eval.protocols import EvalResult
from quari.eval.protocols.custom import read_custom_queries
from quari.eval.tracks import ATTRIBUTES
from quari.index import CandidateIndex
from quari.retriever import Retriever
from quari.store import EmbeddingSet

__all__ = ["pick_showcase", "spread"]


def spread(n_items: int, n: int) -> list[int]:
    """``n`` positions spread evenly over ``range(n_items)`` (all of them when fewer).

    Example:
        >>> spread(10, 4)
        [0, 3, 6, 9]
    """
    if n >= n_items:
        return list(range(n_items))
    return [int(i) for i in np.linspace(0, n_items - 1, n).round()]


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _per_query(results: list[EvalResult], split: str, name: str, mode: str) -> dict[str, float]:
    for r in results:
        if r.split == split and r.method.get("name") == name and r.mode == mode:
            return dict(zip(r.per_query["query_id"], r.per_query[r.primary_metric], strict=True))
    return {}


def pick_showcase(
    out: Path,
    tracks: Path,
    model: QueryAdapter,
    results: list[EvalResult],
    n: int,
    top: int,
    mode: str,
) -> list[dict[str, Any]]:
    """The showcase: ``n`` test queries, each with both methods' ``top`` results.

    Args:
        out: The report's folder (thumbnail paths are made relative to it).
        tracks: The tracks folder.
        model: The trained QuARI model.
        results: The evaluation results (for each query's AP).
        n: Queries shown.
        top: Results per method.
        mode: QuARI's retrieval mode.

    Returns:
        One dict per query: ``track``, ``query_id``, ``text`` or ``image`` (a path relative to
        ``out``), ``relevant`` (count), ``ap`` (method → AP), ``hits`` (method → list of
        ``{"row", "src", "title", "relevant"}``).
    """
    shown = []
    counts = {"t2i": n - n // 3, "i2i": n // 3}
    for track, count in counts.items():
        folder = tracks / track / "test"
        eset = EmbeddingSet.open(folder / "gallery")
        index = CandidateIndex.load(eset)
        queries = read_custom_queries(folder / "queries.parquet")
        picked = [queries[i] for i in spread(len(queries), count)]
        if not picked:
            continue
        vectors = np.stack([np.asarray(q["value"], np.float32) for q in picked])
        split = f"{track}-test"
        runs = {
            "cosine": (Retriever(eset, None, index), "plain"),
            "QuARI": (Retriever(eset, model, index), mode),
        }
        ranked = {
            name: retriever.search(vectors, top, mode=m, with_metadata=False).ids
            for name, (retriever, m) in runs.items()
        }
        ap = {name: _per_query(results, split, name, m) for name, (_, m) in runs.items()}
        rows = np.unique(np.concatenate([ids[ids >= 0] for ids in ranked.values()]))
        meta = eset.metadata(rows).to_pydict()
        info = {
            int(r): {
                "src": _rel(eset.root / meta["path"][i], out),
                "title": " · ".join(
                    [meta["class_name"][i]] + [str(meta[a.name][i]) for a in ATTRIBUTES]
                ),
            }
            for i, r in enumerate(rows)
        }
        for j, q in enumerate(picked):
            relevant = {int(x) for x in q["relevant"]}
            entry: dict[str, Any] = {
                "track": track,
                "query_id": q["query_id"],
                "relevant": len(relevant),
                "ap": {name: ap[name].get(q["query_id"]) for name in runs},
                "hits": {
                    name: [
                        {"row": int(r), **info[int(r)], "relevant": int(r) in relevant}
                        for r in ranked[name][j]
                        if r >= 0
                    ]
                    for name in runs
                },
            }
            if track == "i2i":  # the label is the query view's PNG, relative to the query file
                entry["image"] = _rel(folder / q["label"], out)
            else:
                entry["text"] = q["label"]
            shown.append(entry)
    return shown
