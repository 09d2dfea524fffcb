"""Search benchmark: per-query latency of every Retriever mode, memory, and recall vs scan.

A synthetic clustered set (N × 768 fp16, N/10,000 clusters, so every cluster holds 10,000
rows — ten times the default K, so that the candidate stage has to find the adapted top-100
inside a neighbourhood larger than its budget) is written once under ``benchmarks/data/`` and
reused. For each size the script builds a candidate index, then for every mode (plain,
rerank, adaptive, scan; K = 1000 candidates, k = 100) measures

* per-query latency at B = 1 (median over queries) and at B = 32 (batch time / 32),
* peak anonymous memory during the mode (sampled from /proc; memory-mapped gallery pages are
  file cache, not counted), and
* recall@100 of ``rerank`` and ``adaptive`` against the exact ``scan`` of the same model,

then sweeps K for ``rerank`` and ``adaptive`` (B = 32) to show the K each needs.

The model is a *trained-looking* planted adapter (:class:`PlantedAdapter`): each query's T
focuses on a subspace spanned by the query and its nearest cluster centroids plus random
directions — the geometry a trained QuARI model produces (ranking changes inside the query's
neighbourhood), with no training needed.

With ``--dataset planted --model FOLDER`` the model is a *trained* one (a model folder from
``quari train``) and the gallery is a held-out planted gallery of its training distribution
(:func:`quari.eval.synthetic.planted_768` by default: N images drawn with ``--planted-seed``,
one caption each, written once under ``benchmarks/data/``). Queries are captions of random
gallery images, so besides the numbers above the run reports the *task* metric of every mode:
caption → image recall@1 and @10 against the true image (over ``--task-queries`` captions),
i.e. whether the trained model beats cosine (``plain``) on its own data.

Usage::

    python benchmarks/bench_search.py                 # N = 100k and 1M (~20 min on 2 cores)
    python benchmarks/bench_search.py --quick         # a smoke run
    python benchmarks/bench_search.py --sizes 10000000 --variants paper --queries 8 \
        --scan-queries 1 --out benchmarks/results/bench_search_10m.json   # the 10M-row check
    python benchmarks/bench_search.py --dataset planted --model MODEL_FOLDER \
        --sizes 100000 1000000     # a trained model → results/bench_search_trained.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import quari
from quari import Adaptation
from quari.checkpoint import CheckpointError, load
from quari.eval.metrics import relevance_matrix, retrieval_metrics
from quari.eval.synthetic import (
    ClusteredSpec,
    PlantedSpec,
    clustered_vectors,
    planted_768,
    write_clustered_set,
    write_planted_gallery,
)
from quari.hypernet import QuARIModel
from quari.index import CandidateIndex
from quari.retriever import Retriever
from quari.store import EmbeddingSet

HERE = Path(__file__).resolve().parent
PLANTED_ENCODER = "synthetic:planted"  # the encoder id write_planted_set/_gallery record


class PlantedAdapter(nn.Module):
    """Maps queries to trained-looking Adaptations built from the data's cluster structure."""

    def __init__(
        self,
        centroids: np.ndarray,
        rank: int = 64,
        variant: str = "paper",
        neighbours: int = 24,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.register_buffer("centroids", torch.from_numpy(centroids))
        self.rank, self.variant, self.neighbours, self.seed = rank, variant, neighbours, seed
        self.metadata: dict = {}

    @property
    def embedding_dim(self) -> int:
        return self.centroids.shape[1]

    def forward(self, q: torch.Tensor) -> Adaptation:
        g = torch.Generator().manual_seed(self.seed)
        q = torch.nn.functional.normalize(q.float(), dim=-1)
        B, E, r = q.shape[0], q.shape[1], self.rank
        m = min(self.neighbours, self.centroids.shape[0])
        near = torch.topk(q @ self.centroids.T, m, dim=1).indices  # (B, m)
        basis = torch.cat(
            [
                q[:, :, None],
                self.centroids[near].transpose(1, 2),
                torch.randn(B, E, r - 1 - m, generator=g),
            ],
            dim=2,
        )
        V, _ = torch.linalg.qr(basis)  # (B, E, r): query neighbourhood + random directions
        mix = torch.eye(r) + 0.5 * torch.randn(B, r, r, generator=g) / r**0.5
        U = V @ mix
        refined = q + 0.1 * torch.randn(B, E, generator=g) / E**0.5
        if self.variant == "reference":
            U = U / torch.linalg.matrix_norm(U)[:, None, None]
            V = V / torch.linalg.matrix_norm(V)[:, None, None]
            return Adaptation(refined, U, V, "reference", 0.8)
        return Adaptation(refined, U, V)


class PeakAnon:
    """Samples RssAnon of this process in a thread; ``peak`` in MiB."""

    def __enter__(self) -> PeakAnon:
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) / 1024)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def dataset(rows: int, spec: ClusteredSpec, root: Path) -> EmbeddingSet:
    path = root / f"clustered-{rows}-{spec.dim}-{spec.clusters}-{spec.seed}"
    if (path / "manifest.json").exists():
        return EmbeddingSet.open(path)
    print(f"  writing {rows:,} × {spec.dim} synthetic set to {path}", flush=True)
    return write_clustered_set(path, rows, spec)


def planted_dataset(rows: int, spec: PlantedSpec, seed: int, root: Path) -> EmbeddingSet:
    """The held-out planted gallery of ``rows`` images (one caption each), written once."""
    path = root / f"planted-{rows}-{spec.dim}-{spec.clusters}-{spec.seed}-s{seed}"
    if (path / "manifest.json").exists():
        eset = EmbeddingSet.open(path)
        if eset.encoder_info.get("spec") != vars(spec) or eset.encoder_info.get("seed") != seed:
            raise SystemExit(
                f"{path} was written with another planted spec or seed "
                f"({eset.encoder_info}); delete it to write it anew"
            )
        return eset
    print(f"  writing {rows:,} × {spec.dim} planted gallery to {path}", flush=True)
    return write_planted_gallery(path, rows, spec, seed=seed, encoder=PLANTED_ENCODER)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's exact (scan) ids that ``found`` holds: recall@k vs scan."""
    rel, n_relevant = relevance_matrix(found, truth)
    return retrieval_metrics(rel, n_relevant, ("r",))["r"]


def task_recall(found: np.ndarray, true_rows: np.ndarray, at: int) -> float:
    """Share of queries whose true row is among the first ``at`` results."""
    rel, n_relevant = relevance_matrix(found, true_rows)
    return retrieval_metrics(rel, n_relevant, (f"r@{at}",))[f"r@{at}"]


def load_trained(folder: Path, dim: int) -> QuARIModel:
    """The model folder's model, checked against the data's dimension before any data work."""
    try:
        model = load(folder)
    except CheckpointError as e:
        raise SystemExit(f"--model: {e}") from None
    if model.embedding_dim != dim:
        raise SystemExit(
            f"--model {folder}: the model expects {model.embedding_dim}-d embeddings, the "
            f"planted data is {dim}-d (train on planted_768() data, or pick another spec)"
        )
    encoder = model.metadata.get("encoder")
    if encoder and encoder != PLANTED_ENCODER:
        raise SystemExit(
            f"--model {folder}: trained on {encoder!r} embeddings, not on planted data "
            f"({PLANTED_ENCODER!r}); the planted benchmark needs a model trained on it"
        )
    return model


def candidate_index(eset: EmbeddingSet, rows: int, args) -> CandidateIndex:
    """The set's cached candidate index (built if missing or of another factory)."""
    factory = args.factory_1m if 500_000 < rows <= 2_000_000 else None  # else: by size
    t0 = time.perf_counter()
    if CandidateIndex.exists(eset):
        try:
            index = CandidateIndex.load(eset)
            if factory and index.factory != factory:
                raise ValueError
        except Exception:
            index = CandidateIndex.build(eset, f"faiss:{factory}", progress=False)
    else:
        index = CandidateIndex.build(eset, f"faiss:{factory}", progress=False)
    print(
        f"  N = {rows:,}: index {index.factory} ready in {time.perf_counter() - t0:.1f} s "
        f"(build {index.info.get('build_seconds')} s)",
        flush=True,
    )
    return index


def bench_size(rows: int, args, spec: ClusteredSpec) -> tuple[list[dict], list[dict]]:
    """The clustered set of ``rows`` rows with the planted adapter of every variant."""
    eset = dataset(rows, spec, args.data)
    index = candidate_index(eset, rows, args)
    queries, _ = clustered_vectors(spec, args.queries, seed=10_000, centroids=spec.centroids())
    models = {v: PlantedAdapter(spec.centroids(), variant=v) for v in args.variants}
    return bench_models(eset, index, queries, models, args)


def bench_planted(
    rows: int, args, spec: PlantedSpec, model: QuARIModel
) -> tuple[list[dict], list[dict]]:
    """The held-out planted gallery of ``rows`` images with the trained model.

    Queries are the stored captions of ``max(--queries, --task-queries)`` random gallery
    images; the images are the true answers of the task metric.
    """
    eset = planted_dataset(rows, spec, args.planted_seed, args.data)
    index = candidate_index(eset, rows, args)
    n = min(rows, max(args.queries, args.task_queries))
    true_rows = np.random.default_rng(10_000).choice(rows, n, replace=False)
    queries = eset.gather(true_rows, "text").astype(np.float32)
    label = f"trained-{model.config.variant}"
    return bench_models(eset, index, queries, {label: model}, args, true_rows)


def bench_models(
    eset: EmbeddingSet,
    index: CandidateIndex,
    queries: np.ndarray,
    models: dict[str, nn.Module],
    args,
    true_rows: np.ndarray | None = None,
) -> tuple[list[dict], list[dict]]:
    """Latency, memory and recall vs scan of every mode for each model, then the K sweep.

    Latency uses the first ``--queries`` queries (``--scan-queries`` for scan at B = 1) and
    the first 32 at B = 32; recall vs scan the first 32. With ``true_rows`` (each query's true
    row), every mode also answers all queries at B = 32 for the task recall@1 and @10.
    """
    rows = len(eset)
    out, sweep = [], []
    for variant, model in models.items():
        retriever = Retriever(eset, model, index, batch_size=32, device=args.device)
        scan = retriever.search(queries, args.k, mode="scan", with_metadata=False).ids
        truth = scan[:32]
        for mode in ("plain", "rerank", "adaptive", "scan"):
            n1 = args.scan_queries if mode == "scan" else args.queries
            times = []
            with PeakAnon() as mem:
                for i in range(n1):
                    t = time.perf_counter()
                    retriever.search(
                        queries[i : i + 1],
                        args.k,
                        mode=mode,
                        candidates=args.K,
                        with_metadata=False,
                    )
                    times.append(time.perf_counter() - t)
                t = time.perf_counter()
                batched = retriever.search(
                    queries[:32], args.k, mode=mode, candidates=args.K, with_metadata=False
                )
                batch_ms = (time.perf_counter() - t) * 1e3 / min(32, len(queries))
            row = {
                "N": rows,
                "index": index.factory,
                "variant": variant,
                "mode": mode,
                "ms_per_query_b1": statistics.median(times) * 1e3,
                "ms_per_query_b32": batch_ms,
                "peak_anon_mib": round(mem.peak, 1),
                "recall_at_k_vs_scan": recall(batched.ids, truth[:32]) if mode != "plain" else None,
            }
            task = ""
            if true_rows is not None:
                found = (
                    scan
                    if mode == "scan"
                    else retriever.search(
                        queries, args.k, mode=mode, candidates=args.K, with_metadata=False
                    ).ids
                )
                row["task_queries"] = len(true_rows)
                row["task_recall_at_1"] = task_recall(found, true_rows, 1)
                row["task_recall_at_10"] = task_recall(found, true_rows, 10)
                task = (
                    f"  task R@1 {row['task_recall_at_1']:.3f} R@10 {row['task_recall_at_10']:.3f}"
                )
            out.append(row)
            print(
                f"    {variant:9s} {mode:8s} b1 {row['ms_per_query_b1']:9.2f} ms  "
                f"b32 {row['ms_per_query_b32']:8.2f} ms/q  mem {row['peak_anon_mib']:7.0f} MiB"
                f"  recall {row['recall_at_k_vs_scan']}{task}",
                flush=True,
            )
        for K in args.k_sweep:
            for mode in ("rerank", "adaptive"):
                t = time.perf_counter()
                res = retriever.search(
                    queries[:32], args.k, mode=mode, candidates=K, with_metadata=False
                )
                row = {
                    "N": rows,
                    "index": index.factory,
                    "variant": variant,
                    "mode": mode,
                    "K": K,
                    "ms_per_query_b32": (time.perf_counter() - t) * 1e3 / min(32, len(queries)),
                    "recall_at_k_vs_scan": recall(res.ids, truth[:32]),
                }
                sweep.append(row)
                print(
                    f"    {variant:9s} {mode:8s} K {K:6d}  b32 {row['ms_per_query_b32']:8.2f} "
                    f"ms/q  recall {row['recall_at_k_vs_scan']:.3f}",
                    flush=True,
                )
    return out, sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--K", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--scan-queries", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=["paper", "reference"])
    parser.add_argument("--k-sweep", type=int, nargs="*", default=[1000, 4000, 16000])
    parser.add_argument("--rows-per-cluster", type=int, default=10_000)
    parser.add_argument(
        "--factory-1m",
        default="IVF2048,Flat",
        help="index for sets of 0.5–2M rows (the size rule picks Flat up to 1M; IVF shows the "
        "latency an approximate index gives)",
    )
    parser.add_argument("--data", type=Path, default=HERE / "data", help="data cache folder")
    parser.add_argument(
        "--dataset",
        choices=["clustered", "planted"],
        default="clustered",
        help="clustered: the planted adapter on clustered sets; planted: a trained --model on "
        "a held-out planted gallery (planted_768), with the task recall",
    )
    parser.add_argument("--model", type=Path, help="model folder (config.json, model.safetensors)")
    parser.add_argument(
        "--planted-seed",
        type=int,
        default=1000,
        help="draw seed of the planted gallery (training data: write_planted_set seed=1)",
    )
    parser.add_argument(
        "--task-queries",
        type=int,
        default=500,
        help="planted: captions whose true-image recall@1/@10 every mode reports",
    )
    parser.add_argument("--device", default="cpu", help="device of the model and the scoring")
    parser.add_argument("--out", type=Path, help="results JSON (default: by --dataset)")
    args = parser.parse_args()
    planted = args.dataset == "planted"
    if planted and args.model is None:
        parser.error("--dataset planted needs --model MODEL_FOLDER (a trained model)")
    if not planted and args.model is not None:
        parser.error("--model is used with --dataset planted (its training distribution)")
    if args.out is None:
        name = "bench_search_trained.json" if planted else "bench_search.json"
        args.out = HERE / "results" / name
    planted_spec = planted_768()
    dim = planted_spec.dim if planted else 768
    model = load_trained(args.model, dim) if planted else None
    if args.quick:
        if not planted:
            dim, args.rows_per_cluster = 64, 500
        args.sizes, args.queries, args.scan_queries, args.K, args.k = [5_000], 4, 2, 200, 20
        args.k_sweep, args.task_queries, args.factory_1m = [200, 800], 64, None
    if planted and args.k < 10:
        parser.error(f"--dataset planted reports recall@10, so --k must be ≥ 10 (got {args.k})")
    print(
        f"quari {quari.__version__}  torch {torch.__version__}  threads {torch.get_num_threads()}",
        flush=True,
    )
    rows, sweeps = [], []
    for n in args.sizes:
        if planted:
            got, sweep = bench_planted(n, args, planted_spec, model)
        else:
            spec = ClusteredSpec(dim=dim, clusters=max(10, n // args.rows_per_cluster))
            got, sweep = bench_size(n, args, spec)
        rows.extend(got)
        sweeps.extend(sweep)
    task_head = " task R@1 | task R@10 |" if planted else ""
    print(
        "\n| N | index | variant | mode | ms/query B=1 | ms/query B=32 | peak anon MiB | "
        f"recall@k vs scan |{task_head}\n|---|---|---|---|---|---|---|---|" + "---|---|" * planted
    )
    for r in rows:
        rec = "—" if r["recall_at_k_vs_scan"] is None else f"{r['recall_at_k_vs_scan']:.3f}"
        task = f" {r['task_recall_at_1']:.3f} | {r['task_recall_at_10']:.3f} |" if planted else ""
        print(
            f"| {r['N']:,} | {r['index']} | {r['variant']} | {r['mode']} | "
            f"{r['ms_per_query_b1']:.2f} | {r['ms_per_query_b32']:.2f} | "
            f"{r['peak_anon_mib']:.0f} | {rec} |{task}"
        )
    print(
        "\n| N | variant | mode | K | ms/query B=32 | recall@k vs scan |\n|---|---|---|---|---|---|"
    )
    for r in sweeps:
        print(
            f"| {r['N']:,} | {r['variant']} | {r['mode']} | {r['K']} | "
            f"{r['ms_per_query_b32']:.2f} | {r['recall_at_k_vs_scan']:.3f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "k": args.k,
        "K": args.K,
        "queries": args.queries,
        "dim": dim,
        "rows_per_cluster": args.rows_per_cluster,
        "quick": args.quick,
    }
    if planted:
        del settings["rows_per_cluster"]
        settings.update(
            dataset="planted",
            planted_spec=vars(planted_spec),
            planted_seed=args.planted_seed,
            task_queries=args.task_queries,
            device=args.device,
            model=str(args.model),
            model_config=model.config.to_dict(),
            model_metadata=model.metadata,
        )
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "bench_search",
                "quari": quari.__version__,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "settings": settings,
                "results": rows,
                "k_sweep": sweeps,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
