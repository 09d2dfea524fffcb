"""Runs ``quari embed`` (with the test-only ``toy`` encoder registered) in a child process.

``QUARI_TEST_DIE`` = ``before:<file prefix>:<n>`` or ``after:<file prefix>:<n>`` ends the
process with ``os._exit(9)`` — as abruptly as SIGKILL, nothing cleaned up — just before or just
after the n-th crash-safe write of a file whose name starts with the prefix (``manifest``,
``img_emb``, ``text_emb``, ``metadata``, ``errors``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from embed_helpers import register_toy

register_toy()

if die := os.environ.get("QUARI_TEST_DIE"):
    import quari.embed.job as job
    import quari.store as store

    when, prefix, nth = die.split(":")
    seen = {"n": 0}
    real = store.atomic_write

    def atomic_write(path, write):
        hit = path.name.startswith(prefix) and (
            seen.update(n=seen["n"] + 1) or seen["n"] == int(nth)
        )
        if hit and when == "before":
            os._exit(9)
        real(path, write)
        if hit and when == "after":
            os._exit(9)

    store.atomic_write = atomic_write
    job.atomic_write = atomic_write

from quari.cli import main  # noqa: E402

sys.argv = ["quari", *sys.argv[1:]]
main()
