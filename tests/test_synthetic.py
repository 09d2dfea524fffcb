"""Synthetic clustered data: the structure it promises is there."""

from __future__ import annotations

import numpy as np

from quari.eval.synthetic import ClusteredSpec, clustered_vectors, write_clustered_set
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
