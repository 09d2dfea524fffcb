"""Test helpers: tiny model configs, the dense scoring oracle, fixture paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from quari import Adaptation, HyperNetConfig

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "official-small"


def tiny_config(variant: str = "paper", **overrides) -> HyperNetConfig:
    """A small model that runs in milliseconds on CPU."""
    fields = dict(
        embedding_dim=24,
        rank=4,
        hidden_dim=16,
        num_layers=2,
        num_heads=2,
        num_steps=2,
        variant=variant,
    )
    fields.update(overrides)
    return HyperNetConfig(**fields)


def random_adaptation(
    B: int, E: int, r: int, variant: str, seed: int = 0, scale: float = 1.0
) -> Adaptation:
    """An Adaptation with random factors, shaped like a trained model's (q′ unit, U/V dense)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, E, generator=g)
    U = torch.randn(B, E, r, generator=g) * scale
    V = torch.randn(B, E, r, generator=g) * scale
    if variant == "reference":
        U = U / torch.linalg.matrix_norm(U)[:, None, None]
        V = V / torch.linalg.matrix_norm(V)[:, None, None]
        return Adaptation(q, U, V, "reference", anchor_scale=0.8)
    return Adaptation(q, U, V, "paper")


def dense_scores(ad: Adaptation, gallery) -> np.ndarray:
    """The oracle: cos(q′, T d) with T formed densely, in float64. gallery (N, E) or (B, M, E)."""
    T = ad.dense().double()
    q = torch.nn.functional.normalize(ad.refined_query.double(), dim=-1)
    if isinstance(gallery, torch.Tensor):
        d = gallery.double()
    else:
        d = torch.from_numpy(np.asarray(gallery, dtype=np.float64))
    td = (
        torch.einsum("bef,...f->b...e", T, d) if d.ndim == 2 else torch.einsum("bef,bmf->bme", T, d)
    )
    td = torch.nn.functional.normalize(td, dim=-1)
    return torch.einsum("be,bne->bn", q, td).numpy()


def assert_topk_matches(ids, scores, oracle: np.ndarray, k: int, atol: float) -> None:
    """Checks a top-k result against oracle scores (B, N), tolerant of ties."""
    ids, scores = np.asarray(ids), np.asarray(scores)
    B, N = oracle.shape
    assert ids.shape == scores.shape == (B, min(k, N))
    want = -np.sort(-oracle, axis=1)[:, : min(k, N)]
    np.testing.assert_allclose(scores, want, atol=atol, rtol=0)
    for b in range(B):
        assert len(set(ids[b].tolist())) == ids.shape[1], "duplicate ids"
        np.testing.assert_allclose(oracle[b, ids[b]], scores[b], atol=atol, rtol=0)
