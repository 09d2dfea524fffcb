"""Candidate-index backends side by side (FAISS vs Milvus Lite) and the exact scan on Ray.

On the clustered synthetic set of ``bench_search.py`` (N × 768 fp16, N/10,000 clusters, written
once under ``benchmarks/data/``) and its planted adapter (paper variant), in one run:

* **build** of each index — FAISS ``Flat`` and ``IVF{nlist},Flat``, Milvus Lite ``FLAT`` and
  ``IVF_FLAT`` (the IVF build re-indexes the FLAT collection: Milvus keeps the inserted rows,
  so its time is the index alone; the insert time is the FLAT row's) — with wall time, peak
  resident memory (VmHWM, reset before each build; includes page cache of the memory-mapped
  set) and peak anonymous memory (sampled);
* per mode (``plain``, ``rerank``, ``adaptive``; K candidates, k results) the latency per query
  at B = 1 (median over ``--queries-b1`` queries) and B = 32 (one batch / 32), and recall@k
  against the exact answer (``plain``: the exact cosine top-k; the others: the exact QuARI
  scan);
* the exact **scan** of the 32 queries in this process against ``RayScan`` with 1 and 2 workers
  on a local Ray (each timed after one warm-up scan, which reads the set into the page cache
  and starts the workers), checking that the ids and scores are identical.

Milvus Lite is the embedded, pure-Python Milvus (the tests' backend; a Milvus server runs the
same client calls): its numbers describe Lite on this machine, not a Milvus cluster.

Usage::

    python benchmarks/bench_backends.py --quick        # 20k rows, a smoke run (~2 min)
    python benchmarks/bench_backends.py                # 1M rows (the closing note's numbers)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import quari
from bench_search import HERE, PeakAnon, PlantedAdapter, dataset, recall
from quari import Adaptation
from quari.eval.synthetic import ClusteredSpec, clustered_vectors
from quari.index import CandidateIndex
from quari.retriever import Retriever
from quari.scan_ray import RayScan, RayScanConfig

MODES = ("plain", "rerank", "adaptive")


def peak_rss_mib() -> float:
    """VmHWM of this process (MiB) since the last :func:`reset_peak_rss`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def backends(args, rows: int) -> list[tuple[str, str, dict]]:
    """(label, spec, options) of each index, in build order (Milvus IVF re-indexes FLAT)."""
    db = args.data / f"milvus-{rows}.db"
    milvus = f"milvus-lite:{db}/bench_{rows}"
    nlist = args.nlist
    return [
        ("faiss Flat", "faiss:Flat", {}),
        (f"faiss IVF{nlist}", f"faiss:IVF{nlist},Flat", {"nprobe": args.nprobe}),
        ("milvus-lite FLAT", milvus, {"index_type": "FLAT", "overwrite": True}),
        (
            f"milvus-lite IVF_FLAT{nlist}",
            milvus,
            {
                "index_type": "IVF_FLAT",
                "index_params": {"nlist": nlist},
                "search_params": {"nprobe": args.nprobe},
            },
        ),
    ]


def build(eset, label: str, spec: str, options: dict, name: str) -> tuple[CandidateIndex, dict]:
    reset_peak_rss()
    with PeakAnon() as mem:
        t0 = time.perf_counter()
        index = CandidateIndex.build(eset, spec, name=name, progress=False, **options)
        seconds = time.perf_counter() - t0
    row = {
        "index": label,
        "build_seconds": round(seconds, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_anon_mib": round(mem.peak, 1),
        "rows_inserted": index.info.get("build", {}).get("rows_inserted"),
    }
    print(
        f"  build {label:24s} {seconds:8.1f} s  VmHWM {row['peak_rss_mib']:8.0f} MiB  "
        f"anon {row['peak_anon_mib']:8.0f} MiB",
        flush=True,
    )
    return index, row


def modes(eset, index, label, model, queries, truth, args) -> list[dict]:
    retriever = Retriever(eset, model, index, batch_size=32, exact_below=0)
    out = []
    for mode in MODES:
        times = []
        for i in range(args.queries_b1):
            t = time.perf_counter()
            retriever.search(
                queries[i : i + 1], args.k, mode=mode, candidates=args.K, with_metadata=False
            )
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        res = retriever.search(queries, args.k, mode=mode, candidates=args.K, with_metadata=False)
        b32 = (time.perf_counter() - t) * 1e3 / len(queries)
        row = {
            "index": label,
            "mode": mode,
            "ms_per_query_b1": round(statistics.median(times) * 1e3, 2),
            "ms_per_query_b32": round(b32, 2),
            "recall_at_k_vs_exact": round(recall(res.ids, truth[mode]), 4),
        }
        out.append(row)
        print(
            f"    {label:24s} {mode:8s} b1 {row['ms_per_query_b1']:9.1f} ms  "
            f"b32 {row['ms_per_query_b32']:8.1f} ms/q  recall@{args.k} "
            f"{row['recall_at_k_vs_exact']:.3f}",
            flush=True,
        )
    return out


def ray_scans(eset, ad: Adaptation, k: int, local_seconds: float, local, args) -> list[dict]:
    import ray

    ray.init(
        num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
        configure_logging=False,
    )  # fmt: skip
    out = [{"engine": "single process", "workers": 1, "seconds": round(local_seconds, 3)}]
    try:
        for workers in args.ray_workers:
            engine = RayScan(RayScanConfig(workers=workers))
            engine.scan(eset, ad, k)  # warm-up: starts the worker processes
            t = time.perf_counter()
            top = engine.scan(eset, ad, k)
            seconds = time.perf_counter() - t
            same = bool(torch.equal(top.ids, local.ids) and torch.equal(top.scores, local.scores))
            out.append(
                {"engine": "ray", "workers": workers, "seconds": round(seconds, 3),
                 "identical_to_single_process": same}
            )  # fmt: skip
            print(f"  ray scan, {workers} worker(s): {seconds:.2f} s  identical: {same}")
    finally:
        ray.shutdown()
    return out


def setup(args) -> tuple:
    """The set (written once), the 32 queries and the planted adapter."""
    spec = ClusteredSpec(dim=768, clusters=max(10, args.rows // 10_000))
    eset = dataset(args.rows, spec, args.data)
    queries, _ = clustered_vectors(spec, 32, seed=10_000, centroids=spec.centroids())
    return eset, queries, PlantedAdapter(spec.centroids(), variant="paper")


def child(args) -> None:
    """One index in its own process (so peak memory is that index's alone): build, then the
    modes; one JSON line on stdout."""
    eset, queries, model = setup(args)
    truth = dict(np.load(args.truth))
    label, spec_string, options = next(b for b in backends(args, args.rows) if b[0] == args.child)
    name = "bench_" + label.split()[0].replace("-", "_")
    index, row = build(eset, label, spec_string, options, name)
    if label.startswith("milvus-lite IVF"):
        row["note"] = "re-indexes the FLAT collection: index build only, rows reused"
    searches = modes(eset, index, label, model, queries, truth, args)
    index.close()
    print("RESULT " + json.dumps({"build": row, "searches": searches}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k rows: a smoke run")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--K", type=int, default=1000, help="candidates per query (and per w)")
    parser.add_argument("--queries-b1", type=int, default=3, help="queries timed at B = 1")
    parser.add_argument("--nlist", type=int, default=2048)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--ray-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--skip-milvus", action="store_true")
    parser.add_argument("--data", type=Path, default=HERE / "data", help="data cache folder")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_backends.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--truth", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.nlist, args.nprobe, args.K, args.k = 20_000, 64, 8, 200, 20
    if args.child:
        child(args)
        return
    load_before = os.getloadavg()
    print(
        f"quari {quari.__version__}  torch {torch.__version__}  threads "
        f"{torch.get_num_threads()}  load {load_before}",
        flush=True,
    )
    t_start = time.perf_counter()
    eset, queries, model = setup(args)

    # The exact answers: cosine top-k (plain) and the QuARI scan (rerank, adaptive).
    with torch.inference_mode():
        plain_truth = Adaptation.identity(queries).scan(eset.iter_chunks(), args.k).ids.numpy()
        ad = model(torch.from_numpy(queries))
        ad.scan(eset.iter_chunks(), args.k)  # warm-up: the set's pages in the page cache
        t = time.perf_counter()
        local = ad.scan(eset.iter_chunks(), args.k)
        local_seconds = time.perf_counter() - t
    truth_file = args.data / f"bench_backends-truth-{args.rows}.npz"
    np.savez(truth_file, plain=plain_truth, rerank=local.ids.numpy(), adaptive=local.ids.numpy())
    print(f"  exact scan of 32 queries in this process: {local_seconds:.2f} s", flush=True)

    builds, searches = [], []
    for label, spec_string, _ in backends(args, args.rows):
        if args.skip_milvus and spec_string.startswith("milvus"):
            continue
        proc = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child", label, "--truth", str(truth_file)],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                got = json.loads(line[len("RESULT ") :])
                builds.append(got["build"])
                searches.extend(got["searches"])
            else:
                print(line, flush=True)
    scans = ray_scans(eset, ad, args.k, local_seconds, local, args)

    print("\n| index | build s | peak RSS MiB | peak anon MiB |\n|---|---|---|---|")
    for r in builds:
        note = " (index only)" if "note" in r else ""
        print(
            f"| {r['index']} | {r['build_seconds']:.1f}{note} | {r['peak_rss_mib']:.0f} | "
            f"{r['peak_anon_mib']:.0f} |"
        )
    print(
        f"\n| index | mode | ms/query B=1 | ms/query B=32 | recall@{args.k} vs exact |"
        "\n|---|---|---|---|---|"
    )
    for r in searches:
        print(
            f"| {r['index']} | {r['mode']} | {r['ms_per_query_b1']:.1f} | "
            f"{r['ms_per_query_b32']:.1f} | {r['recall_at_k_vs_exact']:.3f} |"
        )
    print("\n| exact scan (32 queries) | workers | seconds | identical |\n|---|---|---|---|")
    for r in scans:
        same = r.get("identical_to_single_process", "—")
        print(f"| {r['engine']} | {r['workers']} | {r['seconds']:.2f} | {same} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    facts = {
        "benchmark": "bench_backends",
        "quari": quari.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "settings": {
            "rows": args.rows,
            "dim": 768,
            "k": args.k,
            "K": args.K,
            "queries_b1": args.queries_b1,
            "queries_b32": 32,
            "nlist": args.nlist,
            "nprobe": args.nprobe,
            "variant": "paper",
            "quick": args.quick,
        },
        "builds": builds,
        "searches": searches,
        "scan": scans,
    }
    args.out.write_text(json.dumps(facts, indent=2) + "\n")
    print(f"\nwrote {args.out} ({facts['total_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
