"""CandidateIndex: ids are row ids, filters hold inside the search, stale indexes are caught."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from quari.index import CandidateIndex, StaleIndexError, choose_factory
from quari.store import EmbeddingSet

from helpers import make_set


def test_factory_table():
    assert choose_factory(50_000, 768) == "Flat"
    assert choose_factory(1_000_000, 768) == "Flat"
    assert choose_factory(5_000_000, 768, memory_budget=64 << 30) == "IVF4096,Flat"
    assert choose_factory(10_000_000, 768, memory_budget=8 << 30) == "IVF8192,SQ8"
    assert choose_factory(100_000_000, 768) == "IVF16384,PQ96"
    assert choose_factory(50_000_000, 512) == "IVF16384,PQ64"


def test_flat_index_equals_brute_force(tmp_path):
    eset, stored, _ = make_set(tmp_path / "s")
    index = CandidateIndex.build(eset, progress=False)
    assert index.factory == "Flat" and index.rows == len(eset)
    q = np.random.default_rng(1).standard_normal((4, 24)).astype(np.float32)
    scores, ids = index.search(q, 10)
    brute = q @ stored.astype(np.float32).T
    np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1)[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, ids, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factory", ["HNSW32", "IVF8,Flat", "IVF8,PQ4", "HNSW16,SQ8"])
def test_approximate_indexes_return_row_ids_and_respect_filters(tmp_path, factory):
    eset, stored, meta = make_set(tmp_path / "s")
    index = CandidateIndex.build(eset, f"faiss:{factory}", nprobe=8, progress=False)
    q = stored[[5, 400, 700]].astype(np.float32)
    _, ids = index.search(q, 5)
    assert set(ids[:, 0]) == {5, 400, 700} or factory.endswith("PQ4")  # self is the best match
    selection = eset.select(pc.field("group") == 2)
    _, ids = index.search(q, 20, selection=selection)
    got = ids[ids >= 0]
    assert got.size > 0 and np.isin(got, selection).all()
    assert (np.asarray(meta.column("group"))[got] == 2).all()


def test_save_load_and_staleness(tmp_path):
    eset, _, _ = make_set(tmp_path / "s")
    CandidateIndex.build(eset, progress=False)
    loaded = CandidateIndex.load(EmbeddingSet.open(tmp_path / "s"))
    assert loaded.rows == 750 and loaded.info["fingerprint"] == eset.fingerprint
    rng = np.random.default_rng(3)
    eset.append(rng.standard_normal((9, 24)), {"group": np.arange(9), "name": ["n"] * 9})
    with pytest.raises(
        StaleIndexError,
        match="built for 750 rows, the set now has 759 "
        r"\(appended since\)",
    ):
        CandidateIndex.load(eset)
    updated = CandidateIndex.load(eset, update=True)
    assert updated.rows == 759
    fresh = CandidateIndex.build(eset, save=False, progress=False)
    q = rng.standard_normal((3, 24)).astype(np.float32)
    np.testing.assert_array_equal(updated.search(q, 30)[1], fresh.search(q, 30)[1])
    assert CandidateIndex.load(eset).rows == 759  # the update was saved


def test_a_changed_shard_cannot_be_updated(tmp_path):
    eset, stored, _ = make_set(tmp_path / "s", shards=(20, 20))
    CandidateIndex.build(eset, progress=False)
    p = tmp_path / "s" / "img_emb" / "img_emb_0.npy"
    np.save(p, stored[:20][::-1].copy())  # same shape, different content
    changed = EmbeddingSet.open(tmp_path / "s")
    changed.write_manifest(encoder="test-encoder")  # re-checksums the edited shard
    with pytest.raises(StaleIndexError, match=r"\(changed since\); rebuild it"):
        CandidateIndex.load(changed, update=True)


def test_backends_are_chosen_by_spec_string(tmp_path):
    from quari.errors import QuARIInputError
    from quari.index import FaissIndex, backend_for, list_backends

    assert backend_for("faiss:HNSW32") == (FaissIndex, "HNSW32")
    assert backend_for("faiss") == (FaissIndex, "")
    assert "faiss" in list_backends()
    with pytest.raises(QuARIInputError, match="unknown index backend 'nope:x'"):
        backend_for("nope:x")
    eset, _, _ = make_set(tmp_path / "s")
    with pytest.raises(QuARIInputError, match="unknown FAISS index option"):
        CandidateIndex.build(eset, "faiss:Flat", nprob=3, progress=False)
    with pytest.raises(QuARIInputError, match="has 1024 lists but the set only 750 rows"):
        CandidateIndex.build(eset, "faiss:IVF1024,Flat", progress=False)
    built = CandidateIndex.build(eset, "faiss:auto", progress=False)
    assert built.spec == "faiss:Flat" and CandidateIndex.exists(eset)
    loaded = CandidateIndex.load(eset)  # dispatches on the saved description
    assert isinstance(loaded, FaissIndex) and loaded.describe()["backend"] == "faiss"
    assert loaded.stale_reason() is None


def test_a_filter_expression_selects_the_same_rows_as_their_ids(tmp_path):
    eset, stored, _ = make_set(tmp_path / "s")
    index = CandidateIndex.build(eset, "faiss:HNSW16", progress=False)
    q = stored[[1, 2, 3]].astype(np.float32)
    where = pc.field("group") == 3
    by_ids = index.search(q, 15, selection=eset.select(where))
    by_expression = index.search(q, 15, selection=where)
    np.testing.assert_array_equal(by_ids[1], by_expression[1])
    assert (by_ids[1] >= 0).all()
