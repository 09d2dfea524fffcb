"""Safe image decoding: every file becomes an upright RGB image or a :class:`BadImage` reason.

Rules (each has a test in ``tests/test_embed_images.py``):

* empty files, non-images and truncated files are rejected with the reason;
* images whose header declares more than ``max_pixels`` pixels are rejected *before* any pixel
  is decoded (a 20k × 20k "decompression bomb" is a few hundred bytes of PNG); PIL's own
  ``DecompressionBombError``/``Warning`` are caught too;
* EXIF orientation is applied (``ImageOps.exif_transpose``), so width and height are those of
  the upright picture;
* every mode becomes 8-bit RGB correctly: CMYK and YCbCr through PIL's converters; palette, LA
  and RGBA images with transparency are composited over white (so transparent areas do not turn
  black); 16-bit (``I;16*``) and 32-bit integer greyscale are scaled down from their full
  range rather than clipped at 255; float images are clipped to 0–255.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from quari.errors import QuARIInputError

__all__ = ["DEFAULT_MAX_PIXELS", "BadImage", "DecodedImage", "load_image", "to_rgb"]

#: PIL's own warning threshold (≈ 89.5 M pixels, e.g. 9,459²); above it an image is refused.
DEFAULT_MAX_PIXELS = 89_478_485


class BadImage(QuARIInputError):
    """A file that cannot be used as an image; ``str(exc)`` is the reason written to errors
    (``quari embed`` skips such files; a query image raises it as bad input)."""


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image and its size (after EXIF rotation, before any resizing)."""

    image: Image.Image
    width: int
    height: int


def _white_background(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _scaled_grey(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale → 8-bit, scaled from its range rather than clipped."""
    arr = np.asarray(image)
    if image.mode == "F":
        arr8 = np.clip(np.nan_to_num(arr), 0, 255)
    elif image.mode.startswith("I;16") or (arr.size and arr.max() <= 65535 and arr.min() >= 0):
        # 16-bit data (PIL opens 16-bit PNG greyscale as I;16 or as I): full range → 0–255.
        arr8 = arr.astype(np.float64) / 257.0
    else:
        lo, hi = float(arr.min()), float(arr.max())
        arr8 = (arr.astype(np.float64) - lo) * (255.0 / (hi - lo)) if hi > lo else arr * 0.0
    return Image.fromarray(np.round(arr8).astype(np.uint8), "L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB, done correctly for each mode (see the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    ):
        return _white_background(image)
    if mode.startswith("I") or mode == "F":
        return _scaled_grey(image)
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(
    source: str | os.PathLike[str] | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Decodes one image file (a path or its bytes) safely into upright RGB.

    Args:
        source: A file path or the file's bytes.
        max_pixels: Largest width × height accepted (checked from the header, before decoding).

    Returns:
        A :class:`DecodedImage`.

    Raises:
        BadImage: with a one-line reason ("empty file", "truncated …", "decompression bomb …").

    Example:
        >>> img = load_image("photo.jpg").image  # doctest: +SKIP
    """
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise BadImage(f"unreadable file: {exc.strerror or exc}") from None
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w * h > max_pixels:
                raise BadImage(
                    f"decompression bomb: {w}×{h} = {w * h:,} pixels exceeds the limit of "
                    f"{max_pixels:,}"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = to_rgb(image)
            rgb.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc) or type(exc).__name__
        if "truncated" in text or isinstance(exc, EOFError):
            raise BadImage(f"truncated file: {text}") from None
        raise BadImage(f"cannot decode: {text}") from None
    except Exception as exc:  # decoders raise assorted errors on hostile input; never crash
        raise BadImage(f"cannot decode: {type(exc).__name__}: {exc}") from None
    return DecodedImage(rgb, rgb.width, rgb.height)
