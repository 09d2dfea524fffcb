"""EmbeddingSet: the clip-retrieval layout, manifest, gather, append and every corruption."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from quari import QuARIInputError
from quari.store import EmbeddingSet, StoreError

from helpers import make_set


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root: to prove a failure changed nothing."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_round_trip_gather_chunks_metadata(tmp_path):
    _eset, stored, meta = make_set(tmp_path / "s", text=True)
    again = EmbeddingSet.open(tmp_path / "s")
    assert len(again) == stored.shape[0] == 750 and again.dim == 24
    assert again.encoder == "test-encoder" and again.has_text and again.has_metadata
    ids = np.random.default_rng(1).integers(0, 750, 300)
    np.testing.assert_array_equal(again.gather(ids), stored[ids])
    np.testing.assert_array_equal(
        again.gather(ids.reshape(30, 10)), stored[ids].reshape(30, 10, 24)
    )
    chunks = list(again.iter_chunks(chunk_rows=128))
    assert [o for o, _ in chunks] == sorted({o for o, _ in chunks})
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), stored)
    assert again.metadata(ids).to_pydict() == meta.take(pa.array(ids)).to_pydict()
    norms = np.linalg.norm(again.gather(np.arange(750), kind="text").astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    again.verify()


def test_select_matches_a_plain_python_filter(tmp_path):
    eset, _, meta = make_set(tmp_path / "s")
    got = eset.select((pc.field("group") >= 3) & ~pc.field("name").isin(["item-0", "item-700"]))
    rows = meta.to_pylist()
    want = [
        i for i, r in enumerate(rows) if r["group"] >= 3 and r["name"] not in ("item-0", "item-700")
    ]
    np.testing.assert_array_equal(got, want)


def test_append_then_reopen_keeps_every_row(tmp_path):
    eset, stored, _ = make_set(tmp_path / "s", shards=(10,))
    extra = np.random.default_rng(5).standard_normal((7, 24))
    eset.append(extra, {"group": np.arange(7), "name": [f"x{i}" for i in range(7)]})
    again = EmbeddingSet.open(tmp_path / "s")
    assert len(again) == 17 and [s.rows for s in again.shards] == [10, 7]
    np.testing.assert_array_equal(again.gather(np.arange(10)), stored)
    want = (extra / np.linalg.norm(extra, axis=1, keepdims=True)).astype(np.float16)
    np.testing.assert_array_equal(again.gather(np.arange(10, 17)), want)
    again.verify()


def test_bad_appends_write_nothing(tmp_path):
    eset, _, _ = make_set(tmp_path / "s", shards=(10,))
    before = snapshot(tmp_path / "s")
    good_meta = {"group": np.arange(3), "name": ["a", "b", "c"]}
    cases = [
        (np.ones((3, 23)), good_meta, "expected embedding dimension 24, got 23"),
        (np.full((3, 24), np.nan), good_meta, r"row \[0\] contains NaN"),
        (np.vstack([np.ones((2, 24)), np.zeros((1, 24))]), good_meta, "row 2 has zero norm"),
        (np.ones((3, 24)), {"group": np.arange(2), "name": ["a", "b"]}, "metadata has 2 rows"),
        (np.ones((3, 24)), {"group": np.arange(3)}, "metadata columns"),
        (
            np.ones((3, 24)),
            {"group": ["a", "b", "c"], "name": ["a", "b", "c"]},
            "column 'group' has type string",
        ),
        (np.ones((3, 24)), None, "every shard must include them"),
    ]
    for vectors, meta, match in cases:
        with pytest.raises(QuARIInputError, match=match):
            eset.append(vectors, meta)
    assert snapshot(tmp_path / "s") == before
    assert len(EmbeddingSet.open(tmp_path / "s")) == 10


def test_unknown_ids_are_named(tmp_path):
    eset, _, _ = make_set(tmp_path / "s", shards=(5,))
    with pytest.raises(QuARIInputError, match=r"unknown row id 5: the set has rows 0 … 4"):
        eset.gather([0, 5])
    with pytest.raises(QuARIInputError, match="unknown row id -1"):
        eset.metadata([-1])


def clip_retrieval_folder(root: Path, shards=(40, 30), dim=16, seed=0) -> np.ndarray:
    """A folder laid out as `clip-retrieval inference` writes it (no manifest)."""
    rng = np.random.default_rng(seed)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    out = []
    for i, n in enumerate(shards):
        x = rng.standard_normal((n, dim)).astype(np.float32)
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        np.save(root / "img_emb" / f"img_emb_{i}.npy", x)
        pq.write_table(
            pa.table(
                {
                    "image_path": [f"img/{i}_{j}" for j in range(n)],
                    "caption": [f"c{j}" for j in range(n)],
                }
            ),
            root / "metadata" / f"metadata_{i}.parquet",
        )
        out.append(x)
    return np.concatenate(out)


def test_a_clip_retrieval_folder_opens_read_only_and_can_be_adopted(tmp_path):
    root = tmp_path / "clip"
    stored = clip_retrieval_folder(root)
    eset = EmbeddingSet.open(root)
    assert eset.encoder == "unknown" and eset.normalized and len(eset) == 70
    np.testing.assert_array_equal(eset.gather(np.arange(70)), stored)
    assert eset.metadata([45]).to_pydict() == {"image_path": ["img/1_5"], "caption": ["c5"]}
    before = snapshot(root)
    with pytest.raises(StoreError, match="opens it read-only"):
        eset.append(np.ones((2, 16)), {"image_path": ["a", "b"], "caption": ["a", "b"]})
    assert snapshot(root) == before
    eset.write_manifest(encoder="open_clip:ViT-B-32/laion2b_s34b_b79k")
    eset.append(np.ones((2, 16)), {"image_path": ["a", "b"], "caption": ["a", "b"]})
    again = EmbeddingSet.open(root)
    assert len(again) == 72 and again.encoder.startswith("open_clip:")
    again.verify()
    np.testing.assert_array_equal(again.gather(np.arange(70)), stored)


# -- corruption: each names the shard and the problem, and leaves the files as they were --------
def corrupt_row_counts(root):
    pq.write_table(
        pa.table({"image_path": ["x"] * 39, "caption": ["y"] * 39}),
        root / "metadata" / "metadata_0.parquet",
    )
    return "metadata_0.parquet: 39 metadata rows, .*img_emb_0.npy has 40 embeddings"


def corrupt_dim(root):
    np.save(root / "img_emb" / "img_emb_1.npy", np.ones((30, 17), np.float16))
    return r"the dimension changes between shards \(\[16, 17\]\)"


def corrupt_truncate(root):
    p = root / "img_emb" / "img_emb_1.npy"
    p.write_bytes(p.read_bytes()[:-10])
    return "img_emb_1.npy: truncated or padded"


def corrupt_not_npy(root):
    (root / "img_emb" / "img_emb_0.npy").write_bytes(b"PK\x03\x04 this is a zip file")
    return "img_emb_0.npy: not a valid .npy file"


def corrupt_parquet(root):
    (root / "metadata" / "metadata_1.parquet").write_bytes(b"not parquet at all")
    return "metadata_1.parquet: not a readable parquet file"


@pytest.mark.parametrize(
    "corrupt", [corrupt_row_counts, corrupt_dim, corrupt_truncate, corrupt_not_npy, corrupt_parquet]
)
def test_corrupt_clip_retrieval_folders(tmp_path, corrupt):
    root = tmp_path / "clip"
    clip_retrieval_folder(root)
    match = corrupt(root)
    before = snapshot(root)
    with pytest.raises(StoreError, match=match):
        EmbeddingSet.open(root)
    assert snapshot(root) == before


def test_nan_rows_are_found_by_verify(tmp_path):
    root = tmp_path / "clip"
    clip_retrieval_folder(root)
    x = np.load(root / "img_emb" / "img_emb_1.npy")
    x[7, 3] = np.nan
    np.save(root / "img_emb" / "img_emb_1.npy", x)
    eset = EmbeddingSet.open(root)
    with pytest.raises(StoreError, match=r"img_emb_1.npy: row 7 \(global row 47\) holds NaN"):
        eset.verify()


def _edit_manifest(root, fn):
    data = json.loads((root / "manifest.json").read_text())
    fn(data)
    (root / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d["shards"][1].update(rows=99), "img_emb_1.npy: 200 rows, the manifest says 99"),
        (lambda d: d.update(dim=32), "img_emb_0.npy: dimension 24, the set has 32"),
        (
            lambda d: d["shards"].pop(),
            r"\['img_emb/img_emb_2.npy', 'metadata/metadata_2.parquet'\] "
            "not in manifest.json",
        ),
        (lambda d: d.update(format_version=7), "format_version 7 is newer"),
        (lambda d: d["shards"][0].pop("image"), "malformed manifest"),
    ],
)
def test_a_manifest_that_contradicts_the_files(tmp_path, edit, match):
    make_set(tmp_path / "s")
    _edit_manifest(tmp_path / "s", edit)
    before = snapshot(tmp_path / "s")
    with pytest.raises(StoreError, match=match):
        EmbeddingSet.open(tmp_path / "s")
    assert snapshot(tmp_path / "s") == before


def test_checksum_mismatch_is_named(tmp_path):
    make_set(tmp_path / "s")
    p = tmp_path / "s" / "img_emb" / "img_emb_1.npy"
    x = np.load(p)
    x[0, 0] = -x[0, 0]
    np.save(p, x)  # same size, different bytes
    eset = EmbeddingSet.open(tmp_path / "s")
    with pytest.raises(StoreError, match="img_emb_1.npy: checksum differs from manifest.json"):
        eset.verify()


def test_create_refuses_an_existing_set(tmp_path):
    make_set(tmp_path / "s", shards=(3,))
    with pytest.raises(StoreError, match="already holds an embedding set"):
        EmbeddingSet.create(tmp_path / "s", dim=24, encoder="x")


# -- out-of-order shards and recovery from a killed writer (what `quari embed` relies on) --------
def _rows(n, seed):
    x = np.random.default_rng(seed).standard_normal((n, 24))
    meta = {"group": np.full(n, seed), "name": [f"s{seed}-{i}" for i in range(n)]}
    return x, meta, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def test_shards_appended_out_of_order_read_in_numeric_order(tmp_path):
    eset = EmbeddingSet.create(tmp_path / "s", dim=24, encoder="e")
    parts = {i: _rows(n, i) for i, n in ((0, 4), (1, 3), (2, 5), (3, 2))}
    for i in (2, 0, 3, 1):  # the order parallel workers might finish in
        x, meta, _ = parts[i]
        shard = eset.append(x, meta, index=i)
        assert shard.index == i
    want = np.concatenate([parts[i][2] for i in range(4)])
    for s in (eset, EmbeddingSet.open(tmp_path / "s")):
        assert [sh.index for sh in s.shards] == [0, 1, 2, 3]
        assert [sh.offset for sh in s.shards] == [0, 4, 7, 12]
        np.testing.assert_array_equal(s.gather(np.arange(14)), want)
        assert s.metadata([4, 7]).column("name").to_pylist() == ["s1-0", "s2-0"]
    EmbeddingSet.open(tmp_path / "s").verify()


def test_explicit_index_is_checked(tmp_path):
    eset = EmbeddingSet.create(tmp_path / "s", dim=24, encoder="e")
    x, meta, _ = _rows(3, 0)
    eset.append(x, meta, index=5)
    before = snapshot(tmp_path / "s")
    with pytest.raises(QuARIInputError, match="shard 5 already exists"):
        eset.append(x, meta, index=5)
    with pytest.raises(QuARIInputError, match="non-negative integer"):
        eset.append(x, meta, index=-1)
    assert snapshot(tmp_path / "s") == before
    assert eset.append(x, meta).index == 6  # default: one past the highest


def test_recover_discards_uncommitted_shard_files_only(tmp_path):
    eset, stored, _ = make_set(tmp_path / "s", shards=(5, 6))
    root = tmp_path / "s"
    committed = snapshot(root)
    # What a writer killed after renaming shard 2's files, before replacing the manifest, leaves
    # (plus the temporary file of a write it was in the middle of).
    np.save(root / "img_emb" / "img_emb_2.npy", np.ones((3, 24), np.float16))
    pq.write_table(pa.table({"group": [1] * 3, "name": ["a"] * 3}), root / "metadata" / "m.tmp")
    (root / "metadata" / "m.tmp").rename(root / "metadata" / "metadata_2.parquet")
    (root / "img_emb" / ".img_emb_3.npy.x1y2").write_bytes(b"half written")
    (root / "img_emb" / ".keep").write_bytes(b"not ours")
    with pytest.raises(StoreError, match="not in manifest.json"):
        EmbeddingSet.open(root)
    assert eset.uncommitted_files() == [
        "img_emb/.img_emb_3.npy.x1y2",
        "img_emb/img_emb_2.npy",
        "metadata/metadata_2.parquet",
    ]
    again = EmbeddingSet.open(root, recover=True)
    assert len(again) == 11
    np.testing.assert_array_equal(again.gather(np.arange(11)), stored)
    assert (root / "img_emb" / ".keep").exists()
    (root / "img_emb" / ".keep").unlink()
    assert snapshot(root) == committed
    x, meta, _ = _rows(2, 9)
    assert again.append(x, meta, index=2).rows == 2  # the slot is free again
