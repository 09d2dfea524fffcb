"""What the static blend costs an exact scan, at the CPU default model's shape.

The default recipe's exported model (on a CPU) scores (1 − a)·cos(q′, T d) + a·cos(W q, W d)
(docs/method.md §5.6). The adapted cosine needs 1 + 2r projection columns per query; the blend
adds one numerator column per query and, per gallery block, the E×E product behind ‖W d‖,
shared by the batch's queries — unless the scan reads the rows' ‖W d‖ from a cache, as the
Retriever keeps one per set (``StaticBlend.row_norms``, filled by its first scan). This times
``Adaptation.scan`` of an fp16 gallery without the blend, with it, and with it and the cached
norms — E 384 (the offline and MiniLM towers), r 16, the reference variant: the model
``quari train`` makes on a CPU — plus the one-off cost of filling the cache, and reports the
ratios measured in the same run (medians of ``--repeats``).

Usage::

    python benchmarks/bench_blend.py            # N = 200k, B = 1 and 32 → results/bench_blend.json
    python benchmarks/bench_blend.py --quick    # N = 20k, a smoke run
    python benchmarks/bench_blend.py --ray      # and the same through RayScan (2 local tasks)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import machine, median_ms
from quari import Adaptation
from quari.adaptation import StaticBlend
from quari.whitening import fit_whitening

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 20k (smoke run)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--ray", action="store_true", help="also time RayScan on a local 2-task cluster"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_blend.json")
    args = parser.parse_args()
    E, r = args.dim, args.rank
    N = 20_000 if args.quick else 200_000
    rng = np.random.default_rng(0)
    # An anisotropic gallery (a few strong directions), so W is a real whitening.
    scales = np.geomspace(10.0, 0.1, E).astype(np.float32)
    gallery = rng.standard_normal((N, E), dtype=np.float32) * scales
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    W = fit_whitening(gallery[:20_000])
    gallery16 = gallery.astype(np.float16)
    del gallery
    chunks = [(s, gallery16[s : s + 65536]) for s in range(0, N, 65536)]  # as a set streams them
    fill_ms = median_ms(lambda: StaticBlend.norms_of(W, chunks, N), args.repeats)
    norms = StaticBlend.norms_of(W, chunks, N)
    print(f"N {N:,}: filling the norm cache {fill_ms:.1f} ms (once per set and model)")
    rows = []
    for B in (1, 32):
        ad = Adaptation.random(B, E, r, "reference", seed=B, anchor_scale=1.0)
        raw = torch.from_numpy(rng.standard_normal((B, E), dtype=np.float32))
        blend = StaticBlend.of(W, raw, 0.5)
        blended, cached = ad.with_blend(blend), ad.with_blend(blend.with_row_norms(norms))
        # A fresh copy each call, so the per-query set-up is counted too.
        times = {
            name: median_ms(lambda a=a: a.detach().scan(chunks, args.k), args.repeats)
            for name, a in (("scan", ad), ("blended", blended), ("cached", cached))
        }
        row = {
            "N": N,
            "B": B,
            "E": E,
            "rank": r,
            "scan_ms_per_query": times["scan"] / B,
            "blended_ms_per_query": times["blended"] / B,
            "blended_over_scan": times["blended"] / times["scan"],
            "cached_ms_per_query": times["cached"] / B,
            "cached_over_scan": times["cached"] / times["scan"],
        }
        rows.append(row)
        print(
            f"N {N:,}  B {B:>2}: scan {row['scan_ms_per_query']:8.2f} ms/query, with the blend "
            f"{row['blended_ms_per_query']:8.2f} ({row['blended_over_scan']:.2f}×), with cached "
            f"norms {row['cached_ms_per_query']:8.2f} ({row['cached_over_scan']:.2f}×)",
            flush=True,
        )
    ray_rows = ray_section(gallery16, W, E, r, args) if args.ray else None
    payload = {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "gallery": "fp16, unit rows with a geometric spectrum (10 → 0.1), 65,536-row chunks",
        "norm_cache_fill_ms": fill_ms,
        "rows": rows,
    }
    if ray_rows is not None:
        payload["ray"] = ray_rows
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")


def ray_section(gallery16: np.ndarray, W: torch.Tensor, E: int, r: int, args) -> list[dict]:
    """The same scans through :class:`quari.scan_ray.RayScan` (two one-CPU tasks on a local
    Ray, the gallery written as a set): plain, blended on an engine's first scan (the tasks
    compute their parts' ‖W d‖) and blended once the engine keeps them."""
    import tempfile

    from quari.scan_ray import RayScan, RayScanConfig
    from quari.store import EmbeddingSet

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        eset = EmbeddingSet.create(Path(tmp) / "set", dim=E, encoder="bench")
        for s in range(0, gallery16.shape[0], 65536):
            eset.append(gallery16[s : s + 65536].astype(np.float32))
        engine = RayScan(RayScanConfig(workers=2, num_cpus=2))
        try:
            for B in (1, 32):
                ad = Adaptation.random(B, E, r, "reference", seed=B, anchor_scale=1.0)
                raw = torch.from_numpy(np.random.default_rng(B).standard_normal((B, E)))
                blended = ad.with_blend(StaticBlend.of(W, raw.float(), 0.5))
                engine.scan(eset, ad, args.k)  # warm the workers
                plain = median_ms(
                    lambda ad=ad: engine.scan(eset, ad.detach(), args.k), args.repeats
                )
                # a fresh engine's first scan (the tasks compute their parts' ‖W d‖) …
                first_ms = median_ms(
                    lambda b=blended: RayScan(RayScanConfig(workers=2)).scan(eset, b, args.k),
                    args.repeats,
                )
                # … and the scans after it (this engine keeps them)
                engine.scan(eset, blended, args.k)
                kept = median_ms(
                    lambda b=blended: engine.scan(eset, b.detach(), args.k), args.repeats
                )
                row = {
                    "B": B,
                    "scan_ms_per_query": plain / B,
                    "first_blended_ms_per_query": first_ms / B,
                    "first_over_scan": first_ms / plain,
                    "kept_norms_ms_per_query": kept / B,
                    "kept_over_scan": kept / plain,
                }
                rows.append(row)
                print(
                    f"Ray, 2 tasks, B {B:>2}: scan {row['scan_ms_per_query']:8.2f} ms/query, "
                    f"blended first scan {row['first_blended_ms_per_query']:8.2f} "
                    f"({row['first_over_scan']:.2f}×), with kept norms "
                    f"{row['kept_norms_ms_per_query']:8.2f} ({row['kept_over_scan']:.2f}×)",
                    flush=True,
                )
        finally:
            engine.close()
    return rows


if __name__ == "__main__":
    main()
