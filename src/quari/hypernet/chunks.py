"""Large query batches through the inference pass in chunks.

Each query's outputs depend on that query alone, so a batch split into chunks and
concatenated again gives the same numbers; the chunks keep each pass's activations in cache.
The model's own eager pass and every CPU runtime (:mod:`quari.runtime`) chunk the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from quari.hypernet.model import QuARIModel

__all__ = ["CHUNK_ROWS", "chunk_size", "chunked"]

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

#: Token rows (queries × sequence length) per chunk of a large batch: the activations of a
#: chunk stay in cache, those of a whole large batch do not (bench_core: the pass ran ~1.5×
#: slower per query at batch 256 than at batch 32 before chunking).
CHUNK_ROWS = 2048


def chunk_size(model: QuARIModel) -> int:
    """The most queries one chunk of ``model``'s inference pass takes (≥ 1): about
    :data:`CHUNK_ROWS` token rows (1 + r folded, 1 + 2r otherwise, per query)."""
    return max(1, CHUNK_ROWS // model.inference_tokens)


def chunked(model: QuARIModel, run: Callable[[torch.Tensor], Factors], q: torch.Tensor) -> Factors:
    """``run(q)`` → (q′, U, V) over near-equal chunks of at most :func:`chunk_size` queries,
    concatenated (each query's outputs depend on that query alone, so this is exact)."""
    batch, most = q.shape[0], chunk_size(model)
    if batch <= most:
        return run(q)
    size = -(-batch // -(-batch // most))  # ceil(batch / chunks): no small remainder chunk
    parts = [run(part) for part in q.split(size)]
    return tuple(torch.cat(outputs) for outputs in zip(*parts, strict=True))
