"""Test helpers: tiny model configs and training runs, the dense scoring oracle, fixture paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from quari import Adaptation, HyperNetConfig, QuARIModel
from quari.adapters import LinearAdapter
from quari.eval.synthetic import PlantedSpec, write_planted_set
from quari.runtime import Runtime
from quari.training import MiningConfig, TrainConfig, TrainSource

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "official-small"

#: The tiny planted space the training tests train in (24-d, 8-d clusters, 4-d subspaces).
SMALL_SPEC = PlantedSpec(dim=24, cluster_dim=8, subspace_dim=4)


def planted_set(tmp_path: Path) -> Path:
    """``tmp_path/set``: 60 planted images × 2 captions in :data:`SMALL_SPEC` (written once)."""
    path = tmp_path / "set"
    if not path.exists():
        write_planted_set(path, 60, SMALL_SPEC, captions_per_image=2)
    return path


def small_run(tmp_path: Path, **kw) -> TrainConfig:
    """A tiny model on :func:`planted_set`: a few steps take well under a second."""
    fields = dict(
        train=(TrainSource(planted_set(tmp_path)),),
        out=tmp_path / "run",
        image_key="image_id",
        val_fraction=0.2,
        preset="reference",
        rank=4,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        num_steps=2,
        batch_size=8,
        lr=1e-3,
        epoch_pairs=40,  # 5 steps per epoch
        max_steps=14,
        checkpoint_every=4,
        log_every=1,
        mining=MiningConfig(k=10),
        progress=False,
        early_stopping_patience=50,
    )
    fields.update(kw)
    return TrainConfig(**fields)


def blended_model(dim: int = 24, seed: int = 0, weight: float = 0.5) -> QuARIModel:
    """A tiny eval-mode model with the static blend at ``weight`` and a random symmetric
    positive-definite W (not the identity: scores must follow the W the model holds)."""
    torch.manual_seed(seed)
    model = QuARIModel(
        tiny_config("reference", embedding_dim=dim, map_query=True, blend_weight=weight)
    ).eval()
    W = torch.randn(dim, dim) + 2 * torch.eye(dim)
    model.whitening.copy_(W @ W.T / dim)
    return model


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


def perturbed_low_rank(E=24, rank=3, seed=0, encoder="test-encoder") -> LinearAdapter:
    """A low-rank linear adapter moved away from its identity start (L ~ N(0, 0.25))."""
    torch.manual_seed(seed)
    adapter = LinearAdapter(E, rank=rank, metadata={"encoder": encoder})
    with torch.no_grad():
        adapter.left.normal_(0.0, 0.5)
    return adapter


def brute_force(adapter: LinearAdapter, q, d) -> np.ndarray:
    """The linear adapters' oracle: cos(Wq, Wd) in float64 from the dense map, (Q, N)."""
    W = adapter.matrix().detach().double()
    zq = torch.nn.functional.normalize(torch.as_tensor(q).double() @ W.T, dim=-1)
    zd = torch.nn.functional.normalize(torch.as_tensor(d).double() @ W.T, dim=-1)
    return (zq @ zd.T).numpy()


def random_adaptation(
    B: int, E: int, r: int, variant: str, seed: int = 0, scale: float = 1.0
) -> Adaptation:
    return Adaptation.random(B, E, r, variant, seed=seed, scale=scale)


def dense_scores(ad: Adaptation, gallery) -> np.ndarray:
    """The oracle: cos(q′, T d) with T formed densely, in float64. gallery (N, E) or (B, M, E)."""
    # Form T from float64 factors: an fp32 T would carry rounding off the rank-r span that the
    # factored forms (correctly) do not have.
    ad64 = Adaptation(
        ad.refined_query.double(), ad.U.double(), ad.V.double(), ad.variant, ad.anchor_scale
    )
    T = ad64.dense()
    q = ad64.refined_query
    if isinstance(gallery, torch.Tensor):
        d = gallery.double()
    else:
        d = torch.from_numpy(np.asarray(gallery, dtype=np.float64))
    td = (
        torch.einsum("bef,...f->b...e", T, d) if d.ndim == 2 else torch.einsum("bef,bmf->bme", T, d)
    )
    td = torch.nn.functional.normalize(td, dim=-1)
    return torch.einsum("be,bne->bn", q, td).numpy()


def condition_numbers(ad: Adaptation) -> np.ndarray:
    """κ of each query's T over its nonzero singular values (float64)."""
    ad64 = Adaptation(
        ad.refined_query.double(), ad.U.double(), ad.V.double(), ad.variant, ad.anchor_scale
    )
    sv = torch.linalg.svdvals(ad64.dense()).numpy()  # (B, E), descending
    kappa = []
    for row in sv:
        nonzero = row[row > row[0] * 1e-9]
        kappa.append(nonzero[0] / nonzero[-1] if nonzero.size else 1.0)
    return np.asarray(kappa)


def score_tolerance(ad: Adaptation, base: float = 2e-5, power: int = 1) -> np.ndarray:
    """Per-query absolute tolerance of fp32 scoring: forward error grows like κ(T)^power · ε."""
    return base + 1e-7 * condition_numbers(ad) ** power


def assert_close(actual, desired, atol) -> None:
    """|actual − desired| ≤ atol row by row; atol is a scalar or one value per row."""
    actual, desired = np.asarray(actual, dtype=np.float64), np.asarray(desired, dtype=np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    atol = np.broadcast_to(
        np.asarray(atol, dtype=np.float64).reshape(-1, *[1] * (actual.ndim - 1)), actual.shape
    )
    bad = np.abs(actual - desired) > atol
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{bad.sum()} of {bad.size} values differ; first at {i}: {actual[i]} vs {desired[i]} "
            f"(tolerance {atol[i]:.3g})"
        )


def assert_topk_matches(ids, scores, oracle: np.ndarray, k: int, atol) -> None:
    """Checks a top-k result against oracle scores (B, N), tolerant of ties.

    ``atol`` is a scalar or one tolerance per query.
    """
    ids, scores = np.asarray(ids), np.asarray(scores)
    B, N = oracle.shape
    assert ids.shape == scores.shape == (B, min(k, N))
    want = -np.sort(-oracle, axis=1)[:, : min(k, N)]
    assert_close(scores, want, atol)
    assert_close(np.take_along_axis(oracle, ids, axis=1), scores, atol)
    for b in range(B):
        assert len(set(ids[b].tolist())) == ids.shape[1], "duplicate ids"


def make_set(root, shards=(300, 200, 250), dim=24, seed=0, text=False, encoder="test-encoder"):
    """A small EmbeddingSet with metadata (``group`` 0–4, ``name``) and optional text vectors.

    Returns:
        (eset, vectors as stored (float16, (N, E)), metadata as one pyarrow Table)
    """
    import pyarrow as pa

    from quari.store import EmbeddingSet

    rng = np.random.default_rng(seed)
    eset = EmbeddingSet.create(root, dim=dim, encoder=encoder)
    stored, tables, offset = [], [], 0
    for n in shards:
        x = rng.standard_normal((n, dim))
        meta = pa.table(
            {
                "group": pa.array(rng.integers(0, 5, n), pa.int64()),
                "name": [f"item-{offset + i}" for i in range(n)],
            }
        )
        txt = rng.standard_normal((n, dim)) if text else None
        eset.append(x, meta, txt)
        stored.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
        tables.append(meta)
        offset += n
    return eset, np.concatenate(stored), pa.concat_tables(tables)


class ShuffledRuntime(Runtime):
    """A deliberately wrong runtime: every query gets the next query's adaptation."""

    name, exact = "shuffled", False

    def __call__(self, q):
        return tuple(t.roll(1, dims=0) for t in self.model.predict_factors(q))


def top10_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of |top-10(a) ∩ top-10(b)| / 10 for two (Q, N) score matrices."""
    top_a, top_b = np.argsort(-a, axis=1)[:, :10], np.argsort(-b, axis=1)[:, :10]
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(top_a, top_b, strict=True)]))
