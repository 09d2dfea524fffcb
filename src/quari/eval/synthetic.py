"""Synthetic embedding data with known structure, for tests, benchmarks and demos.

Real CLIP-family embeddings cannot be downloaded here (no model hub), so scale and
correctness work uses data whose structure is known: unit vectors drawn around cluster
centroids, which is closer to CLIP geometry than isotropic noise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from quari.store import EmbeddingSet

__all__ = ["ClusteredSpec", "clustered_vectors", "write_clustered_set"]


@dataclass(frozen=True)
class ClusteredSpec:
    """Unit vectors around ``clusters`` random unit centroids.

    Args:
        dim: Embedding dimension.
        clusters: Number of centroids.
        spread: Noise scale relative to the centroid (per-dimension std = spread / √dim);
            0.35 gives within-cluster cosines ≈ 0.9, between-cluster ≈ 0.
        seed: Seed for the centroids (rows use their own stream per block).
    """

    dim: int = 768
    clusters: int = 1000
    spread: float = 0.35
    seed: int = 0

    def centroids(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        c = rng.standard_normal((self.clusters, self.dim)).astype(np.float32)
        return c / np.linalg.norm(c, axis=1, keepdims=True)


def clustered_vectors(
    spec: ClusteredSpec, n: int, *, seed: int, centroids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit float32 vectors and their cluster labels.

    Example:
        >>> x, labels = clustered_vectors(ClusteredSpec(dim=16, clusters=4), 10, seed=1)
        >>> x.shape, labels.shape
        ((10, 16), (10,))
    """
    c = spec.centroids() if centroids is None else centroids
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c.shape[0], n)
    x = c[labels] + rng.standard_normal((n, spec.dim), dtype=np.float32) * (
        spec.spread / np.sqrt(spec.dim)
    )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def write_clustered_set(
    root: str | os.PathLike[str],
    rows: int,
    spec: ClusteredSpec,
    *,
    shard_rows: int = 250_000,
    encoder: str = "synthetic:clustered",
) -> EmbeddingSet:
    """Writes a clustered embedding set shard by shard (memory bounded by one shard).

    Metadata holds ``cluster`` (int) and ``bucket`` (row % 100, for filter benchmarks).
    """
    eset = EmbeddingSet.create(
        root, dim=spec.dim, encoder=encoder, encoder_info={"spec": vars(spec)}
    )
    centroids = spec.centroids()
    for i, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        x, labels = clustered_vectors(spec, n, seed=spec.seed + 1 + i, centroids=centroids)
        eset.append(x, {"cluster": labels, "bucket": (np.arange(start, start + n) % 100)})
    return eset
