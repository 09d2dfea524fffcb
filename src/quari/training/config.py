"""Training configuration: one dataclass, three presets (docs/method.md §5.5, §6 A5).

``preset="default"``: quari's own recipe, the one measured to beat the frozen backbone
(``docs/results.md``, quality section). The model starts *exactly* at the frozen backbone
(``HyperNetConfig(variant="reference", normalize_factors=False, init="identity")``: q′ = q,
T = I + α U Vᵀ with U = 0), the query is mapped like the items (q′ = normalize(T q), so the
score is cos(T q, T d)), the query noise is relative to the unit query (‖noise‖ ≈ σ·s
instead of σ·s·√E), AdamW with linear warm-up and a cosine decay, no token dropout (training
then folds the V bank: half the cost), and — with a ``relevance_key`` — in-batch images sharing
a caption's key are not treated as its negatives. Its size follows the device: on a CPU a
small model (:data:`SHAPES` ``"cpu"``), on a GPU the paper's. Two settings follow the model's
size (:func:`default_lr`, and ``decoder_norm`` from 3 refinement steps on), because a recipe
tuned on the small model collapsed the paper-sized one to chance within ten steps
(docs/method.md §5.5).

``preset="paper"``: the paper's recipe for faithful reproduction — AdamW (weight decay 1e-2),
learning rate 1e-5 with linear warm-up and a cosine decay to 2e-7, gradient clipping 1.0, batch
320, the paper variant of the model (T = U Vᵀ), the paper's noise q + s·ε.

``preset="reference"``: the reference code's recipe — OneCycleLR with max_lr 5e-4,
pct_start 0.01, div_factor 25, final_div_factor 20 (cosine), gradient clipping 1.0, batch 320,
and the reference variant of the model (T = I + α Û V̂ᵀ).

Fields left as ``None`` take the preset's value; anything set explicitly wins.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from quari.hypernet import HyperNetConfig
from quari.training.mining import MiningConfig
from quari.validation import QuARIInputError, check_fields
from quari.whitening import DEFAULT_SHRINKAGE

__all__ = ["PRESETS", "SHAPES", "TrainConfig", "TrainSource", "default_lr", "device_kind"]

#: Model and batch sizes: the paper's (H 512, 4 layers, 4 steps, r 64, batch 320) and the small
#: model that trains in minutes on a laptop-class CPU. The small one runs a single refinement
#: step: on the tracks' validation splits it scored level with two (docs/method.md §5.5) at
#: 0.6-0.7x the training time, and a query runs the transformer once instead of twice.
SHAPES: dict[str, dict[str, int]] = {
    "paper": {"rank": 64, "hidden_dim": 512, "num_layers": 4, "num_heads": 8, "num_steps": 4,
              "batch_size": 320},
    "cpu": {"rank": 16, "hidden_dim": 128, "num_layers": 2, "num_heads": 4, "num_steps": 1,
            "batch_size": 128},
}  # fmt: skip

#: What each preset sets (fields left None). ``shape`` names a :data:`SHAPES` entry, or
#: ``"device"``: ``"cpu"`` on a CPU, ``"paper"`` on a GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "schedule": "cosine",
        "lr": "by size",  # default_lr(hidden_dim, rank)
        "decoder_norm": "by size",  # from 3 refinement steps on
        "warmup_steps": 50,
        "min_lr": 1e-5,
        "variant": "reference",
        "init": "identity",
        "normalize_factors": False,
        "anchor_scale": 1.0,
        "map_query": True,
        "token_dropout": 0.0,
        "image_queries": 0.0,
        "relevance_negatives": True,
        "false_negative_threshold": 0.0,
        "noise": "relative",
        "noise_scale": 0.5,
        "blend_weight": "by device",  # 0.5 at the CPU size, 0 at the paper's (see below)
        "shape": "device",
    },
    "paper": {
        "schedule": "cosine",
        "lr": 1e-5,
        "min_lr": 2e-7,
        "variant": "paper",
        "init": "default",
        "map_query": False,
        "normalize_factors": True,
        "image_queries": 0.0,
        "relevance_negatives": False,
        "false_negative_threshold": 0.0,
        "noise": "paper",
        "noise_scale": 1.0,
        "blend_weight": 0.0,
        "shape": "paper",
    },
    "reference": {
        "schedule": "onecycle",
        "lr": 5e-4,
        "min_lr": 2e-7,
        "variant": "reference",
        "init": "default",
        "map_query": False,
        "normalize_factors": True,
        "image_queries": 0.0,
        "relevance_negatives": False,
        "false_negative_threshold": 0.0,
        "noise": "paper",
        "noise_scale": 1.0,
        "blend_weight": 0.0,
        "shape": "paper",
    },
}


#: The default recipe's peak learning rate at its CPU size (H 128, r 16), and that size.
BASE_LR, BASE_HIDDEN, BASE_RANK = 1e-3, 128, 16


def default_lr(hidden_dim: int, rank: int) -> float:
    """The default recipe's peak learning rate for a model of this width and rank.

    Adam moves every weight of the U decoder's last layer by about lr per step, in step with
    each other at the start, so one step moves each entry of U by ~lr·H and T = I + U Vᵀ by
    ~lr·H·√r. Scaling lr by (128 / H)·√(16 / r) keeps that first move the size it has in the
    small model the recipe was tuned on (lr 1e-3): at the paper's H 512, r 64 this gives
    1.25e-4; lr 1e-3 there sent the loss to chance within ten steps (docs/method.md §5.5).

    Example:
        >>> default_lr(128, 16), default_lr(512, 64)
        (0.001, 0.000125)
    """
    return BASE_LR * min(1.0, (BASE_HIDDEN / hidden_dim) * (BASE_RANK / rank) ** 0.5)


def device_kind(accelerator: str = "auto") -> str:
    """``"gpu"`` when training would run on a CUDA device, else ``"cpu"``."""
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "gpu"
    return "cpu"


@dataclass(frozen=True)
class TrainSource:
    """One training embedding set and its share of the mixture.

    Args:
        path: The embedding set folder (needs ``text_emb``: caption ↔ image pairs).
        ratio: Relative share of training pairs drawn from this set. Give a ratio for every
            source or for none; with none, sets contribute in proportion to their size.

    Example:
        >>> TrainSource.parse("data/coco:0.7")
        TrainSource(path=PosixPath('data/coco'), ratio=0.7)
    """

    path: Path
    ratio: float | None = None

    @classmethod
    def parse(cls, spec: str | os.PathLike[str]) -> TrainSource:
        """Parses ``SET`` or ``SET:ratio`` (a path may itself contain ':')."""
        text = str(spec)
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                ratio = float(tail)
            except ValueError:
                if not Path(text).exists() and Path(head).exists():
                    raise QuARIInputError(
                        f"--train {text}: {tail!r} is not a ratio (SET:RATIO takes a positive "
                        f"number, e.g. {head}:0.5)"
                    ) from None
                return cls(Path(text))
            if not ratio > 0:
                raise QuARIInputError(f"--train {text}: the ratio must be positive, got {tail}")
            return cls(Path(head), ratio)
        return cls(Path(text))


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Library entry point: :func:`quari.training.train`.

    Fields left as ``None`` take the preset's value (:data:`PRESETS`); anything set wins.

    Args:
        train: Training sets (caption ↔ image pairs), optionally with mixture ratios.
        out: Output folder: the exported model folder, ``checkpoints/``, ``logs/``.
        val: Validation set. None: hold out ``val_fraction`` of the images of every training
            set; one of the training sets: hold out part of that set only; another set: use it
            whole. Splits are by image (``image_key``), never by caption.
        image_key: Metadata column that groups the caption rows of one image (COCO: 5 rows,
            one per caption, sharing an ``image_id``). None: every row is its own image.
        relevance_key: Metadata columns that decide relevance in validation: a held-out image
            is relevant to a held-out caption when every listed column is equal (e.g.
            ``("label",)``: class-level retrieval). None: each caption's own image (its
            ``image_key`` group) is its only relevant image.
        val_fraction: Share of images held out when validation comes from a training set.
        val_max_queries: Cap on validation queries (whole images are dropped to meet it).
        preset: ``"default"``, ``"paper"`` or ``"reference"`` (see the module docstring).
        variant: Model variant, ``"paper"`` or ``"reference"`` (default: the preset's).
        init: Model initialisation, ``"default"`` or ``"identity"`` (start at the frozen
            backbone; :class:`~quari.hypernet.HyperNetConfig`).
        normalize_factors: Frobenius-normalise U and V (reference variant).
        decoder_norm: A LayerNorm inside the q′/U/V decoders (None: the variant's — the
            paper variant has one, the reference variant not; see
            :class:`~quari.hypernet.HyperNetConfig`).
        anchor_scale: α in T = I + α U Vᵀ (reference variant; None: the variant's 0.8).
        query_residual_weight: λ in q′ = normalize((1−λ)·MLP(ctx) + λ·q) (None: the variant's).
        map_query: q′ = normalize(T q), the query mapped like the items (default recipe), instead
            of a decoded q′ (paper and reference presets; :class:`~quari.hypernet.HyperNetConfig`).
        token_dropout: Zeroing probability of U/V tokens while training (None: the variant's;
            0 in the default recipe, where the reference variant then trains with the folded
            V bank at half the cost).
        rank, hidden_dim, num_layers, num_heads, num_steps, dropout: Model shape
            (:class:`~quari.hypernet.HyperNetConfig`); ``num_steps=1`` is the "w/o iterative
            generation" ablation. Default: the preset's :data:`SHAPES` entry.
        batch_size: Pairs per device per step; with N devices each query sees N·batch_size
            in-batch images (gathered across ranks).
        lr: Peak learning rate.
        min_lr: Floor of the cosine schedule.
        warmup_steps: Linear warm-up steps of the cosine schedule (None: 1 % of the run).
        schedule: ``"cosine"`` (warm-up, then cosine) or ``"onecycle"`` (reference).
        weight_decay: AdamW weight decay.
        grad_clip: Gradient-norm clipping (0 disables).
        max_steps: Optimiser steps to run (None: ``max_epochs`` epochs).
        max_epochs: Epochs when ``max_steps`` is None.
        epoch_pairs: Training pairs per epoch (default: all training pairs once).
        temperature: τ of the contrastive loss.
        semipos: Use semi-positives (False is the "w/o semi-positives" ablation).
        image_queries: Share of training pairs whose query is the pair's own image embedding
            (noised like every query) instead of its caption; 0 = captions only (the paper).
        false_negative_threshold: Mask in-batch images whose caption's cosine to the query's
            caption is at least this (likely relevant, not negatives); 0 = off (the paper).
        relevance_negatives: With ``relevance_key``: in-batch images sharing the caption's
            relevance key are not its negatives (they are relevant by the user's definition).
        blend_weight: a of the exported model's static blend, s = (1 − a)·cos(q′, T d) +
            a·cos(W q, W d) with W the training embeddings' shrinkage whitening
            (:class:`~quari.hypernet.HyperNetConfig`, :mod:`quari.whitening`); 0 = none.
            Training itself is the same either way: W is fitted and attached when the run
            exports (None: the preset's — in the default recipe 0.5 at the CPU size and 0 at the
            paper's size, where it is unmeasured; 0 in the paper's recipe).
        whitening_shrinkage: s of the whitening (:func:`quari.whitening.fit_whitening`).
        mining: How semi-positives are mined (mined on first use if missing).
        normalize_targets: Renormalise each query's target row (1 + Σw) to sum to 1.
        noise: ``"paper"``: q + σ·s·ε, ε ~ N(0, I_E), ‖noise‖ ≈ σ·s·√E (the paper's Eq. 8);
            ``"relative"``: q + σ·s·ε/√E, ‖noise‖ ≈ σ·s whatever E is.
        noise_scale: σ (0 is the "w/o noise" ablation).
        seed: Seeds the model init, the data order, the noise and the validation split.
        devices, num_nodes, accelerator, strategy: Lightning ``Trainer`` placement;
            ``strategy="auto"`` picks DDP when more than one device or node is used.
        precision: Lightning precision; None: ``"bf16-mixed"`` on a CUDA device that
            supports it, else ``"32-true"``.
        checkpoint_every: Save the resumable Lightning checkpoint and a model-folder
            checkpoint every this many steps.
        checkpoint_minutes: ... and whenever this many minutes passed since the last one
            (None: by steps only).
        keep_checkpoints: Model-folder checkpoints kept (oldest deleted first).
        val_every_steps: Validate every this many steps (None: at the end of each epoch).
        early_stopping_patience: Validations without a better validation mAP before
            stopping (None disables early stopping).
        log_every: Log training metrics, and print a progress line when the output is not a
            terminal, every this many steps.
        num_workers: DataLoader worker processes (0 gathers in the training process).
        progress: Show progress (a bar on a terminal, lines otherwise).
        export: Export the ``"best"`` (validation mAP; with the identity start, the start
            itself is a candidate) or the ``"last"`` weights to ``out``.

    Example:
        >>> cfg = TrainConfig(train=(TrainSource(Path("coco")),), out=Path("runs/coco"),
        ...                   accelerator="cpu")
        >>> cfg.preset, cfg.variant, cfg.init, cfg.hidden_dim, cfg.batch_size
        ('default', 'reference', 'identity', 128, 128)
        >>> TrainConfig(train=cfg.train, out=cfg.out, preset="paper").lr
        1e-05
    """

    train: tuple[TrainSource, ...]
    out: Path
    val: Path | None = None
    image_key: str | None = None
    relevance_key: tuple[str, ...] | None = None
    val_fraction: float = 0.05
    val_max_queries: int = 5000
    preset: Literal["default", "paper", "reference"] = "default"
    variant: Literal["paper", "reference"] | None = None
    init: Literal["default", "identity"] | None = None
    normalize_factors: bool | None = None
    decoder_norm: bool | None = None
    anchor_scale: float | None = None
    query_residual_weight: float | None = None
    map_query: bool | None = None
    token_dropout: float | None = None
    rank: int | None = None
    hidden_dim: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_steps: int | None = None
    dropout: float = 0.0
    batch_size: int | None = None
    lr: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    schedule: Literal["cosine", "onecycle"] | None = None
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_epochs: int = 10
    epoch_pairs: int | None = None
    temperature: float = 0.07
    semipos: bool = True
    image_queries: float | None = None
    relevance_negatives: bool | None = None
    false_negative_threshold: float | None = None
    mining: MiningConfig = field(default_factory=MiningConfig)
    normalize_targets: bool = False
    noise: Literal["paper", "relative"] | None = None
    noise_scale: float | None = None
    blend_weight: float | None = None
    whitening_shrinkage: float = DEFAULT_SHRINKAGE
    seed: int = 0
    devices: int = 1
    num_nodes: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"
    precision: str | None = None
    checkpoint_every: int = 1000
    checkpoint_minutes: float | None = 10.0
    keep_checkpoints: int = 3
    val_every_steps: int | None = None
    early_stopping_patience: int | None = 5
    log_every: int = 50
    num_workers: int = 0
    progress: bool = True
    export: Literal["best", "last"] = "best"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise QuARIInputError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        object.__setattr__(self, "train", tuple(self.train))
        object.__setattr__(self, "out", Path(self.out))
        if self.val is not None:
            object.__setattr__(self, "val", Path(self.val))
        if self.relevance_key is not None:
            keys = self.relevance_key
            if isinstance(keys, str):  # "label,tone" as the CLI spells it
                keys = keys.split(",")
            keys = tuple(str(k).strip() for k in keys)
            if not keys or not all(keys):
                raise QuARIInputError(
                    f"relevance_key must name metadata columns, got {self.relevance_key!r}"
                )
            object.__setattr__(self, "relevance_key", keys)
        preset = dict(PRESETS[self.preset])
        shape = preset.pop("shape")
        if shape == "device":
            shape = "cpu" if device_kind(self.accelerator) == "cpu" else "paper"
        for name, value in {**preset, **SHAPES[shape]}.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.blend_weight == "by device":
            # Measured at the CPU size only (docs/method.md §5.6); at the paper's size on a GPU
            # it is unmeasured and the fused scan kernel does not score it yet.
            object.__setattr__(self, "blend_weight", 0.5 if shape == "cpu" else 0.0)
        if self.lr == "by size":
            object.__setattr__(self, "lr", default_lr(self.hidden_dim, self.rank))
        if self.decoder_norm == "by size":
            # The reference form's sequence state grows ~2x per refinement step; from 3 steps
            # on the decoders need a LayerNorm (4 steps without: val mAP 0.20 / 0.05 against
            # cosine's 0.24 / 0.19 on the small track; with: 0.24 / 0.15).
            object.__setattr__(self, "decoder_norm", self.num_steps > 2)
        if not self.train:
            raise QuARIInputError("give at least one training set")
        ratios = [s.ratio is not None for s in self.train]
        if any(ratios) and not all(ratios):
            raise QuARIInputError(
                "give a mixture ratio for every --train set (SET:ratio) or for none"
            )
        if self.schedule not in ("cosine", "onecycle"):
            raise QuARIInputError(f"schedule must be 'cosine' or 'onecycle', got {self.schedule}")
        if self.noise not in ("paper", "relative"):
            raise QuARIInputError(f"noise must be 'paper' or 'relative', got {self.noise!r}")
        if self.export not in ("best", "last"):
            raise QuARIInputError(f"export must be 'best' or 'last', got {self.export!r}")
        positive = ["batch_size", "max_epochs", "checkpoint_every", "log_every", "devices"]
        positive += ["num_nodes", "val_max_queries", "keep_checkpoints"]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QuARIInputError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_steps", "epoch_pairs", "val_every_steps", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise QuARIInputError(f"{name} must be a positive integer or None, got {value!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise QuARIInputError(f"warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes > 0:
            raise QuARIInputError(
                f"checkpoint_minutes must be positive (or None), got {self.checkpoint_minutes}"
            )
        if not 0 < self.val_fraction < 1:
            raise QuARIInputError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise QuARIInputError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("min_lr", "weight_decay", "grad_clip", "noise_scale", "whitening_shrinkage"):
            if not getattr(self, name) >= 0:
                raise QuARIInputError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        for name in ("image_queries", "false_negative_threshold", "blend_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise QuARIInputError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.num_workers < 0:
            raise QuARIInputError(f"num_workers must be ≥ 0, got {self.num_workers}")
        self.model_config(8 * self.rank)  # shape checks (heads divide width …) fail early

    def model_config(self, embedding_dim: int) -> HyperNetConfig:
        """The :class:`HyperNetConfig` for a backbone of dimension ``embedding_dim``."""
        return HyperNetConfig(
            embedding_dim=embedding_dim,
            rank=self.rank,
            hidden_dim=self.hidden_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_steps=self.num_steps,
            dropout=self.dropout,
            variant=self.variant,
            anchor_scale=self.anchor_scale if self.variant == "reference" else None,
            query_residual_weight=self.query_residual_weight,
            token_dropout=self.token_dropout,
            normalize_factors=self.normalize_factors,
            init=self.init,
            decoder_norm=self.decoder_norm,
            map_query=self.map_query,
        )

    def with_(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (presets are re-applied to fields set to None)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        data = asdict(self)
        data["train"] = [{"path": str(s.path), "ratio": s.ratio} for s in self.train]
        data["out"] = str(self.out)
        data["val"] = None if self.val is None else str(self.val)
        if self.relevance_key is not None:
            data["relevance_key"] = list(self.relevance_key)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`."""
        check_fields(cls, data, "TrainConfig field")
        data = dict(data)
        data["train"] = tuple(TrainSource(Path(s["path"]), s["ratio"]) for s in data["train"])
        data["mining"] = MiningConfig(**data.get("mining", {}))
        if data.get("relevance_key") is not None:
            data["relevance_key"] = tuple(data["relevance_key"])
        return cls(**data)
