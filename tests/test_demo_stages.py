"""The demo's stage runner: reuse with the same settings, redo (downstream too) on a change,
resume an interrupted resumable stage, start others clean, and the wall/CPU/load record."""

from __future__ import annotations

import json

import pytest

from quari.demo.stages import StageRunner, stage_key


def make_stages(out, calls, *, fail_b=False, setting=1, resumable_b=False):
    """Runs three stages a → b → c (b depends on ``setting``); returns the runner and lines."""
    lines = []
    runner = StageRunner(out, lines.append, 3)

    def stage(name, value):
        def fn():
            calls.append(name)
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / "part").write_text("written")
            if name == "b" and fail_b:
                raise RuntimeError("killed")
            return {"value": value}

        return fn

    runner.run("a", "stage a", {"x": 0}, stage("a", 0), outputs=[out / "a"])
    runner.run("b", "stage b", {"x": setting}, stage("b", setting), parents=["a"],
               outputs=[out / "b"], resumable=resumable_b)  # fmt: skip
    runner.run("c", "stage c", {}, stage("c", 2), parents=["b"], outputs=[out / "c"])
    return runner, lines


def test_a_rerun_reuses_every_stage_and_says_so(tmp_path):
    calls = []
    first, _ = make_stages(tmp_path, calls)
    assert calls == ["a", "b", "c"] and not any(r.reused for r in first.records)
    second, lines = make_stages(tmp_path, calls)
    assert calls == ["a", "b", "c"]  # nothing ran again
    assert [r.reused for r in second.records] == [True, True, True]
    assert [r.summary for r in second.records] == [{"value": 0}, {"value": 1}, {"value": 2}]
    assert all("reused: stage" in line for line in lines) and len(lines) == 3
    # the reused records keep the times of the run that computed them
    assert [r.wall_s for r in second.records] == [r.wall_s for r in first.records]


def test_a_changed_setting_redoes_the_stage_and_everything_downstream(tmp_path):
    calls = []
    make_stages(tmp_path, calls)
    (tmp_path / "c" / "stale").write_text("from the first run")
    runner, lines = make_stages(tmp_path, calls, setting=5)
    assert calls == ["a", "b", "c", "b", "c"]
    assert [r.reused for r in runner.records] == [True, False, False]
    assert any("settings changed" in line and "stage b" in line for line in lines)
    assert not (tmp_path / "c" / "stale").exists()  # the stale stage's outputs were removed
    assert runner.records[1].summary == {"value": 5}


def test_a_missing_output_reruns_the_stage(tmp_path):
    calls = []
    make_stages(tmp_path, calls)
    (tmp_path / "c" / "part").unlink()
    (tmp_path / "c").rmdir()
    runner, _ = make_stages(tmp_path, calls)
    assert calls[3:] == ["c"] and [r.reused for r in runner.records] == [True, True, False]


@pytest.mark.parametrize("resumable", [True, False])
def test_an_interrupted_stage_resumes_or_restarts_clean(tmp_path, resumable):
    calls = []
    with pytest.raises(RuntimeError, match="killed"):
        make_stages(tmp_path, calls, fail_b=True, resumable_b=resumable)
    marker = json.loads((tmp_path / "stages" / "b.json").read_text())
    assert marker["done"] is False
    (tmp_path / "b" / "partial").write_text("left by the killed run")
    runner, _ = make_stages(tmp_path, calls, resumable_b=resumable)
    assert calls == ["a", "b", "b", "c"] and runner.records[0].reused
    assert (tmp_path / "b" / "partial").exists() == resumable


def test_records_hold_wall_cpu_and_load(tmp_path):
    runner, _ = make_stages(tmp_path, [])
    for r in runner.records:
        assert r.wall_s >= 0 and r.cpu_s >= 0 and len(r.load) == 2 and r.finished
    saved = json.loads((tmp_path / "stages" / "a.json").read_text())
    assert saved["done"] and saved["record"]["name"] == "a" and saved["key"] == runner.keys["a"]


def test_the_key_covers_settings_and_parents():
    assert stage_key({"a": 1}) == stage_key({"a": 1})
    assert stage_key({"a": 1}) != stage_key({"a": 2})
    assert stage_key({"a": 1}, ["p"]) != stage_key({"a": 1}, ["q"])
    assert stage_key({"a": 1, "b": 2}) == stage_key({"b": 2, "a": 1})
