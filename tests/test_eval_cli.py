"""`quari eval` end to end: a tiny QuARI model, a linear adapter and baselines against cosine
on INQUIRE-, INQUIRE-Rerank- and ILIAS-format fixtures, JSON written, and `quari eval report`
rendering markdown and PNG plots."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from quari import QuARIModel
from quari.adapters import LinearAdapter
from quari.checkpoint import save
from quari.eval.protocols import IliasEvaluator, InquireFullrank, load_results

from eval_fixtures import write_ilias, write_inquire, write_rerank
from helpers import blended_model, tiny_config

runner = CliRunner()
ENV = {"COLUMNS": "200"}


@pytest.fixture
def app():
    from quari.cli import app

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield app
    torch.set_num_threads(before)


@pytest.fixture
def models(tmp_path):
    torch.manual_seed(0)
    save(QuARIModel(tiny_config("paper")).eval(), tmp_path / "tiny")
    LinearAdapter(24, 12, {"encoder": "unknown"}).save(tmp_path / "linear")
    return tmp_path / "tiny", tmp_path / "linear"


def test_eval_inquire_and_ilias_then_report(app, tmp_path, models):
    tiny, linear = models
    fx = write_inquire(tmp_path / "INQUIRE")
    cache = ["--cache", str(tmp_path / "cache"), "--quiet"]
    out = runner.invoke(
        app,
        ["eval", "inquire-fullrank", str(fx.root), "--embeddings", fx.key,
         "--query-embeddings", str(fx.query_embeddings), "--model", "cosine", "--model",
         str(tiny), "--model", str(linear), "--mode", "all", "-k", "5",
         "--out", str(tmp_path / "inquire.json"), *cache],
        env=ENV,
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "inquire-fullrank (test)" in out.output and "wrote 7 result(s)" in out.output
    results = load_results(tmp_path / "inquire.json")
    assert [(r.method["name"], r.mode) for r in results] == [
        ("cosine", "plain"), ("tiny", "rerank"), ("tiny", "adaptive"), ("tiny", "scan"),
        ("linear", "rerank"), ("linear", "adaptive"), ("linear", "scan"),
    ]  # fmt: skip
    assert results[1].method["kind"] == "quari" and results[1].method["rank"] == 4
    assert results[4].method["kind"] == "linear" and results[4].method["out_dim"] == 12
    api = InquireFullrank.from_root(
        fx.root, fx.key, query_embeddings=fx.query_embeddings, k=5
    ).evaluate(None)
    assert results[0].per_query == api.per_query  # the CLI runs the library's evaluation

    il = write_ilias(tmp_path / "ilias")
    out = runner.invoke(
        app,
        ["eval", "ilias", str(il.root), "--mini", "--model", "cosine", "--model", str(tiny),
         "--mode", "scan", "--out", str(tmp_path / "ilias.json"), *cache],
        env=ENV,
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    ilias = load_results(tmp_path / "ilias.json")
    assert [(r.protocol, r.method["name"], r.mode) for r in ilias] == [
        ("mini-ilias-i2i", "cosine", "plain"), ("mini-ilias-i2i", "cosine", "scan"),
        ("mini-ilias-i2i", "tiny", "scan"), ("mini-ilias-t2i", "cosine", "plain"),
        ("mini-ilias-t2i", "cosine", "scan"), ("mini-ilias-t2i", "tiny", "scan"),
    ]  # fmt: skip
    api = IliasEvaluator(il.root, track="t2i", mini=True, cache=tmp_path / "cache")
    assert ilias[3].per_query == api.evaluate(None).per_query

    out = runner.invoke(
        app,
        ["eval", "report", str(tmp_path / "inquire.json"), str(tmp_path / "ilias.json"),
         "--out", str(tmp_path / "report")],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## inquire-fullrank (test)" in md and "## mini-ilias-t2i (mini)" in md
    assert "| tiny | adaptive |" in md and "**ap@5 by supercategory**" in md
    assert "**ap@1000 by category**" in md
    png = tmp_path / "report" / "inquire-fullrank-test-methods.png"
    assert f"]({png.name})" in md
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size == (830, 360)  # 7 bars: (0.9 · 7 + 2) in × 3.6 in at 100 dpi
    with Image.open(tmp_path / "report" / "mini-ilias-i2i-mini-latency.png") as image:
        assert image.size == (700, 400)
    assert "**Against cosine · plain**" in md  # each model against the frozen backbone
    out = runner.invoke(
        app,
        ["eval", "report", str(tmp_path / "inquire.json"), "--out", str(tmp_path / "r2"),
         "--no-plots", "--baseline", "nope"],
    )  # fmt: skip
    assert out.exit_code != 0 and "baseline 'nope' is none of the methods" in out.output


def test_eval_rerank_with_tuned_aqe_and_errors(app, tmp_path, models):
    tiny, _ = models
    fx = write_rerank(tmp_path / "rerank")
    out = runner.invoke(
        app,
        ["eval", "inquire-rerank", str(fx.release), "--image-embeddings",
         str(fx.image_embeddings), "--query-embeddings", str(fx.query_embeddings),
         "--model", "initial", "--model", "cosine", "--model", "aqe", "--model", str(tiny), "--out",
         str(tmp_path / "r.json"), "--cache", str(tmp_path / "cache"), "--quiet"],
        env=ENV,
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    results = load_results(tmp_path / "r.json")
    assert [(r.method["kind"], r.mode) for r in results] == [
        ("initial", "fixed"), ("cosine", "plain"), ("aqe", "rerank"), ("quari", "rerank")
    ]  # fmt: skip
    assert {t["split"] for t in results[2].method["tuning"]} == {"validation"}
    assert results[1].k == 100 and results[1].primary_metric == "ap@100"
    out = runner.invoke(app, ["eval", "inquire-rerank", str(fx.release), "--quiet",
                              "--cache", str(tmp_path / "cache")])  # fmt: skip
    assert out.exit_code == 2 and "--image-embeddings" in out.output
    (tmp_path / "junk.json").write_text(json.dumps({"hello": 1}))
    out = runner.invoke(app, ["eval", "report", str(tmp_path / "junk.json"), "--out",
                              str(tmp_path / "rep")])  # fmt: skip
    assert out.exit_code == 2 and "not a quari evaluation result" in out.output
    out = runner.invoke(app, ["eval", "ilias", str(tmp_path), "--model", "aqe", "--quiet"], env=ENV)
    assert out.exit_code == 2 and "give it (e.g. aqe:n=2)" in out.output  # ILIAS has no val split


def test_eval_compares_blend_weights_side_by_side(app, tmp_path, models):
    """--blend-weight (repeatable) scores a blended QuARI model at each weight, one row each,
    equal to the Python API at that weight; other methods run once; a model without a blend
    is refused a weight above 0 by name before anything runs."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from quari.eval.protocols import CustomEvaluator
    from quari.store import EmbeddingSet

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((60, 24)).astype(np.float32)
    eset = EmbeddingSet.create(tmp_path / "set", dim=24, encoder="test-encoder")
    eset.append(rows, {"label": [str(i % 5) for i in range(60)]})
    queries = pa.table({
        "query_id": [f"q{i}" for i in range(12)],
        "embedding": [(rows[i] + 0.3 * rng.standard_normal(24)).tolist() for i in range(12)],
        "relevant_where": [f'label == "{i % 5}"' for i in range(12)],
    })  # fmt: skip
    pq.write_table(queries, tmp_path / "q.parquet")
    model = blended_model()
    save(model, tmp_path / "blended")
    out = tmp_path / "res.json"
    args = ["eval", "custom", str(tmp_path / "set"), "--queries", str(tmp_path / "q.parquet"),
            "--model", str(tmp_path / "blended"), "--model", "cosine", "--mode", "scan",
            "-k", "10", "--quiet", "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, [*args, "--blend-weight", "0", "--blend-weight", "0.9"], env=ENV)
    assert result.exit_code == 0, result.output
    got = {r.method["name"]: r for r in load_results(out)}
    assert set(got) == {"blended (a=0)", "blended (a=0.9)", "cosine"}
    ev = CustomEvaluator(tmp_path / "q.parquet", EmbeddingSet.open(tmp_path / "set"), k=10)
    for a in (0.0, 0.9):
        row = got[f"blended (a={a:g})"]
        assert row.method["blend_weight"] == a
        api = ev.evaluate(model.set_blend_weight(a), mode="scan")
        assert row.per_query["ap@10"] == pytest.approx(api.per_query["ap@10"], abs=1e-6)
    assert got["blended (a=0)"].primary != got["blended (a=0.9)"].primary  # the weight counts
    result = runner.invoke(app, [*args[:-2], "--blend-weight", "0.9"], env=ENV)
    assert result.exit_code == 0 and "blended (a=0.9)" in result.output  # no --out: printed
    tiny = models[0]
    bad = runner.invoke(app, ["eval", "custom", str(tmp_path / "set"), "--queries",
                              str(tmp_path / "q.parquet"), "--model", str(tiny),
                              "--blend-weight", "0.5", "--quiet"], env=ENV)  # fmt: skip
    assert bad.exit_code != 0 and "trained without the static blend" in bad.output
