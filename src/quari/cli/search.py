"""Commands for embedding sets, candidate indexes and search."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from quari.checkpoint import load_model
from quari.cli import (
    BLEND_WEIGHT_HELP,
    app,
    console,
    err_console,
    friendly_errors,
    with_blend_weight,
)
from quari.embed.images import load_image
from quari.encoders import EncoderConfig, load_encoder
from quari.errors import NotFoundError, QuARIInputError
from quari.index import DEFAULT_SPEC, CandidateIndex, list_backends
from quari.retriever import MODES, Retriever
from quari.store import EmbeddingSet
from quari.validation import load_array_file

index_app = typer.Typer(
    rich_markup_mode=None, help="Candidate indexes over an embedding set.", no_args_is_help=True
)
set_app = typer.Typer(
    rich_markup_mode=None, help="Inspect and check embedding sets.", no_args_is_help=True
)
app.add_typer(index_app, name="index")
app.add_typer(set_app, name="set")


@index_app.command("build")
@friendly_errors
def index_build(
    set_path: Annotated[Path, typer.Argument(help="Embedding set folder.")],
    backend: Annotated[
        str,
        typer.Option(
            help="Backend spec: faiss:auto (factory by size), faiss:<factory> (e.g. "
            "faiss:HNSW32), milvus://HOST:PORT[/COLLECTION], milvus-lite:PATH.db[/COLLECTION]; "
            "see `quari index backends`."
        ),
    ] = DEFAULT_SPEC,
    nprobe: Annotated[int, typer.Option(help="FAISS: IVF lists probed per query.")] = 32,
    ef_search: Annotated[int, typer.Option(help="FAISS: HNSW search breadth.")] = 256,
    fields: Annotated[
        str | None,
        typer.Option(
            help="Milvus: metadata columns to copy as scalar fields (comma-separated), so "
            "--where filters on them run inside Milvus."
        ),
    ] = None,
    milvus_index: Annotated[
        str, typer.Option(help="Milvus: vector index (FLAT = exact, IVF_FLAT, HNSW, AUTOINDEX).")
    ] = "AUTOINDEX",
    milvus_params: Annotated[
        str | None,
        typer.Option(
            help='Milvus: JSON {"index": {build params}, "search": {search params}}, e.g. '
            '\'{"index": {"nlist": 1024}, "search": {"nprobe": 32}}\'.'
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(help="Milvus: drop and rebuild a collection quari built from another set."),
    ] = False,
    update: Annotated[
        bool, typer.Option(help="Only add rows appended since the last build.")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Build (or update) the candidate index beside an embedding set.

    A Milvus build that stops midway (a crash, Ctrl-C) resumes when run again.
    """
    eset = EmbeddingSet.open(set_path)
    if update and CandidateIndex.exists(eset):
        index = CandidateIndex.load(eset, update=True)
        console.print(f"index {index.spec} over {index.rows:,} rows is up to date")
        index.close()
        return
    if backend.startswith("faiss"):
        options: dict = {"nprobe": nprobe, "ef_search": ef_search}
    elif backend.startswith("milvus"):
        params = _json_option("--milvus-params", milvus_params)
        unknown = sorted(set(params) - {"index", "search"})
        if unknown:
            raise QuARIInputError(f"--milvus-params: unknown keys {unknown}; use index, search")
        options = {
            "fields": fields or "",
            "index_type": milvus_index,
            "index_params": params.get("index", {}),
            "search_params": params.get("search", {}),
            "overwrite": overwrite,
        }
    else:
        options = {}
    index = CandidateIndex.build(eset, backend, progress=not quiet, **options)
    console.print(
        f"built {index.spec} over {index.rows:,} rows in "
        f"{index.info.get('build_seconds', 0):.1f} s (index/{index.name}.json)"
    )
    index.close()


def _json_option(name: str, text: str | None) -> dict:
    """A JSON object given on the command line ({} when absent)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QuARIInputError(f"{name}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise QuARIInputError(f"{name}: expected a JSON object, got {text!r}")
    return value


@index_app.command("backends")
def index_backends() -> None:
    """List the candidate-index backends and their spec strings."""
    for scheme, summary in list_backends().items():
        console.print(f"[bold]{scheme}[/]  {summary}")


@set_app.command("info")
@friendly_errors
def set_info(set_path: Annotated[Path, typer.Argument(help="Embedding set folder.")]) -> None:
    """Describe an embedding set (rows, dim, encoder, shards, metadata columns, index)."""
    eset = EmbeddingSet.open(set_path)
    columns = False
    if eset.has_metadata:  # the names --where and --columns take, with their types
        schema = eset.metadata_table(eset.shards[0]).schema
        columns = ", ".join(f"{field.name} ({field.type})" for field in schema)
    table = Table(show_header=False, box=None)
    for key, value in [
        ("path", str(eset.root)),
        ("rows", f"{eset.rows:,}"),
        ("dim", eset.dim),
        ("encoder", eset.encoder),
        ("dtype", eset.dtype),
        ("normalized", eset.normalized),
        ("shards", len(eset.shards)),
        ("text embeddings", eset.has_text),
        ("metadata", columns),
        ("manifest", eset.has_manifest),
        ("index", CandidateIndex.exists(eset)),
    ]:
        table.add_row(f"[bold]{key}[/]", str(value))
    console.print(table)


@set_app.command("verify")
@friendly_errors
def set_verify(set_path: Annotated[Path, typer.Argument(help="Embedding set folder.")]) -> None:
    """Read every byte: checksums, NaN/Inf and all-zero rows."""
    eset = EmbeddingSet.open(set_path)
    eset.verify()
    console.print(f"ok: {eset.rows:,} rows in {len(eset.shards)} shards")


@app.command()
@friendly_errors
def search(
    set_path: Annotated[Path, typer.Argument(help="Embedding set folder.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="QuARI model: a model folder, a reference checkpoint folder, or "
            "hf:<repo-id> (e.g. hf:EricX003/QuARI-google-siglip2-base-patch16-512)."
        ),
    ] = None,
    query_embeddings: Annotated[
        Path | None, typer.Option(help=".npy of (B, E) or (E,) query embeddings.")
    ] = None,
    query_rows: Annotated[
        str | None, typer.Option(help="Comma-separated row ids of the set to use as image queries.")
    ] = None,
    text: Annotated[
        list[str] | None, typer.Option(help="A text query (repeat for several); needs --encoder.")
    ] = None,
    image: Annotated[
        list[Path] | None,
        typer.Option(help="An image file as the query (repeat for several); needs --encoder."),
    ] = None,
    encoder: Annotated[
        str | None,
        typer.Option(help="Encoder spec for --text/--image (the set's own, e.g. hf:<model>)."),
    ] = None,
    mode: Annotated[str, typer.Option(help=f"One of {', '.join(MODES)}.")] = "adaptive",
    k: Annotated[int, typer.Option("-k", "--k", help="Results per query.")] = 10,
    candidates: Annotated[int, typer.Option(help="Index candidates per query (K).")] = 1000,
    where: Annotated[
        str | None, typer.Option(help="Metadata filter, e.g. 'label == \"cat\" and width > 256'.")
    ] = None,
    columns: Annotated[
        str | None, typer.Option(help="Metadata columns to show (comma-separated).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    device: Annotated[str, typer.Option(help="Torch device for the model and scoring.")] = "cpu",
    engine: Annotated[
        str,
        typer.Option(
            help="Where exact scans run: local (this process) or ray (tasks over the set's "
            "shards; extra [distributed])."
        ),
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(help="--engine ray: cluster address (e.g. auto); default: a local Ray."),
    ] = None,
    ray_workers: Annotated[
        int | None, typer.Option(help="--engine ray: tasks per scan (default: the cluster's CPUs).")
    ] = None,
    rescore_from: Annotated[
        str,
        typer.Option(
            help="Where candidates' exact vectors come from: set (its fp16 files) or milvus "
            "(the Milvus collection's copies, for a set whose files are remote)."
        ),
    ] = "set",
    blend_weight: Annotated[float | None, typer.Option(help=BLEND_WEIGHT_HELP)] = None,
) -> None:
    """Search an embedding set with query embeddings, set rows, texts or images."""
    eset = EmbeddingSet.open(set_path)
    shown = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    if shown:
        known = ["rank", "row", "score"]
        if eset.has_metadata and eset.shards:
            known += eset.metadata_table(eset.shards[0]).column_names
        unknown = [c for c in shown if c not in known]
        if unknown:
            raise NotFoundError(f"--columns: no column {unknown[0]!r}; the set has {known}")
    given = [query_embeddings, query_rows, text or None, image or None]
    if sum(x is not None for x in given) != 1:
        raise QuARIInputError(
            "give exactly one of --query-embeddings, --query-rows, --text and --image"
        )
    queries, texts, images = None, text or None, None
    if query_embeddings is not None:
        queries = load_array_file(query_embeddings, "query embeddings")
    elif query_rows is not None:
        try:
            rows = [int(r) for r in query_rows.split(",") if r.strip()]
        except ValueError:
            raise QuARIInputError(f"--query-rows: expected integers, got {query_rows!r}") from None
        queries = eset.gather(rows).astype(np.float32)
    elif image:
        images = [load_image(path).image for path in image]
    if (texts or images) and encoder is None:
        raise QuARIInputError("--text and --image need --encoder (the set's encoder spec)")
    query_encoder = load_encoder(encoder, EncoderConfig(device=device)) if encoder else None
    if engine not in ("local", "ray"):
        raise QuARIInputError(f"--engine must be local or ray, got {engine!r}")
    if rescore_from not in ("set", "milvus"):
        raise QuARIInputError(f"--rescore-from must be set or milvus, got {rescore_from!r}")
    scan_engine: object = "local"
    if engine == "ray":
        from quari.scan_ray import RayScan, RayScanConfig

        scan_engine = RayScan(RayScanConfig(address=ray_address, workers=ray_workers))
    quari_model = with_blend_weight(load_model(model) if model else None, blend_weight)
    index = CandidateIndex.load(eset) if mode != "scan" and CandidateIndex.exists(eset) else None
    if rescore_from == "milvus" and (index is None or not index.backend.startswith("milvus")):
        raise QuARIInputError(
            "--rescore-from milvus needs a Milvus index beside the set (quari index build "
            "--backend milvus…)"
        )
    retriever = Retriever(
        eset,
        quari_model,
        index,
        encoder=query_encoder,
        device=device,
        scan_engine=scan_engine,
        rescore_from="index" if rescore_from == "milvus" else "set",
    )
    try:
        result = retriever.search(
            queries, k, texts=texts, images=images, mode=mode, candidates=candidates, where=where
        )
    finally:
        if index is not None:
            index.close()
        if engine == "ray":
            scan_engine.close()
    records = result.to_records()
    if as_json:
        json.dump(
            {"mode": result.mode, "notes": result.notes, "results": records},
            sys.stdout,
            default=str,
        )
        sys.stdout.write("\n")
        return
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    for b, rows in enumerate(records):
        table = Table(title=f"query {b} · {result.mode}", title_justify="left")
        keys = ["rank", "row", "score"]
        extra = (
            shown
            if shown is not None
            else [c for c in (rows[0] if rows else {}) if c not in keys][:3]
        )
        for key in keys + extra:
            table.add_column(key, justify="right" if key in keys else "left")
        for rec in rows:
            table.add_row(
                *(f"{rec[c]:.4f}" if c == "score" else str(rec.get(c, "")) for c in keys + extra)
            )
        console.print(table)
