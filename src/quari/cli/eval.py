"""``quari eval``: run benchmark protocols and your own queries; ``quari eval report``.

Every protocol command takes the methods to compare (``--model``, repeatable: ``cosine``,
``aqe[:n=…]``, ``dba[:k=…]``, a model folder or ``hf:<repo>`` — a QuARI model or a linear
adapter; ``--blend-weight``, repeatable, scores each blended QuARI model at those weights),
the modes (``--mode``, repeatable, or ``all``), prints one table side by side and
writes every result to ``--out`` as JSON, which ``quari eval report`` turns into markdown and
plots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from quari.cli import app, console, err_console, friendly_errors
from quari.encoders import Encoder, EncoderConfig, load_encoder
from quari.eval.methods import Method, resolve_method
from quari.eval.protocols import (
    CustomEvaluator,
    EvalResult,
    Evaluator,
    IliasEvaluator,
    InquireFullrank,
    InquireRerank,
    load_results,
    save_results,
)
from quari.eval.protocols.ilias import MINI_IDS, import_gallery
from quari.eval.protocols.io import default_cache_dir
from quari.eval.report import format_value, write_report
from quari.index import CandidateIndex
from quari.store import EmbeddingSet
from quari.validation import QuARIInputError

eval_app = typer.Typer(
    rich_markup_mode=None,
    help="Evaluate methods on INQUIRE, ILIAS or your own labelled queries; write reports.",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")

# Sets larger than this get a candidate index before searching (the Retriever scans smaller
# ones exactly); only sets quari wrote into its cache are indexed automatically.
_SCAN_BELOW = 250_000

Models = Annotated[
    list[str] | None,
    typer.Option(
        "--model",
        help="cosine, aqe[:n=N,alpha=A], dba[:k=K,alpha=A], a model folder (QuARI or linear "
        "adapter), hf:<repo>, or (inquire-rerank) initial: the release's clip_score order; "
        "repeat to compare (default: cosine).",
    ),
]
ModesOpt = Annotated[
    list[str] | None,
    typer.Option("--mode", help="plain, rerank, adaptive, scan (repeatable) or all (default)."),
]
Out = Annotated[Path | None, typer.Option(help="Write every result to this JSON file.")]
EncoderOpt = Annotated[
    str | None, typer.Option(help="Encoder spec for text/image queries (the gallery's own).")
]
Candidates = Annotated[int, typer.Option(help="Index candidates per query (K).")]
Device = Annotated[str, typer.Option(help="Torch device for models and scoring.")]
BatchSize = Annotated[int, typer.Option(help="Queries searched together.")]
Quiet = Annotated[bool, typer.Option(help="No progress bars.")]
MaxQueries = Annotated[
    int | None, typer.Option(help="Evaluate only the first N queries (quick runs).")
]
Cache = Annotated[
    Path | None, typer.Option(help="Folder for imported galleries (default ~/.cache/quari/eval).")
]
BlendWeights = Annotated[
    list[float] | None,
    typer.Option(
        "--blend-weight",
        help="Score each QuARI model with this weight a of its whitened-cosine blend instead of "
        "its trained one; repeat to compare weights side by side, one row each (docs/method.md "
        "§5.6). Other methods run once.",
    ),
]


def _index_for(
    cache: Path | None, progress: bool
) -> Callable[[EmbeddingSet], CandidateIndex | None]:
    """Loads a set's index; builds one for large sets that live in quari's cache."""
    cache_root = (cache or default_cache_dir() / "eval").resolve()
    memo: dict[Path, CandidateIndex | None] = {}

    def index_for(eset: EmbeddingSet) -> CandidateIndex | None:
        root = eset.root.resolve()
        if root not in memo:
            if CandidateIndex.exists(eset):
                memo[root] = CandidateIndex.load(eset)
            elif eset.rows > _SCAN_BELOW and cache_root in root.parents:
                err_console.print(f"building a candidate index over {eset.rows:,} rows …")
                memo[root] = CandidateIndex.build(eset, progress=progress)
            else:
                memo[root] = None
        return memo[root]

    return index_for


@dataclass(frozen=True)
class RunOptions:
    """The options every protocol command shares."""

    candidates: int
    batch_size: int
    device: str
    cache: Path | None
    quiet: bool
    out: Path | None
    max_queries: int | None = None
    blend_weights: Sequence[float] | None = ()

    def __post_init__(self) -> None:
        # --blend-weight arrives as None or a list; kept as a tuple (frozen, hashable)
        object.__setattr__(self, "blend_weights", tuple(self.blend_weights or ()))


def _run(
    evaluators: list[Evaluator],
    specs: list[str] | None,
    modes: list[str] | None,
    validation: Evaluator | None,
    encoder: Encoder | None,
    options: RunOptions,
) -> list[EvalResult]:
    """Resolves every method and runs it in every mode on every evaluator; prints and saves."""
    candidates, batch_size, device = options.candidates, options.batch_size, options.device
    cache, quiet, out = options.cache, options.quiet, options.out
    index_for = _index_for(cache, not quiet)
    results: list[EvalResult] = []
    for ev in evaluators:
        if encoder is not None:
            ev.queries(encoder)  # embed once for every method
        for spec in specs or ["cosine"]:
            if spec == "initial":  # the release's own first-stage order (INQUIRE-Rerank)
                if not isinstance(ev, InquireRerank):
                    raise QuARIInputError("--model initial exists for inquire-rerank only")
                results.append(ev.initial_ranking())
                continue
            method: Method = resolve_method(
                spec,
                ev,
                index_for=index_for,
                validation=validation,
                cache=cache,
                map_location=device,
                progress=not quiet,
            )
            for name in _blend_variants(method, options.blend_weights):
                for mode in method.modes(modes or ["all"], ev.fixed_candidates):
                    index = method.index if method.gallery is not None else index_for(ev.gallery)
                    results.append(
                        ev.evaluate(
                            method.adapter,
                            mode=mode,
                            name=name,
                            method={**method.describe(), "name": name},
                            encoder=encoder,
                            index=index,
                            gallery=method.gallery,
                            candidates=candidates,
                            batch_size=batch_size,
                            device=device,
                            progress=not quiet,
                            max_queries=options.max_queries,
                        )
                    )
    _print(results)
    if out is not None:
        save_results(results, out)
        console.print(f"wrote {len(results)} result(s) → {out}")
    return results


def _blend_variants(method: Method, weights: tuple[float, ...]) -> Iterator[str]:
    """Sets ``method``'s model to each of ``weights`` in turn (every weight checked first, so
    a model that cannot take one fails before any work), yielding the row name for each; a
    method that is not a QuARI model, or no weights, runs once as it is."""
    model = method.adapter
    if not weights or not hasattr(model, "set_blend_weight"):
        yield method.name
        return
    try:
        for weight in weights:
            model.set_blend_weight(weight)  # raises by name for a weight the model cannot take
        for weight in weights:
            model.set_blend_weight(weight)
            yield f"{method.name} (a={weight:g})"
    finally:
        model.set_blend_weight(None)


def _print(results: list[EvalResult]) -> None:
    by_protocol: dict[tuple[str, str], list[EvalResult]] = {}
    for r in results:
        by_protocol.setdefault((r.protocol, r.split), []).append(r)
    for (protocol, split), rs in by_protocol.items():
        metrics = list(rs[0].metrics)
        table = Table(title=f"{protocol} ({split}) · {rs[0].queries} queries", title_justify="left")
        for col in ("method", "mode", *metrics, "ms/query"):
            table.add_column(col, justify="left" if col in ("method", "mode") else "right")
        best = max(r.primary for r in rs)
        for r in rs:
            cells = [format_value(m, r.metrics[m]) for m in metrics]
            if r.primary == best:
                cells[metrics.index(r.primary_metric)] = (
                    f"[bold]{cells[metrics.index(r.primary_metric)]}[/]"
                )
            table.add_row(str(r.method["name"]), r.mode, *cells, f"{r.timings['per_query_ms']:.2f}")
        console.print(table)
        for note in sorted({n for r in rs for n in r.notes}):
            err_console.print(f"[yellow]note:[/] {note}", highlight=False)


def _encoder(spec: str | None, device: str) -> Encoder | None:
    return load_encoder(spec, EncoderConfig(device=device)) if spec else None


@eval_app.command("inquire-fullrank")
@friendly_errors
def inquire_fullrank(
    root: Annotated[Path, typer.Argument(help="INQUIRE checkout (data/inquire, data/inat24).")],
    embeddings: Annotated[
        str,
        typer.Option(help="Gallery: a key under data/inat24/embs (e.g. vit-h-14-378) or a folder."),
    ],
    model: Models = None,
    mode: ModesOpt = None,
    split: Annotated[str, typer.Option(help="test or val.")] = "test",
    query_embeddings: Annotated[
        Path | None, typer.Option(help="Parquet of query embeddings keyed by query_id.")
    ] = None,
    encoder: EncoderOpt = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Cut-off (official: 50).")] = 50,
    candidates: Candidates = 1000,
    out: Out = None,
    device: Device = "cpu",
    batch_size: BatchSize = 32,
    cache: Cache = None,
    quiet: Quiet = False,
    max_queries: MaxQueries = None,
    blend_weight: BlendWeights = None,
) -> None:
    """INQUIRE-Fullrank: text → whole iNat24 gallery, AP@50 (R = all annotated positives)."""
    enc = _encoder(encoder, device)

    def make(which: str) -> InquireFullrank:
        return InquireFullrank.from_root(
            root, embeddings, split=which, query_embeddings=query_embeddings, k=k
        )

    validation = make("val") if split == "test" else None
    if validation is not None and enc is not None:
        validation.queries(enc)
    options = RunOptions(
        candidates, batch_size, device, cache, quiet, out, max_queries, blend_weight
    )
    _run([make(split)], model, mode, validation, enc, options)


@eval_app.command("inquire-rerank")
@friendly_errors
def inquire_rerank(
    release: Annotated[
        Path, typer.Argument(help="Local copy of the INQUIRE-Rerank parquet release.")
    ],
    model: Models = None,
    mode: ModesOpt = None,
    split: Annotated[str, typer.Option(help="test or val.")] = "test",
    image_embeddings: Annotated[
        Path | None, typer.Option(help="Parquet of candidate embeddings keyed by inat24_image_id.")
    ] = None,
    query_embeddings: Annotated[
        Path | None, typer.Option(help="Parquet of query embeddings keyed by query (the text).")
    ] = None,
    encoder: EncoderOpt = None,
    out: Out = None,
    device: Device = "cpu",
    batch_size: BatchSize = 32,
    cache: Cache = None,
    quiet: Quiet = False,
    max_queries: MaxQueries = None,
    blend_weight: BlendWeights = None,
) -> None:
    """INQUIRE-Rerank: re-order each query's fixed 100 candidates; AP over the 100."""
    enc = _encoder(encoder, device)

    def make(which: str) -> InquireRerank:
        return InquireRerank(
            release,
            split=which,
            image_embeddings=image_embeddings,
            query_embeddings=query_embeddings,
            encoder=enc,
            cache=cache,
        )

    validation = make("val") if split == "test" else None
    options = RunOptions(100, batch_size, device, cache, quiet, out, max_queries, blend_weight)
    _run([make(split)], model, mode, validation, enc, options)


@eval_app.command("ilias")
@friendly_errors
def ilias(
    root: Annotated[Path, typer.Argument(help="ILIAS data folder (image_ids/, misc/).")],
    features: Annotated[
        Path | None, typer.Option(help="Folder of the HDF5 feature files (default: ROOT).")
    ] = None,
    track: Annotated[str, typer.Option(help="i2i, t2i or both (scored separately).")] = "both",
    mini: Annotated[bool, typer.Option(help="mini-ILIAS (the 5M distractor subset).")] = False,
    model: Models = None,
    mode: ModesOpt = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Cut-off (official: 1000).")] = 1000,
    candidates: Candidates = 1000,
    out: Out = None,
    device: Device = "cpu",
    batch_size: BatchSize = 32,
    cache: Cache = None,
    quiet: Quiet = False,
    max_queries: MaxQueries = None,
    blend_weight: BlendWeights = None,
) -> None:
    """ILIAS / mini-ILIAS: image→image and text→image mAP@1k (the gallery imported once)."""
    tracks = ["i2i", "t2i"] if track == "both" else [track]
    # Both tracks find the same imported gallery in the cache (it is keyed by its source).
    evaluators: list[Evaluator] = [
        IliasEvaluator(
            root, features=features, track=t, mini=mini, cache=cache, k=k, progress=not quiet
        )
        for t in tracks
    ]
    options = RunOptions(
        candidates, batch_size, device, cache, quiet, out, max_queries, blend_weight
    )
    _run(evaluators, model, mode, None, None, options)


@eval_app.command("ilias-import")
@friendly_errors
def ilias_import(
    root: Annotated[Path, typer.Argument(help="ILIAS data folder (image_ids/).")],
    out: Annotated[Path, typer.Option(help="The new embedding set's folder.")],
    features: Annotated[
        Path | None, typer.Option(help="Folder of the HDF5 feature files (default: ROOT).")
    ] = None,
    mini: Annotated[bool, typer.Option(help="Keep only the mini-ILIAS distractors.")] = False,
    quiet: Quiet = False,
) -> None:
    """Import an ILIAS gallery (positives + distractors) as an embedding set."""
    mini_ids = root / "image_ids" / MINI_IDS if mini else None
    eset = import_gallery(features or root, out, mini_ids=mini_ids, progress=not quiet)
    console.print(f"imported {eset.rows:,} rows → {out} (search it with quari index build/search)")


@eval_app.command("custom")
@friendly_errors
def custom(
    set_path: Annotated[Path, typer.Argument(help="Embedding set folder (the gallery).")],
    queries: Annotated[
        Path,
        typer.Option(
            help="Query parquet (query_id, text|image|embedding|row, relevant|relevant_where)."
        ),
    ],
    model: Models = None,
    mode: ModesOpt = None,
    encoder: EncoderOpt = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Cut-off of the ranked lists.")] = 100,
    val_queries: Annotated[
        Path | None, typer.Option(help="Validation queries, for tuning aqe / dba.")
    ] = None,
    candidates: Candidates = 1000,
    out: Out = None,
    device: Device = "cpu",
    batch_size: BatchSize = 32,
    cache: Cache = None,
    quiet: Quiet = False,
    max_queries: MaxQueries = None,
    blend_weight: BlendWeights = None,
) -> None:
    """Your own labelled queries over your own embedding set."""
    enc = _encoder(encoder, device)
    eset = EmbeddingSet.open(set_path)
    validation = None
    if val_queries is not None:
        validation = CustomEvaluator(val_queries, eset, k=k, split="val")
        validation.queries(enc)
    options = RunOptions(
        candidates, batch_size, device, cache, quiet, out, max_queries, blend_weight
    )
    _run([CustomEvaluator(queries, eset, k=k)], model, mode, validation, enc, options)


@eval_app.command("report")
@friendly_errors
def report(
    results: Annotated[list[Path], typer.Argument(help="Result JSON files from quari eval --out.")],
    out: Annotated[Path, typer.Option(help="Output folder for report.md and the plots.")],
    no_plots: Annotated[bool, typer.Option(help="Tables only (no matplotlib needed).")] = False,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="Method every other one is compared with (paired bootstrap over queries); "
            "default: the plain (frozen backbone) result."
        ),
    ] = None,
) -> None:
    """Collect result files into a markdown report with plots."""
    loaded = [r for path in results for r in load_results(path)]
    if not loaded:
        raise QuARIInputError("the result files hold no results")
    path = write_report(loaded, out, plots=not no_plots, baseline=baseline)
    pngs = sorted(p.name for p in out.glob("*.png"))
    console.print(f"wrote {path} ({len(loaded)} results, {len(pngs)} plots)")
