"""Adaptation: every scoring path against the dense E×E oracle."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from quari import Adaptation, QuARIInputError
from quari.adaptation import StaticBlend
from quari.retriever import take_queries

from helpers import (
    assert_close,
    assert_topk_matches,
    dense_scores,
    random_adaptation,
    score_tolerance,
)

VARIANTS = ["paper", "reference"]
DTYPES = {
    "float16": (torch.float16, 2e-5),
    "bfloat16": (torch.bfloat16, 2e-5),
    "float32": (torch.float32, 2e-5),
    "float64": (torch.float64, 2e-5),
}


@st.composite
def problems(draw):
    """A random adaptation plus a gallery in a random dtype (values exactly representable)."""
    variant = draw(st.sampled_from(VARIANTS))
    E = draw(st.integers(2, 40))
    r = draw(st.integers(1, min(E, 12)))
    B = draw(st.integers(1, 4))
    N = draw(st.integers(1, 70))
    dtype_name = draw(st.sampled_from(sorted(DTYPES)))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    ad = random_adaptation(B, E, r, variant, seed=seed, scale=scale)
    g = torch.Generator().manual_seed(seed + 1)
    norms = torch.rand(N, 1, generator=g) * 2 + 0.1  # non-unit rows: scores must not care
    gallery = torch.nn.functional.normalize(torch.randn(N, E, generator=g), dim=-1) * norms
    gallery = gallery.to(DTYPES[dtype_name][0])
    return ad, gallery, DTYPES[dtype_name][1]


@given(problems())
def test_score_matches_dense_oracle(problem):
    ad, gallery, atol = problem
    tol = score_tolerance(ad, atol)
    assert_close(ad.score(gallery).numpy(), dense_scores(ad, gallery), tol)
    # Per-query candidate form: each query gets its own (here: reversed) copy of the gallery.
    per_query = gallery.flip(0).expand(len(ad), *gallery.shape)
    assert_close(ad.score(per_query).numpy(), dense_scores(ad, per_query), tol)


@given(problems())
def test_differentiable_gram_form_matches_dense_oracle(problem):
    ad, gallery, atol = problem
    tracked = Adaptation(
        ad.refined_query, ad.U.clone().requires_grad_(), ad.V, ad.variant, ad.anchor_scale
    )
    tol = score_tolerance(ad, atol, power=2)  # the Gram matrix squares κ
    scores = tracked.score(gallery)
    assert scores.requires_grad
    assert_close(scores.detach().numpy(), dense_scores(ad, gallery), tol)
    per_query = gallery.flip(0).expand(len(ad), *gallery.shape)
    assert_close(tracked.score(per_query).detach().numpy(), dense_scores(ad, per_query), tol)


@given(problems(), st.data())
def test_scan_matches_dense_topk_for_any_chunking(problem, data):
    ad, gallery, atol = problem
    N = gallery.shape[0]
    k = data.draw(st.integers(1, N + 5), label="k")
    cuts = sorted(set(data.draw(st.lists(st.integers(0, N), max_size=6), label="cuts")) | {0, N})
    chunks = [
        (a, gallery[a:b].numpy() if gallery.dtype != torch.bfloat16 else gallery[a:b])
        for a, b in itertools.pairwise(cuts)
    ]
    block_rows = data.draw(st.sampled_from([None, 1, 3, 16]), label="block_rows")
    top = ad.scan(iter(chunks), k, block_rows=block_rows)
    assert_topk_matches(
        top.ids, top.scores, dense_scores(ad, gallery), k, score_tolerance(ad, atol)
    )


@given(problems(), st.data())
def test_rerank_equals_oracle_restricted_to_candidates(problem, data):
    ad, gallery, atol = problem
    B, N = len(ad), gallery.shape[0]
    M = data.draw(st.integers(1, N), label="M")
    k = data.draw(st.integers(1, M + 3), label="k")
    rng = np.random.default_rng(data.draw(st.integers(0, 1000), label="seed"))
    ids = np.stack([rng.choice(N, M, replace=False) for _ in range(B)])
    top = ad.rerank(ids, gallery[torch.from_numpy(ids)], k)
    oracle = dense_scores(ad, gallery)
    restricted = np.stack([oracle[b, ids[b]] for b in range(B)])
    local = np.stack([[list(ids[b]).index(i) for i in top.ids[b].tolist()] for b in range(B)])
    assert_topk_matches(local, top.scores, restricted, k, score_tolerance(ad, atol))


@pytest.mark.parametrize("variant", VARIANTS)
def test_adapted_query_gives_the_numerator(variant):
    ad = random_adaptation(3, 20, 5, variant, seed=3)
    d = torch.randn(50, 20, dtype=torch.float64)
    num = torch.einsum("be,bef,nf->bn", ad.refined_query.double(), ad.dense().double(), d)
    np.testing.assert_allclose((ad.adapted_query().double() @ d.T).numpy(), num.numpy(), atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rank_deficient_factors_and_zero_rows(variant):
    ad = random_adaptation(2, 16, 6, variant, seed=4)
    ad.U[:, :, 3:] = 0  # rank drops to 3
    ad.V[:, :, :2] = ad.V[:, :, 2:4]
    gallery = torch.randn(30, 16)
    gallery[7] = 0
    oracle = dense_scores(ad, gallery)
    tol = score_tolerance(ad)
    assert_close(ad.score(gallery).numpy(), oracle, tol)
    top = ad.scan([(0, gallery)], k=30)
    assert_topk_matches(top.ids, top.scores, oracle, 30, tol)
    assert np.allclose(oracle[:, 7], 0)


def test_rerank_padding_and_small_candidate_sets():
    ad = random_adaptation(2, 8, 2, "paper", seed=5)
    vecs = torch.randn(2, 4, 8)
    ids = torch.tensor([[10, 11, -1, -1], [20, 21, 22, 23]])
    top = ad.rerank(ids, vecs, k=10)
    assert top.ids.shape == (2, 4)
    assert set(top.ids[0, :2].tolist()) == {10, 11}
    assert top.ids[0, 2:].tolist() == [-1, -1] and torch.isneginf(top.scores[0, 2:]).all()
    assert set(top.ids[1].tolist()) == {20, 21, 22, 23}


def test_scan_is_batched_and_exact_on_a_memmap(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((1000, 32)).astype(np.float16)
    path = tmp_path / "g.npy"
    np.save(path, data)
    mm = np.load(path, mmap_mode="r")
    ad = random_adaptation(5, 32, 8, "reference", seed=6)
    top = ad.scan(((i, mm[i : i + 300]) for i in range(0, 1000, 300)), k=10)
    assert_topk_matches(top.ids, top.scores, dense_scores(ad, data.astype(np.float64)), 10, 2e-5)


def test_gradients_flow_through_score():
    ad = random_adaptation(2, 12, 3, "reference", seed=7)
    U = ad.U.clone().requires_grad_()
    q = ad.refined_query.clone().requires_grad_()
    scores = Adaptation(q, U, ad.V, "reference", 0.8).score(torch.randn(9, 12))
    scores.sum().backward()
    assert U.grad is not None and torch.isfinite(U.grad).all() and U.grad.abs().sum() > 0
    assert q.grad is not None and q.grad.abs().sum() > 0


# -- bad input ---------------------------------------------------------------------------------
@pytest.fixture
def ad():
    return random_adaptation(2, 8, 2, "paper", seed=8)


def test_wrong_dimension_is_named(ad):
    with pytest.raises(QuARIInputError, match="expected embedding dimension 8, got 7"):
        ad.score(torch.randn(5, 7))
    with pytest.raises(QuARIInputError, match=r"offset 10: expected shape \(n, 8\)"):
        ad.scan([(0, torch.randn(10, 8)), (10, torch.randn(4, 9))], k=3)


def test_nan_rows_are_named_with_their_global_id(ad):
    g = torch.randn(20, 8)
    g[13, 2] = float("nan")
    with pytest.raises(QuARIInputError, match=r"gallery row 13 contains NaN"):
        ad.scan([(0, g[:10]), (10, g[10:])], k=3)
    g[13, 2] = float("inf")
    with pytest.raises(QuARIInputError, match=r"row \[13\] contains NaN or Inf"):
        ad.score(g)


@pytest.mark.parametrize("k", [0, -1, 2.5, True, None])
def test_bad_k(ad, k):
    with pytest.raises(QuARIInputError, match="k must be a positive integer"):
        ad.scan([(0, torch.randn(4, 8))], k=k)


def test_mismatched_shapes(ad):
    with pytest.raises(QuARIInputError, match="batch size 2"):
        ad.score(torch.randn(3, 5, 8))
    with pytest.raises(QuARIInputError, match="does not match candidate_ids"):
        ad.rerank(torch.zeros(2, 4, dtype=torch.long), torch.randn(2, 5, 8), k=2)
    with pytest.raises(QuARIInputError, match="expected \\(B, M\\) integers with B = 2"):
        ad.rerank(torch.zeros(3, 4, dtype=torch.long), torch.randn(3, 4, 8), k=2)
    with pytest.raises(QuARIInputError, match="U and V must both be"):
        Adaptation(torch.randn(2, 8), torch.randn(2, 8, 2), torch.randn(2, 8, 3))
    with pytest.raises(QuARIInputError, match="chunks must yield"):
        ad.scan([torch.randn(4, 8)], k=1)


def test_empty_gallery_and_k_larger_than_n(ad):
    top = ad.scan([], k=5)
    assert top.ids.shape == (2, 0)
    top = ad.scan([(0, torch.randn(3, 8))], k=5)
    assert top.ids.shape == (2, 3) and sorted(top.ids[0].tolist()) == [0, 1, 2]


# -- the static blend: (1 − a)·cos(q′, T d) + a·cos(W q, W d) ---------------------------------
def _blend_problem(problem, seed: int, weight: float):
    """``problem``'s adaptation with a random static blend, and the blend's float64 oracle."""
    ad, gallery, atol = problem
    B, E = len(ad), ad.embedding_dim
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, E, generator=g, dtype=torch.float64)
    raw = torch.randn(B, E, generator=g, dtype=torch.float64) * 3  # any scale: normalised
    blended = Adaptation(
        ad.refined_query, ad.U, ad.V, ad.variant, ad.anchor_scale,
        blend=StaticBlend.of(W.float(), raw.float(), weight),
    )  # fmt: skip

    def oracle(d) -> np.ndarray:
        d64 = torch.as_tensor(d).double()
        wq = F.normalize(raw @ W.T, dim=-1)
        wd = F.normalize(d64 @ W.T, dim=-1)
        static = wq @ wd.T if d64.ndim == 2 else (wd @ wq[..., None])[..., 0]
        return (1 - weight) * dense_scores(ad, d) + weight * static.numpy()

    # W's condition number stretches fp32 error like T's does
    tol = score_tolerance(ad, atol) + 1e-7 * float(torch.linalg.cond(W))
    return blended, gallery, oracle, tol


@given(problems(), st.integers(0, 1000), st.sampled_from([0.0, 0.3, 1.0]), st.data())
def test_blended_scores_match_the_oracle_in_every_path(problem, seed, weight, data):
    ad, gallery, oracle, tol = _blend_problem(problem, seed, weight)
    assert_close(ad.score(gallery).numpy(), oracle(gallery), tol)
    per_query = gallery.flip(0).expand(len(ad), *gallery.shape)
    assert_close(ad.score(per_query).numpy(), oracle(per_query), tol)
    N = gallery.shape[0]
    k = data.draw(st.integers(1, N + 2), label="k")
    half = N // 2
    chunks = [(0, gallery[:half]), (half, gallery[half:])]
    top = ad.scan(iter(chunks), k, block_rows=data.draw(st.sampled_from([None, 3]), label="b"))
    assert_topk_matches(top.ids, top.scores, oracle(gallery), k, tol)
    ids = torch.arange(N).flip(0).expand(len(ad), N)
    top = ad.rerank(ids, gallery[ids], k)
    assert_topk_matches(N - 1 - top.ids, top.scores, oracle(gallery.flip(0)), k, tol)


def test_blend_travels_with_the_adaptation():
    ad = random_adaptation(4, 12, 3, "reference", seed=1)
    raw = torch.randn(4, 12)
    blended = Adaptation(ad.refined_query, ad.U, ad.V, "reference", ad.anchor_scale,
                         blend=StaticBlend.of(torch.randn(12, 12), raw, 0.4))  # fmt: skip
    d = torch.randn(30, 12)
    want = blended.score(d)
    assert "blend=0.4" in repr(blended)
    torch.testing.assert_close(blended.to("cpu").score(d), want)
    torch.testing.assert_close(blended.detach().score(d), want)
    part = take_queries(blended, [3, 1])
    torch.testing.assert_close(part.score(d), want[[3, 1]])
    # the candidate query mixes both numerators' directions
    w = F.normalize(ad.adapted_query(), dim=-1)
    expected = 0.6 * w + 0.4 * F.normalize(blended.blend.queries, dim=-1)
    torch.testing.assert_close(blended.adapted_query(), expected)


def test_blend_rejects_bad_weights_and_shapes():
    ad = random_adaptation(2, 8, 2, "paper")
    with pytest.raises(QuARIInputError, match=r"weight must be in \[0, 1\], got 1.5"):
        StaticBlend.of(torch.eye(8), torch.randn(2, 8), 1.5)
    with pytest.raises(QuARIInputError, match=r"blend: its queries must be \(B, E\) = \(2, 8\)"):
        Adaptation(ad.refined_query, ad.U, ad.V, blend=StaticBlend.of(torch.eye(8),
                   torch.randn(3, 8), 0.5))  # fmt: skip
