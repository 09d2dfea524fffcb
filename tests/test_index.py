"""CandidateIndex: ids are row ids, filters hold inside the search, stale indexes are caught."""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow.compute as pc
import pytest

from quari.filters import parse_filter, parse_where
from quari.index import CandidateIndex, RowFilter, StaleIndexError, choose_factory
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


# -- the backend contract, for every backend ------------------------------------------------------
BACKENDS = ["faiss", "milvus-lite"]


@pytest.fixture(scope="module")
def milvus_db(tmp_path_factory):
    """One Milvus Lite database for the module; each test gets its own collection in it."""
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    return tmp_path_factory.mktemp("milvus") / "index.db"


def exact_spec(backend: str, request) -> tuple[str, dict]:
    """The exact (flat) index of a backend, and its build options."""
    if backend == "faiss":
        return "faiss:Flat", {}
    db = request.getfixturevalue("milvus_db")
    return f"milvus-lite:{db}/c_{uuid.uuid4().hex[:12]}", {
        "index_type": "FLAT",
        "fields": ["group", "name"],
    }


@pytest.fixture(params=BACKENDS)
def exact(request, tmp_path):
    """(eset, stored rows, metadata, a spec builder) for one backend; indexes closed after."""
    eset, stored, meta = make_set(tmp_path / "s")
    built = []

    def build(**kw):
        spec, options = exact_spec(request.param, request)
        index = CandidateIndex.build(eset, spec, progress=False, **options, **kw)
        built.append(index)
        return index

    yield eset, stored, meta, build
    for index in built:
        index.close()


def brute_force(q, stored, allowed=None, k=10):
    scores = q @ stored.astype(np.float32).T
    if allowed is not None:
        mask = np.full(scores.shape[1], -np.inf, dtype=np.float32)
        mask[allowed] = 0
        scores = scores + mask
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(scores, ids, 1)


def test_an_exact_index_of_every_backend_equals_brute_force(exact):
    eset, stored, _, build = exact
    index = build()
    assert index.rows == len(eset) and index.stale_reason() is None
    q = np.random.default_rng(1).standard_normal((4, 24)).astype(np.float32)
    scores, ids = index.search(q, 10)
    want_ids, want_scores = brute_force(q, stored)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_every_form_of_a_selection_filters_inside_the_search(exact):
    eset, stored, _, build = exact
    index = build()
    q = stored[[1, 2, 3]].astype(np.float32)
    text = "group == 3 or name in ['item-1', 'item-2']"
    tree = parse_filter(text)
    allowed = eset.select(parse_where(text))
    want_ids, _ = brute_force(q, stored, allowed, k=15)
    for selection in (allowed, parse_where(text), tree, RowFilter(allowed, tree)):
        _, ids = index.search(q, 15, selection=selection)
        np.testing.assert_array_equal(ids, want_ids)
    _, none = index.search(
        q, 5, selection=RowFilter(np.empty(0, np.int64), parse_filter("group > 9"))
    )
    assert (none == -1).all()


def test_every_backend_saves_loads_and_updates_an_appended_set(exact):
    eset, _, _, build = exact
    built = build()
    loaded = CandidateIndex.load(EmbeddingSet.open(eset.root))
    assert type(loaded) is type(built) and loaded.rows == 750
    assert loaded.describe()["fingerprint"] == eset.fingerprint
    loaded.close()
    rng = np.random.default_rng(3)
    eset.append(rng.standard_normal((9, 24)), {"group": np.arange(9), "name": ["n"] * 9})
    with pytest.raises(StaleIndexError, match=r"the set now has 759 \(appended since\)"):
        CandidateIndex.load(eset)
    updated = CandidateIndex.load(eset, update=True)
    assert updated.rows == 759 and updated.stale_reason() is None
    q = rng.standard_normal((3, 24)).astype(np.float32)
    stored = eset.gather(np.arange(759))
    np.testing.assert_array_equal(updated.search(q, 30)[1], brute_force(q, stored, k=30)[0])
    updated.close()
    again = CandidateIndex.load(eset)  # the update was saved
    assert again.rows == 759
    again.close()
