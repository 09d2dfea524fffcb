"""The quality guard of the reduced-precision CPU runtimes (:mod:`quari.runtime`).

:func:`quality_guard` compares a runtime's gallery rankings with the fp32 eager pass — the
mean and worst top-k agreement and the largest score error — on a planted probe set
(:func:`probe_set`) whose near neighbours are ordered by small score differences, as real
galleries are. ``auto`` (:func:`quari.runtime_choice.choose_runtime`) admits a reduced-precision
runtime only at a top-10 agreement of at least :data:`REQUIRED_AGREEMENT`.

Example:
    >>> from quari import HyperNetConfig, QuARIModel
    >>> from quari.runtime import build_runtime
    >>> model = QuARIModel(HyperNetConfig(embedding_dim=32, rank=4, hidden_dim=16,
    ...                                   num_layers=1, num_heads=2)).eval()
    >>> queries, gallery = probe_set(32, queries=8, gallery=200)
    >>> quality_guard(model, build_runtime(model, "eager"), queries, gallery).top_k_agreement
    1.0
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from quari.errors import QuARIInputError
from quari.validation import as_embeddings, check_k

if TYPE_CHECKING:
    from quari.hypernet import QuARIModel
    from quari.runtime import Runtime

__all__ = ["REQUIRED_AGREEMENT", "GuardReport", "probe_set", "quality_guard"]

#: Top-10 agreement with the fp32 pass that a reduced-precision runtime needs before ``auto``
#: may choose it.
REQUIRED_AGREEMENT = 0.99


@dataclass(frozen=True)
class GuardReport:
    """How far a runtime's rankings are from the fp32 pass (:func:`quality_guard`).

    Attributes:
        runtime: The runtime's name.
        queries: Number of queries compared.
        gallery: Number of gallery items ranked per query.
        k: The cut-off.
        top_k_agreement: Mean over queries of |top-k(fp32) ∩ top-k(runtime)| / k.
        min_top_k_agreement: The worst query's overlap.
        max_score_error: Largest |score(runtime) − score(fp32)| over all pairs.
        passed: ``top_k_agreement`` ≥ the required agreement.
    """

    runtime: str
    queries: int
    gallery: int
    k: int
    top_k_agreement: float
    min_top_k_agreement: float
    max_score_error: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quality_guard(
    model: QuARIModel,
    runtime: Runtime,
    queries: Any,
    gallery: Any,
    *,
    k: int = 10,
    required: float = REQUIRED_AGREEMENT,
) -> GuardReport:
    """Compares a runtime's rankings with the fp32 eager pass on queries and a gallery.

    Both passes score the whole gallery exactly (:meth:`Adaptation.score`); the report holds
    the mean and worst top-k overlap and the largest score difference.

    Args:
        model: The model (its eager pass is the reference).
        runtime: The runtime to check (built for ``model``).
        queries: (B, E) query embeddings (normalised here).
        gallery: (N, E) gallery embeddings, N ≥ k.
        k: Cut-off of the agreement.
        required: Agreement needed for ``passed``.

    Returns:
        A :class:`GuardReport`.
    """
    E = model.embedding_dim
    q = as_embeddings(queries, E, "queries", normalize=True)
    d = as_embeddings(gallery, E, "gallery")
    k = check_k(k)
    if k > d.shape[0]:
        raise QuARIInputError(f"the gallery has {d.shape[0]} rows, fewer than k = {k}")
    with torch.inference_mode():
        want = model.to_adaptation(*model.predict_factors(q), queries=q).score(d)
        got = model.to_adaptation(*runtime(q), queries=q).score(d)
    top_want = torch.topk(want, k, dim=1).indices.numpy()
    top_got = torch.topk(got, k, dim=1).indices.numpy()
    overlap = np.array(
        [len(np.intersect1d(a, b)) / k for a, b in zip(top_want, top_got, strict=True)]
    )
    agreement = float(overlap.mean())
    return GuardReport(
        runtime=runtime.name,
        queries=q.shape[0],
        gallery=d.shape[0],
        k=k,
        top_k_agreement=agreement,
        min_top_k_agreement=float(overlap.min()),
        max_score_error=float((got - want).abs().max()),
        passed=agreement >= required,
    )


def probe_set(dim: int, *, queries: int = 64, gallery: int = 2000, seed: int = 0):
    """Planted caption queries and an image gallery of dimension ``dim`` (the guard's probe).

    Clusters of images whose identity lives in a cluster-specific subspace
    (:class:`quari.eval.synthetic.PlantedSpec`), so a gallery has near neighbours whose order
    depends on small score differences, as real galleries do.

    Returns:
        (queries (Q, dim), gallery (N, dim)) float32 unit rows.
    """
    from quari.eval.synthetic import PlantedSpec, planted_pairs

    cluster_dim = max(2, dim // 12)
    spec = PlantedSpec(
        dim=dim,
        clusters=max(2, gallery // 200),
        cluster_dim=cluster_dim,
        subspace_dim=max(1, min(32, (dim - cluster_dim) // 4)),
        seed=seed,
    )
    data = planted_pairs(spec, gallery, seed=seed + 1)
    return data.texts[:queries], data.images
