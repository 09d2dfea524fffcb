"""The tracks' parts that need no model: pixel attributes, phrasings, relevance judgements and
image→image views, each checked against a brute-force reference."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

from quari.errors import DataError, QuARIInputError
from quari.eval.tracks.attributes import ATTRIBUTES, AttributeThresholds, measure
from quari.eval.tracks.judgements import instance_plan, text_queries
from quari.eval.tracks.templates import CLASS_NOUNS, TEMPLATE_SETS, render
from quari.eval.tracks.views import ViewSpec, make_view, view_rng
from quari.filters import parse_where
from quari.store import EmbeddingSet

NAMES = [a.name for a in ATTRIBUTES]
SIZES = {a.name: len(a.values) for a in ATTRIBUTES}


def garments(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy rectangles (a corner cut out) of random size, brightness and stripes on black."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        h, w = rng.integers(6, 27, 2)
        top, left = rng.integers(0, 28 - h + 1), rng.integers(0, 28 - w + 1)
        patch = rng.integers(40, 230) + rng.uniform(-20, 20, (h, w))  # no tied scores
        patch[: rng.integers(0, h // 2 + 1), : rng.integers(0, w // 2 + 1)] = 0  # a gap
        if rng.random() < 0.5:
            patch[:: rng.integers(2, 4)] *= rng.uniform(0.3, 0.8)  # stripes
        x[i, top : top + h, left : left + w] = patch
    return x, np.arange(n) % 10


# -- attributes ------------------------------------------------------------------------------------


def test_scores_measure_what_they_say():
    x = np.zeros((4, 28, 28), np.uint8)
    x[0, 4:24, 10:18] = 60  # dark, narrow, plain, symmetric, boxy
    x[1, 4:24, 10:18] = 220  # the same, light
    x[2, 4:24, 10:18] = 220  # a T shape: a box with sleeves
    x[2, 4:9, 2:26] = 220
    x[3, 4:24, 4:14] = 220  # off-centre: asymmetric
    x[3, 4:24:2, 4:14] = 90  # and striped
    s = measure(x)
    assert s["tone"][0] == pytest.approx(60) and s["tone"][1] == pytest.approx(220)
    assert s["coverage"][0] == pytest.approx(20 * 8 / 784)
    assert s["silhouette"][0] == pytest.approx(1.0)
    assert s["silhouette"][2] == pytest.approx((20 * 8 + 5 * 16) / (20 * 24))
    assert s["symmetry"][1] == pytest.approx(0, abs=1e-6)
    assert s["symmetry"][3] > 0.5
    assert s["texture"][1] == pytest.approx(0, abs=1e-6)
    assert s["texture"][3] > 100


def test_thresholds_are_fitted_on_train_only_and_balanced_per_class():
    train, train_labels = garments(600, seed=1)
    test, test_labels = garments(200, seed=2)
    th = AttributeThresholds.fit(train, train_labels)
    levels = th.assign(train, train_labels)
    for a in ATTRIBUTES:  # each level holds ~1/L of every class (ties aside)
        for c in range(10):
            counts = np.bincount(levels[a.name][train_labels == c], minlength=len(a.values))
            assert counts.min() >= 60 / len(a.values) - 8, (a.name, c, counts)
    # the levels are the per-class quantile bins of the raw scores (brute force)
    scores = measure(test)
    got = th.assign(test, test_labels)
    for a in ATTRIBUTES:
        for i in range(len(test)):
            want = sum(scores[a.name][i] >= cut for cut in th.cuts[a.name][test_labels[i]])
            assert got[a.name][i] == want
    # changing the test images never moves the thresholds
    again = AttributeThresholds.fit(train, train_labels)
    test[:] = 255 - test
    assert all(np.array_equal(th.cuts[n], again.cuts[n]) for n in NAMES)
    # and they survive track.json
    back = AttributeThresholds.from_json(th.to_json())
    assert all(np.array_equal(th.cuts[n], back.cuts[n]) for n in NAMES)
    with pytest.raises(DataError, match="'tone' missing"):
        AttributeThresholds.from_json({})
    with pytest.raises(QuARIInputError, match="class 0 has 2 training images"):
        AttributeThresholds.fit(train[:20], train_labels[:20])


# -- templates -------------------------------------------------------------------------------------


def every_sentence(name: str) -> set[str]:
    ts, out = TEMPLATE_SETS[name], set()
    for label, k in itertools.product(range(10), (1, 2, 3)):
        for subset in itertools.permutations(NAMES, k):
            for values in itertools.product(*(range(SIZES[n]) for n in subset)):
                attrs = dict(zip(subset, values, strict=True))
                for f in range(len(ts.frames)):
                    out.add(render(ts, label, attrs, frame=f))
    return out


def test_the_three_phrasings_are_disjoint():
    sets = {name: every_sentence(name) for name in ("train", "val", "test")}
    for a, b in itertools.combinations(sets, 2):
        assert not sets[a] & sets[b], (a, b, sorted(sets[a] & sets[b])[:3])
        assert not set(TEMPLATE_SETS[a].frames) & set(TEMPLATE_SETS[b].frames)
    for ts in TEMPLATE_SETS.values():
        assert len(ts.frames) >= 3
        assert {n: len(w) for n, w in ts.words.items()} == SIZES


def test_render_says_the_class_and_every_attribute():
    rng = np.random.default_rng(0)
    for name, ts in TEMPLATE_SETS.items():
        for _ in range(50):
            label = int(rng.integers(10))
            attrs = {str(n): int(rng.integers(SIZES[n])) for n in rng.choice(NAMES, 2, False)}
            text = render(ts, label, attrs, rng=rng)
            assert CLASS_NOUNS[label] in text, (name, text)
            for n, v in attrs.items():
                assert ts.words[n][v] in text
            assert " a a" not in text and " a e" not in text and "  " not in text
    assert render(TEMPLATE_SETS["train"], 9, {"tone": 0}, frame=0) == "a photo of a dark ankle boot"
    assert render(TEMPLATE_SETS["val"], 4, {"coverage": 1}, frame=1) == (
        "a coat which looks medium-width"
    )
    with pytest.raises(QuARIInputError, match="unknown attributes"):
        render(TEMPLATE_SETS["test"], 0, {"colour": 1}, frame=0)


# -- relevance ------------------------------------------------------------------------------------


def random_gallery(n: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    return labels, {a: rng.integers(0, SIZES[a], n).astype(np.int8) for a in NAMES}


def test_text_relevance_is_exactly_the_matching_rows():
    labels, levels = random_gallery(120, seed=3)
    qs = text_queries(labels, levels, 90, np.random.default_rng(4))
    assert len(qs) == 90
    assert [sum(len(q.attributes) == k for q in qs) for k in (1, 2, 3)] == [30, 30, 30]
    seen = set()
    for q in qs:
        want = [
            i
            for i in range(len(labels))
            if labels[i] == q.label and all(levels[n][i] == v for n, v in q.attributes)
        ]
        assert q.relevant.tolist() == want
        assert 0 < len(want) < (labels == q.label).sum()  # not empty, not the whole class
        key = (q.label, frozenset(q.attributes))
        assert key not in seen  # no description twice
        seen.add(key)


def test_text_relevance_agrees_with_a_where_filter_on_the_stored_metadata(tmp_path):
    labels, levels = random_gallery(80, seed=5)
    meta = {
        "label": labels,
        **{a.name: [a.values[v] for v in levels[a.name]] for a in ATTRIBUTES},
    }
    eset = EmbeddingSet.create(tmp_path / "g", dim=4, encoder="test")
    eset.append(np.random.default_rng(0).standard_normal((80, 4)), pa.table(meta))
    by_name = {a.name: a for a in ATTRIBUTES}
    for q in text_queries(labels, levels, 40, np.random.default_rng(6)):
        where = " and ".join(
            [f"label == {q.label}"] + [f'{n} == "{by_name[n].values[v]}"' for n, v in q.attributes]
        )
        np.testing.assert_array_equal(eset.select(parse_where(where)), q.relevant)


def test_text_queries_take_all_there_are_when_asked_for_more():
    labels = np.array([0, 0, 0, 1, 1])
    levels = {n: np.array([0, 1, 1, 0, 1], np.int8) for n in NAMES}
    qs = text_queries(labels, levels, 10_000, np.random.default_rng(0), max_attributes=1)
    # one attribute at a time: every attribute, both levels, in both classes
    assert len(qs) == 2 * 2 * len(NAMES)
    assert len({(q.label, q.attributes) for q in qs}) == len(qs)


def test_instance_plan_holds_query_views_out_and_finds_every_positive():
    items = np.arange(100, 160)
    plan = instance_plan(items, 15, np.random.default_rng(0), positives=3)
    assert plan.gallery_items.size == 15 * 3 + 45
    rows = list(zip(plan.gallery_items.tolist(), plan.gallery_views.tolist(), strict=True))
    assert len(set(rows)) == len(rows)  # no view twice
    for item, rel in zip(plan.query_items, plan.relevant, strict=True):
        # the query view (0) is not in the gallery; its positives are exactly the other views
        assert (item, 0) not in rows
        assert rel.tolist() == [i for i, (it, _) in enumerate(rows) if it == item]
        assert sorted(plan.gallery_views[rel].tolist()) == [1, 2, 3]
    others = np.setdiff1d(items, plan.query_items)
    for item in others:  # every other item of the split is one distractor view
        assert sum(it == item for it, _ in rows) == 1
    assert set(plan.query_items.tolist()) <= set(items.tolist())
    with pytest.raises(QuARIInputError, match="queries must be"):
        instance_plan(items, 61, np.random.default_rng(0))


def test_views_are_deterministic_distinct_and_keep_the_garment():
    x, _ = garments(3, seed=7)
    a = make_view(x[0], view_rng(0, "val", 5, 1))
    assert np.array_equal(a, make_view(x[0], view_rng(0, "val", 5, 1)))
    b = make_view(x[0], view_rng(0, "val", 5, 2))
    c = make_view(x[0], view_rng(0, "test", 5, 1))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == (28, 28) and a.dtype == np.uint8
    plain = ViewSpec(crop_area=(1, 1), crop_aspect=(1, 1), rotation=0, gamma=(1, 1), gain=(1, 1),
                     noise=0)  # fmt: skip
    np.testing.assert_allclose(make_view(x[1], view_rng(0, "val", 1, 1), plain), x[1], atol=1)
    # a transformed view still overlaps its own original more than other garments
    v = make_view(x[2], view_rng(1, "val", 2, 3)).astype(float)
    corr = [np.corrcoef(v.ravel(), o.ravel().astype(float))[0, 1] for o in x]
    assert int(np.argmax(corr)) == 2
