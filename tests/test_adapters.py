"""Query adapters: the cosine baseline and the linear adapter, full and low-rank (exact factored
form of cos(Wq, Wd), folders, load_model, every retrieval mode)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quari import QuARIModel
from quari.adapters import CosineAdapter, LinearAdapter, QueryAdapter
from quari.checkpoint import load_model
from quari.errors import CheckpointError, QuARIInputError
from quari.index import CandidateIndex
from quari.retriever import MODES, Retriever

from helpers import assert_close, brute_force, make_set, perturbed_low_rank, tiny_config


@pytest.mark.parametrize("out_dim", [8, 24, 40])  # D < E, D = E, D > E
def test_linear_adapter_scores_cos_wq_wd_exactly(out_dim):
    torch.manual_seed(0)
    adapter = LinearAdapter(24, out_dim)
    with torch.no_grad():
        adapter.weight.add_(0.3 * torch.randn_like(adapter.weight))  # not orthonormal any more
    rng = np.random.default_rng(1)
    q, d = rng.standard_normal((3, 24)), rng.standard_normal((60, 24)).astype(np.float32)
    ad = adapter(torch.from_numpy(q).float())
    assert isinstance(adapter, QueryAdapter)
    assert ad.rank == min(out_dim, 24) and ad.variant == "paper"
    oracle = brute_force(adapter, q, d)
    assert_close(ad.score(d).numpy(), oracle, 2e-5)
    top = ad.scan([(0, d[:25]), (25, d[25:])], 5)
    want = np.argsort(-oracle, axis=1, kind="stable")[:, :5]
    assert top.ids.numpy().tolist() == want.tolist()
    assert_close(top.scores.numpy(), np.take_along_axis(oracle, want, 1), 2e-5)


def test_linear_adapter_at_init_with_full_dimension_is_the_cosine_baseline():
    adapter = LinearAdapter(16, 16)  # orthonormal init: a rotation
    q, d = torch.randn(2, 16), torch.randn(30, 16)
    assert_close(adapter(q).score(d).numpy(), CosineAdapter(16)(q).score(d).numpy(), 1e-5)


def test_factors_follow_weight_updates():
    adapter = LinearAdapter(12, 6)
    q, d = torch.randn(2, 12), torch.randn(10, 12)
    before = adapter(q).score(d)
    with torch.no_grad():
        adapter.weight.mul_(torch.linspace(0.1, 2.0, 12))  # in place: same storage
    after = adapter(q).score(d)
    assert not torch.allclose(before, after)
    assert_close(after.numpy(), brute_force(adapter, q, d), 2e-5)


def test_rank_deficient_weight_drops_null_directions():
    adapter = LinearAdapter(10, 4)
    with torch.no_grad():
        adapter.weight[2:] = 0  # rank 2
    q, d = torch.randn(3, 10), torch.randn(20, 10)
    ad = adapter(q)
    assert ad.rank == 2
    assert_close(ad.score(d).numpy(), brute_force(adapter, q, d), 2e-5)


def test_save_load_and_load_model(tmp_path):
    adapter = LinearAdapter(24, 8, {"encoder": "test-encoder"})
    adapter.save(tmp_path / "lin")
    config = json.loads((tmp_path / "lin" / "config.json").read_text())
    assert config["format"] == "quari-linear-adapter" and config["config"]["bias"] is False
    assert "Linear adapter" in (tmp_path / "lin" / "README.md").read_text()
    loaded = load_model(tmp_path / "lin")
    assert isinstance(loaded, LinearAdapter) and not loaded.training
    assert loaded.metadata["encoder"] == "test-encoder"
    assert torch.equal(loaded.weight, adapter.weight)
    config["config"]["out_dim"] = 9
    (tmp_path / "lin" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"holds \{'weight': \(8, 24\)\}.*\(9, 24\)"):
        load_model(tmp_path / "lin")
    config["config"].update(out_dim=8, bias=True)
    (tmp_path / "lin" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="bias"):
        LinearAdapter.load(tmp_path / "lin")
    config.update(format_version=99, config={**config["config"], "bias": False})
    (tmp_path / "lin" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="newer"):
        load_model(tmp_path / "lin")


def test_low_rank_adapter_starts_at_cosine_and_scores_cos_wq_wd_exactly():
    adapter = LinearAdapter(24, rank=3)
    q, d = torch.randn(3, 24), torch.randn(60, 24)
    assert_close(adapter(q).score(d).numpy(), CosineAdapter(24)(q).score(d).numpy(), 1e-6)
    adapter = perturbed_low_rank()
    W = adapter.matrix().detach()
    assert torch.linalg.matrix_rank(W - torch.eye(24)) == 3
    ad = adapter(q)
    assert (ad.rank, ad.variant, ad.anchor_scale) == (3, "reference", 1.0)
    oracle = brute_force(adapter, q, d)
    assert not np.allclose(oracle, brute_force(LinearAdapter(24, 24), q, d), atol=1e-2)
    assert_close(ad.score(d).numpy(), oracle, 2e-5)
    assert_close(adapter.project(q).detach().numpy(), F.normalize(q @ W.T, dim=-1).numpy(), 1e-5)
    top = ad.scan([(0, d[:25]), (25, d[25:])], 5)
    want = np.argsort(-oracle, axis=1, kind="stable")[:, :5]
    assert top.ids.numpy().tolist() == want.tolist()


def test_low_rank_adapter_rejects_bad_shapes():
    with pytest.raises(QuARIInputError, match="rank must be in 1 … 8"):
        LinearAdapter(8, rank=9)
    with pytest.raises(QuARIInputError, match="maps E → E"):
        LinearAdapter(8, 4, rank=2)


def test_low_rank_save_load(tmp_path):
    adapter = perturbed_low_rank()
    adapter.save(tmp_path / "low")
    config = json.loads((tmp_path / "low" / "config.json").read_text())
    assert config["format_version"] == 2 and config["config"]["rank"] == 3
    assert "rank 3" in (tmp_path / "low" / "README.md").read_text()
    loaded = load_model(tmp_path / "low")
    assert isinstance(loaded, LinearAdapter) and loaded.rank == 3 and not loaded.training
    assert torch.equal(loaded.left, adapter.left) and torch.equal(loaded.right, adapter.right)
    q, d = torch.randn(2, 24), torch.randn(10, 24)
    assert torch.equal(loaded(q).score(d), adapter(q).score(d))
    # a full adapter keeps format version 1, which older quari versions read
    LinearAdapter(24, 8).save(tmp_path / "full")
    assert json.loads((tmp_path / "full" / "config.json").read_text())["format_version"] == 1
    config["config"]["rank"] = 4
    (tmp_path / "low" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"rank 4.*'left': \(24, 4\)"):
        load_model(tmp_path / "low")
    config["config"]["rank"] = 30
    (tmp_path / "low" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="rank must be in 1 … 24"):
        load_model(tmp_path / "low")


@pytest.mark.parametrize("form", ["full", "low-rank"])
def test_every_retrieval_mode_ranks_by_the_linear_map(tmp_path, form):
    eset, stored, _ = make_set(tmp_path / "set", shards=(120, 80))
    torch.manual_seed(2)
    if form == "full":
        adapter = LinearAdapter(24, 12, {"encoder": "test-encoder"})
    else:
        adapter = perturbed_low_rank(seed=2)
    q = np.random.default_rng(5).standard_normal((4, 24)).astype(np.float32)
    oracle = brute_force(adapter, q, stored.astype(np.float32))
    want = np.argsort(-oracle, axis=1, kind="stable")[:, :5]
    index = CandidateIndex.build(eset, "faiss:Flat", progress=False)
    retriever = Retriever(eset, adapter, index)
    scan = retriever.search(q, 5, mode="scan", with_metadata=False)
    assert scan.ids.tolist() == want.tolist()
    for mode in MODES[1:]:
        # candidates = the whole set: every mode must then find the exact top 5
        res = retriever.search(q, 5, mode=mode, candidates=200, with_metadata=False)
        assert res.ids.tolist() == want.tolist(), mode
        assert_close(res.scores, np.take_along_axis(oracle, want, 1), 2e-5)


def _mean_map_model(**overrides):
    torch.manual_seed(0)
    config = tiny_config("reference", map_query=True, **overrides)
    model = QuARIModel(config).eval()
    model.metadata["encoder"] = "test-encoder"
    return model


def test_mean_map_is_the_mean_of_the_models_maps_truncated_to_rank_k():
    model = _mean_map_model()
    E, r = model.config.embedding_dim, model.config.rank
    q = F.normalize(torch.randn(50, E), dim=-1)
    with torch.inference_mode():
        ad = model(q)
    # float64 oracle: the mean of the dense per-query corrections α U Vᵀ
    mean = (ad.U.double() @ ad.V.double().transpose(1, 2)).mean(0) * ad.anchor_scale
    eye = torch.eye(E, dtype=torch.float64)
    full = LinearAdapter.mean_of(model, q, rank=E, batch_size=7)  # chunks: the sum is exact
    assert full.metadata["encoder"] == "test-encoder"
    assert full.metadata["mean_of"]["queries"] == 50
    assert_close(full.matrix().detach().double(), eye + mean, atol=1e-5)
    # the default rank is the model's; the rank-r truncation is the best one (Eckart–Young)
    low = LinearAdapter.mean_of(model, q)
    assert low.rank == r
    S = torch.linalg.svdvals(mean)
    err = torch.linalg.matrix_norm(low.matrix().detach().double() - eye - mean) ** 2
    assert float(err) == pytest.approx(float((S[r:] ** 2).sum()), rel=1e-3)
    kept = low.metadata["mean_of"]["energy_kept"]
    assert kept == pytest.approx(float((S[:r] ** 2).sum() / (S**2).sum()), rel=1e-6) and kept < 1


def test_mean_map_of_one_query_scores_that_query_as_the_model_does():
    model = _mean_map_model(dropout=0.3)  # dropout would change the maps in training mode
    q = F.normalize(torch.randn(1, model.config.embedding_dim), dim=-1)
    gallery = F.normalize(torch.randn(30, model.config.embedding_dim), dim=-1)
    model.train()  # averaged in eval mode (no dropout), and handed back as it came
    adapter = LinearAdapter.mean_of(model, q.repeat(3, 1))  # one map, rank r: kept whole
    assert model.training
    with torch.inference_mode():
        want = model.eval()(q).score(gallery)
    assert_close(adapter(q).score(gallery), want, atol=1e-5)


@pytest.mark.parametrize(
    "variant, overrides, match",
    [
        ("paper", {}, "reference variant with map_query"),
        ("reference", {"map_query": False}, "map_query False"),
        ("reference", {"map_query": True, "blend_weight": 0.5}, r"no static blend .* 0.5\)"),
    ],
)
def test_mean_map_refuses_models_whose_score_is_not_cos_tq_td(variant, overrides, match):
    model = QuARIModel(tiny_config(variant, **overrides)).eval()
    with pytest.raises(QuARIInputError, match=match):
        LinearAdapter.mean_of(model, torch.randn(4, 24))
    if overrides.get("blend_weight"):  # searched without its blend, it scores cos(Tq, Td)
        model.set_blend_weight(0)
        assert LinearAdapter.mean_of(model, torch.randn(4, 24)).embedding_dim == 24


def test_mean_map_rejects_bad_ranks_and_queries():
    model = _mean_map_model()
    with pytest.raises(QuARIInputError, match="rank must be in 1 … 24"):
        LinearAdapter.mean_of(model, torch.randn(4, 24), rank=25)
    with pytest.raises(QuARIInputError, match="queries"):
        LinearAdapter.mean_of(model, torch.randn(4, 23))


def test_whitening_adapter_is_the_fitted_map_and_round_trips(tmp_path):
    from quari.whitening import fit_whitening

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 24)) * np.linspace(5, 0.1, 24)
    adapter = LinearAdapter.whitening(vectors, 0.05, {"encoder": "test-encoder"})
    torch.testing.assert_close(adapter.matrix().detach(), fit_whitening(vectors, 0.05))
    q, d = rng.standard_normal((4, 24)), rng.standard_normal((60, 24))
    with torch.no_grad():
        got = adapter(torch.from_numpy(q).float()).score(torch.from_numpy(d).float())
    assert_close(got.numpy(), brute_force(adapter, q, d), 2e-5)
    adapter.save(tmp_path / "w")
    loaded = load_model(tmp_path / "w")
    assert loaded.metadata["adapter"] == "whitening" and loaded.metadata["shrinkage"] == 0.05
    torch.testing.assert_close(loaded.matrix(), adapter.matrix())
