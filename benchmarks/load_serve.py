"""Load test of ``quari serve``: concurrent clients, mixed queries, batching on vs off.

Builds (or reuses, ``--workdir``) a synthetic set of random unit vectors (default 100k × 512,
fp16) whose encoder is the tests' toy encoder at that dimension (texts hash to vectors, images
are a random projection of an 8×8 thumbnail — nearly free, so the encoder is not what is
measured), a FAISS index, and a random paper-sized QuARI model (H 512, r 64, 4 layers, 4 steps).
Then, twice — micro-batching on, then off — it starts ``quari serve`` as a subprocess on
loopback, drives it with ``--clients`` concurrent clients for ``--seconds`` of mixed text, image
(multipart and base64) and embedding queries across the four modes, and reports throughput,
p50/p95/p99 latency per mode, the error count (must be 0), the server's RSS at the start and
end of the load (growth must stay under 10 %), mean batch size, and the gain of batching.

The clients run in this process (asyncio + httpx) on the same machine as the server: they
share its cores, so absolute numbers are lower than a dedicated client would see; both phases
pay the same.

Usage:
    python benchmarks/load_serve.py            # the full run: 100k rows, 32 clients, 2 × 60 s
    python benchmarks/load_serve.py --quick    # 20k rows, 2 × 8 s (development)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests"))  # the toy encoder

SAMPLE_EVERY = 5.0  # seconds between the server's RSS readings under load
MODES = {"plain": 0.3, "rerank": 0.25, "adaptive": 0.35, "scan": 0.1}
KINDS = {"text": 0.4, "image": 0.3, "embedding": 0.3}
WORDS = ["red", "blue", "small", "large", "old", "dog", "cat", "bird", "car", "boat", "house",
         "tree", "river", "snow", "night", "city"]  # fmt: skip
#: Hypernetwork sizes: the paper's, and a small one (to see the service around a cheap model).
MODEL_SIZES = {
    "paper": {"hidden_dim": 512, "rank": 64, "num_layers": 4, "num_heads": 8, "num_steps": 4},
    "small": {"hidden_dim": 128, "rank": 16, "num_layers": 2, "num_heads": 4, "num_steps": 2},
}


# -- the server side -------------------------------------------------------------------------------
def child_main(argv: list[str]) -> None:
    """Runs ``quari serve`` with the toy encoder registered as ``toy:<dim>``."""
    from quari.cli import main
    from quari.encoders import register_encoder

    from embed_helpers import ToyEncoder

    def factory(rest: str, config: object) -> ToyEncoder:
        encoder = ToyEncoder()
        encoder.dim = int(rest)  # instance attribute: the class default stays 16
        encoder.proj = np.random.default_rng(0).standard_normal((192, encoder.dim))
        encoder.proj = encoder.proj.astype(np.float32)
        return encoder

    register_encoder("toy", factory, "benchmark toy encoder")
    sys.argv = ["quari", *argv]
    main()


def build(workdir: Path, rows: int, dim: int, size: str) -> tuple[Path, Path]:
    """The set (random unit vectors, label/group metadata), its index, and a random model."""
    import torch

    from quari import HyperNetConfig, QuARIModel
    from quari.checkpoint import save
    from quari.index import CandidateIndex
    from quari.store import EmbeddingSet

    root, model_dir = workdir / f"set-{rows}x{dim}", workdir / f"model-{size}-{dim}"
    if not (root / "manifest.json").exists():
        eset = EmbeddingSet.create(root, dim=dim, encoder="toy")
        rng = np.random.default_rng(0)
        for start in range(0, rows, 50_000):
            n = min(50_000, rows - start)
            eset.append(
                rng.standard_normal((n, dim), dtype=np.float32),
                {"label": [WORDS[i % len(WORDS)] for i in range(n)], "group": np.arange(n) % 10},
            )
        CandidateIndex.build(eset, progress=False)
    if not (model_dir / "config.json").exists():
        torch.manual_seed(0)
        config = HyperNetConfig(embedding_dim=dim, **MODEL_SIZES[size])
        save(QuARIModel(config).eval(), model_dir)
    return root, model_dir


class Server:
    """``quari serve`` in a subprocess on a free loopback port."""

    def __init__(self, root: Path, model_dir: Path, dim: int, batching: bool, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = [
            "serve", str(root), "--model", str(model_dir), "--encoder", f"toy:{dim}",
            "--port", str(self.port), "--log-level", "warning", "--max-upload-mb", "2",
            "--batching" if batching else "--no-batching",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", *args], stdout=self.log, stderr=self.log, env=env
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode}; see {self.log.name}"
                )
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the server did not become ready")

    def rss_mb(self) -> float:
        """Resident memory of the server (the `quari serve` process), in MiB."""
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> int:
        self.proc.terminate()
        code = self.proc.wait(timeout=60)
        self.log.close()
        return code


# -- the client side -------------------------------------------------------------------------------
def query_pool(dim: int, seed: int = 0) -> dict[str, list]:
    """Ready-made request payloads: texts, PNG images, unit embeddings."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=3)) + f" {i}" for i in range(500)]
    images = []
    for _ in range(64):
        pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).resize((96, 96), Image.Resampling.BILINEAR).save(buf, "PNG")
        images.append(buf.getvalue())
    vectors = rng.standard_normal((256, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return {"text": texts, "image": images, "embedding": [v.tolist() for v in vectors]}


def request_for(rng: random.Random, pool: dict[str, list]) -> tuple[str, str, dict]:
    mode = rng.choices(list(MODES), weights=list(MODES.values()))[0]
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    value = rng.choice(pool[kind])
    options = {"k": 10, "mode": mode}
    if rng.random() < 0.1:
        options["where"] = f"group == {rng.randrange(10)}"
    if kind == "image" and rng.random() < 0.5:
        files = {"image": ("q.png", value, "image/png")}
        return mode, kind, {"files": files, "data": {k: str(v) for k, v in options.items()}}
    if kind == "image":
        value = base64.b64encode(value).decode()
    return mode, kind, {"json": {kind: value, **options}}


async def drive(
    url: str,
    pool: dict[str, list],
    clients: int,
    seconds: float,
    sample: Callable[[], float] | None = None,
) -> tuple[list[tuple], list[float]]:
    """``clients`` concurrent loops for ``seconds``: (mode, kind, status, latency s) per request,
    and ``sample()`` taken every ``SAMPLE_EVERY`` seconds meanwhile."""
    import httpx

    records: list[tuple] = []
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(c: httpx.AsyncClient, seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            mode, kind, kwargs = request_for(rng, pool)
            t0 = time.perf_counter()
            try:
                r = await c.post("/search", **kwargs)
                status = r.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            records.append((mode, kind, status, time.perf_counter() - t0))

    async def sampler() -> None:
        while sample is not None and time.perf_counter() < deadline:
            samples.append(sample())
            await asyncio.sleep(SAMPLE_EVERY)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        await asyncio.gather(sampler(), *(client(c, seed) for seed in range(clients)))
    return records, samples


def percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"n": 0}
    ms = np.asarray(latencies) * 1e3
    return {
        "n": int(ms.size),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }


def batch_sizes(url: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    total = float(re.search(r"^quari_batch_size_sum ([\d.e+]+)$", text, re.M).group(1))
    count = float(re.search(r"^quari_batch_size_count ([\d.e+]+)$", text, re.M).group(1))
    return total / count if count else 0.0


def phase(args, root: Path, model_dir: Path, pool: dict, batching: bool, logdir: Path) -> dict:
    name = "batched" if batching else "one at a time"
    server = Server(root, model_dir, args.dim, batching, logdir / f"server-{int(batching)}.log")
    try:
        server.wait_ready()
        rss_ready = server.rss_mb()
        # Warm-up load: the allocator's arenas and caches grow to their working size first.
        asyncio.run(drive(server.url, pool, args.clients, args.warmup))
        rss_start = server.rss_mb()
        t0 = time.perf_counter()
        records, samples = asyncio.run(
            drive(server.url, pool, args.clients, args.seconds, server.rss_mb)
        )
        elapsed = time.perf_counter() - t0
        rss_end = server.rss_mb()
        mean_batch = batch_sizes(server.url)
    finally:
        code = server.stop()
    errors = [r for r in records if r[2] != 200]
    out = {
        "batching": batching,
        "requests": len(records),
        "seconds": round(elapsed, 2),
        "throughput_qps": round(len(records) / elapsed, 2),
        "errors": len(errors),
        "error_examples": sorted({str(r[2]) for r in errors})[:5],
        "latency": percentiles([r[3] for r in records]),
        "latency_by_mode": {m: percentiles([r[3] for r in records if r[0] == m]) for m in MODES},
        "latency_by_kind": {k: percentiles([r[3] for r in records if r[1] == k]) for k in KINDS},
        "mean_batch_size": round(mean_batch, 2),
        "rss_mb": {
            "ready": round(rss_ready, 1),
            "start": round(rss_start, 1),
            "end": round(rss_end, 1),
            "growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2),
            "max": round(max([rss_end, *samples]), 1),
            "samples_every_5s": [round(x, 1) for x in samples],
        },
        "exit_code": code,
    }
    print(
        f"{name:>14}: {out['throughput_qps']:7.1f} q/s  {out['requests']:6d} requests  "
        f"{out['errors']} errors  mean batch {out['mean_batch_size']:.1f}  RSS "
        f"{rss_start:.0f} → {rss_end:.0f} MiB ({out['rss_mb']['growth_pct']:+.1f} %)"
    )
    for mode, p in out["latency_by_mode"].items():
        if p["n"]:
            print(
                f"{'':>16}{mode:>9}: p50 {p['p50_ms']:7.1f}  p95 {p['p95_ms']:7.1f}  "
                f"p99 {p['p99_ms']:7.1f} ms  (n {p['n']})"
            )
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0, help="load per phase")
    ap.add_argument("--warmup", type=float, default=20.0, help="load before measuring")
    ap.add_argument("--model-size", choices=list(MODEL_SIZES), default="paper")
    ap.add_argument("--workdir", type=Path, default=None, help="keep/reuse the set here")
    ap.add_argument("--quick", action="store_true", help="20k rows, 3 s warm-up, 8 s phases")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: results/)")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.seconds, args.warmup = min(args.rows, 20_000), 8.0, 3.0
    from bench_core import machine

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="quari-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    root, model_dir = build(workdir, args.rows, args.dim, args.model_size)
    took = time.perf_counter() - t0
    print(f"set {root} ({args.rows:,} × {args.dim}) and model ready in {took:.0f} s")
    pool = query_pool(args.dim)
    phases = [phase(args, root, model_dir, pool, b, workdir) for b in (True, False)]
    on, off = phases
    gain = on["throughput_qps"] / off["throughput_qps"] if off["throughput_qps"] else None
    print(f"micro-batching gain: {gain:.2f}× throughput" if gain else "no throughput")
    result = {
        "benchmark": "load_serve",
        "machine": machine(),
        "note": "clients and server share the machine's cores; the machine is shared with "
        "other jobs while this runs",
        "settings": {
            "rows": args.rows,
            "dim": args.dim,
            "clients": args.clients,
            "seconds_per_phase": args.seconds,
            "warmup_seconds": args.warmup,
            "modes": MODES,
            "kinds": KINDS,
            "k": 10,
            "filtered_share": 0.1,
            "encoder": "toy (tests/embed_helpers.ToyEncoder at the set's dimension)",
            "model": f"random QuARIModel, {args.model_size} size",
            "model_config": MODEL_SIZES[args.model_size],
            "index": "faiss:auto",
            "quick": args.quick,
        },
        "batched": on,
        "unbatched": off,
        "batching_gain": round(gain, 2) if gain else None,
        "zero_errors": on["errors"] == 0 and off["errors"] == 0,
        "rss_growth_under_10pct": all(p["rss_mb"]["growth_pct"] < 10 for p in phases),
    }
    stem = "load_serve" + ("" if args.model_size == "paper" else f"_{args.model_size}")
    out = args.out or RESULTS / (stem + ("_quick" if args.quick else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if not result["zero_errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
