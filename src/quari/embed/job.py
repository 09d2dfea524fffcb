"""``quari embed``: images (+ captions) → an :class:`~quari.store.EmbeddingSet`, resumably.

The input's items are cut into chunks of ``rows_per_shard`` in their fixed order; chunk *i*
becomes shard *i* of the set (``img_emb_{i}.npy``, ``metadata_{i}.parquet``, ``text_emb_{i}.npy``
for captions). A chunk is done when shard *i* is in the manifest — the store commits a shard by
renaming its files into place and then atomically replacing ``manifest.json``, so this marker is
crash-safe — or, for a chunk whose every image was bad, when ``errors/errors_{i}.parquet`` lists
all of them. A rerun of the same command after a kill at any point:

1. reopens the set with ``recover=True``, deleting shard files a killed append renamed into
   place but never committed (they are recomputed);
2. checks the inputs (names and sizes), chunk size and encoder are those of the first run
   (``embed_job.json``), refusing otherwise;
3. computes only the chunks that are not done, appending each with its own shard index.

So no finished shard is recomputed and no row is written twice. Images that cannot be used
(see :mod:`quari.embed.images`) are skipped and listed with the reason in
``errors/errors_{i}.parquet`` (columns ``path``, ``reason``, ``shard``); the run never stops on
one file.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from quari.embed.engine import ChunkBuffer, EmbedConfig, Engine, engine_for
from quari.embed.sources import Source, open_source
from quari.encoders import Encoder, EncoderConfig, load_encoder
from quari.fileio import atomic_write
from quari.store import EmbeddingSet, StoreError
from quari.validation import QuARIInputError

__all__ = ["EmbedResult", "embed", "read_errors"]

JOB_FILE = "embed_job.json"
ERRORS_DIR = "errors"


@dataclass
class EmbedResult:
    """What a run did. ``embedded``/``skipped`` count the whole set, resumed parts included;
    :func:`read_errors` lists the skipped files and why."""

    set: EmbeddingSet
    images: int
    embedded: int
    skipped: int
    shards_written: int
    shards_reused: int
    seconds: float


def chunk_bounds(n: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """``[(start, end), …]`` of the input chunks."""
    return [(s, min(s + rows_per_shard, n)) for s in range(0, n, rows_per_shard)]


def _errors_path(root: Path, index: int) -> Path:
    return root / ERRORS_DIR / f"errors_{index}.parquet"


def read_errors(root: str | os.PathLike[str]) -> pa.Table:
    """All skipped images of a set: ``path``, ``reason``, ``shard`` (empty if none)."""
    files = sorted(
        (Path(root) / ERRORS_DIR).glob("errors_*.parquet"),
        key=lambda p: int(p.stem.split("_")[1]),
    )
    if not files:
        return pa.table(
            {"path": pa.array([], pa.string()), "reason": pa.array([], pa.string()),
             "shard": pa.array([], pa.int64())}
        )  # fmt: skip
    return pa.concat_tables([pq.read_table(f) for f in files])


def _done_chunks(eset: EmbeddingSet, bounds: list[tuple[int, int]]) -> set[int]:
    done = {s.index for s in eset.shards}
    for i, (start, end) in enumerate(bounds):
        path = _errors_path(eset.root, i)
        if i not in done and path.is_file():
            try:
                if pq.ParquetFile(path).metadata.num_rows == end - start:
                    done.add(i)  # every image of the chunk was bad: nothing to append
            except Exception:
                path.unlink()  # unreadable: rewritten when the chunk is redone
    return done


def _open_or_create(out: Path, encoder: Encoder, job: dict[str, Any]) -> EmbeddingSet:
    job_path = out / JOB_FILE
    if (out / "manifest.json").exists():
        eset = EmbeddingSet.open(out, recover=True)
        if eset.encoder != encoder.id or eset.dim != encoder.dim:
            raise QuARIInputError(
                f"{out}: holds embeddings of {eset.encoder} ({eset.dim}-d), not of "
                f"{encoder.id} ({encoder.dim}-d); write to another folder"
            )
        if job_path.is_file():
            before = json.loads(job_path.read_text())
            for key, what in (
                ("fingerprint", "the input images (names or sizes)"),
                ("rows_per_shard", "--rows-per-shard"),
            ):
                if before.get(key) != job[key]:
                    raise QuARIInputError(
                        f"{out}: {what} changed since this set was started "
                        f"({before.get(key)!r} then, {job[key]!r} now); resume with the same "
                        "inputs and settings, or write to a new folder"
                    )
            return eset
        if eset.shards:
            raise StoreError(f"{out}: an embedding set not made by `quari embed`; use a new folder")
    else:
        eset = EmbeddingSet.create(
            out, dim=encoder.dim, encoder=encoder.id, encoder_info=encoder.info
        )
    text = json.dumps(job, indent=2, default=str) + "\n"
    atomic_write(job_path, lambda f: f.write(text.encode()))
    return eset


def write_chunk(eset: EmbeddingSet, source: Source, chunk: ChunkBuffer) -> int:
    """Writes one finished chunk: its errors file, then its shard (if any image was good).
    Returns the number of rows appended."""
    path = _errors_path(eset.root, chunk.index)
    if chunk.errors:
        bad = sorted(chunk.errors)
        table = pa.table(
            {
                "path": [source.items[chunk.start + p].path for p in bad],
                "reason": [chunk.errors[p] for p in bad],
                "shard": pa.array([chunk.index] * len(bad), pa.int64()),
            }
        )
        atomic_write(path, lambda f: pq.write_table(table, f))
    else:
        path.unlink(missing_ok=True)  # left by an earlier try that could not read a file
    good = sorted(chunk.vectors)
    if not good:
        return 0
    rows = [chunk.start + p for p in good]
    meta: dict[str, Any] = {"path": [source.items[r].path for r in rows]}
    extra = source.columns.take(pa.array(rows, pa.int64()))
    for name in extra.column_names:
        meta[name] = extra.column(name)
    meta["width"] = pa.array([chunk.sizes[p][0] for p in good], pa.int64())
    meta["height"] = pa.array([chunk.sizes[p][1] for p in good], pa.int64())
    texts = np.stack([chunk.texts[p] for p in good]) if source.has_captions else None
    eset.append(
        np.stack([chunk.vectors[p] for p in good]), pa.table(meta), texts, index=chunk.index
    )
    return len(good)


def embed(
    source: Source | str | os.PathLike[str],
    out: str | os.PathLike[str],
    encoder: Encoder | str = "offline",
    config: EmbedConfig | None = None,
    encoder_config: EncoderConfig | None = None,
    *,
    engine: Engine | None = None,
) -> EmbedResult:
    """Embeds every image of an input into an embedding set, resuming an interrupted run.

    Args:
        source: A :class:`~quari.embed.sources.Source` or a path for
            :func:`~quari.embed.sources.open_source`.
        out: Folder of the embedding set (created, or resumed when it holds this job's set).
        encoder: An :class:`~quari.encoders.Encoder` or a spec string for
            :func:`~quari.encoders.load_encoder` (the Ray engine needs a spec string, or an
            encoder made by ``load_encoder``, since each actor loads its own copy).
        config: Chunking, batching, workers, engine.
        encoder_config: Device, threads, fp16 (when ``encoder`` is a spec).
        engine: An engine function to run instead of the one ``config.engine`` names (e.g. one
            that fills the chunks with vectors computed earlier: ``quari encoders fit-offline
            --write-set``); the set, its job file and its resumption are the job's as ever.

    Returns:
        An :class:`EmbedResult`.

    Example:
        >>> r = embed("photos/", "photos.set", "offline:heads/mine")  # doctest: +SKIP
        >>> r.embedded, r.skipped  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    config = config or EmbedConfig()
    run = engine or engine_for(config.engine)
    src = source if isinstance(source, Source) else open_source(source)
    if not src.items:
        raise QuARIInputError(f"{src.location}: no images found")
    enc = load_encoder(encoder, encoder_config) if isinstance(encoder, str) else encoder
    if config.batch_size is None:
        cuda = getattr(getattr(enc, "device", None), "type", "cpu") == "cuda"
        config = replace(config, batch_size=64 if cuda else 16)
    out = Path(out)
    bounds = chunk_bounds(len(src), config.rows_per_shard)
    job = {
        "source": src.describe(),
        "fingerprint": src.fingerprint(),
        "rows_per_shard": config.rows_per_shard,
        "chunks": len(bounds),
        "encoder": enc.id,
    }
    eset = _open_or_create(out, enc, job)
    done = _done_chunks(eset, bounds)
    pending = [ChunkBuffer(i, s, e - s) for i, (s, e) in enumerate(bounds) if i not in done]
    written = 0
    if pending:
        with eset.writing():  # the whole run: a second writer is refused, not interleaved
            for chunk in run(src, enc, pending, config, encoder_config):
                write_chunk(eset, src, chunk)
                written += 1
    errors = read_errors(out)
    return EmbedResult(
        set=eset,
        images=len(src),
        embedded=eset.rows,
        skipped=errors.num_rows,
        shards_written=written,
        shards_reused=len(bounds) - len(pending),
        seconds=time.perf_counter() - t0,
    )
