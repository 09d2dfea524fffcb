"""hf: encoders on tiny random CLIP, SigLIP and SigLIP2 models saved to a folder (no hub)."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from quari.cli import app
from quari.embed import load_image, open_source
from quari.encoders import Encoder, EncoderError, load_encoder
from quari.store import EmbeddingSet

from embed_helpers import jpeg_bytes, photo, write_files
from hf_helpers import BUILDERS

pytest.importorskip("transformers")

FAMILIES = ["clip", "siglip", "siglip2"]
DIMS = {"clip": 24, "siglip": 32, "siglip2": 32}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-models")
    return {family: build(root / family) for family, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def encoders(models):
    return {family: load_encoder(f"hf:{folder}") for family, folder in models.items()}


def unit_norms(x):
    return np.linalg.norm(x.astype(np.float64), axis=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_normalisation_and_identity(encoders, models, family):
    enc = encoders[family]
    assert isinstance(enc, Encoder)
    assert enc.family == family and enc.dim == DIMS[family]
    assert enc.id == f"hf:{models[family].resolve()}"
    assert enc.info["family"] == family and enc.info["image_processor"].endswith("Pil")
    images = [photo(i, size) for i, size in enumerate([(40, 30), (17, 64), (300, 200), (32, 32)])]
    x = enc.encode_images(images)
    t = enc.encode_texts(["a red cat", "two dogs", ""])
    assert x.shape == (4, enc.dim) and t.shape == (3, enc.dim)
    assert x.dtype == t.dtype == np.float32
    np.testing.assert_allclose(unit_norms(x), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit_norms(t), 1.0, atol=1e-5)
    assert np.linalg.matrix_rank(x, tol=1e-3) > 1, "images should not collapse to one vector"
    # one at a time gives the same vectors as a batch (padding and masks are right)
    np.testing.assert_allclose(enc.encode_images(images[2:3])[0], x[2], atol=1e-5)
    np.testing.assert_allclose(enc.encode_texts(["two dogs"])[0], t[1], atol=1e-5)


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_siglip_text_is_padded_to_64(encoders, family):
    enc = encoders[family]
    tokens = enc.tokenizer(["a cat", "a much longer caption of a dog"], **enc.text_kwargs)
    assert [len(ids) for ids in tokens["input_ids"]] == [64, 64]


@pytest.mark.parametrize("family", FAMILIES)
def test_quari_embed_and_the_python_api_give_identical_embeddings(
    encoders, models, family, tmp_path
):
    files = {
        f"{'sub/' if i % 2 else ''}img{i}.jpg": jpeg_bytes(photo(10 + i, (30 + 7 * i, 40)))
        for i in range(5)
    }
    files.update(
        {f"{'sub/' if i % 2 else ''}img{i}.txt": f"caption {i}".encode() for i in (0, 1, 3)}
    )
    write_files(tmp_path / "in", files)
    out = tmp_path / "set"
    args = ["embed", str(tmp_path / "in"), str(out), "--encoder", f"hf:{models[family]}"]
    args += ["--rows-per-shard", "3", "--batch-size", "3", "--workers", "1", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    eset = EmbeddingSet.open(out)
    enc = encoders[family]
    assert eset.encoder == enc.id and eset.dim == enc.dim and eset.has_text
    assert [s.rows for s in eset.shards] == [3, 2]

    source = open_source(tmp_path / "in")
    images = [load_image(item.read()).image for item in source.items]
    captions = source.captions(list(range(5)))
    # encode_images batches by 3 as the embed run did: the same forward passes, so equal bits
    want = enc.encode_images(images)
    want_text = np.concatenate([enc.encode_texts(captions[:3]), enc.encode_texts(captions[3:])])

    def stored(x):
        return (x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)).astype(np.float16)

    np.testing.assert_array_equal(eset.gather(np.arange(5)), stored(want))
    np.testing.assert_array_equal(eset.gather(np.arange(5), kind="text"), stored(want_text))
    meta = eset.metadata(np.arange(5)).to_pydict()
    assert meta["path"] == ["img0.jpg", "img2.jpg", "img4.jpg", "sub/img1.jpg", "sub/img3.jpg"]
    assert meta["caption"] == ["caption 0", None, None, "caption 1", "caption 3"]
    assert meta["width"] == [30, 44, 58, 37, 51] and meta["height"] == [40] * 5


def test_hf_errors_are_named(tmp_path):
    with pytest.raises(EncoderError, match="cannot load model and processor"):
        load_encoder(f"hf:{tmp_path}")
    with pytest.raises(EncoderError, match="give a hub name or a folder"):
        load_encoder("hf:")
    with pytest.raises(EncoderError, match="unknown encoder spec 'nope:x'"):
        load_encoder("nope:x")
