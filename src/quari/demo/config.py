"""What a demo run is: its size, its output folder and its budget (:class:`DemoConfig`).

A size (:data:`DEMO_SIZES`) fixes the Fashion-MNIST tracks that are built and the QuARI
training budget (optimiser steps, and a wall-clock cap that stops a run early on a slow or busy
machine). Each part can be overridden (``--train-images``, ``--steps`` …). The training *recipe*
is not here: the demo trains with :class:`~quari.training.TrainConfig`'s defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from quari.errors import QuARIInputError
from quari.eval.tracks import TrackSizes
from quari.eval.tracks.fashion_mnist import FashionMNIST

__all__ = ["DEFAULT_SIZE", "DEMO_SIZES", "DemoConfig", "DemoSize"]


@dataclass(frozen=True)
class DemoSize:
    """One demo size.

    Attributes:
        tracks: The Fashion-MNIST tracks built (:class:`~quari.eval.tracks.TrackSizes`).
        steps: QuARI optimiser steps.
        minutes: Wall-clock cap on QuARI training (the run stops early and keeps its best
            weights when a slow or busy machine needs longer).
        summary: One line for ``--help`` and the README.
    """

    tracks: TrackSizes
    steps: int
    minutes: float
    summary: str


#: ``small``: a quick look (and the tests' base); ``medium``: what ``make demo`` runs — sized to
#: finish, install included, within 15 minutes on a fresh 2-core machine; ``full``: the tracks
#: results are reported on (112 px, 8,000 training images).
DEMO_SIZES: dict[str, DemoSize] = {
    "small": DemoSize(
        TrackSizes(2000, 500, 500, 2, 200, 100, 3, 64), 150, 4.0,
        "2,000 training images at 64 px, 150 steps (~4 min on 2 cores)",
    ),
    "medium": DemoSize(
        TrackSizes(4000, 1000, 1000, 2, 500, 250, 3, 64), 400, 6.0,
        "4,000 training images at 64 px, 400 steps (~10 min on 2 cores)",
    ),
    "full": DemoSize(
        TrackSizes(8000, 2000, 2000, 3, 1000, 500, 3, 112), 1500, 30.0,
        "8,000 training images at 112 px, 1,500 steps (~45 min on 2 cores)",
    ),
}  # fmt: skip
DEFAULT_SIZE = "medium"


@dataclass(frozen=True)
class DemoConfig:
    """One demo run.

    Args:
        out: Output folder (``report.html``, ``demo.json``, the tracks, models, results).
        size: A key of :data:`DEMO_SIZES`.
        train_images, val_images, test_images: Override the size's image counts.
        text_queries, image_queries: Override the queries per split and track.
        resolution: Override the EfficientNet input size (px).
        steps: Override the QuARI optimiser steps.
        minutes: Override the wall-clock cap on QuARI training.
        seed: Seed of the tracks (splits, captions, queries) and of both trainings.
        data: Fashion-MNIST: a folder with its four files, or the loaded dataset; ``None``
            looks it up (``$QUARI_FASHION_MNIST``, Debian's package, the cache, a verified
            download — :func:`~quari.eval.tracks.fashion_mnist.find_fashion_mnist`).
        threads: Torch threads for the whole run (towers, training, search). ``None``: every
            core when the machine is idle at the start (1-minute load average at most half the
            cores), else one — on a busy 2-core machine two threads ran 1.6× (training) to 4×
            (the image tower) slower than one, on an idle one 1.7× faster.
        showcase: Test queries shown with their results in ``report.html``.
        top: Results per method shown for each of them.
        train_options: Extra :class:`~quari.training.TrainConfig` fields (``None``-free
            overrides of the default recipe, for experiments).
        progress: Progress bars with ETA.
    """

    out: Path = Path("demo-out")
    size: str = DEFAULT_SIZE
    train_images: int | None = None
    val_images: int | None = None
    test_images: int | None = None
    text_queries: int | None = None
    image_queries: int | None = None
    resolution: int | None = None
    steps: int | None = None
    minutes: float | None = None
    seed: int = 0
    data: str | os.PathLike[str] | FashionMNIST | None = None
    threads: int | None = None
    showcase: int = 12
    top: int = 8
    train_options: Mapping[str, Any] = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.size not in DEMO_SIZES:
            raise QuARIInputError(f"size must be one of {', '.join(DEMO_SIZES)}, got {self.size!r}")
        for name in ("steps", "showcase", "top"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) < 1):
                raise QuARIInputError(f"{name} must be a positive integer, got {value!r}")
        if self.minutes is not None and not self.minutes > 0:
            raise QuARIInputError(f"minutes must be positive, got {self.minutes}")
        if self.threads is not None and self.threads < 1:
            raise QuARIInputError(f"threads must be ≥ 1, got {self.threads}")
        self.track_sizes().check()

    def track_sizes(self) -> TrackSizes:
        """The size's tracks with the overrides applied."""
        base = DEMO_SIZES[self.size].tracks
        changes = {
            name: value
            for name, value in (
                ("train", self.train_images),
                ("val", self.val_images),
                ("test", self.test_images),
                ("text_queries", self.text_queries),
                ("image_queries", self.image_queries),
                ("resolution", self.resolution),
            )
            if value is not None
        }
        return replace(base, **changes)

    def resolved_threads(self) -> int:
        """:attr:`threads`, or the choice by load described there."""
        if self.threads is not None:
            return int(self.threads)
        cores = os.cpu_count() or 1
        return cores if os.getloadavg()[0] <= cores / 2 else 1

    @property
    def train_steps(self) -> int:
        return int(self.steps if self.steps is not None else DEMO_SIZES[self.size].steps)

    @property
    def train_minutes(self) -> float:
        return float(self.minutes if self.minutes is not None else DEMO_SIZES[self.size].minutes)
