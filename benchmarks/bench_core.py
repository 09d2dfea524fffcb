"""Core engine benchmark: hypernetwork latency, re-ranking, and the exact factored scan.

Measures, on this machine and in one run (so the ratios compare like with like):

* hypernetwork latency of the paper-sized model (E 768, H 512, 4 layers, 4 steps, r 64) at
  batch 1 / 32 / 256 for each torch thread count, and which count is fastest;
* ``Adaptation.rerank`` of 1,000 fp16 candidates per query;
* exact top-k scans over N fp16 gallery rows at B = 1 and 32 queries, per query:
  the factored scan (``Adaptation.scan``), its own projection GEMM alone (fp32 blocks already
  converted, and with the fp16→fp32 upcast), a plain cosine scan (matrix product + top-k), and
  the dense-T form (one E×E matrix per query, as the reference evaluation does).

Usage::

    python benchmarks/bench_core.py            # full sizes (N = 200k and 1M), ~15 min on 2 cores
    python benchmarks/bench_core.py --quick    # tiny sizes, a smoke run

Writes ``benchmarks/results/bench_core.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import quari
from quari import Adaptation, HyperNetConfig, QuARIModel
from quari.scoring import default_block_rows

RESULTS = Path(__file__).resolve().parent / "results"


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "quari": quari.__version__,
    }


def bench_hypernet(cfg: HyperNetConfig, batches: list[int], threads: list[int], repeats: int):
    torch.manual_seed(0)
    model = QuARIModel(cfg).eval()
    rows = []
    for th in threads:
        torch.set_num_threads(th)
        for B in batches:
            q = torch.randn(B, cfg.embedding_dim)
            with torch.inference_mode():
                ms = median_ms(lambda q=q: model(q), repeats if B <= 32 else max(1, repeats - 1))
            rows.append({"batch": B, "threads": th, "ms": ms, "queries_per_s": B / ms * 1e3})
            print(f"  hypernet  batch {B:4d}  threads {th}  {ms:9.2f} ms  {B / ms * 1e3:8.1f} q/s")
    best = {}
    for row in rows:
        if row["batch"] not in best or row["ms"] < best[row["batch"]]["ms"]:
            best[row["batch"]] = row
    return rows, [best[b] for b in batches]


def block_loop(gallery: np.ndarray, block_rows: int, per_block: Callable[[torch.Tensor], object]):
    """Runs ``per_block`` on fp32 copies of successive gallery blocks (one reused buffer)."""
    buf = torch.empty(block_rows, gallery.shape[1])
    for start in range(0, gallery.shape[0], block_rows):
        part = torch.from_numpy(gallery[start : start + block_rows])
        block = buf[: part.shape[0]]
        block.copy_(part)
        per_block(block)


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Prints rows as a markdown table; columns are (header, key, format)."""
    print(f"\n{title}\n| " + " | ".join(h for h, _, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(format(row[key], fmt) for _, key, fmt in columns) + " |")


def topk_merge(state: list, scores: torch.Tensor, offset: int, k: int) -> None:
    """Keeps the running top-k of (n, B) block scores in ``state`` = [scores, ids]."""
    top = torch.topk(scores, min(k, scores.shape[0]), dim=0)
    s = torch.cat([state[0], top.values.T], 1)
    i = torch.cat([state[1], top.indices.T + offset], 1)
    keep = torch.topk(s, min(k, s.shape[1]), dim=1)
    state[0], state[1] = keep.values, torch.gather(i, 1, keep.indices)


def plain_scan(gallery: np.ndarray, q: torch.Tensor, k: int, block_rows: int):
    state = [torch.empty(q.shape[0], 0), torch.empty(q.shape[0], 0, dtype=torch.long)]
    offset = [0]

    def step(block):
        topk_merge(state, block @ q.T, offset[0], k)
        offset[0] += block.shape[0]

    block_loop(gallery, block_rows, step)
    return state


def dense_scan(gallery: np.ndarray, ad: Adaptation, b: int, k: int, block_rows: int):
    """The dense-T form for query b: d′ = T d for every row (E×E per query), then cosine."""
    T = ad.dense()[b]
    q = ad.refined_query[b]
    state = [torch.empty(1, 0), torch.empty(1, 0, dtype=torch.long)]
    offset = [0]

    def step(block):
        td = block @ T.T
        s = (td @ q) / torch.linalg.vector_norm(td, dim=-1).clamp_min(1e-12)
        topk_merge(state, s[:, None], offset[0], k)
        offset[0] += block.shape[0]

    block_loop(gallery, block_rows, step)
    return state


def bench_scan(gallery: np.ndarray, gallery32: torch.Tensor, B: int, variant: str, args) -> dict:
    E, r, k = gallery.shape[1], args.rank, args.k
    ad = Adaptation.random(B, E, r, variant, seed=B)
    cols = ad.plan.projection.flat
    # Same block size as the scan's default, so the GEMM below is the scan's own.
    block_rows = default_block_rows(E, cols.shape[1])
    reps = args.repeats

    def scan():
        # A fresh Adaptation each call, so the per-query QR set-up (its plan) is counted too.
        return ad.detach().scan([(0, gallery)], k)

    scan_ms = median_ms(scan, reps)

    def gemm_only():
        for s in range(0, gallery32.shape[0], block_rows):
            gallery32[s : s + block_rows] @ cols

    gemm_ms = median_ms(gemm_only, reps)
    gemm_upcast_ms = median_ms(lambda: block_loop(gallery, block_rows, lambda x: x @ cols), reps)
    plain_ms = median_ms(lambda: plain_scan(gallery, ad.refined_query, k, block_rows), reps)
    n_dense = min(B, args.dense_queries)
    dense_each = [
        median_ms(lambda b=b: dense_scan(gallery, ad, b, k, block_rows), 1, warmup=0)
        for b in range(n_dense)
    ]
    dense_ms = statistics.median(dense_each)  # per query: the dense form shares nothing
    row = {
        "N": gallery.shape[0],
        "B": B,
        "variant": variant,
        "projection_columns": cols.shape[1],
        "block_rows": block_rows,
        "scan_ms_per_query": scan_ms / B,
        "gemm_ms_per_query": gemm_ms / B,
        "gemm_with_upcast_ms_per_query": gemm_upcast_ms / B,
        "plain_cosine_ms_per_query": plain_ms / B,
        "dense_T_ms_per_query": dense_ms,
        "dense_T_queries_timed": n_dense,
    }
    row["dense_over_scan"] = row["dense_T_ms_per_query"] / row["scan_ms_per_query"]
    row["scan_over_gemm"] = scan_ms / gemm_ms
    row["scan_over_gemm_with_upcast"] = scan_ms / gemm_upcast_ms
    row["scan_over_plain"] = scan_ms / plain_ms
    print(f"  scan  N {row['N']:,}  B {B}  {variant}: {row['scan_ms_per_query']:.2f} ms/query")
    return row


def bench_rerank(E: int, r: int, M: int, batches: list[int], repeats: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for B in batches:
        for variant in ("paper", "reference"):
            ad = Adaptation.random(B, E, r, variant, seed=7)
            vecs = rng.standard_normal((B, M, E), dtype=np.float32).astype(np.float16)
            ids = np.tile(np.arange(M), (B, 1))
            ms = median_ms(lambda ad=ad, ids=ids, vecs=vecs: ad.rerank(ids, vecs, 100), repeats)
            rows.append({"B": B, "M": M, "variant": variant, "ms_per_query": ms / B})
            print(f"  rerank  {M} candidates  B {B:3d}  {variant:9s}  {ms / B:8.3f} ms/query")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_core.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dense-queries", type=int, default=3)
    args = parser.parse_args()

    if args.quick:
        E, sizes, batches, hyper_batches = 64, [2_000, 5_000], [1, 4], [1, 4]
        cfg = HyperNetConfig(embedding_dim=E, rank=8, hidden_dim=32, num_heads=4)
        args.rank, args.repeats, args.dense_queries = 8, 1, 1
    else:
        E, sizes, batches, hyper_batches = 768, [200_000, 1_000_000], [1, 32], [1, 32, 256]
        cfg = HyperNetConfig(embedding_dim=E)
    threads = sorted({1, torch.get_num_threads()})
    default_threads = torch.get_num_threads()
    print(f"quari {quari.__version__}  torch {torch.__version__}  threads {threads}")

    print("hypernetwork (paper-sized)" if not args.quick else "hypernetwork (tiny)")
    hyper_rows, hyper_best = bench_hypernet(cfg, hyper_batches, threads, args.repeats)
    torch.set_num_threads(default_threads)

    print("rerank")
    rerank_rows = bench_rerank(E, args.rank, 1000 if not args.quick else 200, batches, args.repeats)

    print("exact scan (fp16 gallery)")
    rng = np.random.default_rng(0)
    full = rng.standard_normal((max(sizes), E), dtype=np.float32)
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    full16 = full.astype(np.float16)
    full32 = torch.from_numpy(full16.astype(np.float32))
    del full
    scan_rows = []
    for N in sizes:
        for B in batches:
            for variant in ("paper", "reference"):
                scan_rows.append(bench_scan(full16[:N], full32[:N], B, variant, args))

    result = {
        "benchmark": "bench_core",
        "machine": {**machine(), "threads_default": default_threads},
        "settings": {
            "E": E,
            "rank": args.rank,
            "k": args.k,
            "repeats": args.repeats,
            "hypernet_config": cfg.to_dict(),
            "quick": args.quick,
        },
        "hypernet": hyper_rows,
        "hypernet_fastest": hyper_best,
        "rerank": rerank_rows,
        "scan": scan_rows,
    }
    print_table(
        "Hypernetwork latency (fastest thread count per batch)",
        hyper_best,
        [
            ("batch", "batch", "d"),
            ("threads", "threads", "d"),
            ("ms", "ms", ".2f"),
            ("queries/s", "queries_per_s", ".1f"),
        ],
    )
    print_table(
        "Re-rank (ms per query)",
        rerank_rows,
        [
            ("B", "B", "d"),
            ("candidates", "M", "d"),
            ("variant", "variant", "s"),
            ("ms/query", "ms_per_query", ".3f"),
        ],
    )
    print_table(
        "Exact top-k scan of an fp16 gallery (ms per query)",
        scan_rows,
        [
            ("N", "N", ",d"),
            ("B", "B", "d"),
            ("variant", "variant", "s"),
            ("factored scan", "scan_ms_per_query", ".2f"),
            ("its GEMM", "gemm_ms_per_query", ".2f"),
            ("GEMM+upcast", "gemm_with_upcast_ms_per_query", ".2f"),
            ("plain cosine", "plain_cosine_ms_per_query", ".2f"),
            ("dense T", "dense_T_ms_per_query", ".1f"),
            ("dense/scan", "dense_over_scan", ".1f"),
            ("scan/GEMM", "scan_over_gemm", ".2f"),
            ("scan/(GEMM+upcast)", "scan_over_gemm_with_upcast", ".2f"),
        ],
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
