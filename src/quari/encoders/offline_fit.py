"""Fitting the ``offline`` encoder's head on a captioned input of ``quari embed`` — and writing
that input's embedding set from the same pass (``quari encoders fit-offline --write-set``).

Fitting needs every image's EfficientNet feature; embedding the same images afterwards
(``quari embed INPUT SET --encoder offline:HEAD``) would decode and encode them all a second time
(on 2 cores ~290 s + ~280 s for 8k images). With ``write_set`` the features of the fit are
projected through the fitted head and handed to the embed job as a ready engine, so the set —
vectors, metadata, the skipped images' error files, manifest and job file — is the job's own
and the later ``quari embed`` command finds it complete.

Example:
    >>> head, skipped = fit_offline_head_from("captions.csv", "heads/mine",
    ...                                       write_set="photos.set")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from quari.encoders import EncoderConfig, collate
from quari.encoders.offline import (
    FEATURE_DIM,
    OfflineEncoder,
    OfflineHead,
    OfflineTowers,
    batch_features,
    fit_head_to_captions,
)
from quari.errors import QuARIInputError

__all__ = ["SourceFeatures", "fit_offline_head_from", "source_features"]


@dataclass
class SourceFeatures:
    """One pass over an input: the features of its usable items and why the others failed.

    Attributes:
        good: Item numbers of the usable images, in input order.
        sizes: (width, height) of each usable image after EXIF rotation.
        features: (len(good), 1280) float32 EfficientNet features.
        errors: Item number → why it was skipped (``quari embed``'s wording).
    """

    good: list[int]
    sizes: list[tuple[int, int]]
    features: np.ndarray
    errors: dict[int, str]


def source_features(
    source: Any, towers: OfflineTowers, max_pixels: int, progress: bool = False
) -> SourceFeatures:
    """Decodes every item of a :class:`~quari.embed.sources.Source` as ``quari embed`` does
    (:func:`~quari.embed.engine.decode_item`: the same checks and skip reasons) and computes
    each usable image's EfficientNet feature — one decode and one forward pass per image."""
    from tqdm.auto import tqdm

    from quari.embed.engine import decode_item

    good: list[int] = []
    sizes: list[tuple[int, int]] = []
    parts: list[np.ndarray] = []
    errors: dict[int, str] = {}
    step = towers.config.batch_size
    with tqdm(total=len(source), unit="img", desc="fit-offline", disable=not progress,
              dynamic_ncols=True) as bar:  # fmt: skip
        for start in range(0, len(source), step):
            inputs = []
            for k in range(start, min(start + step, len(source))):
                x, reason, w, h = decode_item(source.items[k], towers.preprocessor, max_pixels)
                if x is None:
                    errors[k] = str(reason)
                else:
                    inputs.append(x)
                    good.append(k)
                    sizes.append((w, h))
            if inputs:
                parts.append(batch_features(towers, collate(inputs)["pixel_values"]))
            bar.update(min(step, len(source) - start))
    features = np.concatenate(parts) if parts else np.zeros((0, FEATURE_DIM), np.float32)
    return SourceFeatures(good, sizes, features, errors)


def fit_offline_head_from(
    location: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    resolution: int = 112,
    alpha: float | None = None,
    config: EncoderConfig | None = None,
    path_column: str | None = None,
    caption_column: str | None = None,
    max_pixels: int | None = None,
    progress: bool = False,
    write_set: str | os.PathLike[str] | None = None,
    rows_per_shard: int = 10_000,
) -> tuple[OfflineHead, list[tuple[str, str]]]:
    """Fits the head on a captioned input of ``quari embed`` (a folder with ``.txt`` captions
    beside the images, a CSV/parquet with path and caption columns, or webdataset shards),
    decoding images safely and skipping bad ones.

    Args:
        location: The input.
        out: Folder to save the head in (``None``: do not save).
        resolution: Image size for the EfficientNet features.
        alpha: Ridge penalty; ``None`` chooses by leave-one-out error.
        config: Device, threads and batch size for the towers.
        path_column, caption_column: Table columns (as for ``quari embed``).
        max_pixels: Largest image accepted (default: ``quari embed``'s).
        progress: Show a progress bar with ETA.
        write_set: Also write the input's embedding set here, as ``quari embed INPUT SET
            --encoder offline:<out>`` writes it (module docstring), from this pass's features.
            Needs ``out``.
        rows_per_shard: Input images per shard of ``write_set`` (``quari embed``'s option).

    Returns:
        (the head, [(path, reason) of every skipped image])

    Raises:
        QuARIInputError: no captions, fewer than 2 usable images, ``write_set`` without ``out``.
    """
    from quari.embed.images import DEFAULT_MAX_PIXELS
    from quari.embed.sources import open_source

    source = open_source(location, path_column=path_column, caption_column=caption_column)
    if not source.has_captions:
        raise QuARIInputError(
            f"fit-offline: {location} has no captions (a caption column, or .txt files beside "
            "the images)"
        )
    if write_set is not None and out is None:
        raise QuARIInputError("fit-offline: writing a set needs the head's folder (out)")
    towers = OfflineTowers(resolution, config)
    done = source_features(source, towers, max_pixels or DEFAULT_MAX_PIXELS, progress)
    if len(done.good) < 2:
        raise QuARIInputError(f"fit-offline: fewer than 2 usable captioned images in {location}")
    note = f"fitted on {len(done.good)} captioned images from {source.kind} {source.location}"
    captions = source.captions(done.good)
    head, texts = fit_head_to_captions(towers, done.features, captions, out, alpha, note)
    if write_set is not None and out is not None:
        encoder = OfflineEncoder(out, towers.config, towers=towers)
        _write_set(source, done, head.project(done.features), texts, encoder, write_set,
                   rows_per_shard)  # fmt: skip
    return head, [(source.items[k].path, r) for k, r in sorted(done.errors.items())]


def _write_set(
    source: Any,
    done: SourceFeatures,
    vectors: np.ndarray,
    texts: np.ndarray,
    encoder: OfflineEncoder,
    folder: str | os.PathLike[str],
    rows_per_shard: int,
) -> None:
    """Runs the embed job with an engine that fills each chunk with the vectors computed
    already (``vectors`` = the head's projection, as the encoder makes it; ``texts`` = the
    captions' embeddings, as the encoder's text side makes them)."""
    from quari.embed import EmbedConfig, embed

    row = {k: i for i, k in enumerate(done.good)}

    def replay(src: Any, enc: Any, chunks: list[Any], cfg: Any, enc_cfg: Any) -> Iterator[Any]:
        for chunk in chunks:
            for k in range(chunk.start, chunk.start + chunk.size):
                if k in done.errors:
                    chunk.errors[k - chunk.start] = done.errors[k]
                else:
                    i = row[k]
                    chunk.accept(k, vectors[i], texts[i], done.sizes[i])
            yield chunk

    config = EmbedConfig(rows_per_shard=rows_per_shard, progress=False)
    embed(source, folder, encoder, config, engine=replay)
