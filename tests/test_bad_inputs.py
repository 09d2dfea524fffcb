"""Bad inputs and faults against the CLI and the library: every one is a clear error.

Each CLI case checks the exit code of its kind (quari.errors table), a one-line message naming
the problem, no traceback, and nothing written outside the output folder. Cases that used to
exhaust memory run in a subprocess under an address-space limit and report their peak RSS.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from quari import QuARIModel
from quari.checkpoint import load_model, save
from quari.errors import LockError, QuARIError
from quari.index import CandidateIndex
from quari.retriever import MODES, Retriever
from quari.store import EmbeddingSet

from helpers import REPO, make_set, tiny_config

runner = CliRunner()
MEMORY_LIMIT = 4 << 30  # address space of a subprocess case (torch alone maps ~2.2 GiB)
RSS_BOUND_MB = 1200  # peak resident memory such a case may reach


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A 750-row set with an index, a tiny model and query files; shared read-only."""
    from quari.cli import app

    tmp = tmp_path_factory.mktemp("bad")
    eset, _, _ = make_set(tmp / "set")
    CandidateIndex.build(eset, progress=False)
    torch.manual_seed(0)
    save(QuARIModel(tiny_config("reference")).eval(), tmp / "model")
    np.save(tmp / "q.npy", np.random.default_rng(1).standard_normal((2, 24)).astype(np.float32))
    return app, tmp


def cli(app, *args: str, code: int, says: str) -> None:
    """Runs a command and checks the one-line error of its kind."""
    out = runner.invoke(app, [str(a) for a in args])
    text = " ".join(out.output.split())
    assert out.exit_code == code, out.output
    assert says in text, out.output
    assert "Traceback" not in out.output and "unexpected error" not in out.output
    assert out.output.strip().startswith("error:"), out.output
    assert len(out.output.strip().splitlines()) <= 3, out.output  # one line, soft-wrapped


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def run_limited(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, int]:
    """``python -m quari ARGS`` under an address-space limit; returns (process, peak RSS MB)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(
        [sys.executable, "-m", "quari", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
        env=env,
        preexec_fn=limit,
    )
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return proc, max(peak, before) // 1024


# -- 1. paths that leave the set ---------------------------------------------------------------
def _copy_set(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("index"))


@pytest.mark.parametrize("where", ["../outside/secret.parquet", "/etc/secret.parquet"])
def test_a_manifest_naming_a_file_outside_the_set_is_refused(ws, tmp_path, where):
    app, tmp = ws
    _copy_set(tmp / "set", tmp_path / "set")
    outside = tmp_path / "outside"
    outside.mkdir()
    pq.write_table(pa.table({"secret": ["x"] * 300}), outside / "secret.parquet")
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    manifest["shards"][0]["metadata"]["path"] = where
    (tmp_path / "set" / "manifest.json").write_text(json.dumps(manifest))
    for args in (["search", tmp_path / "set", "--mode", "scan", "--query-rows", "1"],
                 ["set", "verify", tmp_path / "set"]):  # fmt: skip
        cli(app, *args, code=3, says="outside its folder; refused")


def test_a_symlink_out_of_the_set_is_refused_unless_allowed(ws, tmp_path, monkeypatch):
    app, tmp = ws
    _copy_set(tmp / "set", tmp_path / "set")
    meta = tmp_path / "set" / "metadata" / "metadata_1.parquet"
    moved = tmp_path / "elsewhere.parquet"
    meta.rename(moved)
    meta.symlink_to(moved)
    cli(app, "set", "info", tmp_path / "set", code=3, says="outside")
    monkeypatch.setenv("QUARI_FOLLOW_LINKS", "1")
    assert runner.invoke(app, ["set", "info", str(tmp_path / "set")]).exit_code == 0


# -- 2. memory follows the work ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["-k", "3000000000", "--mode", "plain"],
        ["--candidates", "2000000000", "--mode", "plain"],
        ["-k", "100000000", "--mode", "scan", "--model", "model"],
    ],
    ids=["k-3e9", "candidates-2e9", "scan-k-1e8"],
)
def test_huge_k_and_candidates_are_clamped_to_the_rows(ws, extra):
    _, tmp = ws
    proc, peak = run_limited(["search", "set", "--query-rows", "3", "--json", *extra], tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)["results"][0]
    assert 1 <= len(rows) <= 750 and peak < RSS_BOUND_MB, peak


@pytest.mark.slow
def test_a_huge_config_is_refused_before_it_allocates(ws, tmp_path):
    _, tmp = ws
    import shutil

    shutil.copytree(tmp / "model", tmp_path / "model")
    cfg_path = tmp_path / "model" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["config"]["hidden_dim"] = 8192  # under the ceiling, far from the weights: 1.6 GB
    cfg_path.write_text(json.dumps(cfg))
    args = ["search", str(tmp / "set"), "--model", str(tmp_path / "model"), "--query-rows", "1"]
    proc, peak = run_limited(args, tmp)
    assert proc.returncode == 4, proc.stderr[-2000:]  # a model error, found before allocating
    assert "the config expects" in proc.stderr and "Traceback" not in proc.stderr
    assert peak < RSS_BOUND_MB, peak
    cfg["config"]["hidden_dim"] = 65536
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(QuARIError, match="hidden_dim = 65536 is above quari's ceiling"):
        load_model(tmp_path / "model")


# -- 3. degenerate queries -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_zero_queries_are_refused_and_any_scale_gives_the_same_results(ws, mode):
    _, tmp = ws
    eset = EmbeddingSet.open(tmp / "set")
    model = load_model(tmp / "model")
    retriever = Retriever(eset, model, CandidateIndex.load(eset))
    q = np.random.default_rng(4).standard_normal((3, 24)).astype(np.float32)
    want = retriever.search(q, k=5, mode=mode)
    for scale in (1e20, 1e-30):
        got = retriever.search(q * np.float32(scale), k=5, mode=mode)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)
    q[1] = 0
    with pytest.raises(QuARIError, match=r"queries: row \[1\] is all zeros"):
        retriever.search(q, k=5, mode=mode)


def test_a_zero_query_from_the_command_line(ws, tmp_path):
    app, tmp = ws
    np.save(tmp_path / "zero.npy", np.zeros((1, 24), np.float32))
    cli(app, "search", tmp / "set", "--mode", "plain", "--query-embeddings", tmp_path / "zero.npy",
        code=2, says="row [0] is all zeros")  # fmt: skip


# -- 4. errors, not tracebacks -------------------------------------------------------------------
def test_search_inputs_that_used_to_print_tracebacks(ws, tmp_path):
    app, tmp = ws
    base = ["search", tmp / "set", "--mode", "plain"]
    cli(app, *base, "--query-rows", "1", "--where", "not " * 5000 + "group == 1",
        code=2, says="longer than the limit")  # fmt: skip
    cli(app, *base, "--query-rows", "1", "--where", "not " * 100 + "group == 1",
        code=2, says="levels deep")  # fmt: skip
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cli(app, *base, "--query-embeddings", tmp_path / "obj.npy", code=2,
        says="not a numeric .npy array")  # fmt: skip
    (tmp_path / "garbage.npy").write_bytes(os.urandom(300))
    cli(app, *base, "--query-embeddings", tmp_path / "garbage.npy", code=2,
        says="not a numeric .npy array")  # fmt: skip
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    cli(app, *base, "--query-embeddings", tmp_path / "text.npy", code=2, says="must be numbers")
    if not torch.cuda.is_available():
        cli(app, *base, "--query-rows", "1", "--device", "cuda", code=2,
            says="CUDA is not available")  # fmt: skip
    cli(app, *base, "--query-rows", "1", "--device", "nonsense:7", code=2,
        says="not a device name")  # fmt: skip
    cli(app, *base, "--query-rows", "1", "--candidates", "0", code=2,
        says="candidates must be a positive integer")  # fmt: skip
    cli(app, *base, "--query-rows", "1", "--columns", "nosuch", code=2,
        says="--columns: no column 'nosuch'")  # fmt: skip


def test_a_faiss_factory_that_needs_more_rows_than_the_set_has(ws, tmp_path):
    app, tmp = ws
    _copy_set(tmp / "set", tmp_path / "set")
    cli(app, "index", "build", tmp_path / "set", "--backend", "faiss:IVF4096,Flat", "--quiet",
        code=2, says="has 4096 lists but the set only 750 rows")  # fmt: skip


def test_embed_into_a_file_and_bad_embed_options(ws, tmp_path):
    from embed_helpers import photo, register_toy

    app, _ = ws
    register_toy()
    (tmp_path / "imgs").mkdir()
    photo(0).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "afile").write_text("x")
    base = ["embed", tmp_path / "imgs", "--encoder", "toy:", "--quiet"]
    cli(app, *base[:2], tmp_path / "afile", *base[2:], code=2, says="exists and is not a folder")
    cli(app, *base[:2], tmp_path / "o1", *base[2:], "--workers", "-3", code=2,
        says="workers must be an integer ≥ 0")  # fmt: skip
    cli(app, *base[:2], tmp_path / "o2", *base[2:], "--max-pixels", "0", code=2,
        says="max_pixels must be an integer ≥ 1")  # fmt: skip


def test_non_regular_files_in_an_embed_list_are_skipped_not_read(ws, tmp_path):
    """/dev/zero would fill memory and a FIFO would block forever: both are skipped into the
    errors parquet like other bad images, and the run finishes."""
    from quari.embed import read_errors

    from embed_helpers import photo, register_toy

    app, _ = ws
    register_toy()
    photo(1).save(tmp_path / "good.png")
    os.mkfifo(tmp_path / "pipe.png")
    paths = [str(tmp_path / "good.png"), "/dev/zero", str(tmp_path / "pipe.png")]
    pq.write_table(pa.table({"path": paths}), tmp_path / "list.parquet")
    before = files_under(tmp_path)
    out = runner.invoke(app, ["embed", str(tmp_path / "list.parquet"), str(tmp_path / "out"),
                              "--encoder", "toy:", "--quiet", "--workers", "0"])  # fmt: skip
    assert out.exit_code == 0, out.output
    errors = read_errors(tmp_path / "out").to_pylist()
    assert {Path(e["path"]).name for e in errors} == {"zero", "pipe.png"}
    assert all("not a regular file" in e["reason"] for e in errors)
    assert EmbeddingSet.open(tmp_path / "out").rows == 1
    assert {p for p in files_under(tmp_path) - before if "out" not in p.parts} == set()


def test_malicious_or_corrupt_pickles_are_named_errors(ws, tmp_path):
    app, tmp = ws

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    import pickle

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "clip"}')
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    cli(app, "search", tmp / "set", "--mode", "plain", "--text", "x", "--encoder",
        f"hf:{tmp_path / 'hf'}", code=4, says="cannot load model and processor")  # fmt: skip
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(pickle.dumps(Evil()))
    eset_dir = tmp_path / "pairs"
    make_set(eset_dir, text=True)
    cli(app, "train", "--train", eset_dir, "--out", tmp_path / "run", "--resume", "--quiet",
        code=4, says="not a readable checkpoint")  # fmt: skip
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()


def test_training_errors_before_any_work(ws, tmp_path):
    app, _ = ws
    make_set(tmp_path / "pairs", text=True)
    if not torch.cuda.is_available():
        cli(app, "train", "--train", tmp_path / "pairs", "--out", tmp_path / "run",
            "--accelerator", "gpu", "--quiet", code=2, says="no CUDA device")  # fmt: skip
        assert not (tmp_path / "run").exists()  # nothing written: the rerun is not blocked
    cli(app, "train", "--train", f"{tmp_path / 'pairs'}:abc", "--out", tmp_path / "run2",
        code=2, says="'abc' is not a ratio")  # fmt: skip


# -- 5. a run that never checkpointed does not block the next one --------------------------------
def test_a_run_folder_without_a_checkpoint_can_be_started_again(tmp_path):
    from quari.training import TrainConfig, TrainSource
    from quari.training.loop import _check_run_folder

    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.json").write_text("{}")  # a start that failed before its checkpoint
    config = TrainConfig(train=(TrainSource(tmp_path / "pairs"),), out=out)
    assert _check_run_folder(config, resume=False) is None
    with pytest.raises(QuARIError, match="stopped before its first checkpoint"):
        _check_run_folder(config, resume=True)


# -- 6. two writers, one set ---------------------------------------------------------------------
def test_two_writers_never_drop_each_others_shards(tmp_path):
    make_set(tmp_path / "s", shards=(10,))
    a, b = EmbeddingSet.open(tmp_path / "s"), EmbeddingSet.open(tmp_path / "s")
    meta = {"group": np.zeros(4, np.int64), "name": ["n"] * 4}
    a.append(np.ones((4, 24)), meta)
    b.append(np.full((4, 24), 2.0), meta)  # b's view was stale: it takes in a's shard first
    reopened = EmbeddingSet.open(tmp_path / "s")
    assert [s.rows for s in reopened.shards] == [10, 4, 4]
    with a.writing(), pytest.raises(LockError, match="another writer is appending"):
        b.append(np.ones((4, 24)), meta)
    assert EmbeddingSet.open(tmp_path / "s").rows == 18


def test_quari_embed_refuses_while_another_writer_holds_the_set(ws, tmp_path):
    from embed_helpers import photo, register_toy

    app, _ = ws
    register_toy()
    (tmp_path / "imgs").mkdir()
    photo(0).save(tmp_path / "imgs" / "a.png")
    target = EmbeddingSet.create(tmp_path / "out", dim=16, encoder="toy")
    with target.writing():
        cli(app, "embed", tmp_path / "imgs", tmp_path / "out", "--encoder", "toy:", "--quiet",
            code=7, says="another writer is appending")  # fmt: skip


# -- 7. quieter defects ------------------------------------------------------------------------
def test_nan_rows_are_refused_by_index_builds_and_mining(tmp_path):
    from quari.training.mining import mine_semipositives

    make_set(tmp_path / "s", shards=(20,))
    stored = np.load(tmp_path / "s" / "img_emb" / "img_emb_0.npy")
    stored[7, 3] = np.nan
    np.save(tmp_path / "s" / "img_emb" / "img_emb_0.npy", stored)
    broken = EmbeddingSet.open(tmp_path / "s")  # clip-retrieval style: no checksum stops it
    with pytest.raises(QuARIError, match="row 7 contains NaN or Inf"):
        CandidateIndex.build(broken, progress=False, save=False)
    with pytest.raises(QuARIError, match="row 7 contains NaN or Inf"):
        mine_semipositives(broken, progress=False)


# -- property: random bytes are a result or a QuARIError ----------------------------------------
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_as_a_manifest(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("m")
    make_set(root / "s", shards=(5,))
    (root / "s" / "manifest.json").write_bytes(data)
    with contextlib.suppress(QuARIError):
        EmbeddingSet.open(root / "s").gather([0])


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_as_a_shard_or_query_file(tmp_path_factory, data):
    from quari.validation import load_array_file

    root = tmp_path_factory.mktemp("q")
    (root / "img_emb").mkdir()
    (root / "img_emb" / "img_emb_0.npy").write_bytes(data)
    with contextlib.suppress(QuARIError):
        EmbeddingSet.open(root).gather([0])
    (root / "q.npy").write_bytes(data)
    with contextlib.suppress(QuARIError):
        load_array_file(root / "q.npy")


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.dictionaries(st.text(max_size=12), st.integers())))
def test_random_model_configs(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("c")
    save(QuARIModel(tiny_config()).eval(), root / "m")
    if isinstance(data, bytes):
        (root / "m" / "config.json").write_bytes(data)
    else:
        cfg = json.loads((root / "m" / "config.json").read_text())
        cfg["config"].update(data)
        (root / "m" / "config.json").write_text(json.dumps(cfg))
    with contextlib.suppress(QuARIError):
        load_model(root / "m")


@FUZZ
@given(st.text(max_size=200))
def test_random_filter_strings(ws, text):
    from quari.filters import parse_where

    _, tmp = ws
    eset = EmbeddingSet.open(tmp / "set")
    with contextlib.suppress(QuARIError):
        eset.select(parse_where(text))


def test_a_model_file_linked_from_outside_its_folder_is_refused(tmp_path):
    save(QuARIModel(tiny_config()).eval(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.rename(tmp_path / "elsewhere.safetensors")
    weights.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(QuARIError, match="outside"):
        load_model(tmp_path / "m")


def test_a_divergence_names_the_bad_pairs_by_set_row(tmp_path):
    from quari.training import TrainConfig, TrainSource
    from quari.training.module import QuARITrainingModule

    config = TrainConfig(train=(TrainSource(tmp_path / "pairs"),), out=tmp_path / "run")
    module = QuARITrainingModule(tiny_config().to_dict(), config.to_dict())
    query = torch.randn(6, 24)
    query[4, 2] = float("nan")
    batch = {"query": query, "image": torch.randn(6, 24), "row": torch.arange(100, 106),
             "source": torch.tensor([0, 0, 1, 1, 1, 1])}  # fmt: skip
    message = module._divergence_message(batch, batch_idx=3)
    assert "pairs holding NaN/Inf embeddings: set 1 row 104" in message
