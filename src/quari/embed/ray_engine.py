"""The Ray engine (``quari embed --engine ray``; extra ``[distributed]``).

Two Ray Data stages stream the pending items:

1. ``map_batches(_decode)`` — stateless CPU tasks read, decode (same safety rules) and run the
   encoder's own preprocessor;
2. ``map_batches(_EncodeActor, concurrency=ray_actors, num_gpus=1 if CUDA)`` — each actor loads
   the encoder once from its spec string and encodes images and captions.

The driver collects the rows, groups them by input chunk and writes each chunk with the same
:func:`~quari.embed.job.write_chunk` as the local engine, as soon as all of its rows are back.
Chunks finish in any order, so each shard is appended with its own index; the layout, shard
sizes, metadata and errors files are those of a local run. (Writing through the driver keeps the
manifest single-writer; its cost is the vectors' bytes — E × 2 bytes per image — passing through
one process.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from quari.embed.engine import ChunkBuffer, EmbedConfig, decode_item
from quari.embed.sources import Source
from quari.encoders import Encoder, EncoderConfig, EncoderError, load_encoder
from quari.errors import missing_extra

__all__ = ["run_ray"]


def _decode(
    batch: dict[str, np.ndarray],
    source: Source,
    preprocessor: Any,
    template: dict[str, np.ndarray],
    max_pixels: int,
) -> dict[str, np.ndarray]:
    """Ray task: item numbers → preprocessed arrays (zeros where the image was bad)."""
    ks = batch["k"].tolist()
    out: dict[str, list[Any]] = {"k": [], "ok": [], "error": [], "width": [], "height": []}
    arrays: dict[str, list[np.ndarray]] = {name: [] for name in template}
    for k in ks:
        inputs, error, w, h = decode_item(source.items[k], preprocessor, max_pixels)
        out["k"].append(k)
        out["ok"].append(inputs is not None)
        out["error"].append(error or "")
        out["width"].append(w)
        out["height"].append(h)
        for name, blank in template.items():
            arrays[name].append(inputs[name] if inputs is not None else blank)
    result = {name: np.asarray(v) for name, v in out.items()}
    result.update({f"in_{name}": np.stack(v) for name, v in arrays.items()})
    return result


class _EncodeActor:
    """Ray actor: holds one encoder; encodes the good rows of each batch (and their captions)."""

    def __init__(self, spec: str, config: EncoderConfig, source: Source | None) -> None:
        self.encoder = load_encoder(spec, config)
        self.source = source  # only to look up captions

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["ok"].astype(bool)
        n, dim = ok.shape[0], self.encoder.dim
        vectors = np.zeros((n, dim), np.float32)
        texts = np.zeros((n, dim), np.float32)
        good = np.flatnonzero(ok)
        if good.size:
            inputs = {k[3:]: v[good] for k, v in batch.items() if k.startswith("in_")}
            vectors[good] = self.encoder.encode_batch(inputs)
            if self.source is not None:
                captions = self.source.captions(batch["k"][good].tolist())
                texts[good] = self.encoder.encode_texts(captions)
        keep = ("k", "ok", "error", "width", "height")
        return {**{k: batch[k] for k in keep}, "vector": vectors, "text_vector": texts}


def run_ray(
    source: Source,
    encoder: Encoder,
    chunks: list[ChunkBuffer],
    config: EmbedConfig,
    encoder_config: EncoderConfig | None = None,
) -> Iterator[ChunkBuffer]:
    """Encodes the given chunks on Ray, yielding each once complete (in completion order)."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise missing_extra("--engine ray", "distributed", exc) from exc
    spec = getattr(encoder, "spec", None)
    if not isinstance(spec, str):
        raise EncoderError("the Ray engine needs an encoder made by load_encoder (a spec string)")
    enc_config = getattr(encoder, "config", None) or encoder_config or EncoderConfig()
    if not ray.is_initialized():
        ray.init(
            address=config.ray_address,
            num_cpus=config.ray_num_cpus if config.ray_address is None else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = config.progress
    gpu = 1 if enc_config.device.startswith("cuda") else 0
    template = {
        k: np.zeros_like(v) for k, v in encoder.preprocessor(Image.new("RGB", (64, 64))).items()
    }
    ks = [k for c in chunks for k in range(c.start, c.start + c.size)]
    ds = ray.data.from_items([{"k": k} for k in ks])
    ds = ds.map_batches(
        _decode,
        batch_size=config.batch_size or 16,
        batch_format="numpy",
        fn_kwargs={
            "source": source,
            "preprocessor": encoder.preprocessor,
            "template": template,
            "max_pixels": config.max_pixels,
        },
    )
    ds = ds.map_batches(
        _EncodeActor,
        batch_size=config.batch_size or 16,
        batch_format="numpy",
        fn_constructor_kwargs={
            "spec": spec,
            "config": enc_config,
            "source": source if source.has_captions else None,
        },
        compute=ray.data.ActorPoolStrategy(size=max(1, config.ray_actors)),
        num_gpus=gpu,
        num_cpus=0 if gpu else 1,
    )
    owner = {k: c for c in chunks for k in range(c.start, c.start + c.size)}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        touched: dict[int, ChunkBuffer] = {}
        for j, k in enumerate(batch["k"].tolist()):
            chunk = owner[k]
            if batch["ok"][j]:
                text = batch["text_vector"][j] if source.has_captions else None
                size = (int(batch["width"][j]), int(batch["height"][j]))
                chunk.accept(k, batch["vector"][j], text, size)
            else:
                chunk.errors[k - chunk.start] = str(batch["error"][j])
            touched[chunk.index] = chunk
        for chunk in touched.values():
            if chunk.complete:
                yield chunk
