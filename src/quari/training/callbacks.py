"""Lightning callbacks of a training run: checkpoints, progress reports, graceful interrupts.

* :class:`RunCheckpoints` — the resumable ``last.ckpt`` and a model-folder checkpoint every N
  steps *and* every M minutes, at the end, and a ``best`` model folder whenever the selection
  metric improves.
* :class:`ProgressReport` — a progress bar on a terminal; otherwise one line every N steps
  (step, loss, learning rate, pairs/s, ETA, last validation), so a log file shows where a run
  is. After the first steps it states the measured speed, what the whole run will cost, and
  which flags make it smaller.
* :class:`GracefulStop` — SIGINT/SIGTERM save a resumable checkpoint and stop the run within
  seconds: a signal that arrives while a step computes its loss and gradients abandons the
  step (the weights are still those of the last completed step, which the checkpoint holds);
  one that arrives while the optimiser updates the weights, or during validation, stops at the
  next step boundary.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

from quari.checkpoint import save
from quari.training.errors import TrainingError
from quari.training.module import SELECTION_METRIC

__all__ = [
    "CHECKPOINTS",
    "LAST",
    "GracefulStop",
    "ProgressReport",
    "RunCheckpoints",
    "TrainingInterrupted",
    "format_seconds",
]

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
_clock = time.monotonic  # what time-based checkpoints read (a test replaces it)


class TrainingInterrupted(TrainingError):
    """A run stopped by SIGINT/SIGTERM (after saving its checkpoint).

    Attributes:
        signum: The signal received.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"training interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def format_seconds(seconds: float) -> str:
    """``"45s"``, ``"12m05s"``, ``"3h20m"``: a duration for humans."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class RunCheckpoints(Callback):
    """Resumable Lightning checkpoint + model-folder checkpoints every ``every`` steps and every
    ``minutes`` minutes, and at the end; a ``best`` model folder whenever the selection metric
    (:data:`~quari.training.module.SELECTION_METRIC`) improves.

    Lightning's ``last.ckpt`` is written to a temporary name and renamed, so a run killed while
    saving keeps the previous one.

    Args:
        out: The run folder.
        every: Steps between checkpoints.
        keep: Model-folder checkpoints kept.
        metadata: Saved with every model folder (data, recipe …).
        minutes: Minutes between checkpoints (None: by steps only).
        selection: How the best checkpoint is chosen, in words (model card).
    """

    def __init__(
        self,
        out: Path,
        every: int,
        keep: int,
        metadata: dict[str, Any],
        minutes: float | None = None,
        selection: str = SELECTION_METRIC,
    ) -> None:
        self.folder = Path(out) / CHECKPOINTS
        self.every = every
        self.keep = keep
        self.metadata = metadata
        self.minutes = minutes
        self.selection = selection
        self.best = float("-inf")
        self.best_step = -1
        self.last_saved = -1
        self.last_time = _clock()

    @property
    def state_key(self) -> str:
        return "RunCheckpoints"

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = float(state_dict["best"])
        self.best_step = int(state_dict["best_step"])

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.last_time = _clock()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        due = trainer.global_step % self.every == 0
        if self.minutes is not None and not due:
            # Every rank must agree: saving is collective under DDP. Rank 0's clock decides.
            late = _clock() - self.last_time >= 60 * self.minutes
            due = bool(trainer.strategy.broadcast(late, src=0))
        if due:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.global_step != self.last_saved:
            self.save(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(SELECTION_METRIC)
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
        self.last_time = _clock()

    def _model_folder(
        self, trainer: L.Trainer, pl_module: Any, folder: Path, *, best: bool = False
    ) -> None:
        model = pl_module.model
        metrics = {
            k: round(float(v), 6)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("val/", "baseline/", "gain_se/"))
        }
        saved = model.metadata
        model.metadata = {
            **self.metadata,
            "steps": trainer.global_step,
            "checkpoint": f"best {self.selection}" if best else "periodic",
            "metrics": metrics,
        }
        try:
            save(model, folder)
        finally:
            model.metadata = saved


class ProgressReport(Callback):
    """What a run prints while it trains (rank 0 only).

    Args:
        total_steps: Steps the run will take in all (None: Lightning's estimate).
        pairs_per_step: Training pairs per optimiser step (all devices).
        every: Steps between progress lines.
        bar: Draw a progress bar (for a terminal) instead of printing lines.
        hint: What makes the run cheaper (printed with the cost estimate).
        calibrate: Steps timed before the cost estimate is printed (the first step, which
            warms up, is not counted).
        echo: Where lines go (default: ``print`` to stdout, flushed; ``tqdm.write`` with a bar).
    """

    def __init__(
        self,
        total_steps: int | None,
        pairs_per_step: int,
        *,
        every: int = 50,
        bar: bool | None = None,
        hint: str = "",
        calibrate: int = 5,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.total_steps = total_steps
        self.pairs_per_step = pairs_per_step
        self.every = every
        self.bar_mode = sys.stdout.isatty() if bar is None else bar
        self.hint = hint
        self.calibrate = calibrate
        self.echo = echo or (tqdm.write if self.bar_mode else _print_line)
        self.bar: Any = None
        self.start_step = 0
        self.t_first: float | None = None  # time at the end of the first step
        self.step_first = 0
        self.estimated = False
        self.validation = ""

    def _total(self, trainer: L.Trainer) -> int:
        if self.total_steps is not None:
            return self.total_steps
        estimate = trainer.estimated_stepping_batches
        return int(estimate) if math.isfinite(estimate) else 0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        self.start_step = trainer.global_step
        if self.bar_mode:
            self.bar = tqdm(
                total=self._total(trainer), initial=self.start_step, desc="training", unit="step"
            )

    def _rate(self, step: int) -> float:
        """Optimiser steps per second since the end of the first step."""
        if self.t_first is None or step <= self.step_first:
            return float("nan")
        return (step - self.step_first) / max(1e-9, time.perf_counter() - self.t_first)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, *args: Any
    ) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        if self.t_first is None:
            self.t_first, self.step_first = time.perf_counter(), step
        rate, total = self._rate(step), self._total(trainer)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        loss_value = float(loss) if loss is not None else float("nan")
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        if not self.estimated and step - self.step_first >= self.calibrate:
            self.estimated = True
            left = max(0, total - step)
            self.echo(
                f"speed: {rate * self.pairs_per_step:,.0f} pairs/s ({1 / rate:.2f} s/step); "
                f"{left:,} steps left ≈ {format_seconds(left / rate)} plus validation"
                + (f" — {self.hint}" if self.hint else "")
            )
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {loss_value:.4f} · lr {lr:.2e}{self.validation}")
        elif step % self.every == 0 or step == total:
            eta = (total - step) / rate if total else float("nan")
            self.echo(
                f"step {step:,}/{total:,} · loss {loss_value:.4f} · lr {lr:.2e} · "
                f"{rate * self.pairs_per_step:,.0f} pairs/s · ETA {format_seconds(eta)}"
                f"{self.validation}"
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        value = trainer.callback_metrics.get(SELECTION_METRIC)
        base = trainer.callback_metrics.get("baseline/mAP")
        if value is None:
            return
        self.validation = f" · val mAP {float(value):.4f}"
        if base is not None:
            self.validation += f" (cosine {float(base):.4f})"
        self.validation += f" @ step {trainer.global_step:,}"
        if self.bar is None:
            self.echo(f"validation at step {trainer.global_step:,}:{self.validation[2:]}")

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.close()

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_line(text: str) -> None:
    print(text, flush=True)


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class GracefulStop(Callback):
    """SIGINT/SIGTERM: save a resumable checkpoint, then stop (module docstring).

    Use as a context manager around ``trainer.fit``: it installs its handlers on entry (main
    thread only) and restores the previous ones on exit. :attr:`signum` is the signal that
    stopped the run (None: none did).

    Args:
        checkpoints: The run's :class:`RunCheckpoints` (it writes the checkpoint).
        echo: Where the notice goes.
    """

    def __init__(
        self, checkpoints: RunCheckpoints, echo: Callable[[str], None] | None = None
    ) -> None:
        self.checkpoints = checkpoints
        # A module-level function, not a lambda: DDP spawn pickles the callbacks.
        self.echo = echo or _to_stderr
        self.signum: int | None = None
        self.phase = "idle"
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __getstate__(self) -> dict[str, Any]:
        # DDP spawn pickles the callbacks. The handlers this process had before (e.g. one Ray
        # installed, a local function) belong to it alone and need not pickle: the spawned
        # workers never restore them.
        state = self.__dict__.copy()
        state["_previous"] = {}
        return state

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = signum
        if first:
            self.echo(
                f"{signal.Signals(signum).name}: saving a checkpoint and stopping (resume with "
                "--resume)"
            )
        if self.phase == "compute":
            # Loss and gradients of the current step are thrown away; the weights are those
            # of the last completed step, which is what on_exception saves.
            self.phase = "stopping"
            raise TrainingInterrupted(signum)
        # During the optimiser update or validation: stop at the next step boundary.

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if self.signum is not None:
            raise TrainingInterrupted(self.signum)
        self.phase = "compute"

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.phase = "update"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.phase = "idle"
        if self.signum is not None:
            self._save(trainer, pl_module)
            trainer.should_stop = True

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.phase = "validate"

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.phase = "idle"

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self.phase = "idle"
        if self.signum is not None:
            self._save(trainer, pl_module)

    def _save(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.checkpoints.last_saved != trainer.global_step:
            self.checkpoints.save(trainer, pl_module)
