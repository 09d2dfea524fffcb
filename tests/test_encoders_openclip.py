"""open_clip encoders: an optional extra that needs torchvision. Where open_clip cannot be
imported (as on a CPU-torch machine) the spec fails with a message naming the extra, and the
model test skips."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from quari.encoders import load_encoder
from quari.errors import MissingDependencyError


def _open_clip_or_none():
    try:
        import open_clip
    except Exception:  # ImportError, or torchvision failing to register its operators
        return None
    return open_clip


def test_the_core_never_imports_torchvision():
    # In a fresh interpreter: this test process may have imported open_clip already.
    code = (
        "import sys, quari.cli, quari.embed, quari.encoders.hf, quari.encoders.offline;"
        "bad = [m for m in ('torchvision', 'open_clip', 'timm') if m in sys.modules];"
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(_open_clip_or_none() is not None, reason="open_clip is importable here")
def test_without_open_clip_the_spec_names_the_extra():
    for spec in ("open_clip:ViT-B-32/", "local-dir:/nowhere"):
        with pytest.raises(MissingDependencyError, match=r"quari\[openclip\]"):
            load_encoder(spec)


def test_random_init_open_clip_model_encodes_offline():
    if _open_clip_or_none() is None:
        pytest.skip("open_clip (with a torchvision matching this torch) is not installed")
    from embed_helpers import photo

    enc = load_encoder("open_clip:ViT-B-32/")  # no pretrained tag: random init, no download
    x = enc.encode_images([photo(0), photo(1)])
    t = enc.encode_texts(["a cat"])
    assert x.shape == (2, enc.dim) and t.shape == (1, enc.dim)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
