"""The training entry point: :func:`train` builds the data, the module and a Lightning Trainer.

A run folder (``config.out``) holds::

    config.json, model.safetensors, README.md    the exported model (quari model folder)
    train_config.json                            the TrainConfig of the run
    checkpoints/last.ckpt                        resumable Lightning state (every N steps)
    checkpoints/step-00001000/ …                 model-folder checkpoints (the last K kept)
    checkpoints/best/                            model folder of the best validation mAP
    logs/csv/version_*/metrics.csv, logs/tensorboard/version_*/   training logs
    .quari-train.lock                            held while a run trains here (one at a time)

``train(config, resume=True)`` continues from ``checkpoints/last.ckpt``: weights, optimiser,
schedule, loop counters, early-stopping and best-model state are restored, the data order
continues at the restored step and each step re-seeds its noise, so on CPU a resumed run ends
with the same weights as an uninterrupted one. The checkpoint is read with
``weights_only=True`` (it holds only tensors and plain containers).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from filelock import FileLock, Timeout
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from quari.checkpoint import load, save
from quari.errors import CheckpointError, LockError, QuARIInputError, TrainingError
from quari.fileio import atomic_write
from quari.hypernet import QuARIModel
from quari.training.callbacks import (
    CHECKPOINTS,
    LAST,
    GracefulStop,
    ProgressReport,
    RunCheckpoints,
    TrainingInterrupted,
)
from quari.training.config import TrainConfig
from quari.training.data import ResumableBatchSampler, ResumableLoader, TrainingData
from quari.training.module import SELECTION_METRIC, QuARITrainingModule, validation_metrics
from quari.whitening import fit_whitening

__all__ = ["PairDataModule", "RunCheckpoints", "TrainResult", "train"]

# Fields that may change when a run is resumed (they do not change what is computed). The run
# length is not among them: the learning-rate schedule is laid out over it.
_RESUMABLE_CHANGES = {
    "progress",
    "num_workers",
    "log_every",
    "early_stopping_patience",
    "checkpoint_every",
    "checkpoint_minutes",
    "keep_checkpoints",
    "export",
}


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        model_dir: The exported model folder (``config.out``).
        steps: Optimiser steps taken in all (over resumes).
        metrics: Validation metrics of the exported weights (``val/…``, ``baseline/…``).
        exported: ``"best"``, ``"last"`` or ``"start"`` (the identity start, when every
            validated checkpoint scored below it and ``export="best"``): which weights were
            exported (``"none"`` when the run was interrupted: only its checkpoint was
            written).
        interrupted: The signal that stopped the run (``"SIGINT"``, ``"SIGTERM"``), or None.
    """

    model_dir: Path
    steps: int
    metrics: dict[str, float]
    exported: str
    interrupted: str | None = None


class PairDataModule(L.LightningDataModule):
    """Training batches (resumable, rank-sliced) and the validation queries of a run."""

    def __init__(
        self,
        data: TrainingData,
        config: TrainConfig,
        val_queries: torch.Tensor,
        val_target: torch.Tensor,
    ) -> None:
        super().__init__()
        self.data = data
        self.config = config
        self.val_queries = val_queries
        self.val_target = val_target
        self.batches = None

    def setup(self, stage: str) -> None:
        self.batches = self.data.batches(
            self.config.batch_size,
            world_size=self.trainer.world_size,
            rank=self.trainer.global_rank,
            epoch_pairs=self.config.epoch_pairs,
        )

    def _position(self) -> tuple[int, int]:
        """(epoch, first step) to start from: the restored position after a resume."""
        epoch, steps = self.trainer.current_epoch, len(self.batches)
        return epoch, min(steps, max(0, self.trainer.global_step - epoch * steps))

    def train_dataloader(self) -> DataLoader:
        sampler = ResumableBatchSampler(len(self.batches), self._position)
        return ResumableLoader(
            self.batches,
            batch_size=None,
            sampler=sampler,
            num_workers=self.config.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        size, rank = self.trainer.world_size, self.trainer.global_rank
        part = np.array_split(np.arange(self.val_queries.shape[0]), size)[rank]
        dataset = TensorDataset(self.val_queries[part], self.val_target[part])
        return DataLoader(dataset, batch_size=256, shuffle=False)


def _precision(config: TrainConfig) -> str:
    if config.precision is not None:
        return config.precision
    gpu = config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"


def _strategy(config: TrainConfig) -> Any:
    if config.strategy != "auto":
        return config.strategy
    if config.devices > 1 or config.num_nodes > 1:
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=False)
    return "auto"


def _check_accelerator(config: TrainConfig) -> None:
    """Refuses, before any work, an accelerator this machine does not have."""
    want = config.accelerator
    if want in ("gpu", "cuda") and not torch.cuda.is_available():
        raise QuARIInputError(
            f"--accelerator {want}: no CUDA device on this machine; use --accelerator cpu (or auto)"
        )
    if want == "mps" and not torch.backends.mps.is_available():
        raise QuARIInputError("--accelerator mps: MPS is not available on this machine")
    if want not in ("auto", "cpu", "gpu", "cuda", "mps"):
        raise QuARIInputError(f"--accelerator {want!r}: use auto, cpu, gpu or mps")


def _check_run_folder(config: TrainConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); refuses to clobber a run.

    A folder whose run stopped before its first checkpoint (a failed start) holds nothing to
    keep: it is started again rather than refused.
    """
    last = config.out / CHECKPOINTS / LAST
    saved = config.out / "train_config.json"
    if not resume:
        if last.exists():
            raise TrainingError(
                f"{config.out}: already holds a training run; resume it (--resume) or choose "
                "another --out"
            )
        return None
    if not last.is_file():
        started = " (the run there stopped before its first checkpoint)" if saved.exists() else ""
        raise TrainingError(
            f"{last}: no checkpoint to resume from{started}; start the run without --resume"
        )
    try:  # the same safe reader Lightning uses below, so a bad file is named, not traced
        torch.load(last, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"{last}: not a readable checkpoint ({type(exc).__name__}: {first[:200]}); it is "
            "corrupt or not a plain checkpoint — start a new run in another --out"
        ) from None
    if saved.is_file():
        # Through TrainConfig, so that a file from before a field existed reads as its default.
        before = TrainConfig.from_dict(json.loads(saved.read_text())).to_dict()
        now = config.to_dict()
        keys = (set(before) | set(now)) - _RESUMABLE_CHANGES
        changed = sorted(k for k in keys if before.get(k) != now.get(k))
        if changed:
            raise TrainingError(
                f"{config.out}: cannot resume with changed settings {changed} (they change "
                "what the run computes); start a new run in another --out"
            )
    return last


def _describe(data: TrainingData, config: TrainConfig) -> dict[str, Any]:
    """The model card's account of the data and the recipe."""
    summary = data.summary()
    parts = [
        f"{t['path']} ({t['pairs']:,} pairs, {100 * t['share']:.0f} %)" for t in summary["train"]
    ]
    val = summary["val"]
    warmup = "1 % of the run" if config.warmup_steps is None else f"{config.warmup_steps} steps"
    schedule = (
        f"cosine from lr {config.lr:g} to {config.min_lr:g} after a linear warm-up of {warmup}"
        if config.schedule == "cosine"
        else f"OneCycle, peak lr {config.lr:g}"
    )
    noise = "off"
    if config.noise_scale:
        noise = (
            f"relative, ‖noise‖ ≈ {config.noise_scale:g}·U[0,1]"
            if config.noise == "relative"
            else f"the paper's, {config.noise_scale:g}·U[0,1]·N(0, I)"
        )
    length = f"{config.max_steps:,} steps" if config.max_steps else f"{config.max_epochs} epochs"
    negatives = "every other in-batch image"
    if config.relevance_negatives and config.relevance_key:
        negatives = f"in-batch images of another {'/'.join(config.relevance_key)}"
    if config.false_negative_threshold:
        negatives += f", captions at cosine < {config.false_negative_threshold:g}"
    extra = f"; {100 * config.image_queries:g} % image queries" if config.image_queries else ""
    return {
        "encoder": data.encoder,
        "data": " + ".join(parts),
        "validation": (
            f"{val['path']}: {val['queries']:,} queries over {val['images']:,} images; "
            f"relevance: {val['relevance']}"
        ),
        "training": (
            f"preset {config.preset}; AdamW (weight decay {config.weight_decay:g}), {schedule}; "
            f"batch {config.batch_size} × {config.devices * config.num_nodes} device(s); "
            f"{length}; τ {config.temperature:g}; semi-positives "
            f"{'on' if config.semipos else 'off'}; negatives: {negatives}{extra}; query noise "
            f"{noise}; seed {config.seed}"
        ),
    }


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    callbacks: list[Callback] | None = None,
) -> TrainResult:
    """Trains a QuARI model and exports it as a model folder in ``config.out``.

    Args:
        config: The run (data, model shape, schedule, ablations, devices …).
        resume: Continue the run in ``config.out`` from its last checkpoint.
        callbacks: Extra Lightning callbacks (tests use them to interrupt a run).

    Returns:
        A :class:`TrainResult`.

    Raises:
        QuARIInputError: bad data (mixed encoders, no text embeddings, empty splits …).
        StoreError: unreadable embedding sets.
        TrainingError: a non-finite loss (the message names the step and the batch; the
            checkpoints written before it are kept), or a run folder that cannot be
            resumed or would be overwritten.
        LockError: another run is training into ``config.out`` now.

    Example:
        >>> cfg = TrainConfig(train=(TrainSource(Path("coco")),), out=Path("runs/coco"),
        ...                   image_key="image_id")  # doctest: +SKIP
        >>> result = train(cfg)  # doctest: +SKIP
        >>> result.metrics["val/recall@1"]  # doctest: +SKIP
    """
    _check_accelerator(config)
    with _run_lock(config.out):
        return _run(config, resume, callbacks)


#: The run folder's lock file: held (an OS file lock) by the process that runs ``train``.
RUN_LOCK = ".quari-train.lock"


def _launching_process() -> bool:
    """Whether this process started the run. DDP launchers that re-run the script (Lightning's
    ``ddp``, ``torchrun``, other nodes) call :func:`train` once per rank; only rank 0 of node 0
    takes the lock (``ddp_spawn`` ranks never call it)."""
    rank = os.environ.get("RANK")
    if rank is not None:
        return rank == "0"
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


@contextlib.contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """Holds ``out``'s run lock for the whole run, so that a second ``train`` into the same
    folder — which would share its checkpoints and logs — stops at once with a clear error.
    Released when the run ends, however it ends (the OS drops it if the process dies). A
    folder made only to hold the lock is removed again if the run wrote nothing."""
    if not _launching_process():
        yield
        return
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / RUN_LOCK)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise LockError(
            f"{out}: another training run is writing to this folder (it holds {RUN_LOCK}); "
            "wait for it to finish, or choose another --out"
        ) from None
    try:
        yield
    finally:
        lock.release()
        if made and [f.name for f in out.iterdir()] == [RUN_LOCK]:
            shutil.rmtree(out, ignore_errors=True)


def _run(config: TrainConfig, resume: bool, callbacks: list[Callback] | None) -> TrainResult:
    """:func:`train` under the run lock."""
    ckpt = _check_run_folder(config, resume)
    data = TrainingData.from_config(config, progress=config.progress)
    queries, gallery, _ = data.val_vectors()
    query_keys, gallery_keys = data.val_relevance()
    world = config.devices * config.num_nodes
    if queries.shape[0] < world:
        raise TrainingError(
            f"{queries.shape[0]} validation queries cannot be shared by {world} devices; hold "
            "out more images"
        )
    config.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    atomic_write(config.out / "train_config.json", lambda f: f.write(text.encode()))

    L.seed_everything(config.seed, workers=True, verbose=False)
    model_config = config.model_config(data.dim)
    module = QuARITrainingModule(model_config.to_dict(), config.to_dict())
    module.set_validation_gallery(gallery, gallery_keys)
    datamodule = PairDataModule(data, config, queries, query_keys)
    description = _describe(data, config)
    selection = f"{SELECTION_METRIC} (AP@1000; relevance: {data.relevance_description})"
    checkpoints = RunCheckpoints(
        config.out,
        config.checkpoint_every,
        config.keep_checkpoints,
        description,
        minutes=config.checkpoint_minutes,
        selection=selection,
    )
    stop = GracefulStop(checkpoints)
    total = _total_steps(config, data)
    all_callbacks: list[Callback] = [checkpoints, stop]
    if config.progress:
        _print_plan(config, data, module, total)
        all_callbacks.append(
            ProgressReport(
                total,
                config.batch_size * world,
                every=config.log_every,
                hint="to shorten it: --max-steps N or --epochs N; a smaller model: "
                "--hidden-dim, --layers, --steps, --rank; stop any time with Ctrl-C and "
                "continue with --resume",
            )
        )
    if config.early_stopping_patience is not None:
        all_callbacks.append(
            EarlyStopping(
                SELECTION_METRIC,
                mode="max",
                patience=config.early_stopping_patience,
                check_on_train_epoch_end=False,
            )
        )
    all_callbacks += list(callbacks or [])
    val_args: dict[str, Any] = {"check_val_every_n_epoch": 1}
    if config.val_every_steps is not None:
        val_args = {"val_check_interval": config.val_every_steps, "check_val_every_n_epoch": None}
    logs = config.out / "logs"
    trainer = L.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=_strategy(config),
        precision=_precision(config),
        max_steps=config.max_steps if config.max_steps is not None else -1,
        max_epochs=None if config.max_steps is not None else config.max_epochs,
        gradient_clip_val=config.grad_clip or None,
        callbacks=all_callbacks,
        logger=[CSVLogger(logs, name="csv"), TensorBoardLogger(logs, name="tensorboard")],
        # at most an epoch: Lightning warns of a longer interval than the epoch on small sets
        log_every_n_steps=max(1, min(config.log_every, _steps_per_epoch(config, data))),
        enable_checkpointing=False,  # RunCheckpoints writes both checkpoint kinds
        enable_progress_bar=False,  # ProgressReport: a bar on a terminal, lines in a log
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # PairBatches slices each global batch by rank
        default_root_dir=config.out,
        **val_args,
    )
    try:
        with stop:
            trainer.fit(
                module,
                datamodule=datamodule,
                ckpt_path=None if ckpt is None else str(ckpt),
                weights_only=True,
            )
    except (TrainingInterrupted, SIGTERMException):
        if stop.signum is None:
            raise
    if stop.signum is not None:
        return TrainResult(
            config.out,
            checkpoints.last_saved,
            {},
            "none",
            interrupted=signal.Signals(stop.signum).name,
        )
    return _export(config, data, (queries, gallery, query_keys, gallery_keys), selection)


def _steps_per_epoch(config: TrainConfig, data: TrainingData) -> int:
    """Optimiser steps of one epoch (all devices together)."""
    world = config.devices * config.num_nodes
    return (config.epoch_pairs or data.train_pairs) // (config.batch_size * world)


def _total_steps(config: TrainConfig, data: TrainingData) -> int:
    """Optimiser steps of the whole run (before any early stop)."""
    if config.max_steps is not None:
        return config.max_steps
    return config.max_epochs * _steps_per_epoch(config, data)


def _count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless n is 1 ("1 refinement step", "4 layers")."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _print_plan(
    config: TrainConfig, data: TrainingData, module: QuARITrainingModule, total: int
) -> None:
    """What the run will do, before it starts (sizes, steps, where checkpoints go)."""
    mc = module.model.config
    params = sum(p.numel() for p in module.model.parameters())
    pairs = total * config.batch_size * config.devices * config.num_nodes
    summary = data.summary()
    print(
        f"quari train: preset {config.preset} · model {mc.variant}/{mc.init} (H {mc.hidden_dim}, "
        f"{_count(mc.num_layers, 'layer')}, {_count(mc.num_steps, 'refinement step')}, "
        f"rank {mc.rank}; {params / 1e6:.2f}M parameters) on {_device_name(config)}\n"
        f"  {total:,} steps × {config.batch_size} pairs = {pairs / max(1, data.train_pairs):.1f} "
        f"epochs over {data.train_pairs:,} training pairs; validation: "
        f"{summary['val']['queries']:,} queries over {summary['val']['images']:,} images, "
        f"relevance {data.relevance_description}\n"
        f"  checkpoints every {config.checkpoint_every:,} steps"
        + (f" or {config.checkpoint_minutes:g} min" if config.checkpoint_minutes else "")
        + f" in {config.out / CHECKPOINTS}",
        flush=True,
    )


def _device_name(config: TrainConfig) -> str:
    if config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return f"{config.devices * config.num_nodes} × {torch.cuda.get_device_name()}"
    return f"cpu ({_count(torch.get_num_threads(), 'thread')})"


def _export(
    config: TrainConfig,
    data: TrainingData,
    validation: tuple[torch.Tensor, ...],
    selection: str,
) -> TrainResult:
    """Exports the best model-folder checkpoint (by the selection metric, the last weights
    validated here too) or the last one to ``config.out``, with the static blend attached
    when the config asks for one; the model card carries the validation metrics of the
    exported model beside the frozen baseline's."""
    folder = config.out / CHECKPOINTS
    steps = sorted(folder.glob("step-*"))
    if not steps:
        raise TrainingError(f"{folder}: training wrote no checkpoint")
    queries, gallery, keys, gallery_keys = validation
    last = load(steps[-1])
    final_steps = int(last.metadata.get("steps", 0))
    metrics = validation_metrics(last, queries, gallery, keys, gallery_keys=gallery_keys)
    last.metadata["metrics"] = {k: round(v, 6) for k, v in metrics.items()}
    model, exported = last, "last"
    best_folder = folder / "best"
    if config.export == "best" and (best_folder / "config.json").is_file():
        best = load(best_folder)
        if best.metadata.get("metrics", {}).get(SELECTION_METRIC, float("-inf")) > metrics.get(
            SELECTION_METRIC, float("-inf")
        ):
            model, exported = best, "best"
    model.metadata["checkpoint"] = (
        f"best {selection}" if config.export == "best" else f"last (validated by {selection})"
    )
    chosen = model.metadata["metrics"]
    score = chosen.get(SELECTION_METRIC, float("-inf"))
    baseline = chosen.get("baseline/" + SELECTION_METRIC.split("/", 1)[1], float("-inf"))
    # The identity start scores as the frozen baseline, so only a model below that can lose
    # to it; the start is then validated itself, and exported if it does better.
    if config.export == "best" and model.config.init == "identity" and score < baseline:
        start = _identity_start(model, validation)
        if start.metadata["metrics"][SELECTION_METRIC] > score:
            model, exported = start, "start"
    model.metadata["exported"] = f"{exported} (step {model.metadata.get('steps')})"
    if config.blend_weight:
        model = _with_blend(model, config, data, validation)
    save(model, config.out)
    metrics = {k: float(v) for k, v in (model.metadata.get("metrics") or {}).items()}
    return TrainResult(config.out, final_steps, metrics, exported)


def _with_blend(
    model: QuARIModel,
    config: TrainConfig,
    data: TrainingData,
    validation: tuple[torch.Tensor, ...],
) -> QuARIModel:
    """``model`` with the static blend of ``config.blend_weight`` — W fitted on the training
    embeddings — if that does not lower the selection metric on validation; else ``model``
    as it is. Either way the card says what the blend scored.

    The checkpoint is chosen before the blend joins (training never sees it: it is fixed).
    The check keeps a space that whitening hurts (one whose weak directions are noise for this
    data) from losing quality to a default.
    """
    sample = data.train_sample()
    state = model.state_dict()
    state["whitening"] = fit_whitening(sample, config.whitening_shrinkage)
    blended = QuARIModel(replace(model.config, blend_weight=config.blend_weight)).eval()
    blended.load_state_dict(state)
    queries, gallery, keys, gallery_keys = validation
    metrics = validation_metrics(blended, queries, gallery, keys, gallery_keys=gallery_keys)
    metrics = {k: round(v, 6) for k, v in metrics.items()}
    without = model.metadata.get("metrics") or {}
    info = {
        "weight": config.blend_weight,
        "whitening": f"shrinkage {config.whitening_shrinkage:g}, fitted on the image and "
        f"caption embeddings of {sample.shape[0] // 2:,} training rows",
    }
    if metrics[SELECTION_METRIC] < without.get(SELECTION_METRIC, float("-inf")):
        info["attached"] = (
            f"no: {SELECTION_METRIC} {metrics[SELECTION_METRIC]:.4f} with it, "
            f"{without[SELECTION_METRIC]:.4f} without"
        )
        model.metadata["blend"] = info
        return model
    info["attached"] = "yes"
    info["metrics_without_blend"] = without
    blended.metadata = {**model.metadata, "metrics": metrics, "blend": info}
    return blended


def _identity_start(trained: QuARIModel, validation: tuple[torch.Tensor, ...]) -> QuARIModel:
    """The run's starting point, validated: a model of the same configuration with the identity
    start (q′ = q, T = I: the frozen backbone's scores, whatever its other weights). When
    training made every validated checkpoint worse than that, it is the best weights the run
    has, and exporting it keeps a service from answering worse than plain cosine."""
    queries, gallery, keys, gallery_keys = validation
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        start = QuARIModel(trained.config).eval()
    metrics = validation_metrics(start, queries, gallery, keys, gallery_keys=gallery_keys)
    start.metadata = {
        **trained.metadata,
        "steps": 0,
        "metrics": {k: round(v, 6) for k, v in metrics.items()},
        "checkpoint": trained.metadata["checkpoint"]
        + ": the identity start (the frozen backbone's scores), as every validated checkpoint"
        " scored below it",
    }
    return start
