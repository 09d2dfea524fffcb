"""Synthetic embedding data with known structure, for tests, benchmarks and demos.

Real CLIP-family embeddings cannot be downloaded here (no model hub), so scale and
correctness work uses data whose structure is known:

* :func:`clustered_vectors` / :func:`write_clustered_set`: unit vectors drawn around cluster
  centroids, which is closer to CLIP geometry than isotropic noise.
* :func:`planted_pairs` / :func:`write_planted_set`: caption–image pairs with *planted
  query-specific structure* — plain cosine confuses items of one cluster, while a
  query-adapted projection separates them (see :class:`PlantedSpec`). Training and
  evaluation tests use it to check that QuARI learns what cosine cannot.
  :func:`planted_768` is the paper-sized (E = 768) spec that models are trained and
  benchmarked on; :func:`write_planted_gallery` writes a large gallery of it chunk by chunk.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from quari.store import EmbeddingSet

__all__ = [
    "ClusteredSpec",
    "PlantedData",
    "PlantedSpec",
    "clustered_vectors",
    "planted_768",
    "planted_pairs",
    "write_clustered_set",
    "write_planted_gallery",
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

    def centroids_and_bases(self) -> tuple[np.ndarray, np.ndarray]:
        """(centroids (clusters, cluster_dim), bases (clusters, A, A)), from ``seed``.

        Cached for the last spec: at E = 768 the bases take seconds (and 400 MB at 100
        clusters) to draw, and every chunk of a gallery and every :meth:`subspace_basis` call
        needs them. The arrays are read-only, since callers share them.
        """
        return _planted_fixed(self)

    def subspace_basis(self, cluster: int) -> np.ndarray:
        """(E, subspace_dim) orthonormal basis of S_k in embedding space — what an ideal
        query-specific map for a caption of ``cluster`` projects onto."""
        _, bases = self.centroids_and_bases()
        out = np.zeros((self.dim, self.subspace_dim))
        out[self.cluster_dim :] = bases[cluster][:, : self.subspace_dim]
        return out


def planted_768() -> PlantedSpec:
    """The paper-sized planted spec (E = 768) that QuARI models are trained and benchmarked on.

    A model trained on pairs of this spec (``write_planted_set(..., planted_768(), seed=1)``)
    is in distribution only on this spec: ``benchmarks/bench_search.py --dataset planted`` writes
    its held-out gallery with the same spec (same centroids and bases, ``spec.seed`` = 0) and
    another draw seed, and checks that the model beats cosine there.

    Choices (``PlantedSpec(dim=768, clusters=100, cluster_dim=64, subspace_dim=32,
    nuisance=2.8, query_nuisance=2.8)``):

    * ``clusters=100``: a 100,000-image gallery holds ≈ 1,000 images per cluster, the
      neighbourhood a query's map has to re-rank (a 1M gallery: ≈ 10,000).
    * ``cluster_dim=64``: 100 centroids in 64 dims are well apart (largest pairwise cosine
      ≈ 0.45), so cosine finds the right cluster and the hard part is *inside* it.
    * ``subspace_dim=32``: half of the model's rank r = 64, leaving room for the cluster
      directions; among 1,000 images the nearest attribute vector has cosine ≈ 0.53 to a
      query's (it would be ≈ 0.93 with 8 dims), so a learned, approximate projection can still
      single out the right image.
    * ``nuisance = query_nuisance = 2.8``: the random nuisance correlation n_q·n_d shrinks like
      1/√(A − S) = 1/√672, so the weights have to be large (the 64-d default is 1.4) for the
      nuisance to hide the attribute match. A caption's cosine to its own image is ≈ 0.21
      (CLIP-like).

    Measured (brute force, 1,000 caption queries drawn from the gallery's own images; oracle:
    cosine inside ``subspace_basis(k)`` of the caption's cluster k, queries of 20 clusters):

    ======================  ==============  ===============  ================
    gallery (draw seed)     cosine R@1      cosine R@10      oracle R@1
    ======================  ==============  ===============  ================
    100,000 (seed 1000)     0.354           0.707            1.000 (196 q.)
    100,000 (seed 1001)     0.342           0.735            1.000 (200 q.)
    20,000 (seed 1000)      0.541           0.902            1.000 (180 q.)
    ======================  ==============  ===============  ================

    Cosine's top-1 is in the caption's cluster for ≥ 99.8% of queries. Cosine recall falls as
    the gallery grows (more same-cluster distractors); the oracle stays at 1. With 10,000
    images per cluster, as in a 1M gallery (measured on 100,000 images of the same spec with
    ``clusters=10``), cosine R@1 is 0.151 and R@10 0.393.

    Example:
        >>> spec = planted_768()
        >>> spec.dim, spec.clusters
        (768, 100)
    """
    return PlantedSpec(
        dim=768,
        clusters=100,
        cluster_dim=64,
        subspace_dim=32,
        nuisance=2.8,
        query_nuisance=2.8,
    )


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


@functools.lru_cache(maxsize=1)
def _planted_fixed(spec: PlantedSpec) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([spec.seed, 0])
    A = spec.dim - spec.cluster_dim
    centroids = _unit(rng.standard_normal((spec.clusters, spec.cluster_dim)))
    # One QR per cluster: numpy's stacked QR is ~6x slower at A = 704 (30 s for 100
    # clusters on 2 cores), and the per-matrix results are bitwise the same.
    bases = np.stack([np.linalg.qr(g)[0] for g in rng.standard_normal((spec.clusters, A, A))])
    centroids.flags.writeable = False
    bases.flags.writeable = False
    return centroids, bases


def planted_pairs(
    spec: PlantedSpec, images: int, *, captions_per_image: int = 1, seed: int | Sequence[int]
) -> PlantedData:
    """Draws ``images`` images and ``captions_per_image`` captions for each (see
    :class:`PlantedSpec`); captions of one image differ in their nuisance.

    Args:
        spec: The structure.
        images: Number of images.
        captions_per_image: Captions per image (COCO has 5).
        seed: Seed of this draw, an int or a sequence of ints as :func:`numpy.random.default_rng`
            takes (centroids and bases come from ``spec.seed``).

    Returns:
        A :class:`PlantedData`; caption t belongs to image ``t // captions_per_image``.
    """
    centroids, bases = spec.centroids_and_bases()
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


def write_planted_gallery(
    root: str | os.PathLike[str],
    images: int,
    spec: PlantedSpec,
    *,
    seed: int,
    shard_rows: int = 100_000,
    captions: bool = True,
    encoder: str = "synthetic:planted",
) -> EmbeddingSet:
    """Writes a planted *gallery*: one row per image, drawn and written shard by shard.

    Unlike :func:`write_planted_set` (one row per caption, everything drawn at once), memory
    is bounded by one shard, so galleries of millions of E = 768 images fit (a shard of
    100,000 rows needs ≈ 2 GB of float64 temporaries, plus ≈ 1 GB for the spec's bases).
    Shard i is the draw
    ``planted_pairs(spec, n_i, seed=[seed, i])``, so every shard has its own images and
    cluster assignment, and the gallery does not depend on anything but its arguments.

    Args:
        root: Destination folder of the embedding set.
        images: Number of images (rows).
        spec: The structure (centroids and bases come from ``spec.seed``).
        seed: Seed of the draw; use one the training data did not use.
        shard_rows: Rows per shard (and per draw).
        captions: Store one caption per image in ``text_emb`` (row i is a caption of image
            i), as held-out queries whose true image is known.
        encoder: Encoder id recorded in the manifest.

    Returns:
        The written set. Metadata columns: ``image_id`` (the row, as in
        :func:`write_planted_set`) and ``cluster``.

    Raises:
        ValueError: ``images`` or ``shard_rows`` below 1.

    Example:
        >>> eset = write_planted_gallery("gallery", 1_000_000, planted_768(), seed=1000)
        ...     # doctest: +SKIP
    """
    if images < 1 or shard_rows < 1:
        raise ValueError(f"images ({images}) and shard_rows ({shard_rows}) must be ≥ 1")
    eset = EmbeddingSet.create(
        root,
        dim=spec.dim,
        encoder=encoder,
        encoder_info={"spec": vars(spec), "seed": seed, "shard_rows": shard_rows},
    )
    for i, start in enumerate(range(0, images, shard_rows)):
        n = min(shard_rows, images - start)
        data = planted_pairs(spec, n, seed=[seed, i])
        eset.append(
            data.images,
            {
                "image_id": np.arange(start, start + n, dtype=np.int64),
                "cluster": data.cluster.astype(np.int64),
            },
            text_vectors=data.texts if captions else None,
        )
    return eset
