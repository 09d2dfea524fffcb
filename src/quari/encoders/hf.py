"""transformers CLIP, SigLIP and SigLIP2 encoders (``hf:<hub-name-or-folder>``; extra ``[hf]``).

The model comes from ``AutoModel`` and the preprocessing from ``AutoProcessor`` of the *same*
name or folder, so an image is always resized, cropped and normalised the way the checkpoint
expects (SigLIP2's variable-resolution patching included: its processor returns patches, a
patch mask and the spatial shapes, which all go to the model). transformers picks its
PIL-backed image processor when torchvision is absent, so this never needs torchvision.

Text follows each family's training: CLIP pads to the longest caption and truncates at its
context length; SigLIP and SigLIP2 pad every caption to 64 tokens (``padding="max_length"``),
as they were trained — shorter padding changes their embeddings.

transformers ≥ 5 returns an output object from ``get_image_features``/``get_text_features``
with the projected embedding in ``.pooler_output``; older releases return the tensor. Both work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from quari.encoders import EncoderConfig, EncoderError, TorchEncoder
from quari.errors import missing_extra

__all__ = ["HFEncoder", "HFPreprocessor"]

#: Families whose text tower was trained on captions padded to a fixed length.
_FIXED_LENGTH = {"siglip": 64, "siglip2": 64}


def _features(out: Any) -> torch.Tensor:
    """The embedding tensor from transformers 4 (a tensor) or 5 (an output object)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise EncoderError(f"the model returned {type(out).__name__} without .pooler_output")
    return pooled


class HFPreprocessor:
    """The checkpoint's own image processor, as a picklable image → arrays callable."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, image: Any) -> dict[str, np.ndarray]:
        out = self.image_processor(images=[image], return_tensors="np")
        return {k: np.asarray(v)[0] for k, v in out.items()}


class HFEncoder(TorchEncoder):
    """A transformers dual encoder: CLIP, SigLIP or SigLIP2.

    Args:
        name: Hub name (needs the hub, or its cache with ``HF_HUB_OFFLINE=1``) or a local folder
            written by ``save_pretrained`` for both the model and its processor.
        config: Device, threads, fp16, batch size.

    Example:
        >>> enc = HFEncoder("google/siglip2-base-patch16-224", EncoderConfig())  # doctest: +SKIP
    """

    def __init__(self, name: str, config: EncoderConfig) -> None:
        super().__init__(config)
        if not name:
            raise EncoderError(
                "hf: give a hub name or a folder, e.g. hf:google/siglip2-base-patch16-224"
            )
        try:
            from transformers import AutoModel, AutoProcessor
        except ImportError as exc:
            raise missing_extra("hf: encoders", "hf", exc) from exc
        folder = Path(name).expanduser()
        source = str(folder.resolve()) if folder.is_dir() else name
        try:
            model = AutoModel.from_pretrained(source)
            processor = AutoProcessor.from_pretrained(source)
        except Exception as exc:  # missing files, corrupt or refused pickles, bad configs …
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise EncoderError(
                f"hf:{name}: cannot load model and processor ({type(exc).__name__}: {first})"
            ) from None
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise EncoderError(
                f"hf:{name}: {type(model).__name__} is not an image–text dual encoder"
            )
        self.model = model.eval().to(self.device)
        self.family = str(model.config.model_type)
        self.tokenizer = processor.tokenizer
        self.preprocessor = HFPreprocessor(processor.image_processor)
        text_cfg = getattr(model.config, "text_config", None)
        if self.family in _FIXED_LENGTH:
            self.text_kwargs: dict[str, Any] = {
                "padding": "max_length",
                "max_length": _FIXED_LENGTH[self.family],
                "truncation": True,
            }
        else:
            context = getattr(text_cfg, "max_position_embeddings", None) or 77
            self.text_kwargs = {"padding": True, "truncation": True, "max_length": context}
        self.id = f"hf:{source}"
        self.dim = int(self.encode_texts(["a"]).shape[1])
        self.info = {
            "family": self.family,
            "architecture": type(model).__name__,
            "image_processor": type(processor.image_processor).__name__,
            "image_processor_config": processor.image_processor.to_dict(),
            "text_padding": self.text_kwargs,
            "revision": getattr(model.config, "_commit_hash", None),
        }

    def _image_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return _features(self.model.get_image_features(**inputs))

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, return_tensors="pt", **self.text_kwargs)
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        return _features(self.model.get_text_features(**tokens))
