"""Errors of the training loop: :class:`quari.errors.TrainingError`, kept importable here."""

from __future__ import annotations

from quari.errors import TrainingError

__all__ = ["TrainingError"]
