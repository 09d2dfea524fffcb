"""Settings of the HTTP service: limits, micro-batching, thumbnails, CORS.

One frozen dataclass, filled by ``quari serve``'s options (or by hand for
:func:`quari.serve.create_app`); it imports nothing from the web stack, so the command line can
describe it without the ``serve`` extra installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from quari.embed.images import DEFAULT_MAX_PIXELS
from quari.errors import QuARIInputError

__all__ = ["ServeSettings"]


@dataclass(frozen=True)
class ServeSettings:
    """What one service instance allows and how it batches.

    Attributes:
        max_k: Largest ``k`` a request may ask for (above it: 413).
        max_candidates: Largest ``candidates`` (index candidates per query).
        max_upload_bytes: Largest query image, in bytes (file upload or decoded base64).
        max_image_pixels: Largest query image in pixels (width × height, from the header:
            decompression bombs are refused before decoding).
        max_text_chars: Longest text query.
        max_filter_chars: Longest ``where`` filter.
        request_timeout: Seconds a request may take, from its first byte to its response
            (a client that sends its body too slowly gets 408, a slow search 504).
        batching: Micro-batch concurrent queries (off: one query per model call).
        batch_window_ms: How long the first query of a batch waits for company.
        max_batch: Most queries in one batch.
        max_queue: Most queries waiting; beyond it requests get 503 at once.
        thumbnail_px: Longest side of thumbnails served by ``/items/{id}/image``.
        thumbnail_cache: Thumbnails kept in memory (least recently used dropped first).
        image_root: The folder item images must lie in (``path`` metadata relative to it);
            None: the set's own folder.
        cors_origins: Origins allowed to call the API from a browser; empty: CORS off.
        default_mode: Mode of requests that name none; None: ``adaptive`` with a model,
            ``plain`` without.

    Example:
        >>> ServeSettings(max_k=100).max_body_bytes > ServeSettings().max_upload_bytes
        True
    """

    max_k: int = 1000
    max_candidates: int = 10_000
    max_upload_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = min(DEFAULT_MAX_PIXELS, 40_000_000)
    max_text_chars: int = 1000
    max_filter_chars: int = 2000
    request_timeout: float = 30.0
    batching: bool = True
    batch_window_ms: float = 3.0
    max_batch: int = 32
    max_queue: int = 1024
    thumbnail_px: int = 256
    thumbnail_cache: int = 2048
    image_root: Path | None = None
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    default_mode: str | None = None

    def __post_init__(self) -> None:
        positive = (
            "max_k",
            "max_candidates",
            "max_upload_bytes",
            "max_image_pixels",
            "max_text_chars",
            "max_filter_chars",
            "max_batch",
            "max_queue",
            "thumbnail_px",
            "thumbnail_cache",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QuARIInputError(
                    f"serve setting {name} must be a positive integer, got {value!r}"
                )
        for name in ("request_timeout", "batch_window_ms"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "request_timeout" and value == 0):
                raise QuARIInputError(
                    f"serve setting {name} must be a positive number, got {value!r}"
                )

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: an image of :attr:`max_upload_bytes` as base64 (4/3 larger)
        plus room for the other fields and multipart framing."""
        return math.ceil(self.max_upload_bytes * 4 / 3) + 64 * 1024

    @property
    def window_s(self) -> float:
        """The batching window in seconds (0 when batching is off)."""
        return self.batch_window_ms / 1000 if self.batching else 0.0

    @property
    def batch_cap(self) -> int:
        """Most queries per model call (1 when batching is off)."""
        return self.max_batch if self.batching else 1
