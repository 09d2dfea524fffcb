"""Model folders and the reference-checkpoint import, against the golden fixture."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from quari import Adaptation, QuARIInputError, QuARIModel
from quari.checkpoint import CheckpointError, load, load_reference, save, validation_verdict

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


def test_a_blended_model_round_trips_with_its_whitening(tmp_path):
    torch.manual_seed(0)
    model = QuARIModel(tiny_config("reference", map_query=True, blend_weight=0.5)).eval()
    model.whitening.copy_(torch.randn(24, 24))
    model.metadata = {"blend": {"whitening": "shrinkage 0.01, fitted on 7 rows"}}
    loaded = load(save(model, tmp_path / "m"))
    assert loaded.config.blend_weight == 0.5 and torch.equal(loaded.whitening, model.whitening)
    q, d = torch.randn(3, 24), torch.randn(20, 24)
    with torch.inference_mode():
        assert torch.equal(model(q).score(d), loaded(q).score(d))
    card = (tmp_path / "m" / "README.md").read_text()
    assert "0.5·cos(q′, T d) + 0.5·cos(W q, W d), W a whitening (shrinkage 0.01" in card
    # a folder whose config asks for a blend but whose weights lack W is refused by name
    weights = load_file(tmp_path / "m" / "model.safetensors")
    del weights["whitening"]
    save_file(weights, tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match="whitening"):
        load(tmp_path / "m")


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


def _released_layout(fixture_dir, folder, *, wrap: bool, prefix: str):
    """The fixture rewritten as the hub releases it: model_hyperparams.yml + model_weights.pt
    ({"state_dict": …}, keys prefixed as a training checkpoint with the backbone's beside)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    meta = yaml.safe_load((fixture_dir / "config.yml").read_text())
    meta["feature_extractor"] = "google/siglip2-base-patch16-512"
    (folder / "model_hyperparams.yml").write_text(yaml.safe_dump(meta))
    state = torch.load(fixture_dir / "weights.pt", weights_only=True)
    state = {prefix + k: v for k, v in state.items()}
    if prefix:
        state["backbone_extractor.model.logit_scale"] = torch.ones(1)
    torch.save({"state_dict": state} if wrap else state, folder / "model_weights.pt")
    return folder


@pytest.mark.parametrize(("wrap", "prefix"), [(True, ""), (True, "hypernetwork."), (False, "")])
def test_released_checkpoint_layout_loads_like_the_fixture(fixture_dir, tmp_path, wrap, prefix):
    from quari.checkpoint import load_model

    folder = _released_layout(fixture_dir, tmp_path / "ckpt", wrap=wrap, prefix=prefix)
    golden = np.load(fixture_dir / "golden.npz")
    model = load_model(folder)
    assert model.metadata["backbone"] == "google/siglip2-base-patch16-512"
    with torch.inference_mode():
        scores = model(torch.from_numpy(golden["queries"])).score(golden["gallery"])
    np.testing.assert_allclose(scores.numpy(), golden["scores"], atol=1e-5)


def test_load_model_recognises_each_kind_of_folder(fixture_dir, tmp_path):
    from quari.checkpoint import load_model
    from quari.errors import NotFoundError

    model = QuARIModel(tiny_config("paper")).eval()
    save(model, tmp_path / "mine")
    assert load_model(tmp_path / "mine").config == model.config
    assert load_model(str(fixture_dir)).config.variant == "reference"
    with pytest.raises(NotFoundError, match="no such model folder"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a quari model folder"):
        load_model(tmp_path / "empty")


def test_hf_spec_reads_the_hub_cache_offline(fixture_dir, tmp_path, monkeypatch):
    """A cache laid out as huggingface_hub writes it (models--owner--name/snapshots/<sha>,
    refs/main), read with HF_HUB_OFFLINE=1: no network is touched."""
    from quari.checkpoint import load_model

    cache = tmp_path / "hub"
    repo = cache / "models--EricX003--QuARI-google-siglip2-base-patch16-512"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _released_layout(fixture_dir, repo / "snapshots" / commit, wrap=True, prefix="")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model = load_model("hf:EricX003/QuARI-google-siglip2-base-patch16-512")
    golden = np.load(fixture_dir / "golden.npz")
    with torch.inference_mode():
        refined = model(torch.from_numpy(golden["queries"])).refined_query
    np.testing.assert_allclose(refined.numpy(), golden["refined_query"], atol=1e-5)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set and it is not in the cache"):
        load_model("hf:EricX003/not-cached")
    with pytest.raises(QuARIInputError, match="expected hf:<owner>/<name>"):
        load_model("hf:no-owner")


@pytest.mark.parametrize(
    ("val", "base", "start", "change"),
    [
        (0.5, 0.4, "Above the", "+25.0 %"),
        (0.3, 0.4, "Below the", "-25.0 %"),
        (0.4, 0.4, "Level with the", "+0.0 %"),
    ],
)
def test_validation_verdict_compares_the_model_with_plain_cosine(val, base, start, change):
    verdict = validation_verdict({"val/mAP": val, "baseline/mAP": base, "val/recall@1": 0.9})
    assert verdict.startswith(f"{start} frozen backbone: validation mAP {val:.4f}")
    assert f"plain cosine's {base:.4f} ({change})" in verdict
    assert ("plain cosine ranks better" in verdict) == (start == "Below the")
    recall = validation_verdict({"val/recall@1": 0.2, "baseline/recall@1": 0.8}, "recall@1")
    assert recall.startswith("Below the frozen backbone: validation recall@1 0.2000")


def test_validation_verdict_says_whether_the_gain_is_beyond_chance():
    m = {"val/mAP": 0.50, "baseline/mAP": 0.40}
    clear = validation_verdict({**m, "gain_se/mAP": 0.02})  # ± 0.0392 around +0.1
    assert "(+25.0 %; 95 % interval of the difference +0.0608 to +0.1392)" in clear
    close = validation_verdict({**m, "gain_se/mAP": 0.06})  # ± 0.1176: holds 0
    assert "within chance: 95 % interval of the difference -0.0176 to +0.2176" in close
    assert close.startswith("Above the frozen backbone")  # the direction is still said
    level = validation_verdict({"val/mAP": 0.4, "baseline/mAP": 0.4, "gain_se/mAP": 0.0})
    assert "interval" not in level and "(+0.0 %)" in level


def test_validation_verdict_needs_both_numbers():
    assert validation_verdict({}) is None
    assert validation_verdict({"val/mAP": 0.5}) is None
    assert validation_verdict({"baseline/mAP": 0.5}) is None
    assert validation_verdict({"val/mAP": "0.5", "baseline/mAP": 0.4}) is None


def test_loading_a_reference_model_does_not_import_the_compiler(tmp_path):
    """The loader's shape check builds the model on the meta device; torch runs some meta
    ops through Python decompositions that import torch._dynamo (over a second at a
    process's first load). The model quari trains by default loads without it."""
    save(QuARIModel(tiny_config("reference", blend_weight=0.5)), tmp_path / "model")
    code = (
        "import sys; from quari.checkpoint import load_model; "
        f"load_model({str(tmp_path / 'model')!r}); print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
