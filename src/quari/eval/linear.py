"""Training the static linear-adaptation baseline (:class:`~quari.adapters.LinearAdapter`).

The baseline is trained on exactly the caption → image pairs a QuARI run uses (the same sets,
image-level split and seed, read by :class:`quari.training.data.TrainingData`), so the two are
compared on equal data. The recipe follows ILIAS's ``linear_adaptation`` where it carries over:
Adam, learning rate 1e-3, weight decay 1e-6, batch 128, a few epochs. ILIAS trains with a
CosFace / normalised-softmax head over UnED class labels; caption → image pairs have no class
labels, so the loss here is the symmetric contrastive (InfoNCE) loss over in-batch negatives:

    L = ½ [CE(softmax_j(z_qᵢ·z_dⱼ / τ), i) + CE(softmax_i(z_qᵢ·z_dⱼ / τ), j)],  z = normalize(W·)

with other captions of the same image (same ``image_key``) masked out of both softmaxes, as the
QuARI loss does. The exported folder is the one with the best validation mAP, checked after
every epoch on the run's validation split with the names and definitions a QuARI run logs
(``val/recall@{1,5,10}``, ``val/mAP`` = AP@1000, and ``baseline/…`` for plain cosine; see
:mod:`quari.training.module`), computed by :mod:`quari.eval.metrics`. That module is not
imported here: it loads Lightning, which a linear fit does not need.

Example:
    >>> cfg = LinearTrainConfig(train=(TrainSource.parse("coco"),), out=Path("runs/linear"),
    ...                         image_key="image_id")  # doctest: +SKIP
    >>> result = train_linear(cfg)  # doctest: +SKIP
    >>> result.metrics["val/mAP"], result.metrics["baseline/mAP"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quari.adapters import CosineAdapter, LinearAdapter, QueryAdapter
from quari.errors import QuARIInputError, TrainingError
from quari.eval.metrics import relevance_matrix, retrieval_metrics
from quari.fileio import atomic_write
from quari.training.config import TrainConfig, TrainSource
from quari.training.data import TrainingData

__all__ = [
    "LinearTrainConfig",
    "LinearTrainResult",
    "contrastive_loss",
    "train_linear",
    "validation_metrics",
]

_MASKED = -1e9  # a masked logit: exp underflows to 0 without the NaN that −inf can produce
# QuARI's validation names (quari.training.module.VAL_METRICS) → quari.eval.metrics names
_VAL_METRICS = {"recall@1": "r@1", "recall@5": "r@5", "recall@10": "r@10", "mAP": "map@1000"}


@dataclass(frozen=True)
class LinearTrainConfig:
    """One linear-adapter run.

    Args:
        train: Training sets (caption ↔ image pairs), as for ``quari train``.
        out: Output folder (the adapter folder; ``linear_train.json`` with the run's settings).
        val: Validation set (None: hold out ``val_fraction`` of the training images).
        image_key: Metadata column grouping the captions of one image.
        val_fraction: Share of images held out for validation.
        out_dim: D, the projected dimension (default min(512, E), as ILIAS; the full form).
        rank: k: learn the low-rank form W = I + L Rᵀ (E → E, rank-k correction of the frozen
            space; :class:`~quari.adapters.LinearAdapter`) instead of the full D×E map.
        epochs: Passes over the training pairs (ILIAS: 2 in its SigLIP example, 5 by default).
        batch_size: Pairs per step (ILIAS: 128).
        lr: Adam learning rate (ILIAS: 1e-3).
        weight_decay: Adam weight decay (ILIAS: 1e-6).
        temperature: τ of the contrastive loss (QuARI's 0.07).
        max_steps: Stop after this many steps (None: run every epoch).
        seed: Seeds the initial map, the data order and the validation split.
        progress: Show a progress bar.
    """

    train: tuple[TrainSource, ...]
    out: Path
    val: Path | None = None
    image_key: str | None = None
    val_fraction: float = 0.05
    out_dim: int | None = None
    rank: int | None = None
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    temperature: float = 0.07
    max_steps: int | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QuARIInputError(f"{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise QuARIInputError(f"max_steps must be positive, got {self.max_steps}")
        if self.out_dim is not None and self.out_dim < 1:
            raise QuARIInputError(f"out_dim must be positive, got {self.out_dim}")
        if self.rank is not None and (isinstance(self.rank, bool) or self.rank < 1):
            raise QuARIInputError(f"rank must be a positive integer, got {self.rank!r}")
        if self.rank is not None and self.out_dim is not None:
            raise QuARIInputError("rank (the low-rank form, E → E) and out_dim exclude each other")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise QuARIInputError(f"{name} must be positive, got {getattr(self, name)}")

    def data_config(self) -> TrainConfig:
        """The :class:`TrainConfig` whose pairs and split a QuARI run with the same sets,
        ``image_key``, ``val_fraction`` and seed would use (no semi-positives)."""
        return TrainConfig(
            train=self.train,
            out=self.out,
            val=self.val,
            image_key=self.image_key,
            val_fraction=self.val_fraction,
            batch_size=self.batch_size,
            semipos=False,
            seed=self.seed,
            progress=self.progress,
        )


@dataclass
class LinearTrainResult:
    """Outcome of :func:`train_linear`: the adapter folder, steps run, validation metrics
    (``val/…`` of the adapter, ``baseline/…`` of plain cosine) and the epoch exported."""

    model_dir: Path
    steps: int
    metrics: dict[str, float]
    best_epoch: int


def contrastive_loss(
    queries: torch.Tensor,
    images: torch.Tensor,
    groups: torch.Tensor | None = None,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch negatives for unit (B, D) query and image vectors.

    Args:
        queries: (B, D) unit query vectors; row i's positive is ``images[i]``.
        images: (B, D) unit image vectors.
        groups: (B,) image ids; a column holding the same image as the positive (another
            caption of it) is masked out instead of counting as a negative.
        temperature: τ.

    Returns:
        The scalar loss (mean of both directions).

    Example:
        >>> z = F.normalize(torch.randn(4, 8), dim=-1)
        >>> bool(contrastive_loss(z, z) < contrastive_loss(z, z.flip(0)))
        True
    """
    logits = queries @ images.T / temperature
    target = torch.arange(queries.shape[0], device=queries.device)
    if groups is not None:
        same = groups[:, None] == groups[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, _MASKED)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@torch.no_grad()
def validation_metrics(
    adapter: QueryAdapter, queries: torch.Tensor, gallery: torch.Tensor, target: torch.Tensor
) -> dict[str, float]:
    """``val/…`` metrics of ``adapter`` and ``baseline/…`` of plain cosine on a validation
    split: each query ranks the whole gallery, its one relevant image is ``target``.

    Args:
        adapter: The adapter under test.
        queries: (Q, E) unit queries.
        gallery: (G, E) unit images.
        target: (Q,) each query's gallery row.

    Returns:
        ``val/recall@{1,5,10}``, ``val/mAP`` (AP@1000) and the same ``baseline/…``.
    """
    if isinstance(adapter, torch.nn.Module):
        adapter.eval()
    out: dict[str, float] = {}
    k = min(1000, gallery.shape[0])
    for prefix, model in (("val", adapter), ("baseline", CosineAdapter(gallery.shape[1]))):
        ranked = torch.topk(model(queries).score(gallery), k, dim=1).indices.numpy()
        rel, n_relevant = relevance_matrix(ranked, target.numpy())
        means = retrieval_metrics(rel, n_relevant, _VAL_METRICS.values())
        out.update({f"{prefix}/{name}": means[m] for name, m in _VAL_METRICS.items()})
    return out


def train_linear(config: LinearTrainConfig) -> LinearTrainResult:
    """Trains a :class:`~quari.adapters.LinearAdapter` and saves it in ``config.out``.

    Args:
        config: The run.

    Returns:
        A :class:`LinearTrainResult`.

    Raises:
        QuARIInputError: bad data (as for ``quari train``: no text embeddings, mixed encoders,
            empty splits, fewer pairs than one batch).
        TrainingError: a non-finite loss.
    """
    data = TrainingData.from_config(config.data_config(), progress=config.progress)
    queries, gallery, target = data.val_vectors()
    batches = data.batches(config.batch_size)
    torch.manual_seed(config.seed)
    adapter = LinearAdapter(data.dim, config.out_dim, rank=config.rank)
    optimizer = torch.optim.Adam(
        adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    total = config.epochs * len(batches)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    best: tuple[float, int, dict[str, float], dict[str, torch.Tensor]] | None = None
    step = 0
    bar = tqdm(total=total, desc="linear adapter", unit="step", disable=not config.progress)
    for epoch in range(config.epochs):
        adapter.train()
        for index in range(len(batches)):
            if step >= total:
                break
            batch = batches[(epoch, index)]
            loss = contrastive_loss(
                adapter.project(batch["query"]),
                adapter.project(batch["image"]),
                batch["group"],
                config.temperature,
            )
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss at step {step} (epoch {epoch}, batch {index})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        metrics = validation_metrics(adapter, queries, gallery, target)
        if best is None or metrics["val/mAP"] > best[0]:
            best = (metrics["val/mAP"], epoch, metrics, copy.deepcopy(adapter.state_dict()))
        if step >= total:
            break
    bar.close()
    assert best is not None  # at least one epoch ran: a batch exists (PairBatches checks)
    _, best_epoch, metrics, state = best
    adapter.load_state_dict(state)
    adapter.metadata.update(
        {
            "encoder": data.encoder,
            "data": " + ".join(
                f"{t['path']} ({t['pairs']:,} pairs)" for t in data.summary()["train"]
            ),
            "training": (
                ("" if config.rank is None else f"W = I + L Rᵀ of rank {config.rank}; ")
                + f"symmetric InfoNCE (τ {config.temperature:g}), Adam lr {config.lr:g}, weight "
                f"decay {config.weight_decay:g}, batch {config.batch_size}, {step} steps, best "
                f"epoch {best_epoch + 1} of {epoch + 1}, seed {config.seed}"
            ),
            "steps": step,
            "metrics": {k: round(v, 6) for k, v in metrics.items()},
        }
    )
    adapter.save(config.out)
    settings = {**asdict(config), "train": [str(s.path) for s in config.train]}
    text = json.dumps(settings, indent=2, default=str) + "\n"
    atomic_write(config.out / "linear_train.json", lambda f: f.write(text.encode()))
    return LinearTrainResult(config.out, step, dict(metrics), best_epoch)
