"""Queries and relevance judgements of the two tracks, from metadata alone (no pixels, no
models): what to ask and which gallery rows answer it.

* text→image: a query is a class and 1-3 attribute levels; the relevant rows are exactly
  the gallery images of that class whose every stated attribute has that level.
  :func:`text_queries` enumerates every such description, keeps those with at least one
  relevant image and fewer than all images of the class (else the attributes would add
  nothing), and samples as many as asked, equally many per attribute count.
* image→image: :func:`instance_plan` picks query items; each gets a held-out query view and
  ``positives`` gallery views; every other item of the split gets one gallery view (a
  distractor). The relevant rows of a query are the gallery views of its own item.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from quari.errors import QuARIInputError
from quari.eval.tracks.attributes import ATTRIBUTES

__all__ = ["InstancePlan", "TextQuery", "instance_plan", "text_queries"]


@dataclass(frozen=True)
class TextQuery:
    """One fine-grained description and its answers.

    Attributes:
        label: Class id.
        attributes: (name, level) pairs, in the order they are said.
        relevant: Ascending gallery row ids that match the class and every attribute.
    """

    label: int
    attributes: tuple[tuple[str, int], ...]
    relevant: np.ndarray


def text_queries(
    labels: np.ndarray,
    levels: Mapping[str, np.ndarray],
    count: int,
    rng: np.random.Generator,
    *,
    max_attributes: int = 3,
) -> list[TextQuery]:
    """Samples ``count`` distinct descriptions with their exact relevance over a gallery.

    Args:
        labels: (N,) class id of each gallery row.
        levels: Attribute name → (N,) level of each gallery row.
        count: Queries wanted (fewer come back if fewer qualify).
        rng: Random source (sampling and the order attributes are said in).
        max_attributes: Most attributes in one description (at least one).

    Returns:
        Queries, grouped by attribute count (1, 2, 3 …), each group in sampled order.

    Example:
        >>> qs = text_queries(labels, levels, 100, np.random.default_rng(0))  # doctest: +SKIP
        >>> qs[0].attributes, qs[0].relevant[:3]  # doctest: +SKIP
        ((('tone', 2),), array([ 4, 17, 31]))
    """
    labels = np.asarray(labels)
    names = [a.name for a in ATTRIBUTES]
    sizes = {a.name: len(a.values) for a in ATTRIBUTES}
    missing = set(names) - set(levels)
    if missing:
        raise QuARIInputError(f"text_queries: no levels for {sorted(missing)}")
    if not 1 <= max_attributes <= len(names):
        raise QuARIInputError(f"max_attributes must be 1 … {len(names)}, got {max_attributes}")
    by_k: dict[int, list[tuple[int, tuple[tuple[str, int], ...], np.ndarray]]] = {}
    for c in np.unique(labels):
        in_class = labels == c
        n_class = int(in_class.sum())
        for k in range(1, max_attributes + 1):
            for subset in itertools.combinations(names, k):
                for values in itertools.product(*(range(sizes[n]) for n in subset)):
                    hit = in_class.copy()
                    for name, v in zip(subset, values, strict=True):
                        hit &= np.asarray(levels[name]) == v
                    rows = np.flatnonzero(hit)
                    if 0 < rows.size < n_class:
                        pairs = tuple(zip(subset, values, strict=True))
                        by_k.setdefault(k, []).append((int(c), pairs, rows))
    ks = sorted(by_k)
    if not ks:
        return []
    # equal shares per attribute count; a count with too few descriptions passes its share on
    quota, left = {}, count
    for i, k in enumerate(sorted(ks, key=lambda k: len(by_k[k]))):
        quota[k] = min(len(by_k[k]), left // (len(ks) - i))
        left -= quota[k]
    out = []
    for k in ks:
        pool = by_k[k]
        for j in rng.permutation(len(pool))[: quota[k]]:
            c, pairs, rows = pool[int(j)]
            order = rng.permutation(len(pairs))  # say the attributes in varied order
            out.append(TextQuery(c, tuple(pairs[int(i)] for i in order), rows))
    return out


@dataclass(frozen=True)
class InstancePlan:
    """The image→image gallery and queries of one split.

    Attributes:
        gallery_items: (G,) item of each gallery row (indices into the split's items).
        gallery_views: (G,) view number of each gallery row (1 … positives).
        query_items: (Q,) item of each query; its query view is view 0, never in the gallery.
        relevant: Per query, the ascending gallery rows of its item's other views.
    """

    gallery_items: np.ndarray
    gallery_views: np.ndarray
    query_items: np.ndarray
    relevant: list[np.ndarray]


def instance_plan(
    items: np.ndarray, queries: int, rng: np.random.Generator, *, positives: int = 3
) -> InstancePlan:
    """Chooses query items and lays out the gallery of views (rows in random order).

    Args:
        items: The split's item ids.
        queries: How many items become queries (at most all).
        rng: Random source.
        positives: Gallery views per query item.

    Returns:
        The :class:`InstancePlan`.
    """
    items = np.asarray(items, dtype=np.int64)
    if positives < 1:
        raise QuARIInputError(f"positives must be at least 1, got {positives}")
    if not 0 < queries <= items.size:
        raise QuARIInputError(f"queries must be 1 … {items.size}, got {queries}")
    chosen = np.sort(rng.choice(items, size=queries, replace=False))
    others = np.setdiff1d(items, chosen)
    g_items = np.concatenate([np.repeat(chosen, positives), others])
    g_views = np.concatenate([np.tile(np.arange(1, positives + 1), chosen.size),
                              np.ones(others.size, np.int64)])  # fmt: skip
    order = rng.permutation(g_items.size)
    g_items, g_views = g_items[order], g_views[order]
    sorter = np.argsort(g_items, kind="stable")
    relevant = []
    for item in chosen:
        lo, hi = np.searchsorted(g_items[sorter], [item, item + 1])
        relevant.append(np.sort(sorter[lo:hi]))
    return InstancePlan(g_items, g_views, chosen, relevant)
