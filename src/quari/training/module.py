"""The LightningModule: noise → hypernetwork → loss, optimiser and schedule, validation metrics.

Validation is text→image retrieval over the held-out images: every validation caption ranks
every validation image by its adapted score (exact :meth:`quari.Adaptation.score`), and the
frozen cosine baseline ranks them by cos(q, d). Relevance is by key: an image is relevant to a
query when their keys are equal (:meth:`quari.training.data.TrainingData.val_relevance`) —
the query's own image by default, or every image sharing the ``relevance_key`` columns (class-
level retrieval with ``("label",)``). The top :data:`VAL_TOP_K` images of each query
(``torch.topk``; ties in the order topk returns them) are scored by
:func:`quari.eval.metrics.per_query_metrics`. Logged per validation (names in
:data:`VAL_METRICS`): ``val/recall@{1,5,10}`` and ``val/mAP`` = AP@1000 with the min(R, k)
normaliser — with one relevant image per query that is 1 / rank when the image is in the top
1000, else 0 (exactly MRR for galleries of up to 1000 images) — and the same ``baseline/…``
numbers. ``val/mAP`` picks the best checkpoint (:data:`SELECTION_METRIC`).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from quari.adaptation import Adaptation
from quari.eval.metrics import per_query_metrics
from quari.hypernet import HyperNetConfig, QuARIModel
from quari.training.config import TrainConfig
from quari.training.distributed import any_rank, gather_cat, gather_cat_with_grad, world
from quari.training.errors import TrainingError
from quari.training.loss import add_query_noise, quari_loss

__all__ = [
    "SELECTION_METRIC",
    "VAL_METRICS",
    "VAL_TOP_K",
    "QuARITrainingModule",
    "WarmupCosine",
    "step_seed",
    "validation_metrics",
]

VAL_TOP_K = 1000
#: The logged metric that early stopping and the "best" checkpoint follow.
SELECTION_METRIC = "val/mAP"
# logged name → quari.eval.metrics name (the logged names are what checkpoints, early stopping
# and the CLI summary read)
VAL_METRICS = {
    "recall@1": "r@1",
    "recall@5": "r@5",
    "recall@10": "r@10",
    "mAP": f"map@{VAL_TOP_K}",
}


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
        # The validation images (G, E) and their relevance keys (G,); queries and their keys
        # come from the val dataloader.
        self.register_buffer("val_gallery", torch.empty(0), persistent=False)
        self.register_buffer("val_gallery_keys", torch.empty(0, dtype=torch.long), persistent=False)
        self._val_stats: list[torch.Tensor] = []
        self.last_width: int | None = None

    def set_validation_gallery(
        self, gallery: torch.Tensor, keys: torch.Tensor | None = None
    ) -> None:
        """The (G, E) unit validation images that validation queries are ranked against, and
        their (G,) relevance keys (default: each image its own key, so a query's key is the
        gallery row of its one relevant image)."""
        self.val_gallery = gallery
        self.val_gallery_keys = torch.arange(gallery.shape[0]) if keys is None else keys

    # -- training ---------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        torch.manual_seed(step_seed(self.config.seed, self.global_step, self.global_rank))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        cfg = self.config
        queries = batch["query"]
        pick = torch.zeros(queries.shape[0], 1, dtype=torch.bool, device=queries.device)
        if cfg.image_queries > 0:
            # QuARI serves image queries too: a share of the pairs asks with the (noised)
            # image itself, whose positive is that image among the in-batch distractors.
            pick = torch.rand(queries.shape[0], 1, device=queries.device) < cfg.image_queries
            queries = torch.where(pick, batch["image"].to(queries.dtype), queries)
        if cfg.noise_scale:
            queries = add_query_noise(queries, cfg.noise_scale, relative=cfg.noise == "relative")
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
            false_negatives=self.in_batch_false_negatives(batch, ~pick[:, 0]),
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

    def in_batch_false_negatives(
        self, batch: dict[str, torch.Tensor], captioned: torch.Tensor
    ) -> torch.Tensor | None:
        """(B, N) in-batch images that are most likely relevant to query i, masked out of the
        softmax instead of pushed away: for a caption query (``captioned``), images with the
        same relevance key (``relevance_key``: the user's own definition of relevant) and
        images whose caption nearly repeats query i's (cosine of the clean caption
        embeddings ≥ ``false_negative_threshold``). An image query keeps every other image
        as a negative (its task is the instance)."""
        cfg = self.config
        out = None
        if cfg.relevance_negatives and "relevance" in batch:
            out = batch["relevance"][:, None] == gather_cat(batch["relevance"])[None, :]
        if cfg.false_negative_threshold:
            captions = batch["query"].float()
            similar = captions @ gather_cat(captions).T >= cfg.false_negative_threshold
            out = similar if out is None else out | similar
        if out is None:
            return None
        # Symmetric (the image→query term reads it transposed): both pairs asked by caption.
        return out & captioned[:, None] & gather_cat(captioned)[None, :]

    def compute_loss(self, adaptation: Adaptation, images: torch.Tensor, **kwargs: Any) -> Any:
        """The loss of one batch (:func:`quari.training.loss.quari_loss`)."""
        return quari_loss(adaptation, images, **kwargs)

    def _divergence_message(self, batch: dict[str, torch.Tensor], batch_idx: int) -> str:
        # Name the pairs at fault by their set and row (not their place in the batch): the
        # ones whose stored embeddings hold NaN/Inf, else the first few of the batch.
        bad = torch.zeros(batch["row"].shape[0], dtype=torch.bool, device=batch["row"].device)
        for key in ("query", "image"):
            bad |= ~torch.isfinite(batch[key]).all(dim=-1)
        picked = torch.nonzero(bad).flatten()[:4].tolist() or list(range(min(4, bad.numel())))
        rows = [f"set {int(batch['source'][i])} row {int(batch['row'][i])}" for i in picked]
        what = "pairs holding NaN/Inf embeddings" if bad.any() else "first pairs"
        return (
            f"non-finite training loss at global step {self.global_step} (epoch "
            f"{self.current_epoch}, batch {batch_idx}; {what}: {', '.join(rows)}); "
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
            # The reference recipe (docs/method.md §5.5): peak 5e-4 after 1 %, cosine annealing.
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
        queries, keys = batch
        self._val_stats.append(
            _batch_stats(self.model, queries, self.val_gallery, keys, self.val_gallery_keys)
        )

    def on_validation_epoch_end(self) -> None:
        if not self._val_stats:
            return
        stats = torch.stack(self._val_stats).sum(0)  # (3, 1 + len(VAL_METRICS))
        if world()[0] > 1:
            dist.all_reduce(stats)
        self.log_dict(_summary(stats), sync_dist=False)


def _batch_stats(
    model: QuARIModel,
    queries: torch.Tensor,
    gallery: torch.Tensor,
    keys: torch.Tensor,
    gallery_keys: torch.Tensor,
) -> torch.Tensor:
    """(3, 1 + len(VAL_METRICS)) sums over one query batch, each row [count, Σ per metric]:
    the adapted scores' metrics, plain cosine's, and the squared per-query differences
    (adapted − cosine) — sums, so batches and ranks reduce by addition."""
    # Exact fp32 scoring even under bf16 autocast (ranks hinge on small score gaps).
    with torch.autocast(queries.device.type, enabled=False):
        ad = model(queries.float())
        blend = None if ad.blend is None else ad.blend.map(torch.Tensor.float)
        ad = Adaptation(
            ad.refined_query.float(), ad.U.float(), ad.V.float(), ad.variant, ad.anchor_scale,
            blend=blend,
        )  # fmt: skip
        adapted = _per_query(ad.score(gallery), keys, gallery_keys)
        cosine = _per_query(queries.float() @ gallery.T, keys, gallery_keys)
    rows = [adapted.sum(0), cosine.sum(0), ((adapted - cosine) ** 2).sum(0)]
    sums = [[float(len(adapted)), *map(float, row)] for row in rows]
    return torch.tensor(sums, dtype=torch.float64, device=queries.device)


def _per_query(scores: torch.Tensor, keys: torch.Tensor, gallery_keys: torch.Tensor) -> np.ndarray:
    """(B, len(VAL_METRICS)) metrics of each query of (B, G) scores; gallery item j is relevant
    to query i when ``gallery_keys[j] == keys[i]``."""
    ranked = torch.topk(scores, min(VAL_TOP_K, scores.shape[1]), dim=1).indices.cpu().numpy()
    keys_np, gallery_np = keys.cpu().numpy(), gallery_keys.cpu().numpy()
    rel = gallery_np[ranked] == keys_np[:, None]
    counts = np.bincount(gallery_np, minlength=int(max(gallery_np.max(), keys_np.max())) + 1)
    per_query = per_query_metrics(rel, counts[keys_np], VAL_METRICS.values())
    return np.stack([np.asarray(v, dtype=np.float64) for v in per_query.values()], axis=1)


def _summary(stats: torch.Tensor) -> dict[str, float]:
    """``val/…`` and ``baseline/…`` means and ``gain_se/…`` from :func:`_batch_stats` sums.

    ``gain_se/<metric>`` is the standard error of the mean per-query difference (model −
    cosine, the same queries): the validation gain's ± 1.96·se is its 95 % interval by the
    central limit theorem — what the model card and ``quari train`` use to say whether the gain
    is beyond chance. A paired interval from sums, so that it reduces across ranks like the
    means do (an exact bootstrap would need every query's value on one rank).
    """
    n = max(1.0, float(stats[0, 0]))
    out = {}
    for i, name in enumerate(VAL_METRICS):
        adapted, cosine, squares = (float(stats[row, 1 + i]) for row in range(3))
        out[f"val/{name}"], out[f"baseline/{name}"] = adapted / n, cosine / n
        mean = (adapted - cosine) / n
        var = max(0.0, squares - n * mean * mean) / max(1.0, n - 1)
        out[f"gain_se/{name}"] = math.sqrt(var / n)
    return out


@torch.no_grad()
def validation_metrics(
    model: QuARIModel,
    queries: torch.Tensor,
    gallery: torch.Tensor,
    target: torch.Tensor,
    batch_size: int = 256,
    gallery_keys: torch.Tensor | None = None,
) -> dict[str, float]:
    """Validation metrics of ``model`` (``val/…``) and of plain cosine (``baseline/…``).

    Args:
        model: The hypernetwork (put in eval mode here).
        queries: (Q, E) unit query embeddings.
        gallery: (G, E) unit image embeddings.
        target: (Q,) each query's relevance key: without ``gallery_keys``, the gallery row of
            its one relevant image.
        batch_size: Queries per forward pass.
        gallery_keys: (G,) the images' relevance keys (default: their rows).

    Returns:
        ``val/…`` and ``baseline/…`` of every :data:`VAL_METRICS` name, and ``gain_se/…``: the
        standard error of the mean per-query difference between them.

    Example:
        >>> validation_metrics(model, queries, gallery, target)["val/mAP"]  # doctest: +SKIP
        0.41
    """
    model.eval()
    if gallery_keys is None:
        gallery_keys = torch.arange(gallery.shape[0])
    stats = sum(
        _batch_stats(
            model, queries[i : i + batch_size], gallery, target[i : i + batch_size], gallery_keys
        )
        for i in range(0, queries.shape[0], batch_size)
    )
    return _summary(stats)
