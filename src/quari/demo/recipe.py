"""What the demo trains: QuARI with the default recipe, and the linear adapter on the same pairs.

The demo sets only what is about its data and its budget — the training set, the column that
groups an image's captions (``item``), the number of steps and the seed — and leaves the
recipe (model shape, learning rate and schedule, noise, semi-positives, initialisation,
validation) to :class:`~quari.training.TrainConfig`'s defaults, so it trains whatever the
default recipe is.

One exception, while it lasts: a ``TrainConfig`` whose presets have no ``"default"`` preset —
the one that sizes the model for the device and starts from the frozen backbone — would train
the paper's model (H 512, 4 layers, 4 steps, batch 320: ~4 pairs/s on 2 CPU cores) with the
paper's learning rate (1e-5, a few hundred steps move nothing). There the demo falls back to
:data:`INTERIM_CPU_RECIPE` (small model, quari's learning rate) and says so in its summary.
Once the default preset exists this fallback is never used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quari.demo.config import DemoConfig
from quari.eval.linear import LinearTrainConfig
from quari.training.config import PRESETS, TrainConfig, TrainSource

__all__ = ["IMAGE_KEY", "INTERIM_CPU_RECIPE", "linear_config", "quari_config", "recipe_summary"]

#: The train set's metadata column shared by the caption rows of one image.
IMAGE_KEY = "item"

#: Used only with a TrainConfig that has no ``"default"`` preset (module docstring): the small
#: CPU model and the learning rate of quari's default recipe, on the reference variant (T starts
#: near the identity, q′ keeps half of q).
INTERIM_CPU_RECIPE: dict[str, Any] = {
    "variant": "reference",
    "rank": 32,
    "hidden_dim": 256,
    "num_layers": 2,
    "num_heads": 4,
    "num_steps": 2,
    "batch_size": 128,
    "lr": 1e-3,
    "min_lr": 1e-5,
    "warmup_steps": 50,
}


def _recipe_overrides(config: DemoConfig) -> dict[str, Any]:
    base = {} if "default" in PRESETS else dict(INTERIM_CPU_RECIPE)
    return {**base, **dict(config.train_options)}


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
        **_recipe_overrides(config),
    )


def linear_config(config: DemoConfig, train_set: Path, out: Path) -> LinearTrainConfig:
    """The linear-adapter baseline on the same pairs and validation split (its own recipe)."""
    return LinearTrainConfig(
        train=(TrainSource(Path(train_set)),),
        out=Path(out),
        image_key=IMAGE_KEY,
        seed=config.seed,
        progress=config.progress,
    )


def recipe_summary(train: TrainConfig) -> dict[str, Any]:
    """The facts of a run's recipe the report shows (and whether the interim one was used)."""
    keys = ("preset", "variant", "rank", "hidden_dim", "num_layers", "num_steps", "batch_size",
            "lr", "schedule", "noise_scale", "semipos", "max_steps")  # fmt: skip
    facts = {k: getattr(train, k) for k in keys}
    facts["recipe"] = "default" if "default" in PRESETS else "interim CPU recipe (see the demo)"
    return facts
