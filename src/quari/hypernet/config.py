"""The hypernetwork's configuration: :class:`HyperNetConfig`, its per-variant defaults and the
size ceilings that stop a hostile or mistyped config before it allocates."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from quari.errors import LimitError, QuARIInputError
from quari.validation import check_fields

__all__ = ["SIZE_CEILINGS", "HyperNetConfig", "Init", "Variant"]

Variant = Literal["paper", "reference"]
Init = Literal["default", "identity"]

#: Largest value each size field may take (far above any real model; they stop a hostile or
#: mistyped config from allocating tens of GB).
SIZE_CEILINGS: dict[str, int] = {
    "embedding_dim": 16384,
    "rank": 4096,
    "hidden_dim": 16384,
    "num_layers": 128,
    "num_heads": 1024,
    "num_steps": 128,
}


# Per-variant defaults for the fields left as None in HyperNetConfig.
_VARIANT_DEFAULTS: dict[str, dict[str, float]] = {
    "paper": {"query_residual_weight": 0.0, "token_dropout": 0.0, "decoder_norm": True},
    "reference": {
        "query_residual_weight": 0.5,
        "token_dropout": 0.05,
        "anchor_scale": 0.8,
        "decoder_norm": False,
    },
}


@dataclass(frozen=True)
class HyperNetConfig:
    """Shape and behaviour of a :class:`QuARIModel`.

    Args:
        embedding_dim: E, the backbone embedding size (768 for CLIP ViT-L, 1024 for SigLIP2-L …).
        rank: r, the rank of the low-rank part of T (paper: 64).
        hidden_dim: H, the transformer width (reference code: 512).
        num_layers: Transformer encoder layers (paper: 4).
        num_heads: Attention heads; must divide ``hidden_dim``.
        num_steps: Refinement steps L (reference code: 4; 1 = the "w/o iterative" ablation).
        dropout: Dropout inside the encoder, transformer and decoders (training only).
        variant: ``"paper"`` or ``"reference"`` (see the module docstring).
        anchor_scale: α in T = I + α Û V̂ᵀ. Reference variant only (default 0.8); the paper
            variant is pure low rank and rejects a value here.
        query_residual_weight: λ in q′ = normalize((1−λ)·MLP(ctx) + λ·q). Defaults: paper 0.0,
            reference 0.5.
        token_dropout: Probability of zeroing a whole U/V token after each step while training.
            Defaults: paper 0.0, reference 0.05.
        normalize_factors: Reference variant: divide U and V by their Frobenius norms
            (``use_fro_norm`` in the reference code).
        init: ``"default"`` (PyTorch's initialisation of every layer) or ``"identity"``: the
            last layers of the query decoder and of the U decoder start at zero, so an
            untrained model is exactly the frozen backbone — q′ = q and T = I + α·0·Vᵀ = I —
            and training moves away from cosine only where that lowers the loss (the V
            decoder stays random, so U receives a gradient at once: LoRA's zero/random
            pair). Needs the reference form (T = I + α U Vᵀ, which contains I) and
            ``normalize_factors=False`` (U/‖U‖_F has no usable gradient at U = 0). Only the
            starting point differs: a saved model loads the same either way. With
            ``decoder_norm`` the V decoder's last layer starts at N(0, 1/(H·E)), so V's
            entries are ≈ 1/√E and a first step on U moves T by O(lr), whatever H, r and L.
        decoder_norm: A LayerNorm after the first layer of the q′, U and V decoders. Default:
            the paper variant's decoders have one, the reference variant's not (as in the
            reference code, whose checkpoints load either way). The reference form's sequence
            state grows about 2× per refinement step (each step adds the transformer's output,
            itself a residual stream, to the state), so without it the factors' scale — and
            how far one optimiser step moves T — grows with the number of steps.
        map_query: q′ = normalize(T q) instead of the query decoder's output: the query goes
            through the map the model predicts from it, so the score cos(T q, T d) compares
            query and item in one query-specific space — a per-query version of the static
            linear adapter's cos(W q, W d). No query decoder is built (``query_residual_weight``
            is unused). A quari extension, not in the paper or the reference code: a model
            trained on captions then moves image queries with the items instead of towards a
            caption-shaped q′ (docs/method.md §5.5).
        blend_weight: a in s = (1 − a)·cos(q′, T d) + a·cos(W q, W d): the weight of a static
            whitened cosine mixed into every score (:class:`~quari.adaptation.StaticBlend`).
            W is the model's ``whitening`` buffer (E×E), which exists only when a > 0; the
            trainer fits it on the training embeddings (:mod:`quari.whitening`). 0 (the
            default, and every model made before it): the adapted cosine alone. A quari
            extension, not in the paper (docs/method.md §5.6).

    Example:
        >>> cfg = HyperNetConfig(embedding_dim=768)
        >>> cfg.rank, cfg.query_residual_weight
        (64, 0.0)
    """

    embedding_dim: int
    rank: int = 64
    hidden_dim: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_steps: int = 4
    dropout: float = 0.0
    variant: Variant = "paper"
    anchor_scale: float | None = None
    query_residual_weight: float | None = None
    token_dropout: float | None = None
    normalize_factors: bool = True
    init: Init = "default"
    decoder_norm: bool | None = None
    map_query: bool = False
    blend_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.variant not in _VARIANT_DEFAULTS:
            raise QuARIInputError(f"variant must be 'paper' or 'reference', got {self.variant!r}")
        for name, ceiling in SIZE_CEILINGS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QuARIInputError(f"{name} must be a positive integer, got {value!r}")
            if value > ceiling:
                raise LimitError(
                    f"{name} = {value} is above quari's ceiling of {ceiling} (a config this "
                    "large is a mistake or a hostile file)"
                )
        if self.rank > self.embedding_dim:
            raise QuARIInputError(
                f"rank ({self.rank}) cannot exceed embedding_dim ({self.embedding_dim})"
            )
        if self.hidden_dim % self.num_heads:
            raise QuARIInputError(
                f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.hidden_dim % 2:
            raise QuARIInputError(
                f"hidden_dim must be even (sinusoidal codes), got {self.hidden_dim}"
            )
        if self.variant == "paper" and self.anchor_scale not in (None, 0, 0.0):
            raise QuARIInputError(
                "anchor_scale applies to the reference variant only (the paper's T is pure "
                f"low rank); got anchor_scale={self.anchor_scale} with variant='paper'"
            )
        if self.init not in ("default", "identity"):
            raise QuARIInputError(f"init must be 'default' or 'identity', got {self.init!r}")
        if self.init == "identity" and (self.variant != "reference" or self.normalize_factors):
            raise QuARIInputError(
                "init='identity' needs variant='reference' (T = I + α U Vᵀ; the paper's pure "
                "low-rank T cannot be I) and normalize_factors=False (U/‖U‖_F has no usable "
                f"gradient at U = 0); got variant={self.variant!r}, "
                f"normalize_factors={self.normalize_factors}"
            )
        for name, value in _VARIANT_DEFAULTS[self.variant].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("decoder_norm", "map_query"):
            if not isinstance(getattr(self, name), bool):
                raise QuARIInputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.blend_weight, bool) or not 0.0 <= self.blend_weight <= 1.0:
            raise QuARIInputError(f"blend_weight must lie in [0, 1], got {self.blend_weight!r}")
        for name in ("dropout", "token_dropout", "query_residual_weight"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0 or (name != "query_residual_weight" and value == 1.0):
                raise QuARIInputError(f"{name} must lie in [0, 1), got {value}")
        if self.init == "identity" and not self.map_query and not self.query_residual_weight > 0:
            raise QuARIInputError(
                "init='identity' needs query_residual_weight > 0 (q′ = normalize((1−λ)·0 + λq) "
                "= q at the start; with λ = 0 the zero decoder gives no query)"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (without ``blend_weight`` when it is 0, so that a
        model without a blend stays readable by quari versions before it)."""
        data = asdict(self)
        if not data["blend_weight"]:
            del data["blend_weight"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HyperNetConfig:
        """Builds a config from :meth:`to_dict` output, rejecting unknown keys by name."""
        check_fields(cls, data, "HyperNetConfig field")
        return cls(**data)
