"""Query adapters: anything that turns query embeddings into an :class:`Adaptation`.

A :class:`~quari.retriever.Retriever` scores the gallery through a :class:`QueryAdapter`. The
QuARI hypernetwork (:class:`~quari.hypernet.QuARIModel`) is one; baselines are others — the
frozen backbone (:class:`CosineAdapter`: T = I, q′ = q, plain cosine similarity) here, and the
trained baselines in :mod:`quari.eval.baselines`. Because every adapter yields an
:class:`~quari.adaptation.Adaptation`, they all share the exact scoring paths (score, rerank,
scan, the adaptive first stage).

Example:
    >>> import torch
    >>> adapter = CosineAdapter(embedding_dim=8)
    >>> isinstance(adapter, QueryAdapter)
    True
    >>> adapter(torch.randn(2, 8)).score(torch.randn(5, 8)).shape
    torch.Size([2, 5])
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from quari.adaptation import Adaptation

__all__ = ["CosineAdapter", "QueryAdapter", "adapter_device"]


@runtime_checkable
class QueryAdapter(Protocol):
    """Maps (B, E) query embeddings to the queries' :class:`~quari.adaptation.Adaptation`.

    Attributes:
        embedding_dim: E, the embedding size it reads.
        metadata: Facts about the adapter (``"encoder"``: the embedding space it was made for,
            checked against the set's encoder; anything else is informational).
    """

    embedding_dim: int
    metadata: dict[str, Any]

    def __call__(self, queries: torch.Tensor) -> Adaptation: ...


class CosineAdapter:
    """The frozen backbone: T = I and q′ = q, i.e. plain cosine similarity.

    Args:
        embedding_dim: E.
        encoder: The embedding space's encoder id, if known (for the Retriever's check).
    """

    def __init__(self, embedding_dim: int, encoder: str | None = None) -> None:
        self.embedding_dim = int(embedding_dim)
        self.metadata: dict[str, Any] = {"adapter": "cosine"}
        if encoder:
            self.metadata["encoder"] = encoder

    def __call__(self, queries: torch.Tensor) -> Adaptation:
        return Adaptation.identity(queries)

    def __repr__(self) -> str:
        return f"CosineAdapter(embedding_dim={self.embedding_dim})"


def adapter_device(adapter: Any) -> torch.device | None:
    """The device an adapter's parameters live on (None for adapters without parameters)."""
    if isinstance(adapter, torch.nn.Module):
        for tensor in adapter.parameters():
            return tensor.device
        for tensor in adapter.buffers():
            return tensor.device
    return None
