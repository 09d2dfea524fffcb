"""``quari serve``: the HTTP search service and web page (:mod:`quari.serve`) over one set."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from quari.checkpoint import load_model
from quari.cli import BLEND_WEIGHT_HELP, app, console, friendly_errors, with_blend_weight
from quari.encoders import EncoderConfig, load_encoder
from quari.errors import QuARIInputError, missing_extra
from quari.index import CandidateIndex
from quari.retriever import Retriever
from quari.runtime import RUNTIMES, cache_dir
from quari.store import EmbeddingSet


@app.command()
@friendly_errors
def serve(
    set_path: Annotated[Path, typer.Argument(help="Embedding set folder.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="QuARI model (folder, reference checkpoint folder or hf:<repo>); without "
            "it, plain cosine only."
        ),
    ] = None,
    encoder: Annotated[
        str | None,
        typer.Option(
            help="Encoder spec for text and image queries (the set's own); without it the "
            "service answers embeddings and item ids."
        ),
    ] = None,
    runtime: Annotated[
        str | None,
        typer.Option(
            help=f"How the model runs on a CPU, one of {', '.join(RUNTIMES)}: fp32 (the "
            "default: the faster of eager and onnx, per batch size, measured once per model "
            "and machine and kept in the cache folder), eager (PyTorch, fp32), onnx (fp32 "
            "through ONNX Runtime), bf16/int8 (reduced precision), auto (the fastest that "
            "passes the quality guard, measured likewise). docs/results.md, CPU runtimes."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    device: Annotated[str, typer.Option(help="Torch device for the model and scoring.")] = "cpu",
    max_k: Annotated[int, typer.Option(help="Largest k a request may ask for.")] = 1000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest query image (MB).")] = 8.0,
    max_image_pixels: Annotated[
        int, typer.Option(help="Largest query image in pixels (bombs refused unread).")
    ] = 40_000_000,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds a request may take, body upload included.")
    ] = 30.0,
    batching: Annotated[
        bool, typer.Option(help="Micro-batch concurrent queries through encoder and model.")
    ] = True,
    batch_window_ms: Annotated[
        float, typer.Option(help="How long a batch waits for more queries.")
    ] = 3.0,
    max_batch: Annotated[int, typer.Option(help="Most queries per batch.")] = 32,
    image_root: Annotated[
        Path | None,
        typer.Option(help="Folder item images lie in (metadata 'path'); default: the set."),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(help="An origin allowed to call the API from a browser (repeat); none: off."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    blend_weight: Annotated[float | None, typer.Option(help=BLEND_WEIGHT_HELP)] = None,
) -> None:
    """Serve an embedding set over HTTP: a JSON search API and a web page at /."""
    try:
        import uvicorn

        from quari.serve import ServeSettings, create_app
    except ImportError as exc:
        raise missing_extra("quari serve", "serve", exc) from exc
    settings = ServeSettings(
        max_k=max_k,
        max_upload_bytes=max(1, int(max_upload_mb * 1024 * 1024)),
        max_image_pixels=max_image_pixels,
        request_timeout=request_timeout,
        batching=batching,
        batch_window_ms=batch_window_ms,
        max_batch=max_batch,
        image_root=image_root,
        cors_origins=tuple(cors_origin or ()),
    )
    eset = EmbeddingSet.open(set_path)
    index = CandidateIndex.load(eset) if CandidateIndex.exists(eset) else None
    quari_model = with_blend_weight(load_model(model) if model else None, blend_weight)
    if hasattr(quari_model, "set_runtime"):
        runtime = runtime or "fp32"
        if runtime in ("fp32", "auto"):
            console.print(
                f"runtime {runtime}: choosing by measurement on the first start with this "
                f"model on this machine (~1 min for the paper size on 2 cores, the ONNX export "
                f"included), kept in {cache_dir()} for the next",
                highlight=False,
            )
        quari_model.set_runtime(runtime)
        runtime = quari_model.runtime
    elif runtime not in (None, "eager"):
        raise QuARIInputError(f"--runtime {runtime} needs a QuARI model (--model)")
    query_encoder = load_encoder(encoder, EncoderConfig(device=device)) if encoder else None
    retriever = Retriever(eset, quari_model, index, encoder=query_encoder, device=device)
    web = create_app(retriever, settings)
    console.print(
        f"serving {eset.root} ({eset.rows:,} rows) on http://{host}:{port}/ "
        f"(model: {model or 'none'}{f', runtime {runtime}' if model and runtime else ''}, "
        f"encoder: {encoder or 'none'}, index: "
        f"{index.spec if index is not None else 'none'})",
        highlight=False,
    )
    # uvicorn shuts down gracefully on SIGTERM (the batcher drains in the app's lifespan),
    # then raises the signal again with the handler it found: make that handler an exit 0, so
    # a clean shutdown reads as one.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    uvicorn.run(
        web,
        host=host,
        port=port,
        log_level=log_level,
        # Slow or idle clients: idle keep-alive connections close after 5 s, headers are
        # capped (h11), bodies are bounded by the app's size limit and request timeout.
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=64 * 1024,
        limit_concurrency=1024,
        timeout_graceful_shutdown=max(5, int(request_timeout)),
    )
