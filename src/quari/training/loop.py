"""The training entry point: :func:`train` builds the data, the module and a Lightning Trainer.

A run folder (``config.out``) holds::

    config.json, model.safetensors, README.md    the exported model (quari model folder)
    train_config.json                            the TrainConfig of the run
    checkpoints/last.ckpt                        resumable Lightning state (every N steps)
    checkpoints/step-00001000/ …                 model-folder checkpoints (the last K kept)
    checkpoints/best/                            model folder of the best validation mAP
    logs/csv/version_*/metrics.csv, logs/tensorboard/version_*/   training logs

``train(config, resume=True)`` continues from ``checkpoints/last.ckpt``: weights, optimiser,
schedule, loop counters, early-stopping and best-model state are restored, the data order
continues at the restored step and each step re-seeds its noise, so on CPU a resumed run ends
with the same weights as an uninterrupted one. The checkpoint is read with
``weights_only=True`` (it holds only tensors and plain containers).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from quari.checkpoint import load, save
from quari.errors import CheckpointError, QuARIInputError, TrainingError
from quari.fileio import atomic_write
from quari.training.config import TrainConfig
from quari.training.data import ResumableBatchSampler, ResumableLoader, TrainingData
from quari.training.module import QuARITrainingModule, validation_metrics

__all__ = ["PairDataModule", "RunCheckpoints", "TrainResult", "train"]

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
# Fields that may change when a run is resumed (they do not change what is computed). The run
# length is not among them: the learning-rate schedule is laid out over it.
_RESUMABLE_CHANGES = {
    "progress",
    "num_workers",
    "log_every",
    "early_stopping_patience",
    "checkpoint_every",
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
        exported: ``"best"`` or ``"last"``: which weights were exported.
    """

    model_dir: Path
    steps: int
    metrics: dict[str, float]
    exported: str


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


class RunCheckpoints(Callback):
    """Resumable Lightning checkpoint + model-folder checkpoints every N steps and at the end;
    a ``best`` model folder whenever validation mAP improves.

    Lightning's ``last.ckpt`` is written to a temporary name and renamed, so a run killed while
    saving keeps the previous one.
    """

    def __init__(self, out: Path, every: int, keep: int, metadata: dict[str, Any]) -> None:
        self.folder = Path(out) / CHECKPOINTS
        self.every = every
        self.keep = keep
        self.metadata = metadata
        self.best = float("-inf")
        self.best_step = -1
        self.last_saved = -1

    @property
    def state_key(self) -> str:
        return "RunCheckpoints"

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = float(state_dict["best"])
        self.best_step = int(state_dict["best_step"])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.global_step != self.last_saved:
            self.save(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/mAP")
        if value is None or not float(value) > self.best:
            return
        self.best, self.best_step = float(value), trainer.global_step
        if trainer.is_global_zero:
            self._model_folder(trainer, pl_module, self.folder / "best", best=True)

    def save(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Writes ``last.ckpt`` and ``step-{N}/`` (all ranks call; rank 0 writes)."""
        step = trainer.global_step
        tmp = self.folder / f".{LAST}.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)  # collective; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.folder / LAST)
            self._model_folder(trainer, pl_module, self.folder / f"step-{step:08d}")
            steps = sorted(self.folder.glob("step-*"))
            for old in steps[: max(0, len(steps) - self.keep)]:
                shutil.rmtree(old, ignore_errors=True)
        self.last_saved = step

    def _model_folder(
        self, trainer: L.Trainer, pl_module: Any, folder: Path, *, best: bool = False
    ) -> None:
        model = pl_module.model
        metrics = {
            k: round(float(v), 6)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("val/", "baseline/"))
        }
        saved = model.metadata
        model.metadata = {
            **self.metadata,
            "steps": trainer.global_step,
            "checkpoint": "best validation mAP" if best else "periodic",
            "metrics": metrics,
        }
        try:
            save(model, folder)
        finally:
            model.metadata = saved


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
        before = json.loads(saved.read_text())
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
    summary = data.summary()
    parts = [
        f"{t['path']} ({t['pairs']:,} pairs, {100 * t['share']:.0f} %)" for t in summary["train"]
    ]
    val = summary["val"]
    return {
        "encoder": data.encoder,
        "data": " + ".join(parts),
        "validation": f"{val['path']}: {val['queries']:,} queries over {val['images']:,} images",
        "training": (
            f"preset {config.preset}, schedule {config.schedule}, lr {config.lr:g}, batch "
            f"{config.batch_size} × {config.devices * config.num_nodes} device(s), "
            f"semi-positives {'on' if config.semipos else 'off'}, noise scale "
            f"{config.noise_scale:g}, seed {config.seed}"
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

    Example:
        >>> cfg = TrainConfig(train=(TrainSource(Path("coco")),), out=Path("runs/coco"),
        ...                   image_key="image_id")  # doctest: +SKIP
        >>> result = train(cfg)  # doctest: +SKIP
        >>> result.metrics["val/recall@1"]  # doctest: +SKIP
    """
    _check_accelerator(config)
    ckpt = _check_run_folder(config, resume)
    data = TrainingData.from_config(config, progress=config.progress)
    queries, gallery, target = data.val_vectors()
    if queries.shape[0] < config.devices * config.num_nodes:
        raise TrainingError(
            f"{queries.shape[0]} validation queries cannot be shared by "
            f"{config.devices * config.num_nodes} devices; hold out more images"
        )
    config.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    atomic_write(config.out / "train_config.json", lambda f: f.write(text.encode()))

    L.seed_everything(config.seed, workers=True, verbose=False)
    model_config = config.model_config(data.dim)
    module = QuARITrainingModule(model_config.to_dict(), config.to_dict())
    module.set_validation_gallery(gallery)
    datamodule = PairDataModule(data, config, queries, target)
    checkpoints = RunCheckpoints(
        config.out, config.checkpoint_every, config.keep_checkpoints, _describe(data, config)
    )
    all_callbacks: list[Callback] = [checkpoints]
    if config.early_stopping_patience is not None:
        all_callbacks.append(
            EarlyStopping(
                "val/mAP",
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
        log_every_n_steps=config.log_every,
        enable_checkpointing=False,  # RunCheckpoints writes both checkpoint kinds
        enable_progress_bar=config.progress,
        enable_model_summary=config.progress,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # PairBatches slices each global batch by rank
        default_root_dir=config.out,
        **val_args,
    )
    trainer.fit(
        module,
        datamodule=datamodule,
        ckpt_path=None if ckpt is None else str(ckpt),
        weights_only=True,
    )
    return _export(config, (queries, gallery, target))


def _export(
    config: TrainConfig, validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> TrainResult:
    """Copies the best (or last) model-folder checkpoint to ``config.out``; a run too short
    to have validated is validated here, so the model card always carries metrics."""
    folder = config.out / CHECKPOINTS
    steps = sorted(folder.glob("step-*"))
    if not steps:
        raise TrainingError(f"{folder}: training wrote no checkpoint")
    last = steps[-1]
    chosen, exported = last, "last"
    if config.export == "best" and (folder / "best" / "config.json").is_file():
        chosen, exported = folder / "best", "best"
    model = load(chosen)
    final_steps = int(load(last).metadata.get("steps", 0))
    model.metadata["exported"] = f"{exported} (step {model.metadata.get('steps')})"
    if not model.metadata.get("metrics"):
        metrics = validation_metrics(model, *validation)
        model.metadata["metrics"] = {k: round(v, 6) for k, v in metrics.items()}
    save(model, config.out)
    metrics = {k: float(v) for k, v in (model.metadata.get("metrics") or {}).items()}
    return TrainResult(config.out, final_steps, metrics, exported)
