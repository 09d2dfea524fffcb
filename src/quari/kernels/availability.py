"""Whether the Triton kernels can run here; Triton is imported lazily, on first ask."""

from __future__ import annotations

import importlib
import os
from functools import lru_cache

__all__ = ["interpreting", "triton_available", "triton_disabled"]


def triton_disabled() -> bool:
    """True when the environment variable ``QUARI_DISABLE_TRITON`` is set (not "", "0")."""
    return os.environ.get("QUARI_DISABLE_TRITON", "").strip().lower() not in ("", "0", "false")


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false")


@lru_cache(maxsize=1)
def _triton_imports() -> bool:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install failing in any other way at import
        return False
    return True


def triton_available() -> bool:
    """Whether the fused kernel may be used: Triton imports and ``QUARI_DISABLE_TRITON`` is
    not set."""
    return not triton_disabled() and _triton_imports()
