"""Test helpers for encoders and ``quari embed``: tiny transformers models built with no hub, a
deterministic toy encoder, image folders with every kind of bad file, and set comparison."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image

from quari.embed import read_errors
from quari.encoders import EncoderConfig, register_encoder
from quari.store import EmbeddingSet


# -- a deterministic toy encoder (fast: no model to load) ----------------------------------------
class ToyPreprocessor:
    def __call__(self, image: Image.Image) -> dict[str, np.ndarray]:
        small = image.resize((8, 8), Image.Resampling.BILINEAR)
        return {"pixel_values": np.asarray(small, np.float32).reshape(-1) / 255.0}


class ToyEncoder:
    """A fixed random projection of an 8×8 thumbnail; texts hash to vectors. ``delay`` seconds
    of sleep per batch make runs slow enough to kill; ``count_file`` logs encoded rows."""

    dim: ClassVar[int] = 16

    def __init__(self, delay: float = 0.0, count_file: str | None = None) -> None:
        self.id = "toy"
        self.info: dict[str, Any] = {"family": "toy"}
        self.preprocessor = ToyPreprocessor()
        self.proj = np.random.default_rng(0).standard_normal((192, self.dim)).astype(np.float32)
        self.delay = delay
        self.count_file = count_file
        self.encoded = 0

    def _norm(self, x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def encode_batch(self, inputs: dict[str, Any]) -> np.ndarray:
        x = np.asarray(inputs["pixel_values"], np.float32)
        if self.delay:
            time.sleep(self.delay)
        self.encoded += x.shape[0]
        if self.count_file:
            with open(self.count_file, "a") as f:
                f.write(f"{x.shape[0]}\n")
        return self._norm(x @ self.proj + 0.01)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        return self.encode_batch(
            {"pixel_values": np.stack([self.preprocessor(im)["pixel_values"] for im in images])}
        )

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        rows = [
            np.random.default_rng(zlib.crc32(t.encode())).standard_normal(self.dim) for t in texts
        ]
        return self._norm(np.asarray(rows, np.float32).reshape(len(texts), self.dim))


def register_toy() -> None:
    def factory(rest: str, config: EncoderConfig) -> ToyEncoder:
        delay, _, count_file = rest.partition(",")
        return ToyEncoder(float(delay or 0), count_file or None)

    register_encoder("toy", factory, "test-only toy encoder")


# -- image files ---------------------------------------------------------------------------------
def photo(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A smooth random RGB picture (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


def jpeg_bytes(image: Image.Image, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def png_bytes(image: Image.Image, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A tiny valid PNG whose header declares width × height (a decompression bomb's header)."""
    data = bytearray(png_bytes(Image.new("L", (8, 8))))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def exif_rotated_jpeg(image: Image.Image, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation: 6 = rotate 90° clockwise to display
    return jpeg_bytes(image, exif=exif.tobytes())


def bad_files() -> dict[str, tuple[bytes, str]]:
    """File name → (bytes, expected reason prefix) for every kind of unusable file."""
    good = jpeg_bytes(photo(1, (64, 48)))
    return {
        "corrupt.jpg": (b"\xff\xd8 this is not really a jpeg " * 20, "not an image"),
        "empty.png": (b"", "empty file"),
        "truncated.jpg": (good[: len(good) // 2], "truncated"),
        "truncated.png": (png_bytes(photo(2, (64, 48)))[:300], "truncated"),
        "bomb.png": (bomb_png(), "decompression bomb"),
    }


def tricky_files() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """File name → (bytes, (width, height) after decoding) for odd but usable images."""
    cmyk = Image.new("CMYK", (30, 20), (0, 255, 255, 0))  # pure red in CMYK
    grey16 = Image.fromarray(np.full((20, 30), 32768, np.uint16))
    pal = Image.new("P", (30, 20), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, 15, 20))
    la = Image.new("LA", (30, 20), (10, 0))  # fully transparent dark grey
    return {
        "cmyk.jpg": (jpeg_bytes(cmyk), (30, 20)),
        "grey16.png": (png_bytes(grey16), (30, 20)),
        "palette.png": (png_bytes(pal, transparency=0), (30, 20)),
        "la.png": (png_bytes(la), (30, 20)),
        "rotated.jpg": (exif_rotated_jpeg(photo(3, (40, 20))), (20, 40)),
        "bilevel.png": (png_bytes(photo(4).convert("1")), (40, 30)),
    }


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


# -- comparing sets ------------------------------------------------------------------------------
def set_contents(root: Path) -> dict[str, Any]:
    """Everything a reader can see of a set, for equality checks."""
    eset = EmbeddingSet.open(root)
    ids = np.arange(eset.rows)
    return {
        "shards": [(s.index, s.rows) for s in eset.shards],
        "vectors": eset.gather(ids),
        "text": eset.gather(ids, kind="text") if eset.has_text else None,
        "metadata": eset.metadata(ids).to_pydict() if eset.rows else {},
        "errors": read_errors(root).to_pydict(),
        "encoder": eset.encoder,
    }


def assert_same_set(a: Path, b: Path) -> None:
    ca, cb = set_contents(a), set_contents(b)
    assert ca["shards"] == cb["shards"]
    assert ca["encoder"] == cb["encoder"]
    np.testing.assert_array_equal(ca["vectors"], cb["vectors"])
    if ca["text"] is not None or cb["text"] is not None:
        np.testing.assert_array_equal(ca["text"], cb["text"])
    assert ca["metadata"] == cb["metadata"]
    assert ca["errors"] == cb["errors"]
    paths = ca["metadata"].get("path", [])
    assert len(paths) == len(set(paths)), "duplicate rows"


def table_of(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows)
