"""Fashion-MNIST's IDX files: parsing, look-up order, and the verified download (served by a
local http.server, never the internet)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import struct
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from quari.errors import DataError, NotFoundError
from quari.eval.tracks import fashion_mnist as fmn
from quari.eval.tracks.fashion_mnist import (
    DEBIAN_DIR,
    FILES,
    IdxFile,
    download_fashion_mnist,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
)


def idx_bytes(array: np.ndarray) -> bytes:
    a = np.asarray(array, np.uint8)
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write_gz(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data))
    return path


def tiny_dataset(folder: Path, seed: int = 0) -> dict[str, IdxFile]:
    """Four small IDX files in ``folder`` and the IdxFile table describing them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (30, 28, 28)),
        "train_labels": np.arange(30) % 10,
        "test_images": rng.integers(0, 256, (20, 28, 28)),
        "test_labels": np.arange(20) % 10,
    }
    table = {}
    for role, array in arrays.items():
        name = FILES[role].name
        raw = idx_bytes(array)
        gz = write_gz(folder / name, raw).read_bytes()
        table[role] = IdxFile(
            name, array.shape, hashlib.sha256(raw).hexdigest(), hashlib.sha256(gz).hexdigest()
        )
    return table


# -- parsing -----------------------------------------------------------------------------------


def test_read_idx_round_trips_gzip_and_plain(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    raw = idx_bytes(a)
    for path in (write_gz(tmp_path / "x.gz", raw), tmp_path / "x"):
        if not path.exists():
            path.write_bytes(raw)
        got, digest = read_idx(path)
        np.testing.assert_array_equal(got, a)
        assert digest == hashlib.sha256(raw).hexdigest()
    labels, _ = read_idx(write_gz(tmp_path / "l.gz", idx_bytes(np.arange(7) % 10)))
    assert labels.shape == (7,) and labels.tolist() == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "mangle, match",
    [
        (lambda raw: gzip.compress(raw)[:-20], "not a complete gzip file"),  # truncated .gz
        (lambda raw: gzip.compress(raw[:-5]), "truncated"),  # truncated data, valid gzip
        (lambda raw: gzip.compress(raw + b"xx"), "trailing bytes"),
        (lambda raw: gzip.compress(b"\x01" + raw[1:]), "magic number"),
        (lambda raw: gzip.compress(raw[:2] + b"\x0d" + raw[3:]), "type code 0x0d"),
        (lambda raw: gzip.compress(raw[:3] + b"\x05" + raw[4:10]), "cut short"),
        (lambda raw: b"", "not an IDX file"),
    ],
)
def test_corrupt_or_truncated_files_name_the_file(tmp_path, mangle, match):
    raw = idx_bytes(np.zeros((3, 28, 28)))
    path = tmp_path / "bad-images-idx3-ubyte.gz"
    path.write_bytes(mangle(raw))
    with pytest.raises(DataError, match=match) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_load_checks_digests_shapes_and_label_range(tmp_path, monkeypatch):
    monkeypatch.delenv("QUARI_FASHION_MNIST", raising=False)
    table = tiny_dataset(tmp_path / "d")
    fm = load_fashion_mnist(tmp_path / "d", files=table)
    assert fm.train_images.shape == (30, 28, 28) and fm.test_labels.dtype == np.int64
    assert fm.digests[FILES["test_labels"].name] == table["test_labels"].sha256
    # the official table rejects these files by digest, naming the file
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz|train-images"):
        load_fashion_mnist(tmp_path / "d")
    # labels beyond the 10 classes
    write_gz(tmp_path / "d" / FILES["test_labels"].name, idx_bytes(np.full(20, 12)))
    with pytest.raises(DataError, match="label 12 out of range"):
        load_fashion_mnist(tmp_path / "d", files=table, verify=False)
    # fewer labels than images
    write_gz(tmp_path / "d" / FILES["test_labels"].name, idx_bytes(np.zeros(19)))
    with pytest.raises(DataError, match="20 test images but 19 labels"):
        load_fashion_mnist(tmp_path / "d", files=table, verify=False)


def test_lookup_order(tmp_path, monkeypatch):
    table = tiny_dataset(tmp_path / "explicit")
    tiny_dataset(tmp_path / "env", seed=1)
    monkeypatch.setenv("QUARI_FASHION_MNIST", str(tmp_path / "env"))
    # an explicit folder wins over the environment; a named folder never falls through
    assert find_fashion_mnist(tmp_path / "explicit", files=table) == tmp_path / "explicit"
    assert find_fashion_mnist(files=table) == tmp_path / "env"
    (tmp_path / "env" / FILES["train_labels"].name).unlink()
    with pytest.raises(NotFoundError, match=r"QUARI_FASHION_MNIST.*train-labels"):
        find_fashion_mnist(files=table)
    monkeypatch.delenv("QUARI_FASHION_MNIST")
    # no Debian copy of these names: the cache, then (refused here) a download
    monkeypatch.setattr(fmn, "DEBIAN_DIR", tmp_path / "no-debian")
    tiny_dataset(tmp_path / "cache")
    assert find_fashion_mnist(cache_dir=tmp_path / "cache", files=table) == tmp_path / "cache"
    with pytest.raises(NotFoundError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist(cache_dir=tmp_path / "empty", files=table, download=False)


# -- download ----------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over tmp_path/www (good/ and bad/ mirrors); yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=root))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_sha256_and_skips_a_bad_mirror(server, tmp_path):
    root, url = server
    table = tiny_dataset(root / "good")
    bad = root / "bad"
    bad.mkdir()
    for f in table.values():  # the bad mirror serves one flipped byte in every file
        data = bytearray((root / "good" / f.name).read_bytes())
        data[-9] ^= 0xFF
        (bad / f.name).write_bytes(bytes(data))
    dest = download_fashion_mnist(
        tmp_path / "cache", mirrors=[url + "bad/", url + "missing/", url + "good/"], files=table
    )
    for f in table.values():
        assert (dest / f.name).read_bytes() == (root / "good" / f.name).read_bytes()
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no temporaries left
    fm = load_fashion_mnist(dest, files=table)
    assert fm.train_images.shape == (30, 28, 28)


def test_download_refuses_a_wrong_digest(server, tmp_path):
    root, url = server
    table = tiny_dataset(root / "good")
    corrupted = root / "corrupt"
    corrupted.mkdir()
    for f in table.values():
        (corrupted / f.name).write_bytes((root / "good" / f.name).read_bytes())
    (corrupted / table["test_images"].name).write_bytes(b"\x1f\x8b not the file")
    with pytest.raises(
        DataError, match=r"t10k-images-idx3-ubyte.gz: sha256 [0-9a-f]{64}, expected"
    ):
        download_fashion_mnist(tmp_path / "c", mirrors=[url + "corrupt/"], files=table)
    assert not (tmp_path / "c" / table["test_images"].name).exists()  # never kept


def test_download_reports_an_unreachable_network(tmp_path, monkeypatch):
    monkeypatch.delenv("QUARI_FASHION_MNIST", raising=False)
    monkeypatch.setattr(fmn, "DEBIAN_DIR", tmp_path / "no-debian")
    table = tiny_dataset(tmp_path / "src")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match="could not download.*dataset-fashion-mnist"):
        find_fashion_mnist(
            cache_dir=tmp_path / "c", mirrors=[f"http://127.0.0.1:{port}/"], files=table
        )


# -- the pinned digests against the real files ---------------------------------------------------

# md5 of the official .gz files, from the dataset's README (the Debian package ships it).
README_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# The official gzip headers' time stamps (found by matching the md5s above).
OFFICIAL_MTIME = {"train": 1504176606, "t10k": 1504176627}


@pytest.mark.skipif(
    not all((DEBIAN_DIR / f.name).is_file() for f in FILES.values()),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_pinned_digests_match_the_debian_copy_and_the_official_files():
    for f in FILES.values():
        gz = (DEBIAN_DIR / f.name).read_bytes()
        array, digest = read_idx(DEBIAN_DIR / f.name)
        assert digest == f.sha256 and array.shape == f.shape
        # Debian keeps the compressed stream and drops the name from the header; putting the
        # official header back gives the official file, byte for byte
        assert gz[:4] == b"\x1f\x8b\x08\x00"
        name = f.name.removesuffix(".gz").encode() + b"\x00"
        mtime = struct.pack("<I", OFFICIAL_MTIME[f.name.split("-")[0]])
        official = b"\x1f\x8b\x08\x08" + mtime + b"\x00\x03" + name + gz[10:]
        assert hashlib.md5(official).hexdigest() == README_MD5[f.name]
        assert hashlib.sha256(official).hexdigest() == f.gz_sha256
