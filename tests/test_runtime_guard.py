"""The reduced-precision runtimes' quality guard (quari.runtime_guard)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quari import QuARIInputError
from quari.checkpoint import load_reference
from quari.runtime import Runtime
from quari.runtime_guard import REQUIRED_AGREEMENT, probe_set, quality_guard

from helpers import FIXTURE, ShuffledRuntime, top10_agreement


@pytest.fixture(scope="module")
def fixture_model():
    return load_reference(FIXTURE)


def test_quality_guard_measures_agreement_and_score_error(fixture_model):
    queries, gallery = probe_set(48, queries=16, gallery=300)
    same = quality_guard(fixture_model, Runtime(fixture_model), queries, gallery)
    assert (same.top_k_agreement, same.max_score_error, same.passed) == (1.0, 0.0, True)
    bad = quality_guard(fixture_model, ShuffledRuntime(fixture_model), queries, gallery)
    # Oracle: the overlaps and errors computed here from the two passes' scores.
    q = torch.nn.functional.normalize(torch.from_numpy(queries), dim=-1)
    with torch.inference_mode():
        want = fixture_model.to_adaptation(*fixture_model.predict_factors(q))
        want = want.score(gallery).numpy()
    with torch.inference_mode():
        got = fixture_model.to_adaptation(*ShuffledRuntime(fixture_model)(q)).score(gallery).numpy()
    assert bad.top_k_agreement == pytest.approx(top10_agreement(want, got))
    assert bad.max_score_error == pytest.approx(np.abs(got - want).max(), rel=1e-6)
    assert bad.top_k_agreement < REQUIRED_AGREEMENT and not bad.passed
    with pytest.raises(QuARIInputError, match="fewer than k = 10"):
        quality_guard(fixture_model, Runtime(fixture_model), queries, gallery[:5])


def test_probe_set_is_unit_rows_of_the_asked_sizes_and_repeats_by_seed():
    queries, gallery = probe_set(40, queries=12, gallery=250)
    assert queries.shape == (12, 40) and gallery.shape == (250, 40)
    for rows in (queries, gallery):
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    again, _ = probe_set(40, queries=12, gallery=250)
    other, _ = probe_set(40, queries=12, gallery=250, seed=1)
    assert np.array_equal(queries, again) and not np.array_equal(queries, other)
