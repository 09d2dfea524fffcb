"""quari embed: sources, metadata, resuming after a kill at any point, refusing changed inputs,
and the Ray engine writing the same set as the local one."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from quari.cli import app
from quari.embed import EmbedConfig, embed, open_source, read_errors
from quari.layout import read_manifest
from quari.store import EmbeddingSet, StoreError
from quari.validation import QuARIInputError

from embed_helpers import (
    ToyEncoder,
    assert_same_set,
    jpeg_bytes,
    photo,
    register_toy,
    set_contents,
    write_files,
)

CHILD = Path(__file__).with_name("embed_child.py")
register_toy()


def collection(root: Path) -> Path:
    """36 files in 9 chunks of 4: chunk 0 is all bad (empty files), two corrupt files elsewhere,
    captions beside some images, images in a subfolder too."""
    files = {f"a_bad_{i}.png": b"" for i in range(4)}
    for i in range(30):
        name = f"{'deep/' if i % 7 == 0 else ''}img_{i:03d}"
        files[f"{name}.jpg"] = jpeg_bytes(photo(i, (24 + i, 20 + (i % 5))))
        if i % 3:
            files[f"{name}.txt"] = f"picture number {i}".encode()
    files["img_012_x.jpg"] = b"corrupt"
    files["img_020_x.jpg"] = jpeg_bytes(photo(99))[:200]
    write_files(root, files)
    return root


CONFIG = EmbedConfig(rows_per_shard=4, batch_size=2, workers=0, progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: the set every interrupted run must end up equal to."""
    root = tmp_path_factory.mktemp("ref")
    src = collection(root / "in")
    result = embed(src, root / "set", ToyEncoder(), CONFIG)
    assert result.images == 36 and result.embedded == 30 and result.skipped == 6
    return src, root / "set"


def test_reference_layout(reference):
    _, out = reference
    c = set_contents(out)
    # chunk 0 had no good image, so shard 0 does not exist; 30 rows in shards 1–8
    assert [i for i, _ in c["shards"]] == list(range(1, 9))
    assert sum(n for _, n in c["shards"]) == 30
    assert set(c["metadata"]) == {"path", "caption", "width", "height"}
    assert c["metadata"]["path"][:2] == ["deep/img_000.jpg", "deep/img_007.jpg"]
    assert c["text"] is not None and c["text"].shape == (30, 16)
    errors = read_errors(out).to_pydict()
    assert errors["shard"] == [0, 0, 0, 0, 5, 7]
    job = json.loads((out / "embed_job.json").read_text())
    assert job["rows_per_shard"] == 4 and job["chunks"] == 9 and job["encoder"] == "toy"


def _committed(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file the manifest lists."""
    manifest = json.loads((out / "manifest.json").read_text())
    files = [s[k]["path"] for s in manifest["shards"] for k in ("image", "text", "metadata")]
    return {f: ((out / f).stat().st_ino, (out / f).stat().st_mtime_ns) for f in files}


def _good_images_to_redo(out: Path, src: Path) -> int:
    """Good images in chunks that are not committed (what a resume must encode, no more)."""
    source = open_source(src)
    manifest = json.loads((out / "manifest.json").read_text())
    done = {s["index"] for s in manifest["shards"]}
    ref_errors = {"a_bad_0.png", "a_bad_1.png", "a_bad_2.png", "a_bad_3.png"}
    ref_errors |= {"img_012_x.jpg", "img_020_x.jpg"}
    return sum(
        1
        for k, item in enumerate(source.items)
        if k // 4 not in done and k // 4 != 0 and item.path not in ref_errors
    )


def _child(args: list[str], env_extra: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, str(CHILD), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **kw,
    )


def _embed_args(src: Path, out: Path, spec: str = "toy") -> list[str]:
    return ["embed", str(src), str(out), "--encoder", spec, "--rows-per-shard", "4",
            "--batch-size", "2", "--workers", "0", "--quiet"]  # fmt: skip


@pytest.mark.parametrize(
    "die",
    [
        "before:manifest:3",  # shard files renamed into place, manifest not yet replaced
        "before:metadata:2",  # image embeddings written, metadata not
        "before:text_emb:1",
        "after:errors:1",  # the all-bad chunk 0 recorded: it must count as done
        "after:errors:2",  # a chunk's errors written, its shard not
        "after:img_emb:5",
    ],
)
def test_killed_at_any_write_then_resumed_equals_an_uninterrupted_run(reference, tmp_path, die):
    src, ref = reference
    out = tmp_path / "set"
    proc = _child(_embed_args(src, out), {"QUARI_TEST_DIE": die})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 9, err.decode()[-2000:]
    # the committed state as the manifest describes it, without open()'s checks
    described = EmbeddingSet(out, **vars(read_manifest(out / "manifest.json")))
    leftovers = described.uncommitted_files()
    if die.startswith("after:errors"):
        assert leftovers == []
    else:  # the kill left shard files no manifest lists: a plain open refuses the folder
        assert leftovers, "the kill point was not reached"
        with pytest.raises(StoreError, match="not in manifest.json"):
            EmbeddingSet.open(out)
    before = _committed(out)
    to_redo = _good_images_to_redo(out, src)
    enc = ToyEncoder()
    result = embed(src, out, enc, CONFIG)
    assert enc.encoded == to_redo, "finished shards were recomputed (or pending ones skipped)"
    assert result.shards_reused > 0
    assert_same_set(ref, out)
    after = _committed(out)
    assert all(after[f] == v for f, v in before.items()), "a committed shard file was rewritten"


def test_sigkill_mid_run_then_resume(reference, tmp_path):
    src, ref = reference
    out = tmp_path / "set"
    count = tmp_path / "count.txt"
    # 0.25 s per batch of 2 (and one decode worker): ~4 s of work, killed after 3 shards.
    args = _embed_args(src, out, f"toy:0.25,{count}")
    args[args.index("--workers") + 1] = "1"
    proc = _child(args, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            manifest = out / "manifest.json"
            if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its DataLoader worker, mid-flight
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    committed = json.loads((out / "manifest.json").read_text())["shards"]
    assert 3 <= len(committed) < 8, "the run was not interrupted mid-way"
    before = _committed(out)
    to_redo = _good_images_to_redo(out, src)
    result = CliRunner().invoke(app, _embed_args(src, out, f"toy:0,{tmp_path / 'count2.txt'}"))
    assert result.exit_code == 0, result.output
    assert "kept from an earlier run" in result.output
    redone = sum(int(x) for x in (tmp_path / "count2.txt").read_text().split())
    assert redone == to_redo
    assert_same_set(ref, out)
    assert all(_committed(out)[f] == v for f, v in before.items())


def test_a_finished_set_is_left_alone_and_changes_are_refused(reference, tmp_path):
    src, ref = reference
    out = tmp_path / "set"
    embed(src, out, ToyEncoder(), CONFIG)
    enc = ToyEncoder()
    again = embed(src, out, enc, CONFIG)
    assert enc.encoded == 0 and again.shards_written == 0 and again.shards_reused == 9
    assert_same_set(ref, out)
    with pytest.raises(QuARIInputError, match="--rows-per-shard changed"):
        embed(src, out, ToyEncoder(), EmbedConfig(rows_per_shard=5, workers=0, progress=False))
    other = ToyEncoder()
    other.id = "toy-v2"
    with pytest.raises(QuARIInputError, match="holds embeddings of toy"):
        embed(src, out, other, CONFIG)
    (src / "zzz.jpg").write_bytes(jpeg_bytes(photo(5)))
    try:
        with pytest.raises(QuARIInputError, match="the input images .* changed"):
            embed(src, out, ToyEncoder(), CONFIG)
        runner = CliRunner().invoke(app, _embed_args(src, out))
        assert runner.exit_code == 2 and "changed since this set was started" in runner.output
    finally:
        (src / "zzz.jpg").unlink()


def test_table_sources_keep_extra_columns(tmp_path):
    write_files(tmp_path / "imgs", {f"p{i}.jpg": jpeg_bytes(photo(i)) for i in range(5)})
    rows = {
        "image_path": [f"imgs/p{i}.jpg" for i in (3, 1, 4, 0, 2)] + ["imgs/missing.jpg"],
        "text": [f"caption {i}" for i in range(6)],
        "label": ["cat", "dog", "cat", "bird", "dog", "cat"],
        "score": [0.5, 0.1, 0.9, 0.3, 0.7, 0.2],
    }
    pq.write_table(pa.table(rows), tmp_path / "list.parquet")
    (tmp_path / "list.csv").write_text(
        "image_path,text,label,score\n"
        + "".join(f"{p},{t},{lab},{s}\n" for p, t, lab, s in zip(*rows.values(), strict=True))
    )
    sets = []
    for name in ("list.parquet", "list.csv"):
        out = tmp_path / f"set-{name}"
        result = embed(
            tmp_path / name, out, ToyEncoder(), EmbedConfig(rows_per_shard=4, progress=False)
        )
        assert result.embedded == 5 and result.skipped == 1
        c = set_contents(out)
        assert c["metadata"]["path"] == rows["image_path"][:5]  # table order, not sorted
        assert c["metadata"]["caption"] == rows["text"][:5]
        assert c["metadata"]["label"] == rows["label"][:5]
        assert list(c["metadata"]) == ["path", "caption", "label", "score", "width", "height"]
        assert c["errors"]["path"] == ["imgs/missing.jpg"]
        assert c["errors"]["reason"][0].startswith("unreadable file")
        sets.append(c)
    np.testing.assert_array_equal(sets[0]["vectors"], sets[1]["vectors"])
    np.testing.assert_array_equal(sets[0]["text"], sets[1]["text"])


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_match_the_same_images_in_a_folder(tmp_path):
    images = {f"{i:04d}": jpeg_bytes(photo(i, (30, 20 + i))) for i in range(7)}
    (tmp_path / "wds").mkdir()
    for s, keys in enumerate([["0000", "0001", "0002", "0003"], ["0004", "0005", "0006"]]):
        _tar(
            tmp_path / "wds" / f"shard-{s:05d}.tar",
            [
                (
                    f"x/{k}",
                    {"jpg": images[k], "txt": f"cap {k}".encode(), "json": b'{"id": %d}' % int(k)},
                )
                for k in keys
            ]
            + ([("x/broken", {"jpg": b"nope"})] if s == 0 else []),
        )
    write_files(tmp_path / "folder", {f"{k}.jpg": v for k, v in images.items()})
    wds = embed(
        tmp_path / "wds",
        tmp_path / "a",
        ToyEncoder(),
        EmbedConfig(rows_per_shard=3, progress=False),
    )
    folder = embed(
        tmp_path / "folder",
        tmp_path / "b",
        ToyEncoder(),
        EmbedConfig(rows_per_shard=3, progress=False),
    )
    assert wds.embedded == folder.embedded == 7 and wds.skipped == 1
    a, b = set_contents(tmp_path / "a"), set_contents(tmp_path / "b")
    np.testing.assert_array_equal(a["vectors"], b["vectors"])
    assert a["metadata"]["path"][:2] == ["shard-00000.tar/x/0000.jpg", "shard-00000.tar/x/0001.jpg"]
    assert a["metadata"]["key"][0] == "x/0000" and a["metadata"]["caption"][6] == "cap 0006"
    assert json.loads(a["metadata"]["json"][5]) == {"id": 5}
    assert a["metadata"]["height"] == b["metadata"]["height"] == [20 + i for i in range(7)]
    assert a["errors"]["path"] == ["shard-00000.tar/x/broken.jpg"]


def test_inputs_are_checked(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuARIInputError, match="no images found"):
        embed(tmp_path / "empty", tmp_path / "o", ToyEncoder())
    (tmp_path / "t.csv").write_text("name,caption\na.jpg,x\n")
    with pytest.raises(QuARIInputError, match="no image path column"):
        open_source(tmp_path / "t.csv")
    (tmp_path / "bad.tar").write_bytes(b"\x1f\x8b compressed or garbage")
    with pytest.raises(QuARIInputError, match="not a plain"):
        open_source(tmp_path / "bad.tar")
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "nope"), str(tmp_path / "o")])
    assert result.exit_code == 2 and "no such file or folder" in result.output


@pytest.mark.slow
def test_ray_engine_writes_the_same_set_as_the_local_engine(tmp_path):
    ray = pytest.importorskip("ray")
    from hf_helpers import build_clip

    model = build_clip(tmp_path / "clip")
    src = collection(tmp_path / "in")
    spec = f"hf:{model}"
    base = dict(rows_per_shard=4, batch_size=3, progress=False)
    embed(src, tmp_path / "local", spec, EmbedConfig(**base, workers=1))
    try:
        result = embed(
            src, tmp_path / "ray", spec, EmbedConfig(**base, engine="ray", ray_num_cpus=2)
        )
    finally:
        ray.shutdown()
    assert result.embedded == 30 and result.skipped == 6
    a, b = set_contents(tmp_path / "local"), set_contents(tmp_path / "ray")
    assert a["shards"] == b["shards"] and a["metadata"] == b["metadata"]
    assert a["errors"] == b["errors"] and a["encoder"] == b["encoder"]
    # Ray groups images into batches differently; batched float32 GEMMs may then differ in the
    # last bits, which can flip one fp16 rounding step (2⁻¹¹ ≈ 4.9e-4 near 1).
    np.testing.assert_allclose(
        a["vectors"].astype(np.float32), b["vectors"].astype(np.float32), atol=1e-3
    )
    np.testing.assert_allclose(
        a["text"].astype(np.float32), b["text"].astype(np.float32), atol=1e-3
    )


def test_cli_progress_bar_and_encoder_commands(tmp_path):
    write_files(tmp_path / "in", {f"p{i}.jpg": jpeg_bytes(photo(i)) for i in range(3)})
    runner = CliRunner()
    result = runner.invoke(app, ["embed", str(tmp_path / "in"), str(tmp_path / "s"), "-e", "toy",
                                 "--workers", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "img/s" in result.output and "3 of 3 images embedded" in result.output
    listed = runner.invoke(app, ["encoders", "list"])
    assert listed.exit_code == 0
    assert all(
        k in listed.output for k in ("hf:", "open_clip:", "local-dir:", "offline:", "not CLIP")
    )
    no_captions = runner.invoke(app, ["encoders", "fit-offline", str(tmp_path / "in"), "--out",
                                      str(tmp_path / "head"), "--quiet"])  # fmt: skip
    assert no_captions.exit_code == 2 and "has no captions" in no_captions.output


class _NaNOnBlack(ToyEncoder):
    """Returns NaN for all-black images, as an fp16 overflow would."""

    def encode_batch(self, inputs):
        out = super().encode_batch(inputs)
        out[np.asarray(inputs["pixel_values"]).sum(axis=1) == 0] = np.nan
        return out


def test_a_nan_embedding_is_an_error_row_not_a_crash(tmp_path):
    from PIL import Image

    files = {f"p{i}.jpg": jpeg_bytes(photo(i)) for i in range(4)}
    files["p2.jpg"] = jpeg_bytes(Image.new("RGB", (20, 20)))
    write_files(tmp_path / "in", files)
    result = embed(tmp_path / "in", tmp_path / "s", _NaNOnBlack(), EmbedConfig(progress=False))
    assert result.embedded == 3 and result.skipped == 1
    errors = read_errors(tmp_path / "s").to_pydict()
    assert errors["path"] == ["p2.jpg"] and "NaN/Inf or a zero vector" in errors["reason"][0]
