"""Fashion-MNIST tracks: build time per size, and the frozen backbone's scores on them.

Builds the tracks (:func:`quari.eval.tracks.build_fashion_tracks`) at the given size, then a
second time into the same folder (everything reused), and scores plain cosine over the stored
embeddings — brute force in numpy — on both tracks' val and test splits:

* mAP@100 (AP@k = Σ_{i≤k} P@i·rel_i / min(R, k)), recall@10 and the number of queries;
* for text→image, the same split by how many attributes a query states (1/2/3);
* references: *chance* (a random ranking) and, for text→image, a *class oracle* (every image
  of the query's class first, in random order) — what knowing the class alone is worth — and a
  *probe ranker*: logistic-regression probes for the class and for every (class, attribute
  level), fitted on the train set's image embeddings and its metadata, ranking the gallery by
  the product of the probabilities a query asks for. It reads the same 384-d gallery vectors
  cosine does, so it shows how much of the attributes those vectors still carry — room a
  query-adaptive model can use (it is supervised with labels, not a baseline for QuARI).

Usage::

    python benchmarks/bench_tracks.py --size small            # ~1 min on 2 idle cores
    python benchmarks/bench_tracks.py --size full --out /tmp/tracks-full

Writes ``benchmarks/results/bench_tracks_<size>.json`` (or ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import machine
from quari.eval.tracks import SIZES, build_fashion_tracks, load_fashion_mnist
from quari.eval.tracks.plan import plan_tracks
from quari.store import EmbeddingSet

RESULTS = Path(__file__).resolve().parent / "results"
K = 100


def average_precision(order: np.ndarray, relevant: np.ndarray, k: int = K) -> float:
    hit = np.isin(order[:k], relevant)
    if not hit.any():
        return 0.0
    precision = np.cumsum(hit) / np.arange(1, hit.size + 1)
    return float((precision * hit).sum() / min(relevant.size, k))


def score(folder: Path, rng: np.random.Generator) -> dict:
    gallery = EmbeddingSet.open(folder / "gallery")
    g = gallery.gather(np.arange(gallery.rows)).astype(np.float32)
    table = pq.read_table(folder / "queries.parquet").to_pydict()
    q = np.array(table["embedding"], np.float32)
    relevant = [np.asarray(r) for r in table["relevant"]]
    order = np.argsort(-(q @ g.T), axis=1, kind="stable")
    ap = np.array([average_precision(o, r) for o, r in zip(order, relevant, strict=True)])
    recall10 = np.array([np.isin(r, o[:10]).mean() for o, r in zip(order, relevant, strict=True)])
    chance = [average_precision(rng.permutation(g.shape[0]), r) for r in relevant]
    out = {
        "queries": len(relevant),
        "gallery": int(gallery.rows),
        "relevant_mean": float(np.mean([r.size for r in relevant])),
        "map@100": float(ap.mean()),
        "recall@10": float(recall10.mean()),
        "chance_map@100": float(np.mean(chance)),
        "per_query_ap": ap,
    }
    if "class_name" in gallery.metadata([0]).column_names:
        names = np.array(gallery.metadata(np.arange(gallery.rows))["class_name"].to_pylist())
        oracle = []
        for group, r in zip(table["group"], relevant, strict=True):
            key = (names != group) + rng.random(names.size)  # the class first, shuffled
            oracle.append(average_precision(np.argsort(key, kind="stable"), r))
        out["class_oracle_map@100"] = float(np.mean(oracle))
    return out


def probe_ranker(out: Path, queries: list, split: str) -> float:
    """mAP@100 of the probe ranker (module docstring) on a text→image split."""
    from sklearn.linear_model import LogisticRegression

    from quari.eval.tracks.attributes import ATTRIBUTES

    train = EmbeddingSet.open(out / "train")
    meta = train.metadata(np.arange(train.rows)).to_pydict()
    _, first = np.unique(np.asarray(meta["item"]), return_index=True)  # one row per image
    x = train.gather(first).astype(np.float32)
    gallery = EmbeddingSet.open(out / "t2i" / split / "gallery")
    g = gallery.gather(np.arange(gallery.rows)).astype(np.float32)
    labels = np.asarray(meta["label"])[first]
    log_p = {}
    probe = LogisticRegression(C=10, max_iter=3000).fit(x, labels)
    log_p["label"] = dict(zip(probe.classes_.tolist(), np.log(probe.predict_proba(g) + 1e-9).T,
                              strict=True))  # fmt: skip
    for a in ATTRIBUTES:
        y = [f"{c}|{v}" for c, v in zip(labels, np.asarray(meta[a.name])[first], strict=True)]
        probe = LogisticRegression(C=10, max_iter=3000).fit(x, y)
        log_p[a.name] = dict(zip(probe.classes_, np.log(probe.predict_proba(g) + 1e-9).T,
                                 strict=True))  # fmt: skip
    values = {a.name: a.values for a in ATTRIBUTES}
    aps = []
    for q in queries:
        s = log_p["label"][q.label].copy()
        for name, level in q.attributes:
            s += log_p[name][f"{q.label}|{values[name][level]}"]
        aps.append(average_precision(np.argsort(-s, kind="stable"), q.relevant))
    return float(np.mean(aps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="track folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="result file")
    args = ap.parse_args()
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="quari-tracks-")
        args.out = Path(tmp.name) / args.size

    load_before = os.getloadavg()
    t = time.perf_counter()
    info = build_fashion_tracks(args.out, size=args.size, seed=args.seed)
    first = time.perf_counter() - t
    load_after = os.getloadavg()
    t = time.perf_counter()
    build_fashion_tracks(args.out, size=args.size, seed=args.seed, progress=False)
    rerun = time.perf_counter() - t

    plan = plan_tracks(load_fashion_mnist(), SIZES[args.size], args.seed)
    rng = np.random.default_rng(0)
    results: dict = {}
    rows = []
    for track in ("t2i", "i2i"):
        for split in ("val", "test"):
            r = score(args.out / track / split, rng)
            per_query = r.pop("per_query_ap")
            if track == "t2i":
                counts = np.array([len(q.attributes) for q in plan.queries[split]])
                texts = pq.read_table(args.out / track / split / "queries.parquet")["label"]
                assert texts.to_pylist() == plan.query_texts[split], "plan and build disagree"
                r["map@100_by_attributes"] = {
                    str(k): float(per_query[counts == k].mean()) for k in (1, 2, 3)
                }
                r["probe_ranker_map@100"] = probe_ranker(args.out, plan.queries[split], split)
            results[f"{track}/{split}"] = r
            rows.append((f"{track}/{split}", r))

    print(f"\nFashion-MNIST tracks, size {args.size!r} (seed {args.seed}), {info['encoder']}")
    print(f"build: {first:.1f} s wall ({info['seconds']}); rerun: {rerun:.2f} s\n")
    print(f"{'track/split':12} {'queries':>7} {'gallery':>7} {'rel':>6} {'mAP@100':>8} "
          f"{'R@10':>6} {'chance':>7} {'class-oracle':>12} {'probe':>6}  "
          "mAP@100 by #attributes (1/2/3)")  # fmt: skip
    for name, r in rows:
        by = r.get("map@100_by_attributes")
        print(
            f"{name:12} {r['queries']:7d} {r['gallery']:7d} {r['relevant_mean']:6.1f} "
            f"{r['map@100']:8.3f} {r['recall@10']:6.3f} {r['chance_map@100']:7.3f} "
            f"{r.get('class_oracle_map@100', float('nan')):12.3f} "
            f"{r.get('probe_ranker_map@100', float('nan')):6.3f}  "
            + ("/".join(f"{by[k]:.3f}" for k in ("1", "2", "3")) if by else "")
        )
    report = {
        "machine": machine(),
        "note": "shared 2-core machine; other jobs may have run at the same time",
        "load_average_1_5_15min": {"before_build": load_before, "after_build": load_after},
        "size": args.size,
        "seed": args.seed,
        "encoder": info["encoder"],
        "sizes": info["sizes"],
        "build_seconds": round(first, 2),
        "build_steps_seconds": info["seconds"],
        "rerun_seconds": round(rerun, 2),
        "head": info["head"],
        "frozen_cosine": results,
    }
    path = args.json or RESULTS / f"bench_tracks_{args.size}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
