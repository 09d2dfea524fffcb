"""Trains the QuARI model that ``bench_search.py --data planted`` searches with.

Real CLIP embeddings cannot be fetched here, so the trained model is trained and measured on
*planted* 768-d caption–image pairs (:func:`quari.eval.synthetic.planted_768`: plain cosine
confuses the images of a cluster, a query-specific projection separates them). This writes
the training set (``write_planted_set``, seed 1 — the benchmark's gallery uses other seeds),
mines its semi-positives and trains a paper-sized model (E 768, H 512, 4 layers, 4 steps,
r 64) with :func:`quari.training.train`, stopping at ``--max-steps`` or after ``--seconds`` of
training, whichever comes first. Meant for a GPU (bf16 autocast, batch 320); on a CPU give
small ``--images`` / ``--max-steps``.

The paper's query noise (q + s·ε, ε ~ N(0, I), norm ≈ s·√768 ≈ 28·s) is meant for long
training on millions of pairs; in a run of a few hundred steps it hides the unit query
completely (an H200 run at scale 1.0 stayed at chance loss and recall@1 0.04 against cosine's
0.80), so the benchmark model is trained with ``--noise-scale 0.03`` (‖noise‖ ≈ 0.8·s, the
signal-to-noise ratio of the CPU end-to-end test).

Usage::

    PYTHONPATH=src python3 benchmarks/train_planted.py --out runs/planted-paper \\
        --variant paper --lr 3e-4 --noise-scale 0.03 --max-steps 1000 --seconds 90

Prints one JSON line with the run's metrics (validation recall@1 / mAP of the model and of
plain cosine on held-out images, steps, seconds) and writes it to ``OUT/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L

from quari.eval.synthetic import planted_768, write_planted_set
from quari.store import EmbeddingSet
from quari.training import TrainConfig, TrainSource, train

HERE = Path(__file__).resolve().parent


class StopAfter(L.Callback):
    """Ends training gracefully (the model is still exported) after ``seconds`` of steps."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start: float | None = None
        self.steps = 0

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        self.steps += 1
        if time.perf_counter() - self.start > self.seconds:
            trainer.should_stop = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="run folder (model, logs)")
    ap.add_argument("--data", type=Path, default=HERE / "data" / "planted768-train")
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--captions", type=int, default=2, help="captions per image")
    ap.add_argument("--variant", choices=("paper", "reference"), default="paper")
    ap.add_argument("--lr", type=float, default=None, help="peak lr (default: the preset's)")
    ap.add_argument("--batch-size", type=int, default=320)
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=90.0, help="training time limit")
    ap.add_argument("--val-every", type=int, default=200)
    ap.add_argument("--noise-scale", type=float, default=1.0, help="query-noise scale")
    ap.add_argument("--hidden-dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    t0 = time.perf_counter()
    if not (args.data / "manifest.json").exists():
        write_planted_set(
            args.data, args.images, planted_768(), captions_per_image=args.captions, seed=1
        )
    rows = len(EmbeddingSet.open(args.data))
    data_s = time.perf_counter() - t0
    config = TrainConfig(
        train=(TrainSource(args.data),),
        out=args.out,
        image_key="image_id",
        preset=args.variant,
        variant=args.variant,
        lr=args.lr,
        hidden_dim=args.hidden_dim,
        num_layers=args.layers,
        batch_size=args.batch_size,
        noise_scale=args.noise_scale,
        max_steps=args.max_steps,
        warmup_steps=min(100, args.max_steps // 10),
        val_every_steps=args.val_every,
        checkpoint_every=args.max_steps,
        early_stopping_patience=None,
        export="last",
        progress=False,
    )
    stop = StopAfter(args.seconds)
    t1 = time.perf_counter()
    result = train(config, callbacks=[stop])
    report = {
        "variant": args.variant,
        "lr": config.lr,
        "noise_scale": config.noise_scale,
        "rows": rows,
        "steps": stop.steps,
        "train_s": time.perf_counter() - t1,
        "data_s": data_s,
        "metrics": {k: float(v) for k, v in result.metrics.items()},
    }
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
