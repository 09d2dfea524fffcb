"""Fashion-MNIST read from its original IDX files, found locally or downloaded and verified.

Fashion-MNIST (Zalando, MIT licence) is 70,000 greyscale 28×28 product images in 10 balanced
classes: 60,000 in the training split, 10,000 in the test split, each split an images file and a
labels file in the IDX format (big-endian header: two zero bytes, a type code — 0x08 for
unsigned bytes —, the number of dimensions, then one uint32 per dimension; then the data).

Where the files are looked for, in order (:func:`find_fashion_mnist`):

1. the folder passed in (an error if it lacks a file: a named folder never falls through);
2. ``$QUARI_FASHION_MNIST`` (likewise);
3. ``/usr/share/datasets/fashion-mnist`` — Debian's ``dataset-fashion-mnist`` package;
4. the cache folder (``~/.cache/quari/fashion-mnist`` unless another is given);
5. a download of the official files from the dataset's mirrors into the cache.

Every file is checked by the sha256 of its *decompressed* IDX bytes, pinned below, so any faithful
copy is accepted and nothing else. Downloads are checked by the sha256 of the ``.gz`` bytes as
served too. The two differ for Debian's copies: Debian's build normalises gzip headers (drops the
stored file name, sets the time stamp to the package date) but keeps the compressed stream, so
its ``.gz`` files are 24 bytes shorter than the official ones. Putting the official header back on
Debian's streams (name + the time stamps 1504176606 / 1504176627) reproduces the official files
byte for byte: their md5s equal those in the dataset's README, and their sha256s are the
``gz_sha256`` values below (``tests/test_eval_tracks_data.py`` rebuilds them).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quari.errors import DataError, NotFoundError

__all__ = [
    "CLASS_NAMES",
    "DEBIAN_DIR",
    "FILES",
    "MIRRORS",
    "FashionMNIST",
    "IdxFile",
    "default_cache_dir",
    "download_fashion_mnist",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

#: The label names in label order (from the dataset's README).
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

#: The official download locations (the README's links, then the GitHub repository's copy).
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)

_IDX_UBYTE = 0x08


@dataclass(frozen=True)
class IdxFile:
    """One of the dataset's files and what it must contain.

    Attributes:
        name: File name as published (``….gz``).
        shape: Expected array shape (count first).
        sha256: sha256 of the decompressed IDX bytes (header included).
        gz_sha256: sha256 of the official ``.gz`` as downloaded.
    """

    name: str
    shape: tuple[int, ...]
    sha256: str
    gz_sha256: str


#: The four official files, keyed by role.
FILES: dict[str, IdxFile] = {
    "train_images": IdxFile(
        "train-images-idx3-ubyte.gz",
        (60000, 28, 28),
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    ),
    "train_labels": IdxFile(
        "train-labels-idx1-ubyte.gz",
        (60000,),
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    ),
    "test_images": IdxFile(
        "t10k-images-idx3-ubyte.gz",
        (10000, 28, 28),
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    ),
    "test_labels": IdxFile(
        "t10k-labels-idx1-ubyte.gz",
        (10000,),
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    ),
}


@dataclass(frozen=True)
class FashionMNIST:
    """The dataset in memory.

    Attributes:
        train_images: (60000, 28, 28) uint8, the garment bright on black.
        train_labels: (60000,) int64 in 0 … 9 (:data:`CLASS_NAMES`).
        test_images, test_labels: the 10,000 of the test split.
        folder: Where the files were read.
        digests: File name → sha256 of its decompressed IDX bytes.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    folder: Path
    digests: dict[str, str]


def default_cache_dir() -> Path:
    """``~/.cache/quari/fashion-mnist``: where downloads go."""
    return Path.home() / ".cache" / "quari" / "fashion-mnist"


def _decompress(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw  # an already decompressed copy
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: not a complete gzip file ({exc}); truncated or corrupt") from exc


def read_idx(path: str | os.PathLike[str]) -> tuple[np.ndarray, str]:
    """Parses an IDX file of unsigned bytes (gzip-compressed or not).

    Args:
        path: The file.

    Returns:
        (the array with the header's shape, sha256 of the decompressed bytes)

    Raises:
        DataError: naming the file — not gzip/IDX, a bad magic number, an unsupported type, or
            a length that does not match the header (truncated or padded).

    Example:
        >>> images, digest = read_idx("t10k-images-idx3-ubyte.gz")  # doctest: +SKIP
        >>> images.shape
        (10000, 28, 28)
    """
    path = Path(path)
    data = _decompress(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'})")
    if data[2] != _IDX_UBYTE:
        raise DataError(f"{path}: IDX type code 0x{data[2]:02x}; only unsigned bytes (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: IDX header declares {ndim} dimensions but is cut short")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    want = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != want:
        raise DataError(
            f"{path}: {len(data)} bytes, the header {dims} needs {want} "
            f"({'truncated' if len(data) < want else 'trailing bytes'})"
        )
    array = np.frombuffer(data, np.uint8, offset=header).reshape(dims)
    return array, hashlib.sha256(data).hexdigest()


def _present(folder: Path, files: Mapping[str, IdxFile]) -> dict[str, Path]:
    """Role → existing path (the ``.gz`` or its decompressed twin) of the files in ``folder``."""
    found = {}
    for role, f in files.items():
        for name in (f.name, f.name.removesuffix(".gz")):
            if (folder / name).is_file():
                found[role] = folder / name
                break
    return found


def _require(folder: Path, files: Mapping[str, IdxFile], why: str) -> Path:
    missing = [f.name for role, f in files.items() if role not in _present(folder, files)]
    if missing:
        raise NotFoundError(f"{folder} ({why}): missing {', '.join(missing)}")
    return folder


def find_fashion_mnist(
    folder: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    mirrors: Sequence[str] = MIRRORS,
    files: Mapping[str, IdxFile] = FILES,
    progress: bool = False,
) -> Path:
    """The folder holding the four files, by the look-up order in the module docstring.

    Args:
        folder: An explicit folder (tried first; must hold every file).
        cache_dir: The cache folder (default :func:`default_cache_dir`).
        download: Download into the cache when no copy is found.
        mirrors: Base URLs to download from, tried in order.
        files: The files to expect (default: the official four).
        progress: Show a download progress bar.

    Returns:
        The folder.

    Raises:
        NotFoundError: a named folder lacks a file.
        DataError: no copy is found and the download fails (unreachable, wrong digest).
    """
    if folder is not None:
        return _require(Path(folder).expanduser(), files, "the folder given")
    env = os.environ.get("QUARI_FASHION_MNIST")
    if env:
        return _require(Path(env).expanduser(), files, "$QUARI_FASHION_MNIST")
    if len(_present(DEBIAN_DIR, files)) == len(files):
        return DEBIAN_DIR
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if len(_present(cache, files)) == len(files):
        return cache
    if not download:
        raise NotFoundError(
            f"Fashion-MNIST not found (looked in $QUARI_FASHION_MNIST, {DEBIAN_DIR}, {cache}); "
            "install it with `apt-get install dataset-fashion-mnist` or allow the download"
        )
    return download_fashion_mnist(cache, mirrors=mirrors, files=files, progress=progress)


def _fetch(url: str, dest: Path, want: str, timeout: float, progress: bool) -> None:
    """Downloads ``url`` into ``dest`` if its sha256 is ``want`` (else raises, leaving nothing)."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        # the file first: it is closed even when the connection fails
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                      disable=not progress) as bar:  # fmt: skip
                for block in iter(lambda: resp.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
                    bar.update(len(block))
        if digest.hexdigest() != want:
            raise DataError(f"{url}: sha256 {digest.hexdigest()}, expected {want}")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def download_fashion_mnist(
    dest: str | os.PathLike[str] | None = None,
    *,
    mirrors: Sequence[str] = MIRRORS,
    files: Mapping[str, IdxFile] = FILES,
    timeout: float = 60.0,
    progress: bool = False,
) -> Path:
    """Downloads the files missing from ``dest``, each checked against its pinned sha256.

    Each file is tried on every mirror in turn; a file whose digest differs is never kept.

    Args:
        dest: Folder to download into (default :func:`default_cache_dir`).
        mirrors: Base URLs (ending in ``/``).
        files: The files and their digests.
        timeout: Seconds to wait for a server.
        progress: Show a progress bar per file.

    Returns:
        ``dest``.

    Raises:
        DataError: a file could not be fetched with the right digest from any mirror; the
            message lists what each mirror answered.
    """
    dest = Path(dest).expanduser() if dest is not None else default_cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    have = _present(dest, files)
    for role, f in files.items():
        if role in have:
            continue
        errors = []
        for base in mirrors:
            url = base + f.name
            try:
                _fetch(url, dest / f.name, f.gz_sha256, timeout, progress)
                break
            except DataError as exc:
                errors.append(str(exc))
            except (urllib.error.URLError, OSError) as exc:
                errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
        else:
            raise DataError(
                f"could not download {f.name} into {dest}: "
                + "; ".join(errors)
                + ". Without network access install Debian's `dataset-fashion-mnist`, or copy "
                "the four files into a folder and set $QUARI_FASHION_MNIST"
            )
    return dest


def load_fashion_mnist(
    folder: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    verify: bool = True,
    files: Mapping[str, IdxFile] = FILES,
    progress: bool = False,
) -> FashionMNIST:
    """Finds (:func:`find_fashion_mnist`) and reads the dataset, checking every file.

    Args:
        folder: An explicit folder with the four files.
        cache_dir: The cache folder for downloads.
        download: Allow a download when no local copy exists.
        verify: Check each file's decompressed sha256 against :data:`FILES` (turn off only for
            a deliberately different copy; the shapes are checked either way).
        files: The files to expect.
        progress: Show download progress.

    Returns:
        The :class:`FashionMNIST` arrays.

    Raises:
        DataError: a file is corrupt, has the wrong shape or digest, or labels are out of range.

    Example:
        >>> fm = load_fashion_mnist()  # doctest: +SKIP
        >>> fm.train_images.shape, CLASS_NAMES[int(fm.train_labels[0])]  # doctest: +SKIP
        ((60000, 28, 28), 'Ankle boot')
    """
    where = find_fashion_mnist(
        folder, cache_dir=cache_dir, download=download, files=files, progress=progress
    )
    paths = _present(where, files)
    arrays, digests = {}, {}
    for role, f in files.items():
        array, digest = read_idx(paths[role])
        if verify and digest != f.sha256:
            raise DataError(
                f"{paths[role]}: decompressed sha256 {digest}, the official file's is {f.sha256}"
            )
        if array.shape[1:] != f.shape[1:] or (verify and array.shape != f.shape):
            raise DataError(f"{paths[role]}: shape {array.shape}, expected {f.shape}")
        arrays[role], digests[f.name] = array, digest
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DataError(f"{where}: {len(images)} {split} images but {len(labels)} labels")
        if labels.size and labels.max() >= len(CLASS_NAMES):
            raise DataError(f"{paths[f'{split}_labels']}: label {labels.max()} out of range 0…9")
    return FashionMNIST(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int64),
        folder=where,
        digests=digests,
    )
