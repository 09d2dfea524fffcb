"""Embedding a collection: inputs, safe image decoding, the resumable job, the engines.

Example:
    >>> from quari.embed import EmbedConfig, embed
    >>> result = embed("photos/", "photos.set", "offline:heads/mine",
    ...                EmbedConfig(rows_per_shard=5000))  # doctest: +SKIP
"""

from quari.embed.engine import EmbedConfig, list_engines, register_engine
from quari.embed.images import DEFAULT_MAX_PIXELS, BadImage, DecodedImage, load_image
from quari.embed.job import EmbedResult, embed, read_errors
from quari.embed.sources import Item, Source, open_source

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "BadImage",
    "DecodedImage",
    "EmbedConfig",
    "EmbedResult",
    "Item",
    "Source",
    "embed",
    "list_engines",
    "load_image",
    "open_source",
    "read_errors",
    "register_engine",
]
