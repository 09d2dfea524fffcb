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

What limits a model that learns from the training captions alone, for text→image:

* *class oracle + cosine*: the query's class first, cosine order inside it — what knowing the
  class exactly is worth on top of cosine's own order;
* *probe class + cosine*: the class the image probe reads from the gallery vectors first (its
  accuracy is reported), cosine inside — what reading the class off these vectors is worth;
* *probe ranker, query as read*: the probe ranker with each stated attribute level replaced by
  what logistic-regression probes fitted on the *training captions'* embeddings read from the
  query's own embedding (its share read right is reported beside always guessing the most
  common level). The val and test queries use words never seen in training, so this shows
  how much of a query's attribute levels the text tower carries over from the training words
  — an estimate (through linear probes) of what a model trained on these captions can make of
  the query.

Usage::

    python benchmarks/bench_tracks.py --size small            # ~1 min on 2 idle cores
    python benchmarks/bench_tracks.py --size full --out /tmp/tracks-full

Writes ``benchmarks/results/bench_tracks_<size>.json`` (or ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import machine
from quari.eval.tracks import SIZES, build_fashion_tracks, load_fashion_mnist
from quari.eval.tracks.attributes import ATTRIBUTES
from quari.eval.tracks.plan import TextQuery, plan_tracks
from quari.eval.tracks.templates import TEMPLATE_SETS
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


def _logistic(x: np.ndarray, y: list) -> Any:
    """A fitted scikit-learn logistic regression (imported here: only the probes need it)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=10, max_iter=3000).fit(x, y)


def image_probes(out: Path, split: str) -> dict[str, dict]:
    """log p(class) and log p(class, attribute level) of every gallery image of a text→image
    split, from logistic-regression probes fitted on the train images' embeddings and labels:
    ``{"label": {class: (N,)}, attribute: {"class|level": (N,)}}``."""
    train = EmbeddingSet.open(out / "train")
    meta = train.metadata(np.arange(train.rows)).to_pydict()
    _, first = np.unique(np.asarray(meta["item"]), return_index=True)  # one row per image
    x = train.gather(first).astype(np.float32)
    gallery = EmbeddingSet.open(out / "t2i" / split / "gallery")
    g = gallery.gather(np.arange(gallery.rows)).astype(np.float32)
    labels = np.asarray(meta["label"])[first]
    log_p = {}
    probe = _logistic(x, labels)
    log_p["label"] = dict(zip(probe.classes_.tolist(), np.log(probe.predict_proba(g) + 1e-9).T,
                              strict=True))  # fmt: skip
    for a in ATTRIBUTES:
        y = [f"{c}|{v}" for c, v in zip(labels, np.asarray(meta[a.name])[first], strict=True)]
        probe = _logistic(x, y)
        log_p[a.name] = dict(zip(probe.classes_, np.log(probe.predict_proba(g) + 1e-9).T,
                                 strict=True))  # fmt: skip
    return log_p


def probe_ranker(log_p: dict[str, dict], queries: list[TextQuery]) -> float:
    """mAP@100 of the probe ranker (module docstring): the gallery ranked by the product of
    the probabilities of the class and of every attribute level a query asks for."""
    values = {a.name: a.values for a in ATTRIBUTES}
    aps = []
    for q in queries:
        s = log_p["label"][q.label].copy()
        for name, level in q.attributes:
            s += log_p[name][f"{q.label}|{values[name][level]}"]
        aps.append(average_precision(np.argsort(-s, kind="stable"), q.relevant))
    return float(np.mean(aps))


def class_then_cosine(
    out: Path, split: str, queries: list[TextQuery], log_p: dict[str, dict]
) -> dict[str, float]:
    """mAP@100 with the query's class ranked first and cosine order inside it: the true class
    of every gallery image (``class_oracle_cosine``), or the class the image probe reads
    (``probe_class_cosine``, with that probe's accuracy on the gallery)."""
    gallery = EmbeddingSet.open(out / "t2i" / split / "gallery")
    g = gallery.gather(np.arange(gallery.rows)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    true = np.asarray(gallery.metadata(np.arange(gallery.rows), ["label"])["label"].to_pylist())
    classes = sorted(log_p["label"])
    read = np.asarray(classes)[np.argmax(np.stack([log_p["label"][c] for c in classes]), 0)]
    q = np.array(pq.read_table(out / "t2i" / split / "queries.parquet")["embedding"].to_pylist(),
                 np.float32)  # fmt: skip
    cos = q @ g.T  # cosines lie in [-1, 1]: a bonus of 2 puts every image of the class first
    out_ = {"probe_class_accuracy": float((read == true).mean())}
    for name, cls in (("class_oracle_cosine", true), ("probe_class_cosine", read)):
        aps = [
            average_precision(np.argsort(-(c + 2.0 * (cls == t.label)), kind="stable"), t.relevant)
            for c, t in zip(cos, queries, strict=True)
        ]
        out_[f"{name}_map@100"] = float(np.mean(aps))
    return out_


def read_query_levels(out: Path, split: str, queries: list[TextQuery]) -> tuple[list, dict]:
    """The queries with every stated attribute level replaced by what probes on the training
    captions' text embeddings read from the query's embedding (module docstring).

    Returns:
        (queries as read, {"levels_read_right": share, "levels_majority": the share right
        when always guessing each attribute's most common training level}).
    """
    train = EmbeddingSet.open(out / "train")
    captions = train.metadata(np.arange(train.rows), ["caption"])["caption"].to_pylist()
    text = train.gather(np.arange(train.rows), kind="text").astype(np.float32)
    probes, majority = {}, {}
    for name, words in TEMPLATE_SETS["train"].words.items():
        rows, y = [], []
        for i, caption in enumerate(captions):
            for level, word in enumerate(words):
                if re.search(rf"(^|[ ,]){re.escape(word)}($|[ ,])", caption):
                    rows.append(i)
                    y.append(level)
        probes[name] = _logistic(text[rows], y)
        majority[name] = int(np.bincount(y).argmax())
    emb = np.array(pq.read_table(out / "t2i" / split / "queries.parquet")["embedding"].to_pylist(),
                   np.float32)  # fmt: skip
    read, right, guess, total = [], 0, 0, 0
    for q, e in zip(queries, emb, strict=True):
        attributes = []
        for name, level in q.attributes:
            got = int(probes[name].predict(e[None])[0])
            attributes.append((name, got))
            right += got == level
            guess += majority[name] == level
            total += 1
        read.append(replace(q, attributes=tuple(attributes)))
    return read, {"levels_read_right": right / total, "levels_majority": guess / total}


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
    reused = (args.out / "track.json").is_file()
    t = time.perf_counter()
    info = build_fashion_tracks(args.out, size=args.size, seed=args.seed)
    # A folder built earlier is reused: report the build time it recorded, not the reuse's.
    first = info["seconds"]["total"] if reused else time.perf_counter() - t
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
                log_p = image_probes(args.out, split)
                r["probe_ranker_map@100"] = probe_ranker(log_p, plan.queries[split])
                as_read, shares = read_query_levels(args.out, split, plan.queries[split])
                r["probe_ranker_query_as_read_map@100"] = probe_ranker(log_p, as_read)
                r.update(shares)
                r.update(class_then_cosine(args.out, split, plan.queries[split], log_p))
            results[f"{track}/{split}"] = r
            rows.append((f"{track}/{split}", r))

    print(f"\nFashion-MNIST tracks, size {args.size!r} (seed {args.seed}), {info['encoder']}")
    built = "recorded by the earlier build reused here" if reused else "wall"
    print(f"build: {first:.1f} s {built} ({info['seconds']}); rerun: {rerun:.2f} s\n")
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
    print("\ntext→image: what limits a model that learns from the training captions")
    print(f"{'track/split':12} {'class-oracle+cos':>16} {'probe-class+cos':>15} {'class acc':>9} "
          f"{'probe, query as read':>20} {'levels read right':>17} {'majority':>8}")  # fmt: skip
    for name, r in rows:
        if "levels_read_right" in r:
            print(
                f"{name:12} {r['class_oracle_cosine_map@100']:16.3f} "
                f"{r['probe_class_cosine_map@100']:15.3f} {r['probe_class_accuracy']:9.3f} "
                f"{r['probe_ranker_query_as_read_map@100']:20.3f} "
                f"{r['levels_read_right']:17.3f} {r['levels_majority']:8.3f}"
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
        "build_reused": reused,
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
