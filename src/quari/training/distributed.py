"""Collectives for the loss under DDP (identity in a single process).

Used through ``torch.distributed`` directly, so the same code runs under Lightning's DDP
strategies, under ``torchrun`` and in the tests' own process groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

__all__ = ["gather_cat", "gather_cat_with_grad", "world"]


def world() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` (same shape on every rank) from all ranks along dim 0, in rank order.
    No gradient flows back (for frozen inputs: image embeddings, image ids)."""
    size, _ = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_cat_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather_cat`, but differentiable: the backward pass sums, over ranks, the
    gradients that reach each rank's slice and returns them to their owner."""
    size, _ = world()
    if size == 1:
        return x
    return torch.cat(dist_fn.all_gather(x))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (so every rank takes the same branch)."""
    size, _ = world()
    if size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
