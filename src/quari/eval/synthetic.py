"""Synthetic embedding data with known structure, for tests, benchmarks and demos.

Real CLIP-family embeddings cannot be downloaded here (no model hub), so scale and
correctness work uses data whose structure is known:

* :func:`clustered_vectors` / :func:`write_clustered_set`: unit vectors drawn around cluster
  centroids, which is closer to CLIP geometry than isotropic noise.
* :func:`planted_pairs` / :func:`write_planted_set`: caption–image pairs with *planted
  query-specific structure* — plain cosine confuses items of one cluster, while a
  query-adapted projection separates them (see :class:`PlantedSpec`). Training and
  evaluation tests use it to check that QuARI learns what cosine cannot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from quari.store import EmbeddingSet

__all__ = [
    "ClusteredSpec",
    "PlantedData",
    "PlantedSpec",
    "clustered_vectors",
    "planted_pairs",
    "write_clustered_set",
    "write_planted_set",
]


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


@dataclass(frozen=True)
class PlantedSpec:
    """Caption–image pairs whose fine identity lives in a *cluster-specific* subspace.

    The space splits into a *cluster* block (``cluster_dim`` dims) and an *attribute* block
    (the rest, A dims). Every cluster k has its own orthonormal basis of the attribute block;
    its first ``subspace_dim`` directions S_k are what tells the cluster's images apart (for
    birds: plumage; for cars: the model), the other A − ``subspace_dim`` directions N_k are
    nuisance.

    * image  = normalize(cluster_weight·c_k + signal·S_k a + nuisance·N_k n_d)
    * caption = normalize(cluster_weight·c_k + signal·S_k a + query_nuisance·N_k n_q)

    with c_k the cluster centroid, a the image's unit attribute vector (shared by its captions)
    and n_d, n_q independent unit nuisance vectors. Plain cosine adds the random correlation
    n_q·n_d to the a-match, so images of the caption's cluster are confused. The projection
    onto S_k — a different subspace for each query's cluster, i.e. query-specific — removes the
    nuisance and ranks by the a-match alone. ``nuisance``/``query_nuisance`` set the planted
    margin: at 1.0 cosine recall@1 over 200 images is ≈ 0.8, at 1.4 ≈ 0.4, while the oracle
    projection stays ≈ 1.0.

    Args:
        dim: Embedding dimension E.
        clusters: Number of clusters (images of one cluster share the centroid).
        cluster_dim: Dimension of the cluster block.
        subspace_dim: Dimension of each cluster's discriminative subspace S_k.
        cluster_weight: Weight of the shared centroid.
        signal: Weight of the attribute vector (in images and captions).
        nuisance: Weight of an image's nuisance component.
        query_nuisance: Weight of a caption's nuisance component.
        seed: Seed of the centroids and the per-cluster bases.

    Example:
        >>> data = planted_pairs(PlantedSpec(dim=32, cluster_dim=8), images=10, seed=1)
        >>> data.images.shape, data.texts.shape
        ((10, 32), (10, 32))
    """

    dim: int = 64
    clusters: int = 4
    cluster_dim: int = 16
    subspace_dim: int = 8
    cluster_weight: float = 1.0
    signal: float = 1.0
    nuisance: float = 1.4
    query_nuisance: float = 1.4
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.subspace_dim < self.dim - self.cluster_dim or self.cluster_dim < 1:
            raise ValueError(
                f"dim {self.dim} must exceed cluster_dim {self.cluster_dim} + subspace_dim "
                f"{self.subspace_dim} (both ≥ 1)"
            )

    def _fixed(self) -> tuple[np.ndarray, np.ndarray]:
        """(centroids (clusters, cluster_dim), bases (clusters, A, A)), from ``seed``."""
        rng = np.random.default_rng([self.seed, 0])
        A = self.dim - self.cluster_dim
        centroids = _unit(rng.standard_normal((self.clusters, self.cluster_dim)))
        bases = np.linalg.qr(rng.standard_normal((self.clusters, A, A)))[0]
        return centroids, bases

    def subspace_basis(self, cluster: int) -> np.ndarray:
        """(E, subspace_dim) orthonormal basis of S_k in embedding space — what an ideal
        query-specific map for a caption of ``cluster`` projects onto."""
        _, bases = self._fixed()
        out = np.zeros((self.dim, self.subspace_dim))
        out[self.cluster_dim :] = bases[cluster][:, : self.subspace_dim]
        return out


@dataclass(frozen=True)
class PlantedData:
    """Output of :func:`planted_pairs`.

    ``images`` (n_images, E) and ``texts`` (n_texts, E) are unit float32 rows;
    ``image_of_text`` (n_texts,) gives each caption's image, ``cluster`` (n_images,) each
    image's cluster.
    """

    images: np.ndarray
    texts: np.ndarray
    image_of_text: np.ndarray
    cluster: np.ndarray


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted_pairs(
    spec: PlantedSpec, images: int, *, captions_per_image: int = 1, seed: int
) -> PlantedData:
    """Draws ``images`` images and ``captions_per_image`` captions for each (see
    :class:`PlantedSpec`); captions of one image differ in their nuisance.

    Args:
        spec: The structure.
        images: Number of images.
        captions_per_image: Captions per image (COCO has 5).
        seed: Seed of this draw (centroids and bases come from ``spec.seed``).

    Returns:
        A :class:`PlantedData`; caption t belongs to image ``t // captions_per_image``.
    """
    centroids, bases = spec._fixed()
    C, S = spec.cluster_dim, spec.subspace_dim
    A = spec.dim - C
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, spec.clusters, images)
    attrs = _unit(rng.standard_normal((images, S)))
    owner = np.repeat(np.arange(images), captions_per_image)

    def draw(who: np.ndarray, weight: float) -> np.ndarray:
        n = who.size
        x = np.zeros((n, spec.dim))
        x[:, :C] = spec.cluster_weight * centroids[cluster[who]]
        coords = np.concatenate(
            [spec.signal * attrs[who], weight * _unit(rng.standard_normal((n, A - S)))], axis=1
        )
        # One matrix product per cluster (not an (n, A, A) gather), so that E = 768 and
        # millions of rows stay cheap.
        owner_cluster = cluster[who]
        for k in np.unique(owner_cluster):
            sel = owner_cluster == k
            x[sel, C:] = coords[sel] @ bases[k].T
        return _unit(x).astype(np.float32)

    img = draw(np.arange(images), spec.nuisance)
    txt = draw(owner, spec.query_nuisance)
    return PlantedData(images=img, texts=txt, image_of_text=owner, cluster=cluster)


def write_planted_set(
    root: str | os.PathLike[str],
    images: int,
    spec: PlantedSpec,
    *,
    captions_per_image: int = 1,
    seed: int = 1,
    shard_rows: int = 250_000,
    encoder: str = "synthetic:planted",
) -> EmbeddingSet:
    """Writes planted pairs as a caption set: one row per caption, its image's embedding in
    ``img_emb`` (repeated for every caption of the image) and the caption in ``text_emb``.

    Metadata columns: ``image_id`` (groups the captions of one image — pass it as the image
    key when training) and ``cluster``.

    Example:
        >>> eset = write_planted_set("planted", 500, PlantedSpec(), captions_per_image=5)
        ...     # doctest: +SKIP
    """
    data = planted_pairs(spec, images, captions_per_image=captions_per_image, seed=seed)
    eset = EmbeddingSet.create(
        root, dim=spec.dim, encoder=encoder, encoder_info={"spec": vars(spec)}
    )
    owner = data.image_of_text
    for start in range(0, owner.size, shard_rows):
        part = slice(start, start + shard_rows)
        eset.append(
            data.images[owner[part]],
            {
                "image_id": owner[part].astype(np.int64),
                "cluster": data.cluster[owner[part]].astype(np.int64),
            },
            text_vectors=data.texts[part],
        )
    return eset
