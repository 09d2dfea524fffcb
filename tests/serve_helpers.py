"""Test helpers for the HTTP service: a tiny served set with image files, a random QuARI
model, and the app over them.

The set holds ``ROWS`` items, each the toy encoder's embedding of a small PNG stored inside the
set folder (metadata ``path``), except row ``TEXT_ROW``, whose vector is the toy encoder's
embedding of ``TEXT_QUERY`` — so in plain mode that text finds that row first (cosine 1), and
each item's own PNG finds that item first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quari import QuARIModel
from quari.checkpoint import save
from quari.index import CandidateIndex
from quari.retriever import Retriever
from quari.store import EmbeddingSet

from embed_helpers import ToyEncoder, photo, png_bytes
from helpers import tiny_config

ROWS = 48
TEXT_QUERY = "a red bicycle"
TEXT_ROW = 7
LABELS = ("cat", "dog", "bird")


@dataclass
class Served:
    """A served set and what it was made from."""

    root: Path
    eset: EmbeddingSet
    encoder: ToyEncoder
    model: QuARIModel
    model_dir: Path
    index: CandidateIndex

    def image_path(self, row: int) -> Path:
        return self.root / "images" / f"{row}.png"

    def retriever(self, *, model: bool = True, encoder: bool = True) -> Retriever:
        return Retriever(
            self.eset,
            self.model if model else None,
            self.index,
            encoder=self.encoder if encoder else None,
        )


def make_served(folder: Path) -> Served:
    """The tiny set, its index and a saved random model, under ``folder``."""
    root = folder / "set"
    encoder = ToyEncoder()
    (root / "images").mkdir(parents=True)
    pictures = [photo(100 + i, (48, 40)) for i in range(ROWS)]
    for i, picture in enumerate(pictures):
        (root / "images" / f"{i}.png").write_bytes(png_bytes(picture))
    vectors = encoder.encode_images(pictures)
    vectors[TEXT_ROW] = encoder.encode_texts([TEXT_QUERY])[0]
    eset = EmbeddingSet.create(root, dim=encoder.dim, encoder="toy")
    eset.append(
        vectors,
        {
            "path": [f"images/{i}.png" for i in range(ROWS)],
            "label": [TEXT_QUERY if i == TEXT_ROW else LABELS[i % 3] for i in range(ROWS)],
            "group": np.arange(ROWS) % 4,
        },
    )
    index = CandidateIndex.build(eset, progress=False)
    torch.manual_seed(0)
    model = QuARIModel(tiny_config(embedding_dim=encoder.dim)).eval()
    model_dir = save(model, folder / "model")
    return Served(root, eset, encoder, model, model_dir, index)
