"""The hypernetwork module :class:`QuARIModel`: its layers, the training pass over
[ctx; U; V], the inference pass from the layers' weights (folded for the reference variant),
CUDA graphs and CPU runtimes (see :mod:`quari.hypernet`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quari.adaptation import Adaptation, StaticBlend
from quari.errors import QuARIInputError
from quari.hypernet.chunks import chunked
from quari.hypernet.config import HyperNetConfig
from quari.hypernet.layers import (
    LINEAR_ROLES,
    LinearFn,
    encoder_layer,
    mlp,
    sinusoidal_table,
    step_codes,
)
from quari.hypernet.packing import PackedLinears
from quari.validation import as_embeddings

__all__ = ["QuARIModel"]


class QuARIModel(nn.Module):
    """The QuARI hypernetwork H_θ: q ↦ (q′, T) with T of rank ``config.rank`` (plus I).

    Args:
        config: The architecture; see :class:`HyperNetConfig`.

    Example:
        >>> model = QuARIModel(HyperNetConfig(embedding_dim=32, rank=4, hidden_dim=16,
        ...                                   num_layers=1, num_heads=2, num_steps=2)).eval()
        >>> with torch.inference_mode():
        ...     adaptation = model(torch.randn(3, 32))
        >>> adaptation.U.shape
        torch.Size([3, 32, 4])
    """

    def __init__(self, config: HyperNetConfig) -> None:
        super().__init__()
        self.config = config
        #: Free-form facts saved with the model (encoder id, training data, metrics).
        self.metadata: dict[str, Any] = {}
        self._cuda_graphs: Any = None  # quari.kernels.graphs.GraphedForward when enabled
        self._runtime: Any = None  # a quari.runtime.Runtime other than the eager default
        self._blend_weight: float | None = None  # set_blend_weight's search-time weight
        self._packs = PackedLinears()  # the eager default's prepacked weights
        E, H, r = config.embedding_dim, config.hidden_dim, config.rank
        paper = config.variant == "paper"

        self.query_encoder = nn.Sequential(
            nn.Linear(E, H),
            nn.LayerNorm(H),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(H, H),
            nn.LayerNorm(H),
        )
        if paper:
            self.step_embedding = nn.Embedding(config.num_steps, H)
            nn.init.normal_(self.step_embedding.weight, std=0.02)
        else:
            self.step_mlp = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.Linear(H, H))
            self.register_buffer("position_scale", torch.ones(1))
            # The fixed step codes live on the model's device (not in checkpoints), so that the
            # forward pass makes no host-to-device copies (a CUDA graph cannot capture those).
            self.register_buffer("step_codes", step_codes(config.num_steps, H), persistent=False)
        self.register_buffer("positions", sinusoidal_table(2 * r + 1, H))
        if config.blend_weight > 0:
            # W of the static blend (HyperNetConfig.blend_weight); the trainer fits it, a
            # checkpoint restores it. The identity until then: plain cosine as the static part.
            # (made on the CPU and moved, as the code tables in layers.py: a meta-device
            # eye would import torch._dynamo)
            identity = torch.eye(E, device="cpu").to(torch.get_default_device())
            self.register_buffer("whitening", identity)

        layer = nn.TransformerEncoderLayer(
            d_model=H,
            nhead=config.num_heads,
            dim_feedforward=4 * H,
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(
            layer, config.num_layers, enable_nested_tensor=False
        )
        # With map_query, q′ = normalize(T q): there is no query decoder to build.
        self.query_decoder = (
            None if config.map_query else mlp(H, E, config.dropout, layer_norm=config.decoder_norm)
        )
        # u: output-side columns of T, v: input-side columns (T d = U Vᵀ d).
        self.u_decoder = mlp(H, E, config.dropout, layer_norm=config.decoder_norm)
        self.v_decoder = mlp(H, E, config.dropout, layer_norm=config.decoder_norm)
        if config.init == "identity":
            # Start exactly at the frozen backbone: MLP_q(ctx) = 0 gives q′ = normalize(λq) = q,
            # U = 0 gives T = I. V keeps its random init so that ∂L/∂U = α·(…)·V ≠ 0.
            for decoder in (self.query_decoder, self.u_decoder):
                if decoder is None:
                    continue
                nn.init.zeros_(decoder[-1].weight)
                nn.init.zeros_(decoder[-1].bias)
            if config.decoder_norm:
                # Normalised decoder activations are O(1); N(0, 1/(H·E)) weights make V's
                # entries ≈ 1/√E, so that ‖U Vᵀ d‖ starts at the scale of U's own entries.
                nn.init.normal_(self.v_decoder[-1].weight, std=(H * E) ** -0.5)
                nn.init.zeros_(self.v_decoder[-1].bias)

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    @property
    def blend_weight(self) -> float:
        """The static blend's weight a this model scores with: :meth:`set_blend_weight`'s, or
        the trained config's."""
        return self.config.blend_weight if self._blend_weight is None else self._blend_weight

    def set_blend_weight(self, weight: float | None) -> QuARIModel:
        """Scores with another weight of the static blend (docs/method.md §5.6) than the one it
        was trained and exported with — 0 for QuARI's score alone, say, where a deployment
        serves only text queries — without retraining. The fitted W stays; a saved model keeps
        its trained weight.

        Args:
            weight: a in [0, 1]; None goes back to the config's.

        Returns:
            The model itself.

        Raises:
            QuARIInputError: a weight outside [0, 1], or above 0 for a model trained without
                the blend (it has no fitted W to blend with).

        Example:
            >>> model = QuARIModel(HyperNetConfig(embedding_dim=32, rank=4, hidden_dim=16,
            ...                                   num_layers=1, num_heads=2, blend_weight=0.5))
            >>> model.set_blend_weight(0).blend_weight
            0.0
        """
        if weight is not None:
            if isinstance(weight, bool) or not 0.0 <= float(weight) <= 1.0:
                raise QuARIInputError(f"blend weight must lie in [0, 1], got {weight!r}")
            weight = float(weight)
            if weight > 0 and not self.config.blend_weight:
                raise QuARIInputError(
                    "this model was trained without the static blend (blend_weight 0): it has "
                    "no fitted whitening to blend with; train with --blend-weight to get one"
                )
        self._blend_weight = weight
        return self

    @property
    def inference_tokens(self) -> int:
        """Sequence length of one query's inference pass: 1 + r with the V bank folded (the
        reference variant), 1 + 2r otherwise."""
        cfg = self.config
        return 1 + (1 if cfg.variant == "reference" else 2) * cfg.rank

    def _step_inputs(self, like: torch.Tensor, banks: int) -> torch.Tensor:
        """(L, 1 + banks·r, H): what each step adds to the sequence [ctx; U bank; V bank]
        (``banks`` = 2) or, folded, [ctx; U bank] (``banks`` = 1).

        Row 0 is the step's code (plus, in the paper variant, the control token's position),
        rows 1.. the banks' positions. Built once per forward pass, so that a step costs one
        addition and one residual update instead of a handful of small kernels (at batch 1
        the forward pass is launch-bound).
        """
        r, L = self.config.rank, self.config.num_steps
        if self.config.variant == "paper":
            steps = self.step_embedding.weight + self.positions[0]
            positions = self.positions[1:]
        else:
            steps = self.step_mlp(self.step_codes.to(like))
            shared = self.position_scale * self.positions[:r]
            positions = torch.cat([shared] * banks)
        return torch.cat([steps[:, None], positions.to(like)[None].expand(L, -1, -1)], dim=1)

    def forward(self, queries: torch.Tensor, *, normalize: bool = True) -> Adaptation:
        """Predicts the adapted query and the low-rank map for every query in the batch.

        Args:
            queries: (B, E) query embeddings (text or image tower of the same backbone).
            normalize: L2-normalise the queries first (the default; non-unit inputs are
                accepted and normalised). Training passes ``False`` after adding query noise,
                which is applied to unit embeddings and deliberately not re-normalised.

        Returns:
            An :class:`~quari.adaptation.Adaptation` holding q′ (B, E) and the factors U, V
            (B, E, r) — never an E×E matrix.

        Raises:
            QuARIInputError: wrong dimension, empty batch, NaN or Inf.
        """
        cfg = self.config
        ref = next(self.parameters())
        q = as_embeddings(queries, cfg.embedding_dim, "queries", dtype=ref.dtype,
                          device=ref.device, check_finite=False)  # fmt: skip
        graphs = self._cuda_graphs
        if graphs is not None and normalize and graphs.accepts(self, q):
            # The graph normalises and checks finiteness itself: no synchronisation before
            # the replay (a NaN/Inf row still raises, after it).
            refined, U, V = graphs(q)
        else:
            q = as_embeddings(q, cfg.embedding_dim, "queries", normalize=normalize, dtype=None)
            runtime = self._runtime
            if runtime is not None and runtime.accepts(self, q):
                refined, U, V = runtime(q)
            elif not self.training and q.device.type == "cpu":
                refined, U, V = chunked(self, self.eager_factors, q)  # large batches in chunks
            else:
                refined, U, V = self.predict_factors(q)
        return self.to_adaptation(refined, U, V, queries=q)

    def to_adaptation(
        self,
        refined: torch.Tensor,
        U: torch.Tensor,
        V: torch.Tensor,
        *,
        queries: torch.Tensor | None = None,
    ) -> Adaptation:
        """The :class:`~quari.adaptation.Adaptation` of factors from :meth:`predict_factors`
        (or a runtime): this model's variant and α attached, q′ taken as unit-norm, and —
        when :attr:`blend_weight` is above 0 — the static blend of the raw ``queries``."""
        cfg = self.config
        blend = None
        if self.blend_weight > 0:
            if queries is None:
                raise QuARIInputError("this model blends a static cosine: pass the queries")
            blend = StaticBlend.of(self.whitening, queries, self.blend_weight)
        if cfg.variant == "paper":
            return Adaptation(refined, U, V, normalized=True, blend=blend)
        return Adaptation(
            refined, U, V, "reference", cfg.anchor_scale, normalized=True, blend=blend
        )

    def predict_factors(
        self,
        q: torch.Tensor,
        *,
        fold: bool | None = None,
        linears: Mapping[str, LinearFn] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tensor computation of :meth:`forward` on checked queries, without validation:
        (q′ (B, E) unit-norm, U (B, E, r), V (B, E, r)).

        For code that traces or captures the pass (CUDA graphs, ``torch.compile``, export,
        the CPU runtimes of :mod:`quari.runtime`); everyone else calls the model, which
        checks and normalises the queries first.

        In training mode the pass runs ``self.transformer`` (dropout, token dropout), except
        in the reference variant without any dropout, where it runs the folded pass below. In
        eval mode it runs the same layers from their weights (docs/method.md §3.5): the
        same numbers to fp32 rounding, and in the reference variant the V bank — identical
        to the U bank at every step — is folded into the U bank's attention weight instead
        of being computed twice, which halves the work.

        Args:
            q: (B, E) queries, already checked (finite) and normalised as wanted.
            fold: Eval mode only. ``None`` (default): fold the V bank whenever that is exact
                (the reference variant); ``False``: run the full [ctx; U; V] sequence (the
                check the tests compare against); ``True``: insist on folding.
            linears: Eval mode only. Replacements for the transformer's affine maps, keyed
                by :meth:`transformer_linears` names (a missing name keeps ``F.linear``).

        Raises:
            QuARIInputError: ``fold=True`` for the paper variant (its banks differ), or
                ``fold``/``linears`` in training mode.

        Example:
            >>> model = QuARIModel(HyperNetConfig(embedding_dim=32, rank=4, hidden_dim=16,
            ...     num_layers=1, num_heads=2, num_steps=2, variant="reference")).eval()
            >>> q = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
            >>> with torch.inference_mode():
            ...     folded, full = model.predict_factors(q), model.predict_factors(q, fold=False)
            >>> torch.allclose(folded[1], full[1], atol=1e-6)
            True
        """
        if self.training:
            if fold is not None or linears is not None:
                raise QuARIInputError(
                    "fold and linears apply to the inference pass: call model.eval() first"
                )
            if self._fold_in_training():
                # Without dropout of any kind the banks stay identical while training too, and
                # the folded pass is differentiable: the same loss and gradient at half the cost.
                return self._inference_factors(q, True, {})
            return self.transformer_factors(q)
        return self._inference_factors(q, fold, linears or {})

    def eager_factors(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`predict_factors` as the default (``eager``) runtime runs it: in eval mode
        without autograd on a CPU, the transformer reads prepacked weights where that pays
        (:class:`~quari.hypernet.packing.PackedLinears`: MKL's at small batches on Intel
        CPUs, oneDNN's on others; fp32, equal to rounding); otherwise the plain pass."""
        return self.predict_factors(q, linears=self._packs.linears(self, q))

    def _fold_in_training(self) -> bool:
        cfg = self.config
        return cfg.variant == "reference" and cfg.token_dropout == 0 and cfg.dropout == 0

    def transformer_linears(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The transformer's affine maps by name: ``{name: (weight (out, in), bias (out,))}``.

        Names are ``"transformer.layers.{i}.{role}"`` for every role in
        :data:`LINEAR_ROLES`; these are the keys :meth:`predict_factors` accepts in
        ``linears``. The tensors are the live parameters (not copies).
        """
        out = {}
        for i, layer in enumerate(self.transformer.layers):
            for role in LINEAR_ROLES:
                if role == "self_attn.in_proj":
                    pair = (layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias)
                else:
                    pair = (layer.get_submodule(role).weight, layer.get_submodule(role).bias)
                out[f"transformer.layers.{i}.{role}"] = pair
        return out

    def transformer_factors(
        self, q: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`predict_factors` through ``self.transformer`` as modules, [ctx; U; V] in
        full: what training runs (dropout, token dropout); in eval mode the unfolded oracle
        the inference pass is tested against and the benchmarks' "before" baseline."""
        cfg = self.config
        B, r = q.shape[0], cfg.rank
        ctx = self.query_encoder(q)
        # One state for the whole sequence: the control token and the two token banks (which
        # start at zero) are all updated residually by the same transformer output.
        state = torch.cat([ctx[:, None], ctx.new_zeros(B, 2 * r, cfg.hidden_dim)], dim=1)
        step_inputs = self._step_inputs(ctx, banks=2)
        keep = 1.0 - cfg.token_dropout
        for step in range(cfg.num_steps):
            state = state + self.transformer(state + step_inputs[step])
            if self.training and cfg.token_dropout > 0:
                drop_u = (torch.rand(B, r, 1, device=q.device) < keep).to(state.dtype)
                drop_v = (torch.rand(B, r, 1, device=q.device) < keep).to(state.dtype)
                state = state * torch.cat([drop_u.new_ones(B, 1, 1), drop_u, drop_v], dim=1)
        return self._decode(q, state[:, 0], state[:, 1 : r + 1], state[:, r + 1 :])

    def _inference_factors(
        self, q: torch.Tensor, fold: bool | None, linears: Mapping[str, LinearFn]
    ) -> tuple[torch.Tensor, ...]:
        cfg = self.config
        B, r = q.shape[0], cfg.rank
        if fold is None:
            fold = cfg.variant == "reference"
        elif fold and cfg.variant != "reference":
            raise QuARIInputError(
                "fold=True needs the reference variant: the paper variant's U and V banks get "
                "different positions and differ, so neither can stand for the other"
            )
        if not fold and not linears:
            # Nothing to fold or swap: the module pass keeps PyTorch's fused inference kernels
            # (as fast per token as the pass below, faster at large batches).
            return self.transformer_factors(q)
        banks = 1 if fold else 2
        table = self.transformer_linears()
        unknown = sorted(set(linears) - set(table))
        if unknown:
            raise QuARIInputError(
                f"linears: unknown name(s) {unknown}; the names are transformer_linears()'s"
            )
        fns = {n: linears.get(n) or functools.partial(F.linear, weight=w, bias=b)
               for n, (w, b) in table.items()}  # fmt: skip
        maps = [tuple(fns[f"transformer.layers.{i}.{role}"] for role in LINEAR_ROLES)
                for i in range(len(self.transformer.layers))]  # fmt: skip

        ctx = self.query_encoder(q)
        state = torch.cat([ctx[:, None], ctx.new_zeros(B, banks * r, cfg.hidden_dim)], dim=1)
        step_inputs = self._step_inputs(ctx, banks)
        bias = None
        if fold:
            # [ctx; U; V] with V = U: each U token's key and value appear twice, so the softmax
            # over the full sequence equals one over [ctx; U] with log 2 added to the U logits;
            # the V tokens' outputs equal the U tokens' (docs/method.md §3.5).
            bias = torch.cat([ctx.new_zeros(1), ctx.new_full((r,), math.log(2.0))])
        for step in range(cfg.num_steps):
            x = state + step_inputs[step]
            for layer, layer_maps in zip(self.transformer.layers, maps, strict=True):
                x = encoder_layer(layer, x, bias, layer_maps)
            if self.transformer.norm is not None:
                x = self.transformer.norm(x)
            state = state + x
        u = state[:, 1 : r + 1]
        return self._decode(q, state[:, 0], u, u if fold else state[:, r + 1 :])

    def _decode(
        self, q: torch.Tensor, ctx: torch.Tensor, u: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q′, U, V) from the final control token and token banks."""
        cfg = self.config
        U = self.u_decoder(u).transpose(1, 2)  # (B, E, r)
        V = self.v_decoder(v).transpose(1, 2)
        if cfg.variant == "reference" and cfg.normalize_factors:
            # Same epsilon as the reference implementation, so released weights match exactly.
            U = U / (torch.linalg.matrix_norm(U)[:, None, None] + 1e-8)
            V = V / (torch.linalg.matrix_norm(V)[:, None, None] + 1e-8)
        if cfg.map_query:
            refined = (U @ (V.transpose(1, 2) @ q[..., None]))[..., 0]  # U Vᵀ q
            if cfg.variant == "reference":
                refined = q + cfg.anchor_scale * refined  # (I + α U Vᵀ) q
        else:
            lam = cfg.query_residual_weight
            refined = self.query_decoder(ctx)
            if lam:
                refined = (1.0 - lam) * refined + lam * q
        return F.normalize(refined, dim=-1), U, V

    # -- CUDA graphs ------------------------------------------------------------------------------
    def enable_cuda_graphs(
        self,
        batch_sizes: Iterable[int] = (1, 2, 4, 8, 16, 32),
        *,
        compile: bool = False,
        precision: str = "fp32",
    ) -> QuARIModel:
        """Captures the forward pass as CUDA graphs, one per batch size, for low latency.

        Afterwards ``model(q)`` replays the smallest captured graph that holds the batch
        (padding it) whenever the model is on CUDA, in eval mode and not tracking gradients,
        and returns an ordinary :class:`~quari.adaptation.Adaptation` — the same numbers as
        the eager pass in ``"fp32"`` precision. Larger batches, training and autograd run
        eagerly. Validation and normalisation of the queries stay outside the graph. Moving
        or casting the model
        (``.to()``, ``.half()``…) drops the graphs; enable them again afterwards.

        Args:
            batch_sizes: The batch sizes to capture (each costs one graph's activations).
            compile: Capture the ``torch.compile``-fused forward pass (fewer kernels per
                replay; each batch size compiles once, tens of seconds, when enabling).
            precision: ``"fp32"`` (the eager numbers), ``"tf32"`` or ``"bf16"`` (tensor-core
                arithmetic inside the graph: faster, slightly different q′, U, V — see
                :class:`~quari.kernels.graphs.GraphedForward`).

        Returns:
            The model itself.

        Raises:
            RuntimeError: the model is not on a CUDA device.
            QuARIInputError: a batch size that is not a positive integer.

        Example:
            >>> model = QuARIModel(HyperNetConfig(768)).cuda().eval()  # doctest: +SKIP
            >>> model.enable_cuda_graphs((1, 8, 32))  # doctest: +SKIP
            >>> with torch.inference_mode():  # doctest: +SKIP
            ...     adaptation = model(query)  # replays the batch-1 graph
        """
        from quari.kernels.graphs import GraphedForward

        self._cuda_graphs = None
        self._cuda_graphs = GraphedForward(self, batch_sizes, compile=compile, precision=precision)
        return self

    def disable_cuda_graphs(self) -> QuARIModel:
        """Drops the captured graphs (and their memory); ``model(q)`` runs eagerly again."""
        self._cuda_graphs = None
        return self

    @property
    def cuda_graph_batch_sizes(self) -> tuple[int, ...]:
        """The captured batch sizes (empty when CUDA graphs are off)."""
        return () if self._cuda_graphs is None else self._cuda_graphs.batch_sizes

    # -- CPU runtimes -----------------------------------------------------------------------------
    def set_runtime(self, runtime: str = "eager", **options: Any) -> QuARIModel:
        """Chooses how ``model(q)`` runs on CPU: ``"eager"`` (default, fp32, exact),
        ``"compile"``, ``"onnx"`` (fp32), ``"bf16"``, ``"int8"`` (reduced precision),
        ``"fp32"`` (the faster of eager and onnx, measured here) or ``"auto"`` (the fastest
        that passes the quality guard, measured here; see ``runtime_report``). Described in
        :mod:`quari.runtime`.

        A runtime serves eval-mode, no-grad fp32 CPU queries; training, autograd and CUDA
        run the eager pass. Non-eager runtimes copy the weights now: moving or casting the
        model, ``train()`` and ``load_state_dict`` drop them; after editing weights in
        place, set the runtime again.

        Args:
            runtime: One of :data:`quari.runtime.RUNTIMES`.
            **options: The runtime's options (:func:`quari.runtime.build_runtime`).

        Returns:
            The model itself.

        Raises:
            QuARIInputError: an unknown runtime or option.
            MissingDependencyError: the runtime's optional dependency is not installed.

        Example:
            >>> model = QuARIModel(HyperNetConfig(embedding_dim=32, rank=4, hidden_dim=16,
            ...                                   num_layers=1, num_heads=2)).eval()
            >>> model.set_runtime("int8").runtime
            'int8'
        """
        from quari.runtime import build_runtime

        self._runtime = None
        chosen = build_runtime(self, runtime, **options)
        self._runtime = None if chosen.name == "eager" and chosen.report is None else chosen
        return self

    @property
    def runtime(self) -> str:
        """The name of the runtime that serves eval-mode CPU queries (``"eager"`` unless set)."""
        return "eager" if self._runtime is None else self._runtime.name

    @property
    def runtime_report(self) -> dict[str, Any] | None:
        """What ``set_runtime("auto")`` measured (guards, timings, the choice); else None."""
        return None if self._runtime is None else self._runtime.report

    def train(self, mode: bool = True) -> QuARIModel:
        if mode:
            self._runtime = None  # training changes the weights the runtime copied
            self._packs.clear()
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._runtime = None  # new weights: the runtime's copies would be stale
        self._packs.clear()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles run eagerly: runtimes hold sessions and compiled code.
        state = self.__dict__.copy()
        state["_runtime"] = None  # (the packed-weight cache copies itself empty)
        return state

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half() … replace the parameters that the graphs and runtimes read.
        self._cuda_graphs = None
        self._runtime = None
        self._packs.clear()
        return super()._apply(fn, *args, **kwargs)
