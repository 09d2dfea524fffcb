"""Builds the Fashion-MNIST tracks: splits, captions, queries, judgements, head and embeddings.

See :mod:`quari.eval.tracks` for the output layout. The steps, each reused by a rerun with the
same settings:

1. read Fashion-MNIST (:mod:`.fashion_mnist`); draw disjoint train / val items from its training
   split and test items from its test split;
2. fit the attribute thresholds on the train images only and assign levels to every image;
3. word two to three training captions per train image, and sample the val / test text queries
   with their relevance (:mod:`.judgements`), each split in its own phrasing (:mod:`.templates`);
4. lay out the image→image galleries and render every view (:mod:`.views`); write all PNGs;
5. compute EfficientNet features of every image and MiniLM embeddings of every text once
   (:class:`~quari.eval.tracks.encode.TowerCache`, cached in ``cache/``);
6. fit the ridge head on train features → mean embedding of each image's captions; save it;
7. project every image through the *saved* head (so the vectors equal what
   ``load_encoder("offline:<out>/head")`` makes) and write the sets, the query files and
   ``track.json`` (last: its presence with the same settings means the build is complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from quari import __version__
from quari.encoders import EncoderConfig
from quari.encoders.offline import TEXT_DIM, OfflineHead, offline_encoder_id
from quari.errors import DataError, QuARIInputError
from quari.eval.tracks.attributes import ATTRIBUTES, GARMENT_LEVEL
from quari.eval.tracks.encode import TowerCache
from quari.eval.tracks.fashion_mnist import CLASS_NAMES, FILES, FashionMNIST, load_fashion_mnist
from quari.eval.tracks.plan import (
    SIZES,
    SOURCE,
    SPLITS,
    TrackPlan,
    TrackSizes,
    plan_tracks,
    view_rows,
)
from quari.eval.tracks.templates import CLASS_NOUNS, TEMPLATE_SETS
from quari.eval.tracks.views import ViewSpec
from quari.fileio import atomic_write, read_json, sha256_file
from quari.store import EmbeddingSet

__all__ = ["SIZES", "TRACK_FORMAT", "TrackSizes", "build_fashion_tracks"]

TRACK_FORMAT = "quari-fashion-tracks/1"


def _relpath(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def _write_pngs(paths: list[Path], pixels: np.ndarray) -> None:
    """Writes the PNGs not yet there (each under a temporary name, then renamed, so a killed
    build leaves no partial file under a final name; no fsync per thumbnail: they are cheap to
    rewrite and a build writes thousands)."""
    for path, p in zip(paths, pixels, strict=True):
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            Image.fromarray(p, "L").save(tmp, format="PNG")
            os.replace(tmp, path)


def _write_set(
    root: Path,
    vectors: np.ndarray,
    metadata: dict[str, Any],
    encoder: str,
    info: dict[str, Any],
    text_vectors: np.ndarray | None = None,
) -> None:
    """Writes a set into a staging folder, then swaps it in (a killed build never leaves half
    a set under the final name)."""
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    eset = EmbeddingSet.create(staging, dim=TEXT_DIM, encoder=encoder, encoder_info=info)
    eset.append(vectors, metadata, text_vectors)
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)


def _write_queries(path: Path, table: dict[str, Any]) -> None:
    emb = np.asarray(table.pop("embedding"), np.float32)
    rel = table.pop("relevant")
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rel])]).astype(np.int32)
    columns = {
        "query_id": pa.array(table.pop("query_id"), pa.string()),
        "label": pa.array(table.pop("label"), pa.string()),
        "embedding": pa.ListArray.from_arrays(
            pa.array(np.arange(0, emb.size + 1, emb.shape[1], dtype=np.int32)),
            pa.array(emb.reshape(-1), pa.float32()),
        ),
        "relevant": pa.ListArray.from_arrays(
            pa.array(offsets),
            pa.array(np.concatenate(rel).astype(np.int64) if rel else [], pa.int64()),
        ),
        "group": pa.array(table.pop("group"), pa.string()),
    }
    atomic_write(path, lambda f: pq.write_table(pa.table(columns), f))


def _settings(sizes: TrackSizes, seed: int, data: FashionMNIST) -> dict[str, Any]:
    return {
        "format": TRACK_FORMAT,
        "seed": seed,
        "sizes": asdict(sizes),
        "dataset_sha256": data.digests,
        "garment_level": GARMENT_LEVEL,
        "attributes": {a.name: [a.measures, list(a.values)] for a in ATTRIBUTES},
        "templates": {k: t.to_json() for k, t in TEMPLATE_SETS.items()},
        "class_nouns": list(CLASS_NOUNS),
        "views": ViewSpec().to_json(),
    }


def build_fashion_tracks(
    out: str | os.PathLike[str],
    *,
    size: str | TrackSizes = "small",
    seed: int = 0,
    resolution: int | None = None,
    data: str | os.PathLike[str] | FashionMNIST | None = None,
    config: EncoderConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Builds (or completes, or reuses) the Fashion-MNIST tracks in ``out``.

    Args:
        out: Output folder (new, or one this function wrote with the same settings).
        size: ``"small"``, ``"full"`` or explicit :class:`TrackSizes`.
        seed: Seed of every random choice (splits, captions, queries, views).
        resolution: EfficientNet input size; ``None`` uses the size's default.
        data: Folder with the four IDX files, or the loaded dataset; ``None`` looks it up
            (:func:`~quari.eval.tracks.fashion_mnist.find_fashion_mnist`).
        config: Device, threads and batch size for the towers. ``None``: CPU, one torch
            thread — on the shared 2-core machines two threads were 1.7x faster when idle but
            1.6x (images) to 7x (text) slower when other jobs ran, and a build must not depend
            on an idle machine.
        progress: Progress bars with ETA.

    Returns:
        The contents of ``track.json``.

    Raises:
        DataError: ``out`` holds something else (another build's settings, foreign files).
        QuARIInputError: impossible sizes.

    Example:
        >>> info = build_fashion_tracks("tracks/small", size="small")  # doctest: +SKIP
        >>> load_encoder("offline:tracks/small/head").id == info["encoder"]  # doctest: +SKIP
        True
    """
    started = time.perf_counter()
    sizes = SIZES[size] if isinstance(size, str) and size in SIZES else size
    if not isinstance(sizes, TrackSizes):
        raise QuARIInputError(f"size must be one of {sorted(SIZES)} or TrackSizes, got {size!r}")
    if resolution is not None:
        sizes = replace(sizes, resolution=int(resolution))
    sizes.check()
    out = Path(out)
    fm = data if isinstance(data, FashionMNIST) else load_fashion_mnist(data, progress=progress)
    settings = _settings(sizes, seed, fm)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    done = _reuse(out, key)  # a finished build with these settings
    if done is not None:
        return done
    config = config or EncoderConfig(threads=1)
    cache = TowerCache(out / "cache", sizes.resolution, config, progress)
    atomic_write(out / "cache" / "build.sha256", lambda f: f.write(key.encode()))
    times: dict[str, float] = {}

    plan = plan_tracks(fm, sizes, seed)
    times["plan"] = time.perf_counter() - started

    t = time.perf_counter()
    paths, view_paths = _image_paths(out / "images", plan)
    for s in paths:
        _write_pngs(paths[s], plan.pixels[s])
    for s in view_paths:
        _write_pngs(view_paths[s], plan.view_pixels[s])
    times["pngs"] = time.perf_counter() - t

    # frozen towers, once per input
    t = time.perf_counter()
    feats = {s: cache.images(s, plan.pixels[s]) for s in SPLITS}
    view_feats = {s: cache.images(f"i2i-{s}", v) for s, v in plan.view_pixels.items()}
    cap_emb = cache.texts("captions", plan.captions)
    query_emb = {s: cache.texts(f"t2i-{s}", texts) for s, texts in plan.query_texts.items()}
    times["encode"] = time.perf_counter() - t

    t = time.perf_counter()
    head_dir = out / "head"
    head = _fit_head(head_dir, sizes, feats["train"], cap_emb, out / "cache" / "head.sha256")
    encoder = offline_encoder_id(head_dir)
    info = {
        "not_clip": "EfficientNet-Lite0 features mapped by a fitted ridge head into "
        "all-MiniLM-L6-v2's text space",
        "head_folder": "head (in the track folder)",
        "head_sha256": sha256_file(head_dir / "head.safetensors"),
        **{k: v for k, v in head.config().items() if k != "format"},
    }
    times["head"] = time.perf_counter() - t

    t = time.perf_counter()
    root = out / "train"
    rows = np.repeat(np.arange(sizes.train), sizes.captions_per_image)
    meta = _metadata(plan, "train", rows, [paths["train"][i] for i in rows], root)
    meta["caption"] = plan.captions
    _write_set(root, head.project(feats["train"])[rows], meta, encoder, info, cap_emb)
    stats: dict[str, Any] = {"t2i": {}, "i2i": {}}
    for s in ("val", "test"):
        stats["t2i"][s] = _write_text_track(
            out / "t2i" / s, plan, s, head.project(feats[s]), query_emb[s], paths[s],
            encoder, info,
        )  # fmt: skip
        stats["i2i"][s] = _write_image_track(
            out / "i2i" / s, plan, s, head.project(view_feats[s]), view_paths[s], encoder, info
        )
    times["write"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - started

    track = {
        **settings,
        "build_key": key,
        "size": size if isinstance(size, str) else "custom",
        "encoder": encoder,
        "head": {
            "folder": "head",
            "sha256": info["head_sha256"],
            "alpha": head.alpha,
            "loo_error": head.loo_error,
            "rows": head.rows,
            "resolution": head.resolution,
        },
        "dataset": {
            "name": "Fashion-MNIST",
            "read_from": str(fm.folder),
            "classes": list(CLASS_NAMES),
            "files": {
                f.name: {"sha256": f.sha256, "gz_sha256": f.gz_sha256} for f in FILES.values()
            },
        },
        "thresholds": plan.thresholds.to_json(),
        "splits": {
            s: {"images": len(plan.items[s]), "from": f"fashion-mnist/{SOURCE[s]}"} for s in SPLITS
        },
        "train_rows": len(plan.captions),
        "tracks": stats,
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "encoded_now": cache.computed,
        "quari_version": __version__,
    }
    text = json.dumps(track, indent=2) + "\n"
    atomic_write(out / "track.json", lambda f: f.write(text.encode()))
    return json.loads(text)  # exactly what a reader of track.json (or a rerun) gets


def _image_paths(
    image_dir: Path, plan: TrackPlan
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """PNG path of every image (split → list) and of every view (val/test → list, in
    ``view_pixels`` order)."""
    paths = {
        s: [image_dir / f"fmnist-{SOURCE[s]}" / f"{int(i):05d}.png" for i in plan.items[s]]
        for s in SPLITS
    }
    view_paths = {
        s: [
            image_dir / "views" / s / f"{int(plan.items[s][p]):05d}-{v}.png"
            for p, v in view_rows(inst)
        ]
        for s, inst in plan.instances.items()
    }
    return paths, view_paths


def _fit_head(
    head_dir: Path, sizes: TrackSizes, feats: np.ndarray, cap_emb: np.ndarray, stamp: Path
) -> OfflineHead:
    """Fits (or reuses) the head: train features → the mean embedding of each image's
    captions — the least-squares solution of one row per caption, but leave-one-out then leaves
    out an image, not one of its duplicated rows. Returns the head as saved (float32), which is
    what the encoder reads, so projections here equal the encoder's."""
    targets = cap_emb.reshape(sizes.train, sizes.captions_per_image, TEXT_DIM).mean(1)
    key = hashlib.sha256(feats.tobytes() + targets.tobytes()).hexdigest()
    if not (stamp.is_file() and stamp.read_text() == key and head_dir.is_dir()):
        note = (
            f"Fashion-MNIST tracks: {sizes.train} train images x {sizes.captions_per_image} "
            "templated captions (mean caption embedding per image)"
        )
        head = OfflineHead.fit(feats, targets, resolution=sizes.resolution, note=note)
        head.save(head_dir)
        atomic_write(stamp, lambda f: f.write(key.encode()))
    return OfflineHead.load(head_dir)


def _metadata(
    plan: TrackPlan, split: str, pos: np.ndarray, paths: list[Path], root: Path
) -> dict[str, Any]:
    """Metadata columns of rows showing the split's images at positions ``pos``; ``paths``
    (one per row) become relative to the set folder ``root``."""
    labels = plan.labels[split][pos]
    return {
        "item": plan.items[split][pos],
        "split": [split] * len(pos),
        "source": [f"fashion-mnist/{SOURCE[split]}"] * len(pos),
        "label": labels,
        "class_name": [CLASS_NAMES[int(c)] for c in labels],
        **{a.name: [a.values[int(v)] for v in plan.levels[split][a.name][pos]] for a in ATTRIBUTES},
        "path": [_relpath(p, root) for p in paths],
    }


def _write_text_track(
    folder: Path,
    plan: TrackPlan,
    split: str,
    gallery: np.ndarray,
    query_emb: np.ndarray,
    paths: list[Path],
    encoder: str,
    info: dict[str, Any],
) -> dict[str, Any]:
    """text→image: the gallery is the split's images; the queries are its descriptions."""
    n = len(plan.items[split])
    meta = _metadata(plan, split, np.arange(n), paths, folder / "gallery")
    _write_set(folder / "gallery", gallery, meta, encoder, info)
    qs = plan.queries[split]
    _write_queries(
        folder / "queries.parquet",
        {
            "query_id": [f"t2i-{split}-{j:05d}" for j in range(len(qs))],
            "label": plan.query_texts[split],
            "embedding": query_emb,
            "relevant": [q.relevant for q in qs],
            "group": [CLASS_NAMES[q.label] for q in qs],
        },
    )
    return {
        "gallery": n,
        "queries": len(qs),
        "relevant_mean": float(np.mean([q.relevant.size for q in qs])) if qs else 0.0,
        "attributes_per_query": {
            str(a): sum(len(q.attributes) == a for q in qs) for a in (1, 2, 3)
        },
    }


def _write_image_track(
    folder: Path,
    plan: TrackPlan,
    split: str,
    views: np.ndarray,
    paths: list[Path],
    encoder: str,
    info: dict[str, Any],
) -> dict[str, Any]:
    """image→image: the gallery is the views in the plan; the query views (the last rows of
    ``views``) stay out of it."""
    inst = plan.instances[split]
    g = len(inst.gallery_items)
    meta = _metadata(plan, split, inst.gallery_items, paths[:g], folder / "gallery")
    meta = {"item": meta.pop("item"), "view": inst.gallery_views.astype(np.int64), **meta}
    _write_set(folder / "gallery", views[:g], meta, encoder, info)
    items, labels = plan.items[split], plan.labels[split]
    _write_queries(
        folder / "queries.parquet",
        {
            "query_id": [f"i2i-{split}-{int(items[p]):05d}" for p in inst.query_items],
            "label": [_relpath(p, folder) for p in paths[g:]],
            "embedding": views[g:],
            "relevant": inst.relevant,
            "group": [CLASS_NAMES[int(labels[p])] for p in inst.query_items],
        },
    )
    return {"gallery": g, "queries": len(inst.query_items), "positives": plan.sizes.positives}


def _reuse(out: Path, key: str) -> dict[str, Any] | None:
    """The finished build in ``out`` if it has these settings; None to (re)build; raises if
    ``out`` holds something else."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    stamp = out / "cache" / "build.sha256"
    if stamp.is_file():
        if stamp.read_text() != key:
            raise DataError(
                f"{out}: holds Fashion-MNIST tracks built with other settings (seed, sizes, "
                "dataset or templates); build into a new folder or delete this one"
            )
        track = out / "track.json"
        if track.is_file():
            info = read_json(track, DataError)
            if info.get("build_key") == key:
                return info
        return None
    if any(p.name != "cache" for p in out.iterdir()):  # a bare cache/ is seeded encoder output
        raise DataError(
            f"{out}: not empty and not a track folder (holds {sorted(os.listdir(out))[:5]}); "
            "build into a new folder"
        )
    return None
