"""Retriever: every mode against a brute-force oracle; filters never leak."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quari import Adaptation, QuARIInputError, QuARIModel
from quari.index import CandidateIndex
from quari.retriever import Retriever, take_queries

from helpers import assert_topk_matches, dense_scores, make_set, score_tolerance, tiny_config

K = 60  # index candidates
k = 10


@pytest.fixture(params=["paper", "reference"])
def setup(request, tmp_path):
    eset, stored, meta = make_set(tmp_path / "s")
    torch.manual_seed(0)
    model = QuARIModel(tiny_config(request.param)).eval()
    index = CandidateIndex.build(eset, progress=False)
    queries = np.random.default_rng(7).standard_normal((5, 24)).astype(np.float32)
    return eset, stored.astype(np.float64), meta, model, index, queries


def topk_rows(scores: np.ndarray, n: int) -> np.ndarray:
    return np.argsort(-scores, axis=1)[:, :n]


def restrict(oracle: np.ndarray, allowed: list[np.ndarray]) -> np.ndarray:
    out = np.full_like(oracle, -np.inf)
    for b, rows in enumerate(allowed):
        out[b, rows] = oracle[b, rows]
    return out


def plain_oracle(q, stored):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    return qn @ (stored / np.linalg.norm(stored, axis=1, keepdims=True)).T


def test_scan_equals_the_exact_oracle(setup):
    eset, stored, _, model, index, q = setup
    res = Retriever(eset, model, index).search(q, k, mode="scan")
    with torch.inference_mode():
        ad = model(torch.from_numpy(q))
    assert_topk_matches(res.ids, res.scores, dense_scores(ad, stored), k, score_tolerance(ad))


def test_plain_equals_cosine(setup):
    eset, stored, _, _, index, q = setup
    res = Retriever(eset, None, index).search(q, k, mode="plain", candidates=K)
    oracle = plain_oracle(q, stored)
    cands = topk_rows(q @ stored.T, K)
    assert_topk_matches(res.ids, res.scores, restrict(oracle, list(cands)), k, 1e-5)


def test_rerank_is_exact_quari_on_the_candidates_of_q(setup):
    eset, stored, _, model, index, q = setup
    res = Retriever(eset, model, index).search(q, k, mode="rerank", candidates=K)
    with torch.inference_mode():
        ad = model(torch.from_numpy(q))
    cands = topk_rows(q @ stored.T, K)
    oracle = restrict(dense_scores(ad, stored), list(cands))
    assert_topk_matches(res.ids, res.scores, oracle, k, score_tolerance(ad))


def test_adaptive_uses_the_union_of_q_and_w_candidates(setup):
    eset, stored, _, model, index, q = setup
    res = Retriever(eset, model, index).search(q, k, mode="adaptive", candidates=K)
    with torch.inference_mode():
        ad = model(torch.from_numpy(q))
    w = ad.adapted_query().double().numpy()
    cands = [
        np.union1d(a, b)
        for a, b in zip(topk_rows(q @ stored.T, K), topk_rows(w @ stored.T, K), strict=True)
    ]
    oracle = restrict(dense_scores(ad, stored), cands)
    assert_topk_matches(res.ids, res.scores, oracle, k, score_tolerance(ad))


def test_with_every_row_as_candidate_all_quari_modes_agree(setup):
    eset, _, _, model, index, q = setup
    r = Retriever(eset, model, index)
    scan = r.search(q, k, mode="scan")
    for mode in ("rerank", "adaptive"):
        res = r.search(q, k, mode=mode, candidates=len(eset))
        np.testing.assert_allclose(res.scores, scan.scores, atol=1e-5)


@pytest.mark.parametrize("exact_below", [10**6, 0])  # exact over the passing rows / via FAISS
@pytest.mark.parametrize("mode", ["plain", "rerank", "adaptive", "scan"])
def test_filters_never_return_a_filtered_out_row(setup, mode, exact_below):
    eset, stored, meta, model, index, q = setup
    r = Retriever(eset, model, index, exact_below=exact_below)
    res = r.search(q, k, mode=mode, candidates=K, where="group == 2 and name != 'item-3'")
    group = np.asarray(meta.column("group"))
    names = np.asarray(meta.column("name"))
    passing = np.flatnonzero((group == 2) & (names != "item-3"))
    assert (res.ids >= 0).all() and np.isin(res.ids, passing).all()
    with torch.inference_mode():
        ad = model(torch.from_numpy(q)) if mode != "plain" else Adaptation.identity(q)
    oracle = dense_scores(ad, stored)
    if exact_below or mode == "scan":
        allowed = [passing] * len(q)  # answered exactly over the passing rows
    else:
        ip = np.full((len(q), len(stored)), -np.inf)
        ip[:, passing] = (q @ stored.T)[:, passing]
        allowed = list(topk_rows(ip, K))
        if mode == "adaptive":
            wp = np.full_like(ip, -np.inf)
            wp[:, passing] = (ad.adapted_query().double().numpy() @ stored.T)[:, passing]
            allowed = [np.union1d(a, b) for a, b in zip(allowed, topk_rows(wp, K), strict=True)]
    assert_topk_matches(res.ids, res.scores, restrict(oracle, allowed), k, score_tolerance(ad))
    # Metadata rows come back aligned with the ids.
    for b, table in enumerate(res.metadata):
        assert table.column("row").to_pylist() == res.ids[b].tolist()
        assert table.column("name").to_pylist() == names[res.ids[b]].tolist()


def test_a_filter_passed_by_fewer_than_k_rows(setup):
    eset, _, _, model, index, q = setup
    res = Retriever(eset, model, index).search(
        q, k, mode="adaptive", where='name in ["item-1", "item-9", "item-700"]'
    )
    assert sorted(res.ids[0][res.ids[0] >= 0].tolist()) == [1, 9, 700]
    assert (res.ids[:, 3:] == -1).all() and np.isneginf(res.scores[:, 3:]).all()
    assert any("only 3 rows pass the filter" in n for n in res.notes)
    assert res.to_records()[0][0]["name"] in {"item-1", "item-9", "item-700"}


@pytest.mark.parametrize("mode", ["plain", "rerank", "adaptive", "scan"])
def test_adapt_then_retrieve_equals_search(setup, mode):
    """The split the HTTP service batches with: one adapt call for several queries, each part
    retrieved on its own, answers as search does."""
    eset, _, _, model, index, q = setup
    r = Retriever(eset, model, index, exact_below=0)
    ad = r.adapt(q, mode)
    assert len(ad) == len(q)
    rows = [3, 0]
    where = "group != 1"
    part = r.retrieve(
        q[rows], k, adaptation=take_queries(ad, rows), mode=mode, candidates=K, where=where
    )
    want = r.search(q[rows], k, mode=mode, candidates=K, where=where)
    np.testing.assert_array_equal(part.ids, want.ids)
    np.testing.assert_allclose(part.scores, want.scores, atol=1e-6)
    assert part.notes == want.notes and part.timings["adapt"] == 0.0
    with pytest.raises(QuARIInputError, match="2 queries adapted, 5 queries given"):
        r.retrieve(q, k, adaptation=take_queries(ad, rows), mode=mode)


def test_query_batches_do_not_change_results(setup):
    eset, _, _, model, index, q = setup
    one = Retriever(eset, model, index, batch_size=2).search(q, k, mode="adaptive")
    all_ = Retriever(eset, model, index, batch_size=64).search(q, k, mode="adaptive")
    np.testing.assert_array_equal(one.ids, all_.ids)


def test_hnsw_index_adaptive_recall(tmp_path):
    """Through an approximate index the modes still return exact scores of real rows."""
    eset, stored, _ = make_set(tmp_path / "s", shards=(500, 500))
    index = CandidateIndex.build(eset, "faiss:HNSW16", progress=False)
    torch.manual_seed(0)
    model = QuARIModel(tiny_config("reference")).eval()
    q = np.random.default_rng(2).standard_normal((3, 24)).astype(np.float32)
    res = Retriever(eset, model, index).search(q, k, mode="adaptive", candidates=100)
    with torch.inference_mode():
        ad = model(torch.from_numpy(q))
    oracle = dense_scores(ad, stored.astype(np.float64))
    np.testing.assert_allclose(res.scores, np.take_along_axis(oracle, res.ids, 1), atol=1e-5)


def test_bad_setups_are_named(setup, tmp_path):
    eset, _, _, model, index, q = setup
    with pytest.raises(QuARIInputError, match="needs a QuARI model"):
        Retriever(eset, None, index).search(q, mode="rerank")
    with pytest.raises(QuARIInputError, match="needs a candidate index: build one with `quari"):
        Retriever(eset, model, None, scan_below=100).search(q, mode="adaptive")
    with pytest.raises(QuARIInputError, match="expected embedding dimension 24, got 7"):
        Retriever(eset, model, index).search(np.ones((1, 7)))
    with pytest.raises(QuARIInputError, match="mode must be one of"):
        Retriever(eset, model, index).search(q, mode="fast")
    model.metadata["encoder"] = "hf:google/siglip2-base-patch16-512"
    with pytest.raises(QuARIInputError, match="trained for encoder 'hf:google/siglip2"):
        Retriever(eset, model, index)
    wide = QuARIModel(tiny_config("paper", embedding_dim=32))
    with pytest.raises(QuARIInputError, match="expects 32-d embeddings"):
        Retriever(eset, wide, index)


def test_a_model_already_on_the_device_is_not_moved(tmp_path):
    """Moving a model drops its CUDA graphs (QuARIModel._apply resets them), so the Retriever
    moves it only when it is elsewhere: count the moves."""
    eset, _, _ = make_set(tmp_path / "s")
    model = QuARIModel(tiny_config("paper")).eval()
    moves = []
    original = QuARIModel._apply

    def counting(self, fn, *args, **kwargs):
        moves.append(1)
        return original(self, fn, *args, **kwargs)

    QuARIModel._apply = counting
    try:
        Retriever(eset, model, device="cpu")
        Retriever(eset, model, device=torch.device("cpu"))
        assert moves == []
        Retriever(eset, model.double(), device="cpu")  # a cast is a move
        assert len(moves) == 1
    finally:
        QuARIModel._apply = original


def test_text_and_image_queries_go_through_the_encoder(tmp_path):
    from quari.store import EmbeddingSet

    from embed_helpers import ToyEncoder, photo

    encoder = ToyEncoder()
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((50, encoder.dim)).astype(np.float32)
    rows[7] = encoder.encode_texts(["a red car"])[0]
    rows[21] = encoder.encode_images([photo(3)])[0]
    eset = EmbeddingSet.create(tmp_path / "s", dim=encoder.dim, encoder=encoder.id)
    eset.append(rows, {"name": [f"item{i}" for i in range(50)]})
    retriever = Retriever(eset, encoder=encoder)
    by_text = retriever.search(texts=["a red car"], k=3, mode="plain")
    assert by_text.ids[0, 0] == 7 and by_text.metadata[0]["name"][0].as_py() == "item7"
    assert by_text.timings["encode"] > 0 and set(by_text.timings) >= {"adapt", "rescore"}
    by_image = retriever.search(images=[photo(3)], k=3, mode="plain")
    assert by_image.ids[0, 0] == 21
    with pytest.raises(QuARIInputError, match="exactly one of"):
        retriever.search(rows[:1], texts=["x"], mode="plain")
    with pytest.raises(QuARIInputError, match="query 1 is empty"):
        retriever.search(texts=["ok", "  "], mode="plain")
    with pytest.raises(QuARIInputError, match="need an encoder"):
        Retriever(eset).search(texts=["a red car"], mode="plain")
    other = ToyEncoder()
    other.id = "another-encoder"
    with pytest.raises(QuARIInputError, match="encoder is for encoder 'another-encoder'"):
        Retriever(eset, encoder=other)


class LinearBaseline:
    """A static linear map W for queries and gallery alike (T = W, q′ = normalize(W q)) — a
    QueryAdapter that is not a QuARI model."""

    def __init__(self, W: torch.Tensor) -> None:
        self.W, self.embedding_dim, self.metadata = W, W.shape[0], {}

    def __call__(self, queries: torch.Tensor) -> Adaptation:
        B, E = queries.shape[0], self.W.shape[0]
        U, S, Vh = torch.linalg.svd(self.W)  # T = W as factors U·diag(S), V
        return Adaptation(queries @ self.W.T, (U * S).expand(B, E, E), Vh.T.expand(B, E, E))


def test_a_baseline_query_adapter_scores_like_its_dense_oracle(setup):
    from quari.adapters import QueryAdapter

    eset, stored, _, _, index, queries = setup
    W = torch.from_numpy(np.random.default_rng(5).standard_normal((24, 24)))
    baseline = LinearBaseline(W.float())
    assert isinstance(baseline, QueryAdapter)
    result = Retriever(eset, baseline, index).search(queries, k=k, mode="scan")
    q = queries @ W.numpy().T
    d = stored @ W.numpy().T
    oracle = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        d / np.linalg.norm(d, axis=1, keepdims=True)
    ).T
    assert_topk_matches(result.ids, result.scores, oracle, k, 1e-4)


def test_rescoring_gathers_fp32_sets_in_their_own_dtype(tmp_path):
    """clip-retrieval output written in float32 opens as it is; candidates are rescored from
    the fp32 rows (an fp16 gather would cost ~1e-3 in the scores)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from quari.store import EmbeddingSet

    rng = np.random.default_rng(2)
    rows = rng.standard_normal((300, 24))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    (tmp_path / "s" / "img_emb").mkdir(parents=True)
    (tmp_path / "s" / "metadata").mkdir()
    np.save(tmp_path / "s" / "img_emb" / "img_emb_0.npy", rows.astype(np.float32))
    pq.write_table(
        pa.table({"n": np.arange(300)}), tmp_path / "s" / "metadata" / "metadata_0.parquet"
    )
    eset = EmbeddingSet.open(tmp_path / "s")
    assert eset.dtype == "float32"
    index = CandidateIndex.build(eset, progress=False, save=False)
    q = rng.standard_normal((3, 24)).astype(np.float32)
    res = Retriever(eset, index=index).search(q, k=5, mode="plain", candidates=300)
    exact = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ rows.T
    np.testing.assert_allclose(res.scores, -np.sort(-exact, axis=1)[:, :5], atol=1e-6)


@pytest.mark.parametrize("mode", ["plain", "rerank", "adaptive"])
def test_small_sets_without_an_index_find_the_flat_index_candidates(setup, mode):
    eset, _, _, model, index, q = setup
    with_index = Retriever(eset, model, index).search(q, k=k, mode=mode, candidates=K)
    without = Retriever(eset, model).search(q, k=k, mode=mode, candidates=K)
    np.testing.assert_array_equal(without.ids, with_index.ids)
    np.testing.assert_allclose(without.scores, with_index.scores, atol=1e-6)
    assert any("no candidate index" in note for note in without.notes)
    where = "group == 2"
    filtered = Retriever(eset, model, exact_below=0).search(q, k=k, mode=mode, where=where)
    expected = Retriever(eset, model, index, exact_below=0).search(q, k=k, mode=mode, where=where)
    np.testing.assert_array_equal(filtered.ids, expected.ids)


def test_every_mode_ranks_a_blended_model_exactly(tmp_path):
    """A model with a static blend: scan, and every index mode given the whole set as
    candidates, return the oracle's top k — (1 − a)·cos(q′, T d) + a·cos(W q, W d)."""
    from quari.retriever import MODES

    eset, stored, meta = make_set(tmp_path / "set", shards=(120, 80))
    torch.manual_seed(3)
    model = QuARIModel(tiny_config("reference", map_query=True, blend_weight=0.6)).eval()
    model.metadata["encoder"] = "test-encoder"
    W = torch.randn(24, 24) + 3 * torch.eye(24)
    model.whitening.copy_(W)
    q = np.random.default_rng(7).standard_normal((3, 24)).astype(np.float32)
    d = torch.from_numpy(stored.astype(np.float64))
    with torch.inference_mode():
        ad = model(torch.from_numpy(q))
    wq = torch.nn.functional.normalize(torch.from_numpy(q).double() @ W.double().T, dim=-1)
    wd = torch.nn.functional.normalize(d @ W.double().T, dim=-1)
    oracle = 0.4 * dense_scores(ad, d) + 0.6 * (wq @ wd.T).numpy()
    retriever = Retriever(eset, model, CandidateIndex.build(eset, "faiss:Flat", progress=False))
    modes = [m for m in MODES if m != "plain"]  # plain: the cosine baseline, no model
    assert "scan" in modes and "adaptive" in modes
    for mode in modes:
        res = retriever.search(q, 5, mode=mode, candidates=200, with_metadata=False)
        assert_topk_matches(res.ids, res.scores, oracle, 5, 2e-5)
    # The scan read ‖W d‖ from the retriever's per-set cache (filled by the first scan) ...
    norms = retriever._blend_norms[1]
    torch.testing.assert_close(norms.double(), (d @ W.double().T).norm(dim=1), atol=1e-5, rtol=0)
    # ... which serves a filtered scan too (the selected rows' norms), and a changed W
    # is noticed (the cache key holds W's sums), not scored with stale norms.
    group = meta.column("group").to_numpy()
    res = retriever.search(q, 5, mode="scan", where="group == 2", with_metadata=False)
    masked = np.where(group[None, :] == 2, oracle, -np.inf)
    assert_topk_matches(res.ids, res.scores, masked, 5, 2e-5)
    model.whitening.mul_(torch.linspace(0.5, 2, 24))
    res = retriever.search(q, 5, mode="scan", with_metadata=False)
    W2 = model.whitening.double()
    wq = torch.nn.functional.normalize(torch.from_numpy(q).double() @ W2.T, dim=-1)
    wd = torch.nn.functional.normalize(d @ W2.T, dim=-1)
    assert_topk_matches(res.ids, res.scores, 0.4 * dense_scores(ad, d) + 0.6 * (wq @ wd.T).numpy(),
                        5, 2e-5)  # fmt: skip
