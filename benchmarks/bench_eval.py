"""Evaluation benchmark: ILIAS-format mAP@1k over a 1M-row gallery, per retrieval mode.

Writes a generated ILIAS release once under ``benchmarks/data/bench_eval/`` — **fp16 HDF5
files in the official format** (``features_positives.hdf5``, ``features_distractors_*.hdf5``,
``features_image_queries.hdf5``, the ``image_ids/`` lists): 1,000 instances with 5 positives
each around a random centre, the rest random distractors, 768-d — then runs the product path
``quari eval ilias`` takes: the gallery is imported into an embedding set in the cache (timed
once), the default candidate index is built (``faiss:auto``: Flat at 1M rows), and for every
mode a **separate process** evaluates the image→image track with the paper-sized model
(E 768, H 512, r 64, 4 layers, 4 steps, random weights — timing only) and reports

* wall time, ms per query (search only) and the Retriever's stages per query,
* peak resident memory of that process (``VmHWM`` from ``/proc/self/status``),
* the metric computation's own time and its share of the evaluation.

``plain`` is the cosine baseline (no model). ``scan`` scores every row for every query (~0.4
s per query at 1M on 2 cores), so it runs on the first ``--scan-queries`` queries (default 100)
to keep the run near 20 minutes; its ms/query is comparable, its mAP is over fewer queries.

Usage::

    python benchmarks/bench_eval.py --quick     # 50k rows, 200 queries (a smoke run)
    python benchmarks/bench_eval.py             # 1M rows, 1,000 queries → results/bench_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from quari.eval.protocols import IliasEvaluator, environment

HERE = Path(__file__).resolve().parent
DIM = 768
POSITIVES = 5


def write_release(root: Path, rows: int, queries: int, seed: int = 0) -> None:
    """An ILIAS-format release of ``rows`` gallery rows (``queries`` instances)."""
    import h5py

    rng = np.random.default_rng(seed)
    (root / "image_ids").mkdir(parents=True, exist_ok=True)
    centres = rng.standard_normal((queries, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def around(c: np.ndarray, spread: float) -> np.ndarray:
        x = c + spread * rng.standard_normal(c.shape).astype(np.float32) / np.sqrt(DIM)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)

    def h5(name: str, ids: list[str], vectors: np.ndarray) -> None:
        with h5py.File(root / name, "w") as f:
            f.create_dataset("index", data=np.asarray(ids, dtype="S"))
            f.create_dataset("features", data=vectors)

    inst = [f"inst_{i:04d}" for i in range(queries)]
    qids = [f"{n}/query/Q{i:04d}_00.jpg" for i, n in enumerate(inst)]
    h5("features_image_queries.hdf5", qids, around(centres, 1.2))
    pids = [f"{n}/pos/P{i:04d}_{p:02d}.jpg" for i, n in enumerate(inst) for p in range(POSITIVES)]
    h5("features_positives.hdf5", pids, around(np.repeat(centres, POSITIVES, 0), 1.6))
    (root / "image_ids" / "image_query_ids.txt").write_text("".join(f"{q},0,0\n" for q in qids))
    (root / "image_ids" / "positive_ids.txt").write_text("".join(f"{p},0.1,10\n" for p in pids))
    remaining, part = rows - len(pids), 0
    while remaining > 0:
        n = min(remaining, 500_000)
        ids = [f"yfcc100m_{part:05d}/{j:07d}" for j in range(n)]
        chunks = []
        for start in range(0, n, 100_000):
            x = rng.standard_normal((min(100_000, n - start), DIM)).astype(np.float32)
            chunks.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
        h5(f"features_distractors_{part:05d}.hdf5", ids, np.concatenate(chunks))
        remaining -= n
        part += 1


def model_folder(path: Path) -> Path:
    """The paper-sized model with random weights, saved once."""
    from quari import HyperNetConfig, QuARIModel
    from quari.checkpoint import save

    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        cfg = HyperNetConfig(
            embedding_dim=DIM, rank=64, hidden_dim=512, num_layers=4, num_heads=8, num_steps=4
        )
        save(QuARIModel(cfg).eval(), path)
    return path


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> None:
    """One mode in this process; prints one JSON line."""
    from quari.checkpoint import load_model
    from quari.index import CandidateIndex

    ev = IliasEvaluator(args.root, track="i2i", cache=args.cache, k=1000)
    t0 = time.perf_counter()
    index = CandidateIndex.load(ev.gallery)
    load_s = time.perf_counter() - t0
    model = None if args.child == "plain" else load_model(args.model)
    result = ev.evaluate(
        model,
        mode=args.child,
        index=index,
        batch_size=32,
        candidates=1000,
        max_queries=args.max_queries,
    )
    t = result.timings
    print(
        json.dumps(
            {
                "mode": args.child,
                "queries": result.queries,
                "map_at_1k": result.metrics["ap@1000"],
                "wall_s": t["wall_s"],
                "search_s": t["search_s"],
                "ms_per_query": t["per_query_ms"],
                "stages_ms_per_query": t["stages_ms"],
                "metric_s": t["metric_s"],
                "metric_share": t["metric_s"] / (t["search_s"] + t["metric_s"]),
                "index_load_s": load_s,
                "peak_rss_mib": peak_rss_mib(),
                "load_avg": os.getloadavg(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50k rows, 200 queries")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--scan-queries", type=int, default=None)
    parser.add_argument("--modes", nargs="+", default=["plain", "rerank", "adaptive", "scan"])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_eval.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--max-queries", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rows = args.rows or (50_000 if args.quick else 1_000_000)
    queries = args.queries or (200 if args.quick else 1000)
    scan_queries = args.scan_queries or (50 if args.quick else 100)
    data = HERE / "data" / "bench_eval" / f"ilias-{rows}-{queries}"
    cache = data / "cache"
    setup: dict[str, float] = {}
    if not (data / "features_image_queries.hdf5").is_file():
        t0 = time.perf_counter()
        write_release(data, rows, queries)
        setup["generate_hdf5_s"] = time.perf_counter() - t0
    ev = IliasEvaluator(data, track="i2i", cache=cache, k=1000, progress=True)
    t0 = time.perf_counter()
    gallery = ev.gallery  # imported once into the cache (timed when it happens here)
    setup["import_or_open_s"] = time.perf_counter() - t0
    from quari.index import CandidateIndex

    t0 = time.perf_counter()
    if not CandidateIndex.exists(gallery):
        CandidateIndex.build(gallery, progress=True)
        setup["index_build_s"] = time.perf_counter() - t0
    factory = CandidateIndex.load(gallery).info.get("factory")
    model = model_folder(HERE / "data" / "bench_eval" / "paper-model")
    results = []
    for mode in args.modes:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--root",
            str(data),
            "--cache",
            str(cache),
            "--model",
            str(model),
        ]
        if mode == "scan":
            cmd += ["--max-queries", str(scan_queries)]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["process_s"] = time.perf_counter() - t0
        results.append(row)
        print(
            f"{mode:9s} {row['queries']:5d} q  mAP@1k {100 * row['map_at_1k']:5.1f}  "
            f"{row['ms_per_query']:8.1f} ms/q  wall {row['wall_s']:7.1f} s  "
            f"metric {1e3 * row['metric_s']:7.1f} ms ({100 * row['metric_share']:.2f} %)  "
            f"peak RSS {row['peak_rss_mib']:7.0f} MiB",
            flush=True,
        )
    payload = {
        "benchmark": "bench_eval",
        "settings": {
            "rows": gallery.rows,
            "queries": queries,
            "scan_queries": scan_queries,
            "dim": DIM,
            "k": 1000,
            "candidates": 1000,
            "batch_size": 32,
            "index": factory,
            "gallery_source": "fp16 HDF5 (ILIAS format), imported",
            "model": "paper variant, E 768, H 512, r 64, 4 layers, 4 steps, random",
            "quick": args.quick,
        },
        "setup": setup,
        "results": results,
        "machine": environment(),
        "note": "shared 2-core machine: other jobs ran at the same time (load_avg per mode)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
