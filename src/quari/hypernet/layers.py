"""The hypernetwork's building blocks: positional and step codes, the decoder MLP, and one
transformer layer written out from its weights (so a runtime can swap its affine maps)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LINEAR_ROLES",
    "LinearFn",
    "encoder_layer",
    "mlp",
    "sinusoidal_table",
    "step_codes",
]

#: An affine map x ↦ x Wᵀ + b of the inference pass (``F.linear`` with a layer's weights, or
#: a runtime's reduced-precision or prepacked version of it).
LinearFn = Callable[[torch.Tensor], torch.Tensor]

#: The affine maps of one transformer layer, by role: the fused Q/K/V projection, the
#: attention output projection and the two feed-forward maps. They carry ≈97 % of the
#: inference FLOPs (docs/method.md §3.5), so runtimes replace these (by
#: :meth:`QuARIModel.transformer_linears` names) and keep the rest of the pass in fp32.
LINEAR_ROLES = ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2")


# The code tables are computed on the CPU and then moved to the default device: under a
# ``torch.device("meta")`` context (the checkpoint loader's shape check) torch runs a meta
# ``arange`` through its Python decompositions, whose first use imports torch._dynamo — about
# a second and a half added to every process's first model load.
_CPU = torch.device("cpu")


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """Transformer positional codes: row p holds sin/cos of p·10000^(−2i/dim), interleaved."""
    pos = torch.arange(length, dtype=torch.float32, device=_CPU)[:, None]
    steps = torch.arange(0, dim, 2, dtype=torch.float32, device=_CPU)
    freq = torch.exp(steps * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=_CPU)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table.to(torch.get_default_device())


def step_codes(steps: int, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Diffusion-style codes of steps t = 0 … steps−1, one row each: [cos(t·f_i) ; sin(t·f_i)],
    f_i = P^(−i/(dim/2))."""
    half = dim // 2
    freq = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=_CPU) / half
    )
    angle = torch.arange(steps, dtype=torch.float32, device=_CPU)[:, None] * freq
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1).to(torch.get_default_device())


def mlp(width: int, out_dim: int, dropout: float, layer_norm: bool) -> nn.Sequential:
    """Two-layer decoder: Linear → [LayerNorm] → GELU → Dropout → Linear."""
    mid: list[nn.Module] = [nn.LayerNorm(width)] if layer_norm else []
    return nn.Sequential(
        nn.Linear(width, width), *mid, nn.GELU(), nn.Dropout(dropout), nn.Linear(width, out_dim)
    )


def encoder_layer(
    layer: nn.TransformerEncoderLayer,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    linears: tuple[LinearFn, LinearFn, LinearFn, LinearFn],
) -> torch.Tensor:
    """One pre-norm ``nn.TransformerEncoderLayer`` (GELU, eval mode) from its own weights.

    The same arithmetic as the layer's forward, written out so that the attention can take
    an additive bias on its logits (the folded bank, docs/method.md §3.5) and the affine
    maps can be swapped for a runtime's versions (``linears``, in :data:`LINEAR_ROLES`
    order). ``bias`` is (S,), added to every query token's logit of key token s.
    """
    B, S, H = x.shape
    heads = layer.self_attn.num_heads
    in_proj, out_proj, linear1, linear2 = linears
    h = F.layer_norm(x, (H,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    qkv = in_proj(h).view(B, S, 3, heads, H // heads).permute(2, 0, 3, 1, 4)
    mask = None if bias is None else bias.to(qkv.dtype).view(1, 1, 1, S)
    a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
    x = x + out_proj(a.transpose(1, 2).reshape(B, S, H))
    h = F.layer_norm(x, (H,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    return x + linear2(F.gelu(linear1(h)))
