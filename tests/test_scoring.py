"""RunningTopK: the merged top-k does not depend on how the candidates were split or ordered."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from quari.scoring import RunningTopK


def oracle(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: sort by score (descending), then id (ascending); keep k."""
    out_ids, out_scores = [], []
    for s, i in zip(scores, ids, strict=True):
        order = np.lexsort((i, -s))[:k]
        out_ids.append(i[order])
        out_scores.append(s[order])
    return np.stack(out_ids), np.stack(out_scores)


@given(
    n=st.integers(1, 300),
    k=st.integers(1, 40),
    levels=st.integers(1, 6),
    cuts=st.lists(st.integers(0, 300), max_size=8),
    seed=st.integers(0, 2**31),
)
def test_ties_go_to_the_lower_id_whatever_the_blocks_and_their_order(n, k, levels, cuts, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, (3, n)).astype(np.float32)  # few levels: many ties
    ids = np.broadcast_to(rng.permutation(n * 2)[:n], (3, n)).copy()
    edges = sorted({0, n, *(c for c in cuts if c < n)})
    blocks = list(itertools.pairwise(edges))
    rng.shuffle(blocks)
    best = RunningTopK(3, k, torch.device("cpu"))
    given_scores, given_ids = [], []
    for a, b in blocks:
        # Each block arrives as its own top-k, as a scan block or a worker's result does;
        # torch.topk picks among tied scores arbitrarily, so the oracle ranks what was given.
        part = torch.topk(torch.from_numpy(scores[:, a:b]), min(k, b - a), dim=1)
        part_ids = torch.gather(torch.from_numpy(ids[:, a:b]), 1, part.indices)
        best.add(part.values, part_ids)
        given_scores.append(part.values.numpy())
        given_ids.append(part_ids.numpy())
    got = best.result()
    want_ids, want_scores = oracle(np.hstack(given_scores), np.hstack(given_ids), k)
    np.testing.assert_array_equal(got.scores.numpy(), want_scores)
    np.testing.assert_array_equal(got.ids.numpy(), want_ids)
