"""quari.eval.metrics: golden values, scikit-learn and ir-measures oracles, properties, edges.

Oracles:

* The golden values of the INQUIRE / ILIAS estimators (cases A–D and the tie case).
* scikit-learn, called exactly as INQUIRE's ``src/metrics.py`` and ILIAS's
  ``evaluation/src/dataset.py`` call it (``average_precision_score`` rescaled by
  hits / min(R, k); ``ndcg_score`` with R − hits pseudo-positives scored −100), on random lists
  with many tied scores — the ``ties="sklearn"`` rule.
* ir-measures (trec_eval through pytrec_eval) for the textbook definitions. They agree with
  ours on P@k, R@k, RR and nDCG@k (trec_eval's ideal DCG uses every judged positive, as ours
  does). AP@k differs on purpose: trec_eval divides by R, the INQUIRE / ILIAS estimator by
  min(R, k), so the two agree when R ≤ k and differ by the factor R / k when R > k (the test
  checks both).
* Brute-force Python loops for :func:`relevance_matrix`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ir_measures
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, ndcg_score

from quari.errors import QuARIInputError
from quari.eval import metrics as M
from quari.eval.metrics import (
    average_precision,
    ilias_ap,
    ndcg,
    parse_metric,
    per_query_metrics,
    precision,
    recall,
    reciprocal_rank,
    relevance_matrix,
    retrieval_metrics,
)

ALL = ("ap", "ndcg", "mrr", "p", "r")


# -- golden values (computed with the official INQUIRE/ILIAS formulas) ---------------------------
@pytest.mark.parametrize(
    ("R", "ap", "ndcg_value"), [(3, 0.555556, 0.703918), (10, 0.333333, 0.508740)]
)
def test_golden_cases_a_and_b(R, ap, ndcg_value):
    rel = np.array([[1, 0, 1, 0, 0]])
    assert average_precision(rel, [R], k=5)[0] == pytest.approx(ap, abs=1e-6)
    assert ndcg(rel, [R], k=5)[0] == pytest.approx(ndcg_value, abs=1e-6)
    # the same through ids and the named-metric entry point
    rel_ids, n_rel = relevance_matrix(np.array([[10, 11, 12, 13, 14]]), [[10, 12, *range(R - 2)]])
    m = retrieval_metrics(rel_ids, n_rel, ("ap@5", "ndcg@5"))
    assert m == pytest.approx({"ap@5": ap, "ndcg@5": ndcg_value}, abs=1e-6)


@pytest.mark.parametrize("ties", ["sklearn", "order"])
def test_golden_case_c_rerank(ties):
    labels = [[0, 1, 0, 1, 1, 0]]
    scores = [[0.1, 0.9, 0.3, 0.2, 0.8, 0.95]]
    m = retrieval_metrics(labels, None, ("ap", "ndcg", "mrr"), scores=scores, ties=ties)
    assert m == pytest.approx({"ap": 0.588889, "ndcg": 0.712263, "mrr": 0.5}, abs=1e-6)
    m = retrieval_metrics(labels, [3], ("ap@6", "ndcg@6", "mrr@6"), scores=scores, ties=ties)
    assert list(m.values()) == pytest.approx([0.588889, 0.712263, 0.5], abs=1e-6)


def test_golden_case_d_ilias():
    ranked = np.arange(1000)[None, :] + 100
    gt = [{101, 109, 5000, 5001}]  # ranks 2 and 10, two positives never retrieved
    rel, n_rel = relevance_matrix(ranked, gt)
    ap, oracle = ilias_ap(rel, n_rel, k=1000)
    assert ap[0] == pytest.approx(0.175, abs=1e-6) and oracle[0] == pytest.approx(0.5, abs=1e-6)
    m = retrieval_metrics(rel, n_rel, ("map@1000", "r@1000"))
    assert m == pytest.approx({"map@1000": 0.175, "r@1000": 0.5}, abs=1e-6)


def test_golden_tie_case():
    labels, scores = [[1, 0, 1, 0]], [[0.9, 0.9, 0.5, 0.1]]
    grouped = per_query_metrics(labels, None, "ap", scores=scores, ties="sklearn")["ap"]
    ordered = per_query_metrics(labels, None, "ap", scores=scores, ties="order")["ap"]
    assert grouped[0] == pytest.approx(0.583333, abs=1e-6)
    assert ordered[0] == pytest.approx(0.833333, abs=1e-6)
    assert grouped[0] == pytest.approx(average_precision_score(labels[0], scores[0]), abs=1e-12)
    # the INQUIRE default is the scikit-learn rule
    assert per_query_metrics(labels, None, "ap", scores=scores)["ap"][0] == grouped[0]


# -- scikit-learn, as INQUIRE and ILIAS call it ---------------------------------------------------
def _inquire_reference(y_true: np.ndarray, y_pred: np.ndarray, count_pos: int) -> tuple:
    """AP and nDCG of INQUIRE's ``compute_retrieval_metrics`` (k = len(y_true))."""
    k = len(y_true)
    hits = int(y_true.sum())
    ap = average_precision_score(y_true, y_pred) * hits / min(count_pos, k) if hits else 0.0
    unseen = count_pos - hits
    if k + unseen < 2:  # ndcg_score refuses a single document
        return ap, None
    ndcg_value = ndcg_score([list(y_true) + [1] * unseen], [list(y_pred) + [-100.0] * unseen], k=k)
    return ap, ndcg_value


def _random_lists(rng: np.random.Generator, Q: int, n: int, levels: int) -> tuple:
    """Q lists of n labels with scores drawn from ``levels`` values (so with many ties)."""
    labels = rng.random((Q, n)) < rng.uniform(0.1, 0.6)
    scores = rng.integers(0, levels, (Q, n)) / levels
    extra = rng.integers(0, 8, Q) * (rng.random(Q) < 0.5)  # some positives never listed
    return labels, scores, labels.sum(1) + extra


@pytest.mark.parametrize(("n", "levels"), [(1, 2), (4, 2), (6, 3), (20, 4), (50, 1000), (100, 7)])
def test_score_metrics_match_sklearn_as_inquire_calls_it(n, levels):
    rng = np.random.default_rng(n * 31 + levels)
    labels, scores, R = _random_lists(rng, 40, n, levels)
    got = per_query_metrics(labels, R, ("ap", "ndcg"), scores=scores, ties="sklearn")
    for q in range(labels.shape[0]):
        if R[q] == 0:
            assert got["ap"][q] == 0 and got["ndcg"][q] == 0
            continue
        ap, ndcg_value = _inquire_reference(labels[q].astype(int), scores[q], int(R[q]))
        assert got["ap"][q] == pytest.approx(ap, abs=1e-12), q
        if ndcg_value is not None:
            assert got["ndcg"][q] == pytest.approx(ndcg_value, abs=1e-12), q


@pytest.mark.parametrize("k", [1, 5, 30])
def test_ilias_ap_matches_sklearn_as_ilias_calls_it(k):
    """ILIAS: sort by descending score (stable here: the documented tie order), keep the top
    k, rescale scikit-learn's AP by hits / min(k, |gt|); oracle = hits / |gt|."""
    rng = np.random.default_rng(k)
    labels, scores, gt = _random_lists(rng, 40, 30, 5)
    ap, oracle = ilias_ap(labels, gt, k=k, scores=scores)
    for q in range(labels.shape[0]):
        order = np.argsort(-scores[q], kind="stable")[:k]
        y_true, y_score = labels[q][order], scores[q][order]
        if not y_true.any():
            assert ap[q] == 0 and oracle[q] == 0
            continue
        expected = average_precision_score(y_true, y_score) * y_true.sum() / min(k, gt[q])
        assert ap[q] == pytest.approx(expected, abs=1e-12)
        assert oracle[q] == pytest.approx(y_true.mean() * k / gt[q], abs=1e-12)


def test_sklearn_ndcg_tie_averaging_with_cutoff_inside_a_tie_group():
    """nDCG@k groups ties over the whole list and cuts the discounts at k, as ndcg_score does."""
    rng = np.random.default_rng(3)
    labels, scores, _ = _random_lists(rng, 30, 12, 3)
    for k in (1, 3, 7):
        got = per_query_metrics(labels, None, f"ndcg@{k}", scores=scores)[f"ndcg@{k}"]
        for q in range(labels.shape[0]):
            if labels[q].any():
                expected = ndcg_score([labels[q].astype(int)], [scores[q]], k=k)
                assert got[q] == pytest.approx(expected, abs=1e-12)


def test_inquire_mrr_and_precision_recall_on_tie_free_scores():
    rng = np.random.default_rng(5)
    labels, _, R = _random_lists(rng, 30, 15, 2)
    scores = rng.permutation(30 * 15).reshape(30, 15) / 450.0  # all distinct
    got = per_query_metrics(labels, R, ALL, scores=scores)
    for q in range(30):
        ordered = labels[q][np.argsort(-scores[q])]
        first = np.flatnonzero(ordered)
        assert got["mrr"][q] == (1 / (first[0] + 1) if first.size else 0.0)
        assert got["p"][q] == pytest.approx(labels[q].sum() / 15)
        assert got["r"][q] == pytest.approx(labels[q].sum() / R[q] if R[q] else 0.0)


# -- ir-measures (trec_eval) ----------------------------------------------------------------------
def test_against_ir_measures_where_definitions_agree():
    rng = np.random.default_rng(11)
    Q, n, pool = 30, 25, 60
    ranked = np.stack([rng.permutation(pool)[:n] for _ in range(Q)])
    ranked[np.arange(n) >= rng.integers(n // 2, n + 1, Q)[:, None]] = -1  # short lists, padded
    relevant = [rng.choice(pool, rng.integers(1, 40), replace=False) for _ in range(Q)]
    qrels = [ir_measures.Qrel(str(q), str(d), 1) for q in range(Q) for d in relevant[q].tolist()]
    run = [
        ir_measures.ScoredDoc(str(q), str(d), float(n - i))  # strictly decreasing: no ties
        for q in range(Q)
        for i, d in enumerate(ranked[q].tolist())
        if d >= 0
    ]
    rel, n_rel = relevance_matrix(ranked, relevant)
    ks = (1, 5, 10, 25, 40)
    assert (n_rel > 10).any() and (n_rel <= 10).any()  # both AP regimes are exercised
    measures = [ir_measures.RR]
    for k in ks:
        measures += [
            ir_measures.P @ k,
            ir_measures.R @ k,
            ir_measures.nDCG @ k,
            ir_measures.AP @ k,
        ]
    theirs: dict[str, dict[int, float]] = {}
    for m in ir_measures.iter_calc(measures, qrels, run):
        theirs.setdefault(str(m.measure), {})[int(m.query_id)] = m.value

    def column(name: str) -> np.ndarray:
        return np.array([theirs[name].get(q, 0.0) for q in range(Q)])

    assert reciprocal_rank(rel) == pytest.approx(column("RR"), abs=1e-9)
    for k in ks:
        ours = per_query_metrics(rel, n_rel, (f"p@{k}", f"r@{k}", f"ndcg@{k}", f"ap@{k}"))
        assert ours[f"p@{k}"] == pytest.approx(column(f"P@{k}"), abs=1e-9)
        assert ours[f"r@{k}"] == pytest.approx(column(f"R@{k}"), abs=1e-9)
        assert ours[f"ndcg@{k}"] == pytest.approx(column(f"nDCG@{k}"), abs=1e-9)
        # AP@k: trec_eval normalises by R, INQUIRE / ILIAS by min(R, k)
        trec_ap = column(f"AP@{k}")
        assert ours[f"ap@{k}"][n_rel <= k] == pytest.approx(trec_ap[n_rel <= k], abs=1e-9)
        scaled = trec_ap * n_rel / np.minimum(n_rel, k)
        assert ours[f"ap@{k}"] == pytest.approx(scaled, abs=1e-9)


# -- properties -----------------------------------------------------------------------------------
relevance_rows = st.lists(st.booleans(), min_size=1, max_size=30)


@given(st.integers(1, 30), st.integers(1, 40))
def test_perfect_ranking_scores_one(R, k):
    rel = np.zeros((1, max(R, k) + 3), dtype=bool)
    rel[0, :R] = True
    m = retrieval_metrics(rel, [R], (f"ap@{k}", f"ndcg@{k}", f"mrr@{k}", f"r@{k}", f"p@{k}"))
    assert m[f"ap@{k}"] == pytest.approx(1.0) and m[f"ndcg@{k}"] == pytest.approx(1.0)
    assert m[f"mrr@{k}"] == 1.0
    assert m[f"r@{k}"] == pytest.approx(min(R, k) / R)
    assert m[f"p@{k}"] == pytest.approx(min(R, k) / k)


@given(relevance_rows, st.integers(0, 5), st.integers(0, 10), st.integers(1, 40))
def test_metrics_invariant_to_padding(row, unseen, pad, k):
    rel = np.array([row])
    R = [int(rel.sum()) + unseen]
    names = [f"{kind}@{k}" for kind in ALL]
    plain = per_query_metrics(rel, R, names)
    padded = per_query_metrics(np.pad(rel, ((0, 0), (0, pad))), R, names)
    ids = np.where(rel, np.arange(len(row)), 1000 + np.arange(len(row)))
    ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    rel_ids, R_ids = relevance_matrix(ids, [np.r_[np.flatnonzero(rel), 5000 + np.arange(unseen)]])
    from_ids = per_query_metrics(rel_ids, R_ids, names)
    for name in names:
        assert padded[name] == pytest.approx(plain[name], abs=1e-12)
        assert from_ids[name] == pytest.approx(plain[name], abs=1e-12)


@given(relevance_rows, st.integers(0, 5), st.data())
def test_moving_a_relevant_item_up_never_hurts(row, unseen, data):
    rel = np.array(row)
    pairs = [
        (i, j) for i in range(len(row)) for j in range(i) if rel[i] and not rel[j]
    ]  # relevant at i, non-relevant above it at j
    if not pairs:
        return
    i, j = data.draw(st.sampled_from(pairs))
    better = rel.copy()
    better[[i, j]] = better[[j, i]]
    R = [int(rel.sum()) + unseen]
    before = per_query_metrics(rel[None], R, ("ap", "ndcg", "mrr"))
    after = per_query_metrics(better[None], R, ("ap", "ndcg", "mrr"))
    assert after["ap"][0] > before["ap"][0] and after["ndcg"][0] > before["ndcg"][0]
    assert after["mrr"][0] >= before["mrr"][0]


@given(relevance_rows, st.integers(1, 4), st.integers(0, 3), st.randoms(use_true_random=False))
def test_score_rules(row, levels, unseen, rnd):
    """sklearn rule: independent of the input order. order rule: the stable order as a ranking.
    Without ties both rules agree."""
    n = len(row)
    labels = np.array([row])
    scores = np.array([[rnd.randrange(levels) for _ in range(n)]], dtype=float)
    R = [int(labels.sum()) + unseen]
    names = ("ap", "ndcg@5", "ap@3")
    grouped = per_query_metrics(labels, R, names, scores=scores)
    perm = np.array(rnd.sample(range(n), n))
    shuffled = per_query_metrics(labels[:, perm], R, names, scores=scores[:, perm])
    assert shuffled["ap"] == pytest.approx(grouped["ap"]) and shuffled["ndcg@5"] == pytest.approx(
        grouped["ndcg@5"]
    )
    ordered = per_query_metrics(labels, R, names, scores=scores, ties="order")
    stable = labels[:, np.argsort(-scores[0], kind="stable")]
    plain = per_query_metrics(stable, R, names)
    assert all(ordered[name] == pytest.approx(plain[name]) for name in names)
    # tie-free scores with the same stable order: minus each item's place in it
    distinct = -np.argsort(np.argsort(-scores[0], kind="stable"))[None].astype(float)
    tie_free = per_query_metrics(labels, R, names, scores=distinct)
    assert all(tie_free[name] == pytest.approx(ordered[name]) for name in names)


@given(
    st.lists(st.lists(st.integers(-1, 12), min_size=0, max_size=15), min_size=1, max_size=6),
    st.data(),
)
def test_relevance_matrix_matches_brute_force(rows, data):
    width = max(len(r) for r in rows)
    ranked = np.array([r + [-1] * (width - len(r)) for r in rows], dtype=np.int64).reshape(
        len(rows), width
    )
    relevant = [data.draw(st.sets(st.integers(0, 15), max_size=8)) for _ in rows]
    one_each = np.array([data.draw(st.integers(-1, 13)) for _ in rows])  # the (Q,) form
    as_sets = [{int(i)} if i >= 0 else set() for i in one_each]
    for given_form, sets in ((relevant, relevant), (one_each, as_sets)):
        rel, R = relevance_matrix(ranked, given_form)
        for q, row in enumerate(ranked.tolist()):
            seen: set[int] = set()
            expected = []
            for item in row:
                expected.append(item in sets[q] and item not in seen)
                seen.add(item)
            assert rel[q].tolist() == expected and R[q] == len(sets[q])


# -- edges and input forms ------------------------------------------------------------------------
def test_no_relevant_items_give_zero():
    rel = np.zeros((2, 4), dtype=bool)
    m = per_query_metrics(rel, [0, 0], ("ap@4", "ndcg@4", "mrr", "p@2", "r@4"))
    assert all((v == 0).all() for v in m.values())
    assert ilias_ap(rel, [0, 0])[0].tolist() == [0.0, 0.0]
    # R > 0 but no hit
    assert per_query_metrics(rel, [3, 1], ("ap", "ndcg", "r"))["ap"].tolist() == [0.0, 0.0]


def test_k_larger_than_the_list():
    rel = np.array([[0, 1, 1]])
    m = retrieval_metrics(rel, [5], ("ap@10", "ndcg@10", "p@10", "r@10", "mrr@10"))
    assert m["ap@10"] == pytest.approx((1 / 2 + 2 / 3) / 5)
    ideal = sum(1 / np.log2(i + 2) for i in range(5))
    assert m["ndcg@10"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(4)) / ideal)
    assert m["p@10"] == pytest.approx(0.2) and m["r@10"] == pytest.approx(0.4)
    assert m["mrr@10"] == 0.5
    # k past the list only changes the normalisers
    assert average_precision(rel, [2], k=10)[0] == average_precision(rel, [2], k=3)[0]


def test_duplicate_ids_count_once():
    ranked = np.array([[7, 7, 7, 3], [3, -1, 3, 3]])
    rel, R = relevance_matrix(ranked, [[7, 7, 9], [3]])
    assert rel.astype(int).tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]] and R.tolist() == [2, 1]
    assert recall(rel, R).tolist() == [0.5, 1.0] and average_precision(rel, R).max() <= 1


def test_relevant_input_forms_agree():
    ranked = np.array([[5, 2, 9, -1], [1, 4, 8, 0], [3, 3, 3, 3]])
    sets = [{2, 9}, {4}, set()]
    padded = np.array([[2, 9], [4, -1], [-1, -1]])
    a = relevance_matrix(ranked, sets)
    b = relevance_matrix(ranked, padded)
    c = relevance_matrix(ranked, [np.array([9, 2]), [4], []])
    one = relevance_matrix(ranked, np.array([2, 4, -1]))  # one id (or none) per query
    for x, y in ((a, b), (a, c)):
        assert (x[0] == y[0]).all() and (x[1] == y[1]).all()
    assert one[0].astype(int).tolist() == [[0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert one[1].tolist() == [1, 1, 0]
    cut, R = relevance_matrix(ranked, sets, k=2)
    assert cut.shape == (3, 2) and R.tolist() == [2, 1, 0]  # R still counts every id


def test_relevance_matrix_with_huge_ids_and_many_queries():
    """Ids near 2^62 (no overflow in the packed keys) and a larger batch against a loop."""
    rng = np.random.default_rng(0)
    Q, k = 200, 300
    base = np.int64(2**62)
    ranked = base + rng.integers(0, 2000, (Q, k))
    relevant = [base + rng.choice(2000, rng.integers(0, 500), replace=False) for _ in range(Q)]
    rel, R = relevance_matrix(ranked, relevant)
    for q in range(0, Q, 7):
        seen: set[int] = set()
        row = []
        for item in ranked[q].tolist():
            row.append(item in set(relevant[q].tolist()) and item not in seen)
            seen.add(item)
        assert rel[q].tolist() == row
    assert R.tolist() == [len(r) for r in relevant]


def test_metric_names():
    assert parse_metric("AP@50") == ("ap", 50) and parse_metric("map@1000") == ("ap", 1000)
    assert parse_metric("nDCG@10") == ("ndcg", 10) and parse_metric("MRR") == ("mrr", None)
    assert parse_metric("precision@3") == ("p", 3) and parse_metric("recall@1") == ("r", 1)
    for bad in ("f1@10", "ap@0", "ap@", "ap@-1", "", "map@1k"):
        with pytest.raises(QuARIInputError, match="unknown metric"):
            parse_metric(bad)
    m = retrieval_metrics([[0, 1]], None, ("mAP", "recall@1", "mrr"))
    assert list(m) == ["mAP", "recall@1", "mrr"] and m["mAP"] == 0.5


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: average_precision([1, 0, 1], [2]), "matrix"),
        (lambda: average_precision([[1, 2, 0]], [2]), "0/1"),
        (lambda: average_precision([[1, 0, 1]], [1]), "query 0: n_relevant = 1"),
        (lambda: average_precision([[1, 0, 1]], [2, 3]), "one count per query"),
        (lambda: average_precision([[1, 0, 1]], [2.5]), "whole numbers"),
        (lambda: precision([[1, 0]], k=0), "positive integer"),
        (lambda: precision(np.zeros((1, 0))), "explicit k"),
        (lambda: per_query_metrics([[1, 0]], scores=[[0.1]]), "shape"),
        (lambda: per_query_metrics([[1, 0]], scores=[[np.nan, 1]]), "NaN"),
        (lambda: per_query_metrics([[1, 0]], ties="random"), "ties"),
        (lambda: retrieval_metrics(np.zeros((0, 3)), [], ("mrr",)), "no queries"),
        (lambda: relevance_matrix(np.array([[1.0, 2.0]]), [[1]]), "integer array"),
        (lambda: relevance_matrix(np.array([[1, -2]]), [[1]]), "≥ 0"),
        (lambda: relevance_matrix(np.array([[1, 2]]), [[1], [2]]), "2 id sets for 1"),
        (lambda: relevance_matrix(np.array([[1, 2]]), [[-3]]), "query 0: relevant ids"),
        (lambda: relevance_matrix(np.array([[1, 2]]), [["a"]]), "integers"),
        (lambda: relevance_matrix(np.array([[1, 2]]), np.array([[1], [2]])), "shape"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises(QuARIInputError, match=match):
        call()


def test_module_imports_only_numpy():
    """No torch, Lightning or scikit-learn at import: training, benchmarks and the CLI share it."""
    tree = ast.parse(Path(M.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "re", "collections", "typing", "numpy", "quari"}, imported
    assert "quari.errors" in {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    }
