"""Errors of the training loop (kept free of heavy imports so the CLI can catch them)."""

from __future__ import annotations

__all__ = ["TrainingError"]


class TrainingError(RuntimeError):
    """Training cannot go on: a non-finite loss, or a run folder that cannot be resumed or
    would be overwritten. The message names the step, the batch and what was kept."""
