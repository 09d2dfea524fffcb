"""quari.kernels: the fused scan kernel, the device scan, CUDA graphs.

Without CUDA the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here
before anything imports triton) on small sizes; with CUDA the same tests run compiled on the
GPU, and the ``gpu``-marked tests add paper-sized checks. Where Triton is not installed the
kernel tests skip and the torch-path tests still run.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

from quari import Adaptation, HyperNetConfig, QuARIInputError, QuARIModel  # noqa: E402
from quari.kernels import interpreting, scan_topk, select_backend, triton_available  # noqa: E402
from quari.kernels.scan import torch_scores  # noqa: E402

from helpers import (  # noqa: E402
    assert_close,
    assert_topk_matches,
    dense_scores,
    random_adaptation,
    tiny_config,
)

DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# |kernel − fp64 oracle|: the projection columns are rounded to the gallery dtype (8-bit
# mantissa for bf16, 11-bit for fp16); observed maxima ~2.5e-3 and ~3e-4 at these sizes.
ORACLE_TOL = {torch.bfloat16: 6e-3, torch.float16: 1e-3}
# |kernel − torch path|: the same rounded inputs, fp32 sums in another order (on CUDA, cuBLAS
# may also reduce half products in reduced precision).
PATH_TOL = 2e-3 if CUDA else 2e-5


@pytest.fixture(autouse=True, scope="module")
def _interpreter_numpy_compat():
    """Triton 3.6's interpreter turns 1-element arrays into ints with int(array), an error
    since NumPy 2.4; runtime loop bounds (the persistent grid's) need ``.item()``."""
    if not (triton_available() and interpreting()):
        yield
        return
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    yield
    interp._patch_lang_tensor = original


def make_problem(B, E, r, N, variant, dtype, seed=0, scale=1.0):
    ad = random_adaptation(B, E, r, variant, seed=seed, scale=scale).to(DEVICE)
    g = torch.Generator().manual_seed(seed + 1)
    norms = torch.rand(N, 1, generator=g) * 2 + 0.1  # non-unit rows: scores must not care
    gallery = torch.nn.functional.normalize(torch.randn(N, E, generator=g), dim=-1) * norms
    return ad, gallery.to(dtype).to(DEVICE)


def oracle(ad, gallery):
    return dense_scores(ad.to("cpu"), gallery.cpu().double())


SHAPES = [(1, 64, 16, 1000), (3, 32, 8, 777), (8, 48, 8, 333)]  # (B, E, r, N): ragged tails


# -- the kernel's scores -------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-E{}-r{}-N{}".format(*s))
def test_kernel_scores_match_torch_path_and_oracle(shape, variant, dtype):
    from quari.kernels.scan_triton import fused_scores

    ad, gallery = make_problem(*shape, variant, dtype, seed=sum(shape))
    out = torch.full((shape[0], shape[3]), float("nan"), device=DEVICE)  # poisoned
    scores = fused_scores(gallery, ad, out=out)
    assert scores is out and torch.isfinite(scores).all(), "every score must be written"
    assert_close(scores.cpu(), torch_scores(ad.plan, gallery, None).cpu(), PATH_TOL)
    assert_close(scores.cpu(), oracle(ad, gallery), ORACLE_TOL[dtype])


def config_cases():
    from quari.kernels.scan_triton import KernelConfig

    return [
        KernelConfig(block_m=16, block_k=16, group=1),
        KernelConfig(block_m=32, block_k=32, group=2),  # E = 48: a ragged last K step
        KernelConfig(block_m=64, block_k=16, group=4),
        KernelConfig(block_m=32, block_k=32, group=2, persistent=True, programs_per_sm=2),
        KernelConfig(block_m=32, block_k=32, group=4, tma=True),  # E = 48: zero-filled K tail
        KernelConfig(block_m=16, block_k=16, group=2, tma=True, persistent=True),
    ]


@needs_triton
@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("case", range(6))
def test_every_tile_configuration_computes_the_same_scores(variant, case):
    from quari.kernels.scan_triton import fused_scores

    config = config_cases()[case]
    ad, gallery = make_problem(5, 48, 8, 203, variant, torch.float16, seed=case)
    scores = fused_scores(gallery, ad, config=config)
    assert_close(scores.cpu(), torch_scores(ad.plan, gallery, None).cpu(), PATH_TOL)


@needs_triton
@pytest.mark.parametrize("scale", [1e-4, 300.0])
@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_fp16_columns_are_rescaled_not_overflowed(variant, scale):
    from quari.kernels.scan_triton import fused_scores

    # Unnormalised paper factors this large give columns far beyond fp16's 65504, this small
    # ones below its normal range; the per-query power-of-two scale keeps them representable.
    ad, gallery = make_problem(2, 32, 4, 150, variant, torch.float16, seed=9, scale=scale)
    scores = fused_scores(gallery, ad)
    assert_close(scores.cpu(), oracle(ad, gallery), ORACLE_TOL[torch.float16])


# -- the device scan (segments, top-k, ids, errors) ---------------------------------------------
def ragged_chunks(gallery, cuts):
    return [(a, gallery[a:b]) for a, b in itertools.pairwise(cuts)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("k", [1, 17, 2000])
def test_scan_topk_over_ragged_chunks_matches_the_oracle(backend, variant, k):
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    ad, gallery = make_problem(3, 64, 16, 1111, variant, torch.bfloat16, seed=k)
    chunks = ragged_chunks(gallery, [0, 1, 500, 777, 1111])
    top = scan_topk(ad, chunks, k, backend=backend)
    assert top.ids.device.type == DEVICE
    assert_topk_matches(
        top.ids.cpu(), top.scores.cpu(), oracle(ad, gallery), k, ORACLE_TOL[torch.bfloat16]
    )


@needs_triton
def test_kernel_and_torch_path_agree_on_host_chunks():
    ad, gallery = make_problem(4, 32, 8, 900, "paper", torch.float16, seed=3)
    host = gallery.cpu().numpy()  # numpy chunks are copied to the device per segment
    chunks = [(i, host[i : i + 256]) for i in range(0, 900, 256)]
    a = scan_topk(ad, chunks, 50, backend="triton")
    b = scan_topk(ad, chunks, 50, backend="torch")
    assert_close(a.scores.cpu(), b.scores.cpu(), PATH_TOL)
    want = oracle(ad, gallery)
    assert_topk_matches(a.ids.cpu(), a.scores.cpu(), want, 50, ORACLE_TOL[torch.float16])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_rows_are_named_by_global_id(backend):
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    ad, gallery = make_problem(2, 32, 8, 300, "reference", torch.bfloat16, seed=4)
    gallery[213, 5] = float("nan")
    with pytest.raises(QuARIInputError, match=r"gallery row 213 contains NaN or Inf"):
        scan_topk(ad, ragged_chunks(gallery, [0, 200, 300]), 5, backend=backend)


def test_fp32_rows_use_the_torch_path_and_stay_exact():
    ad, gallery = make_problem(2, 32, 8, 100, "paper", torch.float32, seed=5)
    top = scan_topk(ad, gallery, 10)  # "auto": fp32 rows never go to the half kernel
    assert_topk_matches(top.ids.cpu(), top.scores.cpu(), oracle(ad, gallery), 10, 2e-5)


@needs_triton
def test_a_kernel_that_fails_to_build_falls_back_to_torch(monkeypatch):
    from quari.kernels import scan as scan_module
    from quari.kernels import scan_triton

    def broken(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(scan_triton, "fused_scores", broken)
    monkeypatch.setattr(scan_module, "_failed", set())
    ad, gallery = make_problem(2, 32, 8, 100, "paper", torch.float16, seed=6)
    with pytest.warns(RuntimeWarning, match="failed to build"):  # TMA, then pointer loads
        top = scan_topk(ad, gallery, 5, backend="triton")
    assert_topk_matches(top.ids.cpu(), top.scores.cpu(), oracle(ad, gallery), 5, 1e-3)
    with pytest.raises(RuntimeError, match="shared memory"):
        scan_topk(ad, gallery, 5, backend="triton", fallback=False)


def test_backend_selection(monkeypatch):
    assert select_backend("cpu", torch.bfloat16) == "torch"
    assert select_backend("cuda", torch.float32) == "torch"
    assert select_backend("cuda", torch.float16, "torch") == "torch"
    with pytest.raises(QuARIInputError, match="fp16/bf16"):
        select_backend("cuda", torch.float32, "triton")
    with pytest.raises(QuARIInputError, match="backend must be"):
        select_backend("cuda", torch.float16, "cuda")
    if triton_available():
        assert select_backend("cuda", torch.bfloat16) == "triton"
    monkeypatch.setenv("QUARI_DISABLE_TRITON", "1")
    assert select_backend("cuda", torch.bfloat16) == "torch"
    with pytest.raises(RuntimeError, match="QUARI_DISABLE_TRITON"):
        select_backend("cuda", torch.bfloat16, "triton")


def test_cpu_adaptations_keep_the_exact_cpu_scan(monkeypatch):
    from quari.kernels import scan as scan_module

    def refuse(*args, **kwargs):
        raise AssertionError("a CPU adaptation must not use the device scan")

    monkeypatch.setattr(scan_module, "scan_topk", refuse)
    ad = random_adaptation(2, 16, 4, "paper", seed=7)
    gallery = torch.randn(50, 16).to(torch.bfloat16)
    top = ad.scan([(0, gallery)], k=5)
    assert_topk_matches(top.ids, top.scores, dense_scores(ad, gallery.double()), 5, 2e-5)


# -- compiled for Hopper on this machine (ptxas ships with triton) ------------------------------
def _hopper_toolchain() -> bool:
    if not triton_available():
        return False
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (tools / "ptxas").is_file() and (tools / "cuobjdump").is_file()


@pytest.mark.skipif(not _hopper_toolchain(), reason="triton's ptxas/cuobjdump are not installed")
def test_default_configs_compile_for_hopper_without_spills():
    """The default tile shapes at E = 768, r = 64, built for sm_90 without a GPU: tensor-core
    (HGMMA) instructions, asynchronous loads (TMA or cp.async), no register spills, shared
    memory within the 227 KiB a Hopper block may use — for the TMA defaults and their
    pointer-load fallbacks."""
    cases = [f"{v}:{b}:{t}" for v in ("paper", "reference") for b in (1, 8) for t in (1, 0)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent / "src"), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, str(here / "hopper_build.py"), *cases],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for case in cases:
        r = report[case]
        assert r["stack"] == 0 and r["local"] == 0, f"{case}: register spills {r}"
        assert r["hgmma"] > 0, f"{case}: no Hopper tensor-core instructions {r}"
        assert r["ldgsts"] + r["tma_loads"] > 0, f"{case}: no asynchronous loads {r}"
        assert r["shared"] <= 227 * 1024, f"{case}: too much shared memory {r}"


# -- CUDA graphs ----------------------------------------------------------------------------------
def test_cuda_graph_api_without_cuda_is_a_clear_error():
    model = QuARIModel(tiny_config()).eval()
    assert model.cuda_graph_batch_sizes == ()
    if not CUDA:
        with pytest.raises(RuntimeError, match="CUDA graphs need the model on a CUDA device"):
            model.enable_cuda_graphs((1, 2))
    with pytest.raises(QuARIInputError, match="positive integers"):
        model.to(DEVICE).enable_cuda_graphs((0,))
    with pytest.raises(QuARIInputError, match="precision must be one of"):
        model.to(DEVICE).enable_cuda_graphs((1,), precision="fp8")
    assert model.disable_cuda_graphs() is model
    with torch.inference_mode():
        assert model(torch.randn(3, 24)).U.shape == (3, 24, 4)


def test_step_codes_are_not_saved():
    model = QuARIModel(tiny_config("reference"))
    assert "step_codes" not in model.state_dict()


@pytest.mark.parametrize(
    ("B", "n", "k", "block"),
    [(1, 10_000, 100, 16), (3, 10_007, 50, 32), (2, 999, 10, 8), (2, 500, 100, 8), (1, 64, 64, 4)],
)
def test_select_topk_is_an_exact_topk(B, n, k, block):
    from quari.kernels.scan import select_topk

    gen = torch.Generator().manual_seed(n)
    # Scores on a coarse grid: many ties, also across the kept/dropped block boundary.
    scores = torch.randint(0, 200, (B, n), generator=gen).float() / 200
    values, ids = select_topk(scores, k, block=block)
    want = torch.topk(scores, k, dim=1)
    assert torch.equal(values, want.values)
    assert torch.equal(torch.gather(scores, 1, ids), values), "ids must point at their scores"
    for row in ids:
        assert row.unique().numel() == k, "no score is returned twice"


# -- on a GPU -------------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
@needs_triton
@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("batch", [1, 8, 33])
def test_gpu_kernel_at_paper_size(variant, batch, monkeypatch):
    from quari.kernels import scan_triton

    calls = []
    original = scan_triton.fused_scores
    monkeypatch.setattr(
        scan_triton, "fused_scores", lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
    ad, gallery = make_problem(batch, 768, 64, 100_003, variant, torch.bfloat16, seed=batch)
    top = ad.scan([(0, gallery[:60_000]), (60_000, gallery[60_000:])], k=100)
    assert calls, "Adaptation.scan on CUDA must use the kernel for bf16 rows"
    # The QR form in float64 (the dense oracle would need B·N·E doubles here).
    ad64 = Adaptation(ad.refined_query.double(), ad.U.double(), ad.V.double(), ad.variant,
                      ad.anchor_scale)  # fmt: skip
    want = ad64.score(gallery.double()).cpu().numpy()
    assert_topk_matches(top.ids.cpu(), top.scores.cpu(), want, 100, 6e-3)
    monkeypatch.setenv("QUARI_DISABLE_TRITON", "1")
    torch_top = ad.scan([(0, gallery)], k=100)
    # cuBLAS may reduce half products in reduced precision: not bit-for-bit the kernel's sums.
    assert_close(top.scores.cpu(), torch_top.scores.cpu(), 2e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_gpu_graphs_equal_the_eager_pass(variant):
    cfg = HyperNetConfig(embedding_dim=64, rank=8, hidden_dim=32, num_layers=2, num_heads=4,
                         num_steps=3, variant=variant)  # fmt: skip
    model = QuARIModel(cfg).cuda().eval()
    queries = torch.randn(5, 64, device="cuda")
    with torch.inference_mode():
        eager = [model(queries[:b]) for b in (1, 3, 5)]
        model.enable_cuda_graphs((1, 4, 8))
        assert model.cuda_graph_batch_sizes == (1, 4, 8)
        graphed = [model(queries[:b]) for b in (1, 3, 5)]  # 3 and 5 are padded
    for e, g in zip(eager, graphed, strict=True):
        for name in ("refined_query", "U", "V"):
            torch.testing.assert_close(getattr(g, name), getattr(e, name), rtol=1e-5, atol=1e-5)
    bad = queries[:3].clone()
    bad[1, 5] = float("nan")
    with torch.inference_mode(), pytest.raises(QuARIInputError, match=r"row \[1\]"):
        model(bad)  # found by the graph, after its replay
    model.to(torch.float64)
    assert model.cuda_graph_batch_sizes == (), "moving or casting the model drops its graphs"


@pytest.mark.gpu
@gpu
def test_gpu_bf16_graphs_stay_close_to_fp32():
    cfg = HyperNetConfig(embedding_dim=64, rank=8, hidden_dim=32, num_layers=2, num_heads=4,
                         num_steps=3)  # fmt: skip
    model = QuARIModel(cfg).cuda().eval()
    queries = torch.randn(3, 64, device="cuda")
    gallery = torch.nn.functional.normalize(torch.randn(500, 64, device="cuda"), dim=-1)
    with torch.inference_mode():
        eager = model(queries)
        model.enable_cuda_graphs((4,), precision="bf16")
        graphed = model(queries)
    assert graphed.U.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32
    diff = (graphed.score(gallery) - eager.score(gallery)).abs().max()
    assert 0 < diff < 0.05, f"bf16 weights change the scores by {diff}"


def test_missing_triton_means_the_torch_path(monkeypatch):
    from quari.kernels import availability

    monkeypatch.setattr(availability, "_triton_imports", lambda: False)
    assert not triton_available()
    assert select_backend("cuda", torch.bfloat16) == "torch"
    with pytest.raises(RuntimeError, match="needs Triton"):
        select_backend("cuda", torch.bfloat16, "triton")
    ad, gallery = make_problem(1, 16, 4, 40, "paper", torch.float16)
    top = scan_topk(ad, gallery, 3)
    assert_topk_matches(top.ids.cpu(), top.scores.cpu(), oracle(ad, gallery), 3, 1e-3)


def test_graphed_scan_needs_a_cuda_gallery():
    from quari.kernels.graphs import GraphedScan

    with pytest.raises(RuntimeError, match="CUDA device"):
        GraphedScan(torch.zeros(10, 16, dtype=torch.bfloat16), k=3, rank=4)


@pytest.mark.gpu
@gpu
@needs_triton
@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_gpu_graphed_scan_equals_scan(variant):
    from quari.kernels.graphs import GraphedScan

    ad, gallery = make_problem(4, 768, 64, 50_021, variant, torch.bfloat16, seed=7)
    alpha = ad.anchor_scale
    scan = GraphedScan(gallery, k=100, rank=64, variant=variant, batch_sizes=(1, 4))
    one = Adaptation(ad.refined_query[:1], ad.U[:1], ad.V[:1], variant, alpha)
    fresh = Adaptation.random(4, 768, 64, variant, seed=3, anchor_scale=alpha or 0.8).to("cuda")
    for batch in (ad, one, fresh):  # the third call replays the size-4 graph on new inputs
        got = scan(batch)
        want = scan_topk(batch, gallery, 100)
        assert_close(got.scores.cpu(), want.scores.cpu(), 1e-5)
        assert (got.ids == want.ids).float().mean() > 0.99  # ties may swap
    other = Adaptation.random(2, 768, 64, variant).to("cuda")
    with pytest.raises(QuARIInputError, match="batch sizes"):
        scan(other)
    bad = gallery.clone()
    bad[123, 4] = float("nan")
    with pytest.raises(QuARIInputError, match="gallery row 123"):
        GraphedScan(bad, k=10, rank=64, variant=variant)(one)
