"""Query-expansion and database-side baselines: αQE and (α)DBA.

* **αQE** (Radenović, Tolias, Chum, TPAMI 2018): q′ = normalize(q + Σ_{i≤n} (qᵀx_i)^α x_i) over
  the query's top-n gallery neighbours by cosine, then search again with q′. :class:`AlphaQE`
  is a :class:`~quari.adapters.QueryAdapter` that holds the gallery (and its index) it expands
  against and returns the cosine :class:`~quari.adaptation.Adaptation` of q′ — so ``rerank``
  re-scores the first-stage top K with q′ (ILIAS's αQE re-ranking), ``adaptive`` searches
  again with q′ (its candidates are the index's top K for q′ united with those for q) and
  ``scan`` is the exact second search. α = 3 by default; n is tuned on a validation split.
  ``(qᵀx)^α`` keeps the sign of qᵀx for non-integer α (sign · |qᵀx|^α).
* **DBA / αDBA** (Gordo et al. IJCV 2017; Radenović et al. 2018): every gallery vector is
  replaced, offline, by normalize(x_i + Σ_{j∈NN_k(i), j≠i} (x_iᵀx_j)^α x_j); queries stay as
  they are and are scored by cosine. :func:`dba_transform` writes the transformed gallery as a
  new embedding set (same rows, shards and metadata, so relevance labels still apply); search
  it with the cosine baseline. α = 0 is plain DBA (equal weights).

Neighbours come from :class:`quari.retriever.Retriever` in ``plain`` mode (the set's index,
or an exact scan for small sets), so they are the product's own cosine neighbours.

Example:
    >>> aqe = AlphaQE(eset, index, n=2)  # doctest: +SKIP
    >>> Retriever(eset, aqe, index).search(q, 10, mode="rerank")  # doctest: +SKIP
    >>> dba = dba_transform(eset, "gallery-dba-k5", k=5)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from quari.adaptation import Adaptation
from quari.errors import QuARIInputError
from quari.index import CandidateIndex
from quari.retriever import Retriever
from quari.store import EmbeddingSet
from quari.validation import as_embeddings

__all__ = ["AlphaQE", "dba_transform", "expansion_weights"]


def expansion_weights(similarities: np.ndarray, alpha: float) -> np.ndarray:
    """sign(s) · |s|^α — the αQE / αDBA neighbour weights (α = 0: weight 1 each)."""
    s = np.asarray(similarities, dtype=np.float64)
    return np.sign(s) * np.abs(s) ** alpha if alpha else np.ones_like(s)


def _check(n: int, alpha: float, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise QuARIInputError(f"{what} must be a non-negative integer, got {n!r}")
    if not np.isfinite(alpha) or alpha < 0:
        raise QuARIInputError(f"alpha must be a finite number ≥ 0, got {alpha!r}")


class AlphaQE:
    """α-weighted query expansion as a query adapter (module docstring).

    Args:
        eset: The gallery the neighbours come from (the one being searched).
        index: Its candidate index (None: an exact scan, for small sets).
        n: Neighbours added to the query (0: the query unchanged).
        alpha: Weight exponent α.
    """

    def __init__(
        self,
        eset: EmbeddingSet,
        index: CandidateIndex | None = None,
        *,
        n: int = 2,
        alpha: float = 3.0,
    ) -> None:
        _check(n, alpha, "n")
        self.eset = eset
        self.n = int(n)
        self.alpha = float(alpha)
        self.embedding_dim = eset.dim
        self.metadata: dict[str, Any] = {"adapter": "aqe", "n": self.n, "alpha": self.alpha}
        if eset.encoder != "unknown":
            self.metadata["encoder"] = eset.encoder
        self._neighbours = Retriever(eset, None, index)

    def expand(self, queries: Any) -> torch.Tensor:
        """q′ for (B, E) queries (unit rows)."""
        q = as_embeddings(queries, self.embedding_dim, "queries", normalize=True)
        if self.n == 0:
            return q
        found = self._neighbours.search(
            q.detach().cpu().numpy(), self.n, mode="plain", with_metadata=False
        )
        valid = found.ids >= 0
        x = self.eset.gather(np.where(valid, found.ids, 0)).astype(np.float32)
        x /= np.linalg.norm(x, axis=-1, keepdims=True)  # stored rows are unit to fp16 precision
        w = np.where(valid, expansion_weights(found.scores, self.alpha), 0.0)
        extra = torch.from_numpy(np.einsum("bn,bne->be", w, x).astype(np.float32))
        return torch.nn.functional.normalize(q + extra.to(q.device, q.dtype), dim=-1)

    def __call__(self, queries: Any) -> Adaptation:
        return Adaptation.identity(self.expand(queries))

    def __repr__(self) -> str:
        return f"AlphaQE(n={self.n}, alpha={self.alpha:g}, gallery={self.eset.root})"


def dba_transform(
    eset: EmbeddingSet,
    out: str | os.PathLike[str],
    *,
    k: int = 5,
    alpha: float = 3.0,
    index: CandidateIndex | None = None,
    batch_rows: int = 4096,
    progress: bool = True,
) -> EmbeddingSet:
    """Writes the (α)DBA-transformed gallery as a new embedding set.

    Args:
        eset: The gallery.
        out: Folder of the new set (must not hold one). Name it for what it is, e.g.
            ``<set>-dba-k5-a3``.
        k: Neighbours averaged into each vector (besides itself).
        alpha: Weight exponent (0: plain DBA).
        index: The gallery's candidate index (None: exact neighbours by scan; fine up to the
            Retriever's ``scan_below`` rows).
        batch_rows: Rows whose neighbours are searched together.
        progress: Show a progress bar.

    Returns:
        The new set: one row per gallery row, same shards and metadata, encoder recorded as
        the source's, ``encoder_info["dba"]`` describing the transformation.
    """
    _check(k, alpha, "k")
    retriever = Retriever(eset, None, index, batch_size=256)
    info = {
        **eset.encoder_info,
        "dba": {"k": int(k), "alpha": float(alpha), "source": str(eset.root)},
    }
    new = EmbeddingSet.create(out, dim=eset.dim, encoder=eset.encoder, encoder_info=info)
    bar = tqdm(total=eset.rows, desc=f"DBA k={k}", unit="row", disable=not progress)
    for shard in eset.shards:
        parts = []
        for start in range(shard.offset, shard.offset + shard.rows, batch_rows):
            rows = np.arange(start, min(start + batch_rows, shard.offset + shard.rows))
            x = eset.gather(rows).astype(np.float32)
            x /= np.linalg.norm(x, axis=-1, keepdims=True)
            found = retriever.search(x, k + 1, mode="plain", with_metadata=False)
            ids, sims = found.ids, found.scores
            # Each row's own id (usually rank 1) is not its neighbour; without it, drop rank k+1.
            own = ids == rows[:, None]
            drop = np.where(own.any(1), own.argmax(1), k)
            keep = np.ones_like(own)
            keep[np.arange(rows.size), drop] = False
            ids, sims = ids[keep].reshape(-1, k), sims[keep].reshape(-1, k)
            valid = ids >= 0
            w = np.where(valid, expansion_weights(sims, alpha), 0.0)
            nb = eset.gather(np.where(valid, ids, 0)).astype(np.float32)
            nb /= np.linalg.norm(nb, axis=-1, keepdims=True)
            parts.append(x + np.einsum("bn,bne->be", w, nb))
            bar.update(rows.size)
        metadata = eset.metadata_table(shard) if eset.has_metadata else None
        new.append(np.concatenate(parts), metadata)
    bar.close()
    return new
