"""Inputs of ``quari embed``: an image folder, a table of paths, or webdataset tar shards.

Every source lists its items in one deterministic order (sorted paths; table row order; tar
member order), so input chunk *i* is the same images on every run — what lets an interrupted
run resume by shard number. A source also carries the per-item metadata that goes into the set:
``path`` (relative to the input), ``caption`` when there are captions, and any extra columns.

Webdataset shards are read with the standard library's ``tarfile``: the members are indexed once
(name, offset, size) and each image is then read by seeking to its bytes, so items can be decoded
in any worker in any order without the ``webdataset`` package. Compressed tars cannot be seeked
and are refused; webdataset shards are normally plain ``.tar``.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from quari.validation import QuARIInputError

__all__ = ["IMAGE_EXTENSIONS", "Item", "Source", "open_source"]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".ppm", ".pgm"}
)
_PATH_COLUMNS = ("path", "image_path", "filepath", "file", "image", "filename")
_CAPTION_COLUMNS = ("caption", "text", "title")


#: Largest file read as one image (the decoder's pixel limit applies after that).
MAX_ITEM_BYTES = 256 << 20


@dataclass(frozen=True)
class Item:
    """One input image: where its bytes are and how it is named in the metadata.

    Attributes:
        path: Name written to the set's ``path`` column.
        file: The file holding the bytes (the image itself, or a tar shard).
        offset: Byte offset inside ``file`` for tar members; ``-1`` for a whole file.
        size: Byte count for tar members; ``-1`` for a whole file.
    """

    path: str
    file: str
    offset: int = -1
    size: int = -1

    def read(self, max_bytes: int = MAX_ITEM_BYTES) -> bytes:
        """The item's bytes.

        Only regular files are opened (a FIFO would block the run forever, ``/dev/zero``
        would exhaust memory), and at most ``max_bytes`` are read.

        Raises:
            OSError: the file is gone, is not a regular file, or is larger than ``max_bytes``.
        """
        st = os.stat(self.file)  # follows links: the target must be a regular file
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"not a regular file: {self.file}")
        size = st.st_size if self.offset < 0 else self.size
        if size > max_bytes:
            raise OSError(f"{size:,} bytes, over the {max_bytes:,}-byte limit per image")
        with open(self.file, "rb") as f:
            if self.offset >= 0:
                f.seek(self.offset)
            data = f.read(size + 1 if self.offset < 0 else size)
        if len(data) > max_bytes:  # grew while being read
            raise OSError(f"over the {max_bytes:,}-byte limit per image")
        return data


@dataclass
class Source:
    """Items in their fixed order plus row-aligned metadata columns.

    Attributes:
        kind: ``"folder"``, ``"table"`` or ``"webdataset"``.
        location: The input path as given.
        items: The images, in order.
        columns: Metadata columns (``caption`` and extras), one value per item; ``path``,
            ``width`` and ``height`` are added when rows are written.
        caption_column: Name of the caption column in ``columns``, or ``None``.
    """

    kind: str
    location: str
    items: list[Item]
    columns: pa.Table = field(default_factory=lambda: pa.table({}))
    caption_column: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def has_captions(self) -> bool:
        return self.caption_column is not None

    def captions(self, rows: list[int]) -> list[str]:
        """Captions of the given item numbers ("" where one is missing)."""
        if self.caption_column is None:
            return []
        col = self.columns.column(self.caption_column).take(pa.array(rows, pa.int64()))
        return ["" if c is None else str(c) for c in col.to_pylist()]

    def fingerprint(self) -> str:
        """sha256 over the item names and sizes: a resumed run checks its inputs are the same."""
        h = hashlib.sha256()
        for it in self.items:
            size = it.size if it.size >= 0 else _size(it.file)
            h.update(f"{it.path}\0{size}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "location": self.location,
            "items": len(self.items),
            "captions": self.caption_column,
            "columns": self.columns.column_names,
        }


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def folder_source(root: Path) -> Source:
    """Every image under ``root`` (recursive, sorted by relative path). A caption is read from
    a ``.txt`` file beside an image with the same stem (``cat.jpg`` + ``cat.txt``)."""
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and _is_image(p.name)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    items = [Item(p.relative_to(root).as_posix(), str(p)) for p in files]
    sidecars = [p.with_suffix(".txt") for p in files]
    table, caption = pa.table({}), None
    if any(s.is_file() for s in sidecars):
        caption = "caption"
        table = pa.table(
            {
                caption: [
                    s.read_text(errors="replace").strip() if s.is_file() else None for s in sidecars
                ]
            }
        )
    return Source("folder", str(root), items, table, caption)


def table_source(
    path: Path, path_column: str | None = None, caption_column: str | None = None
) -> Source:
    """Rows of a CSV or parquet file; image paths are relative to the file's folder."""
    try:
        parquet = path.suffix.lower() == ".parquet"
        table = pq.read_table(path) if parquet else pacsv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise QuARIInputError(f"{path}: cannot read the table ({exc})") from exc
    names = table.column_names
    path_column = path_column or next((c for c in _PATH_COLUMNS if c in names), None)
    if path_column not in names:
        raise QuARIInputError(
            f"{path}: no image path column (looked for {path_column or ', '.join(_PATH_COLUMNS)}; "
            f"columns are {names}); name it with --path-column"
        )
    if caption_column is not None and caption_column not in names:
        raise QuARIInputError(f"{path}: no caption column {caption_column!r} (columns: {names})")
    caption_column = caption_column or next((c for c in _CAPTION_COLUMNS if c in names), None)
    base = path.parent
    items = []
    for value in table.column(path_column).to_pylist():
        if value is None:
            raise QuARIInputError(f"{path}: column {path_column!r} has an empty value")
        p = Path(str(value))
        items.append(Item(str(value), str(p if p.is_absolute() else base / p)))
    extras = table.drop_columns([path_column])
    if "path" in extras.column_names:
        extras = extras.rename_columns(
            ["source_path" if c == "path" else c for c in extras.column_names]
        )
    if caption_column is not None and caption_column != "caption":
        if "caption" in extras.column_names:
            raise QuARIInputError(f"{path}: both 'caption' and {caption_column!r} columns")
        extras = extras.rename_columns(
            ["caption" if c == caption_column else c for c in extras.column_names]
        )
    return Source("table", str(path), items, extras, "caption" if caption_column else None)


def webdataset_source(shards: list[Path], root: Path) -> Source:
    """Samples of webdataset tar shards: members grouped by key (the name up to the first dot
    of the file name); the image member becomes the item, ``.txt`` the caption, ``.json`` a
    ``json`` column."""
    items: list[Item] = []
    keys: list[str] = []
    captions: list[str | None] = []
    jsons: list[str | None] = []
    for shard in shards:
        rel = shard.relative_to(root).as_posix()
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, mode="r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    pure = PurePosixPath(m.name)
                    key = str(pure.parent / pure.name.split(".", 1)[0])
                    ext = pure.name.split(".", 1)[1].lower() if "." in pure.name else ""
                    samples.setdefault(key, {})[ext] = m
        except tarfile.ReadError as exc:
            raise QuARIInputError(f"{shard}: not a plain (uncompressed) tar file ({exc})") from exc
        with open(shard, "rb") as f:
            for key, members in samples.items():
                image = next((m for ext, m in members.items() if _is_image(f"x.{ext}")), None)
                if image is None:
                    continue
                items.append(Item(f"{rel}/{image.name}", str(shard), image.offset_data, image.size))
                keys.append(key)
                captions.append(_member_text(f, members.get("txt")))
                jsons.append(_member_text(f, members.get("json")))
    columns: dict[str, Any] = {"key": keys}
    caption = None
    if any(c is not None for c in captions):
        columns["caption"], caption = captions, "caption"
    if any(j is not None for j in jsons):
        columns["json"] = jsons
    return Source("webdataset", str(root), items, pa.table(columns), caption)


def _member_text(f: Any, member: tarfile.TarInfo | None) -> str | None:
    if member is None:
        return None
    f.seek(member.offset_data)
    return f.read(member.size).decode("utf-8", errors="replace").strip()


def open_source(
    location: str | os.PathLike[str],
    *,
    kind: str = "auto",
    path_column: str | None = None,
    caption_column: str | None = None,
) -> Source:
    """Lists the images of an input.

    Args:
        location: An image folder; a ``.csv``/``.parquet`` table of paths; a ``.tar`` shard or
            a folder of them.
        kind: ``"auto"`` (by what ``location`` is), ``"folder"``, ``"table"`` or
            ``"webdataset"``.
        path_column: Table column with image paths (default: the first of ``path``,
            ``image_path``, ``filepath``, ``file``, ``image``, ``filename``).
        caption_column: Table column with captions (default: ``caption``, ``text`` or
            ``title`` if present).

    Returns:
        A :class:`Source`.

    Example:
        >>> src = open_source("photos/")  # doctest: +SKIP
        >>> len(src), src.items[0].path  # doctest: +SKIP
    """
    path = Path(location).expanduser()
    if not path.exists():
        raise QuARIInputError(f"{path}: no such file or folder")
    if kind == "auto":
        if path.is_file():
            kind = "webdataset" if path.suffix.lower() == ".tar" else "table"
        else:
            tars = any(path.glob("*.tar"))
            images = any(p.is_file() and _is_image(p.name) for p in path.rglob("*"))
            kind = "webdataset" if tars and not images else "folder"
    if kind == "folder":
        if not path.is_dir():
            raise QuARIInputError(f"{path}: not a folder")
        return folder_source(path)
    if kind == "table":
        return table_source(path, path_column, caption_column)
    if kind == "webdataset":
        shards = [path] if path.is_file() else sorted(path.glob("*.tar"))
        if not shards:
            raise QuARIInputError(f"{path}: no .tar shards")
        return webdataset_source(shards, path if path.is_dir() else path.parent)
    raise QuARIInputError(f"unknown input kind {kind!r}: auto, folder, table or webdataset")
