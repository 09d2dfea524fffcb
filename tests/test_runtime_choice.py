"""The measured choice of a CPU runtime (quari.runtime_choice): ``auto``, ``fp32``, the kept
choice, the timing rounds."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

import quari.runtime as rt
import quari.runtime_choice as rc
from quari.checkpoint import load_reference
from quari.runtime import Runtime, cache_dir
from quari.runtime_choice import choose_runtime
from quari.runtime_guard import probe_set

from helpers import ShuffledRuntime


@pytest.fixture(scope="module")
def fixture_model():
    from helpers import FIXTURE

    return load_reference(FIXTURE)


def test_auto_keeps_eager_unless_a_candidate_passes_and_is_faster(fixture_model, monkeypatch):
    probe = probe_set(48, queries=16, gallery=300)
    monkeypatch.setitem(rt._BUILDERS, "shuffled", ShuffledRuntime)
    speed = {"eager": 10.0, "shuffled": 1.0, "bf16": 4.0, "int8": 9.5}
    monkeypatch.setattr(rc, "_time_runtimes", lambda rts, q, repeats: {n: speed[n] for n in rts})
    # The wrong runtime is fastest but fails the guard; int8 passes but gains < 1.1×.
    chosen = choose_runtime(fixture_model, candidates=("shuffled", "int8", "bf16"), probe=probe)
    assert chosen.name == "bf16"
    report = chosen.report
    assert not report["candidates"]["shuffled"]["guard"]["passed"]
    assert "ms" not in report["candidates"]["shuffled"]
    assert report["candidates"]["bf16"]["speedup"] == pytest.approx(2.5)
    speed["bf16"] = 9.8
    model = copy.deepcopy(fixture_model)
    model.set_runtime("auto", candidates=("int8", "bf16"), probe=probe)
    assert model.runtime == "eager" and model.runtime_report["chosen"] == "eager"


def test_auto_picks_per_batch_size_when_the_winners_differ(fixture_model, monkeypatch):
    probe = probe_set(48, queries=16, gallery=300)
    # bf16 loses at batch 1 and wins at 32 (as in one bench_core run on our test CPU).
    speed = {("eager", 1): 10.0, ("bf16", 1): 13.0, ("eager", 32): 8.0, ("bf16", 32): 2.0}
    monkeypatch.setattr(
        rc, "_time_runtimes", lambda rts, q, repeats: {n: speed[n, len(q)] for n in rts}
    )
    model = copy.deepcopy(fixture_model)
    model.set_runtime("auto", candidates=("bf16",), probe=probe)
    assert model.runtime == "eager+bf16"
    assert model.runtime_report["by_batch"] == {1: "eager", 32: "bf16"}
    dispatch = model._runtime
    assert [dispatch.pick(b).name for b in (1, 31, 32, 500)] == ["eager", "eager", "bf16", "bf16"]
    assert not dispatch.exact and dispatch.describe()["by_batch"] == {1: "eager", 32: "bf16"}
    used = []
    for r in dispatch.by_batch.values():
        monkeypatch.setattr(r, "run", lambda q, c=r.run, n=r.name: used.append(n) or c(q))
    q = torch.from_numpy(probe[0]).repeat(3, 1)[:40]
    with torch.inference_mode():
        one, many = model(q[:1]).score(probe[1]), model(q).score(probe[1])
        exact = fixture_model.to_adaptation(*fixture_model.predict_factors(q)).score(probe[1])
    assert used[0] == "eager" and set(used[1:]) == {"bf16"}
    torch.testing.assert_close(one, exact[:1], atol=1e-6, rtol=0)  # eager: fp32
    assert (many - exact).abs().max() > 1e-6  # bf16 really served the batch of 40


class _FastExact(Runtime):
    """An exact runtime under another name (the eager pass), for ``fp32``'s choice."""

    name = "fastexact"


def test_fp32_chooses_among_exact_runtimes_only(fixture_model, monkeypatch):
    probe = probe_set(48, queries=16, gallery=300)
    monkeypatch.setitem(rt._BUILDERS, "fastexact", _FastExact)
    built = []
    for name in ("bf16", "int8"):  # reduced precision is never even built
        monkeypatch.setitem(rt._BUILDERS, name, type(name, (Runtime,), {
            "exact": False, "__init__": lambda self, model: built.append(model)}))  # fmt: skip
    speed = {"eager": 10.0, "fastexact": 5.0}
    monkeypatch.setattr(rc, "_time_runtimes", lambda rts, q, repeats: {n: speed[n] for n in rts})
    model = copy.deepcopy(fixture_model)
    model.set_runtime("fp32", candidates=("bf16", "fastexact", "int8"), probe=probe)
    assert model.runtime == "fastexact" and built == []
    report = model.runtime_report
    assert report["exact"] and report["chosen"] == "fastexact"
    assert "reduced precision" in report["candidates"]["bf16"]["error"]
    assert report["candidates"]["fastexact"]["speedup"] == pytest.approx(2.0)
    # No exact candidate besides eager: eager at once, nothing timed.
    monkeypatch.setattr(rc, "_time_runtimes", lambda *a: pytest.fail("timed for nothing"))
    model.set_runtime("fp32", candidates=("int8",), probe=probe)
    assert model.runtime == "eager" and model.runtime_report["chosen"] == "eager"


def test_fp32_tries_onnx_where_installed(fixture_model, monkeypatch, tmp_path):
    monkeypatch.setenv("QUARI_CACHE_DIR", str(tmp_path))
    seen = []

    class Broken(Runtime):
        name = "onnx"

        def __init__(self, model):
            seen.append(model)
            raise RuntimeError("export failed")

    monkeypatch.setattr(rc, "has_native_bf16", lambda: True)  # bf16: an auto candidate
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed: eager alone
    assert rc.choose_runtime(fixture_model, exact=True).report["candidates"] == {}
    monkeypatch.setitem(sys.modules, "onnxruntime", sys)  # installed (any module will do)
    monkeypatch.setitem(rt._BUILDERS, "onnx", Broken)
    probe = probe_set(48, queries=8, gallery=100)
    report = rc.choose_runtime(fixture_model, exact=True, probe=probe).report
    assert seen == [fixture_model] and list(report["candidates"]) == ["onnx"]
    assert report["candidates"]["onnx"]["error"] == "RuntimeError: export failed"
    assert report["chosen"] == "eager"
    # Without a probe the choice would be kept — not one made while a candidate failed.
    monkeypatch.setattr(rc, "probe_set", lambda dim: probe)
    rc.choose_runtime(fixture_model, exact=True)
    assert seen == [fixture_model] * 2 and not (cache_dir() / "runtime").exists()


def test_the_choice_is_kept_on_disk_and_reused(fixture_model, monkeypatch, tmp_path):
    monkeypatch.setenv("QUARI_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(rt._BUILDERS, "fastexact", _FastExact)
    timed = []

    def fake_timing(runtimes, q, repeats):
        timed.append(len(q))
        return {n: {"eager": 10.0, "fastexact": 5.0}[n] for n in runtimes}

    monkeypatch.setattr(rc, "_time_runtimes", fake_timing)
    model = copy.deepcopy(fixture_model)
    first = rc.choose_runtime(model, exact=True, candidates=("fastexact",))
    assert first.name == "fastexact" and timed == [1, 32] and "cached" not in first.report
    kept = list((tmp_path / "runtime").glob("*.json"))
    assert len(kept) == 1
    # The next start on this machine: the same choice, rebuilt, nothing measured.
    again = rc.choose_runtime(model, exact=True, candidates=("fastexact",))
    assert again.name == "fastexact" and timed == [1, 32]
    assert again.report["eager_ms"] == first.report["eager_ms"] == {1: 10.0, 32: 10.0}
    assert again.report["cached"] == str(kept[0]) and again.report["by_batch"] == {
        1: "fastexact",
        32: "fastexact",
    }
    # Anything that can change the choice measures anew: other weights, another thread count.
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    rc.choose_runtime(model, exact=True, candidates=("fastexact",))
    before = torch.get_num_threads()
    torch.set_num_threads(1 if before > 1 else 2)
    try:
        rc.choose_runtime(model, exact=True, candidates=("fastexact",))
    finally:
        torch.set_num_threads(before)
    assert timed == [1, 32] * 3 and len(list((tmp_path / "runtime").glob("*.json"))) == 3
    # A damaged file is measured over (and said so), then replaced; cache=False never reads.
    kept[0].write_text('{"by_batch": ')
    with pytest.warns(UserWarning, match="unreadable kept runtime choice"):
        model = copy.deepcopy(fixture_model)
        assert rc.choose_runtime(model, exact=True, candidates=("fastexact",)).name == "fastexact"
    assert timed == [1, 32] * 4 and json.loads(kept[0].read_text())["chosen"] == "fastexact"
    rc.choose_runtime(model, exact=True, candidates=("fastexact",), cache=False)
    assert timed == [1, 32] * 5


def test_timing_rounds_interleave_the_runtimes(monkeypatch):
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def __call__(self, q):
            calls.append(self.name)

    runtimes = {"a": Fake("a"), "b": Fake("b")}
    ms = rc._time_runtimes(runtimes, torch.zeros(1, 4), repeats=3)
    assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())
    # a warm-up round, then rounds of a-then-b: a quick runtime gets the most rounds
    assert calls == ["a", "b"] * (rc.MAX_ROUNDS + 1)
    calls.clear()
    monkeypatch.setattr(rc, "TIMING_BUDGET_S", 0.0)
    rc._time_runtimes(runtimes, torch.zeros(1, 4), repeats=3)
    assert calls == ["a", "b"] * 4  # never fewer than `repeats`
