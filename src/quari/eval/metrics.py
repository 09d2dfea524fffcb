"""Exact retrieval metrics, vectorised over queries: AP@k, nDCG@k, MRR, precision@k, recall@k.

Every function takes a ranked 0/1 *relevance matrix* ``rel`` of shape (Q, n) (row q, column i:
is the item at rank i + 1 of query q relevant) and ``n_relevant`` R (Q,), the number of
relevant items the query has **in total** — in the whole gallery, not only in the list, so
positives a search missed still count against it. :func:`relevance_matrix` builds both from
ranked ids and per-query relevant-id sets; :func:`retrieval_metrics` /
:func:`per_query_metrics` compute a named set of metrics in one call. Items past the end of a
list (k larger than the list, or ``-1`` padding) are non-relevant.

Definitions (binary relevance; rel_i the relevance at rank i, hits@k = Σ_{i≤k} rel_i):

* **AP@k** = (1 / min(R, k)) · Σ_{i≤k} P@i · rel_i, with P@i = hits@i / i; 0 when R = 0 or
  there is no hit. The normaliser min(R, k) — not the number of hits, not R — is the estimator
  of INQUIRE (``src/metrics.py``, ``ap_at_k``: scikit-learn's ``average_precision_score`` of the
  top k rescaled by hits / min(R, k)) and of ILIAS mAP@1k (``evaluation/src/dataset.py``,
  ``_compute_AP`` with R = len(gt) and k = 1000). It penalises missed positives, so it is
  lower than the textbook "mean over the hits" AP@k whenever positives were missed.
* **nDCG@k** = Σ_{i≤k} rel_i / log2(i + 1)  ÷  Σ_{i≤min(R, k)} 1 / log2(i + 1). The ideal DCG
  counts the unseen positives (INQUIRE ``ndcg_at_k`` appends R − hits pseudo-positives scored
  −100 before calling scikit-learn's ``ndcg_score``); 0 when R = 0. INQUIRE always has k = the
  list length; past it, its pseudo-positives would count as found, here they stay unseen.
* **MRR** (reciprocal rank) = 1 / (rank of the first relevant item within the top k), 0 if none.
* **precision@k** = hits@k / k (a list shorter than k counts the missing places as misses).
* **recall@k** = hits@k / R (0 when R = 0). ILIAS's "oracle" is this at k = 1000.

Ties (score-based lists, :func:`per_query_metrics` with ``scores``): items are ordered by
descending score, tied items keep their list order (a stable sort). ``ties="sklearn"``
(the default, the INQUIRE and ILIAS protocols) scores AP and nDCG as scikit-learn does: a
group of tied scores is one threshold — every relevant item of the group gets the precision
at the *end* of the group (``average_precision_score``), and every item the *mean* discount of
the group's places (``ndcg_score`` with ``ignore_ties=False``). ``ties="order"`` scores the
stable order as a plain ranking. Labels [1, 0, 1, 0] with scores [.9, .9, .5, .1] give
AP 0.583333 with ``"sklearn"`` and 0.833333 with ``"order"``. MRR, precision and recall
always use the stable order (scikit-learn has no MRR; INQUIRE's ``np.argsort`` order among
ties is implementation-defined, and precision/recall at the list end do not depend on it).
With ``"sklearn"``, AP@k first cuts the stable order at k and groups ties inside the cut (as
INQUIRE and ILIAS cut ``y_true[:k]`` before calling scikit-learn); nDCG@k groups ties over the
whole list and cuts the discounts at k (as ``ndcg_score(k=k)`` does).

Scale: every metric is a fraction in [0, 1]. The INQUIRE and ILIAS papers print AP and nDCG
×100 (and MRR as a fraction); scaling is left to whoever prints a table.

Protocols:

* INQUIRE-Fullrank: ``rel`` is the top 50 by cosine, R = all positives of the query in iNat24,
  metrics ``("ap@50", "ndcg@50", "mrr", "p@50", "r@50")``; pass the 50 cosines as ``scores``
  to tie-group them as INQUIRE's scikit-learn calls do.
* INQUIRE-Rerank: ``rel`` = the 100 candidates' labels, ``scores`` = the model's scores,
  R = positives among the 100 (the default), metrics ``("ap", "ndcg", "mrr")`` over all 100.
* ILIAS: :func:`ilias_ap`, AP@1000 with R = len(gt) plus the oracle (recall@1000).

Example:
    >>> rel, R = relevance_matrix(np.array([[4, 7, 2, -1]]), [{2, 4, 9}])
    >>> rel.astype(int).tolist(), R.tolist()
    ([[1, 0, 1, 0]], [3])
    >>> {k: round(v, 6) for k, v in retrieval_metrics(rel, R, ("ap@4", "r@4", "mrr")).items()}
    {'ap@4': 0.555556, 'r@4': 0.666667, 'mrr': 1.0}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

from quari.errors import QuARIInputError

__all__ = [
    "Ties",
    "average_precision",
    "ilias_ap",
    "ndcg",
    "parse_metric",
    "per_query_metrics",
    "precision",
    "recall",
    "reciprocal_rank",
    "relevance_matrix",
    "retrieval_metrics",
]

Ties = Literal["sklearn", "order"]

_KINDS = {
    "ap": "ap",
    "map": "ap",
    "ndcg": "ndcg",
    "mrr": "mrr",
    "rr": "mrr",
    "p": "p",
    "precision": "p",
    "r": "r",
    "recall": "r",
}
_NAME = re.compile(r"^([a-z]+)(?:@(\d+))?$")


# -- input checks ---------------------------------------------------------------------------------
def _relevance(rel: np.ndarray) -> np.ndarray:
    rel = np.asarray(rel)
    if rel.ndim != 2:
        raise QuARIInputError(f"relevance must be a (queries, ranks) matrix, got shape {rel.shape}")
    if rel.dtype == bool:
        return rel
    if rel.dtype.kind not in "biuf" or not np.isin(rel, (0, 1)).all():
        raise QuARIInputError("relevance must hold only 0/1 (binary relevance)")
    return rel.astype(bool)


def _n_relevant(n_relevant: np.ndarray | Sequence[int] | None, rel: np.ndarray) -> np.ndarray:
    hits = rel.sum(1)
    if n_relevant is None:
        return hits.astype(np.int64)
    counts = np.asarray(n_relevant)
    if counts.shape != (rel.shape[0],):
        raise QuARIInputError(
            f"n_relevant must have one count per query ({rel.shape[0]}), got shape {counts.shape}"
        )
    if counts.dtype.kind not in "iu" and not (
        counts.dtype.kind == "f" and np.all(counts == np.round(counts))
    ):
        raise QuARIInputError(f"n_relevant must hold whole numbers, got dtype {counts.dtype}")
    counts = counts.astype(np.int64)
    bad = np.flatnonzero(counts < hits)
    if bad.size:
        q = int(bad[0])
        raise QuARIInputError(
            f"query {q}: n_relevant = {int(counts[q])} but its list holds {int(hits[q])} relevant "
            "items (n_relevant counts all relevant items of the query)"
        )
    return counts


def _cutoff(k: int | None, width: int) -> int:
    if k is None:
        if width == 0:
            raise QuARIInputError("the ranked lists are empty: give an explicit k")
        return width
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise QuARIInputError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _checked(
    relevance: np.ndarray, n_relevant: np.ndarray | Sequence[int] | None, k: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    rel = _relevance(relevance)
    return rel, _n_relevant(n_relevant, rel), _cutoff(k, rel.shape[1])


# -- the estimators -------------------------------------------------------------------------------
# Rank-based and tie-grouped metrics share one implementation: a plain ranking is the special
# case where every item is its own tie group (start = end = its own place).
def _singletons(rel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    places = np.broadcast_to(np.arange(rel.shape[1]), rel.shape)
    return places, places


def _tie_groups(sorted_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last place of the tie group of every place of descending-sorted scores."""
    Q, n = sorted_scores.shape
    places = np.arange(n)
    starts = np.ones((Q, n), dtype=bool)
    starts[:, 1:] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    ends = np.ones((Q, n), dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, places, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, places, n)[:, ::-1], axis=1)[:, ::-1]
    return first, last


def _ap(rel: np.ndarray, last: np.ndarray, R: np.ndarray, k: int) -> np.ndarray:
    """AP@k of lists already cut at k; ``last``: the end of each place's tie group."""
    hits = np.cumsum(rel, axis=1, dtype=np.float64)
    # precision at the end of each item's group: one threshold per group (sklearn's rule)
    precision_at = np.take_along_axis(hits, last, axis=1) / (last + 1)
    total = (precision_at * rel).sum(1)
    norm = np.minimum(R, k)
    return np.divide(total, norm, out=np.zeros(rel.shape[0]), where=norm > 0)


def _ideal_dcg(R: np.ndarray, k: int) -> np.ndarray:
    ideal = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))])
    return ideal[np.minimum(R, k)]


def _ndcg(
    rel: np.ndarray, first: np.ndarray, last: np.ndarray, R: np.ndarray, k: int
) -> np.ndarray:
    """nDCG@k; every item gets the mean discount of its tie group's places (cut at k)."""
    n = rel.shape[1]
    discount = np.zeros(n)
    m = min(n, k)
    discount[:m] = 1.0 / np.log2(np.arange(m) + 2.0)
    cum = np.concatenate([[0.0], np.cumsum(discount)])
    mean_discount = (cum[last + 1] - cum[first]) / (last - first + 1)
    dcg = (mean_discount * rel).sum(1)
    ideal = _ideal_dcg(R, k)
    return np.divide(dcg, ideal, out=np.zeros(rel.shape[0]), where=ideal > 0)


def average_precision(
    relevance: np.ndarray,
    n_relevant: np.ndarray | Sequence[int] | None = None,
    k: int | None = None,
) -> np.ndarray:
    """AP@k per query with the min(R, k) normaliser (the INQUIRE / ILIAS estimator).

    Args:
        relevance: (Q, n) ranked 0/1 relevance.
        n_relevant: (Q,) total relevant items per query (None: the relevant items in the list).
        k: Cut-off (None: the list width n).

    Returns:
        (Q,) float64 in [0, 1].

    Example:
        >>> average_precision(np.array([[1, 0, 1, 0, 0]]), [10], k=5).round(6).tolist()
        [0.333333]
    """
    rel, R, k = _checked(relevance, n_relevant, k)
    top = rel[:, :k]
    return _ap(top, _singletons(top)[1], R, k)


def ndcg(
    relevance: np.ndarray,
    n_relevant: np.ndarray | Sequence[int] | None = None,
    k: int | None = None,
) -> np.ndarray:
    """nDCG@k per query, binary gains, log2(i + 1) discounts, unseen positives in the ideal.

    Args:
        relevance: (Q, n) ranked 0/1 relevance.
        n_relevant: (Q,) total relevant items per query (None: the relevant items in the list).
        k: Cut-off (None: the list width n).

    Returns:
        (Q,) float64 in [0, 1].

    Example:
        >>> ndcg(np.array([[1, 0, 1, 0, 0]]), [3], k=5).round(6).tolist()
        [0.703918]
    """
    rel, R, k = _checked(relevance, n_relevant, k)
    return _ndcg(rel, *_singletons(rel), R, k)


def reciprocal_rank(relevance: np.ndarray, k: int | None = None) -> np.ndarray:
    """1 / rank of the first relevant item within the top k (0 if none); its mean is MRR.

    Args:
        relevance: (Q, n) ranked 0/1 relevance.
        k: Cut-off (None: the whole list).

    Returns:
        (Q,) float64 in [0, 1].

    Example:
        >>> reciprocal_rank(np.array([[0, 0, 1], [0, 0, 0]])).tolist()
        [0.3333333333333333, 0.0]
    """
    rel = _relevance(relevance)
    top = rel[:, : _cutoff(k, rel.shape[1])]
    found = top.any(1)
    first = top.argmax(1) if top.shape[1] else np.zeros(top.shape[0], dtype=np.int64)
    return np.where(found, 1.0 / (first + 1.0), 0.0)


def precision(relevance: np.ndarray, k: int | None = None) -> np.ndarray:
    """hits@k / k per query (places past the end of a short list count as misses).

    Args:
        relevance: (Q, n) ranked 0/1 relevance.
        k: Cut-off (None: the list width n).

    Returns:
        (Q,) float64 in [0, 1].

    Example:
        >>> precision(np.array([[1, 0, 1]]), k=4).tolist()
        [0.5]
    """
    rel = _relevance(relevance)
    k = _cutoff(k, rel.shape[1])
    return rel[:, :k].sum(1) / float(k)


def recall(
    relevance: np.ndarray,
    n_relevant: np.ndarray | Sequence[int] | None = None,
    k: int | None = None,
) -> np.ndarray:
    """hits@k / R per query (0 when R = 0); ILIAS calls it the oracle at k = 1000.

    Args:
        relevance: (Q, n) ranked 0/1 relevance.
        n_relevant: (Q,) total relevant items per query (None: the relevant items in the list).
        k: Cut-off (None: the list width n).

    Returns:
        (Q,) float64 in [0, 1].

    Example:
        >>> recall(np.array([[1, 0, 1]]), [4]).tolist()
        [0.5]
    """
    rel, R, k = _checked(relevance, n_relevant, k)
    hits = rel[:, :k].sum(1).astype(np.float64)
    return np.divide(hits, R, out=np.zeros(rel.shape[0]), where=R > 0)


# -- named metric sets ----------------------------------------------------------------------------
def parse_metric(name: str) -> tuple[str, int | None]:
    """Splits a metric name into its kind and cut-off.

    Names are ``kind`` or ``kind@k`` (case-insensitive): ``ap``/``map`` (AP@k, min(R, k)
    normaliser), ``ndcg``, ``mrr``/``rr``, ``p``/``precision``, ``r``/``recall``. Without
    ``@k`` the metric runs over the whole list.

    Args:
        name: e.g. ``"ap@50"``, ``"map@1000"``, ``"ndcg@50"``, ``"mrr"``, ``"r@10"``.

    Returns:
        (kind, k): kind ∈ {"ap", "ndcg", "mrr", "p", "r"}, k an int or None.

    Example:
        >>> parse_metric("mAP@1000"), parse_metric("recall@10"), parse_metric("mrr")
        (('ap', 1000), ('r', 10), ('mrr', None))
    """
    match = _NAME.match(name.strip().lower()) if isinstance(name, str) else None
    kind = _KINDS.get(match.group(1)) if match else None
    k = int(match.group(2)) if match and match.group(2) else None
    if kind is None or k == 0:
        raise QuARIInputError(
            f"unknown metric {name!r}: use ap@k, map@k, ndcg@k, mrr, mrr@k, p@k or r@k "
            "(k a positive integer; without @k the metric covers the whole list)"
        )
    return kind, k


def per_query_metrics(
    relevance: np.ndarray,
    n_relevant: np.ndarray | Sequence[int] | None = None,
    metrics: Iterable[str] = ("ap@50", "ndcg@50", "mrr", "p@10", "r@10"),
    *,
    scores: np.ndarray | None = None,
    ties: Ties = "sklearn",
) -> dict[str, np.ndarray]:
    """Named metrics of every query.

    Args:
        relevance: (Q, n) 0/1 relevance. Without ``scores``: in rank order (column 0 is rank 1).
            With ``scores``: in any order; the items are ranked by descending score.
        n_relevant: (Q,) total relevant items per query (None: the relevant items in the list,
            the INQUIRE-Rerank rule).
        metrics: Metric names (see :func:`parse_metric`); the result keeps them as given.
        scores: (Q, n) scores of the items of ``relevance`` (re-rank protocols), or None.
        ties: With ``scores``: ``"sklearn"`` (default; tied scores form one threshold, as
            scikit-learn and so INQUIRE and ILIAS score them) or ``"order"`` (ties kept in list
            order and scored as a plain ranking). See the module docstring.

    Returns:
        Metric name → (Q,) float64 in [0, 1].

    Example:
        >>> m = per_query_metrics([[1, 0, 1, 0]], None, ("ap", "mrr"), scores=[[.9, .9, .5, .1]])
        >>> {k: v.round(6).tolist() for k, v in m.items()}
        {'ap': [0.583333], 'mrr': [1.0]}
    """
    rel = _relevance(relevance)
    R = _n_relevant(n_relevant, rel)
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    parsed = [parse_metric(name) for name in names]
    if ties not in ("sklearn", "order"):
        raise QuARIInputError(f"ties must be 'sklearn' or 'order', got {ties!r}")
    sorted_scores = None
    if scores is not None:
        s = np.asarray(scores, dtype=np.float64)
        if s.shape != rel.shape:
            raise QuARIInputError(f"scores have shape {s.shape}, relevance has {rel.shape}")
        if np.isnan(s).any():
            raise QuARIInputError(f"scores hold NaN (query {int(np.isnan(s).any(1).argmax())})")
        order = np.argsort(-s, axis=1, kind="stable")
        rel = np.take_along_axis(rel, order, axis=1)
        sorted_scores = np.take_along_axis(s, order, axis=1)
    grouped = sorted_scores is not None and ties == "sklearn"
    out: dict[str, np.ndarray] = {}
    for name, (kind, k) in zip(names, parsed, strict=True):
        k = _cutoff(k, rel.shape[1])
        if kind == "ap":
            top = rel[:, :k]
            last = _tie_groups(sorted_scores[:, :k])[1] if grouped else _singletons(top)[1]
            out[name] = _ap(top, last, R, k)
        elif kind == "ndcg":
            groups = _tie_groups(sorted_scores) if grouped else _singletons(rel)
            out[name] = _ndcg(rel, *groups, R, k)
        elif kind == "mrr":
            out[name] = reciprocal_rank(rel, k)
        elif kind == "p":
            out[name] = precision(rel, k)
        else:
            out[name] = recall(rel, R, k)
    return out


def retrieval_metrics(
    relevance: np.ndarray,
    n_relevant: np.ndarray | Sequence[int] | None = None,
    metrics: Iterable[str] = ("ap@50", "ndcg@50", "mrr", "p@10", "r@10"),
    *,
    scores: np.ndarray | None = None,
    ties: Ties = "sklearn",
) -> dict[str, float]:
    """Means over queries of named metrics — what validation, benchmarks and ``quari eval`` call.

    Arguments as :func:`per_query_metrics` (which returns the per-query arrays). Values are
    fractions in [0, 1]; multiply AP and nDCG by 100 to print them as the papers do.

    Returns:
        Metric name → mean over the Q queries.

    Raises:
        QuARIInputError: No queries, or bad input (see :func:`per_query_metrics`).

    Example:
        >>> rel = np.array([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0]])
        >>> m = retrieval_metrics(rel, [3, 1], ("map@5", "ndcg@5", "mrr", "r@1"))
        >>> {k: round(v, 4) for k, v in m.items()}
        {'map@5': 0.5278, 'ndcg@5': 0.6674, 'mrr': 0.75, 'r@1': 0.1667}
    """
    per_query = per_query_metrics(relevance, n_relevant, metrics, scores=scores, ties=ties)
    if np.asarray(relevance).shape[0] == 0:
        raise QuARIInputError("no queries to average metrics over")
    return {name: float(values.mean()) for name, values in per_query.items()}


def ilias_ap(
    relevance: np.ndarray,
    n_relevant: np.ndarray | Sequence[int],
    *,
    k: int = 1000,
    scores: np.ndarray | None = None,
    ties: Ties = "sklearn",
) -> tuple[np.ndarray, np.ndarray]:
    """ILIAS's per-query AP@k and "oracle" (mAP@1k is the mean of the first).

    ILIAS ranks a query's scored database items by descending score, keeps the top k and
    rescales scikit-learn's AP of them by hits / min(k, len(gt)) — AP@k with R = len(gt). Its
    oracle is hits / len(gt) (recall@k; ILIAS computes mean(y_true) · k / len(gt), which is the
    same whenever the list holds at least k items).

    Args:
        relevance: (Q, n) 0/1 relevance (rank order, or any order with ``scores``).
        n_relevant: (Q,) len(gt), the positives of each query's instance.
        k: Cut-off (ILIAS: 1000).
        scores: (Q, n) similarities, when the list is to be ranked by them.
        ties: Tie rule with ``scores`` (ILIAS uses scikit-learn's: ``"sklearn"``).

    Returns:
        (ap, oracle): two (Q,) float64 arrays in [0, 1] (ILIAS prints their means ×100).

    Example:
        >>> rel = np.zeros((1, 1000), dtype=bool); rel[0, [1, 9]] = True
        >>> [a.round(6).tolist() for a in ilias_ap(rel, [4])]
        [[0.175], [0.5]]
    """
    names = (f"ap@{k}", f"r@{k}")
    m = per_query_metrics(relevance, n_relevant, names, scores=scores, ties=ties)
    return m[names[0]], m[names[1]]


# -- ranked ids → relevance ------------------------------------------------------------------------
def _id_sets(relevant: np.ndarray | Sequence[Iterable[int]], Q: int) -> list[np.ndarray]:
    """Each query's relevant ids as a 1-D int64 array (may hold repeats and -1 padding)."""
    if isinstance(relevant, np.ndarray) and relevant.ndim == 2 and relevant.dtype.kind in "iu":
        if relevant.shape[0] != Q:
            raise QuARIInputError(f"relevant has shape {relevant.shape}; expected ({Q}, m) ids")
        return list(relevant.astype(np.int64, copy=False))
    if len(relevant) != Q:
        raise QuARIInputError(f"relevant holds {len(relevant)} id sets for {Q} queries")
    sets = []
    for q, x in enumerate(relevant):
        ids = (
            np.fromiter(x, dtype=np.int64, count=len(x))
            if isinstance(x, (set, frozenset))
            else np.asarray(x).ravel()
        )
        if ids.size and ids.dtype.kind not in "iu":
            raise QuARIInputError(f"relevant ids of query {q} must be integers ({ids.dtype})")
        sets.append(ids.astype(np.int64, copy=False))
    return sets


def _first_only(ranked: np.ndarray, rel: np.ndarray) -> None:
    """Clears repeats: a row's relevant id counts only at its first place (in place)."""
    in_order = np.sort(ranked, axis=1)
    repeats = ((in_order[:, 1:] == in_order[:, :-1]) & (in_order[:, 1:] >= 0)).any(1)
    for q in np.flatnonzero(repeats):  # rare: search results do not repeat ids
        places = np.flatnonzero(rel[q])
        _, first = np.unique(ranked[q, places], return_index=True)
        rel[q, places] = False
        rel[q, places[first]] = True


def relevance_matrix(
    ranked: np.ndarray,
    relevant: np.ndarray | Sequence[Iterable[int]],
    *,
    k: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ranked 0/1 relevance and R of result lists, from ids.

    An id is relevant to query q if it is in q's relevant set. ``-1`` in ``ranked`` is padding
    (never relevant). A relevant id listed twice in one row counts once, at its first place
    (the repeat is a miss), so AP and recall cannot exceed 1. R counts distinct relevant ids.
    A (Q,) array of one id per query is matched in one vectorised step; id sets take one small
    sort and binary search per query (no loop over ranks).

    Args:
        ranked: (Q, n) integer ids, best first; ``-1`` pads short lists.
        relevant: Each query's relevant ids: a sequence of Q collections (set, list, array), a
            (Q, m) integer array padded with ``-1``, or a (Q,) integer array of one id each
            (``-1``: none).
        k: Keep only the first k columns (R still counts every relevant id).

    Returns:
        (rel, n_relevant): (Q, min(n, k)) bool and (Q,) int64.

    Example:
        >>> rel, R = relevance_matrix(np.array([[3, 3, 5], [1, -1, -1]]), np.array([3, 2]))
        >>> rel.astype(int).tolist(), R.tolist()
        ([[1, 0, 0], [0, 0, 0]], [1, 1])
    """
    ranked = np.asarray(ranked)
    if ranked.ndim != 2 or (ranked.size and ranked.dtype.kind not in "iu"):
        raise QuARIInputError(
            f"ranked must be a (queries, ranks) integer array, got {ranked.dtype} {ranked.shape}"
        )
    if ranked.size and ranked.min() < -1:
        raise QuARIInputError("ranked ids must be ≥ 0 (-1 = padding)")
    if k is not None:
        ranked = ranked[:, : _cutoff(k, ranked.shape[1])]
    Q = ranked.shape[0]
    if isinstance(relevant, np.ndarray) and relevant.ndim == 1 and relevant.dtype.kind in "iu":
        if relevant.shape != (Q,):
            raise QuARIInputError(f"relevant has shape {relevant.shape}; expected ({Q},) ids")
        if relevant.size and relevant.min() < -1:
            q = int(relevant.argmin())
            raise QuARIInputError(f"query {q}: relevant ids must be ≥ 0 (-1 = padding)")
        target = relevant.astype(np.int64)[:, None]
        rel = (ranked == target) & (target >= 0)
        rel &= np.cumsum(rel, axis=1) == 1  # a repeated id counts at its first place only
        return rel, (relevant >= 0).astype(np.int64)
    sets = _id_sets(relevant, Q)
    rel = np.zeros(ranked.shape, dtype=bool)
    n_relevant = np.zeros(Q, dtype=np.int64)
    for q, ids in enumerate(sets):
        if ids.size == 0:
            continue
        ids = np.sort(ids)
        if ids[0] < -1:
            raise QuARIInputError(f"query {q}: relevant ids must be ≥ 0 (-1 = padding)")
        ids = ids[np.r_[True, ids[1:] != ids[:-1]] & (ids >= 0)]  # distinct, no padding
        n_relevant[q] = ids.size
        if ids.size:
            at = np.minimum(np.searchsorted(ids, ranked[q]), ids.size - 1)
            rel[q] = ids[at] == ranked[q]
    if ranked.shape[1] > 1:
        _first_only(ranked, rel)
    return rel, n_relevant
