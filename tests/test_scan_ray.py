"""The exact scan on Ray: a local 2-CPU cluster returns exactly what one process returns (ids
and scores, ties included), through the engine, the Retriever and the command line."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from typer.testing import CliRunner

from quari import Adaptation, QuARIModel
from quari.retriever import Retriever
from quari.scan_ray import Part, RayScan, RayScanConfig, plan_parts
from quari.store import EmbeddingSet

from helpers import tiny_config

ray = pytest.importorskip("ray")

SHARDS = (1500, 700, 2300, 100, 1200)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tied_set(tmp_path_factory):
    """Five shards; rows 0–39 come back as exact copies in every shard, so top-k lists hold
    runs of equal scores that cross shard (and task) boundaries."""
    rng = np.random.default_rng(0)
    eset = EmbeddingSet.create(tmp_path_factory.mktemp("ray") / "set", dim=24, encoder="t")
    base = rng.standard_normal((40, 24))
    for n in SHARDS:
        rows = rng.standard_normal((n, 24))
        rows[rng.choice(n, 40, replace=False)] = base
        eset.append(rows, {"group": rng.integers(0, 4, n), "name": [f"r{i}" for i in range(n)]})
    return eset, base.astype(np.float32)


def test_parts_cut_only_at_chunk_starts():
    offsets = np.array([0, 100, 250])
    parts = plan_parts(offsets, 300, 2, chunk_rows=64)
    assert parts == [Part(0, 164), Part(164, 300)]  # 164 = 100 + 64: a chunk start in shard 1
    assert plan_parts(offsets, 300, 10, chunk_rows=64) == [
        Part(a, b) for a, b in [(0, 64), (64, 100), (100, 164), (164, 228), (228, 250), (250, 300)]
    ]
    assert plan_parts(np.array([0]), 10, 4) == [Part(0, 10)]


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_ray_scan_equals_the_single_process_scan_exactly(cluster, tied_set, variant):
    tied_set, base = tied_set
    ad = Adaptation.random(3, 24, 4, variant, seed=1)
    q = torch.from_numpy(
        np.concatenate([base[[5, 17]], tied_set.gather([3000])]).astype(np.float32)
    )
    ad = Adaptation(q, ad.U, ad.V, variant, ad.anchor_scale)  # two queries are copied rows
    with torch.inference_mode():
        local = ad.scan(tied_set.iter_chunks(), 200)
    engine = RayScan(RayScanConfig(workers=2))
    assert len(plan_parts(np.array([s.offset for s in tied_set.shards]), tied_set.rows, 2)) == 2
    top = engine.scan(tied_set, ad, 200)
    np.testing.assert_array_equal(top.ids.numpy(), local.ids.numpy())
    np.testing.assert_array_equal(top.scores.numpy(), local.scores.numpy())
    scores, ids = local.scores.numpy(), local.ids.numpy()
    tied = scores[:, 1:] == scores[:, :-1]
    assert tied.sum() >= 10  # the copies tie …
    assert (ids[:, 1:][tied] > ids[:, :-1][tied]).all()  # … and are listed by row id
    rows = tied_set.select(pc.field("group") == 1)
    with torch.inference_mode():
        local = ad.scan(tied_set.iter_gathered(rows), 50)
    top = RayScan(RayScanConfig(workers=3)).scan(tied_set, ad, 50, rows=rows)
    np.testing.assert_array_equal(top.ids.numpy(), rows[local.ids.numpy()])
    np.testing.assert_array_equal(top.scores.numpy(), local.scores.numpy())


def test_the_retriever_and_the_command_line_scan_on_ray(cluster, tied_set, tmp_path):
    from quari.checkpoint import save
    from quari.cli import app

    tied_set, _ = tied_set
    torch.manual_seed(0)
    model = QuARIModel(tiny_config("reference")).eval()
    q = np.random.default_rng(3).standard_normal((2, 24)).astype(np.float32)
    kw = dict(k=20, mode="scan", where="group != 2")
    local = Retriever(tied_set, model).search(q, **kw)
    on_ray = Retriever(tied_set, model, scan_engine="ray", exact_below=0).search(q, **kw)
    np.testing.assert_array_equal(on_ray.ids, local.ids)
    np.testing.assert_array_equal(on_ray.scores, local.scores)
    save(model, tmp_path / "model")
    np.save(tmp_path / "q.npy", q)
    args = ["search", str(tied_set.root), "--model", str(tmp_path / "model"), "--mode", "scan",
            "--query-embeddings", str(tmp_path / "q.npy"), "-k", "20", "--json"]  # fmt: skip
    runner = CliRunner()
    out = runner.invoke(app, [*args, "--engine", "ray", "--ray-workers", "2"])
    assert out.exit_code == 0, out.output
    plain = Retriever(tied_set, model).search(q, k=20, mode="scan")
    assert [[r["row"] for r in rows] for rows in json.loads(out.output)["results"]] == (
        plain.ids.tolist()
    )
    assert ray.is_initialized()  # the CLI joined the running Ray and left it running
    bad = runner.invoke(app, [*args, "--engine", "spark"])
    assert bad.exit_code == 2 and "--engine must be local or ray" in bad.output


def test_a_blended_model_scans_on_ray_as_in_one_process_and_keeps_its_norms(cluster, tied_set):
    """The static blend's ‖W d‖: the first whole-set scan's tasks compute them (returned and
    kept by the engine, equal to the single-process cache), later scans — whole or filtered —
    ship each task its slice; every result equals the local Retriever's, ids and scores."""
    tied_set, _ = tied_set
    torch.manual_seed(2)
    model = QuARIModel(tiny_config("reference", blend_weight=0.4)).eval()
    model.whitening.copy_(torch.randn(24, 24) + 3 * torch.eye(24))
    q = np.random.default_rng(5).standard_normal((3, 24)).astype(np.float32)
    local = Retriever(tied_set, model)
    engine = RayScan(RayScanConfig(workers=2))
    on_ray = Retriever(tied_set, model, scan_engine=engine, exact_below=0)
    for kw in ({}, {"where": "group == 1"}, {}):
        want = local.search(q, k=30, mode="scan", with_metadata=False, **kw)
        got = on_ray.search(q, k=30, mode="scan", with_metadata=False, **kw)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.scores, want.scores)
        assert engine._norms is not None  # kept from the first (whole-set) scan on
        np.testing.assert_array_equal(engine._norms[1], local._blend_norms[1].numpy())
    # norms the caller attaches (StaticBlend.row_norms) are the ones read, slice by slice
    ad, norms = local.adapt(q, mode="scan"), local._blend_norms[1]
    fresh = RayScan(RayScanConfig(workers=2))
    want = local.search(q, k=30, mode="scan", with_metadata=False)
    top = fresh.scan(tied_set, ad.with_blend(ad.blend.with_row_norms(norms)), 30)
    np.testing.assert_array_equal(top.ids.numpy(), want.ids)
    np.testing.assert_array_equal(top.scores.numpy(), want.scores)
    assert fresh._norms is None  # given, not computed
    doubled = fresh.scan(tied_set, ad.with_blend(ad.blend.with_row_norms(2 * norms)), 30)
    assert not np.allclose(doubled.scores.numpy(), want.scores)
    # another W is another key: the kept norms are not read for it
    model.whitening.mul_(torch.linspace(0.5, 2, 24))
    kept = engine._norms
    want = local.search(q, k=30, mode="scan", with_metadata=False)
    got = on_ray.search(q, k=30, mode="scan", with_metadata=False)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.scores, want.scores)
    assert engine._norms[0] != kept[0]
