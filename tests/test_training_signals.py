"""Runs that behave: SIGINT/SIGTERM leave a resumable checkpoint and stop within seconds, the
resumed run ends where an uninterrupted one does, progress lines in a log, time-based
checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from quari.checkpoint import load
from quari.training import TrainConfig, train
from quari.training.callbacks import format_seconds

from helpers import REPO, planted_set, small_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(tmp_path: Path, out: str, **kw) -> TrainConfig:
    """:func:`helpers.small_run` with the default recipe, few steps and no early stopping."""
    fields = dict(
        out=tmp_path / out,
        preset="default",
        lr=None,
        log_every=50,
        max_steps=12,
        warmup_steps=2,
        checkpoint_every=1000,
        early_stopping_patience=None,
    )
    return small_run(tmp_path, **{**fields, **kw})


class SendSignal(Callback):
    """Sends ``signum`` to this process at step ``at``, in the hook ``hook``: while the step
    computes (``on_train_batch_start``) or while the optimiser updates the weights
    (``on_before_optimizer_step``)."""

    def __init__(self, signum: int, at: int, hook: str) -> None:
        self.signum, self.at, self.hook = signum, at, hook

    def _maybe(self, trainer, hook: str) -> None:
        if hook == self.hook and trainer.global_step == self.at:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, *args) -> None:
        self._maybe(trainer, "on_train_batch_start")

    def on_before_optimizer_step(self, trainer, *args) -> None:
        self._maybe(trainer, "on_before_optimizer_step")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    ("signum", "hook", "stopped_at"),
    [
        (signal.SIGINT, "on_train_batch_start", 7),  # mid-step: the step is abandoned
        (signal.SIGTERM, "on_before_optimizer_step", 8),  # during the update: finish it
    ],
    ids=["sigint-while-computing", "sigterm-while-updating"],
)
def test_a_signal_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(
    tmp_path, signum, hook, stopped_at
):
    whole = tiny(tmp_path, "whole")
    train(whole)

    cut = tiny(tmp_path, "cut")
    previous = signal.getsignal(signum)
    result = train(cut, callbacks=[SendSignal(signum, 7, hook)])
    assert signal.getsignal(signum) == previous  # handlers restored
    assert result.interrupted == signal.Signals(signum).name
    assert result.steps == stopped_at and result.exported == "none"
    assert (cut.out / "checkpoints" / "last.ckpt").is_file()
    assert not (cut.out / "config.json").exists()  # an interrupted run exports nothing

    resumed = train(cut, resume=True)
    assert resumed.steps == 12 and resumed.interrupted is None
    for key, value in weights(whole.out / "checkpoints" / "step-00000012").items():
        assert torch.equal(weights(cut.out / "checkpoints" / "step-00000012")[key], value), key
    for key, value in weights(whole.out).items():  # the exported model too
        assert torch.equal(weights(cut.out)[key], value), key


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "quari", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **kw,
    )


@pytest.mark.slow
def test_sigterm_on_the_command_line_exits_within_seconds_and_resume_finishes(tmp_path):
    """A real `quari train` process, its output a pipe (not a terminal): progress lines every
    10 steps; SIGTERM → exit status 143 within seconds with a checkpoint; `--resume` runs to
    the planned step count and exports the model."""
    args = ["train", "--train", str(planted_set(tmp_path)), "--out", str(tmp_path / "run"),
            "--image-key", "image_id", "--val-fraction", "0.2", "--rank", "4", "--hidden-dim",
            "16", "--layers", "1", "--heads", "2", "--steps", "2", "--batch-size", "8",
            "--max-steps", "200", "--val-every", "1000", "--log-every", "10", "--lr", "1e-3",
            "--checkpoint-every", "100000"]  # fmt: skip
    proc = _cli(args)
    lines = []
    for line in proc.stdout:  # wait until training is under way
        lines.append(line)
        if line.startswith("step 20/200"):
            break
    else:
        pytest.fail("no progress lines:\n" + "".join(lines))
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    took = None
    for line in proc.stdout:
        lines.append(line)
        if "stopped at step" in line and took is None:
            took = time.monotonic() - sent  # the checkpoint is on disk by now
    code = proc.wait(timeout=120)  # (interpreter teardown: slow on a loaded machine)
    text = "".join(lines)
    assert code == 128 + signal.SIGTERM, text
    assert took is not None and took < 10, f"stopping took {took} s"
    assert "quari train: preset default" in text and "speed:" in text and "pairs/s" in text
    assert "1 layers" not in text and "2 refinement steps, rank 4" in text  # --steps 2
    assert "ETA" in text and "Epoch" not in text and "/-" not in text
    assert "SIGTERM: stopped at step" in text and "--resume" in text
    stopped = load(next((tmp_path / "run" / "checkpoints").glob("step-*")))
    assert 20 <= stopped.metadata["steps"] < 200

    resumed = _cli([*args, "--resume"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "trained 200 steps" in out
    assert (tmp_path / "run" / "checkpoints" / "step-00000200").is_dir()


def test_checkpoints_by_time(tmp_path, monkeypatch):
    """With ``checkpoint_minutes`` a checkpoint is written once that much time has passed,
    whatever the step count."""
    from quari.training import callbacks

    clock = iter(range(0, 10_000, 40))  # each look at the clock: 40 s later
    monkeypatch.setattr(callbacks, "_clock", lambda: float(next(clock)))
    cfg = tiny(tmp_path, "timed", checkpoint_minutes=1.0, max_steps=6, keep_checkpoints=100)
    train(cfg)
    saved = sorted(p.name for p in (cfg.out / "checkpoints").glob("step-*"))
    # Every other step crosses a minute (one look per step at 40 s each, reset on saving).
    assert saved == ["step-00000002", "step-00000004", "step-00000006"], saved


def test_durations_read_well():
    assert [format_seconds(s) for s in (4.4, 65, 3725, float("nan"))] == [
        "4s",
        "1m05s",
        "1h02m",
        "?",
    ]


def test_graceful_stop_pickles_under_a_foreign_local_handler(tmp_path):
    """DDP spawn pickles the callbacks while GracefulStop holds the previous handlers; one that
    another library installed as a local function (Ray does) must not break the spawn."""
    import pickle

    from quari.training.callbacks import GracefulStop, RunCheckpoints

    def local_handler(signum, frame):  # not picklable: a local function
        pass

    before = signal.signal(signal.SIGTERM, local_handler)
    try:
        stop = GracefulStop(RunCheckpoints.__new__(RunCheckpoints))
        with stop:
            clone = pickle.loads(pickle.dumps(stop))
            assert clone._previous == {} and clone.phase == stop.phase
        assert signal.getsignal(signal.SIGTERM) is local_handler  # restored on exit
    finally:
        signal.signal(signal.SIGTERM, before)
