"""Shrinkage whitening: the matrix against its defining properties, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quari.errors import QuARIInputError
from quari.whitening import fit_whitening


def _rows(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.array([20.0, 8, 3, 1, 1, 0.5, 0.2, 0.05])  # a strongly anisotropic space
    x = rng.standard_normal((n, 8)) * scales + 0.3  # and an off-centre mean
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_without_shrinkage_the_second_moment_becomes_isotropic():
    x = _rows()
    W = fit_whitening(x, shrinkage=0.0).double().numpy()
    y = x @ W.T
    second = y.T @ y / len(y)
    np.testing.assert_allclose(second / second[0, 0], np.eye(8), atol=1e-6)
    np.testing.assert_allclose(W, W.T, atol=1e-6)  # the symmetric (ZCA) form
    assert np.linalg.norm(W, 2) == pytest.approx(1.0, abs=1e-5)  # scaled to spectral norm 1


def test_shrinkage_interpolates_towards_the_identity():
    """Eigenvalues of W are (λ + s·λ_max)^−½ up to scale: s → ∞ gives I, and the
    condition number falls as s grows."""
    x = _rows()
    lam, P = np.linalg.eigh(x.T @ x / len(x))
    for s in (0.01, 0.3):
        W = fit_whitening(x, shrinkage=s).double().numpy()
        want = (P * (1 / np.sqrt(lam + s * lam.max()))) @ P.T
        np.testing.assert_allclose(W, want / np.linalg.norm(want, 2), atol=1e-6)
    conds = [np.linalg.cond(fit_whitening(x, shrinkage=s).numpy()) for s in (0.0, 0.01, 1.0)]
    assert conds[0] > conds[1] > conds[2]
    big = fit_whitening(x, shrinkage=1e6).numpy()
    np.testing.assert_allclose(big, np.eye(8), atol=1e-5)


def test_rows_are_normalised_first():
    x = _rows(300)
    scales = np.random.default_rng(1).uniform(0.1, 10, (300, 1))
    torch.testing.assert_close(fit_whitening(x * scales), fit_whitening(x), atol=1e-6, rtol=0)


def test_bad_input_is_named():
    with pytest.raises(QuARIInputError, match="shrinkage must be ≥ 0"):
        fit_whitening(_rows(10), shrinkage=-0.1)
    bad = _rows(10)
    bad[4, 2] = np.nan
    with pytest.raises(QuARIInputError, match=r"whitening rows: row \[4\] contains NaN"):
        fit_whitening(bad)
    with pytest.raises(QuARIInputError, match="empty"):
        fit_whitening(np.zeros((0, 8)))
    with pytest.raises(QuARIInputError, match="3 rows do not span the 8-d space"):
        fit_whitening(_rows(3), shrinkage=0.0)
