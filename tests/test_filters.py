"""The --where filter language: compiles to pyarrow, evaluates like Python, never runs code."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from quari import QuARIInputError
from quari.filters import (
    BoolOp,
    Compare,
    Field,
    IsIn,
    IsNull,
    Literal,
    Not,
    StringMatch,
    parse_filter,
    parse_where,
    to_expression,
)

ROWS = [
    {"label": "cat", "width": 640, "score": 0.9, "caption": "a red cat", "image path": "a.jpg"},
    {"label": "dog", "width": 320, "score": 0.4, "caption": None, "image path": "b.jpg"},
    {"label": "cat", "width": 128, "score": -0.5, "caption": "grey cat", "image path": "c.png"},
    {"label": "bird", "width": 1024, "score": 0.7, "caption": "red bird", "image path": "d.jpg"},
]
TABLE = pa.Table.from_pylist(ROWS)


def matching(text: str) -> list[int]:
    table = TABLE.append_column("i", pa.array(range(len(ROWS))))
    return ds.dataset(table).to_table(filter=parse_where(text)).column("i").to_pylist()


@pytest.mark.parametrize(
    "text,python",
    [
        ('label == "cat"', lambda r: r["label"] == "cat"),
        ('label != "cat" and width >= 512', lambda r: r["label"] != "cat" and r["width"] >= 512),
        ("200 < width <= 700", lambda r: 200 < r["width"] <= 700),
        (
            'label in ["dog", "bird"] or score < -0.1',
            lambda r: r["label"] in ("dog", "bird") or r["score"] < -0.1,
        ),
        ('label not in ("cat",)', lambda r: r["label"] not in ("cat",)),
        ("not (width > 300)", lambda r: not r["width"] > 300),
        ("caption is None", lambda r: r["caption"] is None),
        (
            'caption is not None and contains(caption, "red")',
            lambda r: r["caption"] is not None and "red" in r["caption"],
        ),
        (
            'startswith(label, "ca") or endswith(field("image path"), ".png")',
            lambda r: r["label"].startswith("ca") or r["image path"].endswith(".png"),
        ),
        ("score > -0.6 and score < 0.5", lambda r: -0.6 < r["score"] < 0.5),
    ],
)
def test_filters_select_what_python_would(text, python):
    assert matching(text) == [i for i, r in enumerate(ROWS) if python(r)]


@pytest.mark.parametrize(
    "text,match",
    [
        ('__import__("os").system("touch /tmp/pwned")', "only field"),
        ('open("x")', r"unknown function open\(\)"),
        ("label ==", "syntax error"),
        ("width + 3 > 4", "unsupported syntax BinOp"),
        ("label == None", "compare with None using 'is None'"),
        ('label in "cat"', "'in' needs a list of literals"),
        ("3", "must be a condition"),
        ("lambda: 1", "unsupported syntax Lambda"),
    ],
)
def test_unsupported_filters_are_refused_with_their_position(text, match):
    with pytest.raises(QuARIInputError, match=match):
        parse_where(text)


SAMPLE_FILTERS = [
    'label == "cat"',
    "200 < width <= 700",
    'label in ["dog", "bird"] or score < -0.1',
    'label not in ("cat", None)',
    "not (width > 300) and caption is not None",
    'contains(caption, "red") or endswith(field("image path"), ".png")',
    "score > -0.6 and (width == 128 or not label != 'cat')",
]


@pytest.mark.parametrize("text", SAMPLE_FILTERS)
def test_the_tree_prints_as_a_filter_that_parses_to_the_same_tree(text):
    tree = parse_filter(text)
    assert parse_filter(str(tree)) == tree
    assert str(to_expression(tree)) == str(parse_where(text))


def test_the_tree_holds_what_was_written():
    tree = parse_filter('1 < width < 5 and not startswith(field("image path"), "a")')
    assert tree == BoolOp(
        "and",
        (
            BoolOp(
                "and",
                (
                    Compare("<", Literal(1), Field("width")),
                    Compare("<", Field("width"), Literal(5)),
                ),
            ),
            Not(StringMatch("startswith", Field("image path"), "a")),
        ),
    )
    assert parse_filter("label in [None, 'x']") == IsIn(Field("label"), (None, "x"))
    assert parse_filter("x is not None") == IsNull(Field("x"), negated=True)
    assert parse_filter("-3 < x") == Compare("<", Literal(-3), Field("x"))
    with pytest.raises(QuARIInputError, match="must be a condition"):
        parse_filter("-3")
