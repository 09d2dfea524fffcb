"""Shrinkage whitening of an embedding space, fitted on a collection's own vectors.

A frozen backbone's embeddings are rarely isotropic: a few directions carry most of the variance
and the fine detail that tells two near-duplicate items apart lives in the weak ones, which
cosine similarity all but ignores. Whitening rescales every principal direction of the data's
second-moment matrix C = E[x xᵀ] to the same variance, so cosine similarity after it weighs
them alike; shrinkage keeps the weakest directions (mostly noise) from being blown up:

    W = P (Λ + s·λ_max I)^(−1/2) Pᵀ,    C = P Λ Pᵀ,

the symmetric ("ZCA") form, scaled so that its largest singular value is 1 (cosine similarity
does not see W's scale). No labels are needed: the matrix is fitted on the training set's image
and caption embeddings together, the space both kinds of query live in.

Whitening on its own is a strong static adaptation for instance-level (image→image) search;
:class:`~quari.adaptation.StaticBlend` mixes its cosine into a QuARI model's score
(``docs/results.md``, quality section).

Example:
    >>> import torch
    >>> x = torch.randn(1000, 8) * torch.tensor([10.0, 5, 1, 1, 1, 1, 1, 0.1])
    >>> x = x / x.norm(dim=1, keepdim=True)  # the rows it fits on are unit-norm
    >>> W = fit_whitening(x, shrinkage=0.0)
    >>> cov = (x @ W.T).T @ (x @ W.T) / len(x)
    >>> bool(torch.allclose(cov / cov[0, 0], torch.eye(8), atol=1e-4))
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from quari.errors import QuARIInputError
from quari.validation import as_embeddings

__all__ = ["DEFAULT_SHRINKAGE", "fit_whitening", "set_rows"]

#: s of the formula above: on the Fashion-MNIST tracks' validation splits 0.01 lifts
#: image→image by 11–40 % and keeps text→image at or above plain cosine; smaller values buy
#: more image→image with text→image (docs/results.md, "Whitening and the static blend").
DEFAULT_SHRINKAGE = 0.01


def set_rows(sets: Sequence[Any]) -> np.ndarray:
    """Every image and caption row of some :class:`~quari.store.EmbeddingSet` s, stacked —
    what ``quari train --adapter whitening`` fits on.

    Args:
        sets: Open embedding sets with caption (``text``) vectors.

    Returns:
        (2·rows, E) array in the sets' stored dtype.
    """
    return np.concatenate(
        [s.gather(range(s.rows), kind) for s in sets for kind in ("image", "text")]
    )


def fit_whitening(vectors: Any, shrinkage: float = DEFAULT_SHRINKAGE) -> torch.Tensor:
    """The shrinkage-whitening matrix W (E, E) of some embeddings (module docstring).

    Args:
        vectors: (N, E) embeddings (numpy or torch, any float dtype); rows are L2-normalised
            first, as everything quari scores is.
        shrinkage: s ≥ 0, added to the eigenvalues as a fraction of the largest.

    Returns:
        The symmetric (E, E) float32 matrix W; transformed rows are W @ x.

    Raises:
        QuARIInputError: no rows, NaN/Inf, a negative shrinkage, or (at s = 0) a space the
            rows do not span.
    """
    if not shrinkage >= 0:
        raise QuARIInputError(f"shrinkage must be ≥ 0, got {shrinkage}")
    dim = int(np.shape(vectors)[-1]) if np.ndim(vectors) else 0
    x = as_embeddings(vectors, dim, "whitening rows", normalize=True, dtype=torch.float64)
    second = (x.T @ x / x.shape[0]).numpy()
    lam, P = np.linalg.eigh(second)  # fp64: the weak directions are many orders below λ_max
    lam = np.clip(lam, 0.0, None) + shrinkage * lam.max()
    if lam.min() <= 0:
        raise QuARIInputError(
            f"whitening rows: {x.shape[0]} rows do not span the {x.shape[1]}-d space; use a "
            "shrinkage above 0"
        )
    scale = 1.0 / np.sqrt(lam)
    W = (P * (scale / scale.max())) @ P.T
    return torch.from_numpy(W).float()
