"""QuARIModel and HyperNetConfig: shapes, variant semantics, input checks."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quari import HyperNetConfig, QuARIInputError, QuARIModel

from helpers import dense_scores, tiny_config

VARIANTS = ["paper", "reference"]


def _model(variant: str, seed: int = 0, **overrides) -> QuARIModel:
    torch.manual_seed(seed)
    return QuARIModel(tiny_config(variant, **overrides)).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_have_the_documented_shapes(variant):
    model = _model(variant)
    with torch.inference_mode():
        ad = model(torch.randn(5, 24))
    assert ad.refined_query.shape == (5, 24) and ad.U.shape == ad.V.shape == (5, 24, 4)
    assert torch.allclose(ad.refined_query.norm(dim=-1), torch.ones(5))
    assert ad.variant == variant


def test_paper_variant_is_pure_low_rank():
    with torch.inference_mode():
        ad = _model("paper")(torch.randn(3, 24))
    ranks = torch.linalg.matrix_rank(ad.dense(), rtol=1e-5)
    assert (ranks <= 4).all()


def test_reference_variant_is_identity_plus_normalised_low_rank():
    model = _model("reference")
    with torch.inference_mode():
        ad = model(torch.randn(3, 24))
    assert ad.anchor_scale == pytest.approx(0.8)
    assert torch.allclose(torch.linalg.matrix_norm(ad.U), torch.ones(3), atol=1e-5)
    assert torch.allclose(torch.linalg.matrix_norm(ad.V), torch.ones(3), atol=1e-5)
    delta = ad.dense() - torch.eye(24)
    assert (torch.linalg.matrix_rank(delta, rtol=1e-4) <= 4).all()


@pytest.mark.parametrize("variant,distinct", [("paper", True), ("reference", False)])
def test_bank_identity(variant, distinct):
    """docs/method.md §3.3: with zero-initialised banks and shared positions the U and V banks stay
    equal; the paper variant gives them distinct positions so they differ."""
    model = _model(variant)
    model.v_decoder.load_state_dict(model.u_decoder.state_dict())  # same decoder on both banks
    with torch.inference_mode():
        ad = model(torch.randn(4, 24))
    same = torch.allclose(ad.U, ad.V, atol=1e-6)
    assert same != distinct


@pytest.mark.parametrize("variant", VARIANTS)
def test_non_unit_queries_are_normalised(variant):
    model = _model(variant)
    q = torch.randn(3, 24)
    with torch.inference_mode():
        a, b = model(q), model(7.5 * q)
    assert torch.allclose(a.refined_query, b.refined_query, atol=1e-6)
    assert torch.allclose(a.U, b.U, atol=1e-5)


def test_query_residual_weight_one_returns_the_query():
    model = _model("paper", query_residual_weight=1.0)
    q = torch.nn.functional.normalize(torch.randn(2, 24), dim=-1)
    with torch.inference_mode():
        assert torch.allclose(model(q).refined_query, q, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_map_query_sends_the_query_through_its_own_map(variant):
    """map_query: q′ = T q / ‖T q‖ with the T the model predicts (checked against the dense T),
    so cos(q′, T d) = cos(T q, T d); there is no query decoder; save and load keep the mode."""
    model = _model(variant, map_query=True)
    assert model.query_decoder is None
    q = torch.nn.functional.normalize(torch.randn(4, 24), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(9, 24), dim=-1)
    with torch.inference_mode():
        ad = model(q)
    T = ad.dense()  # (B, E, E)
    tq = torch.einsum("bef,bf->be", T, q)
    torch.testing.assert_close(ad.refined_query, torch.nn.functional.normalize(tq, dim=-1))
    td = torch.einsum("bef,nf->bne", T, d)
    expected = torch.nn.functional.cosine_similarity(tq[:, None], td, dim=-1)
    torch.testing.assert_close(ad.score(d), expected, atol=1e-5, rtol=0)
    # the decoded q′ of the same weights is a different vector (the mode matters)
    decoded = QuARIModel(tiny_config(variant))
    decoded.load_state_dict(model.state_dict(), strict=False)
    with torch.inference_mode():
        assert not torch.allclose(decoded.eval()(q).refined_query, ad.refined_query, atol=1e-3)
    assert HyperNetConfig.from_dict(model.config.to_dict()).map_query is True


def test_token_dropout_only_while_training():
    model = _model("reference")
    q = torch.randn(2, 24)
    with torch.inference_mode():
        assert torch.equal(model(q).U, model(q).U)
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        outs = [model(q).U for _ in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_steps_and_rank_are_honoured(variant):
    one = _model(variant, num_steps=1, rank=7)
    with torch.inference_mode():
        ad = one(torch.randn(2, 24))
    assert ad.U.shape[-1] == 7


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_scores_match_oracle_and_train_end_to_end(variant):
    """Gradients reach every parameter through the factored score."""
    model = _model(variant, dropout=0.0).train()
    q = torch.randn(6, 24)
    gallery = torch.randn(6, 24)
    ad = model(q)
    np.testing.assert_allclose(
        ad.score(gallery).detach().numpy(), dense_scores(ad.detach(), gallery), atol=2e-5
    )
    ad.score(gallery).diagonal().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not no_grad, no_grad


def test_paper_sized_parameter_count():
    """docs/method.md §3.2 counts ≈15.2 M parameters for E = 768, H = 512 (paper layout)."""
    model = QuARIModel(HyperNetConfig(embedding_dim=768))
    n = sum(p.numel() for p in model.parameters())
    assert 14.5e6 < n < 16.0e6, n


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "queries,match",
    [
        (torch.randn(3, 23), "expected embedding dimension 24, got 23"),
        (torch.randn(24), r"expected a 2-D array with last axis 24, got shape \(24,\)"),
        (torch.randn(0, 24), "empty batch"),
        (torch.tensor([[float("nan")] * 24]), r"row \[0\] contains NaN or Inf"),
        (torch.tensor([[1.0] * 23 + [float("inf")]] * 2), r"row \[0\] contains NaN or Inf \(2 bad"),
        (np.array([["a"] * 24]), "expected a numeric array"),
    ],
)
def test_bad_queries(queries, match):
    with pytest.raises(QuARIInputError, match=match):
        _model("paper")(queries)


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(variant="other"), "variant must be 'paper' or 'reference'"),
        (dict(hidden_dim=18, num_heads=4), "must be divisible by num_heads"),
        (dict(variant="paper", anchor_scale=0.5), "reference variant only"),
        (dict(rank=0), "rank must be a positive integer"),
        (dict(rank=40), r"rank \(40\) cannot exceed embedding_dim \(24\)"),
        (dict(dropout=1.0), r"dropout must lie in \[0, 1\)"),
        (dict(blend_weight=1.5), r"blend_weight must lie in \[0, 1\], got 1.5"),
    ],
)
def test_bad_configs(fields, match):
    with pytest.raises(QuARIInputError, match=match):
        tiny_config(**fields)


def test_config_round_trip_and_variant_defaults():
    cfg = tiny_config("reference")
    assert cfg.map_query is False  # the paper's and the reference code's decoded q′
    assert (cfg.anchor_scale, cfg.query_residual_weight, cfg.token_dropout) == (0.8, 0.5, 0.05)
    assert HyperNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(QuARIInputError, match=r"unknown HyperNetConfig field\(s\) \['colour'\]"):
        HyperNetConfig.from_dict({**cfg.to_dict(), "colour": 1})
    # A model without a blend saves no blend_weight (older quari versions keep reading it).
    assert "blend_weight" not in cfg.to_dict()
    blended = tiny_config("reference", blend_weight=0.25)
    assert HyperNetConfig.from_dict(blended.to_dict()) == blended


def test_a_blended_model_scores_the_mix_of_both_cosines():
    """(1 − a)·cos(q′, T d) + a·cos(W q, W d) with the model's own W, against a dense oracle;
    without a blend the model holds no whitening buffer at all."""
    assert not hasattr(QuARIModel(tiny_config("reference")), "whitening")
    torch.manual_seed(0)
    model = QuARIModel(tiny_config("reference", map_query=True, blend_weight=0.3)).eval()
    W = torch.randn(24, 24)
    model.whitening.copy_(W)
    q, d = torch.randn(5, 24), torch.randn(40, 24)
    with torch.inference_mode():
        ad = model(q)
        plain = dense_scores(ad, d)
        static = (
            F.normalize(q.double() @ W.double().T, dim=-1)
            @ F.normalize(d.double() @ W.double().T, dim=-1).T
        )
        np.testing.assert_allclose(ad.score(d).numpy(), 0.7 * plain + 0.3 * static.numpy(),
                                   atol=2e-5)  # fmt: skip
    with pytest.raises(QuARIInputError, match="pass the queries"):
        model.to_adaptation(ad.refined_query, ad.U, ad.V)
    # another weight at search time, without retraining: 0 is QuARI's score alone, a' mixes
    # at a'; the saved model keeps its trained weight; None goes back to it
    with torch.inference_mode():
        alone = model.set_blend_weight(0)(q)
        assert alone.blend is None and model.blend_weight == 0.0
        np.testing.assert_allclose(alone.score(d).numpy(), plain, atol=2e-5)
        mixed = model.set_blend_weight(0.8)(q).score(d).numpy()
        np.testing.assert_allclose(mixed, 0.2 * plain + 0.8 * static.numpy(), atol=2e-5)
    assert model.config.blend_weight == 0.3 and model.config.to_dict()["blend_weight"] == 0.3
    assert model.set_blend_weight(None).blend_weight == 0.3
    for bad in (1.5, -0.1, True):
        with pytest.raises(QuARIInputError, match="blend weight must lie in"):
            model.set_blend_weight(bad)
    plain_model = QuARIModel(tiny_config("reference"))
    assert plain_model.set_blend_weight(0).blend_weight == 0.0
    with pytest.raises(QuARIInputError, match="trained without the static blend"):
        plain_model.set_blend_weight(0.5)


# -- the inference pass (docs/method.md §3.5) ----------------------------------------------------
def _sharpened(model: QuARIModel, gain: float = 4.0) -> QuARIModel:
    """Scales the attention projections up, so that the attention weights are far from uniform
    and a wrong fold (a missing log 2) would show."""
    with torch.no_grad():
        for layer in model.transformer.layers:
            layer.self_attn.in_proj_weight.mul_(gain)
    return model


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _fp32_linears(model: QuARIModel) -> dict:
    """Every transformer map as plain F.linear: forces the pass written out from the weights
    (without replacements, an unfolded pass runs the modules)."""
    return {
        name: functools.partial(torch.nn.functional.linear, weight=w, bias=b)
        for name, (w, b) in model.transformer_linears().items()
    }


@pytest.mark.parametrize(
    "seed,overrides",
    [
        (0, {}),
        (1, dict(num_layers=3, num_steps=4)),
        (2, dict(rank=7, num_heads=4, hidden_dim=32)),
        (3, dict(num_steps=1, num_layers=1)),
        (4, dict(query_residual_weight=0.0, normalize_factors=False, anchor_scale=0.3)),
    ],
)
def test_folded_pass_equals_the_full_pass(seed, overrides):
    """Reference variant: [ctx; U] with log 2 on the U logits gives the outputs of [ctx; U; V],
    and both equal the unchanged nn.TransformerEncoder pass, to fp32 precision."""
    model = _sharpened(_model("reference", seed, **overrides))
    q = torch.nn.functional.normalize(torch.randn(6, 24), dim=-1)
    with torch.inference_mode():
        folded = model.predict_factors(q)
        full = model.predict_factors(q, fold=False, linears=_fp32_linears(model))
        unchanged = model.transformer_factors(q)  # eval mode: the nn.TransformerEncoder pass
    assert _max_diff(folded, full) < 1e-5
    assert _max_diff(folded, unchanged) < 1e-5
    assert _max_diff(full, unchanged) < 1e-5
    with torch.inference_mode():  # unfolded without replacements: the module pass itself
        assert _max_diff(model.predict_factors(q, fold=False), unchanged) == 0


def test_the_fold_halves_the_sequence_and_matters(monkeypatch):
    """The folded pass attends over 1 + r tokens with a log 2 bias; without the bias the
    outputs would differ (so the equality above is not vacuous)."""
    model = _sharpened(_model("reference", 5, rank=6))
    q = torch.nn.functional.normalize(torch.randn(3, 24), dim=-1)
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kw):
        seen.append((key.shape[-2], None if attn_mask is None else attn_mask.flatten().tolist()))
        return sdpa(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.inference_mode():
        folded = model.predict_factors(q)
        n_folded = len(seen)
        full = model.predict_factors(q, fold=False, linears=_fp32_linears(model))
    assert {s for s, _ in seen[:n_folded]} == {7} and {s for s, _ in seen[n_folded:]} == {13}
    bias = seen[0][1]
    assert bias[0] == 0 and np.allclose(bias[1:], np.log(2.0))

    def no_bias(query, key, value, attn_mask=None, **kw):
        return sdpa(query, key, value, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_bias)
    with torch.inference_mode():
        unbiased = model.predict_factors(q)
    assert _max_diff(folded, full) < 1e-5 < _max_diff(unbiased, full)


def test_paper_variant_keeps_the_full_pass():
    model = _sharpened(_model("paper", 6))
    q = torch.nn.functional.normalize(torch.randn(4, 24), dim=-1)
    with torch.inference_mode():
        unchanged = model.transformer_factors(q)
        assert _max_diff(model.predict_factors(q), unchanged) == 0
        written_out = model.predict_factors(q, linears=_fp32_linears(model))
        assert _max_diff(written_out, unchanged) < 1e-5
        with pytest.raises(QuARIInputError, match="needs the reference variant"):
            model.predict_factors(q, fold=True)


def test_inference_options_are_refused_in_training_mode():
    model = _model("reference").train()
    q = torch.nn.functional.normalize(torch.randn(2, 24), dim=-1)
    for kwargs in (dict(fold=False), dict(linears={})):
        with pytest.raises(QuARIInputError, match="call model.eval"):
            model.predict_factors(q, **kwargs)


def test_linears_replace_the_transformer_maps_by_name():
    model = _model("reference", 7)
    q = torch.nn.functional.normalize(torch.randn(3, 24), dim=-1)
    table = model.transformer_linears()
    assert len(table) == 4 * model.config.num_layers
    w, b = table["transformer.layers.1.linear2"]
    assert w is model.transformer.layers[1].linear2.weight and b.shape == (16,)
    calls = []

    def doubled(x, w=w, b=b):
        calls.append(x.shape)
        return 2 * torch.nn.functional.linear(x, w, b)

    with torch.inference_mode():
        plain = model.predict_factors(q)
        swapped = model.predict_factors(q, linears={"transformer.layers.1.linear2": doubled})
    assert len(calls) == model.config.num_steps and calls[0] == (3, 5, 64)
    assert _max_diff(plain, swapped) > 1e-4
    with pytest.raises(QuARIInputError, match=r"unknown name\(s\) \['transformer.layers.9"):
        model.predict_factors(q, linears={"transformer.layers.9.linear1": doubled})


def test_training_without_dropout_runs_the_folded_pass_with_the_same_gradients():
    """Reference variant, no dropout of any kind: training folds the V bank (half the work);
    loss and every parameter gradient equal the full [ctx; U; V] module pass's."""
    torch.manual_seed(0)
    cfg = HyperNetConfig(embedding_dim=24, rank=4, hidden_dim=16, num_layers=2, num_heads=2,
                         num_steps=2, variant="reference", token_dropout=0.0)  # fmt: skip
    model = QuARIModel(cfg).train()
    q = torch.nn.functional.normalize(torch.randn(5, 24), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(7, 24), dim=-1)

    def grads(factors):
        model.zero_grad()
        refined, U, V = factors
        loss = model.to_adaptation(refined, U, V).score(d).square().sum()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    calls = []
    hook = model.transformer.register_forward_hook(lambda *a: calls.append(1))
    folded_loss, folded = grads(model.predict_factors(q))
    assert calls == []  # the folded pass runs the layers from their weights
    full_loss, full = grads(model.transformer_factors(q))
    assert calls == [1, 1]  # once per refinement step
    hook.remove()
    torch.testing.assert_close(folded_loss, full_loss, atol=1e-5, rtol=1e-5)
    assert len(folded) == len(full)
    for a, b in zip(folded, full, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # With token dropout the banks differ: training keeps the full pass (random masks).
    dropping = QuARIModel(HyperNetConfig(**{**cfg.to_dict(), "token_dropout": 0.5})).train()
    torch.manual_seed(1)
    a = dropping.predict_factors(q)[1]
    torch.manual_seed(1)
    b = dropping.transformer_factors(q)[1]
    torch.testing.assert_close(a, b)
