"""GPU benchmark of the adaptive scan and the hypernetwork: one short run, all the numbers.

In one process, on one GPU (about 3 minutes on an H100/H200, setup included):

1. ceilings: device copy bandwidth (read + write), read-only bandwidth, bf16 GEMM 8192³;
2. hypernetwork latency (E 768, H 512, 4 layers, 4 steps, r 64) at batch 1 / 32 / 256, eager
   and as CUDA graphs, and whether the graphs reproduce the eager outputs;
3. the torch path of ``Adaptation.scan`` (half GEMM with fp32 output + epilogue + top-k);
4. correctness of the fused kernel on fresh random data (never zeros), ragged sizes, both
   variants, fp16 and bf16: scores against the torch path and a float64 oracle, top-k ids and
   scores, NaN rows named by global id — PASS/FAIL, recorded, never fatal;
5. the fused kernel at N = 1M and 10M, B = 1, 8, 32, 128 (paper variant, E 768, r 64, bf16,
   top-1000), split into kernel and top-k; the reference variant at N = 10M;
6. a sweep of tile configurations at N = 10M (scores only), each validated first.

Floors per query: bytes = N·E·2 / copy bandwidth / B (the gallery is read once for all B
queries); FLOPs = 2·N·E·r / bf16 GEMM rate (per query, whatever B). Targets: scan ≤ 1.3× max
(bytes, FLOPs) at B ≥ 8 and ≤ 1.5× bytes at B = 1; hypernetwork batch 1 ≤ 0.7 ms.

Every section runs under try/except and the JSON is rewritten after each, so a failure or a
timeout still leaves everything measured before it. Usage, from the repository root::

    PYTHONPATH=src python3 benchmarks/gpu_scan.py             # the GPU run
    PYTHONPATH=src python3 benchmarks/gpu_scan.py --cpu-smoke # tiny sizes, Triton interpreter

Writes ``benchmarks/results/gpu_scan.json`` (or ``--out``) and, when the environment variable
OUT is set, ``$OUT/gpu_scan.json`` too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

START = time.perf_counter()
RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


@dataclass
class Plan:
    """Sizes of one run."""

    dim: int = 768
    rank: int = 64
    k: int = 1000
    sizes: tuple[int, ...] = (1_000_000, 10_000_000)
    batches: tuple[int, ...] = (1, 8, 32, 128)
    reference_batches: tuple[int, ...] = (1, 32)
    hyper_batches: tuple[int, ...] = (1, 32, 256)
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    steps: int = 4
    copy_bytes: int = 2 << 30
    gemm_n: int = 8192
    check_shapes: tuple = (
        # (variant, dtype, B, E, r, N): ragged N, padded query groups, fp16 and bf16
        ("paper", "bfloat16", 1, 768, 64, 4097),
        ("paper", "bfloat16", 8, 768, 64, 100_003),
        ("paper", "float16", 3, 768, 64, 77_777),
        ("paper", "bfloat16", 33, 768, 64, 50_001),
        ("paper", "bfloat16", 128, 768, 64, 20_011),
        ("paper", "bfloat16", 4, 48, 8, 1000),
        ("reference", "bfloat16", 1, 768, 64, 30_011),
        ("reference", "bfloat16", 5, 768, 64, 50_001),
        ("reference", "float16", 2, 768, 64, 9_999),
    )
    sweep_check_rows: int = 20_011
    budget_s: float = 300.0  # past this, optional sections are skipped
    min_reps: int = 3
    bench_s: float = 1.0  # time spent repeating one measurement, at most (min_reps first)

    @classmethod
    def smoke(cls) -> Plan:
        return cls(
            dim=64,
            rank=16,
            k=50,
            sizes=(3000, 7001),
            batches=(1, 8),
            reference_batches=(3,),
            hyper_batches=(1, 4),
            hidden=32,
            layers=1,
            heads=4,
            steps=2,
            copy_bytes=8 << 20,
            gemm_n=256,
            check_shapes=(
                ("paper", "bfloat16", 1, 64, 16, 777),
                ("paper", "float16", 5, 48, 8, 1000),
                ("reference", "bfloat16", 3, 64, 16, 555),
            ),
            sweep_check_rows=301,
            min_reps=1,
            bench_s=0.0,
        )


def sweep_configs(batch: int, smoke: bool):
    """Tile configurations tried at one batch size (paper variant, r = 64)."""
    from quari.kernels.scan_triton import KernelConfig as K

    if smoke:
        return [K(32, 32, 1, 4, 2), K(64, 16, 0, 4, 2, tma=True), K(32, 32, 0, 4, 2, True, 2)]
    if batch == 1:
        return [
            K(128, 64, 1, 4, 4, tma=True),  # default: 90 registers, 2 programs per SM
            K(256, 64, 1, 8, 3, tma=True),
            K(128, 64, 1, 4, 4, True, 2, tma=True),
            K(128, 64, 1, 4, 4),  # pointer loads: 156 registers, 98 KiB shared
            K(128, 64, 1, 4, 3),
            K(256, 64, 1, 8, 3),
            K(128, 128, 1, 4, 3),
            K(128, 64, 1, 4, 4, True, 2),
        ]
    return [
        K(128, 64, 4, 8, 3, tma=True),  # default: the 128×256 tensor-core tile, 160 registers
        K(128, 64, 4, 8, 4, tma=True),
        K(128, 64, 2, 8, 3, tma=True),  # 128 columns, 90 registers: 2 programs per SM
        K(128, 64, 4, 8, 3, True, 1, tma=True),
        K(128, 64, 4, 8, 3),  # pointer loads
        K(128, 64, 4, 8, 4),
        K(128, 64, 2, 8, 3),
        K(256, 64, 2, 8, 3),
        K(128, 64, 4, 8, 3, True, 1),
    ]


class Bench:
    """Timing and bookkeeping shared by the sections."""

    def __init__(self, plan: Plan, out_paths: list[Path], cuda: bool) -> None:
        import torch

        self.torch = torch
        self.plan, self.paths, self.cuda = plan, out_paths, cuda
        self.device = torch.device("cuda" if cuda else "cpu")
        self.results: dict = {
            "meta": {},
            "ceilings": {},
            "hypernet": [],
            "checks": [],
            "scan": [],
            "reference": [],
            "sweep": [],
            "errors": [],
            "skipped": [],
        }

    # -- bookkeeping --------------------------------------------------------------------------
    def save(self) -> None:
        self.results["meta"]["elapsed_s"] = round(time.perf_counter() - START, 1)
        text = json.dumps(self.results, indent=1, default=str)
        for path in self.paths:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            except OSError as exc:
                log(f"could not write {path}: {exc}")

    def section(self, name: str, fn: Callable[[], None], optional: bool = False) -> None:
        if optional and self.over_budget():
            self.results["skipped"].append(name)
            log(f"== {name}: skipped (time budget {self.plan.budget_s:.0f} s spent)")
            return
        log(f"== {name}")
        try:
            fn()
        except Exception as exc:
            tb = traceback.format_exc()
            self.results["errors"].append({"section": name, "error": repr(exc), "trace": tb})
            log(f"!! {name} failed: {exc!r}")
            print(tb[-3000:], flush=True)
        finally:
            self.save()
            if self.cuda:
                self.torch.cuda.empty_cache()

    def over_budget(self) -> bool:
        return time.perf_counter() - START > self.plan.budget_s

    def check(self, name: str, ok: bool, **facts) -> bool:
        facts = {k: (float(v) if hasattr(v, "item") else v) for k, v in facts.items()}
        self.results["checks"].append({"check": name, "pass": bool(ok), **facts})
        detail = " ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in facts.items()
        )
        log(f"{'PASS' if ok else 'FAIL'} {name} {detail}")
        return ok

    # -- timing -------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], object], warmup: int = 1, budget_s: float | None = None):
        """Median and min wall time of ``fn`` (device synchronised), in milliseconds."""
        for _ in range(warmup):
            fn()
        self.sync()
        budget = self.plan.bench_s if budget_s is None else budget_s
        times: list[float] = []
        while len(times) < self.plan.min_reps or (sum(times) < budget * 1e3 and len(times) < 50):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), min(times), len(times)


# -- sections ---------------------------------------------------------------------------------
def environment(b: Bench) -> None:
    torch = b.torch
    meta = b.results["meta"]
    meta.update(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda_runtime=torch.version.cuda,
        platform=platform.platform(),
        argv=sys.argv[1:],
        plan={k: v for k, v in vars(b.plan).items() if k != "check_shapes"},
    )
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception as exc:
        meta["triton"] = f"unavailable: {exc!r}"
    from quari.kernels import triton_available

    meta["triton_available"] = triton_available()
    if b.cuda:
        p = torch.cuda.get_device_properties(0)
        meta.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
        )
        try:
            q = "name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu"
            smi = subprocess.run(
                ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            meta["nvidia_smi"] = smi.stdout.strip()
        except Exception as exc:
            meta["nvidia_smi"] = repr(exc)
    log(json.dumps({k: meta[k] for k in meta if k != "plan"}))


def ceilings(b: Bench) -> None:
    torch = b.torch
    n = b.plan.copy_bytes // 2
    src = torch.randn(n, device=b.device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    med, _, _ = b.time_ms(lambda: dst.copy_(src), budget_s=0.5)
    copy_bw = 2 * b.plan.copy_bytes / (med * 1e-3)
    med_r, _, _ = b.time_ms(lambda: torch.sum(src, dtype=torch.float32), budget_s=0.5)
    read_bw = b.plan.copy_bytes / (med_r * 1e-3)
    g = b.plan.gemm_n
    a = torch.randn(g, g, device=b.device, dtype=torch.bfloat16)
    c = torch.randn(g, g, device=b.device, dtype=torch.bfloat16)
    med_g, _, _ = b.time_ms(lambda: torch.mm(a, c), budget_s=0.5)
    gemm = 2 * g**3 / (med_g * 1e-3)
    b.results["ceilings"] = {
        "copy_bytes_per_s": copy_bw,
        "read_bytes_per_s": read_bw,
        "bf16_gemm_flop_per_s": gemm,
        "copy_buffer_bytes": b.plan.copy_bytes,
        "gemm_n": g,
    }
    log(
        f"copy {copy_bw / 1e12:.2f} TB/s (read+write)  read {read_bw / 1e12:.2f} TB/s  "
        f"bf16 GEMM {gemm / 1e12:.0f} TFLOP/s"
    )


def hypernet(b: Bench) -> None:
    torch = b.torch
    from quari import HyperNetConfig, QuARIModel

    p = b.plan
    for variant in ("paper", "reference"):
        cfg = HyperNetConfig(
            embedding_dim=p.dim,
            rank=p.rank,
            hidden_dim=p.hidden,
            num_layers=p.layers,
            num_heads=p.heads,
            num_steps=p.steps,
            variant=variant,
        )
        torch.manual_seed(0)
        model = QuARIModel(cfg).to(b.device).eval()
        batches = p.hyper_batches if variant == "paper" else p.hyper_batches[:1]
        queries = {B: torch.randn(B, p.dim, device=b.device) for B in batches}
        eager = {}
        with torch.inference_mode():
            for B in batches:
                med, best, reps = b.time_ms(
                    lambda q=queries[B], m=model: m(q), warmup=3, budget_s=1
                )
                eager[B] = model(queries[B])
                b.results["hypernet"].append(
                    dict(variant=variant, batch=B, mode="eager", ms=med, min_ms=best, reps=reps)
                )
                log(f"hypernet {variant} batch {B} eager {med:.3f} ms ({med / B:.4f} ms/query)")
        if not b.cuda:
            b.results["skipped"].append(f"hypernet {variant} CUDA graphs (no CUDA)")
            continue
        gallery = torch.nn.functional.normalize(torch.randn(4096, p.dim, device=b.device), dim=-1)
        precisions = ("fp32", "tf32", "bf16") if variant == "paper" else ("fp32",)
        for precision in precisions:
            t0 = time.perf_counter()
            model.enable_cuda_graphs(batches, precision=precision)
            capture_s = time.perf_counter() - t0
            mode = "cuda_graph" if precision == "fp32" else f"cuda_graph_{precision}"
            with torch.inference_mode():
                for B in batches:
                    med, best, reps = b.time_ms(
                        lambda q=queries[B], m=model: m(q), warmup=3, budget_s=1
                    )
                    got = model(queries[B])
                    diff = max(
                        float((getattr(got, n) - getattr(eager[B], n)).abs().max())
                        for n in ("refined_query", "U", "V")
                    )
                    score_diff = float((got.score(gallery) - eager[B].score(gallery)).abs().max())
                    if precision == "fp32":
                        b.check(
                            f"hypernet {variant} batch {B} graph == eager",
                            diff < 1e-4,
                            max_diff=diff,
                        )
                    b.results["hypernet"].append(
                        dict(
                            variant=variant,
                            batch=B,
                            mode=mode,
                            precision=precision,
                            ms=med,
                            min_ms=best,
                            reps=reps,
                            capture_s=capture_s,
                            max_diff_vs_eager=diff,
                            max_score_diff_vs_eager=score_diff,
                        )
                    )
                    log(
                        f"hypernet {variant} batch {B} {mode} {med:.3f} ms ({med / B:.4f} ms/q)"
                        f" factors diff {diff:.2e}, score diff {score_diff:.2e}"
                    )
                    graph = model._cuda_graphs._graphs[B][0]
                    med_r, _, _ = b.time_ms(graph.replay, warmup=3, budget_s=0.5)
                    b.results["hypernet"][-1]["replay_only_ms"] = med_r
                    log(f"hypernet {variant} batch {B} {mode} replay alone {med_r:.3f} ms")
            model.disable_cuda_graphs()


def hypernet_compiled(b: Bench) -> None:
    """torch.compile + CUDA graph at batch 1, in a child process with a time limit (the
    compilation's length is not known in advance and must not eat the run)."""
    limit = max(30.0, min(200.0, b.plan.budget_s - (time.perf_counter() - START)))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hypernet-compiled-child"]
    try:
        child = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        b.results["skipped"].append(f"hypernet compiled: over {limit:.0f} s")
        log(f"hypernet compiled: still compiling after {limit:.0f} s, stopped")
        return
    lines = [x for x in child.stdout.splitlines() if x.startswith("{")]
    if child.returncode or not lines:
        raise RuntimeError(f"child failed ({child.returncode}): {child.stderr[-2000:]}")
    for line in lines:
        row = json.loads(line)
        b.results["hypernet"].append(row)
        if row["precision"] == "fp32":
            b.check(
                "hypernet paper batch 1 compiled graph == eager",
                row["max_diff_vs_eager"] < 1e-3,
                max_diff=row["max_diff_vs_eager"],
            )
        log(
            f"hypernet batch 1 {row['mode']} {row['ms']:.3f} ms (compiling "
            f"{row['capture_s']:.0f} s, score diff {row['max_score_diff_vs_eager']:.1e})"
        )


def hypernet_compiled_child() -> None:
    import torch

    from quari import HyperNetConfig, QuARIModel

    p = Plan()
    cfg = HyperNetConfig(embedding_dim=p.dim, rank=p.rank, hidden_dim=p.hidden,
                         num_layers=p.layers, num_heads=p.heads, num_steps=p.steps)  # fmt: skip
    torch.manual_seed(0)
    model = QuARIModel(cfg).cuda().eval()
    q = torch.randn(1, p.dim, device="cuda")
    with torch.inference_mode():
        eager = model(q)
    gallery = torch.nn.functional.normalize(torch.randn(4096, p.dim, device="cuda"), dim=-1)
    b = Bench(p, [], True)
    for precision in ("fp32", "tf32", "bf16"):
        t0 = time.perf_counter()
        model.enable_cuda_graphs((1,), compile=True, precision=precision)
        capture_s = time.perf_counter() - t0
        with torch.inference_mode():
            med, best, reps = b.time_ms(lambda: model(q), warmup=3, budget_s=1)
            got = model(q)
            score_diff = float((got.score(gallery) - eager.score(gallery)).abs().max())
        diff = max(
            float((getattr(got, n).float() - getattr(eager, n)).abs().max())
            for n in ("refined_query", "U", "V")
        )
        row = dict(variant="paper", batch=1, mode=f"compiled_cuda_graph_{precision}",
                   precision=precision, ms=med, min_ms=best, reps=reps, capture_s=capture_s,
                   max_diff_vs_eager=diff, max_score_diff_vs_eager=score_diff)  # fmt: skip
        print(json.dumps(row), flush=True)


def make_gallery(b: Bench, rows: int, dim: int, dtype, seed: int):
    """Random rows of norm ~1 (never zeros), generated on the device in slices."""
    torch = b.torch
    gen = torch.Generator(device=b.device).manual_seed(seed)
    out = torch.empty(rows, dim, device=b.device, dtype=dtype)
    step = 1 << 20
    for s in range(0, rows, step):
        n = min(step, rows - s)
        out[s : s + n] = torch.randn(n, dim, device=b.device, generator=gen) / dim**0.5
    return out


def random_adaptation(b: Bench, B: int, variant: str, seed: int, dim: int, rank: int):
    from quari import Adaptation

    return Adaptation.random(B, dim, rank, variant, seed=seed).to(b.device)


def oracle_scores(ad, gallery):
    """float64 scores by the QR form (a dense E×E oracle would need B·N·E doubles)."""
    from quari import Adaptation

    ad64 = Adaptation(
        ad.refined_query.double(), ad.U.double(), ad.V.double(), ad.variant, ad.anchor_scale
    )
    return ad64.score(gallery.double())


def topk_errors(top, want, k):
    """(score error vs the oracle's sorted top-k, error of the oracle at the returned ids,
    duplicate-id count, ids out of range)."""
    torch = sys.modules["torch"]
    kk = min(k, want.shape[1])
    best = torch.topk(want, kk, dim=1).values.float()
    err_sorted = float((top.scores.float() - best).abs().max())
    in_range = bool(((top.ids >= 0) & (top.ids < want.shape[1])).all())
    at_ids = torch.gather(want, 1, top.ids.clamp(0, want.shape[1] - 1)).float()
    err_ids = float((at_ids - top.scores.float()).abs().max())
    dup = sum(int(len(set(r.tolist())) != len(r)) for r in top.ids)
    return err_sorted, err_ids, dup, in_range


def correctness(b: Bench) -> None:
    torch = b.torch
    from quari import QuARIInputError
    from quari.kernels import scan_topk
    from quari.kernels.scan import torch_scores
    from quari.kernels.scan_triton import fused_scores

    tol_oracle = {"bfloat16": 6e-3, "float16": 1.5e-3}
    for i, (variant, dtype_name, B, E, r, N) in enumerate(b.plan.check_shapes):
        name = f"{variant} {dtype_name} B{B} E{E} r{r} N{N}"
        try:
            dtype = getattr(torch, dtype_name)
            ad = random_adaptation(b, B, variant, 100 + i, E, r)
            gallery = make_gallery(b, N, E, dtype, seed=200 + i)
            out = torch.full((B, N), float("nan"), device=b.device)  # poisoned
            scores = fused_scores(gallery, ad, out=out)
            b.sync()
            written = bool(torch.isfinite(scores).all())
            ref = torch_scores(ad, gallery, None)
            want = oracle_scores(ad, gallery)
            d_path = float((scores - ref).abs().max())
            d_oracle = float((scores.double() - want).abs().max())
            # The torch path may differ by more than fp32 rounding where cuBLAS uses reduced-
            # precision reductions for half inputs; the fp64 oracle is the real judge.
            b.check(
                f"scores {name}",
                written and d_path < 2e-3 and d_oracle < tol_oracle[dtype_name],
                all_written=written,
                vs_torch_path=d_path,
                vs_fp64=d_oracle,
                tol_fp64=tol_oracle[dtype_name],
            )
            # Top-k through Adaptation.scan's dispatch, over ragged chunks.
            cut = [0, N // 3, N // 3 + 1, N]
            chunks = [(a, gallery[a:c]) for a, c in itertools.pairwise(cut)]
            for k in (1, 100, N + 5) if N < 5000 else (1, 100):
                top = scan_topk(ad, chunks, k, backend="triton", fallback=False)
                e_sorted, e_ids, dup, in_range = topk_errors(top, want, k)
                tol = tol_oracle[dtype_name]
                b.check(
                    f"top-{k} {name}",
                    e_sorted < tol and e_ids < tol and dup == 0 and in_range,
                    vs_fp64_sorted=e_sorted,
                    vs_fp64_at_ids=e_ids,
                    duplicate_rows=dup,
                    ids_in_range=in_range,
                )
        except Exception as exc:
            b.check(f"scores/top-k {name}", False, error=repr(exc)[:300])
    # Dispatch: Adaptation.scan on CUDA uses the kernel for bf16 rows, the torch path when
    # QUARI_DISABLE_TRITON is set; both agree.
    from quari.kernels import scan_triton

    original = scan_triton.fused_scores
    calls: list[int] = []

    def counting(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    try:
        ad = random_adaptation(b, 4, "paper", 7, b.plan.dim, b.plan.rank)
        gallery = make_gallery(b, 30_001, b.plan.dim, torch.bfloat16, seed=7)
        scan_triton.fused_scores = counting
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback is a failure here
            top = ad.scan([(0, gallery)], k=50)
        scan_triton.fused_scores = original
        os.environ["QUARI_DISABLE_TRITON"] = "1"
        try:
            top_torch = ad.scan([(0, gallery)], k=50)
        finally:
            del os.environ["QUARI_DISABLE_TRITON"]
        diff = float((top.scores - top_torch.scores).abs().max())
        used = bool(calls) or not b.cuda  # on CPU, Adaptation.scan keeps its exact path
        b.check("dispatch: kernel on CUDA, torch with QUARI_DISABLE_TRITON", used and diff < 2e-3,
                kernel_calls=len(calls), max_score_diff=diff)  # fmt: skip
    except Exception as exc:
        b.check("dispatch", False, error=repr(exc)[:300])
    finally:
        scan_triton.fused_scores = original
    # A NaN row is named by its global id.
    try:
        ad = random_adaptation(b, 2, "reference", 8, b.plan.dim, b.plan.rank)
        gallery = make_gallery(b, 5000, b.plan.dim, torch.bfloat16, seed=8)
        gallery[3210, 17] = float("nan")
        try:
            scan_topk(ad, [(0, gallery[:3000]), (3000, gallery[3000:])], 5, backend="triton")
            b.check("NaN row named by global id", False, error="no error raised")
        except QuARIInputError as exc:
            b.check("NaN row named by global id", "gallery row 3210" in str(exc), message=str(exc))
    except Exception as exc:
        b.check("NaN row named by global id", False, error=repr(exc)[:300])


def floors(b: Bench, N: int, B: int, columns: int) -> tuple[float, float]:
    """(bytes floor, FLOP floor) in ms per query."""
    c = b.results["ceilings"]
    bytes_floor = N * b.plan.dim * 2 / c["copy_bytes_per_s"] / B * 1e3
    flop_floor = 2 * N * b.plan.dim * columns / c["bf16_gemm_flop_per_s"] * 1e3
    return bytes_floor, flop_floor


def scan_rows(b: Bench, gallery, variant: str, batches, table: str) -> None:
    """Times the torch path and the kernel (end to end, kernel only, top-k only)."""
    torch = b.torch
    from quari.kernels import scan_topk
    from quari.kernels.graphs import GraphedScan
    from quari.kernels.scan import select_topk
    from quari.kernels.scan_triton import COMPILED, fused_scores, resolve_config

    p = b.plan
    for N in p.sizes if table == "scan" else p.sizes[-1:]:
        view = gallery[:N]
        for B in batches:
            ad = random_adaptation(b, B, variant, seed=N % 997 + B, dim=p.dim, rank=p.rank)
            t0 = time.perf_counter()
            ad.plan  # noqa: B018 - the QR form, once per adaptation
            b.sync()
            proj_ms = (time.perf_counter() - t0) * 1e3
            columns = p.rank if variant == "paper" else 2 * p.rank + 1
            fb, ff = floors(b, N, B, p.rank)
            row = dict(variant=variant, N=N, B=B, k=p.k, projection_ms=proj_ms)
            row.update(floor_bytes_ms_per_query=fb, floor_flops_ms_per_query=ff)
            row["floor_ms_per_query"] = max(fb, ff) if B > 1 else fb
            if variant == "reference":  # its projection has 2r + 1 columns
                row["floor_flops_2r1_ms_per_query"] = ff * columns / p.rank
            default = resolve_config(None, ad)
            # The kernel with its default configuration; should that fail, its pointer-load
            # version (what Adaptation.scan falls back to), so the table still has a number.
            kernel_cfgs = [default] + ([replace(default, tma=False)] if default.tma else [])
            for backend, cfg in [("torch", None)] + [("triton", c) for c in kernel_cfgs]:
                if f"{backend}_ms" in row:
                    break
                try:
                    med, _, reps = b.time_ms(
                        lambda ad=ad, v=view, be=backend, c=cfg: scan_topk(
                            ad, v, p.k, backend=be, config=c, fallback=False
                        )
                    )
                    row[f"{backend}_ms"] = med
                    row[f"{backend}_ms_per_query"] = med / B
                    row[f"{backend}_reps"] = reps
                    if cfg is not None:
                        row["kernel_config"] = cfg.describe()
                except Exception as exc:
                    key = f"{backend}_error" + (f"_{cfg.describe()}" if cfg else "")
                    row[key] = repr(exc)[:500]
                    log(f"!! {table} {backend} N={N} B={B}: {exc!r}")
            cfg = next((c for c in kernel_cfgs if c.describe() == row.get("kernel_config")), None)
            try:  # the kernel alone, and torch.topk on its scores
                if cfg is None:
                    raise RuntimeError("no kernel configuration ran")
                scores = torch.empty(B, N, device=b.device)
                med_k, _, _ = b.time_ms(
                    lambda v=view, ad=ad, s=scores, c=cfg: fused_scores(v, ad, out=s, config=c)
                )
                # The selection scan_topk uses (block maxima), and one radix select.
                med_t, _, _ = b.time_ms(lambda s=scores: select_topk(s, p.k))
                med_r, _, _ = b.time_ms(lambda s=scores: torch.topk(s, p.k, dim=1))
                row.update(kernel_only_ms_per_query=med_k / B, topk_only_ms_per_query=med_t / B,
                           radix_topk_ms_per_query=med_r / B)  # fmt: skip
                row["kernel_tflops"] = 2 * N * p.dim * columns * B / (med_k * 1e-3) / 1e12
                row["kernel_read_tb_per_s"] = N * p.dim * 2 / (med_k * 1e-3) / 1e12
                kern = COMPILED.get((cfg, variant == "reference", view.dtype, p.dim))
                if kern is not None:
                    row.update(
                        registers=getattr(kern, "n_regs", None),
                        spills=getattr(kern, "n_spills", None),
                        shared=getattr(kern.metadata, "shared", None),
                    )
            except Exception as exc:
                row["kernel_only_error"] = repr(exc)[:500]
            try:  # the same scan replayed as a CUDA graph (GraphedScan): no host work
                graphed = GraphedScan(view, p.k, rank=p.rank, variant=variant, batch_sizes=(B,))
                med_g, _, _ = b.time_ms(lambda g=graphed, ad=ad: g(ad))
                row["graphed_ms_per_query"] = med_g / B
                row["graphed_ratio_to_floor"] = med_g / B / row["floor_ms_per_query"]
                del graphed
            except Exception as exc:
                row["graphed_error"] = repr(exc)[:500]
                log(f"!! {table} graphed N={N} B={B}: {exc!r}")
            if "triton_ms_per_query" in row:
                row["ratio_to_floor"] = row["triton_ms_per_query"] / row["floor_ms_per_query"]
                if variant == "paper":
                    limit = 1.5 if B == 1 else 1.3
                    row["target"] = limit
                    row["meets_target"] = row["ratio_to_floor"] <= limit
                    row["graphed_meets_target"] = row.get("graphed_ratio_to_floor", 99) <= limit
            b.results[table].append(row)
            log(
                f"{table} {variant} N={N:>9,} B={B:>3}: torch "
                f"{row.get('torch_ms_per_query', float('nan')):.3f} kernel "
                f"{row.get('triton_ms_per_query', float('nan')):.3f} ms/q "
                f"(kernel only {row.get('kernel_only_ms_per_query', float('nan')):.3f}, top-k "
                f"{row.get('topk_only_ms_per_query', float('nan')):.3f}, radix "
                f"{row.get('radix_topk_ms_per_query', float('nan')):.3f}; graphed "
                f"{row.get('graphed_ms_per_query', float('nan')):.3f}); floor "
                f"{row['floor_ms_per_query']:.3f} (bytes {fb:.3f}, FLOPs {ff:.3f})"
            )
            b.save()


def gemm_shapes(b: Bench) -> None:
    """cuBLAS on the scan's own GEMM shape: (rows × E) · (E × B·r), bf16 in, fp32 out."""
    torch = b.torch
    p = b.plan
    rows = 262_144 if b.cuda else 2048
    g = make_gallery(b, rows, p.dim, torch.bfloat16, seed=5)
    out = []
    for B in p.batches:
        w = torch.randn(p.dim, B * p.rank, device=b.device, dtype=torch.bfloat16)
        try:
            med, _, _ = b.time_ms(lambda w=w: torch.mm(g, w, out_dtype=torch.float32))
        except (RuntimeError, TypeError):
            med, _, _ = b.time_ms(lambda w=w: torch.mm(g, w))
        tflops = 2 * rows * p.dim * B * p.rank / (med * 1e-3) / 1e12
        out.append(dict(B=B, rows=rows, ms=med, tflops=tflops))
        log(f"cuBLAS scan-shaped GEMM B={B}: {tflops:.0f} TFLOP/s")
    b.results["ceilings"]["scan_shaped_gemm"] = out


def sweep(b: Bench, gallery) -> None:
    torch = b.torch
    from quari.kernels.scan import torch_scores
    from quari.kernels.scan_triton import COMPILED, fused_scores, resolve_config

    p = b.plan
    N = p.sizes[-1]
    view = gallery[:N]
    for B in p.batches:
        ad = random_adaptation(b, B, "paper", seed=300 + B, dim=p.dim, rank=p.rank)
        check_rows = make_gallery(b, p.sweep_check_rows, p.dim, torch.bfloat16, seed=400 + B)
        ref = torch_scores(ad, check_rows, None)
        want = oracle_scores(ad, check_rows)
        scores = torch.empty(B, N, device=b.device)
        for cfg in sweep_configs(B, not b.cuda):
            if b.over_budget():
                b.results["skipped"].append(f"sweep B={B} {cfg.describe()}")
                continue
            row = dict(B=B, N=N, config=cfg.describe())
            try:
                cfg = resolve_config(cfg, ad)
                got = fused_scores(check_rows, ad, config=cfg)
                diff = float((got - ref).abs().max())
                row["max_diff_vs_torch_path"] = diff
                row["max_diff_vs_fp64"] = float((got.double() - want).abs().max())
                row["valid"] = diff < 2e-3 and row["max_diff_vs_fp64"] < 6e-3
                if row["valid"]:
                    med, best, reps = b.time_ms(
                        lambda c=cfg, ad=ad, s=scores: fused_scores(view, ad, out=s, config=c)
                    )
                    row.update(ms=med, min_ms=best, reps=reps, ms_per_query=med / B)
                    row["tflops"] = 2 * N * p.dim * p.rank * B / (med * 1e-3) / 1e12
                    row["read_tb_per_s"] = N * p.dim * 2 / (med * 1e-3) / 1e12
                    fb, ff = floors(b, N, B, p.rank)
                    row["ratio_to_floor_kernel_only"] = (med / B) / (max(fb, ff) if B > 1 else fb)
                kern = COMPILED.get((cfg, False, view.dtype, p.dim))
                if kern is not None:
                    row.update(registers=getattr(kern, "n_regs", None),
                               spills=getattr(kern, "n_spills", None),
                               shared=getattr(kern.metadata, "shared", None))  # fmt: skip
            except Exception as exc:
                row["error"] = repr(exc)[:500]
            b.results["sweep"].append(row)
            log(
                f"sweep B={B:>3} {row['config']:<18} "
                + (
                    f"{row['ms_per_query']:.4f} ms/q {row['tflops']:.0f} TFLOP/s "
                    f"{row['read_tb_per_s']:.2f} TB/s x{row['ratio_to_floor_kernel_only']:.2f}"
                    if "ms" in row
                    else f"{'INVALID' if row.get('valid') is False else 'ERROR'} "
                    f"{row.get('error', row.get('max_diff_vs_torch_path'))}"
                )
            )


def summary(b: Bench) -> None:
    r = b.results
    print("\n" + "=" * 100, flush=True)
    c = r["ceilings"]
    if c:
        print(
            f"ceilings: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write), read "
            f"{c['read_bytes_per_s'] / 1e12:.2f} TB/s, bf16 GEMM "
            f"{c['bf16_gemm_flop_per_s'] / 1e12:.0f} TFLOP/s  [{r['meta'].get('gpu', 'cpu')}]"
        )
    head = (
        f"{'variant':<9} {'N':>10} {'B':>4} | {'torch':>8} {'kernel':>8} {'k-only':>8} "
        f"{'top-k':>7} {'radix':>7} {'graphed':>8} | {'bytes fl':>8} {'FLOP fl':>8} | "
        f"{'ratio':>5} {'graphed':>7} {'target':>6}"
    )
    print("scan, ms per query (top-1000, bf16 gallery, E 768, r 64):")
    print(head)
    for row in r["scan"] + r["reference"]:

        def f(key, row=row):
            v = row.get(key)
            return f"{v:8.3f}" if isinstance(v, float) else f"{'—':>8}"

        ratio = row.get("ratio_to_floor")
        target = row.get("target")
        met = row.get("meets_target") or row.get("graphed_meets_target")
        status = ("ok" if met else "MISS") if target else ""
        print(
            f"{row['variant']:<9} {row['N']:>10,} {row['B']:>4} | {f('torch_ms_per_query')} "
            f"{f('triton_ms_per_query')} {f('kernel_only_ms_per_query')} "
            f"{row.get('topk_only_ms_per_query', float('nan')):7.3f} "
            f"{row.get('radix_topk_ms_per_query', float('nan')):7.3f} "
            f"{f('graphed_ms_per_query')} | "
            f"{f('floor_bytes_ms_per_query')} {f('floor_flops_ms_per_query')} | "
            f"{ratio if ratio is not None else float('nan'):5.2f} "
            f"{row.get('graphed_ratio_to_floor', float('nan')):7.2f} "
            f"{(f'≤{target}' if target else ''):>6} {status}"
        )
    if r["sweep"]:
        print("sweep (N = largest, kernel only), best per batch:")
        for B in sorted({row["B"] for row in r["sweep"]}):
            rows = [x for x in r["sweep"] if x["B"] == B and "ms" in x]
            if rows:
                best = min(rows, key=lambda x: x["ms"])
                print(
                    f"  B={B:>3}: {best['config']:<18} {best['ms_per_query']:.4f} ms/q "
                    f"({best['tflops']:.0f} TFLOP/s, {best['read_tb_per_s']:.2f} TB/s, "
                    f"x{best['ratio_to_floor_kernel_only']:.2f} of floor)"
                )
    if r["hypernet"]:
        print("hypernetwork latency (ms per call):")
        for h in r["hypernet"]:
            target = ""
            if h["variant"] == "paper" and h["batch"] == 1 and h["mode"].startswith("cuda_graph"):
                target = "ok (≤0.7)" if h["ms"] <= 0.7 else "MISS (>0.7)"
            print(
                f"  {h['variant']:<9} batch {h['batch']:>3} {h['mode']:<16} {h['ms']:8.3f} "
                f"score diff {h.get('max_score_diff_vs_eager', 0):.1e} {target}"
            )
    fails = [x for x in r["checks"] if not x["pass"]]
    print(f"checks: {len(r['checks']) - len(fails)} PASS, {len(fails)} FAIL")
    for x in fails:
        print(
            f"  FAIL {x['check']}: { {k: v for k, v in x.items() if k not in ('check', 'pass')} }"
        )
    for e in r["errors"]:
        print(f"ERROR in {e['section']}: {e['error']}")
    if r["skipped"]:
        print(f"skipped: {r['skipped']}")
    print(f"elapsed {time.perf_counter() - START:.0f} s; JSON: {', '.join(map(str, b.paths))}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_scan.json")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (interpreter)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the configuration sweep")
    ap.add_argument("--budget", type=float, default=None, help="seconds before optional parts stop")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile section")
    ap.add_argument("--hypernet-only", action="store_true", help="only the hypernetwork sections")
    ap.add_argument("--hypernet-compiled-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hypernet_compiled_child:
        hypernet_compiled_child()
        return 0
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("no CUDA device: run with --cpu-smoke for a tiny CPU run", flush=True)
        return 2
    plan = Plan() if cuda else Plan.smoke()
    if args.budget is not None:
        plan.budget_s = args.budget
    paths = [args.out]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / "gpu_scan.json")
    b = Bench(plan, paths, cuda)
    if args.cpu_smoke:
        _interpreter_numpy_compat()
    b.section("environment", lambda: environment(b))
    b.section("ceilings", lambda: ceilings(b))
    b.section("hypernetwork", lambda: hypernet(b))
    if args.hypernet_only:
        if cuda and not args.no_compile:
            b.section("hypernetwork, torch.compile + graph", lambda: hypernet_compiled(b), True)
        summary(b)
        b.save()
        return 0
    holder: dict = {}

    def build_gallery():
        t0 = time.perf_counter()
        holder["g"] = make_gallery(b, max(plan.sizes), plan.dim, torch.bfloat16, seed=1)
        b.sync()
        log(f"gallery {tuple(holder['g'].shape)} bf16 in {time.perf_counter() - t0:.1f} s")

    b.section("gallery", build_gallery)
    b.section("kernel correctness", lambda: correctness(b))
    if "g" in holder:
        g = holder["g"]
        b.section("scan (paper)", lambda: scan_rows(b, g, "paper", plan.batches, "scan"))
        b.section("scan-shaped cuBLAS GEMM", lambda: gemm_shapes(b), optional=True)
        b.section(
            "scan (reference)",
            lambda: scan_rows(b, g, "reference", plan.reference_batches, "reference"),
            optional=True,
        )
    if cuda and not args.no_compile:
        b.section("hypernetwork, torch.compile + graph", lambda: hypernet_compiled(b), True)
    if "g" in holder and not args.no_sweep:
        b.section("configuration sweep", lambda: sweep(b, holder["g"]), optional=True)
    summary(b)
    b.save()
    return 0


def _interpreter_numpy_compat() -> None:
    """Triton 3.6's interpreter calls int() on 1-element arrays (an error since NumPy 2.4)."""
    try:
        import triton.runtime.interpreter as interp
    except Exception:
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


if __name__ == "__main__":
    sys.exit(main())
