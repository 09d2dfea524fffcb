"""`quari.eval.report`: tables, plots of metric vs rank / steps / latency, JSON round trips."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from quari import QuARIModel
from quari.errors import QuARIInputError
from quari.eval.protocols import CustomEvaluator, load_results, save_results
from quari.eval.report import format_value, results_table, write_report

from helpers import make_set, tiny_config


@pytest.fixture
def results(tmp_path):
    eset, _, _ = make_set(tmp_path / "set", shards=(50, 30))
    q = np.random.default_rng(0).standard_normal((6, 24)).astype(np.float32)
    pq.write_table(
        pa.table(
            {
                "query_id": [f"q{i}" for i in range(6)],
                "embedding": pa.array(list(q), pa.list_(pa.float32())),
                "relevant_where": [f"group == {i % 5}" for i in range(6)],
                "group": ["a", "b"] * 3,
            }
        ),
        tmp_path / "q.parquet",
    )
    ev = CustomEvaluator(tmp_path / "q.parquet", eset, k=20)
    out = [ev.evaluate(None)]
    for rank, steps in ((2, 2), (4, 2), (8, 2), (4, 3)):
        torch.manual_seed(rank)
        model = QuARIModel(tiny_config("paper", rank=rank, num_steps=steps)).eval()
        out.append(ev.evaluate(model, mode="scan", name=f"r{rank}-L{steps}"))
    return out


def test_report_tables_and_plots(results, tmp_path):
    path = write_report(results, tmp_path / "report")
    md = path.read_text()
    header, rows = results_table(results)
    assert header[:3] == ["method", "mode", "ap@20"] and len(rows) == 5
    assert "| " + " | ".join(rows[1]) + " |" in md
    assert f"| cosine | plain | {100 * results[0].metrics['ap@20']:.1f} |" in md
    assert "**ap@20 by group**" in md
    names = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert names == ["custom-custom-latency.png", "custom-custom-methods.png",
                     "custom-custom-rank.png", "custom-custom-steps.png"]  # fmt: skip
    for name in names:
        assert f"]({name})" in md
        with Image.open(tmp_path / "report" / name) as image:
            assert image.size[0] >= 400 and image.size[1] >= 300


def test_results_round_trip_and_no_plots(results, tmp_path):
    save_results(results, tmp_path / "all.json")
    again = load_results(tmp_path / "all.json")
    assert again == results
    results[0].save(tmp_path / "one.json")
    assert load_results(tmp_path / "one.json") == results[:1]
    write_report(again, tmp_path / "tables", plots=False)
    assert not list((tmp_path / "tables").glob("*.png"))
    with pytest.raises(QuARIInputError, match="no results"):
        write_report([], tmp_path / "x")


def test_format_value():
    assert format_value("ap@50", 0.356) == "35.6"
    assert format_value("mrr", 0.5714) == "0.571"
    assert format_value("ndcg@50", 1.0) == "100.0"
