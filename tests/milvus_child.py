"""Builds a Milvus Lite index in a child process, printing ``inserted`` after each insert
request, so that a test can kill it (SIGKILL) midway through the build.

Usage: ``python milvus_child.py SET SPEC BATCH_ROWS``.
"""

from __future__ import annotations

import sys

from pymilvus import MilvusClient

from quari.index import CandidateIndex
from quari.store import EmbeddingSet

real_insert = MilvusClient.insert


def insert(self, *args, **kwargs):
    out = real_insert(self, *args, **kwargs)
    print("inserted", flush=True)
    return out


MilvusClient.insert = insert
root, spec, batch_rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
CandidateIndex.build(
    EmbeddingSet.open(root), spec, index_type="FLAT", batch_rows=batch_rows, progress=False
)
