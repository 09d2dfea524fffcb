"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import FIXTURE


@pytest.fixture
def fixture_dir() -> Path:
    if not (FIXTURE / "golden.npz").is_file():
        pytest.fail(f"the reference fixture is missing: {FIXTURE}")
    return FIXTURE
