"""What the embed job and its engines share: the run's options, a chunk's results, the safe
per-item decode, and the registry that picks an engine by name.

An engine is a function ``run(source, encoder, chunks, config, encoder_config)`` that encodes
the items of the given :class:`ChunkBuffer` s and yields each chunk once complete (in any
order); :func:`quari.embed.job.embed` writes them. Engines register by name
(:func:`register_engine`): ``local`` (this process + DataLoader workers) and ``ray`` (Ray Data
actors) ship with quari.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from quari.embed.images import DEFAULT_MAX_PIXELS, BadImage, load_image
from quari.embed.sources import Item, Source
from quari.encoders import Encoder, EncoderConfig
from quari.errors import QuARIInputError

__all__ = [
    "ChunkBuffer",
    "EmbedConfig",
    "Engine",
    "decode_item",
    "engine_for",
    "list_engines",
    "register_engine",
]


@dataclass(frozen=True)
class EmbedConfig:
    """How ``quari embed`` runs.

    Attributes:
        rows_per_shard: Input images per chunk, so rows per output shard (fewer where images
            were bad). Fixed for the life of a set: a resumed run must use the same value.
        batch_size: Images per forward pass; ``None``: 16 on CPU (fastest in
            ``benchmarks/bench_embed.py``: small batches stay in cache), 64 on CUDA.
        workers: DataLoader worker processes that read, decode and preprocess; ``None``: one
            fewer than the CPU count, at most 4 (0 decodes in the main process).
        max_pixels: Largest width × height accepted (decompression-bomb guard).
        progress: Show a progress bar (images/s and ETA) on stderr.
        engine: ``"local"`` (this process + DataLoader workers) or ``"ray"`` (Ray Data actors).
        ray_actors: Encoder actors for the Ray engine (each takes a GPU when CUDA is present).
        ray_address: Ray cluster to join; ``None`` starts or reuses a local instance.
        ray_num_cpus: CPUs for a local Ray instance (``None``: all).
    """

    rows_per_shard: int = 10_000
    batch_size: int | None = None
    workers: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True
    engine: str = "local"
    ray_actors: int = 1
    ray_address: str | None = None
    ray_num_cpus: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "rows_per_shard": (self.rows_per_shard, 1),
            "batch_size": (self.batch_size, 1),
            "workers": (self.workers, 0),
            "max_pixels": (self.max_pixels, 1),
            "ray_actors": (self.ray_actors, 1),
            "ray_num_cpus": (self.ray_num_cpus, 1),
        }
        for name, (value, least) in checks.items():
            if value is None and name in ("batch_size", "workers", "ray_num_cpus"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise QuARIInputError(f"{name} must be an integer ≥ {least}, got {value!r}")
        if not isinstance(self.engine, str) or not self.engine:
            raise QuARIInputError(f"engine must be a name, got {self.engine!r}")

    def resolved_workers(self) -> int:
        if self.workers is not None:
            return max(0, int(self.workers))
        return max(0, min(4, (os.cpu_count() or 1) - 1))


@dataclass
class ChunkBuffer:
    """Results of one input chunk as they arrive (in any order)."""

    index: int
    start: int
    size: int
    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    texts: dict[int, np.ndarray] = field(default_factory=dict)
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.vectors) + len(self.errors) == self.size

    def accept(
        self, k: int, vector: np.ndarray, text: np.ndarray | None, size: tuple[int, int]
    ) -> bool:
        """Records item ``k``'s result — or an error if the encoder gave a NaN/Inf or all-zero
        vector (fp16 overflow, a degenerate input), which the store would refuse for the
        whole shard. Returns whether the row was kept."""
        pos = k - self.start
        for what, v in (("image", vector), ("caption", text)):
            if v is not None and not (np.isfinite(v).all() and v.any()):
                self.errors[pos] = f"the encoder returned NaN/Inf or a zero vector for the {what}"
                return False
        self.vectors[pos] = vector
        self.sizes[pos] = size
        if text is not None:
            self.texts[pos] = text
        return True


def decode_item(
    item: Item, preprocessor: Callable[[Any], dict[str, np.ndarray]], max_pixels: int
) -> tuple[dict[str, np.ndarray] | None, str | None, int, int]:
    """Reads, decodes and preprocesses one item: ``(inputs, None, w, h)`` or
    ``(None, reason, -1, -1)``. Never raises for a bad file."""
    try:
        try:
            data = item.read()
        except OSError as exc:
            raise BadImage(f"unreadable file: {exc.strerror or exc}") from None
        decoded = load_image(data, max_pixels=max_pixels)
    except BadImage as exc:
        return None, str(exc), -1, -1
    try:
        inputs = preprocessor(decoded.image)
    except Exception as exc:  # a processor choking on an odd image must not end the run
        return None, f"preprocessing failed: {type(exc).__name__}: {exc}", -1, -1
    return inputs, None, decoded.width, decoded.height


class Engine(Protocol):
    """Encodes ``chunks`` of ``source`` and yields each :class:`ChunkBuffer` once complete."""

    def __call__(
        self,
        source: Source,
        encoder: Encoder,
        chunks: list[ChunkBuffer],
        config: EmbedConfig,
        encoder_config: EncoderConfig | None,
    ) -> Iterator[ChunkBuffer]: ...


_ENGINES: dict[str, tuple[str, str]] = {}


def register_engine(name: str, target: str, summary: str = "") -> None:
    """Registers an engine: ``target`` is ``"module:function"``, imported on first use (so an
    engine's optional dependencies stay optional)."""
    _ENGINES[name] = (target, summary)


def list_engines() -> dict[str, str]:
    """Registered engine names and their one-line summaries."""
    return {name: summary for name, (_, summary) in sorted(_ENGINES.items())}


def engine_for(name: str) -> Engine:
    """The engine function registered as ``name``.

    Raises:
        QuARIInputError: an unknown name (the message lists the known ones).
    """
    if name not in _ENGINES:
        raise QuARIInputError(f"unknown engine {name!r}: {' or '.join(sorted(_ENGINES))}")
    module, _, attr = _ENGINES[name][0].partition(":")
    return getattr(importlib.import_module(module), attr)


register_engine("local", "quari.embed.local:run_local", "this process + DataLoader workers")
register_engine("ray", "quari.embed.ray_engine:run_ray", "Ray Data actors (quari[distributed])")
