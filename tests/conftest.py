"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The switch is read when
# triton is first imported — and other test modules' imports (transformers, lightning) may
# import it — so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import FIXTURE


@pytest.fixture
def fixture_dir() -> Path:
    if not (FIXTURE / "golden.npz").is_file():
        pytest.fail(f"the reference fixture is missing: {FIXTURE}")
    return FIXTURE


# Property tests: 100 examples each by default; `HYPOTHESIS_PROFILE=thorough pytest …` runs 2000.
settings.register_profile("quari", max_examples=100, deadline=None)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quari"))
