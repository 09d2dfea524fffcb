"""The on-disk layout of an embedding set: shard descriptions, file header checks, the
manifest, and reading a manifest-less clip-retrieval folder.

:mod:`quari.store` builds :class:`~quari.store.EmbeddingSet` on these; nothing here holds open
files or memory maps.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from quari import __version__
from quari.errors import StoreError
from quari.fileio import read_json

__all__ = [
    "Layout",
    "Shard",
    "ShardFile",
    "StoreError",
    "check_shard_files",
    "npy_header",
    "parquet_rows",
    "unlisted_files",
]

MANIFEST = "manifest.json"
FORMAT = "quari-embedding-set"
FORMAT_VERSION = 1
_SHARD_RE = re.compile(r"^img_emb_(\d+)\.npy$")


@dataclass(frozen=True)
class ShardFile:
    """One file of a shard: its path relative to the set root and, when known, its sha256."""

    path: str
    sha256: str | None = None


@dataclass(frozen=True)
class Shard:
    """A row-aligned group of files; rows ``offset … offset + rows − 1`` of the set."""

    index: int
    rows: int
    offset: int
    image: ShardFile
    text: ShardFile | None = None
    metadata: ShardFile | None = None

    def files(self) -> list[ShardFile]:
        return [f for f in (self.image, self.text, self.metadata) if f is not None]


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    data_offset: int


def npy_header(path: Path) -> NpyHeader:
    """Reads and checks an .npy header without loading the data."""
    if not path.is_file():
        raise StoreError(f"{path}: missing")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
    except Exception as exc:  # numpy raises ValueError/EOFError/… on garbage
        raise StoreError(f"{path}: not a valid .npy file ({exc})") from exc
    if fortran or len(shape) != 2:
        raise StoreError(f"{path}: expected a C-ordered 2-D array, got shape {shape}")
    if dtype not in (np.float16, np.float32):
        raise StoreError(f"{path}: expected float16 or float32 embeddings, got {dtype}")
    expected = offset + shape[0] * shape[1] * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise StoreError(
            f"{path}: truncated or padded: the header promises {shape[0]} rows × {shape[1]} "
            f"({expected} bytes), the file has {size} bytes"
        )
    return NpyHeader(shape, dtype, offset)


def parquet_rows(path: Path) -> int:
    """Row count of a parquet file, from its footer."""
    if not path.is_file():
        raise StoreError(f"{path}: missing")
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError on corrupt files
        raise StoreError(f"{path}: not a readable parquet file ({exc})") from exc


@dataclass
class Layout:
    """What a manifest (or a clip-retrieval folder) says about a set."""

    dim: int
    encoder: str
    dtype: str
    normalized: bool
    shards: list[Shard]
    has_manifest: bool
    encoder_info: dict[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        """The manifest.json content for this layout."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "quari_version": __version__,
            "encoder": {"id": self.encoder, **self.encoder_info},
            "dim": self.dim,
            "dtype": self.dtype,
            "normalized": self.normalized,
            "rows": sum(s.rows for s in self.shards),
            "shards": [
                {
                    "index": s.index,
                    "rows": s.rows,
                    **{
                        k: (None if f is None else {"path": f.path, "sha256": f.sha256})
                        for k, f in (("image", s.image), ("text", s.text), ("metadata", s.metadata))
                    },
                }
                for s in self.shards
            ],
        }


def read_manifest(path: Path) -> Layout:
    """Parses and checks a manifest.json (format, version, fields)."""
    data = read_json(path, StoreError)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError(f"{path}: not a quari embedding-set manifest")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(
            f"{path}: format_version {version!r} is newer than this quari supports "
            f"({FORMAT_VERSION}); upgrade quari"
        )
    try:
        shards, offset = [], 0
        for entry in data["shards"]:
            optional = {
                k: ShardFile(**entry[k]) if entry.get(k) else None for k in ("text", "metadata")
            }
            image = ShardFile(**entry["image"])  # required
            shards.append(Shard(int(entry["index"]), int(entry["rows"]), offset, image, **optional))
            offset += int(entry["rows"])
        encoder = data["encoder"]
        return Layout(
            dim=int(data["dim"]),
            encoder=str(encoder["id"]),
            encoder_info={k: v for k, v in encoder.items() if k != "id"},
            dtype=str(data["dtype"]),
            normalized=bool(data["normalized"]),
            shards=shards,
            has_manifest=True,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{path}: malformed manifest ({exc!r})") from exc


def infer_layout(root: Path) -> Layout:
    """Describes a manifest-less clip-retrieval folder from its files (shards in numeric order)."""
    img_dir = root / "img_emb"
    indices = sorted(
        int(m.group(1)) for p in img_dir.glob("img_emb_*.npy") if (m := _SHARD_RE.match(p.name))
    )
    if not indices:
        raise StoreError(f"{root}: no manifest.json and no img_emb/img_emb_*.npy files")
    shards, offset, dims, dtypes = [], 0, set(), set()
    for i in indices:
        header = npy_header(img_dir / f"img_emb_{i}.npy")
        dims.add(header.shape[1])
        dtypes.add(header.dtype.name)
        text = root / "text_emb" / f"text_emb_{i}.npy"
        meta = root / "metadata" / f"metadata_{i}.parquet"
        shards.append(
            Shard(
                i,
                header.shape[0],
                offset,
                ShardFile(f"img_emb/img_emb_{i}.npy"),
                ShardFile(f"text_emb/text_emb_{i}.npy") if text.exists() else None,
                ShardFile(f"metadata/metadata_{i}.parquet") if meta.exists() else None,
            )
        )
        offset += header.shape[0]
    if len(dims) > 1:
        raise StoreError(f"{root}: the dimension changes between shards ({sorted(dims)})")
    first = np.load(img_dir / f"img_emb_{indices[0]}.npy", mmap_mode="r")[:1000]
    norms = np.linalg.norm(first.astype(np.float32), axis=1)
    return Layout(
        dim=dims.pop(),
        encoder="unknown",
        dtype=dtypes.pop(),
        normalized=bool(norms.size == 0 or np.allclose(norms, 1.0, atol=1e-2)),
        shards=shards,
        has_manifest=False,
        encoder_info={"note": "inferred from a clip-retrieval folder"},
    )


SHARD_FOLDERS = ("img_emb", "text_emb", "metadata")


def unlisted_files(root: Path, shards: Sequence[Shard], temporaries: bool = False) -> list[str]:
    """Shard-folder files of ``root`` that no shard in ``shards`` lists (relative paths, sorted).

    Args:
        root: The set's folder.
        shards: The shards a manifest lists.
        temporaries: Also list ``atomic_write``'s temporary files (``.{folder}_….{random}``),
            which killed writes leave behind; other dot-files are never listed.
    """
    listed = {f.path for s in shards for f in s.files()}
    found = []
    for sub in SHARD_FOLDERS:
        for p in (root / sub).glob("*_*.*"):
            rel = f"{sub}/{p.name}"
            if p.name.startswith("."):
                if temporaries and p.name.startswith(f".{sub}_"):
                    found.append(rel)
            elif rel not in listed:
                found.append(rel)
    return sorted(found)


def check_shard_files(
    root: Path,
    dim: int,
    dtype: str,
    shards: Sequence[Shard],
    resolve: Callable[[ShardFile], Path],
) -> None:
    """Checks every shard's files against each other and against what ``shards`` say: image
    embeddings of ``dim`` columns and ``dtype`` with the listed rows, text embeddings of the same
    shape, metadata with as many rows, text and metadata files in all shards or in none.

    Args:
        root: The set's folder (named in messages).
        dim, dtype, shards: What the manifest (or the inferred layout) says.
        resolve: A shard file's path, refused when it leaves the set's folder
            (:meth:`quari.store.EmbeddingSet.path`).

    Raises:
        StoreError: the first mismatch, naming the file.
    """
    kinds: dict[str, set[bool]] = {"text": set(), "metadata": set()}
    for shard in shards:
        where = resolve(shard.image)
        header = npy_header(where)
        if header.shape[1] != dim:
            raise StoreError(f"{where}: dimension {header.shape[1]}, the set has {dim}")
        if header.shape[0] != shard.rows:
            raise StoreError(f"{where}: {header.shape[0]} rows, the manifest says {shard.rows}")
        if header.dtype.name != dtype:
            raise StoreError(f"{where}: dtype {header.dtype}, the manifest says {dtype}")
        kinds["text"].add(shard.text is not None)
        kinds["metadata"].add(shard.metadata is not None)
        if shard.text is not None:
            text = npy_header(resolve(shard.text))
            if text.shape != header.shape:
                raise StoreError(
                    f"{root / shard.text.path}: shape {text.shape}, its image embeddings are "
                    f"{header.shape}"
                )
        if shard.metadata is not None:
            rows = parquet_rows(resolve(shard.metadata))
            if rows != shard.rows:
                raise StoreError(
                    f"{root / shard.metadata.path}: {rows} metadata rows, {where} has "
                    f"{shard.rows} embeddings"
                )
    for kind, present in kinds.items():
        if len(present) > 1:
            raise StoreError(f"{root}: some shards have {kind} files and others not")
