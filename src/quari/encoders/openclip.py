"""open_clip encoders (``open_clip:<model>/<pretrained>``, ``local-dir:<folder>``; extra
``[openclip]``).

open_clip needs torchvision, and torchvision must be built for the installed torch (a PyPI
torchvision beside a CPU torch fails to load). So this module is imported only when such a
spec is asked for, never by the core, and a failing import becomes a
:class:`~quari.errors.MissingDependencyError` that names the extra. The transforms come from
``create_model_and_transforms`` for the same model and tag (or the same folder) as the weights,
and the tokenizer from ``get_tokenizer``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from quari.encoders import EncoderConfig, EncoderError, TorchEncoder
from quari.errors import missing_extra

__all__ = ["OpenCLIPEncoder", "OpenCLIPPreprocessor"]


class OpenCLIPPreprocessor:
    """open_clip's eval transform as an image → ``{"pixel_values": (3, H, W)}`` callable."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> dict[str, np.ndarray]:
        return {"pixel_values": self.transform(image).numpy().astype(np.float32)}


class OpenCLIPEncoder(TorchEncoder):
    """An open_clip model.

    Args:
        name: ``open_clip:<model>/<pretrained>`` (e.g. ``open_clip:ViT-B-32/laion2b_s34b_b79k``;
            no tag = random init) or ``local-dir:<folder>``.
        config: Device, threads, fp16, batch size.
    """

    def __init__(self, name: str, config: EncoderConfig) -> None:
        super().__init__(config)
        try:
            import open_clip
        except Exception as exc:  # ImportError, or torchvision's operator-registration error
            # open_clip needs a torchvision built for this torch: say so with the extra.
            what = f"{name} (with a torchvision built for your torch)"
            raise missing_extra(what, "openclip", exc) from exc
        kind, _, rest = name.partition(":")
        if kind == "local-dir":
            model_name, pretrained = name, None
        else:
            model_name, _, tag = rest.partition("/")
            pretrained = tag or None
            if not model_name:
                raise EncoderError(f"{name}: expected open_clip:<model>/<pretrained>")
        try:
            model, _, transform = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained
            )
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except (RuntimeError, ValueError, OSError) as exc:
            raise EncoderError(f"{name}: cannot create the model ({exc})") from exc
        self.model = model.eval().to(self.device)
        self.preprocessor = OpenCLIPPreprocessor(transform)
        self.id = name
        self.dim = int(self.encode_texts(["a"]).shape[1])
        self.info = {
            "family": "open_clip",
            "model": model_name,
            "pretrained": pretrained,
            "transform": repr(transform),
        }

    def _image_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_image(inputs["pixel_values"])

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))
