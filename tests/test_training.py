"""The training loop end to end: learning planted structure, kill/resume, DDP, NaN loss."""

from __future__ import annotations

import csv
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from quari import Adaptation, QuARIModel
from quari.checkpoint import load
from quari.eval.synthetic import PlantedSpec, planted_pairs, write_planted_set
from quari.store import EmbeddingSet
from quari.training import MiningConfig, TrainConfig, TrainingError, TrainSource, train
from quari.training.distributed import gather_cat, gather_cat_with_grad
from quari.training.loss import quari_loss
from quari.training.module import VAL_TOP_K, QuARITrainingModule, validation_metrics

from helpers import small_run, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_training_beats_cosine_on_planted_structure(tmp_path):
    """Acceptance: a small model trained for 300 steps beats the frozen cosine baseline on
    held-out queries by a clear margin (recall@1 + 0.2; measured ≈ +0.35), in under 90 s.

    Settings the test needs (stated in the issue): lr 1e-3 (the paper's 1e-5 would not move
    in 300 steps), the reference variant (T = I + α Û V̂ᵀ starts at the cosine baseline;
    the pure low-rank paper variant learns from scratch and needs a far longer schedule),
    and noise scale 0.1 (full LinCIR noise has norm ≈ √E · s, which swamps a 64-d query).
    """
    # CPU time, not wall time: on a shared 2-core machine other processes can stretch the
    # wall clock several-fold (measured alone: ≈ 20 s wall, one thread, so wall ≈ CPU).
    start = time.process_time()
    spec = PlantedSpec()  # E = 64, nuisance 1.4: cosine recall@1 ≈ 0.4 over 200 images
    write_planted_set(tmp_path / "set", 1500, spec, captions_per_image=2)
    cfg = TrainConfig(
        train=(TrainSource(tmp_path / "set"),),
        out=tmp_path / "run",
        image_key="image_id",
        val_fraction=0.15,
        preset="reference",
        rank=8,
        hidden_dim=128,
        num_layers=1,
        num_heads=4,
        num_steps=2,
        batch_size=64,
        lr=1e-3,
        max_steps=300,
        noise_scale=0.1,
        checkpoint_every=100,
        val_every_steps=100,
        log_every=10,
        mining=MiningConfig(k=20),
        progress=False,
        early_stopping_patience=None,
    )
    result = train(cfg)
    elapsed = time.process_time() - start

    m = result.metrics
    assert result.steps == 300 and result.exported == "best"
    assert m["val/recall@1"] >= m["baseline/recall@1"] + 0.2, m
    assert m["val/mAP"] >= m["baseline/mAP"] + 0.15, m

    # Fresh, never-seen images and captions of the same structure.
    model = load(cfg.out)
    held_out = planted_pairs(spec, 200, seed=99)
    with torch.inference_mode():
        scores = model(torch.from_numpy(held_out.texts)).score(torch.from_numpy(held_out.images))
    cosine = Adaptation.identity(held_out.texts).score(held_out.images)
    truth = torch.from_numpy(held_out.image_of_text)
    adapted_r1 = (scores.argmax(1) == truth).float().mean().item()
    cosine_r1 = (cosine.argmax(1) == truth).float().mean().item()
    assert adapted_r1 >= cosine_r1 + 0.2, (adapted_r1, cosine_r1)

    assert model.metadata["encoder"] == "synthetic:planted"
    assert "pairs" in model.metadata["data"] and model.metadata["steps"] == result.steps
    card = (cfg.out / "README.md").read_text()
    assert "synthetic:planted" in card and "| recall@1 |" in card
    assert elapsed < 90, f"end-to-end took {elapsed:.0f} s of CPU time"


def test_a_run_that_only_got_worse_exports_its_identity_start(tmp_path):
    """A learning rate far too high wrecks every validated checkpoint; with ``export="best"``
    the identity start (exactly the frozen backbone) is exported and says so, and with
    ``export="last"`` the wrecked weights are, as asked."""
    write_planted_set(tmp_path / "set", 120, PlantedSpec(dim=24, cluster_dim=8, subspace_dim=4))
    runs = {}
    for export in ("best", "last"):
        cfg = TrainConfig(
            train=(TrainSource(tmp_path / "set"),), out=tmp_path / export, image_key="image_id",
            val_fraction=0.3, rank=4, hidden_dim=16, num_layers=1, num_heads=2, num_steps=2,
            batch_size=16, max_steps=8, val_every_steps=4, semipos=False, lr=0.3,
            warmup_steps=0, export=export, progress=False, accelerator="cpu",
            blend_weight=0.0,  # the start then is exactly the frozen backbone
        )  # fmt: skip
        runs[export] = train(cfg)
    best, last = runs["best"], runs["last"]
    assert last.exported == "last" and last.metrics["val/mAP"] < last.metrics["baseline/mAP"]
    assert best.exported == "start" and best.steps == 8
    assert best.metrics["val/mAP"] == best.metrics["baseline/mAP"]  # the start is cosine
    model = load(tmp_path / "best")
    assert model.metadata["steps"] == 0 and model.metadata["exported"] == "start (step 0)"
    queries = torch.nn.functional.normalize(torch.randn(5, 24), dim=-1)
    gallery = torch.nn.functional.normalize(torch.randn(30, 24), dim=-1)
    with torch.inference_mode():
        got = model(queries).score(gallery)
    torch.testing.assert_close(got, queries @ gallery.T, atol=1e-6, rtol=0)
    card = (tmp_path / "best" / "README.md").read_text()
    assert "the identity start (the frozen backbone's scores)" in card
    assert "**Level with the frozen backbone" in card


@pytest.mark.parametrize("gallery_size", [40, VAL_TOP_K + 60])
def test_validation_metrics_match_brute_force_ranks(gallery_size):
    """val/… and baseline/… against full argsort ranks of each query's one true image:
    recall@k = share ranked < k, mAP = mean 1 / rank within the top VAL_TOP_K (0 past it)."""
    torch.manual_seed(0)
    model = QuARIModel(tiny_config("reference")).eval()
    gallery = torch.nn.functional.normalize(torch.randn(gallery_size, 24), dim=1)
    target = torch.randint(0, gallery_size, (70,))
    sign = torch.ones(70, 1)
    sign[:10] = -1  # ten queries face away from their image: ranked last by cosine
    queries = torch.nn.functional.normalize(sign * gallery[target] + torch.randn(70, 24), dim=1)
    got = validation_metrics(model, queries, gallery, target, batch_size=32)
    with torch.no_grad():
        adapted = model(queries).score(gallery)
    per_query = {}
    for prefix, scores in (("val", adapted), ("baseline", queries @ gallery.T)):
        order = scores.argsort(dim=1, descending=True)
        rank = (order == target[:, None]).float().argmax(1).numpy()  # 0-based
        for k in (1, 5, 10):
            assert got[f"{prefix}/recall@{k}"] == pytest.approx((rank < k).mean())
        rr = np.where(rank < VAL_TOP_K, 1.0 / (rank + 1), 0.0)
        if prefix == "baseline":
            assert (rank >= VAL_TOP_K).any() == (gallery_size > VAL_TOP_K)
        assert got[f"{prefix}/mAP"] == pytest.approx(rr.mean())
        per_query[prefix] = {"mAP": rr, "recall@1": (rank < 1).astype(float)}
    assert got["val/mAP"] != pytest.approx(got["baseline/mAP"])
    # the gain's standard error: of the per-query differences, over three batches of queries
    for name in ("mAP", "recall@1"):
        diff = per_query["val"][name] - per_query["baseline"][name]
        assert got[f"gain_se/{name}"] == pytest.approx(diff.std(ddof=1) / np.sqrt(70))


class Kill(Callback):
    """Stands in for a crash right after step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("killed")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    ("every", "kill_at"),
    [(4, 10), (5, 12)],
    ids=["checkpoint-mid-epoch", "checkpoint-at-epoch-end"],
)
def test_kill_and_resume_gives_the_same_weights(tmp_path, every, kill_at):
    """Exact equality on CPU: the data order, the noise and token dropout are functions of
    the step, and optimiser, schedule, loop and early-stopping state are restored."""
    whole = small_run(tmp_path, checkpoint_every=every, out=tmp_path / "whole")
    train(whole)

    broken = small_run(tmp_path, checkpoint_every=every, out=tmp_path / "broken")
    with pytest.raises(RuntimeError, match="killed"):
        train(broken, callbacks=[Kill(kill_at)])
    assert not (broken.out / "config.json").exists()  # nothing exported from a dead run
    with pytest.raises(TrainingError, match="already holds a training run"):
        train(broken)
    result = train(broken, resume=True)
    assert result.steps == 14

    final = "checkpoints/step-00000014"
    got, want = weights(broken.out / final), weights(whole.out / final)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    for key, value in weights(whole.out).items():  # the exported (best) weights too
        assert torch.equal(weights(broken.out)[key], value), key


def test_resume_refuses_changed_settings_and_missing_checkpoints(tmp_path):
    cfg = small_run(tmp_path, max_steps=2)
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(cfg, resume=True)
    train(cfg)
    with pytest.raises(TrainingError, match=r"changed settings \['lr', 'max_steps'\]"):
        train(cfg.with_(lr=1e-2, max_steps=4), resume=True)
    # Settings that do not change the computation may differ; a finished run stays finished.
    assert train(cfg.with_(progress=False, log_every=5), resume=True).steps == 2


def test_a_second_run_into_a_busy_folder_stops_at_once_and_writes_nothing(tmp_path):
    from filelock import FileLock

    from quari.errors import LockError
    from quari.training.loop import RUN_LOCK

    cfg = small_run(tmp_path, max_steps=2)
    cfg.out.mkdir(parents=True)
    with FileLock(cfg.out / RUN_LOCK):  # another process's run, as the OS lock sees it
        with pytest.raises(LockError, match="another training run is writing to this folder"):
            train(cfg)
        assert [p.name for p in cfg.out.iterdir()] == [RUN_LOCK]
    assert train(cfg).steps == 2  # free again: the run goes ahead
    # Released however a run ends; a folder made only for the lock is removed again.
    fresh = cfg.with_(out=tmp_path / "fresh")
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(fresh, resume=True)
    assert not fresh.out.exists()


@pytest.mark.parametrize(
    ("env", "launcher"),
    [({}, True), ({"LOCAL_RANK": "1"}, False), ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),
     ({"RANK": "0", "LOCAL_RANK": "0"}, True), ({"RANK": "3", "LOCAL_RANK": "1"}, False)],
)  # fmt: skip
def test_only_the_launching_rank_takes_the_run_lock(monkeypatch, env, launcher):
    from quari.training.loop import _launching_process

    for name in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _launching_process() is launcher


def test_nan_loss_stops_with_step_and_batch_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
    original = QuARITrainingModule.compute_loss

    def poisoned(self, adaptation, images, **kwargs):
        out = original(self, adaptation, images, **kwargs)
        if self.global_step == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(QuARITrainingModule, "compute_loss", poisoned)
    cfg = small_run(tmp_path, checkpoint_every=2)
    named = r"global step 3 \(epoch 0, batch 3; first pairs: set 0 row \d+"
    with pytest.raises(TrainingError, match=named):
        train(cfg)
    good = load(cfg.out / "checkpoints" / "step-00000002")
    assert all(torch.isfinite(p).all() for p in good.parameters())
    assert (cfg.out / "checkpoints" / "last.ckpt").is_file()
    assert not (cfg.out / "config.json").exists()


# -- DDP ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(B: int, E: int):
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(2 * B, E, generator=g), dim=-1)
    images = torch.randn(2 * B, E, generator=g)
    semipos = torch.randn(2 * B, 2, E, generator=g)
    weights = torch.rand(2 * B, 2, generator=g) * 0.3
    groups = torch.arange(2 * B)
    groups[B + 1] = groups[0]  # one image appears on both ranks
    images[B + 1] = images[0]
    return q, images, semipos, weights, groups


def _ddp_worker(rank: int, port: int, out: str, B: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = QuARIModel(tiny_config("reference", token_dropout=0.0))
    ddp = DistributedDataParallel(model)
    q, images, semipos, weights, groups = _batch(B, model.embedding_dim)
    mine = slice(rank * B, (rank + 1) * B)
    result = quari_loss(
        ddp(q[mine], normalize=False),
        gather_cat(images[mine]),
        semipos=semipos[mine],
        semipos_weights=weights[mine],
        groups=gather_cat(groups[mine]),
        offset=rank * B,
        gather=gather_cat_with_grad,
    )
    result.loss.backward()  # DDP averages the gradients over the two ranks
    torch.save(
        {
            "loss": result.loss.detach(),
            "width": result.width,
            "grads": {n: p.grad for n, p in model.named_parameters()},
        },
        f"{out}/rank{rank}.pt",
    )
    # Both ranks reach teardown together: a rank that leaves first can leave the other's gloo
    # shutdown waiting for it forever (seen once in .ci/run: both files written, one rank hung).
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gathers_negatives_and_matches_the_single_process_gradient(tmp_path):
    """Two gloo ranks with B pairs each: every query sees 2B in-batch images (+ 2
    semi-positives), and the DDP-averaged gradient equals the gradient of the loss over the
    global batch of 2B pairs in one process."""
    B = 4
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), str(tmp_path), B), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["width"] for r in ranks] == [2 * B + 2, 2 * B + 2]

    torch.manual_seed(0)
    model = QuARIModel(tiny_config("reference", token_dropout=0.0))
    q, images, semipos, weights, groups = _batch(B, model.embedding_dim)
    whole = quari_loss(
        model(q, normalize=False), images, semipos=semipos, semipos_weights=weights, groups=groups
    )
    whole.loss.backward()
    mean = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    assert abs(mean.item() - whole.loss.item()) < 1e-5
    for name, p in model.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], p.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_lightning_ddp_with_two_cpu_processes(tmp_path):
    """`train` with devices=2 (gloo, spawned): runs, logs 2B + 2 candidates per query."""
    cfg = small_run(
        tmp_path,
        devices=2,
        accelerator="cpu",
        strategy="ddp_spawn",
        max_steps=3,
        checkpoint_every=3,
        epoch_pairs=48,
    )
    result = train(cfg)
    assert result.steps == 3
    (metrics,) = (cfg.out / "logs" / "csv").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    widths = {float(r["train/negatives"]) for r in rows if r.get("train/negatives")}
    assert widths == {2 * cfg.batch_size + 2}
    assert np.isfinite(float(next(r["train/loss"] for r in rows if r.get("train/loss"))))
    assert (cfg.out / "model.safetensors").is_file()


def test_the_export_attaches_the_whitening_blend_only_where_validation_agrees(
    tmp_path, monkeypatch
):
    """The default recipe exports (1 − a)·QuARI + a·whitened cosine with W fitted on the
    training rows, validated again; a W that lowers validation is left off, and the card says
    so. Training itself never sees the blend."""
    import quari.training.loop as loop
    from quari.training.data import TrainingData
    from quari.whitening import fit_whitening

    # Captions whose 4 strongest directions are noise and whose 20 weak ones name the image:
    # cosine is dominated by the noise, whitening weighs the weak directions up.
    rng = np.random.default_rng(0)
    n = 120
    identity = rng.standard_normal((n, 20)) * 0.3
    images = np.hstack([rng.standard_normal((n, 4)) * 3, identity])
    captions = np.hstack([rng.standard_normal((n, 4)) * 3, identity + rng.normal(0, 0.1, (n, 20))])
    eset = EmbeddingSet.create(tmp_path / "set", dim=24, encoder="test-encoder")
    eset.append(images, {"image_id": np.arange(n)}, captions)

    def run(out):
        cfg = TrainConfig(
            train=(TrainSource(tmp_path / "set"),), out=tmp_path / out, image_key="image_id",
            val_fraction=0.3, rank=4, hidden_dim=16, num_layers=1, num_heads=2, batch_size=16,
            max_steps=6, semipos=False, progress=False, accelerator="cpu",
        )  # fmt: skip
        assert cfg.blend_weight == 0.5  # the default recipe's; the paper's has none
        assert cfg.with_(preset="paper", blend_weight=None).blend_weight == 0.0
        return cfg, train(cfg)

    cfg, result = run("kept")
    model = load(tmp_path / "kept")
    info = model.metadata["blend"]
    without = info["metrics_without_blend"]["val/mAP"]
    assert info["attached"] == "yes" and result.metrics["val/mAP"] >= without
    assert model.config.blend_weight == 0.5
    data = TrainingData.from_config(cfg, progress=False)
    torch.testing.assert_close(model.whitening, fit_whitening(data.train_sample(), 0.01))
    queries, gallery, target = data.val_vectors()
    again = validation_metrics(model, queries, gallery, target)
    assert again["val/mAP"] == pytest.approx(result.metrics["val/mAP"], abs=1e-6)

    # A W that sorts items by the sign of one coordinate wrecks the ranking: left off.
    wrecking = torch.zeros(24, 24)
    wrecking[0, 0] = 1.0
    monkeypatch.setattr(loop, "fit_whitening", lambda rows, shrinkage: wrecking)
    cfg, result = run("dropped")
    model = load(tmp_path / "dropped")
    assert model.config.blend_weight == 0 and not hasattr(model, "whitening")
    assert model.metadata["blend"]["attached"].startswith("no: val/mAP")
    card = (tmp_path / "dropped" / "README.md").read_text()
    assert "static blend not attached (no: val/mAP" in card
