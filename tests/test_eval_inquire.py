"""INQUIRE-Fullrank and INQUIRE-Rerank on fixtures in the official formats: loaders, golden
AP values, the scikit-learn oracle, every retrieval mode through the Retriever, encoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, ndcg_score

from quari import QuARIModel
from quari.errors import DataError, NotFoundError, QuARIInputError
from quari.eval.protocols import EvalResult, InquireFullrank, InquireRerank
from quari.eval.protocols.inquire import read_annotations, read_queries, read_rerank_split
from quari.eval.protocols.io import SOURCE_FILE
from quari.index import CandidateIndex
from quari.store import EmbeddingSet

from eval_fixtures import TableEncoder, official_ap, write_inquire, write_rerank
from helpers import dense_scores, tiny_config


@pytest.fixture(scope="module")
def inquire(tmp_path_factory):
    return write_inquire(tmp_path_factory.mktemp("inquire") / "INQUIRE")


@pytest.fixture(scope="module")
def rerank(tmp_path_factory):
    return write_rerank(tmp_path_factory.mktemp("rerank") / "INQUIRE-Rerank")


def fullrank(fx, **kw):
    kw.setdefault("query_embeddings", fx.query_embeddings)
    return InquireFullrank.from_root(fx.root, fx.key, **{"split": "test", "k": 5, **kw})


# -- loaders ---------------------------------------------------------------------------------------
def test_read_queries_skips_the_unnamed_index_column(inquire):
    rows = read_queries(inquire.root / "data" / "inquire" / "inquire_queries_test.csv")
    assert [r["query_id"] for r in rows] == inquire.query_ids["test"]
    assert rows[0]["query_text"] == inquire.texts["101"]  # quoted text with a comma inside
    assert {r["supercategory"] for r in rows} == {"Appearance", "Behavior", "Context", "Species"}
    assert rows[5]["iconic_group"] == ""  # empty in the file


def test_read_annotations_drops_the_jpg_suffix(inquire):
    pos = read_annotations(inquire.root / "data" / "inquire" / "inquire_annotations.csv")
    assert len(pos["101"]) == 3 and len(pos["102"]) == 10
    assert not any(p.endswith(".jpg") for ps in pos.values() for p in ps)


def test_fullrank_golden_values_with_min_r_k_normaliser(inquire):
    ev = fullrank(inquire)
    result = ev.evaluate(None)  # the cosine baseline
    ap = dict(zip(result.per_query["query_id"], result.per_query["ap@5"], strict=True))
    nd = dict(zip(result.per_query["query_id"], result.per_query["ndcg@5"], strict=True))
    for qid, want in inquire.golden.items():
        assert ap[qid] == pytest.approx(want["ap@5"], abs=1e-12), qid
    # BENCHMARKS §5.3 cases A and B, and the query with no hit in its top 5
    assert nd["101"] == pytest.approx(0.703918, abs=1e-6)
    assert nd["102"] == pytest.approx(0.508740, abs=1e-6)
    assert nd["103"] == 0.0
    # the other nine queries: one positive at rank 2 → AP 1/2, R 1
    assert all(ap[q] == pytest.approx(0.5) for q in inquire.query_ids["test"][3:])
    assert result.metrics["ap@5"] == pytest.approx(np.mean(list(ap.values())))
    assert result.primary_metric == "ap@5" and result.k == 5 and result.gallery_rows == 69
    assert any("4 annotated positives are not in the gallery" in n for n in result.notes)
    groups = result.groups["supercategory"]
    assert set(groups) == {"Appearance", "Behavior", "Context", "Species"}
    for label, entry in groups.items():
        members = [ap[q] for i, q in enumerate(inquire.query_ids["test"]) if i % 4 == [
            "Appearance", "Behavior", "Context", "Species"].index(label)]  # fmt: skip
        assert entry["queries"] == 3 and entry["ap@5"] == pytest.approx(np.mean(members))
    assert "(none)" in result.groups["iconic_group"]


def test_fullrank_json_round_trip(inquire, tmp_path):
    result = fullrank(inquire).evaluate(None)
    path = result.save(tmp_path / "r.json")
    again = EvalResult.from_dict(__import__("json").loads(path.read_text()))
    assert again == result


@pytest.mark.parametrize("mode", ["plain", "rerank", "adaptive", "scan"])
def test_fullrank_through_every_mode_matches_a_brute_force_oracle(inquire, mode):
    torch.manual_seed(0)
    model = QuARIModel(tiny_config("paper")).eval()
    ev = fullrank(inquire, k=10)
    eset = ev.gallery
    index = CandidateIndex.build(eset, "faiss:Flat", progress=False, save=False)
    result = ev.evaluate(model, mode=mode, index=index, candidates=eset.rows)
    gallery = eset.gather(np.arange(eset.rows)).astype(np.float32)
    queries = ev.queries()
    with torch.no_grad():
        q = torch.from_numpy(queries.embeddings)
        scores = gallery @ q.numpy().T if mode == "plain" else dense_scores(model(q), gallery).T
    for i, qid in enumerate(queries.ids):
        order = np.argsort(-scores[:, i], kind="stable")
        labels = np.isin(order, queries.relevant[i]).astype(int)
        want = official_ap(labels, scores[order, i], int(queries.n_relevant[i]), 10)
        assert result.per_query["ap@10"][i] == pytest.approx(want, abs=1e-6), (qid, mode)


def test_fullrank_encoder_path_equals_precomputed_embeddings(inquire):
    encoder = TableEncoder({inquire.texts[q]: v for q, v in inquire.vectors.items()})
    by_encoder = fullrank(inquire, query_embeddings=None).evaluate(None, encoder=encoder)
    by_file = fullrank(inquire).evaluate(None)
    assert by_encoder.per_query == by_file.per_query
    with pytest.raises(QuARIInputError, match="--encoder"):
        fullrank(inquire, query_embeddings=None).evaluate(None)


def test_fullrank_errors_name_the_problem(inquire, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"query_id": ["101"], "embedding": [np.ones(24, np.float32).tolist()]}),
        tmp_path / "partial.parquet",
    )
    with pytest.raises(QuARIInputError, match="no embedding for query_id '102'"):
        fullrank(inquire, query_embeddings=tmp_path / "partial.parquet").evaluate(None)
    with pytest.raises(QuARIInputError, match="splits are val and test"):
        InquireFullrank.from_root(inquire.root, inquire.key, split="train")
    with pytest.raises(NotFoundError):
        InquireFullrank.from_root(tmp_path, inquire.key)
    bad = tmp_path / "q.csv"
    bad.write_text(",query_id,query_text\n0,1,x\n")
    with pytest.raises(DataError, match="missing columns"):
        read_queries(bad)


# -- INQUIRE-Rerank --------------------------------------------------------------------------------
def rerank_eval(fx, tmp_path, **kw):
    kw.setdefault("image_embeddings", fx.image_embeddings)
    kw.setdefault("query_embeddings", fx.query_embeddings)
    return InquireRerank(fx.release, split="test", cache=tmp_path / "cache", **kw)


def test_rerank_release_has_the_17_columns(rerank):
    import pyarrow.parquet as pq

    table, files = read_rerank_split(rerank.release, "test")
    assert len(pq.read_schema(files[0]).names) == 17
    assert table.num_rows == 100 * len(rerank.queries)
    assert read_rerank_split(rerank.release, "val")[0].num_rows == 200
    with pytest.raises(QuARIInputError, match="splits are val and test"):
        read_rerank_split(rerank.release, "train")


def test_rerank_matches_scikit_learn_on_the_100_candidates(rerank, tmp_path):
    ev = rerank_eval(rerank, tmp_path)
    result = ev.evaluate(None)
    table = ev.table
    eset = ev.gallery
    assert eset.rows == len(np.unique(table.column("inat24_image_id").to_numpy()))  # each once
    ids = np.asarray(eset.metadata(np.arange(eset.rows)).column("inat24_image_id").to_pylist())
    vectors = eset.gather(np.arange(eset.rows)).astype(np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    row_of = {int(v): i for i, v in enumerate(ids)}
    queries = ev.queries()
    for q, text in enumerate(rerank.queries):
        sel = np.flatnonzero(np.asarray(table.column("query").to_pylist()) == text)
        labels = table.column("relevant").to_numpy()[sel]
        rows = [row_of[int(i)] for i in table.column("inat24_image_id").to_numpy()[sel]]
        qv = queries.embeddings[q] / np.linalg.norm(queries.embeddings[q])
        cos = vectors[rows] @ qv
        assert result.per_query["ap@100"][q] == pytest.approx(
            average_precision_score(labels, cos), abs=1e-6
        )
        assert result.per_query["ndcg@100"][q] == pytest.approx(
            ndcg_score(labels[None], cos[None]), abs=1e-6
        )
        first = np.flatnonzero(labels[np.argsort(-cos, kind="stable")])[0]
        assert result.per_query["mrr"][q] == pytest.approx(1 / (first + 1))
    assert set(result.groups["supercategory"]) == {"Appearance", "Behavior", "Context", "Species"}
    initial = ev.initial_ranking()  # the release's clip_score order
    scores = table.column("clip_score").to_numpy()
    labels = table.column("relevant").to_numpy()
    want = np.mean(
        [
            average_precision_score(labels[i : i + 100], scores[i : i + 100])
            for i in range(0, 400, 100)
        ]
    )
    assert initial.metrics["ap@100"] == pytest.approx(want, abs=1e-9)
    assert initial.mode == "fixed" and initial.method["kind"] == "initial"
    assert initial.per_query["query_id"] == rerank.queries


def test_rerank_model_scores_only_the_fixed_candidates(rerank, tmp_path):
    torch.manual_seed(1)
    model = QuARIModel(tiny_config("paper")).eval()
    ev = rerank_eval(rerank, tmp_path)
    result = ev.evaluate(model, mode="rerank")
    eset = ev.gallery
    queries = ev.queries()
    vectors = eset.gather(np.arange(eset.rows)).astype(np.float32)
    with torch.no_grad():
        scores = dense_scores(model(torch.from_numpy(queries.embeddings)), vectors)
    for q in range(len(queries)):
        rows = eset.select(queries.selections[q])
        assert rows.size == 100
        labels = np.isin(rows, queries.relevant[q]).astype(int)
        want = average_precision_score(labels, scores[q, rows])
        assert result.per_query["ap@100"][q] == pytest.approx(want, abs=1e-5)


def test_rerank_encoder_builds_the_same_gallery_once(rerank, tmp_path):
    by_file = rerank_eval(rerank, tmp_path).evaluate(None)
    enc = rerank_eval(rerank, tmp_path, image_embeddings=None, encoder=rerank.encoder)
    folder = enc.gallery.root
    assert (folder / SOURCE_FILE).is_file()
    assert enc.evaluate(None).per_query["ap@100"] == pytest.approx(
        by_file.per_query["ap@100"], abs=1e-6
    )
    before = (folder / "manifest.json").stat().st_mtime_ns
    again = rerank_eval(rerank, tmp_path, image_embeddings=None, encoder=rerank.encoder)
    assert again.gallery.root == folder  # reused, not rebuilt
    assert (folder / "manifest.json").stat().st_mtime_ns == before
    assert EmbeddingSet.open(folder).encoder == "fixture-encoder"
    with pytest.raises(QuARIInputError, match="--image-embeddings"):
        _ = rerank_eval(rerank, tmp_path / "other", image_embeddings=None).gallery
