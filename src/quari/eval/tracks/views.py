"""Transformed views of an image for the instance-level image→image track.

A view is the 28×28 image rotated, cropped and resized back, with its contrast changed and noise
added — each by a random amount drawn from a generator seeded by (seed, split, item, view), so
every view is reproducible on its own, whatever else is built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["ViewSpec", "make_view", "view_rng"]

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class ViewSpec:
    """Ranges the random transform is drawn from (uniformly).

    Attributes:
        crop_area: Share of the image area the crop keeps.
        crop_aspect: Width / height of the crop (drawn on a log scale).
        rotation: Largest rotation in degrees, either way (about the centre, black fill).
        gamma: Contrast curve exponent: ``255 · (x / 255) ** gamma``.
        gain: Brightness factor after the curve.
        noise: Largest standard deviation of the added Gaussian noise (of 255).
    """

    crop_area: tuple[float, float] = (0.55, 1.0)
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    rotation: float = 25.0
    gamma: tuple[float, float] = (0.6, 1.6)
    gain: tuple[float, float] = (0.75, 1.0)
    noise: float = 18.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def view_rng(seed: int, split: str, item: int, view: int) -> np.random.Generator:
    """The generator for one view: independent of every other view and of build order."""
    return np.random.default_rng([seed, _SPLIT_CODES[split], int(item), int(view)])


def make_view(
    image: np.ndarray, rng: np.random.Generator, spec: ViewSpec = ViewSpec()
) -> np.ndarray:
    """One random view of a greyscale image, the same size as the image.

    Args:
        image: (H, W) uint8.
        rng: Source of the transform (:func:`view_rng`).
        spec: The ranges.

    Returns:
        (H, W) uint8.

    Example:
        >>> v = make_view(np.zeros((28, 28), np.uint8), view_rng(0, "val", 12, 1))
        >>> v.shape, v.dtype
        ((28, 28), dtype('uint8'))
    """
    h, w = image.shape
    img = Image.fromarray(np.asarray(image, np.uint8), "L")
    img = img.rotate(rng.uniform(-spec.rotation, spec.rotation), Image.Resampling.BICUBIC)
    area = rng.uniform(*spec.crop_area) * h * w
    aspect = np.exp(rng.uniform(np.log(spec.crop_aspect[0]), np.log(spec.crop_aspect[1])))
    cw = min(w, max(2, round(np.sqrt(area * aspect))))
    ch = min(h, max(2, round(np.sqrt(area / aspect))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.resize((w, h), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    x = np.asarray(img, np.float64) / 255.0
    x = 255.0 * x ** rng.uniform(*spec.gamma) * rng.uniform(*spec.gain)
    x = x + rng.normal(0.0, rng.uniform(0.0, spec.noise), x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
