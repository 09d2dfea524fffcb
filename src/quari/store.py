"""Embedding sets: clip-retrieval's on-disk layout plus a manifest.

An :class:`EmbeddingSet` is a folder of row-aligned shards, exactly as ``clip-retrieval
inference`` writes them, so existing collections open as they are::

    img_emb/img_emb_{i}.npy           (n_i, E) float16, L2-normalised image embeddings
    text_emb/text_emb_{i}.npy         (n_i, E) caption embeddings (optional)
    metadata/metadata_{i}.parquet     n_i rows of metadata (path, caption, … any columns)
    manifest.json                     encoder id, dim, dtype, normalisation, rows and sha256 per
                                      shard file, quari version (written by quari)

Global row ids run over the shards in numeric shard order. Vectors are read through memory maps,
so a set far larger than RAM can be gathered from and scanned. Every structural problem — a
truncated or non-npy file, row counts that differ between the npy and parquet of a shard, a
dimension that changes between shards, a manifest that contradicts the files — raises a
:class:`StoreError` naming the file and the problem. Appends write new shards only (files
written under temporary names, then renamed, then the manifest replaced atomically); existing
shards are never written over. A writer that produces shards out of order (parallel embedding)
appends each with its own ``index``; rows still run in numeric shard order. A shard is committed
once it is listed in the manifest, so a writer killed between renaming its files and replacing
the manifest leaves files that no manifest lists: ``open(..., recover=True)`` deletes them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from filelock import FileLock, Timeout

from quari.errors import LockError, NotFoundError, QuARIInputError
from quari.fileio import atomic_write, inside, sha256_file
from quari.layout import (
    MANIFEST,
    Layout,
    Shard,
    ShardFile,
    StoreError,
    check_shard_files,
    infer_layout,
    read_manifest,
    unlisted_files,
)
from quari.validation import as_embeddings

__all__ = ["EmbeddingSet", "Shard", "StoreError"]  # Shard, StoreError: from quari.layout

_ROW = "__quari_row"  # row-id column added to metadata while filtering
LOCK_FILE = ".quari-write.lock"


class EmbeddingSet:
    """A collection of gallery embeddings (and optional caption embeddings and metadata).

    Open an existing folder with :meth:`open`, start a new one with :meth:`create`, add rows with
    :meth:`append`.

    Example:
        >>> s = EmbeddingSet.create("photos", dim=4, encoder="test")  # doctest: +SKIP
        >>> s.append(np.eye(4), {"path": ["a", "b", "c", "d"]})  # doctest: +SKIP
        >>> s.gather([2, 0])  # doctest: +SKIP
    """

    def __init__(
        self,
        root: Path,
        *,
        dim: int,
        encoder: str,
        dtype: str,
        normalized: bool,
        shards: Sequence[Shard],
        has_manifest: bool,
        encoder_info: dict[str, Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.dim = dim
        self.encoder = encoder
        self.encoder_info = dict(encoder_info or {})
        self.dtype = dtype
        self.normalized = normalized
        self.shards: tuple[Shard, ...] = tuple(shards)
        self.has_manifest = has_manifest
        self._maps: dict[tuple[str, int], np.ndarray] = {}
        self._tables: dict[int, pa.Table] = {}
        self.follow_links: bool | None = None  # None: $QUARI_FOLLOW_LINKS decides
        # Re-entrant per object (not per thread: a job's writer threads share it); another
        # EmbeddingSet of the same folder, in any process, is another holder and is refused.
        self._lock = FileLock(self.root / LOCK_FILE, thread_local=False, preserve_lock_file=True)

    def path(self, file: ShardFile) -> Path:
        """The path of one of the set's files, refused unless it lies inside the set's folder
        (``..``, absolute paths and links that leave it; see :func:`quari.fileio.inside`)."""
        return inside(self.root, file.path, error=StoreError, follow_links=self.follow_links)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: str | os.PathLike[str],
        *,
        dim: int,
        encoder: str,
        encoder_info: dict[str, Any] | None = None,
    ) -> EmbeddingSet:
        """Starts a new, empty set in ``root`` (which must not already hold a set).

        Args:
            root: Folder for the set (created if needed).
            dim: Embedding dimension E.
            encoder: Identifier of the encoder that makes the embeddings (recorded in the
                manifest; sets from different encoders are never mixed).
            encoder_info: Extra facts about the encoder (revision, preprocessing …).
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise QuARIInputError(
                f"{root}: exists and is not a folder; choose a folder for the set"
            )
        if (root / MANIFEST).exists() or (root / "img_emb").exists():
            raise StoreError(f"{root}: already holds an embedding set; open it instead")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise QuARIInputError(f"dim must be a positive integer, got {dim!r}")
        root.mkdir(parents=True, exist_ok=True)
        eset = cls(
            root,
            dim=dim,
            encoder=encoder,
            dtype="float16",
            normalized=True,
            shards=(),
            has_manifest=True,
            encoder_info=encoder_info,
        )
        eset._write_manifest()
        return eset

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        *,
        recover: bool = False,
        follow_links: bool | None = None,
    ) -> EmbeddingSet:
        """Opens a set written by quari, or clip-retrieval output without a manifest.

        Structural checks run here (headers, sizes, row counts, dims); checksums are checked
        by :meth:`verify`, which reads every byte.

        Args:
            root: The set's folder.
            recover: Delete shard files the manifest does not list, and temporary files of
                interrupted writes, instead of refusing to open. They are what a writer killed
                after renaming a shard's files but before committing the manifest leaves behind;
                no reader has ever seen them. Only the process that owns the set (a resumed
                ``quari embed``) should pass this.
            follow_links: Accept shard files that are symlinks to places outside the folder
                (default: ``$QUARI_FOLLOW_LINKS``); paths with ``..`` or absolute paths are
                refused always.

        Raises:
            NotFoundError: ``root`` is not a folder.
            StoreError: naming the file and the problem.
        """
        root = Path(root)
        if not root.is_dir():
            what = "not a folder" if root.exists() else "no such folder"
            raise NotFoundError(f"{root}: {what}; expected an embedding set folder")
        manifest = root / MANIFEST
        layout = read_manifest(manifest) if manifest.exists() else infer_layout(root)
        eset = cls(root, **vars(layout))
        eset.follow_links = follow_links
        if recover and eset.has_manifest:
            with eset.writing():  # never delete what a live writer is still committing
                for rel in eset.uncommitted_files():
                    (root / rel).unlink(missing_ok=True)
        eset._check_files()
        return eset

    def uncommitted_files(self) -> list[str]:
        """Files under the shard folders that the manifest does not list (relative paths, sorted):
        shards renamed into place but never committed, and temporary files of killed writes."""
        if not self.has_manifest:
            return []
        return unlisted_files(self.root, self.shards, temporaries=True)

    def _check_files(self) -> None:
        """Cross-checks every shard's files against each other and against the manifest."""
        check_shard_files(self.root, self.dim, self.dtype, self.shards, self.path)
        if self.has_manifest and (unlisted := unlisted_files(self.root, self.shards)):
            raise StoreError(
                f"{self.root}: {unlisted[:5]} not in {MANIFEST} (left by an interrupted "
                "append?); move them away or delete them, or resume the job that wrote them"
            )

    def __len__(self) -> int:
        return self.rows

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def has_text(self) -> bool:
        return bool(self.shards) and self.shards[0].text is not None

    @property
    def has_metadata(self) -> bool:
        return bool(self.shards) and self.shards[0].metadata is not None

    @property
    def fingerprint(self) -> list[list[Any]]:
        """[rows, identity] per shard: the sha256 where known, else size and mtime."""
        out = []
        for s in self.shards:
            ident = s.image.sha256
            if ident is None:
                st = self.path(s.image).stat()
                ident = f"size={st.st_size},mtime={st.st_mtime_ns}"
            out.append([s.rows, ident])
        return out

    def __repr__(self) -> str:
        return (
            f"EmbeddingSet({str(self.root)!r}, rows={self.rows}, dim={self.dim}, "
            f"encoder={self.encoder!r}, shards={len(self.shards)})"
        )

    @cached_property
    def _offsets(self) -> np.ndarray:
        return np.array([s.offset for s in self.shards] + [self.rows], dtype=np.int64)

    def locate(self, row: int) -> tuple[Shard, int]:
        """The shard holding global row ``row`` and the row's index inside it."""
        ids = self._check_ids(np.asarray([row]))
        shard = self.shards[int(np.searchsorted(self._offsets, ids[0], side="right")) - 1]
        return shard, int(ids[0]) - shard.offset

    # -- reading ---------------------------------------------------------------------------------
    def _map(self, shard: Shard, kind: str) -> np.ndarray:
        key = (kind, shard.index)
        if key not in self._maps:
            f = shard.image if kind == "image" else shard.text
            if f is None:
                raise StoreError(f"{self.root}: the set has no {kind} embeddings")
            self._maps[key] = np.load(self.path(f), mmap_mode="r")
        return self._maps[key]

    def _check_ids(self, ids: Any) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise QuARIInputError(f"row ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False).reshape(-1)
        bad = (arr < 0) | (arr >= self.rows)
        if bad.any():
            raise NotFoundError(
                f"unknown row id {int(arr[bad][0])}: the set has rows 0 … {self.rows - 1}"
            )
        return arr

    def gather(self, ids: Any, kind: str = "image") -> np.ndarray:
        """Exact stored vectors of the given global row ids, in the given order.

        Args:
            ids: Integer row ids (any shape; duplicates allowed).
            kind: ``"image"`` (gallery embeddings) or ``"text"`` (caption embeddings).

        Returns:
            Array of shape ``ids.shape + (E,)`` in the stored dtype (float16).

        Raises:
            QuARIInputError: an id outside ``0 … rows − 1``.
        """
        shape = np.shape(ids)
        flat = self._check_ids(ids)
        out = np.empty((flat.size, self.dim), dtype=self.dtype)
        shard_of = np.searchsorted(self._offsets, flat, side="right") - 1
        order = np.argsort(flat, kind="stable")  # ascending ids: sequential reads per shard
        sorted_shards = shard_of[order]
        bounds = np.flatnonzero(np.diff(sorted_shards)) + 1
        for group in np.split(order, bounds):
            if group.size == 0:
                continue
            shard = self.shards[int(shard_of[group[0]])]
            out[group] = self._map(shard, kind)[flat[group] - shard.offset]
        return out.reshape(*shape, self.dim)

    def iter_chunks(
        self, chunk_rows: int = 1 << 16, kind: str = "image"
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yields ``(global offset, rows)`` memmap slices covering the set in order — the input
        :meth:`quari.Adaptation.scan` and index builds take."""
        for shard in self.shards:
            mm = self._map(shard, kind)
            for start in range(0, shard.rows, chunk_rows):
                yield shard.offset + start, mm[start : start + chunk_rows]

    def iter_gathered(
        self, ids: np.ndarray, chunk_rows: int = 1 << 16, kind: str = "image"
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Like :meth:`iter_chunks` over a subset: yields ``(position in ids, vectors)``."""
        ids = self._check_ids(ids)
        for start in range(0, ids.size, chunk_rows):
            yield start, self.gather(ids[start : start + chunk_rows], kind)

    def metadata_table(self, shard: Shard) -> pa.Table:
        """The metadata of one shard (cached, memory-mapped)."""
        if shard.metadata is None:
            raise StoreError(f"{self.root}: the set has no metadata")
        if shard.index not in self._tables:
            path = self.path(shard.metadata)
            try:
                self._tables[shard.index] = pq.read_table(path, memory_map=True)
            except Exception as exc:
                raise StoreError(f"{path}: not a readable parquet file ({exc})") from exc
        return self._tables[shard.index]

    def metadata(self, ids: Any, columns: Sequence[str] | None = None) -> pa.Table:
        """Metadata rows of the given row ids, in the given order (empty columns if none)."""
        flat = self._check_ids(ids)
        if not self.has_metadata:
            return pa.table({"row": pa.array(flat)})
        shard_of = np.searchsorted(self._offsets, flat, side="right") - 1
        parts, positions = [], []
        for s in np.unique(shard_of):
            shard = self.shards[int(s)]
            pos = np.flatnonzero(shard_of == s)
            table = self.metadata_table(shard)
            if columns is not None:
                table = table.select(list(columns))
            parts.append(table.take(pa.array(flat[pos] - shard.offset)))
            positions.append(pos)
        if not parts:
            schema = self.metadata_table(self.shards[0]).schema
            empty = schema.empty_table()
            return empty.select(list(columns)) if columns is not None else empty
        table = pa.concat_tables(parts, promote_options="permissive")
        inverse = np.argsort(np.concatenate(positions), kind="stable")
        return table.take(pa.array(inverse))

    def select(self, where: pc.Expression) -> np.ndarray:
        """Row ids (ascending) whose metadata satisfies a pyarrow expression.

        Example:
            >>> s.select(pc.field("label") == "cat")  # doctest: +SKIP
        """
        if not self.has_metadata:
            raise StoreError(f"{self.root}: the set has no metadata to filter on")
        out = []
        for shard in self.shards:
            table = self.metadata_table(shard)
            rows = pa.array(np.arange(shard.offset, shard.offset + shard.rows, dtype=np.int64))
            table = table.append_column(_ROW, rows)
            try:
                hits = ds.dataset(table).to_table(columns=[_ROW], filter=where)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
                raise QuARIInputError(f"filter {where} cannot be applied: {exc}") from exc
            out.append(hits.column(_ROW).to_numpy())
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    # -- writing ---------------------------------------------------------------------------------
    def append(
        self,
        vectors: Any,
        metadata: pa.Table | dict[str, Any] | None = None,
        text_vectors: Any = None,
        *,
        index: int | None = None,
    ) -> Shard:
        """Adds one shard of rows (L2-normalised, stored as float16).

        Args:
            vectors: (n, E) image embeddings.
            metadata: n rows of metadata (a pyarrow Table, or a dict of equal-length columns).
                Required once the set has metadata; all shards share column names and types.
            text_vectors: (n, E) caption embeddings; required once the set has them.
            index: The shard's number; by default one past the highest. A writer whose shards
                finish out of order gives each its own number; the set's rows always run in
                numeric shard order, so a shard inserted below existing ones shifts their row
                ids (candidate indexes notice and ask for a rebuild).

        Returns:
            The new :class:`Shard`.

        Raises:
            QuARIInputError: wrong dimension, NaN/Inf or zero rows, mismatched row counts or
                metadata columns, a negative or already used ``index``.
            StoreError: the set was opened without a manifest (it is read-only to quari) or a
                target file already exists.
            LockError: another writer (another process, or another object in this one) holds
                the set.
        """
        if not self.has_manifest:
            raise StoreError(
                f"{self.root}: has no {MANIFEST} (a clip-retrieval folder); quari opens it "
                "read-only — write a new set to append"
            )
        with self.writing():
            self._refresh()
            return self._append(vectors, metadata, text_vectors, index)

    def _append(self, vectors: Any, metadata: Any, text_vectors: Any, index: int | None) -> Shard:
        img = self._prepare(vectors, "vectors")
        n = img.shape[0]
        txt = None if text_vectors is None else self._prepare(text_vectors, "text_vectors")
        if txt is not None and txt.shape[0] != n:
            raise QuARIInputError(f"text_vectors has {txt.shape[0]} rows, vectors has {n}")
        table = None if metadata is None else self._metadata_for(metadata, n)
        if self.shards:
            for what, have, new in (
                ("text embeddings", self.has_text, txt is not None),
                ("metadata", self.has_metadata, table is not None),
            ):
                if have != new:
                    raise QuARIInputError(
                        f"the set {'has' if have else 'has no'} {what}; every shard must "
                        f"{'include' if have else 'omit'} them"
                    )
        if index is None:
            index = max((s.index for s in self.shards), default=-1) + 1
        elif isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise QuARIInputError(f"index must be a non-negative integer, got {index!r}")
        elif any(s.index == index for s in self.shards):
            raise QuARIInputError(f"{self.root}: shard {index} already exists")
        plan = [("image", f"img_emb/img_emb_{index}.npy", img)]
        if txt is not None:
            plan.append(("text", f"text_emb/text_emb_{index}.npy", txt))
        if table is not None:
            plan.append(("metadata", f"metadata/metadata_{index}.parquet", table))
        for _, rel, _ in plan:
            if (self.root / rel).exists():
                raise StoreError(f"{self.root / rel}: already exists; refusing to overwrite it")
        written: dict[str, ShardFile] = {}
        try:
            for kind, rel, payload in plan:
                written[kind] = ShardFile(rel, self._write_new(self.root / rel, payload))
            before = self.shards
            new = Shard(index, n, 0, written["image"], written.get("text"), written.get("metadata"))
            self._set_shards([*before, new])
            self._write_manifest()
        except BaseException:
            for f in written.values():  # never leave half a shard behind
                (self.root / f.path).unlink(missing_ok=True)
            if any(s.index == index for s in self.shards):
                self._set_shards([s for s in self.shards if s.index != index])
            raise
        return next(s for s in self.shards if s.index == index)

    @contextlib.contextmanager
    def writing(self) -> Iterator[EmbeddingSet]:
        """Holds the set's exclusive write lock (``.quari-write.lock``, an OS file lock) for the
        duration of the block, so that no other writer — another process, or another
        :class:`EmbeddingSet` of the same folder — appends meanwhile. Re-entrant; every
        :meth:`append` takes it for its own duration, and long jobs (``quari embed``) hold it
        for the whole run.

        Raises:
            LockError: another writer holds it (the message says what to do).

        Example:
            >>> with eset.writing():  # doctest: +SKIP
            ...     eset.append(vectors_a); eset.append(vectors_b)
        """
        try:
            self._lock.acquire(blocking=False)
        except Timeout:
            raise LockError(
                f"{self.root}: another writer is appending to this set (it holds {LOCK_FILE}); "
                "wait until it finishes"
            ) from None
        try:
            yield self
        finally:
            self._lock.release()

    def _refresh(self) -> None:
        """Takes in shards another writer committed since this object read the manifest (called
        under the write lock, so that an append never drops a shard it did not know about)."""
        manifest = self.root / MANIFEST
        if not manifest.exists():
            return
        on_disk = read_manifest(manifest).shards
        mine = {s.index: s for s in self.shards}
        theirs = {s.index: s for s in on_disk}
        lost = [i for i in mine if i not in theirs or theirs[i].image != mine[i].image]
        if lost:
            raise StoreError(
                f"{self.root}: {MANIFEST} no longer lists shard(s) {lost[:5]} this object holds "
                "(the set was rewritten since it was opened); open it again"
            )
        if len(theirs) != len(mine):
            self._set_shards(on_disk)

    def _set_shards(self, shards: Sequence[Shard]) -> None:
        """Orders shards by index and recomputes their row offsets."""
        ordered, offset = [], 0
        for s in sorted(shards, key=lambda s: s.index):
            ordered.append(replace(s, offset=offset))
            offset += s.rows
        self.shards = tuple(ordered)
        self.__dict__.pop("_offsets", None)

    def _prepare(self, vectors: Any, name: str) -> np.ndarray:
        # Normalised in float64 so the stored fp16 value is the correctly rounded unit vector.
        t = as_embeddings(vectors, self.dim, name, dtype=torch.float64)
        norms = t.norm(dim=-1)
        zero = (norms == 0).nonzero().flatten()
        if zero.numel():
            raise QuARIInputError(f"{name}: row {int(zero[0])} has zero norm (no direction)")
        return (t / norms[:, None]).numpy().astype(np.float16)

    def _metadata_for(self, metadata: Any, n: int) -> pa.Table:
        try:
            table = metadata if isinstance(metadata, pa.Table) else pa.table(metadata)
        except (TypeError, ValueError, pa.ArrowInvalid) as exc:
            raise QuARIInputError(f"metadata: cannot be made into a table ({exc})") from exc
        if table.num_rows != n:
            raise QuARIInputError(f"metadata has {table.num_rows} rows, vectors has {n}")
        if _ROW in table.column_names:
            raise QuARIInputError(f"metadata: the column name {_ROW!r} is reserved")
        if self.has_metadata:
            schema = self.metadata_table(self.shards[0]).schema
            if table.schema.names != schema.names:
                raise QuARIInputError(
                    f"metadata columns {table.schema.names} differ from the set's {schema.names}"
                )
            for f_new, f_old in zip(table.schema, schema, strict=True):
                if f_new.type != f_old.type:
                    raise QuARIInputError(
                        f"metadata column {f_new.name!r} has type {f_new.type}, the set's is "
                        f"{f_old.type}"
                    )
        return table

    def _write_new(self, path: Path, payload: np.ndarray | pa.Table) -> str:
        """Writes a new shard file crash-safely and returns its sha256."""
        if isinstance(payload, np.ndarray):
            atomic_write(path, lambda f: np.lib.format.write_array(f, payload, allow_pickle=False))
        else:
            atomic_write(path, lambda f: pq.write_table(payload, f))
        return sha256_file(path)

    def _write_manifest(self) -> None:
        layout = Layout(self.dim, self.encoder, self.dtype, self.normalized, list(self.shards),
                        True, self.encoder_info)  # fmt: skip
        text = json.dumps(layout.manifest(), indent=2) + "\n"
        atomic_write(self.root / MANIFEST, lambda f: f.write(text.encode()))
        self.has_manifest = True

    def write_manifest(self, encoder: str | None = None) -> None:
        """Adopts a manifest-less clip-retrieval folder: computes checksums and writes
        ``manifest.json`` (optionally recording the encoder), after which the set can be
        appended to. Existing files are not changed."""
        if encoder is not None:
            self.encoder = encoder
        self.shards = tuple(
            replace(
                s,
                **{
                    k: (None if f is None else ShardFile(f.path, sha256_file(self.path(f))))
                    for k, f in (("image", s.image), ("text", s.text), ("metadata", s.metadata))
                },
            )
            for s in self.shards
        )
        self._write_manifest()

    # -- checking --------------------------------------------------------------------------------
    def verify(self, chunk_rows: int = 1 << 16) -> None:
        """Reads every byte: checksums against the manifest and NaN/Inf/zero rows.

        Raises:
            StoreError: naming the shard file and the first problem found.
        """
        for shard in self.shards:
            for f in shard.files():
                if f.sha256 is not None and sha256_file(self.path(f)) != f.sha256:
                    raise StoreError(f"{self.root / f.path}: checksum differs from {MANIFEST}")
            for kind in ("image", "text") if shard.text is not None else ("image",):
                mm = self._map(shard, kind)
                f = shard.image if kind == "image" else shard.text
                for start in range(0, shard.rows, chunk_rows):
                    block = np.asarray(mm[start : start + chunk_rows], dtype=np.float32)
                    finite = np.isfinite(block).all(axis=1)
                    zero = ~block.any(axis=1)
                    bad = np.flatnonzero(~finite | zero)
                    if bad.size:
                        row = start + int(bad[0])
                        what = "NaN or Inf" if not finite[bad[0]] else "an all-zero vector"
                        raise StoreError(
                            f"{self.root / f.path}: row {row} (global row {shard.offset + row}) "
                            f"holds {what}"
                        )
