"""The first optimiser steps of a training recipe at a given model size: does it stay at the
frozen backbone's loss and learn, or collapse to chance?

A paper-sized model (E 768, H 512, 4 layers, 4 steps, r 64) trained with the recipe tuned on the
small CPU model collapsed to chance within ten steps (docs/method.md §5.5); this script shows it
in minutes on a CPU. Each recipe trains a fresh model on planted 768-d caption–image pairs
(``planted_768``, 20,000 images) with the QuARI loss (in-batch negatives, relative query noise
0.5, AdamW, gradient clipping 1.0, linear warm-up over ``--warmup`` steps) and prints the
training loss and in-batch accuracy every few steps. With the identity start, step 0 is plain
cosine's loss; chance is ln(batch).

Usage::

    PYTHONPATH=src python benchmarks/train_stability.py --steps 21 \\
        --recipe "before: lr 1e-3, no decoder norm" '{"lr": 0.001, "decoder_norm": false}' \\
        --recipe "default" '{}'

Writes ``benchmarks/results/train_stability.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import machine
from quari.eval.synthetic import planted_768, planted_pairs
from quari.hypernet import QuARIModel
from quari.training import TrainConfig, TrainSource
from quari.training.loss import add_query_noise, quari_loss

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_SIZE = {"rank": 64, "hidden_dim": 512, "num_layers": 4, "num_heads": 8, "num_steps": 4}


def run(name: str, changes: dict, data, args) -> dict:
    """Trains one fresh model for ``args.steps`` steps; returns its loss curve."""
    cfg = TrainConfig(train=(TrainSource(Path("unused")),), out=Path("unused"),
                      accelerator="cpu", **{**PAPER_SIZE, **changes})  # fmt: skip
    torch.manual_seed(args.seed)
    model = QuARIModel(cfg.model_config(768)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    images, texts, own = data
    g = torch.Generator().manual_seed(args.seed)
    curve, t0 = [], time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / args.warmup)
        idx = torch.randint(0, len(texts), (args.batch,), generator=g)
        queries = add_query_noise(texts[idx], cfg.noise_scale, relative=cfg.noise == "relative")
        out = quari_loss(model(queries, normalize=False), images[own[idx]])
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % args.every == 0 or step == args.steps - 1:
            curve.append({"step": step, "loss": round(out.loss.item(), 4),
                          "accuracy": round(out.accuracy.item(), 4)})  # fmt: skip
            print(f"  {name:<40} step {step:3d}  loss {curve[-1]['loss']:.3f}  "
                  f"accuracy {curve[-1]['accuracy']:.3f}", flush=True)  # fmt: skip
    return {"recipe": name, "changes": changes, "lr": cfg.lr, "decoder_norm": cfg.decoder_norm,
            "curve": curve, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", nargs=2, action="append", metavar=("NAME", "JSON"),
                    help="TrainConfig changes from the default recipe (repeatable)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=21)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "train_stability.json")
    args = ap.parse_args()
    recipes = args.recipe or [("default", "{}")]
    pairs = planted_pairs(planted_768(), args.images, captions_per_image=1, seed=1)
    data = tuple(torch.from_numpy(x) for x in (pairs.images, pairs.texts, pairs.image_of_text))
    print(f"paper size {PAPER_SIZE}, batch {args.batch}, chance loss {math.log(args.batch):.3f}")
    rows = [run(name, json.loads(changes), data, args) for name, changes in recipes]
    report = {"machine": machine(), "threads": torch.get_num_threads(),
              "size": PAPER_SIZE, "batch": args.batch, "warmup": args.warmup,
              "chance_loss": math.log(args.batch), "runs": rows}  # fmt: skip
    print(
        f"\n| recipe | lr | decoder norm | loss at steps {[p['step'] for p in rows[0]['curve']]} |"
    )
    for r in rows:
        print(
            f"| {r['recipe']} | {r['lr']:.3g} | {r['decoder_norm']} | "
            + " / ".join(f"{p['loss']:.2f}" for p in r["curve"])
            + " |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
