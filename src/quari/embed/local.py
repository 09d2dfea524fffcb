"""The single-machine engine: DataLoader workers decode and preprocess, this process encodes.

Batches never straddle two chunks, and the DataLoader returns them in order, so chunks finish
one after another and each is written as soon as its last batch is encoded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from quari.embed.engine import ChunkBuffer, EmbedConfig, decode_item
from quari.embed.sources import Item, Source
from quari.encoders import Encoder, EncoderConfig, collate

__all__ = ["run_local"]


class _Items(Dataset):
    """Item number → (number, inputs or None, error or None, width, height)."""

    def __init__(
        self,
        items: list[Item],
        preprocessor: Callable[[Any], dict[str, np.ndarray]],
        max_pixels: int,
    ) -> None:
        self.items = items
        self.preprocessor = preprocessor
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> tuple[int, Any, str | None, int, int]:
        return (k, *decode_item(self.items[k], self.preprocessor, self.max_pixels))


def _collate(samples: list[tuple[int, Any, str | None, int, int]]) -> dict[str, Any]:
    good = [s for s in samples if s[1] is not None]
    return {
        "ids": [s[0] for s in samples],
        "errors": [s[2] for s in samples],
        "sizes": [(s[3], s[4]) for s in samples],
        "good": [s[0] for s in good],
        "inputs": collate([s[1] for s in good]) if good else None,
    }


def _worker_init(_: int) -> None:
    # Workers only decode and resize; extra torch threads there would fight the encoder for CPU.
    torch.set_num_threads(1)


def run_local(
    source: Source,
    encoder: Encoder,
    chunks: list[ChunkBuffer],
    config: EmbedConfig,
    encoder_config: EncoderConfig | None = None,
) -> Iterator[ChunkBuffer]:
    """Encodes the given chunks, yielding each once complete (in chunk order); the encoder is
    already loaded, so ``encoder_config`` is not needed here."""
    batches: list[list[int]] = []
    owner: dict[int, ChunkBuffer] = {}
    step = config.batch_size or 16
    for chunk in chunks:
        for s in range(chunk.start, chunk.start + chunk.size, step):
            batches.append(list(range(s, min(s + step, chunk.start + chunk.size))))
        owner.update({k: chunk for k in range(chunk.start, chunk.start + chunk.size)})
    workers = config.resolved_workers()
    loader = DataLoader(
        _Items(source.items, encoder.preprocessor, config.max_pixels),
        batch_sampler=batches,
        collate_fn=_collate,
        num_workers=workers,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
    )
    total = sum(c.size for c in chunks)
    bar = tqdm(total=total, unit="img", disable=not config.progress, dynamic_ncols=True)
    skipped = 0
    try:
        for batch in loader:
            good = batch["good"]
            if good:
                vectors = encoder.encode_batch(batch["inputs"])
                texts = encoder.encode_texts(source.captions(good)) if source.has_captions else None
                sizes = dict(zip(batch["ids"], batch["sizes"], strict=True))
                for j, k in enumerate(good):
                    text = None if texts is None else texts[j]
                    skipped += not owner[k].accept(k, vectors[j], text, sizes[k])
            for k, err in zip(batch["ids"], batch["errors"], strict=True):
                if err is not None:
                    owner[k].errors[k - owner[k].start] = err
                    skipped += 1
            bar.update(len(batch["ids"]))
            if skipped:
                bar.set_postfix(skipped=skipped, refresh=False)
            chunk = owner[batch["ids"][-1]]
            if chunk.complete:
                yield chunk
    finally:
        bar.close()
