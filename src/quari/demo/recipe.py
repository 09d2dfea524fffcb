"""What the demo trains: QuARI with the default recipe, and the two linear-adapter baselines (the
full map and the low-rank form at QuARI's rank) on the same pairs.

The demo sets only what is about its data and its budget — the training set, the column that
groups an image's captions and views (``item``), the number of steps and the seed — and leaves
the recipe (model shape, learning rate and schedule, noise, semi-positives, initialisation) to
:class:`~quari.training.TrainConfig`'s defaults, so it trains whatever the default recipe is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quari.demo.config import DemoConfig
from quari.eval.linear import LinearTrainConfig
from quari.training.config import TrainConfig, TrainSource

__all__ = ["IMAGE_KEY", "linear_config", "quari_config", "recipe_summary"]

#: The train set's metadata column shared by the caption rows of one image. No relevance key
#: is passed: the tracks ask at the instance (image→image) and at class + attributes
#: (text→image), finer than the class column, so validation is by each caption's own item
#: (docs/results.md, quality section: the ``label relevance key`` row).
IMAGE_KEY = "item"


def quari_config(config: DemoConfig, train_set: Path, out: Path) -> TrainConfig:
    """The QuARI run: the default recipe on the track's training pairs, ``config``'s budget.

    Example:
        >>> cfg = quari_config(DemoConfig(), Path("tracks/train"), Path("m"))  # doctest: +SKIP
    """
    return TrainConfig(
        train=(TrainSource(Path(train_set)),),
        out=Path(out),
        image_key=IMAGE_KEY,
        max_steps=config.train_steps,
        seed=config.seed,
        progress=config.progress,
        **dict(config.train_options),
    )


def linear_config(
    config: DemoConfig, train_set: Path, out: Path, rank: int | None = None
) -> LinearTrainConfig:
    """A linear-adapter baseline on the same pairs and validation split (its own recipe): the
    full map, or with ``rank`` the low-rank form W = I + L Rᵀ."""
    return LinearTrainConfig(
        train=(TrainSource(Path(train_set)),),
        out=Path(out),
        image_key=IMAGE_KEY,
        rank=rank,
        seed=config.seed,
        progress=config.progress,
    )


def recipe_summary(train: TrainConfig) -> dict[str, Any]:
    """The facts of a run's recipe the report shows."""
    keys = ("preset", "variant", "init", "rank", "hidden_dim", "num_layers", "num_steps",
            "batch_size", "lr", "schedule", "noise", "noise_scale", "semipos",
            "max_steps")  # fmt: skip
    return {k: getattr(train, k) for k in keys}
