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
    """Caption–image pairs whose fine identity lives in a query-specific subspace.

    The space (after a fixed random rotation) splits into orthogonal blocks: a *cluster* block,
    ``aspects`` *attribute* blocks of ``aspect_dim`` dims, and a small *aspect code* block.

    * image = normalize(cluster_weight·c_k + Σ_j a_j / √aspects): its cluster centroid c_k plus
      one random unit attribute vector a_j per aspect j; the aspect-code block is empty.
    * caption (about aspect j of its image) = normalize(cluster_weight·c_k + query_signal·a_j +
      query_noise·n + code_j): the caption names one aspect (code_j, a fixed unit vector per
      aspect), describes the image's value there (a_j), and carries a random unit vector n
      spread over the *other* attribute blocks (wording that does not identify the image).

    Plain cosine ranks an image by cluster match + a_j agreement + a random correlation of n
    with the image's other attributes, so images of the caption's cluster are confused. The
    projection onto attribute block j (chosen by the caption's code) removes the cluster and
    the noise term: cos(P_j q, P_j d) ranks by a_j alone. ``query_noise`` (and the number of
    images per cluster) sets the planted margin: 0 leaves little for adaptation to win, ≥ 1
    makes cosine retrieval poor while the oracle projection stays near perfect.

    Args:
        dim: Embedding dimension E.
        clusters: Number of clusters (images of one cluster share the centroid).
        aspects: Number of attribute blocks a caption can be about.
        aspect_dim: Dimension of each attribute block.
        code_dim: Dimension of the aspect-code block (needs ≥ 1).
        cluster_weight: Weight of the shared centroid (what dominates plain cosine).
        query_signal: Weight of the described attribute in a caption.
        query_noise: Weight of the distracting component in a caption (the margin knob).
        rotate: Apply a fixed random rotation, so the blocks are not axis-aligned.
        seed: Seed of the centroids, aspect codes and rotation.

    Example:
        >>> data = planted_pairs(PlantedSpec(dim=32, aspect_dim=4), images=10, seed=1)
        >>> data.images.shape, data.texts.shape
        ((10, 32), (10, 32))
    """

    dim: int = 64
    clusters: int = 4
    aspects: int = 4
    aspect_dim: int = 8
    code_dim: int = 4
    cluster_weight: float = 1.0
    query_signal: float = 1.0
    query_noise: float = 1.0
    rotate: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.cluster_dim < 1 or self.code_dim < 1 or self.aspects < 1 or self.aspect_dim < 1:
            raise ValueError(
                f"dim {self.dim} is too small for {self.aspects} aspects × {self.aspect_dim} "
                f"dims + a {self.code_dim}-dim code + a cluster block"
            )

    @property
    def cluster_dim(self) -> int:
        return self.dim - self.code_dim - self.aspects * self.aspect_dim

    def aspect_slice(self, j: int) -> slice:
        """Coordinates (before rotation) of attribute block ``j``."""
        start = self.cluster_dim + j * self.aspect_dim
        return slice(start, start + self.aspect_dim)

    def rotation(self) -> np.ndarray:
        """The fixed orthogonal (E, E) map from block coordinates to embedding space."""
        if not self.rotate:
            return np.eye(self.dim, dtype=np.float32)
        rng = np.random.default_rng([self.seed, 1])
        q, r = np.linalg.qr(rng.standard_normal((self.dim, self.dim)))
        return (q * np.sign(np.diag(r))).astype(np.float32)

    def aspect_basis(self, j: int) -> np.ndarray:
        """(E, aspect_dim) orthonormal basis of attribute block ``j`` in embedding space —
        what an ideal query-specific map projects onto."""
        return self.rotation()[:, self.aspect_slice(j)]


@dataclass(frozen=True)
class PlantedData:
    """Output of :func:`planted_pairs`.

    ``images`` (n_images, E) and ``texts`` (n_texts, E) are unit float32 rows;
    ``image_of_text`` (n_texts,) gives each caption's image, ``aspect`` (n_texts,) the aspect it
    is about, ``cluster`` (n_images,) each image's cluster.
    """

    images: np.ndarray
    texts: np.ndarray
    image_of_text: np.ndarray
    aspect: np.ndarray
    cluster: np.ndarray


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted_pairs(
    spec: PlantedSpec, images: int, *, captions_per_image: int = 1, seed: int
) -> PlantedData:
    """Draws ``images`` images and ``captions_per_image`` captions for each (see
    :class:`PlantedSpec`). Captions of one image are about independently drawn aspects.

    Args:
        spec: The structure.
        images: Number of images.
        captions_per_image: Captions per image (COCO has 5).
        seed: Seed of this draw (centroids, codes and rotation come from ``spec.seed``).

    Returns:
        A :class:`PlantedData`; caption t belongs to image ``t // captions_per_image``.
    """
    E, A, ad = spec.dim, spec.aspects, spec.aspect_dim
    fixed = np.random.default_rng([spec.seed, 0])
    centroids = _unit(fixed.standard_normal((spec.clusters, spec.cluster_dim)))
    codes = _unit(fixed.standard_normal((A, spec.code_dim)))
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, spec.clusters, images)
    attrs = _unit(rng.standard_normal((images, A, ad)))

    img = np.zeros((images, E))
    img[:, : spec.cluster_dim] = spec.cluster_weight * centroids[cluster]
    for j in range(A):
        img[:, spec.aspect_slice(j)] = attrs[:, j] / np.sqrt(A)

    n_text = images * captions_per_image
    owner = np.repeat(np.arange(images), captions_per_image)
    aspect = rng.integers(0, A, n_text)
    txt = np.zeros((n_text, E))
    txt[:, : spec.cluster_dim] = spec.cluster_weight * centroids[cluster[owner]]
    noise = rng.standard_normal((n_text, A, ad))
    noise[np.arange(n_text), aspect] = 0.0  # the distractor lives in the *other* blocks
    if A > 1:
        noise /= np.linalg.norm(noise.reshape(n_text, -1), axis=1)[:, None, None]
    for j in range(A):
        block = spec.query_noise * noise[:, j]
        block[aspect == j] = spec.query_signal * attrs[owner[aspect == j], j]
        txt[:, spec.aspect_slice(j)] = block
    txt[:, E - spec.code_dim :] = codes[aspect]

    rot = spec.rotation().astype(np.float64)
    return PlantedData(
        images=_unit(img @ rot.T).astype(np.float32),
        texts=_unit(txt @ rot.T).astype(np.float32),
        image_of_text=owner,
        aspect=aspect,
        cluster=cluster,
    )


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
    key when training), ``aspect`` and ``cluster``.

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
                "aspect": data.aspect[part].astype(np.int64),
                "cluster": data.cluster[owner[part]].astype(np.int64),
            },
            text_vectors=data.texts[part],
        )
    return eset
