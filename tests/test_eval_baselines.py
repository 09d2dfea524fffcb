"""αQE and αDBA against brute-force numpy, and method specs (parsing, modes, tuning on the
validation split only)."""

from __future__ import annotations

import numpy as np
import pytest

from quari.errors import QuARIInputError
from quari.eval.baselines import AlphaQE, dba_transform, expansion_weights
from quari.eval.methods import AQE_GRID, Method, parse_spec, resolve_method
from quari.eval.protocols import InquireFullrank
from quari.retriever import Retriever
from quari.store import EmbeddingSet

from eval_fixtures import write_inquire
from helpers import make_set


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_expansion_weights_keep_the_sign():
    assert expansion_weights(np.array([0.5, -0.5]), 3).tolist() == [0.125, -0.125]
    assert expansion_weights(np.array([0.25, -0.25]), 0.5).tolist() == [0.5, -0.5]
    assert expansion_weights(np.array([0.3, -0.2]), 0).tolist() == [1.0, 1.0]


def test_alpha_qe_matches_brute_force_and_searches_with_the_expanded_query(tmp_path):
    eset, stored, _ = make_set(tmp_path / "set", shards=(120, 80))
    rows = unit(stored.astype(np.float64))
    q = np.random.default_rng(4).standard_normal((3, 24))
    aqe = AlphaQE(eset, n=3, alpha=3.0)
    sims = unit(q) @ rows.T
    want = []
    for b in range(3):
        top = np.argsort(-sims[b])[:3]
        want.append(unit(unit(q[b]) + (sims[b, top] ** 3) @ rows[top]))
    expanded = aqe.expand(q.astype(np.float32)).numpy()
    assert np.abs(expanded - np.asarray(want)).max() < 1e-5
    res = Retriever(eset, aqe).search(q.astype(np.float32), 5, mode="scan", with_metadata=False)
    assert res.ids.tolist() == np.argsort(-(np.asarray(want) @ rows.T), axis=1)[:, :5].tolist()
    none = AlphaQE(eset, n=0).expand(q.astype(np.float32)).numpy()
    assert np.abs(none - unit(q)).max() < 1e-6
    assert aqe.metadata == {"adapter": "aqe", "n": 3, "alpha": 3.0, "encoder": "test-encoder"}
    with pytest.raises(QuARIInputError, match="non-negative integer"):
        AlphaQE(eset, n=-1)


def test_dba_matches_brute_force_and_keeps_rows_and_metadata(tmp_path):
    eset, stored, meta = make_set(tmp_path / "set", shards=(60, 40))
    rows = unit(stored.astype(np.float64))
    new = dba_transform(eset, tmp_path / "set-dba-k2-a3", k=2, alpha=3.0, batch_rows=32,
                        progress=False)  # fmt: skip
    sims = rows @ rows.T
    want = np.empty_like(rows)
    for i in range(rows.shape[0]):
        order = [j for j in np.argsort(-sims[i], kind="stable") if j != i][:2]
        want[i] = unit(rows[i] + (sims[i, order] ** 3) @ rows[order])
    got = new.gather(np.arange(new.rows)).astype(np.float64)
    assert np.abs(got - want).max() < 2e-3  # fp16 storage
    assert [s.rows for s in new.shards] == [s.rows for s in eset.shards]
    assert new.metadata(np.arange(new.rows)).equals(meta)
    assert new.encoder == eset.encoder and new.encoder_info["dba"]["k"] == 2
    assert EmbeddingSet.open(tmp_path / "set-dba-k2-a3").rows == eset.rows


def test_parse_spec():
    assert parse_spec("cosine") == ("cosine", {})
    assert parse_spec("aqe") == ("aqe", {})
    assert parse_spec("aqe:n=5,alpha=1") == ("aqe", {"n": 5, "alpha": 1.0})
    assert parse_spec("dba:k=3") == ("dba", {"k": 3})
    assert parse_spec("runs/model")[0] == "model" and parse_spec("hf:a/b")[0] == "model"
    with pytest.raises(QuARIInputError, match="expected aqe"):
        parse_spec("aqe:k=2")
    with pytest.raises(QuARIInputError, match="must be a number"):
        parse_spec("dba:k=two")


def test_modes_per_method():
    cosine, model = Method("cosine", "cosine", "cosine", None), Method("m", "m", "quari", object())
    assert cosine.modes(["all"]) == ["plain"]
    assert model.modes(["all"]) == ["rerank", "adaptive", "scan"]
    assert model.modes(["all"], fixed_candidates=True) == ["rerank"]
    assert model.modes(["plain", "scan"]) == ["scan"]
    assert cosine.modes(["rerank", "scan"]) == ["plain", "scan"]
    with pytest.raises(QuARIInputError, match="unknown mode 'fast'"):
        cosine.modes(["fast"])


def test_baselines_are_tuned_on_the_validation_split(tmp_path):
    fx = write_inquire(tmp_path / "INQUIRE")

    def ev(split):
        return InquireFullrank.from_root(
            fx.root, fx.key, split=split, query_embeddings=fx.query_embeddings, k=5
        )

    test, val = ev("test"), ev("val")
    method = resolve_method("aqe", test, validation=val, tune_mode="scan")
    assert [t["n"] for t in method.tuning] == list(AQE_GRID)
    assert all(t["split"] == "val" for t in method.tuning)
    best = max(method.tuning, key=lambda t: t["ap@5"])["n"]
    assert method.params == {"n": best, "alpha": 3.0} and method.adapter.n == best
    for t in method.tuning:  # each tuning value is what evaluating that n on val gives
        adapter = AlphaQE(val.gallery, n=t["n"])
        assert val.evaluate(adapter, mode="scan").primary == pytest.approx(t["ap@5"])
    assert method.describe()["tuning"] == method.tuning
    with pytest.raises(QuARIInputError, match="dba:k=2"):
        resolve_method("dba", test)  # nothing to tune on
    dba = resolve_method("dba:k=2", test, cache=tmp_path / "cache")
    assert dba.gallery is not None and dba.gallery.rows == test.gallery.rows
    assert dba.gallery.root.parent == tmp_path / "cache" and "dba-k2-a3" in dba.gallery.root.name
    again = resolve_method("dba:k=2", test, cache=tmp_path / "cache")
    assert again.gallery.root == dba.gallery.root  # written once
    result = test.evaluate(None, gallery=dba.gallery, method=dba.describe())
    assert result.method["kind"] == "dba" and result.method["k"] == 2
