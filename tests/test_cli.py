"""The quari command line: index build, search, set info/verify, and its error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from quari import QuARIModel
from quari.checkpoint import save
from quari.index import CandidateIndex
from quari.retriever import Retriever
from quari.store import EmbeddingSet

from helpers import make_set, tiny_config

runner = CliRunner()


@pytest.fixture
def workspace(tmp_path):
    from quari.cli import app

    eset, _, _ = make_set(tmp_path / "set")
    torch.manual_seed(0)
    model = QuARIModel(tiny_config("paper")).eval()
    save(model, tmp_path / "model")
    q = np.random.default_rng(3).standard_normal((2, 24)).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    return app, tmp_path, eset, model, q


def test_build_then_search_matches_the_python_api(workspace):
    app, tmp, eset, model, q = workspace
    out = runner.invoke(app, ["index", "build", str(tmp / "set"), "--quiet"])
    assert out.exit_code == 0, out.output
    assert "built faiss:Flat over 750 rows" in out.output
    out = runner.invoke(
        app,
        [
            "search",
            str(tmp / "set"),
            "--model",
            str(tmp / "model"),
            "--query-embeddings",
            str(tmp / "q.npy"),
            "-k",
            "5",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    api = Retriever(eset, model, CandidateIndex.load(eset)).search(q, 5, mode="adaptive")
    assert [[r["row"] for r in rows] for rows in data["results"]] == api.ids.tolist()
    assert data["results"][0][0]["name"] == f"item-{api.ids[0, 0]}"


def test_search_with_a_filter_and_row_queries_prints_tables(workspace):
    app, tmp, *_ = workspace
    runner.invoke(app, ["index", "build", str(tmp / "set"), "--quiet"])
    out = runner.invoke(
        app,
        [
            "search",
            str(tmp / "set"),
            "--model",
            str(tmp / "model"),
            "--query-rows",
            "3,700",
            "--where",
            "group == 1",
            "-k",
            "3",
            "--mode",
            "rerank",
            "--columns",
            "name,group",
        ],
    )
    assert out.exit_code == 0, out.output
    assert "query 0 · rerank" in out.output and "query 1 · rerank" in out.output
    assert out.output.count("│ 1     │") + out.output.count(" 1 ") >= 3  # group column shows 1


def test_plain_and_scan_need_no_index_or_model(workspace):
    app, tmp, *_ = workspace
    out = runner.invoke(
        app,
        [
            "search",
            str(tmp / "set"),
            "--model",
            str(tmp / "model"),
            "--query-embeddings",
            str(tmp / "q.npy"),
            "--mode",
            "scan",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.output)["results"][0]) == 10


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["search", "{set}", "--mode", "plain", "--query-embeddings", "{bad}"],
            "expected embedding dimension 24, got 5",
        ),
        (
            ["search", "{set}", "--mode", "rerank", "--query-embeddings", "{q}"],
            "needs a QuARI model",
        ),
        (["search", "{set}", "--mode", "plain", "--query-rows", "99999"], "unknown row id 99999"),
        (
            ["search", "{set}", "--mode", "plain", "--query-embeddings", "{q}", "--where", "a +"],
            "syntax error",
        ),
        (["search", "{tmp}/nowhere", "--query-rows", "1"], "no such folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(workspace, args, message):
    app, tmp, *_ = workspace
    np.save(tmp / "bad.npy", np.ones((1, 5), np.float32))
    fill = {
        "set": str(tmp / "set"),
        "q": str(tmp / "q.npy"),
        "bad": str(tmp / "bad.npy"),
        "model": str(tmp / "model"),
        "tmp": str(tmp),
    }
    out = runner.invoke(app, [a.format(**fill) for a in args])
    assert out.exit_code == 2, out.output
    assert message in " ".join(out.output.split()) and "Traceback" not in out.output


def test_a_folder_that_holds_no_model_is_a_model_error(workspace):
    app, tmp, *_ = workspace
    out = runner.invoke(app, ["search", str(tmp / "set"), "--model", str(tmp), "--query-rows", "1"])
    assert out.exit_code == 4, out.output  # model error (quari.errors table)
    assert "neither a quari model folder" in " ".join(out.output.split())
    assert "Traceback" not in out.output


def test_stale_index_and_update(workspace):
    app, tmp, eset, *_ = workspace
    runner.invoke(app, ["index", "build", str(tmp / "set"), "--quiet"])
    eset.append(np.ones((2, 24)), {"group": [0, 1], "name": ["a", "b"]})
    out = runner.invoke(app, ["search", str(tmp / "set"), "--mode", "plain", "--query-rows", "1"])
    assert out.exit_code == 3 and "stale" in out.output  # bad data (quari.errors table)
    out = runner.invoke(app, ["index", "build", str(tmp / "set"), "--update"])
    assert out.exit_code == 0 and "752 rows is up to date" in out.output


def test_set_info_and_verify(workspace):
    app, tmp, *_ = workspace
    out = runner.invoke(app, ["set", "info", str(tmp / "set")])
    assert out.exit_code == 0 and "test-encoder" in out.output and "750" in out.output
    assert "group (int64), name (string)" in out.output  # the metadata columns, typed
    out = runner.invoke(app, ["set", "verify", str(tmp / "set")])
    assert out.exit_code == 0 and "ok: 750 rows in 3 shards" in out.output
    p = tmp / "set" / "img_emb" / "img_emb_2.npy"
    x = np.load(p)
    x[1, 1] = -x[1, 1]
    np.save(p, x)
    out = runner.invoke(app, ["set", "verify", str(tmp / "set")])
    assert out.exit_code == 3 and "img_emb_2.npy: checksum differs" in out.output
    assert EmbeddingSet.open(tmp / "set").rows == 750


def test_python_dash_m_quari_runs_the_cli():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "quari", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for command in ("search", "train", "embed", "index"):
        assert command in done.stdout


def test_text_and_image_queries_from_the_command_line(tmp_path):
    from quari.cli import app
    from quari.store import EmbeddingSet

    from embed_helpers import ToyEncoder, photo, register_toy

    register_toy()
    encoder = ToyEncoder()
    rows = np.random.default_rng(0).standard_normal((40, encoder.dim)).astype(np.float32)
    rows[5] = encoder.encode_texts(["a red car"])[0]
    rows[9] = encoder.encode_images([photo(1)])[0]
    eset = EmbeddingSet.create(tmp_path / "s", dim=encoder.dim, encoder="toy")
    eset.append(rows, {"name": [f"n{i}" for i in range(40)]})
    photo(1).save(tmp_path / "q.png")
    base = ["search", str(tmp_path / "s"), "--mode", "plain", "--encoder", "toy:", "--json"]
    out = runner.invoke(app, [*base, "--text", "a red car", "-k", "2"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["results"][0][0]["row"] == 5
    out = runner.invoke(app, [*base, "--image", str(tmp_path / "q.png"), "-k", "2"])
    assert out.exit_code == 0 and json.loads(out.output)["results"][0][0]["row"] == 9
    (tmp_path / "bad.png").write_bytes(b"not an image")
    out = runner.invoke(app, [*base, "--image", str(tmp_path / "bad.png")])
    assert out.exit_code == 2 and "Traceback" not in out.output
    out = runner.invoke(app, ["search", str(tmp_path / "s"), "--text", "x"])
    assert out.exit_code == 2 and "need --encoder" in out.output


def test_every_command_help_renders_with_its_literal_brackets():
    import typer.main

    from quari.cli import app

    def walk(command, path):
        yield path
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*path, name])

    paths = list(walk(typer.main.get_command(app), []))
    assert ["index", "build"] in paths and ["eval", "custom"] in paths
    for path in paths:
        out = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert out.exit_code == 0, (path, out.output)
    index_help = runner.invoke(app, ["index", "build", "--help"], env={"COLUMNS": "200"})
    assert "milvus://HOST:PORT[/COLLECTION]" in index_help.output


def test_search_with_another_blend_weight(workspace):
    """--blend-weight scores a blended model with another weight than its trained one: the
    scan's rows and scores are those of the Python API with that weight; a model without a
    fitted whitening is refused by name."""
    app, tmp, eset, _, q = workspace
    torch.manual_seed(1)
    model = QuARIModel(tiny_config("reference", blend_weight=0.5)).eval()
    model.whitening.copy_(torch.randn(24, 24) + 3 * torch.eye(24))
    save(model, tmp / "blended")
    args = ["search", str(tmp / "set"), "--query-embeddings", str(tmp / "q.npy"), "-k", "5",
            "--mode", "scan", "--json"]  # fmt: skip
    for weight in (0.0, 0.9):
        out = runner.invoke(app, [*args, "--model", str(tmp / "blended"),
                                  "--blend-weight", str(weight)])  # fmt: skip
        assert out.exit_code == 0, out.output
        api = Retriever(eset, model.set_blend_weight(weight)).search(q, 5, mode="scan")
        data = json.loads(out.output)["results"]
        assert [[r["row"] for r in rows] for rows in data] == api.ids.tolist()
        np.testing.assert_allclose([[r["score"] for r in rows] for rows in data], api.scores,
                                   atol=1e-6)  # fmt: skip
    trained = Retriever(eset, model.set_blend_weight(None)).search(q, 5, mode="scan")
    assert not np.allclose(trained.scores, api.scores)  # the weight changed the scores
    out = runner.invoke(app, [*args, "--model", str(tmp / "model"), "--blend-weight", "0.5"])
    assert out.exit_code != 0 and "trained without the static blend" in out.output
