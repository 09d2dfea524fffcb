"""Query adapters: anything that turns query embeddings into an :class:`Adaptation`.

A :class:`~quari.retriever.Retriever` scores the gallery through a :class:`QueryAdapter`. The
QuARI hypernetwork (:class:`~quari.hypernet.QuARIModel`) is one; baselines are others — the
frozen backbone (:class:`CosineAdapter`: T = I, q′ = q, plain cosine similarity) and ILIAS's
static linear adaptation (:class:`LinearAdapter`, one learned map for every query) here, and the
query-expansion baselines in :mod:`quari.eval.baselines`. Because every adapter yields an
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

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from quari import __version__
from quari.adaptation import Adaptation
from quari.errors import CheckpointError, QuARIInputError
from quari.fileio import atomic_write, read_json
from quari.validation import as_embeddings
from quari.whitening import DEFAULT_SHRINKAGE, fit_whitening

if TYPE_CHECKING:
    from quari.hypernet import QuARIModel

__all__ = ["LINEAR_FORMAT", "CosineAdapter", "LinearAdapter", "QueryAdapter", "adapter_device"]

#: ``format`` of a linear adapter's ``config.json`` (:meth:`LinearAdapter.save`).
LINEAR_FORMAT = "quari-linear-adapter"
# 1: the full form (``weight``); 2: adds the low-rank form (``rank``, ``left``/``right``). A full
# adapter is still written as version 1, so older quari versions keep reading it.
_LINEAR_VERSION = 2


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


class LinearAdapter(torch.nn.Module):
    """A static linear adaptation: one learned map W for every query and item, cos(Wq, Wd).

    Two forms of W:

    * **full** (``rank=None``, ILIAS's linear adaptation): a D×E map. ILIAS
      (``linear_adaptation/``) projects queries *and* gallery vectors with one
      ``Linear(E, D)`` and L2-normalises. This class learns W **without a bias**: with a bias b
      the score cos(Wq + b, Wd + b) is affine in d, which no
      :class:`~quari.adaptation.Adaptation` over the stored rows can express (the homogeneous
      coordinate trick would need a constant 1 appended to every stored row). Without it the
      map is exact in factored form: with the thin SVD W = P S Qᵀ (rank ρ ≤ min(D, E)),

          cos(Wq, Wd) = cos(S Qᵀq, S Qᵀd) = cos(q′, T d),  T = Q S Qᵀ = U Vᵀ,  q′ = T q / ‖T q‖,

      since P has orthonormal columns (U = Q S, V = Q, the paper variant of rank ρ).
    * **low-rank** (``rank=k``): W = I + L Rᵀ with L, R of shape E×k — the frozen space plus a
      rank-k correction, starting at the identity (L = 0). Its
      :class:`~quari.adaptation.Adaptation` is the reference form T = I + L Rᵀ with the same
      factors for every query: QuARI's map with the query input taken away, scored at the
      cost of a rank-k QuARI model (the ``static low-rank`` baseline of ``docs/results.md``).

    Either way every retrieval mode scores the adapter exactly from the stored rows, with no
    re-embedded copy of the gallery.

    Args:
        embedding_dim: E, the backbone dimension.
        out_dim: D, the projected dimension of the full form (ILIAS: 512; default
            min(512, E)); the low-rank form maps E → E.
        metadata: Facts saved with the adapter (``"encoder"`` is checked by the Retriever).
        rank: k for the low-rank form (1 ≤ k ≤ E); None: the full form.

    Example:
        >>> adapter = LinearAdapter(16, 8)
        >>> q, d = torch.randn(2, 16), torch.randn(5, 16)
        >>> ref = adapter.project(q) @ adapter.project(d).T
        >>> torch.allclose(adapter(q).score(d), ref, atol=1e-5)
        True
        >>> LinearAdapter(16, rank=4).matrix().equal(torch.eye(16))  # starts at the identity
        True
    """

    def __init__(
        self,
        embedding_dim: int,
        out_dim: int | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        E = int(embedding_dim)
        if rank is None:
            D = min(512, E) if out_dim is None else int(out_dim)
        else:
            D = E if out_dim is None else int(out_dim)
            if D != E:
                raise QuARIInputError(f"a low-rank linear adapter maps E → E; out_dim {D} ≠ {E}")
        if E < 1 or D < 1:
            raise QuARIInputError(f"embedding_dim and out_dim must be positive, got {E}, {D}")
        self.rank = None if rank is None else int(rank)
        self.weight: torch.nn.Parameter | None = None
        self.left: torch.nn.Parameter | None = None
        self.right: torch.nn.Parameter | None = None
        if self.rank is None:
            self.weight = torch.nn.Parameter(torch.empty(D, E))
            # Orthonormal rows: at D = E the initial map is a rotation (exactly the cosine
            # baseline), at D < E a random projection that roughly preserves it.
            torch.nn.init.orthogonal_(self.weight)
        else:
            if not 1 <= self.rank <= E:
                raise QuARIInputError(f"rank must be in 1 … {E} (the dimension), got {rank}")
            # L = 0: W = I, exactly the cosine baseline; R random so that L's gradient is not 0.
            self.left = torch.nn.Parameter(torch.zeros(E, self.rank))
            self.right = torch.nn.Parameter(torch.randn(E, self.rank) / E**0.5)
        self._dims = (D, E)
        self.metadata: dict[str, Any] = {"adapter": "linear", **(metadata or {})}
        # (the weight they were computed from, U, V): recomputed when the weight changes
        self._factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def whitening(
        cls,
        vectors: Any,
        shrinkage: float = DEFAULT_SHRINKAGE,
        metadata: dict[str, Any] | None = None,
    ) -> LinearAdapter:
        """The full-form adapter whose W is the shrinkage whitening of ``vectors``
        (:func:`quari.whitening.fit_whitening`): learned from the data's own second moments, no
        labels and no training — the ``whitening`` baseline of ``docs/results.md``.

        Args:
            vectors: (N, E) embeddings to fit on (a collection's images and captions).
            shrinkage: s of the whitening.
            metadata: Facts saved with the adapter.

        Example:
            >>> adapter = LinearAdapter.whitening(torch.randn(100, 8))
            >>> adapter.out_dim, bool(torch.allclose(adapter.matrix(), adapter.matrix().T))
            (8, True)
        """
        W = fit_whitening(vectors, shrinkage)
        info = {"adapter": "whitening", "shrinkage": shrinkage, **(metadata or {})}
        adapter = cls(W.shape[0], W.shape[0], info)
        with torch.no_grad():
            adapter.weight.copy_(W)  # type: ignore[union-attr]
        return adapter

    @classmethod
    def mean_of(
        cls,
        model: QuARIModel,
        queries: Any,
        *,
        rank: int | None = None,
        batch_size: int = 1024,
    ) -> LinearAdapter:
        """The static map a QuARI model makes on average: W = I + L Rᵀ with L Rᵀ the best
        rank-k approximation of the mean of α U(q) V(q)ᵀ over ``queries``.

        What is left of a model when its query input is taken away at search time — the
        check of what the per-query part of the map adds on a collection (docs/results.md:
        on the Fashion-MNIST tracks' text queries, nothing measurable). It needs a model
        whose scoring is cos(Tq, Td): the reference variant with ``map_query``.

        Args:
            model: A :class:`~quari.hypernet.QuARIModel` (reference variant, ``map_query``).
            queries: (N, E) query embeddings to average over (e.g. the training captions).
            rank: k (default: the model's rank, so scoring costs what the model's does).
            batch_size: Queries per forward pass.

        Returns:
            A low-rank adapter; ``metadata`` holds the model's encoder and, under
            ``"mean_of"``, the query count and the share of the mean map's energy (squared
            Frobenius norm) that rank k keeps.

        Raises:
            QuARIInputError: another variant, no ``map_query``, a static blend, bad queries or
                rank.

        Example:
            >>> from quari import HyperNetConfig, QuARIModel
            >>> model = QuARIModel(HyperNetConfig(embedding_dim=16, rank=4, hidden_dim=8,
            ...     num_layers=1, num_heads=2, variant="reference", map_query=True)).eval()
            >>> LinearAdapter.mean_of(model, torch.randn(10, 16)).rank
            4
        """
        cfg = model.config
        if cfg.variant != "reference" or not cfg.map_query or model.blend_weight:
            raise QuARIInputError(
                "a mean map needs a model that scores cos(Tq, Td): the reference variant with "
                f"map_query and no static blend (this one: variant {cfg.variant!r}, map_query "
                f"{cfg.map_query}, blend_weight {model.blend_weight:g})"
            )
        E = cfg.embedding_dim
        adapter = cls(E, rank=cfg.rank if rank is None else rank)  # checks the rank
        k = adapter.rank
        q = as_embeddings(queries, E, "queries", normalize=True)
        total = torch.zeros(E, E, dtype=torch.float64)
        was_training = model.training
        model.eval()  # the maps a search would use: no dropout
        try:
            with torch.inference_mode():
                for part in q.split(batch_size):
                    ad = model(part)
                    # Σ_q α U_q V_qᵀ without forming a per-query E×E matrix
                    U = ad.U.double().cpu() * ad.anchor_scale
                    total += torch.einsum("ber,bfr->ef", U, ad.V.double().cpu())
        finally:
            model.train(was_training)
        mean = total / q.shape[0]
        P, S, Qt = torch.linalg.svd(mean)
        energy = float((S[:k] ** 2).sum() / (S**2).sum().clamp_min(1e-300))
        if "encoder" in model.metadata:
            adapter.metadata["encoder"] = model.metadata["encoder"]
        adapter.metadata["mean_of"] = {"queries": int(q.shape[0]), "energy_kept": energy}
        with torch.no_grad():
            adapter.left.copy_((P[:, :k] * S[:k]).float())
            adapter.right.copy_(Qt[:k].T.float())
        return adapter

    @property
    def embedding_dim(self) -> int:
        return self._dims[1]

    @property
    def out_dim(self) -> int:
        return self._dims[0]

    def matrix(self) -> torch.Tensor:
        """W, the (D, E) map (differentiable)."""
        if self.weight is not None:
            return self.weight
        assert self.left is not None and self.right is not None
        eye = torch.eye(self.embedding_dim, dtype=self.left.dtype, device=self.left.device)
        return eye + self.left @ self.right.T

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """normalize(W x) for (N, E) vectors — the D-dimensional space the adapter searches in
        (differentiable: the training loss uses it)."""
        if self.weight is not None:
            return torch.nn.functional.normalize(x @ self.weight.T, dim=-1)
        assert self.left is not None and self.right is not None
        # x + (x R) Lᵀ: O(E·k) per vector instead of the dense E×E product
        return torch.nn.functional.normalize(x + (x @ self.right) @ self.left.T, dim=-1)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) of the adaptation, detached: the full form's (E, ρ) pair with U Vᵀ = Q S Qᵀ
        = T (class docstring), cached per weight; singular values below 1e-6 · the largest are
        dropped (rank ρ). The low-rank form's (E, k) pair (L, R), with T = I + U Vᵀ."""
        if self.weight is None:
            assert self.left is not None and self.right is not None
            return self.left.detach(), self.right.detach()
        w = self.weight.detach()
        cached = self._factors
        if cached is None or cached[0].device != w.device or not torch.equal(cached[0], w):
            with torch.no_grad():
                _, S, Qt = torch.linalg.svd(w.double(), full_matrices=False)
                keep = 1e-6 * S.max() < S  # S is non-empty: D, E ≥ 1
                Q, S = Qt[keep].T, S[keep]
                if Q.shape[1] == 0:
                    raise QuARIInputError("the linear adapter's weight is zero (no direction)")
                self._factors = (w.clone(), (Q * S).to(w.dtype), Q.to(w.dtype))
        return self._factors[1], self._factors[2]

    def forward(self, queries: torch.Tensor) -> Adaptation:
        """The exact :class:`~quari.adaptation.Adaptation` of cos(Wq, Wd) for (B, E) queries."""
        q = as_embeddings(queries, self.embedding_dim, "queries", normalize=True)
        U, V = self.factors()
        q = q.to(U.device, U.dtype)
        B, (E, r) = q.shape[0], U.shape
        if self.weight is None:  # T = I + L Rᵀ
            refined = q + (q @ V) @ U.T
            return Adaptation(refined, U.expand(B, E, r), V.expand(B, E, r), "reference", 1.0)
        refined = (q @ V) @ U.T  # T q = Q S Qᵀ q
        return Adaptation(refined, U.expand(B, E, r), V.expand(B, E, r), "paper")

    # -- folders ----------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Writes ``config.json`` (``"format": "quari-linear-adapter"``), ``model.safetensors``
        (``weight``, D×E; the low-rank form: ``left`` and ``right``, E×k) and a ``README.md``
        model card; :func:`quari.checkpoint.load_model` recognises the folder.

        Returns:
            The folder path.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "format": LINEAR_FORMAT,
            "format_version": 1 if self.rank is None else _LINEAR_VERSION,
            "quari_version": __version__,
            "config": {"embedding_dim": self.embedding_dim, "out_dim": self.out_dim, "bias": False},
            "metadata": self.metadata,
        }
        if self.rank is not None:
            config["config"]["rank"] = self.rank
        state = {name: t.detach().cpu().contiguous() for name, t in self.named_parameters()}
        atomic_write(folder / "model.safetensors", lambda f: f.write(save_safetensors(state)))
        text = json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"
        atomic_write(folder / "config.json", lambda f: f.write(text.encode()))
        atomic_write(folder / "README.md", lambda f: f.write(self._card().encode()))
        return folder

    @classmethod
    def load(
        cls, folder: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
    ) -> LinearAdapter:
        """Loads a folder written by :meth:`save`, in eval mode.

        Raises:
            CheckpointError: missing or corrupt files, another format, a newer format version,
                or a weight whose shape contradicts the config.
        """
        folder = Path(folder)
        config_path, weights_path = folder / "config.json", folder / "model.safetensors"
        for path in (config_path, weights_path):
            if not path.is_file():
                raise CheckpointError(
                    f"{path}: missing; a linear adapter folder needs config.json and "
                    "model.safetensors"
                )
        data = read_json(config_path, CheckpointError)
        if not isinstance(data, dict) or data.get("format") != LINEAR_FORMAT:
            raise CheckpointError(
                f'{config_path}: not a linear adapter ("format": "{LINEAR_FORMAT}")'
            )
        version = data.get("format_version")
        if not isinstance(version, int) or version > _LINEAR_VERSION:
            raise CheckpointError(
                f"{config_path}: format_version {version!r} is newer than this quari supports "
                f"({_LINEAR_VERSION}); upgrade quari (this is {__version__})"
            )
        cfg = data.get("config") or {}
        if cfg.get("bias"):
            raise CheckpointError(
                f"{config_path}: a linear adapter with a bias cannot be scored exactly from the "
                "stored rows; quari's linear adapters are bias-free"
            )
        try:
            E, D = int(cfg["embedding_dim"]), int(cfg["out_dim"])
            rank = None if cfg.get("rank") is None else int(cfg["rank"])
            tensors = load_file(str(weights_path), device=str(map_location))
            adapter = cls(E, D, dict(data.get("metadata") or {}), rank=rank)
        except (KeyError, TypeError, ValueError, QuARIInputError) as exc:
            raise CheckpointError(f"{folder}: incomplete linear adapter ({exc!r})") from None
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{weights_path}: unreadable safetensors file ({exc})") from None
        expected = {name: tuple(t.shape) for name, t in adapter.named_parameters()}
        found = {name: tuple(t.shape) for name, t in tensors.items()}
        if found != expected:
            raise CheckpointError(
                f"{weights_path}: holds {found or 'no tensors'}, the config "
                f"({'full' if rank is None else f'rank {rank}'}, {D}×{E}) needs {expected}"
            )
        adapter.load_state_dict(tensors)
        return adapter.to(map_location).eval()

    def _card(self) -> str:
        lines = [
            "---",
            "library_name: quari",
            "tags: [quari, retrieval, linear-adaptation, baseline]",
            "---",
            "",
            "# Linear adapter (static task adaptation)",
            "",
            "One bias-free linear map W applied to queries and gallery items, scored by "
            "cos(Wq, Wd) — the ILIAS linear-adaptation baseline. Load it with "
            "`quari.checkpoint.load_model(folder)`.",
            "",
            "| field | value |",
            "|---|---|",
            f"| encoder | {self.metadata.get('encoder', 'unknown')} |",
            (
                f"| map | {self.out_dim} × {self.embedding_dim}, no bias |"
                if self.rank is None
                else f"| map | I + L Rᵀ, rank {self.rank}, {self.embedding_dim} × "
                f"{self.embedding_dim}, no bias |"
            ),
            f"| quari version | {__version__} |",
        ]
        lines += [
            f"| {k} | {v} |" for k, v in sorted(self.metadata.items()) if k not in ("encoder",)
        ]
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        rank = "" if self.rank is None else f", rank={self.rank}"
        return f"LinearAdapter(embedding_dim={self.embedding_dim}, out_dim={self.out_dim}{rank})"


def adapter_device(adapter: Any) -> torch.device | None:
    """The device an adapter's parameters live on (None for adapters without parameters)."""
    if isinstance(adapter, torch.nn.Module):
        for tensor in adapter.parameters():
            return tensor.device
        for tensor in adapter.buffers():
            return tensor.device
    return None
