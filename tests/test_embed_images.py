"""Safe decoding: every kind of bad file is refused with its reason, odd modes become correct RGB,
and a run over a folder of them finishes with the bad ones listed in the errors parquet."""

from __future__ import annotations

import numpy as np
import pytest

from quari.embed import BadImage, EmbedConfig, embed, load_image, read_errors
from quari.embed.images import to_rgb
from quari.store import EmbeddingSet

from embed_helpers import (
    ToyEncoder,
    bad_files,
    bomb_png,
    jpeg_bytes,
    photo,
    tricky_files,
    write_files,
)


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_files_are_refused_with_a_reason(name, tmp_path):
    data, reason = bad_files()[name]
    with pytest.raises(BadImage, match=f"^{reason}"):
        load_image(data)
    (tmp_path / name).write_bytes(data)  # the same from a path
    with pytest.raises(BadImage, match=f"^{reason}"):
        load_image(tmp_path / name)


def test_the_pixel_limit_is_checked_from_the_header():
    # Our own limit (below PIL's): refused before decoding, naming the size.
    with pytest.raises(
        BadImage, match=r"decompression bomb: 40×30 = 1,200 pixels exceeds .* 1,000"
    ):
        load_image(jpeg_bytes(photo(0)), max_pixels=1000)
    # PIL's hard limit still applies when ours is set higher than it.
    with pytest.raises(BadImage, match="decompression bomb"):
        load_image(bomb_png(), max_pixels=10**10)
    # Between PIL's warning and error thresholds: its warning is an error here.
    with pytest.raises(BadImage, match="decompression bomb"):
        load_image(bomb_png(10_000, 10_000), max_pixels=10**10)
    assert load_image(jpeg_bytes(photo(0)), max_pixels=1200).width == 40


def test_a_missing_file_is_a_bad_image(tmp_path):
    with pytest.raises(BadImage, match="unreadable file"):
        load_image(tmp_path / "nope.jpg")


def test_odd_modes_become_the_right_rgb():
    files = tricky_files()
    cmyk = np.asarray(load_image(files["cmyk.jpg"][0]).image)
    assert np.abs(cmyk.astype(int) - [255, 0, 0]).max() <= 2  # red, not inverted or dark
    grey16 = np.asarray(load_image(files["grey16.png"][0]).image)
    assert (grey16 == 128).all()  # 32768/65535 of full scale, not clipped to 255
    pal = np.asarray(load_image(files["palette.png"][0]).image)
    assert (pal[:, :15] == [255, 0, 0]).all() and (pal[:, 15:] == 255).all()  # transparent → white
    la = np.asarray(load_image(files["la.png"][0]).image)
    assert (la == 255).all()  # fully transparent LA → white, not black
    for name, (data, size) in files.items():
        decoded = load_image(data)
        assert decoded.image.mode == "RGB", name
        assert (decoded.width, decoded.height) == size == decoded.image.size, name


def test_exif_rotation_is_applied():
    from PIL import Image

    upright = photo(3, (40, 20)).transpose(Image.Transpose.ROTATE_270)  # what a viewer shows
    decoded = np.asarray(load_image(tricky_files()["rotated.jpg"][0]).image, np.float64)
    assert decoded.shape == (40, 20, 3)
    assert np.abs(decoded - np.asarray(upright, np.float64)).mean() < 8  # JPEG noise only


def test_integer_and_float_greyscale_scale_from_their_range():
    from PIL import Image

    i32 = Image.fromarray(np.array([[0, 1000, 70000]], np.int32), "I")
    assert np.asarray(to_rgb(i32))[0, :, 0].tolist() == [0, 4, 255]  # min-max over > 16 bits
    f = Image.fromarray(np.array([[-5.0, 100.4, 300.0]], np.float32), "F")
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 100, 255]


def test_a_run_over_every_kind_of_bad_file_finishes_and_lists_them(tmp_path):
    files = {name: data for name, (data, _) in bad_files().items()}
    files.update({name: data for name, (data, _) in tricky_files().items()})
    files["good.jpg"] = jpeg_bytes(photo(9))
    write_files(tmp_path / "in", files)
    out = tmp_path / "set"
    result = embed(
        tmp_path / "in", out, ToyEncoder(), EmbedConfig(rows_per_shard=4, workers=1, progress=False)
    )
    good = sorted(set(tricky_files()) | {"good.jpg"})
    assert result.embedded == len(good) and result.skipped == len(bad_files())
    eset = EmbeddingSet.open(out)
    meta = eset.metadata(np.arange(eset.rows)).to_pydict()
    assert meta["path"] == good
    sizes = {**{n: s for n, (_, s) in tricky_files().items()}, "good.jpg": (40, 30)}
    assert list(zip(meta["width"], meta["height"], strict=True)) == [sizes[n] for n in good]
    errors = read_errors(out).to_pydict()
    assert sorted(errors["path"]) == sorted(bad_files())
    for path, reason in zip(errors["path"], errors["reason"], strict=True):
        assert reason.startswith(bad_files()[path][1]), (path, reason)
    assert (out / "errors").is_dir() and all(e >= 0 for e in errors["shard"])
