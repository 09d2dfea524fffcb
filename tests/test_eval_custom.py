"""`quari eval custom`: labelled queries of every kind over a small set with known answers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from quari.errors import NotFoundError, QuARIInputError
from quari.eval.protocols import CustomEvaluator
from quari.eval.protocols.custom import read_custom_queries
from quari.store import EmbeddingSet

from eval_fixtures import DIM, TableEncoder, homed, png


@pytest.fixture
def collection(tmp_path):
    """40 rows: birds 0–9 along e0 (cosines 0.95 … 0.5), cats 10–19 along e1, 19 others, and
    row 39 = the fixture encoder's embedding of photo.png."""
    rng = np.random.default_rng(0)
    levels = np.linspace(0.95, 0.5, 10)
    rows = [homed(rng, 0, s) for s in levels] + [homed(rng, 1, s) for s in levels]
    rows += [homed(rng, None, 0) for _ in range(19)]
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "photo.png").write_bytes(png(5))
    encoder = TableEncoder({"a bird": np.eye(DIM)[0]})
    rows.append(encoder.encode_images([Image.open(tmp_path / "photos" / "photo.png")])[0])
    labels = ["bird"] * 10 + ["cat"] * 10 + ["other"] * 20
    eset = EmbeddingSet.create(tmp_path / "set", dim=DIM, encoder="fixture-encoder")
    eset.append(np.asarray(rows[:25]), {"label": labels[:25]})
    eset.append(np.asarray(rows[25:]), {"label": labels[25:]})
    return tmp_path, eset, encoder


def write_queries(path, rows):
    columns = {
        "query_id": pa.string(),
        "label": pa.string(),
        "text": pa.string(),
        "image": pa.string(),
        "embedding": pa.list_(pa.float32()),
        "row": pa.int64(),
        "relevant": pa.list_(pa.int64()),
        "relevant_where": pa.string(),
        "group": pa.string(),
    }
    table = {c: [r.get(c) for r in rows] for c in columns}
    pq.write_table(pa.table(table, schema=pa.schema(list(columns.items()))), path)
    return path


def test_every_query_kind_with_known_answers(collection):
    tmp, eset, encoder = collection
    queries = write_queries(
        tmp / "q.parquet",
        [
            {"query_id": "birds", "text": "a bird", "relevant_where": 'label == "bird"',
             "group": "text"},
            {"query_id": "cats", "embedding": np.eye(DIM)[1].tolist(), "relevant": [10, 12, 30],
             "group": "vector"},
            {"query_id": "self", "row": 5, "relevant": [5], "group": "vector"},
            {"query_id": "photo", "image": "photos/photo.png", "relevant": [39], "group": "image"},
        ],
    )  # fmt: skip
    ev = CustomEvaluator(queries, eset, k=5)
    result = ev.evaluate(None, encoder=encoder)
    ap = dict(zip(result.per_query["query_id"], result.per_query["ap@5"], strict=True))
    # birds: all five of the top 5 are birds, R = 10 → AP@5 = 5/5 / min(10, 5) = 1
    # cats: relevance [1, 0, 1, 0, 0] with R = 3 → (1 + 2/3) / 3
    assert ap == pytest.approx({"birds": 1.0, "cats": (1 + 2 / 3) / 3, "self": 1.0, "photo": 1.0})
    r = dict(zip(result.per_query["query_id"], result.per_query["r@5"], strict=True))
    assert r == pytest.approx({"birds": 0.5, "cats": 2 / 3, "self": 1.0, "photo": 1.0})
    assert result.groups["group"]["vector"]["ap@5"] == pytest.approx((ap["cats"] + 1) / 2)
    assert result.protocol == "custom" and result.primary_metric == "ap@5"
    assert result.timings["encode_s"] > 0  # the text and the image were encoded
    first = ev.evaluate(None, encoder=encoder, max_queries=2)
    assert first.per_query["query_id"] == ["birds", "cats"] and first.queries == 2
    assert first.per_query["ap@5"] == result.per_query["ap@5"][:2]
    assert "only the first 2 of 4 queries evaluated" in first.notes


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"query_id": "x", "text": "a", "row": 1, "relevant": [1]}, "exactly one of"),
        ({"query_id": "x", "text": "a"}, "exactly one of relevant and relevant_where"),
        ({"query_id": "x", "text": " ", "relevant": [1]}, "non-empty string"),
        ({"query_id": None, "text": "a", "relevant": [1]}, "has no query_id"),
    ],
)
def test_bad_rows_are_named(collection, row, message):
    tmp, _, _ = collection
    with pytest.raises(QuARIInputError, match=message):
        read_custom_queries(write_queries(tmp / "bad.parquet", [row]))


def test_errors_against_the_set(collection):
    tmp, eset, _ = collection
    cases = [
        ([{"query_id": "a", "row": 99, "relevant": [1]}], "query row 99 is outside the set"),
        ([{"query_id": "a", "row": 1, "relevant": [77]}], "relevant row 77 is outside"),
        ([{"query_id": "a", "row": 1, "relevant_where": "colour == 1"}], "query 'a'"),
        ([{"query_id": "a", "text": "a bird", "relevant": [1]}], "need an encoder"),
        ([{"query_id": "a", "embedding": [1.0, 2.0], "relevant": [1]}], "must be 24 finite"),
        ([{"query_id": "a", "row": 1, "relevant": [1]}] * 2, "appears twice"),
    ]
    for rows, message in cases:
        ev = CustomEvaluator(write_queries(tmp / "bad.parquet", rows), eset, k=5)
        with pytest.raises(QuARIInputError, match=message):
            ev.evaluate(None)
    with pytest.raises(NotFoundError):
        read_custom_queries(tmp / "missing.parquet")
    pq.write_table(pa.table({"query_id": ["a"], "text": ["x"]}), tmp / "norel.parquet")
    with pytest.raises(QuARIInputError, match="relevant or relevant_where"):
        read_custom_queries(tmp / "norel.parquet")
