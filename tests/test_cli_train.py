"""`quari mine` and `quari train`: a short run with ablation switches, resume, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from quari.checkpoint import load, load_model
from quari.eval.synthetic import PlantedSpec, write_planted_set
from quari.store import EmbeddingSet
from quari.training import load_semipositives
from quari.training.mining import MiningConfig
from quari.whitening import fit_whitening

from helpers import make_set

runner = CliRunner()
SPEC = PlantedSpec(dim=24, cluster_dim=8, subspace_dim=4)


@pytest.fixture
def app():
    from quari.cli import app

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield app
    torch.set_num_threads(before)


def tiny_args(tmp_path, *extra):
    return [
        "train",
        "--train",
        str(tmp_path / "set"),
        "--out",
        str(tmp_path / "run"),
        "--image-key",
        "image_id",
        "--val-fraction",
        "0.2",
        "--rank",
        "4",
        "--hidden-dim",
        "16",
        "--layers",
        "1",
        "--heads",
        "2",
        "--batch-size",
        "8",
        "--max-steps",
        "4",
        "--checkpoint-every",
        "2",
        "--lr",
        "1e-3",
        "--quiet",
        *extra,
    ]


def test_mine_writes_semipositives_and_resumes(app, tmp_path):
    write_planted_set(tmp_path / "set", 40, SPEC, captions_per_image=2)
    out = runner.invoke(app, ["mine", str(tmp_path / "set"), "--k", "10", "--quiet"])
    assert out.exit_code == 0, out.output
    assert "mined 2 semi-positives for 80 of 80 rows (k=10" in out.output
    semi = load_semipositives(EmbeddingSet.open(tmp_path / "set"), MiningConfig(k=10))
    assert semi.ids.shape == (80, 2)
    out = runner.invoke(app, ["mine", str(tmp_path / "set"), "--k", "12", "--quiet"])
    assert out.exit_code == 3 and "stale" in out.output and "--overwrite" in out.output
    out = runner.invoke(app, ["mine", str(tmp_path / "set"), "--k", "12", "--overwrite", "--quiet"])
    assert out.exit_code == 0, out.output


def test_train_with_ablation_switches_then_resume(app, tmp_path):
    write_planted_set(tmp_path / "set", 50, SPEC, captions_per_image=2)
    args = tiny_args(
        tmp_path,
        "--no-semipos",
        "--no-noise",
        "--single-step",
        "--seed",
        "3",
        "--temperature",
        "0.02",
    )
    out = runner.invoke(app, [*args, "--variant", "reference", "--preset", "reference"])
    assert out.exit_code == 0, out.output
    assert "trained 4 steps" in out.output and "cosine" in out.output
    model = load(tmp_path / "run")
    m = model.metadata["metrics"]
    verdict = "Above the" if m["val/mAP"] > m["baseline/mAP"] else "Below the"
    verdict = "Level with the" if m["val/mAP"] == m["baseline/mAP"] else verdict
    assert f"{verdict} frozen backbone: validation mAP" in " ".join(out.output.split())
    assert model.config.num_steps == 1 and model.config.rank == 4
    assert model.config.variant == "reference"
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["semipos"] is False and saved["noise_scale"] == 0.0 and saved["seed"] == 3
    assert saved["temperature"] == 0.02
    assert not (tmp_path / "set" / "semipos").exists()  # no mining without semi-positives
    again = runner.invoke(app, [*args, "--variant", "reference", "--preset", "reference"])
    assert again.exit_code == 6 and "--resume" in again.output  # training stopped
    resumed = runner.invoke(
        app, [*args, "--variant", "reference", "--preset", "reference", "--resume"]
    )
    assert resumed.exit_code == 0, resumed.output


def test_train_says_when_it_exports_the_identity_start(app, tmp_path):
    write_planted_set(tmp_path / "set", 60, SPEC, captions_per_image=2)
    args = tiny_args(tmp_path, "--no-semipos", "--lr", "0.3", "--warmup-steps", "0")
    out = runner.invoke(app, [*args, "--max-steps", "8", "--val-every", "4"])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "(start weights)" in text and "Level with the frozen backbone" in text
    assert "Every validated checkpoint scored below the starting point" in text
    assert load(tmp_path / "run").metadata["steps"] == 0
    last = runner.invoke(app, [*args, "--max-steps", "8", "--val-every", "4", "--export", "last",
                               "--out", str(tmp_path / "last")])  # fmt: skip
    assert last.exit_code == 0, last.output
    text = " ".join(last.output.split())
    assert "(last weights)" in text and "Below the frozen backbone" in text
    assert load(tmp_path / "last").metadata["steps"] == 8
    bad = runner.invoke(app, [*args, "--export", "newest", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "export must be 'best' or 'last'" in bad.output


def test_blend_weight_and_the_whitening_adapter(app, tmp_path):
    write_planted_set(tmp_path / "set", 60, SPEC, captions_per_image=2)
    out = runner.invoke(app, tiny_args(tmp_path, "--no-semipos", "--blend-weight", "0"))
    assert out.exit_code == 0, out.output
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["blend_weight"] == 0.0 and load(tmp_path / "run").config.blend_weight == 0
    assert "blend" not in load(tmp_path / "run").metadata  # nothing fitted or validated
    assert "whitened" not in out.output
    # with a blend asked for, the run's last lines say what the export did with it (the card's
    # record: attached, with validation without it, or left off and why)
    out = runner.invoke(app, tiny_args(tmp_path, "--no-semipos", "--blend-weight", "0.5",
                                       "--out", str(tmp_path / "mixed")))  # fmt: skip
    assert out.exit_code == 0, out.output
    info, text = load(tmp_path / "mixed").metadata["blend"], " ".join(out.output.split())
    if info["attached"] == "yes":
        without = info["metrics_without_blend"]["val/mAP"]
        assert "mixes QuARI's with the training rows' whitened cosine (a = 0.5)" in text
        assert f"validation mAP without the mix {without:.4f}" in text
    else:
        assert f"blend (a = 0.5) was left off: {info['attached'][4:]}" in text
    out = runner.invoke(app, ["train", "--adapter", "whitening", "--train",
                              str(tmp_path / "set"), "--out", str(tmp_path / "white"),
                              "--whitening-shrinkage", "0.1"])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "fitted the whitening of 120 rows' images and captions (shrinkage 0.1)" in out.output
    eset = EmbeddingSet.open(tmp_path / "set")
    rows = range(eset.rows)
    vectors = torch.from_numpy(
        np.concatenate([eset.gather(rows, "image"), eset.gather(rows, "text")])
    )
    adapter = load_model(tmp_path / "white")
    torch.testing.assert_close(adapter.matrix(), fit_whitening(vectors, 0.1))
    assert adapter.metadata["encoder"] == eset.encoder
    out = runner.invoke(app, tiny_args(tmp_path, "--blend-weight", "2", "--out",
                                       str(tmp_path / "bad")))  # fmt: skip
    assert out.exit_code == 2 and "blend_weight must lie in [0, 1], got 2.0" in out.output


def test_train_errors_are_one_line(app, tmp_path):
    write_planted_set(tmp_path / "set", 30, SPEC, captions_per_image=1)
    make_set(tmp_path / "other", shards=(30,), dim=24, text=True, encoder="other-encoder")
    out = runner.invoke(
        app, [*tiny_args(tmp_path, "--no-semipos"), "--train", str(tmp_path / "other")]
    )
    assert out.exit_code == 2 and "encoder 'other-encoder'" in out.output
    assert "Traceback" not in out.output
    make_set(tmp_path / "notext", shards=(30,), dim=24, text=False, encoder="synthetic:planted")
    out = runner.invoke(app, [*tiny_args(tmp_path), "--val", str(tmp_path / "notext")])
    assert out.exit_code == 2 and "no text embeddings" in out.output
    out = runner.invoke(app, tiny_args(tmp_path, "--resume"))
    assert out.exit_code == 6 and "no checkpoint to resume from" in out.output
    out = runner.invoke(app, [*tiny_args(tmp_path), "--train", f"{tmp_path / 'set'}:0.5"])
    assert out.exit_code == 2 and "ratio" in out.output


def test_help_lists_the_switches(app):
    out = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0
    for flag in ("--no-semipos", "--no-noise", "--single-step", "--devices", "--resume"):
        assert flag in out.output
