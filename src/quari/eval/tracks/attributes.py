"""Attributes measured from the pixels of 28×28 greyscale garments.

Fashion-MNIST has one label per image; the fine-grained text→image track needs more. Each
attribute here is a score computed from the pixels, cut into a few levels by quantiles of the
*training* images' scores **per class** (so every level is about equally common within every
class: a "wide" sandal is wide for a sandal). The cut points are fitted once
(:meth:`AttributeThresholds.fit`), stored in ``track.json``, and applied unchanged to validation
and test images — nothing is fitted on them.

The garment is the set of pixels brighter than :data:`GARMENT_LEVEL` (the background is black).

=============  ==========================  =================================================
attribute      levels (low → high score)   score
=============  ==========================  =================================================
tone           dark, mid, light            mean intensity of the garment's pixels
coverage       slim, regular, wide         share of the 28×28 frame the garment covers
texture        plain, patterned            mean |Laplacian| (5-point) inside the garment,
                                           one pixel in from its edge (edges are not texture)
symmetry       symmetric, asymmetric       Σ|x − mirror(x)| / Σx: left–right mismatch
silhouette     open, boxy                  garment area / its bounding box's area (sleeves
                                           held out, straps and gaps → open)
=============  ==========================  =================================================

Why these: each is visible to the frozen image tower, and no two say the same thing. A
logistic-regression probe on EfficientNet-Lite0 features (8,000 training images → 2,000
validation images at 112 px; 2,000 → 500 at 64 px) recovers the per-class levels at: tone 0.65
(0.57 at 64 px; chance 0.33), coverage 0.62 (0.55; chance 0.33), texture 0.78 (0.75),
symmetry 0.71 (0.64), silhouette 0.77 (0.73; chance 0.5 for the two-level ones). Within a class
the scores are at most moderately correlated (mean |r| over classes ≤ 0.42, tone–symmetry and
symmetry–silhouette). A vertical elongation score was tried and dropped: Fashion-MNIST scales
every garment to fill the frame's longer side, so within a class it tracked coverage (|r| 0.68).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from quari.errors import DataError, QuARIInputError

__all__ = [
    "ATTRIBUTES",
    "GARMENT_LEVEL",
    "Attribute",
    "AttributeThresholds",
    "measure",
]

#: Pixels brighter than this (of 255) belong to the garment.
GARMENT_LEVEL = 16


def _as_float(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise QuARIInputError(f"attributes: images must be (N, 28, 28), got {x.shape}")
    return x.astype(np.float32)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return num / np.maximum(den, 1e-6)


def _tone(x: np.ndarray) -> np.ndarray:
    mask = x > GARMENT_LEVEL
    return _safe_div((x * mask).sum((1, 2)), mask.sum((1, 2)))


def _coverage(x: np.ndarray) -> np.ndarray:
    return (x > GARMENT_LEVEL).mean((1, 2))


def _texture(x: np.ndarray) -> np.ndarray:
    lap = np.abs(
        4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    )
    m = x > GARMENT_LEVEL
    # the garment eroded by one pixel: the outline's jump to black is shape, not texture
    inner = m[:, 1:-1, 1:-1] & m[:, :-2, 1:-1] & m[:, 2:, 1:-1] & m[:, 1:-1, :-2] & m[:, 1:-1, 2:]
    return _safe_div((lap * inner).sum((1, 2)), inner.sum((1, 2)))


def _asymmetry(x: np.ndarray) -> np.ndarray:
    return _safe_div(np.abs(x - x[:, :, ::-1]).sum((1, 2)), x.sum((1, 2)))


def _fill(x: np.ndarray) -> np.ndarray:
    mask = x > GARMENT_LEVEL
    height, width = mask.any(2).sum(1), mask.any(1).sum(1)
    return _safe_div(mask.sum((1, 2)).astype(np.float64), (height * width).astype(np.float64))


@dataclass(frozen=True)
class Attribute:
    """A pixel attribute.

    Attributes:
        name: Column name in the tracks' metadata.
        values: Level names, from the lowest score to the highest.
        measures: What the score is (for ``track.json``).
        score: (N, 28, 28) float32 → (N,) scores.
    """

    name: str
    values: tuple[str, ...]
    measures: str
    score: Callable[[np.ndarray], np.ndarray]


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("tone", ("dark", "mid", "light"), "mean intensity of the garment pixels", _tone),
    Attribute("coverage", ("slim", "regular", "wide"), "share of the frame covered", _coverage),
    Attribute("texture", ("plain", "patterned"), "mean |Laplacian| inside the garment", _texture),
    Attribute("symmetry", ("symmetric", "asymmetric"), "left-right mismatch", _asymmetry),
    Attribute("silhouette", ("open", "boxy"), "garment area / bounding-box area", _fill),
)


def measure(images: np.ndarray) -> dict[str, np.ndarray]:
    """Raw scores of every attribute.

    Args:
        images: (N, 28, 28) greyscale, garment bright on black.

    Returns:
        Attribute name → (N,) float scores.
    """
    x = _as_float(images)
    return {a.name: np.asarray(a.score(x), dtype=np.float64) for a in ATTRIBUTES}


@dataclass(frozen=True)
class AttributeThresholds:
    """Per-class cut points of every attribute's score, fitted on training images.

    Attributes:
        cuts: Attribute name → (classes, levels − 1) ascending cut points; a score ≥ the j-th
            cut of its class is at least level j + 1.
    """

    cuts: Mapping[str, np.ndarray]

    @classmethod
    def fit(cls, images: np.ndarray, labels: np.ndarray, classes: int = 10) -> AttributeThresholds:
        """Quantile cut points per class (equal shares per level) from training images.

        Args:
            images: (N, 28, 28) training images.
            labels: (N,) class ids in ``0 … classes − 1``.
            classes: Number of classes.

        Returns:
            The thresholds.

        Raises:
            QuARIInputError: a class has fewer images than an attribute has levels.

        Example:
            >>> th = AttributeThresholds.fit(train_images, train_labels)  # doctest: +SKIP
            >>> th.assign(test_images, test_labels)["tone"][:3]  # doctest: +SKIP
            array([0, 2, 1], dtype=int8)
        """
        labels = np.asarray(labels)
        scores = measure(images)
        if len(labels) != len(images):
            raise QuARIInputError(f"{len(images)} images but {len(labels)} labels")
        cuts = {}
        for a in ATTRIBUTES:
            levels = len(a.values)
            table = np.zeros((classes, levels - 1))
            for c in range(classes):
                s = scores[a.name][labels == c]
                if s.size < levels:
                    raise QuARIInputError(
                        f"attributes: class {c} has {s.size} training images; at least "
                        f"{levels} are needed to cut {a.name!r} into {levels} levels"
                    )
                table[c] = np.quantile(s, np.arange(1, levels) / levels)
            cuts[a.name] = table
        return cls(cuts)

    def assign(self, images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        """Level of every attribute for each image (its class's cut points).

        Returns:
            Attribute name → (N,) int8 level indices into :attr:`Attribute.values`.
        """
        labels = np.asarray(labels, dtype=np.int64)
        scores = measure(images)
        out = {}
        for a in ATTRIBUTES:
            table = self.cuts[a.name]
            if labels.size and labels.max() >= table.shape[0]:
                raise QuARIInputError(f"label {labels.max()} has no {a.name!r} thresholds")
            # count the class's cut points at or below each score
            level = (scores[a.name][:, None] >= table[labels]).sum(1)
            out[a.name] = level.astype(np.int8)
        return out

    def to_json(self) -> dict[str, Any]:
        """``{attribute: {"values": [...], "measures": ..., "cuts": [[per class]...]}}``."""
        return {
            a.name: {
                "values": list(a.values),
                "measures": a.measures,
                "cuts": np.asarray(self.cuts[a.name]).tolist(),
            }
            for a in ATTRIBUTES
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttributeThresholds:
        """Reads what :meth:`to_json` wrote.

        Raises:
            DataError: an attribute is missing or its cut table has the wrong shape.
        """
        cuts = {}
        for a in ATTRIBUTES:
            try:
                table = np.asarray(data[a.name]["cuts"], dtype=np.float64)
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"attribute thresholds: {a.name!r} missing or unreadable") from exc
            if table.ndim != 2 or table.shape[1] != len(a.values) - 1:
                raise DataError(f"attribute thresholds: {a.name!r} cuts have shape {table.shape}")
            cuts[a.name] = table
        return cls(cuts)
