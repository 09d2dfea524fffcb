"""The QuARI training loss (docs/method.md §5.4, Eqs. 9–10, §6 A3) and the query noise (§5.2).

For a batch of B (query, image) pairs, query i is compared with every in-batch image *in its own
adapted space*: S_{i,j} = cos(q′_i, T_i d_j) / τ. Scores come from the factored
:meth:`quari.Adaptation.score` (Gram form while training) — the E×E matrices are never formed.

* query → image: softmax over [all in-batch images ; query i's semi-positives], both scored by
  T_i; targets α = 1 on its own image, w_{i,p} on its semi-positives (A3 — appended columns,
  as the reference code), not renormalised unless ``normalize_targets``.
* image → query: for image j, softmax over the queries k of S_{k,j} (each query's own adapted
  score of image j), target j. Semi-positives do not enter this term.
* L = (Σ_i CE_q→i + Σ_j CE_i→q) / (2B).

Columns holding *the same image* as the positive (another caption of it in the batch, same
``groups`` id) are masked out of both softmaxes instead of being treated as negatives.

Across ranks (DDP) the in-batch images are gathered from every rank (no gradient: they are
frozen backbone embeddings), so each query sees world·B in-batch images; the image→query term
needs every query's score of a local image, so the (B, world·B) score matrices are gathered
*with* gradient (``gather``). Each rank's loss is the mean over its own queries and images;
DDP's gradient averaging then yields exactly the gradient of the single-process loss over the
global batch (tested in ``tests/test_training.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quari.adaptation import Adaptation
from quari.validation import QuARIInputError

__all__ = ["LossOutput", "add_query_noise", "quari_loss"]

# Stands in for −∞ in masked logits: exp underflows to exactly 0, and unlike −∞ it never
# produces 0·∞ = NaN where a zero target meets a masked column.
_MASKED = -1e9


@dataclass
class LossOutput:
    """The loss and its parts for one rank's batch.

    Attributes:
        loss: Scalar to minimise: (Σ CE_q→i + Σ CE_i→q) / (2B) over this rank's queries/images.
        query_to_image: Mean query→image cross-entropy (detached).
        image_to_query: Mean image→query cross-entropy (detached).
        logits: (B, N + P) query→image logits (N in-batch images, then P semi-positives).
        accuracy: Share of queries whose own image has the top in-batch logit (detached).
    """

    loss: torch.Tensor
    query_to_image: torch.Tensor
    image_to_query: torch.Tensor
    logits: torch.Tensor
    accuracy: torch.Tensor

    @property
    def width(self) -> int:
        """Candidates in each query's softmax (in-batch images + semi-positives)."""
        return int(self.logits.shape[1])


def add_query_noise(
    queries: torch.Tensor,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    relative: bool = False,
) -> torch.Tensor:
    """LinCIR query noise: q + scale · s · ε, s ~ U[0, 1] per sample, ε ~ N(0, I) per dimension.

    Applied to unit query embeddings during training only, and not re-normalised (docs/method.md
    §5.2); feed the result to the model with ``normalize=False``. The paper's noise has norm
    ≈ scale·s·√E — 28·s at E = 768, so for most draws the query direction is mostly noise;
    ``relative=True`` divides ε by √E, so that ‖noise‖ ≈ scale·s against the unit query at any
    embedding size.

    Args:
        queries: (B, E) unit query embeddings.
        scale: Multiplies the noise (1.0 = the paper; 0 = no noise).
        generator: Random source (default: torch's global generator).
        relative: Scale ε by 1/√E (noise relative to the unit query).

    Returns:
        (B, E) noised queries.

    Example:
        >>> q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
        >>> add_query_noise(q, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([4, 8])
    """
    if scale == 0:
        return queries
    B, E = queries.shape
    s = torch.rand(B, 1, generator=generator, device=queries.device, dtype=queries.dtype)
    eps = torch.randn(B, E, generator=generator, device=queries.device, dtype=queries.dtype)
    if relative:
        scale = scale / math.sqrt(E)
    return queries + scale * s * eps


def quari_loss(
    adaptation: Adaptation,
    images: torch.Tensor,
    *,
    semipos: torch.Tensor | None = None,
    semipos_weights: torch.Tensor | None = None,
    semipos_valid: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    false_negatives: torch.Tensor | None = None,
    offset: int = 0,
    temperature: float = 0.07,
    normalize_targets: bool = False,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LossOutput:
    """Symmetric contrastive loss with per-query adapted scoring and soft semi-positives.

    Args:
        adaptation: The B local queries' adapted spaces (from the hypernetwork, with grad).
        images: (N, E) every in-batch image, N = world·B, in rank order; query i's own image
            is row ``offset + i``.
        semipos: (B, P, E) each query's semi-positive images (P = 2 in the paper), or None.
        semipos_weights: (B, P) their soft targets w (entries of the mining softmax).
        semipos_valid: (B, P) bool; False drops a semi-positive (padding, or an image held
            out for validation). Default: all valid.
        groups: (N,) image identities; columns whose id equals the positive's are masked
            (other captions of the same image). Default: every column a distinct image.
        false_negatives: (B, N) bool; True masks image j out of query i's softmax and query
            i out of image j's (likely relevant, e.g. described by a near-identical caption).
            The positive itself is never masked.
        offset: Row of this rank's first query's image in ``images`` (rank · B).
        temperature: τ (paper: 0.07).
        normalize_targets: Divide each query→image target row by its sum (1 + Σw); the
            reference code does not.
        gather: Concatenates a (B, …) tensor from every rank along dim 0 *with* gradient
            (needed under DDP for the image→query term); None for one process.

    Returns:
        A :class:`LossOutput`.

    Raises:
        QuARIInputError: inconsistent shapes.

    Example:
        >>> ad = Adaptation.random(4, 16, 2, seed=1)
        >>> ad = Adaptation(ad.refined_query, ad.U.requires_grad_(), ad.V)
        >>> out = quari_loss(ad, torch.randn(4, 16))
        >>> out.loss.backward(); out.width
        4
    """
    B = len(adaptation)
    N = images.shape[0]
    if images.ndim != 2 or not 0 <= offset <= N - B:
        raise QuARIInputError(
            f"images must be (N, E) with the batch's own images at rows {offset} … "
            f"{offset + B - 1}; got shape {tuple(images.shape)}"
        )
    device = images.device
    local = torch.arange(B, device=device) + offset
    # Scores and softmaxes in fp32 even under bf16 autocast: the logits are differences of
    # cosines scaled by 1/τ ≈ 14, where bf16's 8-bit mantissa would dominate the gradient.
    with torch.autocast(device.type, enabled=False):
        images = images.float()
        image_scores = adaptation.score(images)  # (B, N), query i's space for every image
        columns = [image_scores]
        weights = None
        if semipos is not None:
            if semipos_weights is None or semipos.shape[:2] != semipos_weights.shape:
                raise QuARIInputError(
                    "semipos (B, P, E) needs semipos_weights (B, P); got "
                    f"{tuple(semipos.shape)} and "
                    f"{None if semipos_weights is None else tuple(semipos_weights.shape)}"
                )
            columns.append(adaptation.score(semipos.float()))  # (B, P), each in its own space
            weights = semipos_weights.float()
        logits = torch.cat(columns, dim=1) / temperature

        col = torch.arange(logits.shape[1], device=device)
        masked = torch.zeros_like(logits, dtype=torch.bool)
        same_image = None
        if groups is not None or false_negatives is not None:
            same_image = torch.zeros(B, N, dtype=torch.bool, device=device)
            if groups is not None:
                same_image |= groups[local][:, None] == groups[None, :]
            if false_negatives is not None:
                if false_negatives.shape != (B, N):
                    raise QuARIInputError(
                        f"false_negatives must be (B, N) = ({B}, {N}), got "
                        f"{tuple(false_negatives.shape)}"
                    )
                same_image |= false_negatives.to(device=device, dtype=torch.bool)
            same_image &= local[:, None] != torch.arange(N, device=device)[None, :]
            masked[:, :N] = same_image
        targets = (col[None, :] == local[:, None]).float()
        if weights is not None:
            valid = (
                torch.ones_like(weights, dtype=torch.bool)
                if semipos_valid is None
                else semipos_valid.bool()
            )
            masked[:, N:] = ~valid
            targets[:, N:] = torch.where(valid, weights, 0.0)
        if normalize_targets:
            targets = targets / targets.sum(dim=1, keepdim=True)
        logits = logits.masked_fill(masked, _MASKED)
        q2i = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)  # (B,)

        # image → query: column j of the full (queries × images) score matrix.
        all_scores = image_scores if gather is None else gather(image_scores)  # (N, N)
        if all_scores.shape != (N, N):
            raise QuARIInputError(
                f"image→query needs the scores of all {N} queries; gathered "
                f"{tuple(all_scores.shape)} (is every rank's batch the same size?)"
            )
        by_image = all_scores[:, local].T / temperature  # (B local images, N queries)
        if same_image is not None:
            by_image = by_image.masked_fill(same_image, _MASKED)  # symmetric in (image, query)
        i2q = F.cross_entropy(by_image, local, reduction="none")  # (B,)

        loss = (q2i.sum() + i2q.sum()) / (2 * B)
        accuracy = (logits[:, :N].argmax(dim=1) == local).float().mean()
    return LossOutput(loss, q2i.detach().mean(), i2q.detach().mean(), logits, accuracy.detach())
