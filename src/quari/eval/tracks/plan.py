"""Everything about the tracks that is decided before any model runs: which images go where,
their attribute levels, the training captions, the queries and their judgements, the views.

:func:`plan_tracks` is a pure function of the dataset, the sizes and the seed. Every random
choice draws from its own stream (``SeedSequence(seed).spawn``), so changing one count (more
test queries, say) moves nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quari.errors import QuARIInputError
from quari.eval.tracks.attributes import ATTRIBUTES, AttributeThresholds
from quari.eval.tracks.fashion_mnist import CLASS_NAMES, FashionMNIST
from quari.eval.tracks.judgements import InstancePlan, TextQuery, instance_plan, text_queries
from quari.eval.tracks.templates import TEMPLATE_SETS, render
from quari.eval.tracks.views import make_view, view_rng

__all__ = ["SIZES", "SOURCE", "SPLITS", "TrackPlan", "TrackSizes", "plan_tracks", "view_rows"]

SPLITS = ("train", "val", "test")
#: Which Fashion-MNIST file each split's items index.
SOURCE = {"train": "train", "val": "train", "test": "t10k"}


@dataclass(frozen=True)
class TrackSizes:
    """How big a build is.

    Attributes:
        train: Train images (from Fashion-MNIST's training split).
        val: Validation images (the same split, disjoint from train).
        test: Test images (from Fashion-MNIST's test split).
        captions_per_image: Training captions per train image.
        text_queries: Text→image queries per split (val and test).
        image_queries: Image→image query items per split.
        positives: Gallery views per image→image query item.
        resolution: EfficientNet input size in pixels.
    """

    train: int
    val: int
    test: int
    captions_per_image: int = 2
    text_queries: int = 200
    image_queries: int = 100
    positives: int = 3
    resolution: int = 64

    def check(self) -> None:
        """Raises :class:`QuARIInputError` for sizes that cannot be built."""
        for name in ("train", "val", "test", "captions_per_image", "text_queries",
                     "image_queries", "positives"):  # fmt: skip
            if getattr(self, name) < 1:
                raise QuARIInputError(f"track sizes: {name} must be ≥ 1, got {getattr(self, name)}")
        if self.train + self.val > 60000 or self.test > 10000:
            raise QuARIInputError("track sizes: train + val must be ≤ 60,000 and test ≤ 10,000")
        if self.image_queries > min(self.val, self.test):
            raise QuARIInputError("track sizes: image_queries cannot exceed the val or test images")
        if self.resolution < 32:
            raise QuARIInputError(f"track sizes: resolution must be ≥ 32 px, got {self.resolution}")


#: ``small``: for tests and demos; ``full``: the size results are reported on.
SIZES = {
    "small": TrackSizes(2000, 500, 500, 2, 200, 100, 3, 64),
    "full": TrackSizes(8000, 2000, 2000, 3, 1000, 500, 3, 112),
}


@dataclass(frozen=True)
class TrackPlan:
    """The decided content of a build (no embeddings yet).

    Attributes:
        sizes, seed: What it was planned with.
        items: Split → ascending item ids (indices into the Fashion-MNIST file of
            :data:`SOURCE`).
        pixels: Split → (n, 28, 28) uint8 images; labels: split → (n,) class ids.
        thresholds: Attribute cut points (fitted on ``pixels["train"]`` only).
        levels: Split → attribute name → (n,) level indices.
        captions: Training captions, ``captions_per_image`` per train image, image-major.
        queries: "val"/"test" → the text→image queries.
        query_texts: "val"/"test" → the queries worded in that split's phrasing.
        instances: "val"/"test" → the image→image gallery and queries (positions in the split).
        view_pixels: "val"/"test" → the gallery views' pixels followed by the query views'.
    """

    sizes: TrackSizes
    seed: int
    items: dict[str, np.ndarray]
    pixels: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    thresholds: AttributeThresholds
    levels: dict[str, dict[str, np.ndarray]]
    captions: list[str]
    queries: dict[str, list[TextQuery]]
    query_texts: dict[str, list[str]]
    instances: dict[str, InstancePlan]
    view_pixels: dict[str, np.ndarray]


def plan_tracks(data: FashionMNIST, sizes: TrackSizes, seed: int = 0) -> TrackPlan:
    """Decides splits, attribute levels, captions, queries, judgements and views.

    Args:
        data: The dataset.
        sizes: How many of everything.
        seed: Seed of every random choice.

    Returns:
        The :class:`TrackPlan`.

    Example:
        >>> plan = plan_tracks(load_fashion_mnist(), SIZES["small"], seed=0)  # doctest: +SKIP
        >>> plan.query_texts["test"][0]  # doctest: +SKIP
        'sandal, whitish'
    """
    sizes.check()
    if len(data.train_labels) < sizes.train + sizes.val or len(data.test_labels) < sizes.test:
        raise QuARIInputError(
            f"track sizes: the dataset has {len(data.train_labels)} training and "
            f"{len(data.test_labels)} test images; {sizes} asks for more"
        )
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]
    pick, captions_rng = streams[:2]
    text_rng = {"val": streams[2], "test": streams[3]}
    layout_rng = {"val": streams[4], "test": streams[5]}

    perm = pick.permutation(len(data.train_labels))
    items = {
        "train": np.sort(perm[: sizes.train]),
        "val": np.sort(perm[sizes.train : sizes.train + sizes.val]),
        "test": np.sort(pick.permutation(len(data.test_labels))[: sizes.test]),
    }
    images = {"train": data.train_images, "t10k": data.test_images}
    targets = {"train": data.train_labels, "t10k": data.test_labels}
    pixels = {s: images[SOURCE[s]][items[s]] for s in SPLITS}
    labels = {s: np.asarray(targets[SOURCE[s]][items[s]], np.int64) for s in SPLITS}

    thresholds = AttributeThresholds.fit(pixels["train"], labels["train"], len(CLASS_NAMES))
    levels = {s: thresholds.assign(pixels[s], labels[s]) for s in SPLITS}

    names = [a.name for a in ATTRIBUTES]
    captions = []
    for i in range(sizes.train):
        for _ in range(sizes.captions_per_image):
            chosen = captions_rng.choice(
                names, size=int(captions_rng.integers(1, 4)), replace=False
            )
            attrs = {str(n): int(levels["train"][n][i]) for n in chosen}
            captions.append(
                render(TEMPLATE_SETS["train"], int(labels["train"][i]), attrs, rng=captions_rng)
            )

    queries, query_texts, instances, view_pixels = {}, {}, {}, {}
    for s in ("val", "test"):
        rng = text_rng[s]
        queries[s] = text_queries(labels[s], levels[s], sizes.text_queries, rng)
        query_texts[s] = [
            render(TEMPLATE_SETS[s], q.label, dict(q.attributes), rng=rng) for q in queries[s]
        ]
        plan = instance_plan(np.arange(len(items[s])), sizes.image_queries, layout_rng[s],
                             positives=sizes.positives)  # fmt: skip
        instances[s] = plan
        view_pixels[s] = np.stack(
            [
                make_view(pixels[s][p], view_rng(seed, s, int(items[s][p]), v))
                for p, v in view_rows(plan)
            ]
        )
    return TrackPlan(sizes, seed, items, pixels, labels, thresholds, levels, captions, queries,
                     query_texts, instances, view_pixels)  # fmt: skip


def view_rows(plan: InstancePlan) -> list[tuple[int, int]]:
    """(position in the split, view) of every row of ``view_pixels``: gallery, then queries."""
    return [*zip(plan.gallery_items.tolist(), plan.gallery_views.tolist(), strict=True),
            *((int(p), 0) for p in plan.query_items)]  # fmt: skip
