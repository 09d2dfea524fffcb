"""The training loss against a naive reference (loops, dense T), and the query noise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from quari import Adaptation
from quari.training.loss import add_query_noise, quari_loss
from quari.validation import QuARIInputError


def leaf_adaptation(B, E, r, variant, seed):
    ad = Adaptation.random(B, E, r, variant, seed=seed)
    q = ad.refined_query.clone().double().requires_grad_()
    U = ad.U.clone().double().requires_grad_()
    V = ad.V.clone().double().requires_grad_()
    return q, U, V, Adaptation(q, U, V, variant, ad.anchor_scale)


def naive_loss(ad, images, semipos, weights, valid, groups, offset, tau, normalize, mask=None):
    """Eq. 9–10 with A3, written the slow obvious way: dense T_i, one cosine at a time.
    ``mask[a][b]``: query/image a and image/query b are not each other's negatives."""
    T = ad.dense()
    q = F.normalize(ad.refined_query, dim=-1)
    B, N = len(ad), images.shape[0]

    def cos(i, d):
        td = T[i] @ d
        return (q[i] @ td) / td.norm()

    total = 0.0
    for i in range(B):  # query → image
        me = offset + i
        logits, targets = [], []
        for j in range(N):
            if groups is not None and j != me and groups[j] == groups[me]:
                continue  # the same image under another caption: not a negative
            if mask is not None and j != me and mask[i][j]:
                continue
            logits.append(cos(i, images[j]) / tau)
            targets.append(1.0 if j == me else 0.0)
        for p in range(semipos.shape[1] if semipos is not None else 0):
            if valid is None or valid[i, p]:
                logits.append(cos(i, semipos[i, p]) / tau)
                targets.append(float(weights[i, p]))
        logits = torch.stack(logits)
        t = torch.tensor(targets, dtype=logits.dtype)
        if normalize:
            t = t / t.sum()
        total = total - (t * torch.log_softmax(logits, 0)).sum()
    for j in range(B):  # image → query, over every query (N of them: all ranks)
        me = offset + j
        logits, target = [], None
        for k in range(N):
            if groups is not None and k != me and groups[k] == groups[me]:
                continue
            if mask is not None and k != me and mask[j][k]:
                continue
            if k == me:
                target = len(logits)
            logits.append(ALL_COS[k](images[me]) / tau)
        total = total - torch.log_softmax(torch.stack(logits), 0)[target]
    return total / (2 * B)


ALL_COS: list = []  # ALL_COS[k](d): cos of image d in global query k's space (set per test)


def set_all_queries(ads):
    ALL_COS.clear()
    for ad in ads:
        T = ad.dense()
        q = F.normalize(ad.refined_query, dim=-1)
        for i in range(len(ad)):
            ALL_COS.append(lambda d, T=T[i], q=q[i]: (q @ (T @ d)) / (T @ d).norm())


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("normalize", [False, True])
def test_loss_and_gradients_match_the_naive_reference(variant, normalize):
    B, E, r, P = 5, 12, 3, 2
    q, U, V, ad = leaf_adaptation(B, E, r, variant, seed=1)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(B, E, generator=g, dtype=torch.float64)
    semipos = torch.randn(B, P, E, generator=g, dtype=torch.float64)
    weights = torch.rand(B, P, generator=g, dtype=torch.float64) * 0.3
    valid = torch.tensor([[True, True], [True, False], [False, False], [True, True], [1, 1]])
    groups = torch.tensor([0, 1, 0, 2, 3])  # images 0 and 2 are the same image
    images[2] = images[0]
    out = quari_loss(
        ad,
        images,
        semipos=semipos,
        semipos_weights=weights,
        semipos_valid=valid,
        groups=groups,
        normalize_targets=normalize,
    )
    assert out.width == B + P and out.logits.shape == (B, B + P)
    grads = torch.autograd.grad(out.loss, (q, U, V))

    q2, U2, V2, ad2 = leaf_adaptation(B, E, r, variant, seed=1)
    set_all_queries([ad2])
    want = naive_loss(ad2, images, semipos, weights, valid, groups, 0, 0.07, normalize)
    want_grads = torch.autograd.grad(want, (q2, U2, V2))
    assert abs(out.loss.item() - want.item()) < 1e-5 * max(1.0, abs(want.item()))
    for got, exp in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)


def test_false_negatives_leave_both_softmaxes_like_the_naive_reference():
    """A symmetric (B, N) mask drops those columns from query i's softmax and those queries
    from image j's; the diagonal (each pair's own positive) is never dropped."""
    B, E, r = 6, 10, 3
    q, U, V, ad = leaf_adaptation(B, E, r, "reference", seed=3)
    g = torch.Generator().manual_seed(4)
    images = torch.randn(B, E, generator=g, dtype=torch.float64)
    mask = torch.rand(B, B, generator=g) < 0.4
    mask = mask | mask.T
    mask[0, 0] = True  # must be ignored
    out = quari_loss(ad, images, false_negatives=mask)
    grads = torch.autograd.grad(out.loss, (q, U, V))
    q2, U2, V2, ad2 = leaf_adaptation(B, E, r, "reference", seed=3)
    set_all_queries([ad2])
    want = naive_loss(ad2, images, None, None, None, None, 0, 0.07, False, mask=mask.tolist())
    want_grads = torch.autograd.grad(want, (q2, U2, V2))
    assert abs(out.loss.item() - want.item()) < 1e-6 * max(1.0, abs(want.item()))
    for got, exp in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-6)
    unmasked = quari_loss(ad, images).loss
    assert unmasked.item() > out.loss.item()  # fewer negatives, lower loss
    with pytest.raises(QuARIInputError, match="false_negatives"):
        quari_loss(ad, images, false_negatives=mask[:, :3])


def test_fp32_factors_agree_with_float64():
    B, E, r = 6, 16, 4
    q, U, V, ad64 = leaf_adaptation(B, E, r, "paper", seed=3)
    images = torch.randn(B, E, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ad32 = Adaptation(q.detach().float(), U.detach().float().requires_grad_(), V.detach().float())
    l64 = quari_loss(ad64, images).loss.item()
    l32 = quari_loss(ad32, images.float()).loss.item()
    assert abs(l64 - l32) < 1e-5


def test_without_semipositives_it_is_symmetric_infonce():
    """No semi-positives, no groups: both terms are plain cross-entropies on S."""
    B, E, r = 4, 10, 2
    _, _, _, ad = leaf_adaptation(B, E, r, "paper", seed=5)
    images = torch.randn(B, E, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = quari_loss(ad, images, temperature=0.1)
    S = ad.score(images) / 0.1
    want = (F.cross_entropy(S, torch.arange(B)) + F.cross_entropy(S.T, torch.arange(B))) / 2
    assert abs(out.loss.item() - want.item()) < 1e-6  # scores come back as fp32
    assert out.width == B


def test_rank_shards_sum_to_the_global_loss():
    """Two simulated ranks (offsets 0 and B, gathered scores) average to the 2B-batch loss,
    value and gradient — what DDP's gradient averaging relies on."""
    B, E, r, P = 3, 10, 2, 2
    q, U, V, full = leaf_adaptation(2 * B, E, r, "reference", seed=7)
    g = torch.Generator().manual_seed(8)
    images = torch.randn(2 * B, E, generator=g, dtype=torch.float64)
    semipos = torch.randn(2 * B, P, E, generator=g, dtype=torch.float64)
    weights = torch.rand(2 * B, P, generator=g, dtype=torch.float64) * 0.2
    groups = torch.tensor([0, 1, 2, 1, 4, 5])
    images[3] = images[1]
    whole = quari_loss(full, images, semipos=semipos, semipos_weights=weights, groups=groups).loss
    want = torch.autograd.grad(whole, (q, U, V))

    parts = [
        Adaptation(q[s], U[s], V[s], "reference", full.anchor_scale)
        for s in (slice(0, B), slice(B, 2 * B))
    ]
    losses = []
    for rank, ad in enumerate(parts):
        scores = [p.score(images) for p in parts]
        out = quari_loss(
            ad,
            images,
            semipos=semipos[rank * B : (rank + 1) * B],
            semipos_weights=weights[rank * B : (rank + 1) * B],
            groups=groups,
            offset=rank * B,
            gather=lambda s, rank=rank, scores=scores: torch.cat(
                [s if i == rank else scores[i] for i in range(2)]
            ),
        )
        assert out.width == 2 * B + P
        losses.append(out.loss)
    mean = (losses[0] + losses[1]) / 2
    assert abs(mean.item() - whole.item()) < 1e-6
    for got, exp in zip(torch.autograd.grad(mean, (q, U, V)), want, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-5)

    # and the naive reference agrees for one rank's share
    set_all_queries([full.detach()])
    naive = naive_loss(
        parts[1].detach(), images, semipos[B:], weights[B:], None, groups, B, 0.07, False
    )
    assert abs(naive.item() - losses[1].item()) < 1e-5


def test_query_noise_follows_lincir():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(4000, 64, generator=g), dim=-1)
    noisy = add_query_noise(q, 1.0, generator=torch.Generator().manual_seed(1))
    delta = noisy - q
    # Per sample: s·ε with one s ~ U[0, 1]; ‖δ‖/√E ≈ s, so its mean ≈ 1/2 and it spans [0, 1].
    s = delta.norm(dim=1) / math.sqrt(64)
    assert abs(s.mean().item() - 0.5) < 0.02 and s.min() < 0.05 and 0.9 < s.max() < 1.4
    # Within a sample the noise is Gaussian with one scale: kurtosis of δ/s ≈ 3.
    z = delta / s[:, None]
    assert abs((z**4).mean().item() / (z**2).mean().item() ** 2 - 3.0) < 0.1
    assert torch.equal(add_query_noise(q, 0.0), q)
    half = add_query_noise(q, 0.5, generator=torch.Generator().manual_seed(1)) - q
    torch.testing.assert_close(half, delta * 0.5)
