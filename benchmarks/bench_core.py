"""Core engine benchmark: hypernetwork latency, re-ranking, and the exact factored scan.

Measures, on this machine and in one run (so the ratios compare like with like):

* hypernetwork latency of the paper-sized model (E 768, H 512, 4 layers, 4 steps, r 64) at
  batch 1 / 32 / 256 for each torch thread count, and which count is fastest;
* the CPU runtimes of the hypernetwork (``quari.runtime``) side by side, for both variants:
  the pass before the fold (``transformer_factors``: ``nn.TransformerEncoder`` over
  [ctx; U; V]) beside ``eager`` (the default: folded, prepacked weights — MKL's on Intel CPUs
  at small batches, oneDNN's elsewhere), the same pass with the other library's packs and with
  unpacked weights, ``compile``, ``onnx``, ``bf16`` and ``int8``, and ``fp32`` as chosen on
  this machine (``quari serve``'s default: the faster of eager and onnx per batch size)
  (and the reference implementation with ``--reference-code``), in ms per query at batch
  1 / 32 / 256 and end to end with a re-rank of 1,000 candidates; this CPU's fp32 / bf16
  GEMM rate and the FLOP floor; each reduced-precision runtime's quality guard (top-10
  agreement with fp32 and the largest score error) on the golden fixture and a planted set;
  what ``auto`` and ``fp32`` choose;
* ``Adaptation.rerank`` of 1,000 fp16 candidates per query;
* exact top-k scans over N fp16 gallery rows at B = 1 and 32 queries, per query:
  the factored scan (``Adaptation.scan``), its own projection GEMM alone (fp32 blocks already
  converted, and with the fp16→fp32 upcast), a plain cosine scan (matrix product + top-k), and
  the dense-T form (one E×E matrix per query, as the reference evaluation does).

Usage::

    python benchmarks/bench_core.py            # full sizes (N = 200k and 1M), ~40 min on 2 cores
    python benchmarks/bench_core.py --quick    # tiny sizes, a smoke run
    python benchmarks/bench_core.py --sections runtimes --reference-code ~/src/QuARI

``--sections`` runs a subset; the other sections of an existing ``--out`` file are kept.
``--reference-code DIR``: a checkout of the reference implementation (its
``transformer_hypernetwork.py``), timed with the same weights; nothing of it is copied here.

Writes ``benchmarks/results/bench_core.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import quari
from quari import Adaptation, HyperNetConfig, QuARIModel
from quari.scoring import default_block_rows

RESULTS = Path(__file__).resolve().parent / "results"


# The timer: wall time, or this process's CPU time (``--clock cpu``, with ``--threads 1``: on a
# machine shared with other jobs, CPU time leaves out the time other processes hold the core).
CLOCK = {"clock": time.perf_counter}


def now() -> float:
    return CLOCK["clock"]()


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median time of ``fn`` in milliseconds (wall time unless ``--clock cpu``)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = now()
        fn()
        times.append(now() - t0)
    return statistics.median(times) * 1e3


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "quari": quari.__version__,
    }


def bench_hypernet(cfg: HyperNetConfig, batches: list[int], threads: list[int], repeats: int):
    torch.manual_seed(0)
    model = QuARIModel(cfg).eval()
    rows = []
    for th in threads:
        torch.set_num_threads(th)
        for B in batches:
            q = torch.randn(B, cfg.embedding_dim)
            with torch.inference_mode():
                ms = median_ms(lambda q=q: model(q), repeats if B <= 32 else max(1, repeats - 1))
            rows.append({"batch": B, "threads": th, "ms": ms, "queries_per_s": B / ms * 1e3})
            print(f"  hypernet  batch {B:4d}  threads {th}  {ms:9.2f} ms  {B / ms * 1e3:8.1f} q/s")
    best = {}
    for row in rows:
        if row["batch"] not in best or row["ms"] < best[row["batch"]]["ms"]:
            best[row["batch"]] = row
    return rows, [best[b] for b in batches]


def block_loop(gallery: np.ndarray, block_rows: int, per_block: Callable[[torch.Tensor], object]):
    """Runs ``per_block`` on fp32 copies of successive gallery blocks (one reused buffer)."""
    buf = torch.empty(block_rows, gallery.shape[1])
    for start in range(0, gallery.shape[0], block_rows):
        part = torch.from_numpy(gallery[start : start + block_rows])
        block = buf[: part.shape[0]]
        block.copy_(part)
        per_block(block)


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Prints rows as a markdown table; columns are (header, key, format)."""
    print(f"\n{title}\n| " + " | ".join(h for h, _, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(format(row[key], fmt) for _, key, fmt in columns) + " |")


def topk_merge(state: list, scores: torch.Tensor, offset: int, k: int) -> None:
    """Keeps the running top-k of (n, B) block scores in ``state`` = [scores, ids]."""
    top = torch.topk(scores, min(k, scores.shape[0]), dim=0)
    s = torch.cat([state[0], top.values.T], 1)
    i = torch.cat([state[1], top.indices.T + offset], 1)
    keep = torch.topk(s, min(k, s.shape[1]), dim=1)
    state[0], state[1] = keep.values, torch.gather(i, 1, keep.indices)


def plain_scan(gallery: np.ndarray, q: torch.Tensor, k: int, block_rows: int):
    state = [torch.empty(q.shape[0], 0), torch.empty(q.shape[0], 0, dtype=torch.long)]
    offset = [0]

    def step(block):
        topk_merge(state, block @ q.T, offset[0], k)
        offset[0] += block.shape[0]

    block_loop(gallery, block_rows, step)
    return state


def dense_scan(gallery: np.ndarray, ad: Adaptation, b: int, k: int, block_rows: int):
    """The dense-T form for query b: d′ = T d for every row (E×E per query), then cosine."""
    T = ad.dense()[b]
    q = ad.refined_query[b]
    state = [torch.empty(1, 0), torch.empty(1, 0, dtype=torch.long)]
    offset = [0]

    def step(block):
        td = block @ T.T
        s = (td @ q) / torch.linalg.vector_norm(td, dim=-1).clamp_min(1e-12)
        topk_merge(state, s[:, None], offset[0], k)
        offset[0] += block.shape[0]

    block_loop(gallery, block_rows, step)
    return state


def bench_scan(gallery: np.ndarray, gallery32: torch.Tensor, B: int, variant: str, args) -> dict:
    E, r, k = gallery.shape[1], args.rank, args.k
    ad = Adaptation.random(B, E, r, variant, seed=B)
    cols = ad.plan.projection.flat
    # Same block size as the scan's default, so the GEMM below is the scan's own.
    block_rows = default_block_rows(E, cols.shape[1])
    reps = args.repeats

    def scan():
        # A fresh Adaptation each call, so the per-query QR set-up (its plan) is counted too.
        return ad.detach().scan([(0, gallery)], k)

    scan_ms = median_ms(scan, reps)

    def gemm_only():
        for s in range(0, gallery32.shape[0], block_rows):
            gallery32[s : s + block_rows] @ cols

    gemm_ms = median_ms(gemm_only, reps)
    gemm_upcast_ms = median_ms(lambda: block_loop(gallery, block_rows, lambda x: x @ cols), reps)
    plain_ms = median_ms(lambda: plain_scan(gallery, ad.refined_query, k, block_rows), reps)
    n_dense = min(B, args.dense_queries)
    dense_each = [
        median_ms(lambda b=b: dense_scan(gallery, ad, b, k, block_rows), 1, warmup=0)
        for b in range(n_dense)
    ]
    dense_ms = statistics.median(dense_each)  # per query: the dense form shares nothing
    row = {
        "N": gallery.shape[0],
        "B": B,
        "variant": variant,
        "projection_columns": cols.shape[1],
        "block_rows": block_rows,
        "scan_ms_per_query": scan_ms / B,
        "gemm_ms_per_query": gemm_ms / B,
        "gemm_with_upcast_ms_per_query": gemm_upcast_ms / B,
        "plain_cosine_ms_per_query": plain_ms / B,
        "dense_T_ms_per_query": dense_ms,
        "dense_T_queries_timed": n_dense,
    }
    row["dense_over_scan"] = row["dense_T_ms_per_query"] / row["scan_ms_per_query"]
    row["scan_over_gemm"] = scan_ms / gemm_ms
    row["scan_over_gemm_with_upcast"] = scan_ms / gemm_upcast_ms
    row["scan_over_plain"] = scan_ms / plain_ms
    print(f"  scan  N {row['N']:,}  B {B}  {variant}: {row['scan_ms_per_query']:.2f} ms/query")
    return row


def bench_rerank(E: int, r: int, M: int, batches: list[int], repeats: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for B in batches:
        for variant in ("paper", "reference"):
            ad = Adaptation.random(B, E, r, variant, seed=7)
            vecs = rng.standard_normal((B, M, E), dtype=np.float32).astype(np.float16)
            ids = np.tile(np.arange(M), (B, 1))
            ms = median_ms(lambda ad=ad, ids=ids, vecs=vecs: ad.rerank(ids, vecs, 100), repeats)
            rows.append({"B": B, "M": M, "variant": variant, "ms_per_query": ms / B})
            print(f"  rerank  {M} candidates  B {B:3d}  {variant:9s}  {ms / B:8.3f} ms/query")
    return rows


# -- CPU runtimes of the hypernetwork ----------------------------------------------------------
BEFORE = "before (nn.TransformerEncoder)"
UNPACKED = "eager, unpacked weights"
OTHER_PACKS = "eager, {} packs"  # the packing library the default does not pick on this CPU
REFERENCE_IMPL = "reference implementation"
SERVED = "fp32 (quari serve's default)"  # the faster exact runtime per batch size, as chosen


def gemm_rates(n: int = 2048, repeats: int = 5) -> dict:
    """GFLOP/s of an n×n×n matrix product in fp32 and bf16 at the current thread count."""
    return {
        dtype: 2 * n**3 / (median_ms(job, repeats) * 1e-3) / 1e9
        for dtype, job in gemm_probes(n).items()
    }


def gemm_probes(n: int) -> dict[str, Callable[[], object]]:
    """n×n×n matrix products in fp32 and (where the CPU has bf16 instructions) bf16, as jobs
    for :func:`interleaved_ms`."""
    from quari.runtime import has_native_bf16

    jobs = {}
    for dtype in (torch.float32, torch.bfloat16)[: 2 if has_native_bf16() else 1]:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        jobs[str(dtype).removeprefix("torch.")] = functools.partial(torch.mm, a, b)
    return jobs


def flops_per_query(cfg: HyperNetConfig, fold: bool) -> float:
    """FLOPs of one query's pass (multiply + add = 2), from the shapes.

    S = 1 + r (folded) or 1 + 2r tokens, L steps × layers pre-norm layers, each with
    24·H² per token (QKV 6H², output 2H², FFN 16H²) and 4·S²·H for QKᵀ and AV;
    query encoder 2(EH + H²); decoders 2(H² + HE) per decoded token (q′ and the 2r
    columns of U and V). Norms, softmax and GELU are not counted.
    """
    E, H, r = cfg.embedding_dim, cfg.hidden_dim, cfg.rank
    S = 1 + (1 if fold else 2) * r
    per_layer = S * 24 * H * H + 4 * S * S * H
    transformer = cfg.num_steps * cfg.num_layers * per_layer
    return transformer + 2 * (E * H + H * H) + 2 * (H * H + H * E) * (1 + 2 * r)


def reference_implementation(code_dir: Path, cfg: HyperNetConfig, seed: int, folder: Path):
    """The reference implementation's TransformerHypernetwork (random weights, seeded) and the
    quari model imported from the same weights (a reference checkpoint written to ``folder``)."""
    import importlib.util

    import yaml

    from quari.checkpoint import load_reference

    source = Path(code_dir).expanduser() / "transformer_hypernetwork.py"
    spec = importlib.util.spec_from_file_location("reference_hypernetwork", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    hparams = {
        "embedding_dim": cfg.embedding_dim,
        "low_rank_dim": cfg.rank,
        "hidden_dim": cfg.hidden_dim,
        "num_steps": cfg.num_steps,
        "nhead": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "dropout": 0.1,
        "query_residual_weight": cfg.query_residual_weight,
        "use_fro_norm": True,
        "anchor_scale": cfg.anchor_scale,
    }
    torch.manual_seed(seed)
    ref = module.TransformerHypernetwork(**hparams).eval()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yml").write_text(yaml.safe_dump({"hparams": hparams}))
    torch.save(ref.state_dict(), folder / "weights.pt")
    return ref, load_reference(folder)


def quari_rerank(model: QuARIModel, fn, q, ids, vecs, k: int = 100):
    """End to end: the hypernetwork pass ``fn`` on ``q``, then exact re-ranking of the
    candidates (fp16 rows) to the top ``k``."""
    return model.to_adaptation(*fn(q)).rerank(ids, vecs, k)


def reference_rerank(ref, q, vecs, k: int = 100):
    """End to end in the reference implementation: its pass (which forms the E×E matrix W),
    then d′ = d·W for every candidate, cosine with q′ and the top ``k``."""
    out = ref(q)
    moved = torch.nn.functional.normalize(
        torch.bmm(torch.from_numpy(vecs).float(), out["W_image"]), dim=-1
    )
    return torch.topk(torch.einsum("be,bme->bm", out["refined_query"], moved), k, dim=1)


def runtime_paths(model: QuARIModel, names: list[str], timings: dict) -> dict:
    """name → callable(q) → (q′, U, V); ``timings[name]["build_s"]`` gets each build time."""
    from quari.hypernet import packing
    from quari.runtime import build_runtime

    # The default pass without prepacked weights (what eager was before packing), and with
    # the library the default passes over on this CPU.
    paths = {BEFORE: model.transformer_factors, UNPACKED: model.predict_factors}
    timings[UNPACKED] = {}
    other = "mkldnn" if packing.fp32_pack_library() == "mkl" else "mkl"
    available = {"mkl": packing.mkl_packing_available, "mkldnn": packing.onednn_packing_available}
    if available[other]():
        packs, name = packing.PackedLinears(other), OTHER_PACKS.format(other)
        paths[name] = lambda q: model.predict_factors(q, linears=packs.linears(model, q))
        timings[name] = {}
    for name in names:
        start = time.perf_counter()
        try:
            paths[name] = build_runtime(model, name)
        except Exception as exc:  # a missing extra: reported, not timed
            timings[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  {name}: not available ({exc})")
            continue
        timings[name] = {"build_s": time.perf_counter() - start}
    return paths


def guard_reports(model: QuARIModel, names: list[str], queries, gallery) -> dict:
    from quari.runtime import build_runtime
    from quari.runtime_guard import quality_guard

    return {
        name: quality_guard(model, build_runtime(model, name), queries, gallery).to_dict()
        for name in names
    }


def interleaved_ms(jobs: dict[str, Callable[[], object]], repeats: int, per: int) -> dict:
    """Per job: first-call seconds, and the median / min ms per query of ``repeats`` rounds in
    which every job runs once (so that load changes on a shared machine hit all alike)."""
    first = {}
    for name, job in jobs.items():  # warm-up (and compilation, for torch.compile)
        start = now()
        job()
        first[name] = now() - start
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            start = now()
            job()
            times[name].append(now() - start)
    return {
        name: {
            "first_call_s": first[name],
            "ms": statistics.median(ts) * 1e3 / per,
            "min_ms": min(ts) * 1e3 / per,
        }
        for name, ts in times.items()
    }


def unit_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def bench_variant(cfg: HyperNetConfig, args, names: list[str], plan: dict, gemm: dict) -> dict:
    """One variant's runtimes: latency, end-to-end re-rank, floors, guard and ``auto``."""
    import tempfile

    from quari.eval.synthetic import PlantedSpec, planted_768, planted_pairs
    from quari.runtime_choice import choose_runtime

    ref = None
    if args.reference_code and cfg.variant == "reference":
        with tempfile.TemporaryDirectory() as tmp:
            ref, model = reference_implementation(args.reference_code, cfg, 0, Path(tmp))
    else:
        torch.manual_seed(0)
        model = QuARIModel(cfg).eval()
    timings: dict = {BEFORE: {}}
    paths = runtime_paths(model, names, timings)
    # What `quari serve` runs by default: measured afresh here, as on a first start.
    start = time.perf_counter()
    paths[SERVED] = served = choose_runtime(model, exact=True, cache=False)
    timings[SERVED] = {"build_s": time.perf_counter() - start, "chosen": served.name}
    if ref is not None:
        paths[REFERENCE_IMPL] = ref
        timings[REFERENCE_IMPL] = {}
    flops = flops_per_query(cfg, fold=cfg.variant == "reference")
    entry = {
        "config": cfg.to_dict(),
        "flops_per_query": flops,
        "flops_per_query_unfolded": flops_per_query(cfg, False),
        "floor_ms_fp32": flops / gemm["float32"] / 1e6,
        "floor_ms_bf16": flops / gemm["bfloat16"] / 1e6 if "bfloat16" in gemm else None,
        "paths": timings,
    }
    print(f"  {cfg.variant}: {flops / 1e9:.2f} GFLOP/query, floor {entry['floor_ms_fp32']:.1f} ms")
    rng = np.random.default_rng(1)
    E, M = cfg.embedding_dim, plan["candidates"]
    with torch.inference_mode():
        if ref is not None:  # the side-by-side is only fair if both compute the same thing
            q = torch.from_numpy(unit_rows(rng, (4, E)))
            want, got = ref(q), model.to_adaptation(*model.predict_factors(q))
            entry["reference_max_abs_diff"] = {
                "refined_query": float((got.refined_query - want["refined_query"]).abs().max()),
                "W": float((got.dense().transpose(1, 2) - want["W_image"]).abs().max()),
            }
        gemm_jobs, rates = gemm_probes(plan["gemm_n"]), entry.setdefault("gemm_gflops_by_batch", {})
        for B in plan["batches"]:
            q = torch.from_numpy(unit_rows(rng, (B, E)))
            jobs = {name: functools.partial(fn, q) for name, fn in paths.items()}
            # GEMMs timed in the same rounds: the floor of each batch size is taken under the
            # load its own timings saw.
            timed = interleaved_ms({**jobs, **gemm_jobs}, plan["repeats"][B], B)
            rates[B] = {d: 2 * plan["gemm_n"] ** 3 / (timed[d]["ms"] * B * 1e6) for d in gemm_jobs}
            for name in jobs:
                for key, value in timed[name].items():
                    timings[name].setdefault(key, {})[B] = value
            print(f"  B {B}: " + "  ".join(f"{n} {timings[n]['ms'][B]:.1f}" for n in paths))
        for B in plan["rerank_batches"]:
            q = torch.from_numpy(unit_rows(rng, (B, E)))
            vecs = unit_rows(rng, (B, M, E)).astype(np.float16)
            ids = np.tile(np.arange(M), (B, 1))
            jobs = {
                name: functools.partial(quari_rerank, model, fn, q, ids, vecs)
                for name, fn in paths.items()
                if name != REFERENCE_IMPL
            }
            if ref is not None:
                jobs[REFERENCE_IMPL] = functools.partial(reference_rerank, ref, q, vecs)
            for name, row in interleaved_ms(jobs, plan["repeats"][B], B).items():
                timings[name].setdefault("rerank_ms", {})[B] = row["ms"]
            print(f"  rerank {M} B {B}: " + "  ".join(
                f"{n} {timings[n]['rerank_ms'][B]:.1f}" for n in jobs))  # fmt: skip
    before = timings[BEFORE]["ms"]
    for name, t in timings.items():
        if "ms" in t:
            t["speedup_vs_before"] = {B: before[B] / ms for B, ms in t["ms"].items()}
            dtype = "bfloat16" if name == "bf16" else "float32"
            t["over_own_floor"] = {
                B: ms / (flops / rates[B][dtype] / 1e6) for B, ms in t["ms"].items()
            }
    # Quality guard on a planted set (the paper-sized planted spec; a small one in --quick).
    quick = E < 768
    spec = PlantedSpec(dim=E, cluster_dim=8, subspace_dim=4) if quick else planted_768()
    data = planted_pairs(spec, 2000 if quick else 20000, seed=1000)
    reduced = [n for n in ("bf16", "int8") if n in names]
    entry["planted_guard"] = guard_reports(model, reduced, data.texts[:256], data.images)
    entry["auto"] = choose_runtime(model, cache=False).report
    entry["fp32"] = served.report
    return entry


def bench_runtimes(args, quick: bool) -> dict:
    """The runtime section: see the module docstring."""
    from quari.checkpoint import load_reference
    from quari.runtime import has_native_bf16

    names = ["eager", "onnx", "int8"] + ([] if args.skip_compile else ["compile"])
    if has_native_bf16():  # emulated bf16 runs ~100× slower: `auto` never tries it there
        names.insert(2, "bf16")
    plan = {
        "batches": [1, 4] if quick else [1, 32, 256],
        "rerank_batches": [1, 4] if quick else [1, 32],
        "candidates": 200 if quick else 1000,
        "repeats": {1: 2, 4: 2} if quick else {1: 45, 32: 5, 256: 3},  # batch 1: cheap, noisiest
        "gemm_n": 512 if quick else 1024,
    }
    out = {"threads": torch.get_num_threads(), **plan}
    out["gemm_gflops"] = gemm_rates(512 if quick else 2048)
    print(f"  GEMM GFLOP/s: {out['gemm_gflops']}")
    fixture = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official-small"
    golden = np.load(fixture / "golden.npz")
    out["golden_guard"] = guard_reports(
        load_reference(fixture),
        [n for n in ("bf16", "int8") if n in names],
        golden["queries"],
        golden["gallery"],
    )
    out["variants"] = {}
    for variant in args.variants.split(","):
        if quick:
            cfg = HyperNetConfig(64, rank=8, hidden_dim=32, num_heads=4, variant=variant)
        else:
            cfg = HyperNetConfig(embedding_dim=768, variant=variant)
        out["variants"][variant] = bench_variant(cfg, args, names, plan, out["gemm_gflops"])
    return out


def print_runtime_tables(section: dict) -> None:
    b, rr = section["batches"], section["rerank_batches"]
    rows = []
    for variant, entry in section["variants"].items():
        for name, t in entry["paths"].items():
            if "ms" not in t:
                continue
            row = {"variant": variant, "path": name, "floor": min(t["over_own_floor"].values())}
            row.update({f"B{x}": t["ms"][x] for x in b})
            row.update({f"rr{x}": t["rerank_ms"][x] for x in rr})
            row.update({f"x{x}": t["speedup_vs_before"][x] for x in b})
            rows.append(row)
    cols = [("variant", "variant", "s"), ("path", "path", "s")]
    cols += [(f"B={x}", f"B{x}", ".1f") for x in b]
    cols += [(f"rerank 1k B={x}", f"rr{x}", ".1f") for x in rr]
    cols += [(f"× before B={x}", f"x{x}", ".2f") for x in b]
    cols += [("best ÷ own floor", "floor", ".2f")]
    print_table("Hypernetwork runtimes, ms per query (median of interleaved repeats)", rows, cols)
    print(f"GEMM GFLOP/s at {section['threads']} threads: {section['gemm_gflops']}")
    for variant, entry in section["variants"].items():
        for B, r in entry["gemm_gflops_by_batch"].items():
            print(f"{variant}, GEMM GFLOP/s in the B={B} rounds: {r}")
        print(
            f"{variant}: {entry['flops_per_query'] / 1e9:.2f} GFLOP/query (unfolded "
            f"{entry['flops_per_query_unfolded'] / 1e9:.2f}); floor {entry['floor_ms_fp32']:.1f} "
            f"ms fp32, {entry['floor_ms_bf16'] or float('nan'):.1f} ms bf16; "
            f"auto → {entry['auto']['chosen']}; "
            f"fp32 → {entry['fp32']['chosen']}"
        )
        guards = [("planted", g) for g in entry["planted_guard"].values()]
        if variant == "reference":
            guards += [("golden", g) for g in section["golden_guard"].values()]
        for where, g in guards:
            print(
                f"  {where} guard {g['runtime']}: top-10 agreement {g['top_k_agreement']:.4f} "
                f"(worst query {g['min_top_k_agreement']:.1f}), max score error "
                f"{g['max_score_error']:.2e}"
            )


SECTIONS = ("hypernet", "rerank", "scan", "runtimes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_core.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dense-queries", type=int, default=3)
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument(
        "--reference-code", type=Path, help="a checkout of the reference implementation"
    )
    parser.add_argument("--skip-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument(
        "--variants", default="reference,paper", help="runtimes section: hypernetwork variants"
    )
    parser.add_argument("--threads", type=int, help="torch (and ONNX Runtime) threads")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="runtimes section: wall time, or process CPU time (only with --threads 1)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            parser.error("--clock cpu measures latency only with --threads 1")
        CLOCK["clock"] = time.process_time
    sections = [s for s in args.sections.split(",") if s]
    if unknown := sorted(set(sections) - set(SECTIONS)):
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")

    if args.quick:
        E, sizes, batches, hyper_batches = 64, [2_000, 5_000], [1, 4], [1, 4]
        cfg = HyperNetConfig(embedding_dim=E, rank=8, hidden_dim=32, num_heads=4)
        args.rank, args.repeats, args.dense_queries = 8, 1, 1
    else:
        E, sizes, batches, hyper_batches = 768, [200_000, 1_000_000], [1, 32], [1, 32, 256]
        cfg = HyperNetConfig(embedding_dim=E)
    threads = sorted({1, torch.get_num_threads()})
    default_threads = torch.get_num_threads()
    print(f"quari {quari.__version__}  torch {torch.__version__}  threads {threads}")
    result = {}
    if set(sections) != set(SECTIONS) and args.out.is_file():
        # A partial run keeps the other sections of the last full run (their own facts stay
        # under "machine"/"settings"; this run's are under "<section>_run").
        result = json.loads(args.out.read_text())
    run_facts = {"machine": {**machine(), "threads_default": default_threads}}
    run_facts["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    run_facts["load_average"] = os.getloadavg()
    if not result:
        result = {
            "benchmark": "bench_core",
            "machine": run_facts["machine"],
            "settings": {
                "E": E,
                "rank": args.rank,
                "k": args.k,
                "repeats": args.repeats,
                "hypernet_config": cfg.to_dict(),
                "quick": args.quick,
            },
        }

    if "hypernet" in sections:
        print("hypernetwork (paper-sized)" if not args.quick else "hypernetwork (tiny)")
        hyper_rows, hyper_best = bench_hypernet(cfg, hyper_batches, threads, args.repeats)
        torch.set_num_threads(default_threads)
        result.update(hypernet=hyper_rows, hypernet_fastest=hyper_best)
        print_table(
            "Hypernetwork latency (fastest thread count per batch)",
            hyper_best,
            [
                ("batch", "batch", "d"),
                ("threads", "threads", "d"),
                ("ms", "ms", ".2f"),
                ("queries/s", "queries_per_s", ".1f"),
            ],
        )

    if "rerank" in sections:
        print("rerank")
        M = 1000 if not args.quick else 200
        result["rerank"] = bench_rerank(E, args.rank, M, batches, args.repeats)
        print_table(
            "Re-rank (ms per query)",
            result["rerank"],
            [
                ("B", "B", "d"),
                ("candidates", "M", "d"),
                ("variant", "variant", "s"),
                ("ms/query", "ms_per_query", ".3f"),
            ],
        )

    if "scan" in sections:
        print("exact scan (fp16 gallery)")
        rng = np.random.default_rng(0)
        full = rng.standard_normal((max(sizes), E), dtype=np.float32)
        full /= np.linalg.norm(full, axis=1, keepdims=True)
        full16 = full.astype(np.float16)
        full32 = torch.from_numpy(full16.astype(np.float32))
        del full
        scan_rows = []
        for N in sizes:
            for B in batches:
                for variant in ("paper", "reference"):
                    scan_rows.append(bench_scan(full16[:N], full32[:N], B, variant, args))
        result["scan"] = scan_rows
        print_table(
            "Exact top-k scan of an fp16 gallery (ms per query)",
            scan_rows,
            [
                ("N", "N", ",d"),
                ("B", "B", "d"),
                ("variant", "variant", "s"),
                ("factored scan", "scan_ms_per_query", ".2f"),
                ("its GEMM", "gemm_ms_per_query", ".2f"),
                ("GEMM+upcast", "gemm_with_upcast_ms_per_query", ".2f"),
                ("plain cosine", "plain_cosine_ms_per_query", ".2f"),
                ("dense T", "dense_T_ms_per_query", ".1f"),
                ("dense/scan", "dense_over_scan", ".1f"),
                ("scan/GEMM", "scan_over_gemm", ".2f"),
                ("scan/(GEMM+upcast)", "scan_over_gemm_with_upcast", ".2f"),
            ],
        )

    if "runtimes" in sections:
        print("hypernetwork runtimes")
        result["runtimes"] = bench_runtimes(args, args.quick)
        result["runtimes_run"] = {
            **run_facts,
            "threads": torch.get_num_threads(),
            "clock": args.clock,
            "command": "python benchmarks/bench_core.py " + " ".join(sys.argv[1:]),
        }
        print_runtime_tables(result["runtimes"])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
