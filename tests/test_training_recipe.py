"""The default recipe's parts: the identity start, relative query noise, validation by a
relevance column, and the model card that records recipe, data and validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quari import Adaptation, HyperNetConfig, QuARIModel
from quari.checkpoint import load, save, validation_verdict
from quari.errors import QuARIInputError
from quari.eval.metrics import per_query_metrics, relevance_matrix
from quari.eval.synthetic import PlantedSpec, write_planted_set
from quari.training import MiningConfig, TrainConfig, TrainSource, train
from quari.training.data import TrainingData
from quari.training.loss import add_query_noise, quari_loss
from quari.training.module import VAL_METRICS, validation_metrics

from helpers import tiny_config

SPEC = PlantedSpec(dim=24, cluster_dim=8, subspace_dim=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def identity_config(**kw) -> HyperNetConfig:
    return tiny_config("reference", normalize_factors=False, init="identity", **kw)


def test_identity_init_is_exactly_the_frozen_backbone_and_still_learns():
    torch.manual_seed(0)
    model = QuARIModel(identity_config(anchor_scale=1.0))
    q = torch.nn.functional.normalize(torch.randn(6, 24), dim=1)
    d = torch.nn.functional.normalize(torch.randn(40, 24), dim=1)
    ad = model(q)
    assert torch.equal(ad.U, torch.zeros_like(ad.U))
    torch.testing.assert_close(ad.refined_query, q, atol=1e-7, rtol=0)
    torch.testing.assert_close(ad.score(d), q @ d.T, atol=1e-6, rtol=0)
    with torch.no_grad():  # the QR (inference) path agrees
        torch.testing.assert_close(ad.detach().score(d), q @ d.T, atol=1e-6, rtol=0)
    # LoRA's pair: U is zero but V is not, so the loss moves U (and q′'s decoder) at once.
    quari_loss(model(q), d[:6]).loss.backward()
    assert model.u_decoder[-1].weight.grad.abs().sum() > 0
    assert model.query_decoder[-1].weight.grad.abs().sum() > 0
    assert model.v_decoder[-1].weight.grad.abs().sum() == 0  # ∂/∂V ∝ U = 0 at the start


def test_mapped_query_starts_at_the_frozen_backbone_and_learns_the_map():
    """The default recipe's q′ = T q: at the identity start T = I, so q′ = q (whatever λ), and
    the loss reaches U through both the query and the items."""
    torch.manual_seed(0)
    model = QuARIModel(identity_config(anchor_scale=1.0, map_query=True, query_residual_weight=0))
    q = torch.nn.functional.normalize(torch.randn(6, 24), dim=1)
    d = torch.nn.functional.normalize(torch.randn(40, 24), dim=1)
    ad = model(q)
    torch.testing.assert_close(ad.refined_query, q, atol=1e-7, rtol=0)
    torch.testing.assert_close(ad.score(d), q @ d.T, atol=1e-6, rtol=0)
    quari_loss(model(q), d[:6]).loss.backward()
    assert model.u_decoder[-1].weight.grad.abs().sum() > 0
    cfg = TrainConfig(train=(TrainSource(Path("s")),), out=Path("o"), accelerator="cpu")
    assert cfg.map_query and cfg.model_config(24).map_query
    assert not TrainConfig(train=cfg.train, out=cfg.out, preset="paper").map_query


def test_decoder_norm_keeps_the_start_at_cosine_and_the_factors_small():
    """At 4 refinement steps the reference form's state is several times larger than at 2, and
    so were V's entries; with the decoder LayerNorm the identity start is still exactly cosine
    and V starts at ≈ 1/√E whatever the depth (docs/method.md §5.5)."""
    E = 256
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(8, E, generator=g), dim=1)
    d = torch.nn.functional.normalize(torch.randn(30, E, generator=g), dim=1)
    rms = {}
    for norm in (False, True):
        torch.manual_seed(0)
        cfg = identity_config(embedding_dim=E, rank=8, hidden_dim=64, num_heads=4, num_steps=4,
                              anchor_scale=1.0, decoder_norm=norm)  # fmt: skip
        model = QuARIModel(cfg)
        assert any(isinstance(m, torch.nn.LayerNorm) for m in model.v_decoder) is norm
        ad = model(q)
        torch.testing.assert_close(ad.score(d), q @ d.T, atol=1e-6, rtol=0)
        rms[norm] = ad.V.pow(2).mean().sqrt().item() * E**0.5
    assert 0.3 < rms[True] < 1.5, rms
    assert rms[False] > 5 * rms[True], rms


def test_models_saved_before_decoder_norm_load_with_their_variants_decoders(tmp_path):
    torch.manual_seed(2)
    q, d = torch.randn(3, 24), torch.randn(5, 24)
    for variant, norm in (("paper", True), ("reference", False)):
        model = QuARIModel(tiny_config(variant)).eval()
        assert model.config.decoder_norm is norm
        save(model, tmp_path / variant)
        data = json.loads((tmp_path / variant / "config.json").read_text())
        del data["config"]["decoder_norm"]
        (tmp_path / variant / "config.json").write_text(json.dumps(data))
        back = load(tmp_path / variant)
        assert back.config.decoder_norm is norm
        with torch.no_grad():
            torch.testing.assert_close(back(q).score(d), model(q).score(d), atol=0, rtol=0)
    with pytest.raises(QuARIInputError, match="decoder_norm must be true or false"):
        tiny_config("reference", decoder_norm="yes")
    normed = QuARIModel(identity_config(decoder_norm=True))
    save(normed, tmp_path / "normed")
    assert load(tmp_path / "normed").config == normed.config


def test_identity_init_needs_the_anchored_unnormalised_form():
    with pytest.raises(QuARIInputError, match="variant='reference'"):
        tiny_config("paper", normalize_factors=False, init="identity")
    with pytest.raises(QuARIInputError, match="normalize_factors=False"):
        tiny_config("reference", init="identity")
    with pytest.raises(QuARIInputError, match="query_residual_weight > 0"):
        identity_config(query_residual_weight=0.0)
    with pytest.raises(QuARIInputError, match="init must be"):
        tiny_config("reference", init="zeros")


def test_models_saved_before_the_init_field_load_unchanged(tmp_path):
    """A config.json without ``init`` (every model saved before it existed) loads, with the
    same outputs; an identity-initialised model round-trips its config."""
    torch.manual_seed(1)
    old = QuARIModel(tiny_config("reference")).eval()
    save(old, tmp_path / "old")
    data = json.loads((tmp_path / "old" / "config.json").read_text())
    del data["config"]["init"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(data))
    back = load(tmp_path / "old")
    assert back.config.init == "default"
    q, d = torch.randn(3, 24), torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(back(q).score(d), old(q).score(d), atol=0, rtol=0)
    new = QuARIModel(identity_config())
    save(new, tmp_path / "new")
    assert load(tmp_path / "new").config == new.config


def test_relative_noise_has_the_stated_norm_whatever_the_dimension():
    for E in (64, 768):
        q = torch.nn.functional.normalize(torch.randn(4000, E), dim=1)
        gen = torch.Generator().manual_seed(0)
        rel = (add_query_noise(q, 0.5, gen, relative=True) - q).norm(dim=1)
        gen = torch.Generator().manual_seed(0)
        paper = (add_query_noise(q, 0.5, gen) - q).norm(dim=1)
        # s ~ U[0, 1]: E‖σ·s·ε/√E‖ ≈ σ/2; the paper's is √E times that
        assert rel.mean().item() == pytest.approx(0.25, rel=0.03)
        assert (paper / rel).mean().item() == pytest.approx(E**0.5, rel=1e-4)


def labelled_set(root: Path) -> None:
    """Planted pairs (2 captions per image) whose ``cluster`` column serves as the label."""
    write_planted_set(root, 60, SPEC, captions_per_image=2)


def test_validation_by_a_relevance_column_matches_brute_force(tmp_path):
    labelled_set(tmp_path / "set")
    cfg = TrainConfig(
        train=(TrainSource(tmp_path / "set"),), out=tmp_path / "run", image_key="image_id",
        relevance_key="cluster", val_fraction=0.3, semipos=False, progress=False,
    )  # fmt: skip
    assert cfg.relevance_key == ("cluster",)
    data = TrainingData.from_config(cfg)
    queries, gallery, target = data.val_vectors()
    keys, gallery_keys = data.val_relevance()
    assert data.relevance_description == "same cluster"
    # Brute force: each query's relevant images are those of its own image's cluster.
    eset = data.open(tmp_path / "set")
    rows, gallery_rows, _ = data.val_queries
    cluster = np.asarray(eset.metadata(np.arange(eset.rows))["cluster"].to_pylist())
    relevant = [np.flatnonzero(cluster[gallery_rows] == cluster[r]) for r in rows]
    assert all(target[i].item() in relevant[i] for i in range(len(rows)))
    assert any(len(r) > 1 for r in relevant)

    torch.manual_seed(0)
    model = QuARIModel(tiny_config("reference")).eval()
    got = validation_metrics(model, queries, gallery, keys, gallery_keys=gallery_keys)
    with torch.no_grad():
        adapted = model(queries).score(gallery)
    for prefix, scores in (("val", adapted), ("baseline", queries @ gallery.T)):
        ranked = scores.argsort(dim=1, descending=True).numpy()
        rel, n_rel = relevance_matrix(ranked, relevant)
        want = per_query_metrics(rel, n_rel, VAL_METRICS.values())
        for name, metric in VAL_METRICS.items():
            assert got[f"{prefix}/{name}"] == pytest.approx(want[metric].mean()), name

    with pytest.raises(QuARIInputError, match="no metadata column 'colour'"):
        TrainingData.from_config(cfg.with_(relevance_key=("colour",)))


def test_training_batches_carry_the_relevance_key_and_mask_by_it(tmp_path):
    """Each pair's ``relevance`` equals its row's cluster (numbered consistently); the module
    masks exactly the caption pairs of equal cluster (and only captions: image queries keep
    every negative)."""
    from quari.training.data import PairBatches
    from quari.training.module import QuARITrainingModule

    labelled_set(tmp_path / "set")
    cfg = TrainConfig(
        train=(TrainSource(tmp_path / "set"),), out=tmp_path / "run", image_key="image_id",
        relevance_key="cluster", relevance_negatives=True, val_fraction=0.3, semipos=False,
        progress=False, rank=4, hidden_dim=16, num_layers=1, num_heads=2, num_steps=1,
    )  # fmt: skip
    data = TrainingData.from_config(cfg)
    batch = PairBatches(data, batch_size=16)[0, 0]
    eset = data.open(tmp_path / "set")
    cluster = np.asarray(eset.metadata(batch["row"].numpy())["cluster"].to_pylist())
    same = cluster[:, None] == cluster[None, :]
    assert np.array_equal(same, (batch["relevance"][:, None] == batch["relevance"]).numpy())
    assert same.sum() > 16  # the batch holds repeats, so the check has teeth
    module = QuARITrainingModule(cfg.model_config(SPEC.dim).to_dict(), cfg.to_dict())
    captioned = torch.arange(16) % 3 != 0
    mask = module.in_batch_false_negatives(batch, captioned).numpy()
    both = captioned.numpy()[:, None] & captioned.numpy()[None, :]
    assert np.array_equal(mask, same & both)
    with pytest.raises(QuARIInputError, match="image_queries"):
        cfg.with_(image_queries=1.5)


def test_the_model_card_records_recipe_data_and_validation_against_the_baseline(tmp_path):
    labelled_set(tmp_path / "set")
    cfg = TrainConfig(
        train=(TrainSource(tmp_path / "set"),), out=tmp_path / "run", image_key="image_id",
        relevance_key=("cluster",), val_fraction=0.3, rank=4, hidden_dim=16, num_layers=1,
        num_heads=2, num_steps=2, batch_size=8, max_steps=6, val_every_steps=3,
        mining=MiningConfig(k=10), progress=False, accelerator="cpu",
    )  # fmt: skip
    result = train(cfg)
    card = (cfg.out / "README.md").read_text()
    assert "preset default" in card and "query noise relative" in card
    assert "negatives: in-batch images of another cluster" in card
    assert "initialisation | the frozen backbone (q′ = q, T = I)" in card
    assert "adapted query | q′ = normalize(T q)" in card  # the default maps the query
    assert "T = I + 1·U Vᵀ (rank 4)" in card
    assert "| decoder LayerNorm | no |" in card  # 2 steps: the size-aware default has none
    assert "relevance: same cluster" in card and "60 images" not in card
    assert "best val/mAP (AP@1000; relevance: same cluster)" in card
    assert "| metric | this model | frozen backbone (cosine) | difference ± 95 % |" in card
    m = result.metrics
    val, base, se = (round(m[f"{k}/mAP"], 6) for k in ("val", "baseline", "gain_se"))
    assert f"| mAP | {val} | {base} | {val - base:+.4f} ± {1.96 * se:.4f} |" in card
    assert "gain_se" not in card  # the standard errors show as the intervals only
    assert f"**{validation_verdict(m)}**" in card
    model = load(cfg.out)
    assert model.metadata["metrics"]["baseline/mAP"] == pytest.approx(m["baseline/mAP"])
    assert model.config.init == "identity"


def test_an_identity_model_scores_like_cosine_through_every_adaptation_path():
    """The reference form with c = 1 and U = 0 is T = I in the dense oracle too."""
    model = QuARIModel(identity_config(anchor_scale=1.0)).eval()
    q = torch.randn(3, 24)
    with torch.no_grad():
        ad = model(q)
    dense = ad.dense()
    torch.testing.assert_close(dense, torch.eye(24).expand(3, 24, 24), atol=0, rtol=0)
    assert isinstance(ad, Adaptation) and ad.variant == "reference"
