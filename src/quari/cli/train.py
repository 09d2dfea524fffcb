"""Commands for training: ``quari mine`` (semi-positives) and ``quari train`` (a QuARI model, or
with ``--adapter linear`` the static linear-adaptation baseline on the same pairs).

Lightning is imported inside ``train`` only, so other commands start fast.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from quari.adapters import LinearAdapter
from quari.checkpoint import validation_verdict
from quari.cli import app, console, friendly_errors
from quari.fileio import read_json
from quari.store import EmbeddingSet
from quari.training.config import TrainConfig, TrainSource
from quari.training.mining import MiningConfig, mine_semipositives
from quari.validation import QuARIInputError
from quari.whitening import DEFAULT_SHRINKAGE, set_rows


@app.command()
@friendly_errors
def mine(
    set_path: Annotated[Path, typer.Argument(help="Embedding set folder.")],
    k: Annotated[int, typer.Option(help="Neighbours in the softmax.")] = 100,
    keep: Annotated[int, typer.Option(help="Neighbours kept as semi-positives.")] = 2,
    temperature: Annotated[float, typer.Option(help="τ of softmax(sims / τ).")] = 0.07,
    factory: Annotated[
        str | None, typer.Option(help="FAISS factory (default: Flat, IVF for large sets).")
    ] = None,
    nprobe: Annotated[int, typer.Option(help="IVF lists probed per query.")] = 64,
    overwrite: Annotated[
        bool, typer.Option(help="Replace stale semi-positives (other parameters or data).")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Mine semi-positives (nearest backbone neighbours) beside an embedding set; resumable."""
    eset = EmbeddingSet.open(set_path)
    config = MiningConfig(k=k, keep=keep, temperature=temperature, factory=factory, nprobe=nprobe)
    semi = mine_semipositives(eset, config, overwrite=overwrite, progress=not quiet)
    found = int((semi.ids >= 0).all(axis=1).sum())
    console.print(
        f"mined {keep} semi-positives for {found:,} of {eset.rows:,} rows "
        f"(k={k}, τ={temperature:g}, {config.factory_for(eset.rows)}) → {eset.root / 'semipos'}"
    )


@app.command("train")
@friendly_errors
def train_command(
    train: Annotated[
        list[str],
        typer.Option("--train", help="Training set, optionally SET:ratio (repeatable)."),
    ],
    out: Annotated[Path, typer.Option(help="Output folder (model, checkpoints, logs).")],
    val: Annotated[
        Path | None,
        typer.Option(help="Validation set (default: hold out images of the training sets)."),
    ] = None,
    image_key: Annotated[
        str | None, typer.Option(help="Metadata column grouping the captions of one image.")
    ] = None,
    relevance_key: Annotated[
        str | None,
        typer.Option(
            help="Metadata column(s), comma-separated, that decide relevance (an image is "
            "relevant when all are equal, e.g. label): validation and the 'best' export use it, "
            "and the default recipe does not push same-key images apart; default: the "
            "caption's own image."
        ),
    ] = None,
    val_fraction: Annotated[float, typer.Option(help="Images held out for validation.")] = 0.05,
    preset: Annotated[
        str,
        typer.Option(
            help="default (starts at the frozen backbone, sized for this device), paper (the "
            "paper's recipe and size) or reference (the reference code's)."
        ),
    ] = "default",
    variant: Annotated[
        str | None, typer.Option(help="Model variant: paper or reference (default: preset's).")
    ] = None,
    init: Annotated[
        str | None, typer.Option(help="Initialisation: identity or default (default: preset's).")
    ] = None,
    map_query: Annotated[
        bool | None,
        typer.Option(
            "--map-query/--decoded-query",
            help="q′ = T q, the query mapped like the items (default recipe), or q′ from the "
            "query decoder (paper, reference; default: preset's).",
        ),
    ] = None,
    rank: Annotated[
        int | None,
        typer.Option(
            help="Rank r of the map (default: preset's; --adapter linear: the low-rank form "
            "W = I + L Rᵀ, default the full map)."
        ),
    ] = None,
    hidden_dim: Annotated[int | None, typer.Option(help="Transformer width H.")] = None,
    layers: Annotated[int | None, typer.Option(help="Transformer layers.")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Refinement steps L.")] = None,
    single_step: Annotated[
        bool, typer.Option(help="Ablation: one refinement step (w/o iterative generation).")
    ] = False,
    no_semipos: Annotated[bool, typer.Option(help="Ablation: no semi-positives.")] = False,
    no_noise: Annotated[bool, typer.Option(help="Ablation: no query noise.")] = False,
    noise: Annotated[
        str | None,
        typer.Option(help="Query noise: relative (‖noise‖ ≈ σ) or paper (≈ σ·√E)."),
    ] = None,
    noise_scale: Annotated[
        float | None, typer.Option(help="Query-noise scale σ (default: preset's).")
    ] = None,
    image_queries: Annotated[
        float | None,
        typer.Option(
            help="Share of pairs asked with their own (noised) image instead of the "
            "caption (default: preset's; 0 = captions only, as the paper)."
        ),
    ] = None,
    relevance_negatives: Annotated[
        bool | None,
        typer.Option(
            "--relevance-negatives/--no-relevance-negatives",
            help="With --relevance-key: in-batch images sharing a caption's key are not its "
            "negatives (default: preset's — on in the default recipe).",
        ),
    ] = None,
    false_negative_threshold: Annotated[
        float | None,
        typer.Option(
            help="Mask in-batch images whose caption has at least this cosine to the "
            "query's caption (default: preset's; 0 = off, as the paper)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Pairs per device per step (default: preset's; linear: 128).")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Peak learning rate (default: preset; linear: 1e-3).")
    ] = None,
    temperature: Annotated[
        float,
        typer.Option(
            help="τ of the contrastive loss. Lower (0.01-0.02) trades image→image for "
            "text→image quality (docs/results.md, retrieval quality)."
        ),
    ] = 0.07,
    blend_weight: Annotated[
        float | None,
        typer.Option(
            help="Weight a of the whitened cosine mixed into the exported model's score, "
            "(1 − a)·QuARI + a·cos(Wq, Wd) (default: preset's — 0.5 on a CPU, 0 on a GPU and "
            "in the paper preset; 0 = QuARI alone)."
        ),
    ] = None,
    whitening_shrinkage: Annotated[
        float,
        typer.Option(
            help="Shrinkage of the whitening W (--blend-weight, --adapter whitening): smaller "
            "buys image→image with text→image."
        ),
    ] = DEFAULT_SHRINKAGE,
    max_steps: Annotated[int | None, typer.Option(help="Optimiser steps (else epochs).")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs when --max-steps is not given.")] = 10,
    warmup_steps: Annotated[int | None, typer.Option(help="Warm-up steps (cosine).")] = None,
    patience: Annotated[
        int, typer.Option(help="Early-stopping patience in validations (0: off).")
    ] = 5,
    val_every: Annotated[
        int | None, typer.Option(help="Validate every N steps (default: each epoch).")
    ] = None,
    export: Annotated[
        str,
        typer.Option(
            help="Weights to export: best (the best validated checkpoint, or the start when "
            "training only made things worse) or last."
        ),
    ] = "best",
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 1000,
    checkpoint_minutes: Annotated[
        float, typer.Option(help="... and every M minutes (0: by steps only).")
    ] = 10.0,
    log_every: Annotated[
        int, typer.Option(help="Log metrics (and print a line, in a log file) every N steps.")
    ] = 50,
    devices: Annotated[int, typer.Option(help="Devices (GPUs); >1 runs DDP.")] = 1,
    num_nodes: Annotated[int, typer.Option(help="Nodes (torchrun / SLURM).")] = 1,
    accelerator: Annotated[str, typer.Option(help="auto, cpu, gpu …")] = "auto",
    precision: Annotated[
        str | None, typer.Option(help="Lightning precision (default: bf16-mixed on GPU).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed (init, data order, noise, split).")] = 0,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    adapter: Annotated[
        str,
        typer.Option(
            help="quari (the hypernetwork), linear (the static linear-adaptation baseline, "
            "trained on the same pairs and split; uses --epochs, --max-steps, --batch-size, "
            "--lr, --seed, --out-dim, and --rank for the low-rank form W = I + L Rᵀ) or "
            "whitening (the sets' shrinkage whitening, no training; uses "
            "--whitening-shrinkage)."
        ),
    ] = "quari",
    out_dim: Annotated[
        int | None, typer.Option(help="Linear adapter: projected dimension (default min(512, E)).")
    ] = None,
) -> None:
    """Train a QuARI model (or a linear-adapter baseline) on caption ↔ image pairs."""
    if adapter == "linear":
        from quari.eval.linear import LinearTrainConfig, train_linear

        linear = LinearTrainConfig(
            train=tuple(TrainSource.parse(t) for t in train),
            out=out,
            val=val,
            image_key=image_key,
            val_fraction=val_fraction,
            out_dim=out_dim,
            rank=rank,
            epochs=epochs,
            batch_size=batch_size or 128,
            lr=lr or 1e-3,
            temperature=temperature,
            max_steps=max_steps,
            seed=seed,
            progress=not quiet,
        )
        done = train_linear(linear)
        console.print(
            f"trained a linear adapter for {done.steps:,} steps → {done.model_dir} (best epoch "
            f"{done.best_epoch + 1}); validation {_validation_summary(done.metrics)}"
        )
        return
    if adapter == "whitening":
        sets = [EmbeddingSet.open(TrainSource.parse(t).path) for t in train]
        vectors = set_rows(sets)
        encoder = sets[0].encoder
        whitening = LinearAdapter.whitening(vectors, whitening_shrinkage, {"encoder": encoder})
        whitening.save(out)
        console.print(
            f"fitted the whitening of {len(vectors) // 2:,} rows' images and captions "
            f"(shrinkage {whitening_shrinkage:g}) → {out}"
        )
        return
    if adapter != "quari":
        raise QuARIInputError(f"--adapter must be quari, linear or whitening, got {adapter!r}")
    from quari.training.loop import train as run_training

    config = TrainConfig(
        train=tuple(TrainSource.parse(t) for t in train),
        out=out,
        val=val,
        image_key=image_key,
        relevance_key=relevance_key,
        val_fraction=val_fraction,
        preset=preset,
        variant=variant,
        init=init,
        map_query=map_query,
        rank=rank,
        hidden_dim=hidden_dim,
        num_layers=layers,
        num_heads=heads,
        num_steps=1 if single_step else steps,
        semipos=not no_semipos,
        noise=noise,
        noise_scale=0.0 if no_noise else noise_scale,
        image_queries=image_queries,
        false_negative_threshold=false_negative_threshold,
        relevance_negatives=relevance_negatives,
        batch_size=batch_size,
        lr=lr,
        temperature=temperature,
        blend_weight=blend_weight,
        whitening_shrinkage=whitening_shrinkage,
        max_steps=max_steps,
        max_epochs=epochs,
        warmup_steps=warmup_steps,
        early_stopping_patience=patience or None,
        val_every_steps=val_every,
        export=export,
        checkpoint_every=checkpoint_every,
        checkpoint_minutes=checkpoint_minutes or None,
        log_every=log_every,
        devices=devices,
        num_nodes=num_nodes,
        accelerator=accelerator,
        precision=precision,
        seed=seed,
        num_workers=workers,
        progress=not quiet,
    )
    result = run_training(config, resume=resume)
    if result.interrupted:
        console.print(
            f"{result.interrupted}: stopped at step {result.steps:,}; checkpoint saved in "
            f"{out / 'checkpoints'} — continue with the same command plus --resume"
        )
        # SystemExit, not typer.Exit: friendly_errors passes it through as the exit status.
        raise SystemExit(128 + int(getattr(signal, result.interrupted)))
    summary = _validation_summary(result.metrics)
    console.print(
        f"trained {result.steps:,} steps → {result.model_dir} ({result.exported} weights)"
        + (f"; validation {summary}" if summary else "")
    )
    verdict = validation_verdict(result.metrics)
    if verdict:
        console.print(verdict, style="bold yellow" if verdict.startswith("Below") else None)
    # the blend's record in the exported model's card (none when the run asked for none)
    blend = read_json(result.model_dir / "config.json").get("metadata", {}).get("blend")
    if blend:
        console.print(_blend_note(blend))
    if result.exported == "start":
        attached = bool(blend) and blend.get("attached") == "yes"
        console.print(
            "Every validated checkpoint scored below the starting point, so the exported model "
            "is that start: it ranks exactly as plain cosine"
            + (" (mixed with the whitened cosine)" if attached else "")
            + ". Training did not improve on plain cosine for this data.",
            style="bold yellow",
        )


def _blend_note(info: dict[str, Any]) -> str:
    """What the export did with the static blend, from its record in the model card:
    attached (with validation without it), or left off and why."""
    if info.get("attached") != "yes":
        return (
            f"The whitened-cosine blend (a = {info['weight']:g}) was left off: "
            f"{info['attached'].removeprefix('no: ')}."
        )
    without = info.get("metrics_without_blend", {}).get("val/mAP")
    return (
        f"The exported score mixes QuARI's with the training rows' whitened cosine "
        f"(a = {info['weight']:g})"
        + (f"; validation mAP without the mix {without:.4f}" if without is not None else "")
        + " — `--blend-weight 0` exports QuARI's score alone."
    )


def _validation_summary(m: dict[str, float]) -> str:
    """``recall@1 0.512 (cosine 0.431), …`` from ``val/…`` and ``baseline/…`` metrics."""
    return ", ".join(
        f"{name} {m[f'val/{name}']:.3f} (cosine {m[f'baseline/{name}']:.3f})"
        for name in ("recall@1", "recall@10", "mAP")
        if f"val/{name}" in m and f"baseline/{name}" in m
    )
