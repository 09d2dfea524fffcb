"""Crash-safe file writing shared by model folders and embedding sets."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "follow_links_default", "inside", "read_json", "sha256_file"]

#: Set to 1 to let the files a set, model or run folder names be symlinks to places outside it.
FOLLOW_LINKS_ENV = "QUARI_FOLLOW_LINKS"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Writes a file so that readers see either the old file or the complete new one.

    ``write`` fills a temporary file in the same folder; it is flushed, fsynced, given the
    permissions a plain ``open`` would (0666 minus the umask), and renamed over ``path``.
    On any error the temporary file is removed and ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, error: type[Exception] = ValueError) -> Any:
    """Parses a JSON file, raising ``error`` naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc


def follow_links_default() -> bool:
    """Whether ``$QUARI_FOLLOW_LINKS`` allows symlinks that leave their folder."""
    return os.environ.get(FOLLOW_LINKS_ENV, "").strip().lower() not in ("", "0", "false")


def inside(
    root: Path,
    rel: str | os.PathLike[str],
    *,
    error: type[Exception],
    follow_links: bool | None = None,
) -> Path:
    """``root / rel``, refused unless it stays inside ``root``.

    A folder's own description (a manifest, a config) may name files only below the folder: an
    absolute path or one that climbs out with ``..`` is refused, and so is a symlink whose
    target lies outside — unless ``follow_links`` (default: ``$QUARI_FOLLOW_LINKS``) allows
    symlinks, e.g. shards kept on another disk.

    Args:
        root: The folder.
        rel: The relative path it names.
        error: The exception class to raise (the caller's kind: StoreError, CheckpointError …).
        follow_links: Allow symlinks that point outside ``root``.

    Returns:
        The joined path (not resolved).

    Raises:
        error: naming the path and why it is refused.

    Example:
        >>> inside(Path("set"), "img_emb/img_emb_0.npy", error=ValueError)
        PosixPath('set/img_emb/img_emb_0.npy')
    """
    rel_path = Path(rel)
    if rel_path.is_absolute() or ".." in rel_path.parts or not rel_path.parts:
        raise error(f"{root}: refers to {str(rel)!r}, outside its folder; refused")
    path = root / rel_path
    if follow_links is None:
        follow_links = follow_links_default()
    if not follow_links:
        base = root.resolve()
        target = path.resolve()
        if target != base and base not in target.parents:
            raise error(
                f"{path}: a link to {target}, outside {root}; refused (set "
                f"{FOLLOW_LINKS_ENV}=1 to allow links that leave the folder)"
            )
    return path
