"""Training the linear-adaptation baseline: the loss, a run that learns a planted fixed
distortion, and `quari train --adapter linear`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from quari.adapters import LinearAdapter
from quari.checkpoint import load_model
from quari.errors import QuARIInputError
from quari.eval.linear import LinearTrainConfig, contrastive_loss, train_linear
from quari.store import EmbeddingSet
from quari.training.config import TrainSource

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def distorted_pairs(root, n=600, dim=24, seed=0):
    """Captions = image + strong noise confined to 8 fixed dimensions: cosine is misled by the
    noise, a static linear map that suppresses those dimensions is not."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, dim))
    images[:, 16:] *= 0.3
    texts = images.copy()
    texts[:, :16] += 0.3 * rng.standard_normal((n, 16))
    texts[:, 16:] = 4.0 * rng.standard_normal((n, dim - 16))
    eset = EmbeddingSet.create(root, dim=dim, encoder="test-encoder")
    eset.append(images, {"image_id": np.arange(n)}, texts)
    return eset


def test_contrastive_loss_matches_a_direct_computation_and_masks_same_image():
    torch.manual_seed(0)
    q, d = F.normalize(torch.randn(4, 6), dim=-1), F.normalize(torch.randn(4, 6), dim=-1)
    logits = q @ d.T / 0.1
    direct = (
        0.5
        * sum(
            -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
            for i in range(4)
        )
        / 4
    )
    assert torch.allclose(contrastive_loss(q, d, temperature=0.1), direct)
    # rows 0 and 1 are captions of one image: their cross terms leave both softmaxes
    groups = torch.tensor([7, 7, 8, 9])
    masked = logits.clone()
    masked[0, 1] = masked[1, 0] = -1e9
    want = (
        0.5
        * sum(
            -torch.log_softmax(masked[i], 0)[i] - torch.log_softmax(masked[:, i], 0)[i]
            for i in range(4)
        )
        / 4
    )
    assert torch.allclose(contrastive_loss(q, d, groups, temperature=0.1), want)


def planted_run(tmp_path, out: str, **changes) -> LinearTrainConfig:
    """A run on :func:`distorted_pairs` (made here) with a quarter of the images held out."""
    distorted_pairs(tmp_path / "set")
    settings = dict(image_key="image_id", val_fraction=0.25, epochs=6, batch_size=32)
    return LinearTrainConfig(
        train=(TrainSource(tmp_path / "set"),),
        out=tmp_path / out,
        progress=False,
        **{**settings, **changes},
    )


def test_training_learns_a_planted_distortion(tmp_path):
    config = planted_run(tmp_path, "lin")
    result = train_linear(config)
    m = result.metrics
    assert m["val/mAP"] > m["baseline/mAP"] + 0.1, m  # cosine ≈ 0.75, the map ≈ 0.98
    adapter = load_model(tmp_path / "lin")
    assert isinstance(adapter, LinearAdapter) and adapter.out_dim == 24
    assert adapter.metadata["encoder"] == "test-encoder"
    assert adapter.metadata["metrics"]["val/mAP"] == pytest.approx(m["val/mAP"], abs=1e-6)
    saved = json.loads((tmp_path / "lin" / "linear_train.json").read_text())
    assert saved["epochs"] == 6 and saved["batch_size"] == 32
    # the same seed and data give the same map
    again = train_linear(
        LinearTrainConfig(**{**vars(config), "out": tmp_path / "lin2", "max_steps": None})
    )
    assert torch.equal(load_model(tmp_path / "lin2").weight, adapter.weight)
    assert again.steps == result.steps


def test_low_rank_training_learns_the_planted_distortion(tmp_path):
    # the distortion lives in 8 fixed dimensions: a rank-8 correction of the identity suffices;
    # starting at the identity (L = 0) it needs more steps than the full map
    config = planted_run(tmp_path, "low", rank=8, epochs=30)
    m = train_linear(config).metrics
    assert m["val/mAP"] > m["baseline/mAP"] + 0.1, m
    adapter = load_model(tmp_path / "low")
    assert adapter.rank == 8 and adapter.out_dim == 24
    assert "rank 8" in adapter.metadata["training"]
    with pytest.raises(QuARIInputError, match="rank must be in 1 … 24"):
        train_linear(LinearTrainConfig(**{**vars(config), "rank": 25}))
    with pytest.raises(QuARIInputError, match="exclude each other"):
        LinearTrainConfig(**{**vars(config), "out_dim": 12})


def test_cli_train_adapter_linear(tmp_path):
    from quari.cli import app

    distorted_pairs(tmp_path / "set", n=200)
    args = ["train", "--train", str(tmp_path / "set"), "--out", str(tmp_path / "lin")]
    args += ["--image-key", "image_id", "--val-fraction", "0.2", "--quiet"]
    out = runner.invoke(app, [*args, "--adapter", "linear", "--max-steps", "5", "--out-dim", "8"])
    assert out.exit_code == 0, out.output
    assert "trained a linear adapter for 5 steps" in out.output and "cosine" in out.output
    assert load_model(tmp_path / "lin").out_dim == 8
    out = runner.invoke(
        app,
        [*args, "--adapter", "linear", "--max-steps", "5", "--rank", "4", "--temperature", "0.02"],
    )
    assert out.exit_code == 0, out.output
    assert load_model(tmp_path / "lin").rank == 4
    assert json.loads((tmp_path / "lin" / "linear_train.json").read_text())["temperature"] == 0.02
    out = runner.invoke(app, [*args, "--adapter", "ridge"])
    assert out.exit_code == 2 and "--adapter must be quari, linear or whitening" in out.output
