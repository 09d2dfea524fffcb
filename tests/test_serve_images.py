"""Item images: only image files inside the image root (after ``..`` and symlinks) are served;
thumbnails are cached in memory and nothing is written into the set."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from quari.retriever import Retriever
from quari.serve import ServeSettings, create_app
from quari.serve.images import ItemImages
from quari.store import EmbeddingSet

from embed_helpers import bomb_png, photo, png_bytes

pytest.importorskip("fastapi")
from starlette.testclient import TestClient

# Row → (metadata path, what a request for its image gets). "{set}" and "{out}" are filled in.
CASES = [
    ("images/ok.png", 200),
    ("../outside/o.png", 404),  # relative, climbs out of the set
    ("{out}/o.png", 404),  # absolute, outside
    ("images/escape.png", 404),  # a symlink inside the set to a file outside it
    ("images/../images/ok.png", 200),  # climbs, but stays inside
    ("{set}/images/ok.png", 200),  # absolute, inside
    ("manifest.json", 404),  # the set's own file, not an image
    ("images/missing.png", 404),
    ("", 404),
    (None, 404),
    ("images/dirlink", 404),  # a symlink to a folder
    ("%2e%2e/outside/o.png", 404),  # percent-encoding is not decoded in paths
    ("images/inner.png", 200),  # a symlink to an image inside the set
    ("images/loop.png", 404),  # a symlink loop
    ("images/\x00ok.png", 404),
    ("o.png", 404),  # only found when the image root is the outside folder
]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("images")
    root, out = tmp / "set", tmp / "outside"
    (root / "images").mkdir(parents=True)
    out.mkdir()
    (out / "o.png").write_bytes(png_bytes(photo(1)))
    (root / "images" / "ok.png").write_bytes(png_bytes(photo(2)))
    (root / "images" / "bomb.png").write_bytes(bomb_png())
    os.symlink(out / "o.png", root / "images" / "escape.png")
    os.symlink(out, root / "images" / "dirlink")
    os.symlink(root / "images" / "ok.png", root / "images" / "inner.png")
    os.symlink(root / "images" / "loop.png", root / "images" / "loop.png")
    paths = [p.format(set=root, out=out) if p is not None else None for p, _ in CASES]
    paths.append("images/bomb.png")
    eset = EmbeddingSet.create(root, dim=16, encoder="toy")
    vectors = np.random.default_rng(0).standard_normal((len(paths), 16))
    eset.append(vectors, {"path": paths})
    return eset, out


@pytest.fixture(scope="module")
def client(hostile):
    with TestClient(create_app(Retriever(hostile[0]))) as c:
        yield c


@pytest.mark.parametrize("row", range(len(CASES)))
def test_only_images_inside_the_set_are_served(client, row):
    want = CASES[row][1]
    for size in ("thumb", "full"):
        r = client.get(f"/items/{row}/image?size={size}")
        assert r.status_code == want, (CASES[row][0], size, r.text)
        if want == 404:
            # The same answer whether or not a file exists there (a set file that is no
            # image says so: it is the set's own).
            unavailable = f"item {row} has no image available"
            if row == 6 and size == "thumb":
                unavailable = f"item {row}: its image cannot be decoded (not an image"
            assert r.json()["error"]["kind"] == "not found"
            assert r.json()["error"]["message"].startswith(unavailable)
        else:
            assert Image.open(io.BytesIO(r.content)).size == (40, 30)


def test_a_bomb_in_the_set_is_never_decoded(client):
    r = client.get(f"/items/{len(CASES)}/image")
    assert r.status_code == 404 and "decompression bomb" in r.json()["error"]["message"]


def test_the_image_root_setting_moves_the_allowed_folder(hostile):
    eset, out = hostile
    with TestClient(create_app(Retriever(eset), ServeSettings(image_root=out))) as c:
        assert c.get(f"/items/{len(CASES) - 1}/image").status_code == 200  # "o.png"
        assert c.get("/items/2/image").status_code == 200  # absolute, now inside the root
        assert c.get("/items/0/image").status_code == 404  # the set is outside it now


def test_thumbnails_are_cached_and_nothing_is_written(hostile):
    eset, _ = hostile

    def snapshot():
        return sorted(
            (str(p), p.lstat().st_size, p.lstat().st_mtime_ns) for p in eset.root.rglob("*")
        )

    before = snapshot()
    images = ItemImages(eset, cache_size=2)
    first = images.thumbnail(0)
    assert images.thumbnail(0) is first  # from the cache
    images.thumbnail(4)
    images.thumbnail(5)
    info = images.thumbnail.cache_info()
    assert info.hits == 1 and info.misses == 3 and info.currsize == 2
    with TestClient(create_app(Retriever(eset))) as c:
        for row in (0, 4, 5, 12):
            assert c.get(f"/items/{row}/image").status_code == 200
        assert c.post("/search", json={"item_id": 0, "k": 3}).status_code == 200
    assert snapshot() == before


def test_a_set_without_paths_has_no_images(tmp_path):
    eset = EmbeddingSet.create(tmp_path / "s", dim=4, encoder="toy")
    eset.append(np.eye(4), {"label": list("abcd")})
    with TestClient(create_app(Retriever(eset))) as c:
        assert c.get("/info").json()["images"] is False
        assert c.get("/items/1").json()["image"] is None
        assert c.get("/items/1/image").status_code == 404
