"""Model folders and the reference-checkpoint import, against the golden fixture."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from quari import Adaptation, QuARIModel
from quari.checkpoint import CheckpointError, load, load_reference, save

from helpers import tiny_config


def test_reference_checkpoint_reproduces_golden_outputs(fixture_dir, monkeypatch):
    golden = np.load(fixture_dir / "golden.npz")
    model = load_reference(fixture_dir)
    assert model.config.variant == "reference" and not model.training
    # The factored paths must never form the E×E matrix.
    dense = Adaptation.dense
    monkeypatch.setattr(Adaptation, "dense", lambda self: pytest.fail("formed W"))
    with torch.inference_mode():
        ad = model(torch.from_numpy(golden["queries"]))
        np.testing.assert_allclose(ad.refined_query.numpy(), golden["refined_query"], atol=1e-5)
        np.testing.assert_allclose(ad.score(golden["gallery"]).numpy(), golden["scores"], atol=1e-5)
        top = ad.scan([(0, golden["gallery"][:25]), (25, golden["gallery"][25:])], k=40)
        scanned = np.take_along_axis(golden["scores"], top.ids.numpy(), axis=1)
        np.testing.assert_allclose(top.scores.numpy(), scanned, atol=1e-5)
        np.testing.assert_allclose(top.scores.numpy(), -np.sort(-golden["scores"], 1), atol=1e-5)
    # Row convention in the fixture: d′ = d·W, so W_image = Tᵀ.
    monkeypatch.setattr(Adaptation, "dense", dense)
    np.testing.assert_allclose(ad.dense().transpose(1, 2).numpy(), golden["W_image"], atol=1e-5)


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_save_load_round_trips_exactly(tmp_path, variant):
    torch.manual_seed(0)
    model = QuARIModel(tiny_config(variant)).eval()
    model.metadata = {
        "encoder": "hf:google/siglip2-base-patch16-512",
        "metrics": {"recall@10": 0.5},
    }
    folder = save(model, tmp_path / "m")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    loaded = load(folder)
    assert loaded.config == model.config and loaded.metadata == model.metadata
    for (k1, v1), (k2, v2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)
    q = torch.randn(3, 24)
    with torch.inference_mode():
        a, b = model(q), loaded(q)
    assert torch.equal(a.refined_query, b.refined_query) and torch.equal(a.U, b.U)
    card = (folder / "README.md").read_text()
    assert "siglip2-base-patch16-512" in card and "recall@10" in card and variant in card


def test_reference_import_round_trips_through_a_model_folder(tmp_path, fixture_dir):
    model = load_reference(fixture_dir)
    loaded = load(save(model, tmp_path / "m"))
    golden = np.load(fixture_dir / "golden.npz")
    with torch.inference_mode():
        s = loaded(torch.from_numpy(golden["queries"])).score(golden["gallery"])
    np.testing.assert_allclose(s.numpy(), golden["scores"], atol=1e-5)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    return save(QuARIModel(tiny_config("paper")), tmp_path / "m")


def _edit_config(folder, fn):
    data = json.loads((folder / "config.json").read_text())
    fn(data)
    (folder / "config.json").write_text(json.dumps(data))


def test_newer_format_is_refused(saved):
    _edit_config(saved, lambda d: d.update(format_version=99))
    with pytest.raises(
        CheckpointError,
        match="format_version 99 is newer than this quari "
        r"supports \(1\)",
    ):
        load(saved)


def test_unknown_config_field_is_named(saved):
    _edit_config(saved, lambda d: d["config"].update(colour="red"))
    with pytest.raises(CheckpointError, match="unknown HyperNetConfig field.*colour"):
        load(saved)


def test_missing_and_misshapen_weights_are_named(saved):
    state = load_file(str(saved / "model.safetensors"))
    key = "query_decoder.0.weight"
    save_file({k: v for k, v in state.items() if k != key}, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"missing keys \\['{key}'\\]"):
        load(saved)
    state[key] = torch.zeros(3, 3)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape \(3, 3\), the config expects"):
        load(saved)


def test_truncated_weights_and_missing_files(saved, tmp_path):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load(saved)
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load(tmp_path / "nowhere")
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(saved)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_reference_import_never_unpickles_code(tmp_path, fixture_dir, capsys):
    folder = tmp_path / "ref"
    shutil.copytree(fixture_dir, folder)
    (folder / "weights.pt").chmod(0o644)
    with open(folder / "weights.pt", "wb") as f:
        pickle.dump({"pos_emb": _Evil()}, f)
    with pytest.raises(CheckpointError, match="cannot be read as a plain state dict"):
        load_reference(folder)
    assert "pwned" not in capsys.readouterr().out


def test_reference_import_errors(tmp_path, fixture_dir):
    folder = tmp_path / "ref"
    shutil.copytree(fixture_dir, folder)
    for p in folder.iterdir():
        p.chmod(0o644)
    text = (folder / "config.yml").read_text()
    (folder / "config.yml").write_text(text.replace("hparams:", "hparams:\n  mystery: 3"))
    with pytest.raises(CheckpointError, match=r"unknown reference hparams \['mystery'\]"):
        load_reference(folder)
    (folder / "config.yml").write_text(text.replace("low_rank_dim: 8", "low_rank_dim: 9"))
    with pytest.raises(CheckpointError, match="has shape .* the config expects"):
        load_reference(folder)
    (folder / "weights.pt").unlink()
    with pytest.raises(CheckpointError, match="weights.pt: missing"):
        load_reference(folder)


def test_save_replaces_an_existing_folder_atomically(saved):
    model = load(saved)
    model.metadata = {"encoder": "offline"}
    save(model, saved)
    assert load(saved).metadata == {"encoder": "offline"}
    assert sorted(p.name for p in saved.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
