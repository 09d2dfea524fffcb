"""Prepacked fp32 weights of the default pass (quari.hypernet.packing): the library choice,
equality with the plain pass, which batches are packed, and when packs are dropped."""

from __future__ import annotations

import copy

import pytest
import torch

from quari import QuARIModel
from quari.hypernet import packing
from quari.hypernet.packing import (
    FP32_PACKS_ENV,
    ONEDNN_MIN_WIDTH,
    PACK_MAX_ROWS,
    PACK_SETS,
    fp32_pack_library,
    mkl_packing_available,
    onednn_packing_available,
)

from helpers import tiny_config

LIBRARIES = [
    pytest.param(
        "mkl",
        marks=pytest.mark.skipif(not mkl_packing_available(), reason="this torch has no MKL"),
    ),
    pytest.param(
        "mkldnn",
        marks=pytest.mark.skipif(not onednn_packing_available(), reason="this torch has no oneDNN"),
    ),
]


@pytest.fixture(params=LIBRARIES)
def library(request, monkeypatch) -> str:
    """Each packing library this torch has, forced through the environment override."""
    monkeypatch.setenv(FP32_PACKS_ENV, request.param)
    monkeypatch.setattr(packing, "ONEDNN_MIN_WIDTH", 0)  # the tests' models are narrow
    return request.param


def _packed_keys(model: QuARIModel) -> list[int | None]:
    return list(model._packs._sets)


@pytest.mark.parametrize(
    ("vendor", "want"),
    [("GenuineIntel", "mkl"), ("AuthenticAMD", "mkldnn"), ("", "mkldnn")],
)
def test_the_library_follows_the_cpu_vendor_and_the_override(monkeypatch, vendor, want):
    monkeypatch.delenv(FP32_PACKS_ENV, raising=False)
    monkeypatch.setattr(packing, "_cpu_vendor", lambda: vendor)
    if not (mkl_packing_available() and onednn_packing_available()):
        pytest.skip("needs a torch with both MKL and oneDNN")
    assert fp32_pack_library() == want
    monkeypatch.setenv(FP32_PACKS_ENV, "off")
    assert fp32_pack_library() is None
    monkeypatch.setenv(FP32_PACKS_ENV, "MKL")  # case and spaces do not matter
    assert fp32_pack_library() == "mkl"
    monkeypatch.setenv(FP32_PACKS_ENV, "openblas")
    with pytest.raises(ValueError, match="QUARI_FP32_PACKS='openblas'"):
        fp32_pack_library()


def test_a_library_this_torch_lacks_means_no_packs(monkeypatch):
    monkeypatch.setenv(FP32_PACKS_ENV, "mkl")
    monkeypatch.setattr(packing, "_packed_ops", lambda library: None)
    assert fp32_pack_library() is None
    model = QuARIModel(tiny_config("reference")).eval()
    with torch.inference_mode():
        model(torch.randn(1, 24))
    assert _packed_keys(model) == []


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_default_pass_reads_prepacked_weights(library, variant):
    torch.manual_seed(0)
    model = QuARIModel(tiny_config(variant)).eval()
    tokens = model.inference_tokens
    assert tokens == 1 + (1 if variant == "reference" else 2) * model.config.rank
    big = PACK_MAX_ROWS // tokens + 1  # one query more than MKL's packs take
    for batch in (1, 3, big):
        q = torch.nn.functional.normalize(torch.randn(batch, 24), dim=-1)
        with torch.inference_mode():
            got = model(q)
            want = model.to_adaptation(*model.predict_factors(q))
        torch.testing.assert_close(got.refined_query, want.refined_query, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.U, want.U, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.V, want.V, atol=1e-6, rtol=0)
    if library == "mkl":
        assert _packed_keys(model) == [tokens, 3 * tokens]  # per row count, not past the limit
    else:
        assert _packed_keys(model) == [None]  # one oneDNN layout serves every batch


def test_packed_weights_follow_weight_edits_and_are_bounded(library):
    torch.manual_seed(0)
    model = QuARIModel(tiny_config("reference")).eval()
    q = torch.nn.functional.normalize(torch.randn(1, 24), dim=-1)
    with torch.inference_mode():
        before = model(q).U
    with torch.no_grad():  # an in-place edit: same storage, new version
        model.transformer.layers[0].linear1.weight.mul_(-1.0)
    with torch.inference_mode():
        after = model(q).U
        want = model.predict_factors(q)[1]
    torch.testing.assert_close(after, want, atol=1e-6, rtol=0)
    assert (after - before).abs().max() > 1e-4
    with torch.inference_mode():
        for batch in range(1, PACK_SETS + 3):
            model(torch.randn(batch, 24))
    if library == "mkl":  # LRU: the newest row counts kept
        assert _packed_keys(model) == [5 * b for b in range(3, PACK_SETS + 3)]
    else:
        assert _packed_keys(model) == [None]
    clone = copy.deepcopy(model)  # a copy starts with an empty cache of its own
    assert _packed_keys(clone) == []
    with torch.inference_mode():
        torch.testing.assert_close(clone(q).U, model(q).U, atol=1e-6, rtol=0)
    assert _packed_keys(clone) == [5 if library == "mkl" else None]
    model.train()
    assert _packed_keys(model) == []


@pytest.mark.skipif(not onednn_packing_available(), reason="this torch has no oneDNN")
def test_onednn_packs_only_wide_transformers(monkeypatch):
    monkeypatch.setenv(FP32_PACKS_ENV, "mkldnn")
    q = torch.nn.functional.normalize(torch.randn(1, 24), dim=-1)
    for width, packed in ((ONEDNN_MIN_WIDTH // 2, []), (ONEDNN_MIN_WIDTH, [None])):
        model = QuARIModel(tiny_config("reference", hidden_dim=width, num_layers=1)).eval()
        with torch.inference_mode():
            model(q)
        assert _packed_keys(model) == packed


def test_a_new_library_choice_repacks(monkeypatch):
    if not (mkl_packing_available() and onednn_packing_available()):
        pytest.skip("needs a torch with both MKL and oneDNN")
    monkeypatch.setattr(packing, "ONEDNN_MIN_WIDTH", 0)
    model = QuARIModel(tiny_config("reference")).eval()
    q = torch.nn.functional.normalize(torch.randn(2, 24), dim=-1)
    monkeypatch.setenv(FP32_PACKS_ENV, "mkl")
    with torch.inference_mode():
        model(q)
        assert _packed_keys(model) == [2 * model.inference_tokens]
        monkeypatch.setenv(FP32_PACKS_ENV, "mkldnn")
        model(q)
        assert _packed_keys(model) == [None]


def test_autograd_and_training_never_read_packed_weights(library):
    torch.manual_seed(0)
    model = QuARIModel(tiny_config("reference")).eval()
    q = torch.nn.functional.normalize(torch.randn(2, 24), dim=-1)
    loss = model(q).U.sum()  # grad mode, parameters require grad: the plain pass
    loss.backward()
    assert model.transformer.layers[0].linear1.weight.grad is not None
    assert _packed_keys(model) == []
