"""The demo's stages, end to end: :func:`run_demo`.

1. ``tracks`` — Fashion-MNIST (found or downloaded and verified), the real-image tracks: the
   ``offline`` encoder's head fitted once on the EfficientNet features of the train images, and
   every image embedded from those same features (:func:`~quari.eval.tracks.
   build_fashion_tracks`);
2. ``index`` — a candidate index over each test gallery;
3. ``mine`` — semi-positives of the training set;
4. ``train`` — QuARI with the default recipe (:mod:`quari.demo.recipe`);
5. ``linear`` — the linear-adapter baselines on the same pairs: the full map, and the low-rank
   form at QuARI's rank (its map held fixed for every query);
6. ``evaluate`` — cosine, both linear adapters and QuARI on both tracks' test queries
   (:class:`~quari.eval.protocols.CustomEvaluator`), ``eval/results.json`` and the
   ``quari eval report`` markdown and plots;
7. ``report`` — ``report.html``: the table, a dozen test queries with both methods' top results
   side by side, the plots.

Every stage is reused by a rerun with the same settings (:mod:`quari.demo.stages`).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from quari.checkpoint import load_model, validation_verdict
from quari.demo.config import DemoConfig
from quari.demo.recipe import linear_config, quari_config, recipe_summary
from quari.demo.report import HEADLINE_MODE, TRACKS, demo_table, write_page
from quari.demo.showcase import pick_showcase
from quari.demo.stages import MARKERS, StageRecord, StageRunner
from quari.encoders import EncoderConfig
from quari.errors import DataError
from quari.eval.protocols import CustomEvaluator, EvalResult, load_results, save_results
from quari.eval.report import write_report
from quari.eval.tracks import build_fashion_tracks, load_fashion_mnist
from quari.eval.tracks.fashion_mnist import DEBIAN_DIR, FashionMNIST
from quari.fileio import atomic_write
from quari.index import CandidateIndex
from quari.store import EmbeddingSet

__all__ = ["METHODS", "DemoResult", "run_demo", "serve_command"]

#: The methods compared: (display name, model folder under the output, modes).
METHODS = (
    ("cosine", None, ("plain",)),
    ("linear", "linear", ("scan",)),
    ("static low-rank", "static", ("scan",)),
    ("QuARI", "model", ("adaptive", "scan")),
)
K = 100  # the cut-off of every ranked list (AP@100 is the headline metric)
STAGE_COUNT = 7


@dataclass
class DemoResult:
    """What a demo run produced.

    Attributes:
        out: The output folder.
        report: ``report.html``.
        results: Every evaluation result (both tracks, every method and mode).
        table: The metric table's rows (:func:`~quari.demo.report.demo_table`).
        stages: Each stage's record (reused or not, wall and CPU seconds, load).
        serve: The command that serves the demo set.
    """

    out: Path
    report: Path
    results: list[EvalResult]
    table: list[dict[str, Any]]
    stages: list[StageRecord]
    serve: str


def serve_command(out: Path) -> str:
    """``quari serve`` over the text→image test gallery with the demo's model and encoder."""
    tracks = Path(out) / "tracks"
    return (
        f"quari serve {tracks / 't2i' / 'test' / 'gallery'} --model {Path(out) / 'model'} "
        f"--encoder offline:{tracks / 'head'}"
    )


def _check_out(out: Path) -> None:
    """Refuses an output folder that holds something other than a demo run."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKERS).is_dir():
        raise DataError(
            f"{out}: not empty and not a quari demo folder (no {MARKERS}/); choose another --out"
        )


def _where(fm: FashionMNIST) -> str:
    if Path(fm.folder) == DEBIAN_DIR:
        return f"{fm.folder} (Debian's dataset-fashion-mnist)"
    if os.environ.get("QUARI_FASHION_MNIST"):
        return f"{fm.folder} ($QUARI_FASHION_MNIST)"
    return str(fm.folder)


def run_demo(config: DemoConfig, echo: Callable[[str], None] = print) -> DemoResult:
    """Runs (or completes, or reuses) every stage of the demo in ``config.out``.

    Args:
        config: Size, budget, output folder, seed.
        echo: Prints a line of progress for people (stage starts, reuse, where data came from).

    Returns:
        The :class:`DemoResult`.

    Raises:
        DataError: ``config.out`` holds something else; the dataset cannot be found or fetched.

    Example:
        >>> result = run_demo(DemoConfig(out="demo-out", size="small"))  # doctest: +SKIP
        >>> result.report  # doctest: +SKIP
        PosixPath('demo-out/report.html')
    """
    out = config.out
    _check_out(out)
    (out / MARKERS).mkdir(parents=True, exist_ok=True)
    threads = config.resolved_threads()
    echo(f"quari demo ({config.size}): {threads} torch thread(s), output in {out}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(config, out, threads, echo)
    finally:
        torch.set_num_threads(before)


def _run(config: DemoConfig, out: Path, threads: int, echo: Callable[[str], None]) -> DemoResult:
    runner = StageRunner(out, echo, STAGE_COUNT)
    tracks = out / "tracks"
    sizes = config.track_sizes()
    galleries = [tracks / t / "test" / "gallery" for t in TRACKS]

    def build_tracks() -> dict[str, Any]:
        fm = config.data
        if not isinstance(fm, FashionMNIST):
            fm = load_fashion_mnist(fm, progress=config.progress)
        echo(f"Fashion-MNIST: read from {_where(fm)}")
        encoder = EncoderConfig(threads=threads)
        info = build_fashion_tracks(
            tracks, size=sizes, seed=config.seed, data=fm, config=encoder, progress=config.progress
        )
        keep = ("encoder", "splits", "train_rows", "tracks", "seconds", "head", "encoded_now")
        return {"dataset": str(fm.folder), **{k: info[k] for k in keep}}

    runner.run(
        "tracks",
        f"Fashion-MNIST tracks ({sizes.train:,} train images, "
        f"{sizes.resolution} px): fit the offline head, embed every image",
        {"sizes": asdict(sizes), "seed": config.seed},
        build_tracks,
        outputs=[tracks],
        resumable=True,
    )

    def build_indexes() -> dict[str, Any]:
        done = {}
        for g in galleries:
            index = CandidateIndex.build(EmbeddingSet.open(g), progress=config.progress)
            done[str(g.relative_to(out))] = {"spec": index.spec, "rows": index.eset.rows}
        return done

    runner.run(
        "index",
        "candidate indexes over the test galleries",
        {"spec": "default"},
        build_indexes,
        parents=["tracks"],
        outputs=[g / "index" for g in galleries],
    )

    train_config = quari_config(config, tracks / "train", out / "model")

    def mine() -> dict[str, Any]:
        from quari.training import mine_semipositives

        eset = EmbeddingSet.open(tracks / "train")
        semi = mine_semipositives(
            eset, train_config.mining, overwrite=True, progress=config.progress
        )
        return {"rows": eset.rows, "found": int((semi.ids >= 0).all(axis=1).sum())}

    runner.run(
        "mine",
        "semi-positives of the training set",
        asdict(train_config.mining),
        mine,
        parents=["tracks"],
        outputs=[tracks / "train" / "semipos"],
        resumable=True,
    )

    def train_quari() -> dict[str, Any]:
        from lightning.pytorch.callbacks import Timer

        from quari.training import train

        timer = Timer(
            duration=timedelta(minutes=config.train_minutes), interval="step", verbose=False
        )
        result = train(train_config, callbacks=[timer])
        verdict = validation_verdict(result.metrics)
        if verdict:
            echo(verdict)
        stopped = result.steps < config.train_steps
        if stopped:
            echo(
                f"training stopped after {config.train_minutes:g} min at step {result.steps} "
                f"of {config.train_steps} (--minutes); its best weights are kept"
            )
        return {
            "steps": result.steps,
            "stopped_by_time": stopped,
            "exported": result.exported,
            "metrics": result.metrics,
            **recipe_summary(train_config),
        }

    train_settings = {**train_config.to_dict(), "progress": None, "minutes": config.train_minutes}
    runner.run(
        "train",
        "train QuARI (default recipe)",
        train_settings,
        train_quari,
        parents=["mine"],
        outputs=[out / "model"],
    )

    # The full map (ILIAS) and the low-rank form at QuARI's rank: QuARI without the query input.
    linears = {
        "linear": linear_config(config, tracks / "train", out / "linear"),
        "static": linear_config(config, tracks / "train", out / "static", rank=train_config.rank),
    }

    def train_linear_adapters() -> dict[str, Any]:
        from quari.eval.linear import train_linear

        done = {name: train_linear(cfg) for name, cfg in linears.items()}
        return {
            name: {"steps": r.steps, "best_epoch": r.best_epoch, "metrics": r.metrics}
            for name, r in done.items()
        }

    runner.run(
        "linear",
        "train the linear-adapter baselines (full, and low-rank at QuARI's rank)",
        {name: {**asdict(cfg), "progress": None} for name, cfg in linears.items()},
        train_linear_adapters,
        parents=["tracks"],
        outputs=[cfg.out for cfg in linears.values()],
    )

    results_path = out / "eval" / "results.json"

    def evaluate() -> dict[str, Any]:
        results = _evaluate(out, tracks, config.progress)
        save_results(results, results_path)
        write_report(results, out / "eval")
        return {"results": len(results), "table": demo_table(results)}

    runner.run(
        "evaluate",
        "evaluate cosine, the linear adapters and QuARI on both tracks' test queries",
        {"k": K, "methods": [[m[0], list(m[2])] for m in METHODS]},
        evaluate,
        parents=["index", "train", "linear"],
        outputs=[out / "eval"],
    )

    def report() -> dict[str, Any]:
        results = load_results(results_path)
        shown = pick_showcase(
            out,
            tracks,
            load_model(out / "model"),
            results,
            config.showcase,
            config.top,
            HEADLINE_MODE,
        )
        info = {
            "size": config.size,
            "sizes": asdict(sizes),
            "serve": serve_command(out),
            "stages": [asdict(r) for r in runner.records],
        }
        write_page(out / "report.html", results, shown, info)
        return {"queries": len(shown)}

    runner.run(
        "report",
        "write report.html",
        {"showcase": config.showcase, "top": config.top},
        report,
        parents=["evaluate"],
        outputs=[out / "report.html", out / "report.json"],
    )

    results = load_results(results_path)
    summary = {
        "format": "quari-demo/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "size": config.size,
        "sizes": asdict(sizes),
        "steps": config.train_steps,
        "minutes": config.train_minutes,
        "seed": config.seed,
        "stages": [asdict(r) for r in runner.records],
        "serve": serve_command(out),
    }
    text = json.dumps(summary, indent=1, default=str) + "\n"
    atomic_write(out / "demo.json", lambda f: f.write(text.encode()))
    return DemoResult(
        out, out / "report.html", results, demo_table(results), runner.records, serve_command(out)
    )


def _evaluate(out: Path, tracks: Path, progress: bool) -> list[EvalResult]:
    """Every method in each of its modes on both tracks' test queries."""
    models = {folder: load_model(out / folder) for _, folder, _ in METHODS if folder}
    results = []
    for track in TRACKS:
        gallery = EmbeddingSet.open(tracks / track / "test" / "gallery")
        index = CandidateIndex.load(gallery)
        ev = CustomEvaluator(
            tracks / track / "test" / "queries.parquet", gallery, k=K, split=f"{track}-test"
        )
        for name, folder, modes in METHODS:
            for mode in modes:
                results.append(
                    ev.evaluate(
                        models.get(folder) if folder else None,
                        mode=mode,
                        name=name,
                        index=index,
                        progress=progress,
                    )
                )
    return results
