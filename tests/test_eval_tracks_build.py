"""A small build of the Fashion-MNIST tracks end to end, on the real offline towers and a tiny
synthetic stand-in for the dataset: the layout, the sets, the encoder ids, the stored vectors
against the encoder, the judgements, and reuse on a rerun."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from quari.errors import DataError
from quari.eval.tracks import TrackSizes, build_fashion_tracks
from quari.eval.tracks import encode as encode_module
from quari.eval.tracks.attributes import ATTRIBUTES
from quari.eval.tracks.fashion_mnist import CLASS_NAMES, FashionMNIST
from quari.eval.tracks.plan import plan_tracks
from quari.store import EmbeddingSet

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("sentence_transformers")

SIZES = TrackSizes(train=120, val=40, test=40, captions_per_image=2, text_queries=24,
                   image_queries=8, positives=3, resolution=32)  # fmt: skip


def fake_fashion_mnist(n_train: int = 300, n_test: int = 100, seed: int = 0) -> FashionMNIST:
    """Class-shaped blobs (a per-class silhouette, varied brightness, size and stripes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28] - 13.5

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 10
        x = np.zeros((n, 28, 28), np.uint8)
        for i, c in enumerate(labels):
            ry, rx = 4 + c + rng.uniform(0, 4), 13 - c + rng.uniform(0, 3)
            blob = (yy / ry) ** 2 + (xx / rx) ** 2 < 1
            level = rng.uniform(60, 250) * (1 - 0.5 * (rng.random() < 0.5) * (yy % 3 == 0))
            x[i] = np.clip(blob * (level + rng.normal(0, 8, (28, 28))), 0, 255)
        return x, labels.astype(np.int64)

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return FashionMNIST(train_x, train_y, test_x, test_y, Path("synthetic"), {"fake": "0"})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build shared by the tests marked slow (~10-15 s on 2 shared cores, model loads
    included)."""
    out = tmp_path_factory.mktemp("tracks") / "fm"
    data = fake_fashion_mnist()
    info = build_fashion_tracks(out, size=SIZES, seed=3, data=data, progress=False)
    return out, data, info


@pytest.fixture(scope="module")
def encoder(built):
    """The encoder of the built head, loaded once."""
    from quari.encoders import load_encoder

    return load_encoder(f"offline:{built[0] / 'head'}")


def open_set(path: Path) -> tuple[EmbeddingSet, dict]:
    eset = EmbeddingSet.open(path)
    return eset, eset.metadata(np.arange(eset.rows)).to_pydict()


@pytest.mark.slow
def test_the_layout_is_exactly_the_contract(built):
    out, _, info = built
    assert sorted(os.listdir(out)) == ["cache", "head", "i2i", "images", "t2i", "track.json",
                                       "train"]  # fmt: skip
    assert sorted(os.listdir(out / "head")) == ["config.json", "head.safetensors"]
    for track in ("t2i", "i2i"):
        assert sorted(os.listdir(out / track)) == ["test", "val"]
        for split in ("val", "test"):
            assert sorted(os.listdir(out / track / split)) == ["gallery", "queries.parquet"]
    assert json.loads((out / "track.json").read_text()) == info
    assert info["splits"] == {
        "train": {"images": 120, "from": "fashion-mnist/train"},
        "val": {"images": 40, "from": "fashion-mnist/train"},
        "test": {"images": 40, "from": "fashion-mnist/t10k"},
    }
    assert set(info["thresholds"]) == {a.name for a in ATTRIBUTES}
    assert set(info["templates"]) == {"train", "val", "test"}
    assert sorted(p.name for p in (out / "cache").glob("features_*.npy")) == sorted(
        p for p in info["encoded_now"] if p.startswith("features_")
    )


@pytest.mark.slow
def test_sets_open_with_the_heads_encoder_id_and_serve_their_own_images(built, encoder):
    from quari.embed.images import load_image

    out, data, info = built
    enc = encoder
    assert enc.id == info["encoder"] and enc.id.startswith("offline:effnet-lite0-32px")
    sets = [out / "train"] + [
        out / t / s / "gallery" for t in ("t2i", "i2i") for s in ("val", "test")
    ]
    for path in sets:
        eset, meta = open_set(path)
        eset.verify()
        assert eset.encoder == enc.id and eset.dim == enc.dim == 384
        for rel in meta["path"]:  # every path resolves inside the track folder, to a file
            target = (path / rel).resolve()
            assert target.is_file() and target.is_relative_to(out.resolve())
        # the stored vectors are what the encoder makes of the stored PNGs
        rows = np.arange(0, eset.rows, max(1, eset.rows // 6))
        images = [load_image((path / meta["path"][i]).read_bytes()).image for i in rows]
        want = enc.encode_images(images)
        np.testing.assert_allclose(eset.gather(rows).astype(np.float32), want, atol=4e-3)
    # train: one row per caption, the image's row repeated; the captions' text embeddings
    train, meta = open_set(out / "train")
    assert train.rows == 240 and train.has_text
    assert meta["item"][0] == meta["item"][1] and meta["caption"][0] != meta["caption"][1]
    np.testing.assert_array_equal(train.gather([0]), train.gather([1]))
    want = enc.encode_texts(meta["caption"][:4])
    np.testing.assert_allclose(train.gather(np.arange(4), "text").astype(np.float32), want,
                               atol=4e-3)  # fmt: skip
    for i in (0, 7, 100):  # metadata describes the image it points at
        item = meta["item"][i]
        assert meta["label"][i] == data.train_labels[item]
        assert meta["class_name"][i] == CLASS_NAMES[meta["label"][i]]
        png = load_image((out / "train" / meta["path"][i]).read_bytes()).image
        np.testing.assert_array_equal(np.asarray(png)[..., 0], data.train_images[item])
    cols = set(meta)
    assert {"item", "split", "label", "class_name", "caption", "path"} <= cols
    assert {a.name for a in ATTRIBUTES} <= cols


@pytest.mark.slow
def test_query_files_follow_the_custom_query_format(built, encoder):
    from quari.embed.images import load_image

    out, _, _ = built
    enc = encoder
    for track in ("t2i", "i2i"):
        for split in ("val", "test"):
            folder = out / track / split
            table = pq.read_table(folder / "queries.parquet")
            assert table.column_names == ["query_id", "label", "embedding", "relevant", "group"]
            assert table.schema.field("embedding").type == pa.list_(pa.float32())
            assert table.schema.field("relevant").type == pa.list_(pa.int64())
            q = table.to_pydict()
            assert len(set(q["query_id"])) == len(q["query_id"]) > 0
            emb = np.array(q["embedding"], np.float32)
            np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
            gallery = EmbeddingSet.open(folder / "gallery")
            assert all(len(r) > 0 and max(r) < gallery.rows for r in q["relevant"])
            assert set(q["group"]) <= set(CLASS_NAMES)
            if track == "t2i":
                np.testing.assert_allclose(emb[:5], enc.encode_texts(q["label"][:5]), atol=1e-4)
            else:
                images = [load_image((folder / p).read_bytes()).image for p in q["label"][:5]]
                np.testing.assert_allclose(emb[:5], enc.encode_images(images), atol=1e-4)


@pytest.mark.slow
def test_judgements_are_exactly_right(built):
    out, data, _ = built
    plan = plan_tracks(data, SIZES, seed=3)
    for split in ("val", "test"):
        # text→image: brute force over the stored gallery metadata
        _, meta = open_set(out / "t2i" / split / "gallery")
        q = pq.read_table(out / "t2i" / split / "queries.parquet").to_pydict()
        by_name = {a.name: a for a in ATTRIBUTES}
        assert q["label"] == plan.query_texts[split]
        for query, relevant in zip(plan.queries[split], q["relevant"], strict=True):
            want = [
                i
                for i in range(len(meta["item"]))
                if meta["label"][i] == query.label
                and all(meta[n][i] == by_name[n].values[v] for n, v in query.attributes)
            ]
            assert relevant == want
            assert len(want) < meta["label"].count(query.label)
        # image→image: positives are the other views of the query's item; the query view is
        # not in the gallery
        _, meta = open_set(out / "i2i" / split / "gallery")
        q = pq.read_table(out / "i2i" / split / "queries.parquet").to_pydict()
        gallery_files = {Path(p).name for p in meta["path"]}
        for qid, label, relevant in zip(q["query_id"], q["label"], q["relevant"], strict=True):
            item = int(qid.rsplit("-", 1)[1])
            assert Path(label).name == f"{item:05d}-0.png" and Path(label).name not in gallery_files
            assert relevant == [i for i, it in enumerate(meta["item"]) if it == item]
            assert sorted(meta["view"][i] for i in relevant) == [1, 2, 3]
        others = [it for it in meta["item"] if meta["item"].count(it) == 1]
        assert len(others) == 40 - 8  # every other image of the split is one distractor
    # the splits are disjoint
    items = {s: set(plan.items[s].tolist()) for s in ("train", "val")}
    assert not items["train"] & items["val"]


def test_thresholds_depend_on_the_train_images_only():
    data = fake_fashion_mnist()
    plan = plan_tracks(data, SIZES, seed=3)
    held_out = np.setdiff1d(np.arange(300), plan.items["train"])
    changed = replace(data, test_images=255 - data.test_images,
                      train_images=data.train_images.copy())  # fmt: skip
    changed.train_images[held_out] = 255 - changed.train_images[held_out]  # val and unused
    again = plan_tracks(changed, SIZES, seed=3)
    assert all(np.array_equal(plan.thresholds.cuts[n], again.thresholds.cuts[n])
               for n in plan.thresholds.cuts)  # fmt: skip
    changed.train_images[plan.items["train"]] //= 2  # the train images do move them
    moved = plan_tracks(changed, SIZES, seed=3)
    assert not np.array_equal(plan.thresholds.cuts["tone"], moved.thresholds.cuts["tone"])


@pytest.mark.slow
def test_a_rerun_reuses_finished_steps(built, monkeypatch):
    out, data, info = built
    again = build_fashion_tracks(out, size=SIZES, seed=3, data=data, progress=False)
    assert again == info  # finished: nothing redone

    def no_towers(*args, **kwargs):
        raise AssertionError("the towers were loaded although every output is cached")

    monkeypatch.setattr(encode_module, "OfflineTowers", no_towers)
    (out / "track.json").unlink()  # an interrupted build: the sets get rewritten …
    again = build_fashion_tracks(out, size=SIZES, seed=3, data=data, progress=False)
    assert again["encoded_now"] == []  # … from the cached features and text embeddings
    assert again["encoder"] == info["encoder"] and again["tracks"] == info["tracks"]
    with pytest.raises(DataError, match="other settings"):
        build_fashion_tracks(out, size=SIZES, seed=4, data=data, progress=False)


def test_a_foreign_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a track folder"):
        build_fashion_tracks(tmp_path, size=SIZES, data=fake_fashion_mnist(), progress=False)
