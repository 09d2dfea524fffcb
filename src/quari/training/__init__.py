"""Training QuARI hypernetworks over embedding sets.

Modules: :mod:`~quari.training.config` (``TrainConfig``, presets), :mod:`~quari.training.data`
(pairs, mixtures, image-level splits, resumable batches), :mod:`~quari.training.mining`
(semi-positives), :mod:`~quari.training.loss` (loss, query noise), :mod:`~quari.training.module`
(the LightningModule), :mod:`~quari.training.loop` (:func:`train`).

Lightning is imported only when :func:`train` or the module is first used, so the rest of
quari (and ``quari search``) does not pay for it.

Example:
    >>> from quari.training import TrainConfig, TrainSource, train  # doctest: +SKIP
    >>> train(TrainConfig(train=(TrainSource.parse("coco"),), out="runs/coco"))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quari.training.config import PRESETS, TrainConfig, TrainSource
from quari.training.errors import TrainingError
from quari.training.mining import MiningConfig, load_semipositives, mine_semipositives

if TYPE_CHECKING:  # imported lazily at run time (below): Lightning is heavy
    from quari.training.loop import TrainResult, train
    from quari.training.module import QuARITrainingModule

__all__ = [
    "PRESETS",
    "MiningConfig",
    "QuARITrainingModule",
    "TrainConfig",
    "TrainResult",
    "TrainSource",
    "TrainingError",
    "load_semipositives",
    "mine_semipositives",
    "train",
]

_LAZY = {
    "train": "quari.training.loop",
    "TrainResult": "quari.training.loop",
    "QuARITrainingModule": "quari.training.module",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quari.training' has no attribute {name!r}")
