"""The Milvus backend on Milvus Lite: the same candidates as FAISS through every retriever mode
and filter, filters translated to the same rows as pyarrow, a killed build resumed without
duplicates, and clear errors for collections that are not what the index says."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from quari import QuARIModel
from quari.errors import LimitError, NotFoundError, QuARIInputError, StoreError
from quari.filters import (
    BoolOp,
    Compare,
    Field,
    IsIn,
    IsNull,
    Literal,
    Not,
    StringMatch,
    parse_filter,
    to_expression,
)
from quari.index import CandidateIndex, RowFilter, StaleIndexError
from quari.index.milvus_filters import milvus_literal, to_milvus
from quari.retriever import Retriever
from quari.store import EmbeddingSet

from helpers import make_set, tiny_config

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

CHILD = Path(__file__).with_name("milvus_child.py")
FIELDS = ["group", "score", "flag", "name"]
WORDS = ["img_01", "img%2", 'say "hi"', "back\\slash", "ünï", "img_10", "a_b", ""]


def rich_set(root: Path, shards=(500, 300, 700), dim=24, seed=0) -> EmbeddingSet:
    """Metadata with nulls everywhere, NaN scores, and names holding LIKE wildcards, quotes,
    backslashes and non-ASCII text."""
    rng = np.random.default_rng(seed)
    eset = EmbeddingSet.create(root, dim=dim, encoder="test-encoder")
    for n in shards:
        null = rng.random((4, n)) < 0.1
        score = rng.normal(size=n)
        score[rng.random(n) < 0.05] = np.nan
        meta = pa.table(
            {
                "group": pa.array(rng.integers(0, 5, n), pa.int64(), mask=null[0]),
                "score": pa.array(score, pa.float64(), mask=null[1]),
                "flag": pa.array(rng.random(n) < 0.5, pa.bool_(), mask=null[2]),
                "name": pa.array(
                    [f"{WORDS[i % len(WORDS)]}{i % 37}" for i in rng.integers(0, 1000, n)],
                    pa.string(),
                    mask=null[3],
                ),
                "image path": [f"p{i}" for i in range(n)],
            }
        )
        eset.append(rng.standard_normal((n, dim)), meta)
    return eset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One set, an exact FAISS index and an exact Milvus Lite index over it, a tiny model."""
    root = tmp_path_factory.mktemp("world")
    eset = rich_set(root / "set")
    faiss = CandidateIndex.build(eset, "faiss:Flat", name="faiss", progress=False)
    milvus = CandidateIndex.build(
        eset,
        f"milvus-lite:{root}/milvus.db",
        name="milvus",
        index_type="FLAT",
        fields=FIELDS,
        batch_rows=400,
        progress=False,
    )
    torch.manual_seed(0)
    model = QuARIModel(tiny_config("reference")).eval()
    yield eset, faiss, milvus, model
    milvus.close()


def milvus_rows(index, expr: str) -> np.ndarray:
    res = index.client.query(index.collection, filter=expr, output_fields=["id"], limit=16384)
    return np.sort(np.asarray([r["id"] for r in res], dtype=np.int64))


# -- filters --------------------------------------------------------------------------------------
def leaves():
    num = st.integers(-3, 6) | st.floats(-2.5, 2.5, allow_nan=False).map(lambda x: round(x, 2))
    ops = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
    word = st.sampled_from(WORDS) | st.sampled_from(["img", "_1", "%", "1", "ï", "\\", '"'])
    name = word.flatmap(lambda w: st.integers(0, 40).map(lambda i: f"{w}{i}") | st.just(w))
    return st.one_of(
        st.builds(
            Compare, ops, st.sampled_from([Field("group"), Field("score")]), num.map(Literal)
        ),
        st.builds(Compare, ops, num.map(Literal), st.just(Field("group"))),
        st.builds(Compare, ops, st.just(Field("group")), st.just(Field("score"))),
        st.builds(
            Compare,
            st.sampled_from(["==", "!="]),
            st.just(Field("flag")),
            st.booleans().map(Literal),
        ),
        st.builds(Compare, ops, st.just(Field("name")), name.map(Literal)),
        st.builds(
            IsIn,
            st.just(Field("group")),
            st.lists(st.integers(0, 5) | st.none(), max_size=3).map(tuple),
            st.booleans(),
        ),
        st.builds(
            IsIn,
            st.just(Field("name")),
            st.lists(name | st.none(), max_size=3).map(tuple),
            st.booleans(),
        ),
        st.builds(IsNull, st.sampled_from([Field(f) for f in FIELDS]), st.booleans()),
        st.builds(
            StringMatch,
            st.sampled_from(["startswith", "endswith", "contains"]),
            st.just(Field("name")),
            word,
        ),
        st.just(Field("flag")),
    )


def trees():
    return st.recursive(
        leaves(),
        lambda sub: st.one_of(
            st.builds(
                BoolOp,
                st.sampled_from(["and", "or"]),
                st.lists(sub, min_size=2, max_size=3).map(tuple),
            ),
            st.builds(Not, sub),
        ),
        max_leaves=6,
    )


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees())
def test_a_translated_filter_passes_the_rows_pyarrow_passes(world, tree):
    eset, _, milvus, _ = world
    tree = parse_filter(str(tree))  # what a --where string of it parses to
    try:
        want = eset.select(to_expression(tree))
    except QuARIInputError:  # pyarrow refuses it too (e.g. `name in []`: no common type)
        reject()
    translated = to_milvus(tree, dict.fromkeys(FIELDS, True))
    got = milvus_rows(milvus, translated.expr)
    if translated.exact:
        np.testing.assert_array_equal(got, want, err_msg=translated.expr)
    else:  # a superset, narrowed by id in the search
        assert np.isin(want, got).all(), translated.expr


@pytest.mark.parametrize(
    "text",
    [
        "not (group == 2)",
        "group not in [1, 2]",
        "name in ['a_b3', None]",
        'not contains(name, "img")',
        "not (score > 0) or flag",
        "score != score",
        '1 <= group < 4 and name != "say \\"hi\\"3"',
    ],
)
def test_nulls_and_negations_select_what_pyarrow_selects(world, text):
    eset, _, milvus, _ = world
    tree = parse_filter(text)
    got = milvus_rows(milvus, to_milvus(tree, dict.fromkeys(FIELDS, True)).expr)
    np.testing.assert_array_equal(got, eset.select(to_expression(tree)))


def test_what_milvus_cannot_express_is_refused_or_sent_as_ids():
    assert milvus_literal('a "b"\\') == '"a \\"b\\"\\\\"'
    assert to_milvus(parse_filter("2 < group")).expr == "group > 2"
    assert not to_milvus(parse_filter("contains(name, 'a_b')")).exact
    for text, message in [
        ('field("image path") == "x"', "cannot be used in a Milvus expression"),
        ("1 < 2", "compares two constants"),
        ("startswith(lower, 'x') and like == 3", "cannot be used"),
        ("score < 1e999", "not a finite number"),
        ("(group < 1) == True", "can only test a column"),
    ]:
        with pytest.raises(QuARIInputError, match=message):
            to_milvus(parse_filter(text))
    with pytest.raises(NotFoundError, match="'width' is not a field of the Milvus collection"):
        to_milvus(parse_filter("width > 3"), {"group": True})


def test_a_filter_on_other_columns_goes_as_row_ids_up_to_a_limit(world):
    eset, faiss, milvus, _ = world
    q = eset.gather([3, 4]).astype(np.float32)
    tree = parse_filter('field("image path") in ["p1", "p7", "p9"]')
    rows = eset.select(to_expression(tree))
    want = faiss.search(q, 5, selection=rows)
    got = milvus.search(q, 5, selection=RowFilter(rows, tree))
    np.testing.assert_array_equal(got[1], want[1])
    many = eset.select(to_expression(parse_filter("group >= 0")))
    with CandidateIndex.load(eset, name="milvus", id_filter_limit=100) as strict:
        with pytest.raises(QuARIInputError, match=r"\d+ passing rows are too many to send as"):
            strict.search(q, 5, selection=many)
        assert strict.search(q, 5, selection=many[:100])[1].shape == (2, 5)
    with pytest.raises(LimitError, match="at most 16384"):
        milvus.search(q, 20_000)


# -- the retriever through both backends -------------------------------------------------------
@pytest.mark.parametrize("mode", ["plain", "rerank", "adaptive"])
@pytest.mark.parametrize(
    "where",
    [
        None,
        "group == 2 and name != 'a_b3'",
        "not (score > 0.5) or flag",
        'contains(name, "_1")',  # no exact Milvus form: a superset, narrowed by id
    ],
)
def test_every_mode_and_filter_finds_what_faiss_finds(world, mode, where):
    eset, faiss, milvus, model = world
    q = np.random.default_rng(7).standard_normal((4, 24)).astype(np.float32)
    kw = dict(k=10, mode=mode, candidates=40, where=where)
    want = Retriever(eset, model, faiss, exact_below=0).search(q, **kw)
    got = Retriever(eset, model, milvus, exact_below=0).search(q, **kw)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)
    assert got.notes == want.notes


def test_rescoring_from_the_collection_equals_rescoring_from_the_set(world):
    eset, faiss, milvus, model = world
    q = np.random.default_rng(8).standard_normal((3, 24)).astype(np.float32)
    from_set = Retriever(eset, model, milvus).search(q, 10, mode="adaptive")
    from_index = Retriever(eset, model, milvus, rescore_from="index").search(q, 10, mode="adaptive")
    np.testing.assert_array_equal(from_index.ids, from_set.ids)
    np.testing.assert_array_equal(from_index.scores, from_set.scores)
    ids = np.array([5, 1400, 5])
    np.testing.assert_array_equal(milvus.fetch_vectors(ids), eset.gather(ids).astype(np.float32))
    with pytest.raises(QuARIInputError, match="'faiss' index backend does not return stored"):
        Retriever(eset, model, faiss, rescore_from="index").search(q, 10, mode="adaptive")
    with pytest.raises(QuARIInputError, match="rescore_from must be 'set' or 'index'"):
        Retriever(eset, model, None, rescore_from="index")


# -- building, resuming, refusing ----------------------------------------------------------------
def all_ids(index) -> np.ndarray:
    it = index.client.query_iterator(
        index.collection, filter="id >= 0", output_fields=["id"], batch_size=1000
    )
    out = []
    while batch := it.next():
        out += [r["id"] for r in batch]
    it.close()
    return np.asarray(out)


def test_a_killed_build_resumes_and_ends_with_every_row_once(tmp_path):
    eset, stored, _ = make_set(tmp_path / "s", shards=(1000, 1000, 1000))
    spec = f"milvus-lite:{tmp_path}/kill.db/photos"
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(tmp_path / "s"), spec, "100"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(5):  # five batches of 100 rows are in
        assert child.stdout.readline().strip() == "inserted", child.stderr.read()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not CandidateIndex.exists(eset)  # the description is written last
    index = CandidateIndex.build(eset, spec, index_type="FLAT", batch_rows=100, progress=False)
    build = index.info["build"]
    assert 500 <= build["rows_present"] < 3000 and build["rows_present"] % 100 == 0
    assert build["rows_inserted"] == 3000 - build["rows_present"]
    ids = all_ids(index)
    assert ids.size == 3000 and np.array_equal(np.sort(ids), np.arange(3000))
    q = stored[[7, 2500]].astype(np.float32)
    assert index.search(q, 1)[1][:, 0].tolist() == [7, 2500]
    index.close()
    # Another vector index over the same collection reuses its rows.
    ivf = CandidateIndex.build(eset, spec, index_type="IVF_FLAT", index_params={"nlist": 8},
                               search_params={"nprobe": 8}, progress=False)  # fmt: skip
    assert ivf.info["build"] == {"rows_present": 3000, "rows_inserted": 0}
    assert ivf.client.describe_index(ivf.collection, "vector")["index_type"] == "IVF_FLAT"
    assert ivf.search(q, 1)[1][:, 0].tolist() == [7, 2500]
    ivf.close()


def test_collections_that_are_not_what_the_index_says_are_refused(tmp_path):
    from pymilvus import MilvusClient

    db = tmp_path / "x.db"
    a, _, _ = make_set(tmp_path / "a")
    b, _, _ = make_set(tmp_path / "b", seed=1)
    narrow, _, _ = make_set(tmp_path / "n", dim=16)
    with pytest.raises(StoreError, match="cannot connect to Milvus at http://127.0.0.1:9"):
        CandidateIndex.build(a, "milvus://127.0.0.1:9/photos", progress=False, timeout=2)
    # a collection quari did not create is never written to nor deleted from
    client = MilvusClient(str(db))
    client.create_collection("theirs", dimension=24, metric_type="IP")
    client.insert("theirs", [{"id": 1, "vector": np.ones(24, np.float32)}])
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="was not created by quari"):
            CandidateIndex.build(a, f"milvus-lite:{db}/theirs", overwrite=overwrite)
    assert client.get("theirs", ids=[1]) and client.query("theirs", filter="", output_fields=[
        "count(*)"])[0]["count(*)"] == 1  # fmt: skip
    client.close()
    # a collection built from another set
    built = CandidateIndex.build(a, f"milvus-lite:{db}/photos", index_type="FLAT", progress=False)
    built.close()
    with pytest.raises(StoreError, match="was built from another set"):
        CandidateIndex.build(b, f"milvus-lite:{db}/photos", progress=False)
    rebuilt = CandidateIndex.build(
        b, f"milvus-lite:{db}/photos", index_type="FLAT", overwrite=True, progress=False
    )
    rebuilt.close()
    with pytest.raises(StoreError, match=r"has the scalar fields \{\}, the index wants \{'group'"):
        CandidateIndex.build(b, f"milvus-lite:{db}/photos", fields=["group"], progress=False)
    with pytest.raises(StaleIndexError, match="another set"):
        CandidateIndex.load(a)  # a's description, b's vectors
    # another metric
    client = MilvusClient(str(db))
    client.release_collection("photos")
    client.drop_index("photos", "vector")
    params = client.prepare_index_params()
    params.add_index(field_name="vector", index_type="FLAT", metric_type="COSINE")
    client.create_index("photos", params)
    client.close()
    with pytest.raises(StoreError, match="ranks by COSINE, quari needs inner product"):
        CandidateIndex.load(b)
    # another dimension
    (narrow.root / "index").mkdir()
    (narrow.root / "index" / "image.json").write_text((a.root / "index" / "image.json").read_text())
    with pytest.raises(StoreError, match="holds 24-d vectors, the set .* 16-d"):
        CandidateIndex.load(narrow)
    # a dropped collection
    client = MilvusClient(str(db))
    client.drop_collection("photos")
    client.close()
    with pytest.raises(StoreError, match="does not exist"):
        CandidateIndex.load(b)


def test_the_command_line_builds_searches_and_rescores_from_milvus(tmp_path):
    from quari.checkpoint import save
    from quari.cli import app

    make_set(tmp_path / "set")
    torch.manual_seed(0)
    save(QuARIModel(tiny_config("paper")).eval(), tmp_path / "model")
    q = np.random.default_rng(3).standard_normal((2, 24)).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    runner = CliRunner()
    spec = f"milvus-lite:{tmp_path}/set/index/milvus.db/c_{uuid.uuid4().hex[:8]}"
    build = ["index", "build", str(tmp_path / "set"), "--backend", spec, "--fields",
             "group,name", "--milvus-index", "FLAT", "--quiet"]  # fmt: skip
    out = runner.invoke(app, build)
    assert out.exit_code == 0, out.output
    assert "over 750 rows" in out.output
    info = json.loads((tmp_path / "set" / "index" / "image.json").read_text())
    assert info["uri"] == "index/milvus.db" and info["fields"] == {
        "group": "INT64",
        "name": "VARCHAR",
    }
    args = ["search", str(tmp_path / "set"), "--model", str(tmp_path / "model"),
            "--query-embeddings", str(tmp_path / "q.npy"), "-k", "5", "--json",
            "--where", "group == 2"]  # fmt: skip
    plain = runner.invoke(app, args)
    remote = runner.invoke(app, [*args, "--rescore-from", "milvus"])
    assert plain.exit_code == 0 and remote.exit_code == 0, plain.output + remote.output
    assert json.loads(plain.output)["results"] == json.loads(remote.output)["results"]
    bad = runner.invoke(app, ["index", "build", str(tmp_path / "set"), "--backend", spec,
                              "--fields", "nope"])  # fmt: skip
    assert bad.exit_code == 2 and "no metadata column 'nope'" in bad.output
