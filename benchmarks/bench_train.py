"""Training throughput benchmark: pairs/s, peak memory, and where a step's time goes.

The paper-sized model (E 768, H 512, 4 layers, 4 steps, r 64), fp32, on this CPU. One
training step = LinCIR noise → hypernetwork forward → QuARI loss (in-batch negatives + 2
semi-positives per query, factored scoring) → backward → AdamW step, exactly as
``quari.training.module`` runs it.

* ``direct`` rows: the step as the trainer runs it, at batches that fit in memory here
  (activation memory grows ≈ 0.1 GB per pair in fp32, so batch 320 needs ≈ 33 GB);
* ``chunked`` row: batch 320 with the hypernetwork run in chunks of 16 pairs, GradCache
  style — no-grad forward of every chunk, the loss over the whole batch on the detached
  factors, then each chunk re-run with gradient and back-propagated with the factor
  gradients. Same gradient as the direct step, memory bounded by one chunk, one extra
  forward pass.

Per step: the time in the hypernetwork (forward + backward) and in the loss (forward +
backward), measured separately by cutting the graph at the factors (q′, U, V).

Usage::

    python benchmarks/bench_train.py            # 320 chunked, 16 and 32 direct (~10 min)
    python benchmarks/bench_train.py --quick    # a smoke run with a small model

Writes ``benchmarks/results/bench_train.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from bench_core import machine
from quari import Adaptation, HyperNetConfig, QuARIModel
from quari.training.loss import add_query_noise, quari_loss

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batch(B: int, E: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, E, generator=g), dim=-1)
    img = torch.nn.functional.normalize(torch.randn(B, E, generator=g), dim=-1)
    sp = torch.nn.functional.normalize(torch.randn(B, 2, E, generator=g), dim=-1)
    return q, img, sp, torch.rand(B, 2, generator=g) * 0.2


def leaves(ad: Adaptation) -> tuple[Adaptation, list[torch.Tensor]]:
    parts = [t.detach().requires_grad_() for t in (ad.refined_query, ad.U, ad.V)]
    return Adaptation(*parts, ad.variant, ad.anchor_scale), parts


def timed_step(model, opt, B: int, chunk: int | None) -> dict[str, float]:
    """One optimiser step; returns seconds in hypernet / loss / optimiser (and overhead)."""
    E = model.embedding_dim
    q, img, sp, w = batch(B, E)
    noisy = add_query_noise(q)
    opt.zero_grad(set_to_none=True)
    t = {"hypernet": 0.0, "loss": 0.0, "overhead": 0.0}
    chunk = chunk or B
    outs = []
    if chunk == B:
        t0 = time.perf_counter()
        ad = model(noisy, normalize=False)
        t["hypernet"] += time.perf_counter() - t0
        outs.append(ad)
    else:
        t0 = time.perf_counter()
        with torch.no_grad():
            parts = [model(noisy[i : i + chunk], normalize=False) for i in range(0, B, chunk)]
        t["overhead"] += time.perf_counter() - t0
        ad = Adaptation(
            torch.cat([p.refined_query for p in parts]),
            torch.cat([p.U for p in parts]),
            torch.cat([p.V for p in parts]),
        )
    t0 = time.perf_counter()
    cut, grads_for = leaves(ad)
    out = quari_loss(cut, img, semipos=sp, semipos_weights=w)
    out.loss.backward()
    t["loss"] += time.perf_counter() - t0
    grads = [g.grad for g in grads_for]
    t0 = time.perf_counter()
    if chunk == B:
        torch.autograd.backward([ad.refined_query, ad.U, ad.V], grads)
    else:
        for i in range(0, B, chunk):
            part = model(noisy[i : i + chunk], normalize=False)
            torch.autograd.backward(
                [part.refined_query, part.U, part.V], [g[i : i + chunk] for g in grads]
            )
    t["hypernet"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    opt.step()
    t["optimizer"] = time.perf_counter() - t0
    t["total"] = sum(t.values())
    return t


def run(cfg: HyperNetConfig, B: int, chunk: int | None, repeats: int, warmup: int = 1) -> dict:
    torch.manual_seed(0)
    model = QuARIModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-2)
    steps = [timed_step(model, opt, B, chunk) for _ in range(repeats + warmup)][warmup:]
    med = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
    compute = med["hypernet"] + med["loss"]
    return {
        "batch": B,
        "mode": "direct" if not chunk or chunk == B else f"chunked ({chunk})",
        "repeats": repeats,
        "step_s": round(med["total"], 3),
        "pairs_per_s": round(B / med["total"], 2),
        "hypernet_s": round(med["hypernet"], 3),
        "loss_s": round(med["loss"], 4),
        "optimizer_s": round(med["optimizer"], 4),
        "chunking_overhead_s": round(med["overhead"], 3),
        "hypernet_share": round(med["hypernet"] / compute, 4),
        "loss_share": round(med["loss"] / compute, 4),
        "peak_rss_mb_so_far": round(peak_rss_mb(), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_train.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        cfg = HyperNetConfig(embedding_dim=64, rank=8, hidden_dim=64, num_layers=1, num_heads=4)
        plan = [(64, 16, 3, 1), (16, None, 3, 1), (64, None, 3, 1)]
    else:
        cfg = HyperNetConfig(embedding_dim=768, rank=64, hidden_dim=512)  # paper size
        # Peak RSS only grows, so runs go in order of their own peak (the chunked batch-320
        # step holds one 16-pair chunk of activations): each row's figure is its own.
        # The batch-320 step takes minutes here, so it gets no warm-up step.
        plan = [(320, 16, 1, 0), (16, None, 2, 1), (32, None, 2, 1)]
    rows = []
    for B, chunk, repeats, warmup in plan:
        row = run(cfg, B, chunk, repeats, warmup)
        rows.append(row)
        print(
            f"batch {row['batch']:>4} {row['mode']:<14} {row['pairs_per_s']:>8.2f} pairs/s  "
            f"step {row['step_s']:>8.2f} s  hypernet {100 * row['hypernet_share']:5.1f} %  "
            f"loss {100 * row['loss_share']:5.2f} %  peak RSS {row['peak_rss_mb_so_far']:>8.0f} MB",
            flush=True,
        )
    result = {
        "machine": machine(),
        "threads": args.threads,
        "model": cfg.to_dict(),
        "precision": "fp32",
        "semipositives_per_query": 2,
        # Other processes compete for the CPUs on shared machines: record how busy it was.
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
