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


@pytest.fixture(autouse=True, scope="session")
def _own_cache_dir(tmp_path_factory):
    """Exports and kept runtime choices go to a folder of the test run, never ~/.cache."""
    if "QUARI_CACHE_DIR" not in os.environ:
        os.environ["QUARI_CACHE_DIR"] = str(tmp_path_factory.mktemp("quari-cache"))


@pytest.fixture
def fixture_dir() -> Path:
    if not (FIXTURE / "golden.npz").is_file():
        pytest.fail(f"the reference fixture is missing: {FIXTURE}")
    return FIXTURE


# Property tests: 100 examples each by default; `HYPOTHESIS_PROFILE=thorough pytest …` runs 2000.
settings.register_profile("quari", max_examples=100, deadline=None)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quari"))


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test (modules opt in with ``pytestmark``): on a shared
    2-core machine two threads wait on each other, and one ran the small training steps of
    these tests several times faster under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
