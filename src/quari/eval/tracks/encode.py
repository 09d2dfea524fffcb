"""The frozen towers' outputs for a track, computed once and kept on disk.

EfficientNet features and MiniLM caption embeddings are the slow part of a build. Each batch
of inputs is stored as ``features_<group>_<digest>.npy`` / ``text_<group>_<digest>.npy``, the
digest covering the exact inputs (pixels or strings), the resolution and the model, so a rerun
with the same inputs loads them and one with different inputs can never pick up stale vectors.
The models are loaded only when something is missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from quari.embed.images import to_rgb
from quari.encoders import EncoderConfig, torch_threads
from quari.encoders.offline import IMAGE_MODEL, TEXT_MODEL, OfflineTowers, image_features
from quari.fileio import atomic_write

__all__ = ["TowerCache"]

_CHUNK = 256  # inputs per progress step


class TowerCache:
    """Image features and text embeddings of the offline towers, cached in a folder.

    Args:
        folder: Where the ``.npy`` files go.
        resolution: Image size for EfficientNet.
        config: Device, threads and batch size for the towers.
        progress: Show progress bars with ETA.
    """

    def __init__(
        self,
        folder: Path,
        resolution: int,
        config: EncoderConfig | None = None,
        progress: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.resolution = int(resolution)
        self.config = config or EncoderConfig()
        self.progress = progress
        self._towers: OfflineTowers | None = None
        self.computed: list[str] = []  # groups encoded (not loaded) by this instance

    @property
    def towers(self) -> OfflineTowers:
        if self._towers is None:
            self._towers = OfflineTowers(self.resolution, self.config)
        return self._towers

    def _path(self, kind: str, group: str, digest: str) -> Path:
        return self.folder / f"{kind}_{group}_{digest[:16]}.npy"

    def _load_or(self, path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if path.is_file():
            return np.load(path, allow_pickle=False)
        array = compute()
        atomic_write(path, lambda f: np.lib.format.write_array(f, array, allow_pickle=False))
        self.computed.append(path.name)
        return array

    def images(self, group: str, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W) uint8 greyscale images → (N, 1280) float32 EfficientNet features.

        The images go through the same RGB conversion as a decoded greyscale file
        (:func:`quari.embed.images.to_rgb`) and the towers' own preprocessing.
        """
        from tqdm.auto import tqdm

        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        digest = hashlib.sha256(f"{IMAGE_MODEL}|{self.resolution}|{pixels.shape}|".encode())
        digest.update(pixels.tobytes())

        def compute() -> np.ndarray:
            parts = []
            with tqdm(total=len(pixels), unit="img", desc=f"features {group}",
                      disable=not self.progress, dynamic_ncols=True) as bar:  # fmt: skip
                for start in range(0, len(pixels), _CHUNK):
                    batch = [
                        to_rgb(Image.fromarray(p, "L")) for p in pixels[start : start + _CHUNK]
                    ]
                    parts.append(image_features(self.towers, batch))
                    bar.update(len(batch))
            return np.concatenate(parts).astype(np.float32)

        return self._load_or(self._path("features", group, digest.hexdigest()), compute)

    def texts(self, group: str, texts: list[str]) -> np.ndarray:
        """Strings → (N, 384) float32 unit MiniLM embeddings."""
        from tqdm.auto import tqdm

        digest = hashlib.sha256(f"{TEXT_MODEL}|{len(texts)}|".encode())
        digest.update("\n".join(texts).encode())

        def compute() -> np.ndarray:
            parts = []
            with tqdm(total=len(texts), unit="text", desc=f"text {group}",
                      disable=not self.progress, dynamic_ncols=True) as bar:  # fmt: skip
                for start in range(0, len(texts), 4 * _CHUNK):
                    batch = texts[start : start + 4 * _CHUNK]
                    with torch_threads(self.config.threads):
                        emb = self.towers.text_embeddings(batch)
                    parts.append(emb.float().cpu().numpy())
                    bar.update(len(batch))
            return np.concatenate(parts).astype(np.float32)

        return self._load_or(self._path("text", group, digest.hexdigest()), compute)
