"""CPU runtimes (quari.runtime): golden outputs per runtime, packing, chunking, refusals."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch

import quari.hypernet.chunks as chunks
from quari import QuARIInputError, QuARIModel
from quari.checkpoint import load_reference
from quari.errors import MissingDependencyError
from quari.hypernet.packing import PACK_MAX_ROWS, onednn_packing_available
from quari.runtime import build_runtime

from helpers import tiny_config, top10_agreement

# Stated tolerances of the reduced-precision runtimes on the reference fixture (largest score
# and q′ error against the golden fp32 outputs); measured 1.1e-3 (bf16) and 3.9e-3 (int8).
REDUCED_TOLERANCE = {"bf16": 5e-3, "int8": 1.5e-2}


@pytest.fixture(scope="module")
def golden():
    from helpers import FIXTURE

    data = np.load(FIXTURE / "golden.npz")
    return {key: data[key] for key in data}


@pytest.fixture(scope="module")
def fixture_model():
    from helpers import FIXTURE

    return load_reference(FIXTURE)


def _outputs(model: QuARIModel, golden) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        ad = model(torch.from_numpy(golden["queries"]))
        return ad.refined_query.numpy(), ad.score(golden["gallery"]).numpy()


@pytest.mark.parametrize("name", ["eager", "bf16", "int8"])
def test_runtime_reproduces_the_golden_fixture(fixture_model, golden, name):
    model = copy.deepcopy(fixture_model).set_runtime(name)
    assert model.runtime == name
    refined, scores = _outputs(model, golden)
    tol = REDUCED_TOLERANCE.get(name, 1e-5)
    np.testing.assert_allclose(refined, golden["refined_query"], atol=tol)
    np.testing.assert_allclose(scores, golden["scores"], atol=tol)
    assert top10_agreement(scores, golden["scores"]) == 1.0
    if name != "eager":  # reduced precision really ran: not bit-identical to fp32
        assert np.abs(scores - golden["scores"]).max() > 1e-6


def _cpu_packs_bf16() -> bool:
    """Whether oneDNN can reorder bf16 weights on this CPU (AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    if not onednn_packing_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16), 1)
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _cpu_packs_bf16(), reason="oneDNN packs no bf16 on this CPU")
def test_bf16_packs_small_batches_only(fixture_model):
    model = copy.deepcopy(fixture_model).set_runtime("bf16")
    runtime = model._runtime
    big = PACK_MAX_ROWS // model.inference_tokens + 1  # the first batch past the packed rows
    q = torch.nn.functional.normalize(torch.randn(big, model.config.embedding_dim), dim=-1)

    def unpacked(x):  # the same bf16 maps, reordered by F.linear on every call
        return model.predict_factors(x, linears=runtime.linears)

    with torch.inference_mode():
        small = runtime(q[:3])  # (q′, U, V) of checked queries, as model(q) calls it
        assert runtime._packs.cache_info().currsize == 1
        for got, want in zip(small, unpacked(q[:3]), strict=True):
            torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
        large = runtime(q)
        assert runtime._packs.cache_info().currsize == 1  # past PACK_MAX_ROWS: not packed
        assert all(map(torch.equal, large, unpacked(q)))


@pytest.mark.parametrize("refusal", ["simulated", "this CPU's"])
def test_bf16_runs_unpacked_where_packing_fails(fixture_model, monkeypatch, refusal):
    if refusal == "this CPU's" and _cpu_packs_bf16():
        pytest.skip("this CPU packs bf16: only the simulated refusal applies")
    if refusal == "simulated":

        def refuse(*args):
            raise RuntimeError("no bf16 reorder here")

        monkeypatch.setattr("quari.runtime.Bf16PackedLinear", refuse)
    runtime = copy.deepcopy(fixture_model).set_runtime("bf16")._runtime
    q = torch.nn.functional.normalize(torch.randn(3, runtime.model.config.embedding_dim), dim=-1)
    with torch.inference_mode():
        want = runtime.model.predict_factors(q, linears=runtime.linears)
        assert all(map(torch.equal, runtime(q), want))
    assert runtime._pack_ok is False


@pytest.mark.slow
def test_compiled_runtime_reproduces_the_golden_fixture(fixture_model, golden):
    model = copy.deepcopy(fixture_model).set_runtime("compile")
    refined, scores = _outputs(model, golden)
    np.testing.assert_allclose(refined, golden["refined_query"], atol=1e-5)
    np.testing.assert_allclose(scores, golden["scores"], atol=1e-5)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.mark.slow
def test_onnx_runtime_reproduces_the_golden_fixture_and_caches_its_export(
    fixture_model, golden, onnx_cache
):
    model = copy.deepcopy(fixture_model).set_runtime("onnx", cache=onnx_cache)
    first = model._runtime
    assert first.exported and first.path.parent == onnx_cache
    # Idle ONNX Runtime threads must not spin: they would hold the cores the scoring needs next.
    options = first._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    refined, scores = _outputs(model, golden)
    np.testing.assert_allclose(refined, golden["refined_query"], atol=1e-5)
    np.testing.assert_allclose(scores, golden["scores"], atol=1e-5)
    # Any batch size (the export's batch axis is dynamic).
    with torch.inference_mode():
        one = model(torch.from_numpy(golden["queries"][2:3])).score(golden["gallery"]).numpy()
    np.testing.assert_allclose(one[0], golden["scores"][2], atol=1e-5)
    # The same weights load the cached graph; other weights get their own.
    again = build_runtime(copy.deepcopy(fixture_model), "onnx", cache=onnx_cache)
    assert not again.exported and again.path == first.path
    other = copy.deepcopy(fixture_model)
    with torch.no_grad():
        other.query_decoder[0].bias.add_(0.1)
    assert build_runtime(other, "onnx", cache=onnx_cache).path != first.path


@pytest.mark.parametrize("name", ["bf16", "int8", "onnx"])
def test_runtimes_keep_the_mapped_query(name, tmp_path):
    """A map_query model (the default recipe's) under each runtime: q′ is still normalize(T q)
    of the T that runtime predicts, and close to the eager pass's."""
    if name == "onnx":
        pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    torch.manual_seed(0)
    cfg = tiny_config("reference", normalize_factors=False, anchor_scale=1.0, map_query=True)
    model = QuARIModel(cfg).eval()
    q = torch.nn.functional.normalize(torch.randn(5, 24), dim=-1)
    with torch.inference_mode():
        want = model(q)
        model.set_runtime(name, **({"cache": tmp_path} if name == "onnx" else {}))
        got = model(q)
    tq = torch.einsum("bef,bf->be", got.dense(), q)
    torch.testing.assert_close(
        got.refined_query, torch.nn.functional.normalize(tq, dim=-1), atol=1e-5, rtol=0
    )
    # A random model's T is far from I (a trained one's stays near it), so the reduced-precision
    # errors here run ~1.5× the fixture's stated ones (measured 5.4e-3 bf16, 2.2e-2 int8).
    tolerance = 1e-5 if name == "onnx" else 2 * REDUCED_TOLERANCE[name]
    torch.testing.assert_close(got.refined_query, want.refined_query, atol=tolerance, rtol=0)


def test_onnx_runtime_names_its_extra_when_missing(fixture_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'quari\[onnx\]'"):
        build_runtime(fixture_model, "onnx")


def test_runtime_serves_only_eval_no_grad_cpu_queries(monkeypatch):
    torch.manual_seed(0)
    model = QuARIModel(tiny_config("reference")).eval().set_runtime("bf16")
    calls, original = [], type(model._runtime).__call__
    monkeypatch.setattr(
        type(model._runtime), "__call__", lambda self, q: calls.append(len(q)) or original(self, q)
    )
    q = torch.randn(3, 24)
    with torch.inference_mode():
        model(q)
    assert calls == [3]
    model(q)  # autograd on (the parameters require grad): the eager pass
    model.train()(q)
    assert calls == [3]


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.train(),
        lambda m: m.load_state_dict(m.state_dict()),
        lambda m: m.to(torch.float64),
    ],
)
def test_weight_changes_drop_the_runtime(change):
    torch.manual_seed(0)
    model = QuARIModel(tiny_config("reference")).eval().set_runtime("int8")
    change(model)
    assert model.runtime == "eager"


def test_copies_run_eagerly_and_bad_names_are_refused(fixture_model):
    model = copy.deepcopy(fixture_model).set_runtime("bf16")
    assert copy.deepcopy(model).runtime == "eager" and model.runtime == "bf16"
    with pytest.raises(QuARIInputError, match="runtime must be one of"):
        model.set_runtime("fp8")
    with pytest.raises(QuARIInputError, match=r"bad options \['colour'\]"):
        model.set_runtime("bf16", colour="red")


@pytest.mark.parametrize("name", ["eager", "bf16"])
def test_large_batches_run_in_near_equal_chunks(monkeypatch, name):
    torch.manual_seed(0)
    model = QuARIModel(tiny_config("reference")).eval()  # 1 + r = 5 token rows per query
    q = torch.nn.functional.normalize(torch.randn(11, 24), dim=-1)
    runtime = build_runtime(model, name)
    with torch.inference_mode():
        whole = runtime.run(q)
    monkeypatch.setattr(chunks, "CHUNK_ROWS", 20)  # at most 4 queries per chunk
    assert chunks.chunk_size(model) == 4
    sizes, run = [], runtime.run
    monkeypatch.setattr(runtime, "run", lambda part: sizes.append(len(part)) or run(part))
    with torch.inference_mode():
        parts = runtime(q)
    assert sizes == [4, 4, 3]
    for a, b in zip(parts, whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    if name == "eager":  # the model's own default path chunks the same way
        spy, eager = [], model.eager_factors
        monkeypatch.setattr(
            model, "eager_factors", lambda part: spy.append(len(part)) or eager(part)
        )
        with torch.inference_mode():
            model(q)
        assert spy == [4, 4, 3]
