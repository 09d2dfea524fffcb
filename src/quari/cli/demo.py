"""``quari demo``: the end-to-end demo (:mod:`quari.demo`) — what ``make demo`` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from quari.cli import app, console, err_console, friendly_errors
from quari.demo import DEFAULT_SIZE, DEMO_SIZES, DemoConfig, DemoResult, run_demo
from quari.demo.report import METRIC_NAMES, TRACK_TITLES, gain_text
from quari.eval.report import format_value

_SIZES = "; ".join(f"{name}: {s.summary}" for name, s in DEMO_SIZES.items())


def _print_table(result: DemoResult) -> None:
    """The metric table of each track, QuARI's gain over cosine in the last column."""
    for track, title in TRACK_TITLES.items():
        rows = [r for r in result.table if r["track"] == track]
        if not rows:
            continue
        metrics = [m for m in METRIC_NAMES if m in rows[0]["metrics"]]
        table = Table(title=f"{title} · {rows[0]['queries']} test queries", title_justify="left")
        for col in ("method", "mode", *(METRIC_NAMES[m] for m in metrics), "ms/q", "vs cosine"):
            table.add_column(col, justify="left" if col in ("method", "mode") else "right")
        for r in rows:
            gain, verdict = gain_text(r)
            gain = f"({gain})" if verdict == "n.s." else gain  # short enough for 80 columns
            style = {"up": "green", "down": "red", "n.s.": "dim"}.get(verdict, "")
            table.add_row(
                r["method"],
                r["mode"],
                *(format_value(m, r["metrics"][m]) for m in metrics),
                f"{r['ms_per_query']:.2f}",
                f"[{style}]{gain}[/]" if style else gain,
            )
        console.print(table)
    console.print(
        "vs cosine in (brackets): not beyond chance (the 95 % interval of a paired bootstrap "
        "over the queries holds 0)"
    )


@app.command()
@friendly_errors
def demo(
    size: Annotated[str, typer.Option(help=f"Demo size. {_SIZES}.")] = DEFAULT_SIZE,
    out: Annotated[Path, typer.Option(help="Output folder (a rerun reuses its stages).")] = Path(
        "demo-out"
    ),
    train_images: Annotated[
        int | None, typer.Option(help="Training images (default: the size's).")
    ] = None,
    val_images: Annotated[
        int | None, typer.Option(help="Validation images (default: the size's).")
    ] = None,
    test_images: Annotated[int | None, typer.Option(help="Test images (default: the size's).")] = (
        None
    ),
    text_queries: Annotated[
        int | None, typer.Option(help="Text→image queries per split (default: the size's).")
    ] = None,
    image_queries: Annotated[
        int | None, typer.Option(help="Image→image queries per split (default: the size's).")
    ] = None,
    resolution: Annotated[
        int | None, typer.Option(help="EfficientNet input size in px (default: the size's).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="QuARI training steps (default: the size's).")
    ] = None,
    minutes: Annotated[
        float | None,
        typer.Option(help="Stop QuARI training after this many minutes (default: the size's)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the tracks and of both trainings.")] = 0,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Folder with Fashion-MNIST's four files (default: $QUARI_FASHION_MNIST, "
            "Debian's dataset-fashion-mnist, the cache, else a verified download)."
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="Torch threads (default: every core if the machine is idle at the start, else 1)."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Run the end-to-end demo: Fashion-MNIST → offline encoder → index → QuARI → report.html.

    Builds the real-image tracks, trains QuARI with the default recipe and a linear-adapter
    baseline, evaluates both tracks' test queries against the frozen backbone, and writes
    OUT/report.html. A second run reuses every finished stage.
    """
    config = DemoConfig(
        out=out,
        size=size,
        train_images=train_images,
        val_images=val_images,
        test_images=test_images,
        text_queries=text_queries,
        image_queries=image_queries,
        resolution=resolution,
        steps=steps,
        minutes=minutes,
        seed=seed,
        data=data,
        threads=threads,
        progress=not quiet,
    )
    result = run_demo(config, echo=lambda line: err_console.print(line, highlight=False))
    _print_table(result)
    wall = sum(s.wall_s for s in result.stages if not s.reused)
    reused = [s.name for s in result.stages if s.reused]
    console.print(
        f"report: {result.report}  ({wall:.0f} s this run"
        + (f"; reused: {', '.join(reused)}" if reused else "")
        + ")",
        highlight=False,
    )
    console.print(f"serve the demo set: {result.serve}", highlight=False, soft_wrap=True)
