"""`quari.eval.report`: tables, plots of metric vs rank / steps / latency, JSON round trips,
the paired comparison with a baseline."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from quari import QuARIModel
from quari.errors import QuARIInputError
from quari.eval.protocols import CustomEvaluator, load_results, save_results
from quari.eval.report import compare, comparison_table, format_value, results_table, write_report

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
    # every model against the frozen backbone (the plain result), one row each
    assert "**Against cosine · plain**" in md
    header, rows = comparison_table(results, results[0])
    assert [r[0] for r in rows] == ["r2-L2", "r4-L2", "r8-L2", "r4-L3"]
    for row in rows:
        assert "| " + " | ".join(row) + " |" in md


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


def _with_scores(template, name, ids, values, metric="ap@20"):
    """``template`` as the method ``name`` whose per-query ``metric`` is ``values``."""
    values = [float(v) for v in values]
    return replace(
        template,
        method={"name": name},
        mode="scan",
        metrics={metric: float(np.mean(values))},
        per_query={"query_id": list(ids), metric: values},
    )


def test_compare_against_oracles(results):
    template = results[0]
    ids = [f"q{i}" for i in range(400)]
    rng = np.random.default_rng(1)
    # Hard and easy queries: the baseline's AP varies far more between queries than the
    # method's gain does, which is what the pairing removes.
    base_ap = rng.uniform(0.0, 0.9, 400)
    base = _with_scores(template, "base", ids, base_ap)

    shifted = compare(_with_scores(template, "up", ids, base_ap + 0.05), base)
    assert shifted.delta == pytest.approx(0.05) and shifted.queries == 400
    assert shifted.low == pytest.approx(0.05) and shifted.high == pytest.approx(0.05)
    assert shifted.significant and shifted.relative == pytest.approx(0.05 / base_ap.mean())

    same = compare(_with_scores(template, "same", ids, base_ap), base)
    assert (same.delta, same.low, same.high, same.significant) == (0.0, 0.0, 0.0, False)

    # Normal per-query differences: the interval is the textbook mean ± 1.96 σ/√n.
    diff = rng.normal(0.02, 0.1, 400)
    c = compare(_with_scores(template, "noisy", ids, base_ap + diff), base)
    half = 1.96 * diff.std(ddof=1) / np.sqrt(400)
    assert c.delta == pytest.approx(diff.mean())
    assert c.low == pytest.approx(diff.mean() - half, abs=0.15 * half)
    assert c.high == pytest.approx(diff.mean() + half, abs=0.15 * half)
    assert c.significant  # 0.02 against a half-width of ≈ 0.01
    # The same gain read unpaired would be lost in the queries' own spread.
    unpaired_half = 1.96 * np.sqrt(2 * base_ap.var(ddof=1) / 400)
    assert unpaired_half > abs(diff.mean())

    # Matched by query id, not by position; only shared queries count.
    order = rng.permutation(400)
    shuffled = _with_scores(template, "noisy", [ids[i] for i in order], (base_ap + diff)[order])
    assert compare(shuffled, base) == c
    part = _with_scores(template, "part", [*ids[:100], "new"], [*(base_ap[:100] + 0.1), 1.0])
    assert compare(part, base).queries == 100
    assert compare(part, base).delta == pytest.approx(0.1)

    # Worse is reported as worse.
    rows = comparison_table([base, _with_scores(template, "down", ids, base_ap - 0.05)], base)[1]
    assert rows == [["down", "scan", "−5.0", f"−{5 / base_ap.mean():.1f} %", "[−5.0, −5.0]",
                     "worse"]]  # fmt: skip


def test_compare_errors(results, tmp_path):
    template = results[0]
    a = _with_scores(template, "a", ["q1", "q2"], [0.1, 0.2])
    with pytest.raises(QuARIInputError, match="share no query id"):
        compare(a, _with_scores(template, "b", ["q3"], [0.5]))
    with pytest.raises(QuARIInputError, match="no per-query 'ndcg@20'"):
        compare(a, a, metric="ndcg@20")
    with pytest.raises(QuARIInputError, match="baseline 'nope' is none of the methods"):
        write_report(results, tmp_path / "r", baseline="nope", plots=False)
    md = write_report(results, tmp_path / "r", baseline="r4-L2", plots=False).read_text()
    assert "**Against r4-L2 · scan**" in md and "| cosine | plain |" in md
    # A result over other queries does not stop the report: its comparison row says why.
    other = _with_scores(template, "other", ["x1", "x2"], [0.3, 0.4], metric="ap@20")
    md = write_report([*results, other], tmp_path / "r", plots=False).read_text()
    assert "| other | scan | – | – | – | no shared queries |" in md
