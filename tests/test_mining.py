"""Semi-positive mining against a brute-force numpy oracle; resume, staleness, duplicates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quari.errors import QuARIInputError
from quari.store import EmbeddingSet, StoreError
from quari.training.mining import (
    MiningConfig,
    StaleMiningError,
    load_semipositives,
    mine_semipositives,
    mining_device,
    mining_status,
)

from helpers import make_set


def brute_force(stored: np.ndarray, k: int, keep: int, tau: float):
    """Oracle: for each row, cosines to every *distinct* other vector (duplicates collapsed to
    their first row), top k, softmax(sims/τ); returns the kept sims and weights."""
    x = stored.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    _, first = np.unique(stored, axis=0, return_index=True)
    distinct = np.zeros(len(stored), dtype=bool)
    distinct[first] = True
    sims = x @ x.T
    sims[:, ~distinct] = -np.inf
    sims[sims >= 1 - 1e-6] = -np.inf  # self and duplicates
    top = -np.sort(-sims, axis=1)[:, :k]
    p = np.exp((top - top[:, :1]) / tau)
    p /= p.sum(axis=1, keepdims=True)
    return top[:, :keep], p[:, :keep]


def cos_of(stored: np.ndarray, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    x = stored.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.einsum("ne,nke->nk", x[rows], x[ids])


#: Where exact mining searches: FAISS on the CPU, and the torch path (a GPU's) run on the CPU.
SEARCHES = pytest.mark.parametrize("device", [None, "cpu"], ids=["faiss", "torch"])


@SEARCHES
def test_exact_mining_matches_brute_force(tmp_path, device):
    eset, stored, _ = make_set(tmp_path / "s", shards=(120, 80, 60), dim=16, seed=4)
    cfg = MiningConfig(k=12, keep=2, chunk_rows=50)
    semi = mine_semipositives(eset, cfg, progress=False, device=device)
    want_sims, want_w = brute_force(stored, cfg.k, cfg.keep, cfg.temperature)
    rows = np.arange(len(stored))
    np.testing.assert_allclose(cos_of(stored, rows, semi.ids), want_sims, atol=1e-5)
    np.testing.assert_allclose(semi.weights, want_w, atol=1e-5)
    assert semi.weights.dtype == np.float32 and semi.ids.dtype == np.int64
    assert (semi.ids != rows[:, None]).all()
    # Weights are entries of a k-way softmax: descending, summing to less than 1.
    assert (semi.weights[:, 0] >= semi.weights[:, 1]).all()
    assert (semi.weights.sum(1) < 1).all()
    files = sorted(p.name for p in (tmp_path / "s" / "semipos").iterdir())
    assert files == ["semipos.json", "semipos_0.npz", "semipos_1.npz", "semipos_2.npz"]


def test_ivf_with_every_list_probed_equals_exact(tmp_path):
    eset, _, _ = make_set(tmp_path / "s", shards=(200,), dim=16, seed=5)
    exact = mine_semipositives(eset, MiningConfig(k=10), progress=False)
    ivf = mine_semipositives(
        eset, MiningConfig(k=10, factory="IVF4,Flat", nprobe=4), overwrite=True, progress=False
    )
    np.testing.assert_array_equal(ivf.ids, exact.ids)
    np.testing.assert_allclose(ivf.weights, exact.weights, atol=1e-6)


def test_large_sets_default_to_ivf():
    cfg = MiningConfig(exact_limit=1000)
    assert cfg.factory_for(1000) == "Flat"
    assert cfg.factory_for(1_000_000).startswith("IVF") and cfg.factory_for(10**6).endswith(",Flat")


@SEARCHES
def test_duplicates_never_become_semipositives(tmp_path, device):
    """A caption set stores each image once per caption: neighbours are distinct images."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((40, 16))
    repeated = np.repeat(images, 5, axis=0)  # 5 captions per image
    eset = EmbeddingSet.create(tmp_path / "s", dim=16, encoder="t")
    eset.append(repeated[:120])
    eset.append(repeated[120:])
    semi = mine_semipositives(eset, MiningConfig(k=10), progress=False, device=device)
    stored = eset.gather(np.arange(eset.rows))
    image_of = np.arange(200) // 5
    assert (image_of[semi.ids] != image_of[:, None]).all()  # never the row's own image
    assert (image_of[semi.ids[:, 0]] != image_of[semi.ids[:, 1]]).all()  # two distinct images
    # Every caption of an image gets the same semi-positives (ids of first rows).
    assert (semi.ids.reshape(40, 5, 2) == semi.ids[::5, None]).all()
    assert (semi.ids % 5 == 0).all()
    want_sims, want_w = brute_force(stored, 10, 2, 0.07)
    np.testing.assert_allclose(cos_of(stored, np.arange(200), semi.ids), want_sims, atol=1e-5)
    np.testing.assert_allclose(semi.weights, want_w, atol=1e-5)


@SEARCHES
def test_small_sets_pad_with_minus_one(tmp_path, device):
    eset = EmbeddingSet.create(tmp_path / "s", dim=8, encoder="t")
    eset.append(np.random.default_rng(1).standard_normal((2, 8)))
    semi = mine_semipositives(eset, MiningConfig(k=5), progress=False, device=device)
    assert semi.ids.tolist() == [[1, -1], [0, -1]]
    np.testing.assert_allclose(semi.weights[:, 0], 1.0)  # the only neighbour takes all mass
    assert (semi.weights[:, 1] == 0).all()


def test_mining_runs_on_a_gpu_only_when_exact(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert mining_device("Flat") == "cuda"
    assert mining_device("IVF256,Flat") is None  # FAISS's IVF on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mining_device("Flat") is None


def test_torch_mining_refuses_an_approximate_factory(tmp_path):
    eset, _, _ = make_set(tmp_path / "s", shards=(50,), dim=8, seed=2)
    with pytest.raises(QuARIInputError, match="torch mining is exact"):
        mine_semipositives(
            eset, MiningConfig(k=5, factory="IVF4,Flat"), progress=False, device="cpu"
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_mining_equals_faiss(tmp_path):
    on_cpu, _, _ = make_set(tmp_path / "cpu", shards=(300, 200), dim=32, seed=6)
    on_gpu, _, _ = make_set(tmp_path / "gpu", shards=(300, 200), dim=32, seed=6)
    cpu = mine_semipositives(on_cpu, MiningConfig(k=20), progress=False, device=None)
    gpu = mine_semipositives(on_gpu, MiningConfig(k=20), progress=False)  # "auto": CUDA
    np.testing.assert_array_equal(gpu.ids, cpu.ids)
    np.testing.assert_allclose(gpu.weights, cpu.weights, atol=1e-5)


def test_resume_skips_written_shards(tmp_path, monkeypatch):
    eset, _, _ = make_set(tmp_path / "s", shards=(60, 50, 40), dim=16, seed=6)
    cfg = MiningConfig(k=8)
    full = mine_semipositives(eset, cfg, progress=False)
    folder = tmp_path / "s" / "semipos"
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("semipos_[02].npz")}
    (folder / "semipos_1.npz").unlink()  # as if killed while mining shard 1
    assert mining_status(eset, cfg) == "partial"
    with pytest.raises(StoreError, match="interrupted"):
        load_semipositives(eset, cfg)

    import quari.training.mining as mining

    mined = []
    original = mining._mine_shard
    monkeypatch.setattr(
        mining,
        "_mine_shard",
        lambda e, i, d, c, rows, cf: mined.append(rows[0]) or original(e, i, d, c, rows, cf),
    )
    again = mine_semipositives(eset, cfg, progress=False)
    assert mined == [60]  # only shard 1 (rows 60 …) was mined again
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("semipos_[02].npz")} == kept
    np.testing.assert_array_equal(again.ids, full.ids)
    assert mining_status(eset, cfg) == "complete"


def test_stale_mining_is_refused(tmp_path):
    eset, _, _ = make_set(tmp_path / "s", shards=(50,), dim=16, seed=7)
    mine_semipositives(eset, MiningConfig(k=8), progress=False)
    with pytest.raises(StaleMiningError, match="k=8, now k=9"):
        load_semipositives(eset, MiningConfig(k=9))
    meta = {"group": np.zeros(10, dtype=np.int64), "name": [f"new-{i}" for i in range(10)]}
    eset.append(np.random.default_rng(2).standard_normal((10, 16)), meta)
    assert mining_status(eset, MiningConfig(k=8)) == "stale"
    with pytest.raises(StaleMiningError, match="overwrite"):
        mine_semipositives(eset, MiningConfig(k=8), progress=False)
    semi = mine_semipositives(eset, MiningConfig(k=8), overwrite=True, progress=False)
    assert semi.ids.shape == (60, 2)
    assert mining_status(eset, MiningConfig(k=8)) == "complete"


def test_missing_mining_names_the_command(tmp_path):
    eset, _, _ = make_set(tmp_path / "s", shards=(10,), dim=16)
    assert mining_status(eset) == "missing"
    with pytest.raises(StoreError, match="quari mine"):
        load_semipositives(eset)


def test_bad_configs():
    with pytest.raises(ValueError, match="keep"):
        MiningConfig(k=2, keep=3)
    with pytest.raises(ValueError, match="temperature"):
        MiningConfig(temperature=0)


def test_torch_mining_splits_its_score_matrix(tmp_path, monkeypatch):
    """Chunks of targets are scored a few rows at a time when the set is wide (GPU memory)."""
    from quari.training import mining

    eset, stored, _ = make_set(tmp_path / "s", shards=(90,), dim=16, seed=7)
    monkeypatch.setattr(mining._TorchFlatSearch, "MAX_SCORES", 200)  # 2 rows × 90 at a time
    semi = mine_semipositives(eset, MiningConfig(k=8), progress=False, device="cpu")
    want_sims, want_w = brute_force(stored, 8, 2, 0.07)
    np.testing.assert_allclose(cos_of(stored, np.arange(90), semi.ids), want_sims, atol=1e-5)
    np.testing.assert_allclose(semi.weights, want_w, atol=1e-5)
