"""Training pairs: sources, mixtures, image-level splits, deterministic batches, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quari.eval.synthetic import PlantedSpec, planted_pairs, write_planted_set
from quari.store import EmbeddingSet
from quari.training.config import TrainConfig, TrainSource, default_lr
from quari.training.data import ResumableBatchSampler, TrainingData
from quari.training.mining import MiningConfig
from quari.validation import QuARIInputError

from helpers import make_set

SPEC = PlantedSpec(dim=24, cluster_dim=8, subspace_dim=4)


def planted(root: Path, images: int, captions: int = 3, seed: int = 1) -> EmbeddingSet:
    return write_planted_set(root, images, SPEC, captions_per_image=captions, seed=seed)


def config(tmp_path: Path, *train: str, **kw) -> TrainConfig:
    kw.setdefault("mining", MiningConfig(k=10))
    kw.setdefault("rank", 4)
    kw.setdefault("hidden_dim", 16)
    kw.setdefault("num_heads", 2)
    kw.setdefault("image_key", "image_id")
    kw.setdefault("progress", False)
    return TrainConfig(train=tuple(TrainSource.parse(t) for t in train), out=tmp_path / "run", **kw)


def test_source_specs_parse():
    assert TrainSource.parse("a/b") == TrainSource(Path("a/b"))
    assert TrainSource.parse("a/b:0.25") == TrainSource(Path("a/b"), 0.25)
    assert TrainSource.parse("c:/x/y") == TrainSource(Path("c:/x/y"))  # not a ratio
    with pytest.raises(QuARIInputError, match="positive"):
        TrainSource.parse("a:0")


def test_presets_fill_unset_fields_only(tmp_path):
    paper = config(tmp_path, "s", preset="paper")
    assert (paper.lr, paper.schedule, paper.variant) == (1e-5, "cosine", "paper")
    assert (paper.init, paper.noise, paper.noise_scale, paper.batch_size) == (
        "default", "paper", 1.0, 320,
    )  # fmt: skip
    assert (paper.num_layers, paper.num_steps) == (4, 4)  # the paper's shape (rank given: 4)
    default = TrainConfig(train=(TrainSource(Path("s")),), out=tmp_path, accelerator="cpu")
    assert default.preset == "default" and default.init == "identity"
    assert (default.variant, default.normalize_factors, default.noise) == (
        "reference", False, "relative",
    )  # fmt: skip
    assert (default.hidden_dim, default.num_layers, default.rank, default.batch_size) == (
        128, 2, 16, 128,
    )  # fmt: skip
    assert default.num_steps == 1  # the CPU size: one refinement step (docs/method.md §5.5)
    assert (default.token_dropout, default.relevance_negatives, default.image_queries) == (
        0.0, True, 0.0,
    )  # fmt: skip
    assert (paper.token_dropout, paper.relevance_negatives) == (None, False)
    model = default.model_config(64)
    assert (model.init, model.normalize_factors, model.anchor_scale) == ("identity", False, 1.0)
    assert model.token_dropout == 0.0
    assert (default.lr, default.decoder_norm, model.decoder_norm) == (1e-3, False, False)
    ref = config(tmp_path, "s", preset="reference", variant="paper", lr=1e-3)
    assert (ref.lr, ref.schedule, ref.variant) == (1e-3, "onecycle", "paper")
    assert TrainConfig.from_dict(ref.to_dict()) == ref
    with pytest.raises(QuARIInputError, match="for every"):
        config(tmp_path, "a:0.5", "b")
    with pytest.raises(QuARIInputError, match="batch_size"):
        config(tmp_path, "a", batch_size=0)


def test_default_recipe_follows_the_model_size(tmp_path):
    """The default recipe's lr and decoder LayerNorm follow the size (docs/method.md §5.5);
    anything given explicitly still wins, and the other presets keep their own values."""
    src = (TrainSource(Path("s")),)
    big = TrainConfig(train=src, out=tmp_path, accelerator="cpu", hidden_dim=512, rank=64,
                      num_layers=4, num_heads=8, num_steps=4)  # fmt: skip
    assert big.lr == pytest.approx(default_lr(512, 64)) == pytest.approx(1.25e-4)
    assert big.decoder_norm is True and big.model_config(768).decoder_norm is True
    assert default_lr(64, 8) == 1e-3, "never above the tuned lr"
    wide = TrainConfig(train=src, out=tmp_path, accelerator="cpu", hidden_dim=512, num_heads=8)
    assert (wide.lr, wide.decoder_norm) == (pytest.approx(2.5e-4), False)
    mine = TrainConfig(train=src, out=tmp_path, accelerator="cpu", num_steps=4, lr=3e-3,
                       decoder_norm=False)  # fmt: skip
    assert (mine.lr, mine.decoder_norm) == (3e-3, False)
    paper = TrainConfig(train=src, out=tmp_path, preset="paper")
    assert paper.decoder_norm is None and paper.model_config(64).decoder_norm is True
    reference = TrainConfig(train=src, out=tmp_path, preset="reference")
    assert reference.model_config(64).decoder_norm is False
    assert TrainConfig.from_dict(big.to_dict()) == big


def test_the_static_blend_follows_the_device(tmp_path, monkeypatch):
    """The default recipe blends the whitened cosine at the CPU size, where it was measured,
    and not at the paper's size on a GPU; given explicitly it wins; the paper has none."""
    import torch

    src = (TrainSource(Path("s")),)
    assert TrainConfig(train=src, out=tmp_path, accelerator="cpu").blend_weight == 0.5
    assert TrainConfig(train=src, out=tmp_path, preset="paper").blend_weight == 0.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = TrainConfig(train=src, out=tmp_path)
    assert (gpu.hidden_dim, gpu.blend_weight) == (512, 0.0)
    assert TrainConfig(train=src, out=tmp_path, blend_weight=0.25).blend_weight == 0.25
    assert TrainConfig.from_dict(gpu.to_dict()) == gpu


def test_split_is_by_image_and_seeded(tmp_path):
    planted(tmp_path / "s", 100, captions=3)
    data = TrainingData.from_config(config(tmp_path, str(tmp_path / "s"), val_fraction=0.2))
    src = data.sources[0]
    train_images = set(src.groups[src.train_rows].tolist())
    val_images = set(src.groups[src.val_rows].tolist())
    assert not train_images & val_images
    assert len(val_images) == 20 and len(train_images) == 80
    assert src.train_rows.size + src.val_rows.size == 300
    again = TrainingData.from_config(config(tmp_path, str(tmp_path / "s"), val_fraction=0.2))
    np.testing.assert_array_equal(again.sources[0].val_rows, src.val_rows)
    other = TrainingData.from_config(
        config(tmp_path, str(tmp_path / "s"), val_fraction=0.2, seed=5)
    )
    assert not np.array_equal(other.sources[0].val_rows, src.val_rows)
    # Validation: every caption of the held-out images; the gallery holds each image once.
    rows, gallery, target = data.val_queries
    assert rows.size == 60 and gallery.size == 20
    np.testing.assert_array_equal(src.groups[gallery[target]], src.groups[rows])


def test_validation_cap_keeps_whole_images(tmp_path):
    planted(tmp_path / "s", 100, captions=3)
    cfg = config(tmp_path, str(tmp_path / "s"), val_fraction=0.3, val_max_queries=40)
    data = TrainingData.from_config(cfg)
    rows, gallery, _ = data.val_queries
    assert rows.size == 39 and gallery.size == 13  # 13 whole images of 3 captions
    groups = data.val.groups
    assert all((groups[rows] == g).sum() == 3 for g in groups[gallery])


def test_semipositives_never_point_at_validation_images(tmp_path):
    planted(tmp_path / "s", 120, captions=2)
    data = TrainingData.from_config(config(tmp_path, str(tmp_path / "s"), val_fraction=0.25))
    src = data.sources[0]
    val_images = set(src.groups[src.val_rows].tolist())
    used = src.semipos_ids[src.semipos_valid]
    assert used.size > 0 and not set(src.groups[used].tolist()) & val_images
    assert (src.semipos_weights[~src.semipos_valid] == 0).all()
    assert (tmp_path / "s" / "semipos" / "semipos.json").is_file()  # mined on first use


def test_mixture_ratios_and_natural_shares(tmp_path):
    planted(tmp_path / "a", 200, captions=1, seed=1)
    planted(tmp_path / "b", 50, captions=1, seed=2)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    natural = TrainingData.from_config(config(tmp_path, a, b, val=Path(a), semipos=False))
    assert natural.sources[1].val_rows.size == 0  # only the --val set is split
    np.testing.assert_allclose(natural.probabilities, [190 / 240, 50 / 240])
    mixed = TrainingData.from_config(
        config(tmp_path, f"{a}:1", f"{b}:3", val=Path(a), semipos=False)
    )
    batches = mixed.batches(20, epoch_pairs=400)
    src, row = batches.plan(0)
    assert (src == 1).sum() == 300 and (src == 0).sum() == 100
    # The small set is cycled through whole permutations: every train row 6 times.
    assert np.bincount(row[src == 1], minlength=50).tolist() == [6] * 50
    assert set(row[src == 0].tolist()) <= set(mixed.sources[0].train_rows.tolist())


def test_batches_are_deterministic_and_ranks_partition_the_global_batch(tmp_path):
    planted(tmp_path / "s", 90, captions=2)
    cfg = config(tmp_path, str(tmp_path / "s"), val_fraction=0.1)
    data = TrainingData.from_config(cfg)
    one = data.batches(8, world_size=2, rank=0)
    two = data.batches(8, world_size=2, rank=1)
    assert len(one) == 162 // 16
    b0, b1 = one[(1, 3)], two[(1, 3)]
    assert b0["query"].shape == (8, 24) and b0["semipos"].shape == (8, 2, 24)
    glob = data.batches(16)
    _, row = glob.pairs(1, 3)
    np.testing.assert_array_equal(np.concatenate([b0["row"], b1["row"]]), row)
    again = TrainingData.from_config(cfg).batches(8, world_size=2, rank=0)[(1, 3)]
    for key, value in b0.items():
        np.testing.assert_array_equal(value.numpy(), again[key].numpy())
    assert not np.array_equal(one[(2, 3)]["row"], b0["row"])  # epochs reshuffle
    # The pairs are what the set holds: caption row i ↔ image row i, unit queries.
    eset = EmbeddingSet.open(tmp_path / "s")
    np.testing.assert_allclose(b0["image"], eset.gather(b0["row"].numpy()), atol=0)
    np.testing.assert_allclose(b0["query"].norm(dim=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(b0["group"], data.sources[0].groups[b0["row"].numpy()])


def test_sampler_starts_at_the_restored_position():
    sampler = ResumableBatchSampler(5, lambda: (3, 2))
    assert list(sampler) == [(3, 2), (3, 3), (3, 4)] and len(sampler) == 5


def test_sets_from_different_encoders_are_refused(tmp_path):
    planted(tmp_path / "a", 20)
    make_set(tmp_path / "b", shards=(30,), dim=24, text=True, encoder="other-encoder")
    with pytest.raises(QuARIInputError, match="encoder 'other-encoder'"):
        TrainingData.from_config(
            config(tmp_path, str(tmp_path / "a"), str(tmp_path / "b"), image_key=None)
        )
    with pytest.raises(QuARIInputError, match="differs"):
        TrainingData.from_config(
            config(tmp_path, str(tmp_path / "a"), val=tmp_path / "b", image_key=None)
        )


def test_a_set_without_text_embeddings_is_refused(tmp_path):
    make_set(tmp_path / "b", shards=(30,), dim=24, text=False)
    with pytest.raises(QuARIInputError, match="no text embeddings"):
        TrainingData.from_config(config(tmp_path, str(tmp_path / "b"), image_key=None))


def test_empty_splits_are_refused(tmp_path):
    data = planted_pairs(SPEC, 1, captions_per_image=4, seed=0)
    eset = EmbeddingSet.create(tmp_path / "one", dim=24, encoder="synthetic:planted")
    eset.append(data.images[[0, 0, 0, 0]], {"image_id": [0, 0, 0, 0]}, data.texts)
    with pytest.raises(QuARIInputError, match="training split is empty"):
        TrainingData.from_config(config(tmp_path, str(tmp_path / "one"), image_key="image_id"))
    planted(tmp_path / "s", 20)
    with pytest.raises(QuARIInputError, match="no full batch"):
        TrainingData.from_config(config(tmp_path, str(tmp_path / "s"), semipos=False)).batches(1000)


def test_a_missing_image_key_is_named(tmp_path):
    planted(tmp_path / "s", 20)
    with pytest.raises(QuARIInputError, match="no metadata column 'photo'"):
        TrainingData.from_config(config(tmp_path, str(tmp_path / "s"), image_key="photo"))


def test_string_image_keys_group_rows(tmp_path):
    data = planted_pairs(SPEC, 10, captions_per_image=2, seed=0)
    eset = EmbeddingSet.create(tmp_path / "s", dim=24, encoder="synthetic:planted")
    keys = [f"img-{i // 2:03d}.jpg" for i in range(20)]
    eset.append(data.images[data.image_of_text], {"file": keys}, data.texts)
    cfg = config(tmp_path, str(tmp_path / "s"), image_key="file", val_fraction=0.2, semipos=False)
    src = TrainingData.from_config(cfg).sources[0]
    np.testing.assert_array_equal(src.groups, np.arange(20) // 2)
    assert src.val_rows.size == 4 and src.train_rows.size == 16
