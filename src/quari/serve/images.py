"""Item images for the web page: the set's own files only, thumbnails cached in memory.

An item's image is its metadata ``path`` — relative to the image root (the set's folder unless
configured), or absolute. Whatever it says, the file is served only if, after resolving ``..``
and symlinks, it lies inside the image root and is an image PIL recognises; anything else is
"not found", with the same message whether or not a file exists there. Thumbnails are decoded
through :func:`quari.embed.images.load_image` (pixel limit, EXIF, modes) and kept in an LRU
cache; nothing is ever written.
"""

from __future__ import annotations

import io
import os
from functools import lru_cache
from pathlib import Path

from PIL import Image

from quari.embed.images import BadImage, load_image
from quari.errors import NotFoundError
from quari.store import EmbeddingSet

__all__ = ["ItemImages", "parse_item_id"]

#: PIL formats served as originals, with their media types.
MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}


def parse_item_id(text: str | int, rows: int) -> int:
    """A row id from a request: decimal digits only, inside the set.

    Raises:
        NotFoundError: anything else (the message shows the id as given, quoted).

    Example:
        >>> parse_item_id("12", rows=100)
        12
    """
    if isinstance(text, int) and not isinstance(text, bool):
        row = text
    elif isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 19:
        row = int(text)
    else:
        shown = str(text)[:80]
        raise NotFoundError(f"unknown item id {shown!r}: ids are row numbers 0 … {rows - 1}")
    if not 0 <= row < rows:
        raise NotFoundError(f"unknown item id {row}: ids are row numbers 0 … {rows - 1}")
    return row


class ItemImages:
    """Finds, checks and thumbnails item images.

    Args:
        eset: The served set.
        root: The folder images must lie in (None: the set's folder).
        thumbnail_px: Longest side of a thumbnail.
        cache_size: Thumbnails kept in memory.
        max_pixels: Largest image decoded.
    """

    def __init__(
        self,
        eset: EmbeddingSet,
        root: str | os.PathLike[str] | None = None,
        *,
        thumbnail_px: int = 256,
        cache_size: int = 2048,
        max_pixels: int = 40_000_000,
    ) -> None:
        self.eset = eset
        self.root = Path(root if root is not None else eset.root).resolve()
        self.thumbnail_px = thumbnail_px
        self.max_pixels = max_pixels
        self.has_paths = eset.has_metadata and eset.rows > 0 and "path" in self._columns()
        # Per instance, so two services in one process never share (or leak) a cache.
        self.thumbnail = lru_cache(maxsize=cache_size)(self._thumbnail)

    def _columns(self) -> list[str]:
        return self.eset.metadata_table(self.eset.shards[0]).column_names

    def file(self, row: int) -> Path:
        """The checked image file of row ``row``.

        Raises:
            NotFoundError: no path, or a path that does not resolve to a file in the root.
        """
        unavailable = NotFoundError(f"item {row} has no image available")
        if not self.has_paths:
            raise unavailable
        value = self.eset.metadata([row], columns=["path"]).column(0)[0].as_py()
        if not isinstance(value, str) or not value or "\x00" in value:
            raise unavailable
        candidate = Path(value)
        if not candidate.is_absolute():
            candidate = self.root / candidate
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, a symlink loop, a name too long …
            raise unavailable from None
        if not resolved.is_relative_to(self.root) or not resolved.is_file():
            raise unavailable
        return resolved

    def original(self, row: int) -> tuple[Path, str]:
        """Row ``row``'s image file and its media type (only files PIL recognises as images).

        Raises:
            NotFoundError: see :meth:`file`; also a file that is not an image.
        """
        path = self.file(row)
        try:
            with Image.open(path) as image:  # reads the header only
                kind = image.format
        except Exception:
            kind = None
        if kind not in MEDIA_TYPES:
            raise NotFoundError(f"item {row} has no image available")
        return path, MEDIA_TYPES[kind]

    def _thumbnail(self, row: int) -> bytes:
        """JPEG bytes of row ``row``'s image, its longest side at most ``thumbnail_px``."""
        path = self.file(row)
        try:
            image = load_image(path, max_pixels=self.max_pixels).image
        except BadImage as exc:
            raise NotFoundError(f"item {row}: its image cannot be decoded ({exc})") from None
        image.thumbnail((self.thumbnail_px, self.thumbnail_px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
        return buf.getvalue()
