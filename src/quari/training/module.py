"""The LightningModule: noise → hypernetwork → loss, optimiser and schedule, validation metrics.

Validation is text→image retrieval over the held-out images: every validation caption ranks
every validation image by its adapted score (exact :meth:`quari.Adaptation.score`), and the
frozen cosine baseline ranks them by cos(q, d). Logged per validation: ``val/recall@{1,5,10}``
and ``val/mAP`` (one relevant image per query, so AP = 1 / rank and mAP = MRR) and the same
``baseline/…`` numbers.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from quari.adaptation import Adaptation
from quari.hypernet import HyperNetConfig, QuARIModel
from quari.training.config import TrainConfig
from quari.training.distributed import any_rank, gather_cat, gather_cat_with_grad, world
from quari.training.errors import TrainingError
from quari.training.loss import add_query_noise, quari_loss

__all__ = ["QuARITrainingModule", "WarmupCosine", "retrieval_metrics", "step_seed"]

RECALL_AT = (1, 5, 10)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one training step on one rank. Re-seeding every step makes the query
    noise (and any dropout) a function of the step, so a resumed run draws what an
    uninterrupted one would, without saving RNG states."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


class WarmupCosine:
    """LR factor: linear warm-up to 1, then cosine from 1 down to ``floor`` (a LambdaLR
    callable; an object, so its settings go into the scheduler's state)."""

    def __init__(self, warmup: int, total: int, floor: float) -> None:
        self.warmup = warmup
        self.total = total
        self.floor = floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class QuARITrainingModule(L.LightningModule):
    """Trains a :class:`~quari.hypernet.QuARIModel` with the QuARI loss.

    Args:
        model_config: :meth:`HyperNetConfig.to_dict` output.
        train_config: :meth:`TrainConfig.to_dict` output (plain dicts, so Lightning
            checkpoints load with ``weights_only=True``).

    Example:
        >>> module = QuARITrainingModule(model_cfg.to_dict(), train_cfg.to_dict())  # doctest: +SKIP
        >>> module.set_validation_gallery(gallery)  # doctest: +SKIP
    """

    def __init__(self, model_config: dict[str, Any], train_config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = TrainConfig.from_dict(train_config)
        self.model = QuARIModel(HyperNetConfig.from_dict(model_config))
        # The validation images (G, E); queries and targets come from the val dataloader.
        self.register_buffer("val_gallery", torch.empty(0), persistent=False)
        self._val_stats: list[torch.Tensor] = []
        self.last_width: int | None = None

    def set_validation_gallery(self, gallery: torch.Tensor) -> None:
        """The (G, E) unit validation images that validation queries are ranked against."""
        self.val_gallery = gallery

    # -- training ---------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        torch.manual_seed(step_seed(self.config.seed, self.global_step, self.global_rank))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        cfg = self.config
        queries = batch["query"]
        if cfg.noise_scale:
            queries = add_query_noise(queries, cfg.noise_scale)
        adaptation = self.model(queries, normalize=False)
        size, rank = world()
        B = queries.shape[0]
        semi = cfg.semipos and "semipos" in batch
        out = self.compute_loss(
            adaptation,
            gather_cat(batch["image"]),
            semipos=batch["semipos"] if semi else None,
            semipos_weights=batch["semipos_weights"] if semi else None,
            semipos_valid=batch["semipos_valid"] if semi else None,
            groups=gather_cat(batch["group"]),
            offset=rank * B,
            temperature=cfg.temperature,
            normalize_targets=cfg.normalize_targets,
            gather=gather_cat_with_grad if size > 1 else None,
        )
        if any_rank(not bool(torch.isfinite(out.loss)), out.loss.device):
            raise TrainingError(self._divergence_message(batch, batch_idx))
        self.last_width = out.width
        log = {"prog_bar": False, "on_step": True, "on_epoch": False, "batch_size": B}
        self.log("train/loss", out.loss.detach(), **{**log, "prog_bar": True})
        self.log("train/query_to_image", out.query_to_image, **log)
        self.log("train/image_to_query", out.image_to_query, **log)
        self.log("train/accuracy", out.accuracy, **log)
        self.log("train/negatives", float(out.width), **log)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], **log)
        return out.loss

    def compute_loss(self, adaptation: Adaptation, images: torch.Tensor, **kwargs: Any) -> Any:
        """The loss of one batch (:func:`quari.training.loss.quari_loss`)."""
        return quari_loss(adaptation, images, **kwargs)

    def _divergence_message(self, batch: dict[str, torch.Tensor], batch_idx: int) -> str:
        rows = [
            f"set {int(s)} row {int(r)}"
            for s, r in zip(batch["source"][:4].tolist(), batch["row"][:4].tolist(), strict=True)
        ]
        return (
            f"non-finite training loss at global step {self.global_step} (epoch "
            f"{self.current_epoch}, batch {batch_idx}; first pairs: {', '.join(rows)}); "
            "training stopped — the last good checkpoint is kept under "
            f"{self.config.out / 'checkpoints'}. Lower the learning rate (--lr) or check the data."
        )

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.config
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if cfg.schedule == "onecycle":
            # The reference recipe (PAPER.md §3.5): peak 5e-4 after 1 %, cosine annealing.
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=cfg.lr,
                total_steps=total + 1,  # OneCycleLR raises when stepped past total_steps
                pct_start=0.01,
                div_factor=25.0,
                final_div_factor=20.0,
                anneal_strategy="cos",
            )
        else:
            warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 100)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, WarmupCosine(warmup, total, cfg.min_lr / cfg.lr)
            )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # -- validation -------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_stats = []

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        queries, target = batch
        self._val_stats.append(_batch_stats(self.model, queries, self.val_gallery, target))

    def on_validation_epoch_end(self) -> None:
        if not self._val_stats:
            return
        stats = torch.stack(self._val_stats).sum(0)  # (2, 2 + len(RECALL_AT))
        if world()[0] > 1:
            dist.all_reduce(stats)
        adapted, cosine = _metrics(stats[0]), _metrics(stats[1])
        self.log_dict({f"val/{k}": v for k, v in adapted.items()}, sync_dist=False)
        self.log_dict({f"baseline/{k}": v for k, v in cosine.items()}, sync_dist=False)


def _batch_stats(
    model: QuARIModel, queries: torch.Tensor, gallery: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """(2, k) rank statistics of one query batch: adapted scores, then plain cosine."""
    # Exact fp32 scoring even under bf16 autocast (ranks hinge on small score gaps).
    with torch.autocast(queries.device.type, enabled=False):
        ad = model(queries.float())
        ad = Adaptation(
            ad.refined_query.float(), ad.U.float(), ad.V.float(), ad.variant, ad.anchor_scale
        )
        adapted = _ranks(ad.score(gallery), target)
        cosine = _ranks(queries.float() @ gallery.T, target)
    return torch.stack([_stats(adapted), _stats(cosine)])


@torch.no_grad()
def retrieval_metrics(
    model: QuARIModel,
    queries: torch.Tensor,
    gallery: torch.Tensor,
    target: torch.Tensor,
    batch_size: int = 256,
) -> dict[str, float]:
    """Validation metrics of ``model`` (``val/…``) and of plain cosine (``baseline/…``).

    Args:
        model: The hypernetwork (put in eval mode here).
        queries: (Q, E) unit query embeddings.
        gallery: (G, E) unit image embeddings.
        target: (Q,) each query's relevant gallery row.
        batch_size: Queries per forward pass.

    Returns:
        ``val/recall@{1,5,10}``, ``val/mAP`` and the same ``baseline/…`` keys.
    """
    model.eval()
    stats = sum(
        _batch_stats(model, queries[i : i + batch_size], gallery, target[i : i + batch_size])
        for i in range(0, queries.shape[0], batch_size)
    )
    out = {f"val/{k}": v for k, v in _metrics(stats[0]).items()}
    out.update({f"baseline/{k}": v for k, v in _metrics(stats[1]).items()})
    return out


def _ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's relevant item (ties count against it)."""
    positive = scores.gather(1, target[:, None])
    return (scores >= positive).sum(1) - 1


def _stats(ranks: torch.Tensor) -> torch.Tensor:
    """[count, Σ 1/(rank+1), hits@k …] — sums, so shards reduce by addition."""
    ranks = ranks.double()
    hits = [(ranks < k).sum() for k in RECALL_AT]
    return torch.stack([ranks.new_tensor(ranks.numel()), (1.0 / (ranks + 1)).sum(), *hits])


def _metrics(stats: torch.Tensor) -> dict[str, float]:
    n = max(1.0, float(stats[0]))
    out = {f"recall@{k}": float(stats[2 + i]) / n for i, k in enumerate(RECALL_AT)}
    out["mAP"] = float(stats[1]) / n
    return out
