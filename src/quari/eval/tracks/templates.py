"""Captions and queries: three disjoint phrasings, one each for training, validation and test.

A description names the class and 1-3 attributes (:mod:`.attributes`). Each split's
:class:`TemplateSet` words it its own way — its own sentence frames *and* its own words for the
attribute levels — so that a model is tested on phrasings it never saw in training (the words
of validation and test are paraphrases: "light" in training, "pale" in validation, "whitish" in
test). No rendered sentence of one set equals one of another (``tests/test_eval_tracks.py``
checks every combination).

Frame slots: ``{np}`` a noun phrase with its article and the attribute words before the noun
("a dark, wide coat"); ``{a_noun}`` the noun with its article ("an ankle boot"); ``{noun}`` the
bare noun; ``{list}`` the attribute words joined by commas; ``{pred}`` joined with "and"
("dark and wide").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quari.errors import QuARIInputError
from quari.eval.tracks.attributes import ATTRIBUTES

__all__ = ["CLASS_NOUNS", "TEMPLATE_SETS", "TemplateSet", "render"]

#: The noun each class is called by in captions and queries (label order).
CLASS_NOUNS = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)


@dataclass(frozen=True)
class TemplateSet:
    """How one split phrases descriptions.

    Attributes:
        name: ``"train"``, ``"val"`` or ``"test"``.
        frames: Sentence frames (format strings over the slots in the module docstring).
        words: Attribute → the word for each level (in :attr:`Attribute.values` order).
    """

    name: str
    frames: tuple[str, ...]
    words: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"frames": list(self.frames), "words": {k: list(v) for k, v in self.words.items()}}


TEMPLATE_SETS: dict[str, TemplateSet] = {
    "train": TemplateSet(
        "train",
        (
            "a photo of {np}",
            "{np}",
            "a picture of {a_noun} that is {pred}",
            "product shot: {np}",
        ),
        {
            "tone": ("dark", "grey", "light"),
            "coverage": ("slim", "regular", "wide"),
            "texture": ("plain", "patterned"),
            "symmetry": ("symmetric", "asymmetric"),
            "silhouette": ("open", "boxy"),
        },
    ),
    "val": TemplateSet(
        "val",
        (
            "an image showing {np}",
            "{a_noun} which looks {pred}",
            "here is {np}",
        ),
        {
            "tone": ("deep-toned", "mid-toned", "pale"),
            "coverage": ("narrow", "medium-width", "broad"),
            "texture": ("solid", "textured"),
            "symmetry": ("balanced", "lopsided"),
            "silhouette": ("spread-out", "blocky"),
        },
    ),
    "test": TemplateSet(
        "test",
        (
            "{noun}, {list}",
            "looking for {a_noun}: {list}",
            "{a_noun} described as {pred}",
        ),
        {
            "tone": ("blackish", "greyish", "whitish"),
            "coverage": ("thin", "average-width", "bulky"),
            "texture": ("smooth", "detailed"),
            "symmetry": ("even", "uneven"),
            "silhouette": ("open-cut", "compact"),
        },
    ),
}


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _join(words: Sequence[str], last: str) -> str:
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + f" {last} " + words[-1]


def render(
    template_set: TemplateSet,
    label: int,
    attributes: Mapping[str, int],
    *,
    frame: int | None = None,
    rng: np.random.Generator | None = None,
) -> str:
    """Words a description: the class and the given attribute levels.

    Args:
        template_set: The split's phrasing.
        label: Class id.
        attributes: Attribute name → level index (1-3 of them, in the order to say them).
        frame: Which frame to use; ``None`` picks one with ``rng``.
        rng: Random source for the frame when ``frame`` is None.

    Returns:
        The sentence.

    Example:
        >>> render(TEMPLATE_SETS["test"], 4, {"tone": 0, "coverage": 2}, frame=0)
        'coat, blackish, bulky'
    """
    if not attributes:
        raise QuARIInputError("render: a description needs at least one attribute")
    known = {a.name for a in ATTRIBUTES}
    unknown = set(attributes) - known
    if unknown:
        raise QuARIInputError(f"render: unknown attributes {sorted(unknown)}")
    if frame is None:
        if rng is None:
            raise QuARIInputError("render: give a frame index or an rng")
        frame = int(rng.integers(len(template_set.frames)))
    words = [template_set.words[name][level] for name, level in attributes.items()]
    noun = CLASS_NOUNS[label]
    slots = {
        "noun": noun,
        "a_noun": _article(noun),
        "np": _article(", ".join(words) + " " + noun),
        "list": ", ".join(words),
        "pred": _join(words, "and"),
    }
    return template_set.frames[frame].format(**slots)
