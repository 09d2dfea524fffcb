"""Synthetic clustered data: the structure it promises is there."""

from __future__ import annotations

import numpy as np
import pytest

from quari.eval.synthetic import (
    ClusteredSpec,
    PlantedSpec,
    clustered_vectors,
    planted_768,
    planted_pairs,
    write_clustered_set,
    write_planted_gallery,
    write_planted_set,
)
from quari.store import EmbeddingSet


def test_clusters_are_tight_and_apart():
    x, labels = clustered_vectors(ClusteredSpec(dim=64, clusters=8), 400, seed=3)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    sims = x @ x.T
    same = (labels[:, None] == labels[None]) & ~np.eye(400, dtype=bool)
    assert sims[same].mean() > 0.8 > 0.1 > abs(sims[~same].mean())


def test_written_set_reopens_with_metadata(tmp_path):
    spec = ClusteredSpec(dim=32, clusters=5, seed=2)
    write_clustered_set(tmp_path / "s", 1050, spec, shard_rows=400)
    eset = EmbeddingSet.open(tmp_path / "s")
    assert len(eset) == 1050 and [s.rows for s in eset.shards] == [400, 400, 250]
    meta = eset.metadata(np.arange(1050))
    assert meta.column("bucket").to_pylist() == [i % 100 for i in range(1050)]
    x = eset.gather(np.arange(1050)).astype(np.float32)
    c = spec.centroids()
    assert (np.argmax(x @ c.T, axis=1) == np.asarray(meta.column("cluster"))).mean() > 0.99


def _recall_at_1(texts, images, truth, project=None):
    if project is None:
        scores = texts @ images.T
    else:  # per caption: cosine inside the subspace its cluster's projection keeps
        scores = np.stack([project(t) for t in range(len(texts))])
    return float((scores.argmax(1) == truth).mean())


def test_planted_structure_defeats_cosine_but_not_the_query_specific_projection():
    for nuisance, low, high in [(1.0, 0.65, 0.9), (1.4, 0.3, 0.55)]:
        spec = PlantedSpec(nuisance=nuisance, query_nuisance=nuisance)
        d = planted_pairs(spec, 200, seed=2)
        np.testing.assert_allclose(np.linalg.norm(d.texts, axis=1), 1.0, rtol=1e-5)

        def oracle(t, d=d, spec=spec):
            basis = spec.subspace_basis(d.cluster[d.image_of_text[t]])
            z = d.images @ basis
            return z @ (basis.T @ d.texts[t]) / np.linalg.norm(z, axis=1)

        cosine = _recall_at_1(d.texts, d.images, d.image_of_text)
        assert low < cosine < high, (nuisance, cosine)  # the margin knob works
        assert _recall_at_1(d.texts, d.images, d.image_of_text, oracle) > 0.97
    # One static projection for all queries (cluster 0's subspace) does not rescue cosine.
    basis = spec.subspace_basis(0)
    static = (d.texts @ basis) @ (d.images @ basis).T
    other = d.cluster[d.image_of_text] != 0
    assert (static.argmax(1) == d.image_of_text)[other].mean() < 0.2


def test_planted_set_groups_captions_by_image(tmp_path):
    eset = write_planted_set(
        tmp_path / "p", 30, PlantedSpec(dim=24, cluster_dim=8, subspace_dim=4), captions_per_image=3
    )
    assert eset.rows == 90 and eset.has_text
    meta = eset.metadata(np.arange(90))
    assert meta.column("image_id").to_pylist() == [i // 3 for i in range(90)]
    img = eset.gather(np.arange(90))
    assert (img.reshape(30, 3, -1) == img[::3, None]).all()  # the image repeats per caption
    txt = eset.gather(np.arange(90), "text")
    assert not (txt.reshape(30, 3, -1) == txt[::3, None]).all()  # captions differ


@pytest.mark.slow  # drawing the 100 bases of E = 768 takes ~10-20 s on 2 cores
def test_planted_768_hides_the_match_from_cosine_but_not_from_the_oracle():
    spec = planted_768()
    assert (spec.dim, spec.subspace_dim) == (768, 32) and spec == planted_768()
    # 2,000 images (20 per cluster) keep this fast; the docstring's 100k numbers are lower.
    d = planted_pairs(spec, 2000, seed=7)
    q = np.arange(300)
    cosine = float(((d.texts[q] @ d.images.T).argmax(1) == q).mean())
    assert 0.6 < cosine < 0.95, cosine  # the nuisance hides the match for a good share
    hits = []
    for k in np.unique(d.cluster[q])[:10]:
        sel = q[d.cluster[q] == k]
        basis = spec.subspace_basis(k)
        z = d.images @ basis
        scores = (d.texts[sel] @ basis) @ z.T / np.linalg.norm(z, axis=1)
        hits.extend(scores.argmax(1) == sel)
    assert len(hits) >= 20 and np.mean(hits) == 1.0


def test_planted_gallery_is_written_shard_by_shard_with_its_captions(tmp_path):
    spec = PlantedSpec(dim=24, cluster_dim=8, subspace_dim=4)
    eset = write_planted_gallery(tmp_path / "g", 250, spec, seed=5, shard_rows=100)
    assert [s.rows for s in eset.shards] == [100, 100, 50] and eset.has_text
    meta = eset.metadata(np.arange(250))
    assert meta.column("image_id").to_pylist() == list(range(250))
    img = eset.gather(np.arange(250)).astype(np.float32)
    txt = eset.gather(np.arange(250), "text").astype(np.float32)
    # Shard i is the draw planted_pairs(seed=[seed, i]): same images, clusters and captions.
    first = planted_pairs(spec, 100, seed=[5, 0])
    np.testing.assert_allclose(img[:100], first.images, atol=1e-3)
    np.testing.assert_allclose(txt[:100], first.texts, atol=1e-3)
    assert meta.column("cluster").to_pylist()[:100] == first.cluster.tolist()
    # Shards are distinct draws, and row i's caption belongs to image i.
    assert not np.allclose(img[:50], img[100:150], atol=0.1)
    own = np.einsum("ij,ij->i", txt, img)
    assert own.mean() > (txt @ img.T).mean() + 0.2
    again = write_planted_gallery(tmp_path / "h", 250, spec, seed=5, shard_rows=100)
    assert np.array_equal(again.gather(np.arange(250)), eset.gather(np.arange(250)))


def test_planted_gallery_without_captions_and_bad_sizes(tmp_path):
    spec = PlantedSpec(dim=24, cluster_dim=8, subspace_dim=4)
    eset = write_planted_gallery(tmp_path / "g", 30, spec, seed=1, captions=False)
    assert eset.rows == 30 and not eset.has_text
    for images, shard_rows in [(0, 10), (10, 0)]:
        with pytest.raises(ValueError, match="must be ≥ 1"):
            write_planted_gallery(tmp_path / "x", images, spec, seed=1, shard_rows=shard_rows)
