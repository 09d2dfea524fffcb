"""Trains the QuARI model that ``bench_search.py --data planted`` searches with.

Real CLIP embeddings cannot be fetched here, so the trained model is trained and measured on
*planted* 768-d caption–image pairs (:func:`quari.eval.synthetic.planted_768`: plain cosine
confuses the images of a cluster, a query-specific projection separates them). This writes
the training set (``write_planted_set``, seed 1 — the benchmark's gallery uses other seeds),
mines its semi-positives and trains with :func:`quari.training.train`, stopping at
``--max-steps`` or after ``--seconds`` of training, whichever comes first. Validation ranks
held-out images (whole images are held out) for their own captions, beside plain cosine.
``--data`` may be given several times: each is one draw (seed 1, 2, … in order; missing
draws and the gallery are written by parallel processes, the way to make ≥ 300,000 images
quickly on a many-core machine), trained on as one mixture (semi-positives are mined per
draw, on the GPU where there is one).

With ``--gallery N`` the exported model is also measured where ``bench_search.py --dataset
planted`` measures it: a held-out gallery of N images (draw seed ``--gallery-seed``, never a
training seed), the captions of 1,000 of its images as queries, recall@1 / @10 of an exact
scan with the model against plain cosine, on the training device.

By default the run uses ``quari train``'s default recipe (``--preset default``: on a GPU the
paper-sized model, E 768, H 512, 4 layers, 4 steps, r 64, batch 320, bf16-mixed; on a CPU the
small model); every flag given explicitly overrides the preset, as on the command line.
``--preset paper`` is the paper's recipe (noise q + s·ε, ‖noise‖ ≈ 28·s at E = 768, lr 1e-5).

Usage::

    PYTHONPATH=src python3 benchmarks/train_planted.py --out runs/planted-default --seconds 240
    PYTHONPATH=src python3 benchmarks/train_planted.py --out runs/planted-paper --preset paper
    PYTHONPATH=src python3 benchmarks/train_planted.py --out runs/p3 --images 100000 \
        --data data/p1 --data data/p2 --data data/p3 --gallery 100000

Prints one JSON line with the run's metrics (validation recall@1 / mAP of the model and of
plain cosine on held-out images, steps, seconds, device) and writes it to ``OUT/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import machine
from bench_search import planted_dataset, task_recall
from quari.checkpoint import load
from quari.eval.synthetic import planted_768, write_planted_set
from quari.retriever import Retriever
from quari.store import EmbeddingSet
from quari.training import TrainConfig, TrainSource, train

HERE = Path(__file__).resolve().parent
#: The resolved TrainConfig fields a report records.
RECIPE_FIELDS = (
    "preset", "variant", "init", "hidden_dim", "num_layers", "num_steps", "rank", "batch_size",
    "lr", "warmup_steps", "noise", "noise_scale", "semipos", "decoder_norm",
)  # fmt: skip


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


def _write_draw(folder: Path, images: int, captions: int, seed: int) -> None:
    write_planted_set(folder, images, planted_768(), captions_per_image=captions, seed=seed)


def _write_gallery(rows: int, seed: int, root: Path) -> None:
    planted_dataset(rows, planted_768(), seed, root)


def write_draws(data: list[Path], args) -> None:
    """Writes the missing training draws (the i-th with seed i) and the held-out gallery, one
    process each, BLAS threads split between them (oversubscribed, two writers took 20× as
    long on a 16-core machine)."""
    jobs = [
        (_write_draw, (folder, args.images, args.captions, seed))
        for seed, folder in enumerate(data, start=1)
        if not (folder / "manifest.json").exists()
    ]
    if args.gallery:
        jobs.append((_write_gallery, (args.gallery, args.gallery_seed, args.gallery_dir)))
    if len(jobs) <= 1:
        for fn, job_args in jobs:
            fn(*job_args)
        return
    threads = str(max(1, (os.cpu_count() or 1) // len(jobs)))
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    try:
        context = multiprocessing.get_context("spawn")  # children read the limits at start
        with ProcessPoolExecutor(len(jobs), mp_context=context) as pool:
            for future in [pool.submit(fn, *job_args) for fn, job_args in jobs]:
                future.result()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def held_out_gallery(model_dir: Path, args) -> dict:
    """Recall@1 / @10 of the exported model and of plain cosine on a held-out planted gallery.

    The gallery, queries and metric are ``bench_search.py --dataset planted``'s (its
    :func:`planted_dataset` folder is shared), answered by an exact scan on the training device.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eset = planted_dataset(args.gallery, planted_768(), args.gallery_seed, args.gallery_dir)
    true_rows = np.random.default_rng(10_000).choice(len(eset), 1000, replace=False)
    queries = eset.gather(true_rows, "text").astype(np.float32)
    retriever = Retriever(eset, load(model_dir), device=device, batch_size=256)
    out = {"rows": len(eset), "seed": args.gallery_seed, "queries": len(true_rows)}
    for label, mode in (("cosine", "plain"), ("model", "scan")):
        found = retriever.search(queries, 10, mode=mode, with_metadata=False).ids
        out[label] = {f"r@{at}": task_recall(found, true_rows, at) for at in (1, 10)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="run folder (model, logs)")
    ap.add_argument(
        "--data", type=Path, action="append", default=None,
        help="training set folder, written if missing (repeatable: the i-th is draw seed i; "
        "default: benchmarks/data/planted768-train)",
    )  # fmt: skip
    ap.add_argument("--images", type=int, default=50_000, help="images per written set")
    ap.add_argument("--captions", type=int, default=2, help="captions per image")
    ap.add_argument("--preset", choices=("default", "paper", "reference"), default="default")
    # Left unset, each of these is the preset's (sized for the device where it says so).
    ap.add_argument("--variant", choices=("paper", "reference"), default=None)
    ap.add_argument("--lr", type=float, default=None, help="peak lr")
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--noise-scale", type=float, default=None, help="query-noise scale")
    ap.add_argument("--hidden-dim", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=90.0, help="training time limit")
    ap.add_argument("--val-every", type=int, default=200)
    ap.add_argument("--gallery", type=int, default=0, help="held-out gallery rows (0: none)")
    ap.add_argument("--gallery-seed", type=int, default=1000)
    ap.add_argument("--gallery-dir", type=Path, default=HERE / "data")
    ap.add_argument(
        "--set", action="append", default=[], metavar="FIELD=JSON",
        help="any other TrainConfig field, e.g. --set semipos=false (repeatable)",
    )  # fmt: skip
    args = ap.parse_args()
    extra = {}
    for item in args.set:
        key, _, value = item.partition("=")
        extra[key] = json.loads(value)

    data = args.data or [HERE / "data" / "planted768-train"]
    t0 = time.perf_counter()
    write_draws(data, args)
    rows = sum(len(EmbeddingSet.open(folder)) for folder in data)
    data_s = time.perf_counter() - t0
    config = TrainConfig(
        train=tuple(TrainSource(folder) for folder in data),
        out=args.out,
        image_key="image_id",
        preset=args.preset,
        variant=args.variant,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        hidden_dim=args.hidden_dim,
        num_layers=args.layers,
        batch_size=args.batch_size,
        noise_scale=args.noise_scale,
        max_steps=args.max_steps,
        val_every_steps=args.val_every,
        checkpoint_every=args.max_steps,
        early_stopping_patience=None,
        export="last",
        **{"progress": False, **extra},
    )
    stop = StopAfter(args.seconds)
    t1 = time.perf_counter()
    result = train(config, callbacks=[stop])
    report = {
        "machine": machine(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "recipe": {k: getattr(config, k) for k in RECIPE_FIELDS},
        "rows": rows,
        "steps": stop.steps,
        "train_s": time.perf_counter() - t1,
        "data_s": data_s,
        "metrics": {k: float(v) for k, v in result.metrics.items()},
    }
    if args.gallery:
        report["gallery"] = held_out_gallery(result.model_dir, args)
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
