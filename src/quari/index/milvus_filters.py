"""Translating quari filters (:mod:`quari.filters` trees) into Milvus boolean expressions.

quari's filters follow pyarrow's semantics — a comparison with a null is null, ``and`` / ``or``
are Kleene, a row passes when the filter is *true* — while a Milvus server evaluates a
comparison with a null as false and ``not`` of that as true. So negation is never sent as is:
each node is translated into two Milvus expressions, one true exactly where the quari filter is
true and one true exactly where it is false (nulls guarded with ``is not null``), and ``not``
swaps them. The Milvus expression therefore selects the same rows whichever null semantics the
server has (Milvus Lite is Kleene, like pyarrow).

Two things have no exact Milvus form and are translated to a *superset* of the passing rows
(:attr:`MilvusFilter.exact` is then False, and the backend drops the extra candidates by row
id): ``startswith`` / ``endswith`` / ``contains`` with ``%`` or ``_`` in the text (Milvus'
``like`` has no portable escape for its wildcards) or a backslash. Everything else either
translates exactly or is refused with a :class:`~quari.errors.QuARIInputError` naming the part:
a column that is not a scalar field of the collection, a name Milvus cannot address, a
comparison of two constants, an operand that is not a column, a non-finite number.

Example:
    >>> from quari.filters import parse_filter
    >>> to_milvus(parse_filter('label == "cat" and not width < 100')).expr
    '(label == "cat" and (width is not null and not (width < 100)))'
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from quari.errors import NotFoundError, QuARIInputError
from quari.filters import BoolOp, Compare, Field, IsIn, IsNull, Literal, Node, Not, StringMatch

__all__ = ["MilvusFilter", "milvus_literal", "to_milvus"]

_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Words Milvus' expression grammar reserves (case-insensitive): a field so named cannot be used.
_RESERVED = {
    "and", "or", "not", "in", "like", "is", "null", "exists", "true", "false", "iso",
    "interval", "json_contains", "array_contains", "text_match",
}  # fmt: skip
_INT64 = (-(1 << 63), (1 << 63) - 1)


@dataclass(frozen=True)
class MilvusFilter:
    """A translated filter.

    Attributes:
        expr: The Milvus boolean expression.
        exact: True when ``expr`` passes exactly the rows the quari filter passes; False when it
            passes a superset (wildcards in a string match), so results must be checked by id.
    """

    expr: str
    exact: bool


@dataclass(frozen=True)
class _Pair:
    """Where a node is true, where it is false (both Milvus expressions), and exactness."""

    true: str
    false: str
    exact: bool = True


def to_milvus(
    node: Node,
    fields: Mapping[str, bool] | None = None,
    *,
    primary: str = "id",
) -> MilvusFilter:
    """Translates a parsed filter into a Milvus boolean expression.

    Args:
        node: A tree from :func:`quari.filters.parse_filter`.
        fields: The collection's scalar fields, name → nullable. A column outside it is refused;
            None accepts any column and guards every one as nullable.
        primary: The primary-key field, used for constant true / false (``id >= 0``).

    Returns:
        The :class:`MilvusFilter`.

    Raises:
        NotFoundError: a column that is not a field of the collection.
        QuARIInputError: a construct Milvus cannot express (named).
    """
    pair = _Translator(fields, primary).pair(node)
    return MilvusFilter(pair.true, pair.exact)


def milvus_literal(value: str | int | float | bool) -> str:
    """A constant in Milvus' expression syntax (strings double-quoted with C escapes).

    Example:
        >>> milvus_literal('say "hi"\\n'), milvus_literal(True), milvus_literal(2.5)
        ('"say \\\\"hi\\\\"\\\\n"', 'true', '2.5')
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise QuARIInputError(f"filter constant {value} does not fit a 64-bit integer")
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise QuARIInputError(f"filter constant {value} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        bad = [c for c in value if ord(c) < 0x20 and c not in "\n\r\t"]
        if bad:
            raise QuARIInputError(
                f"filter string {value!r} holds a control character ({bad[0]!r}) that a Milvus "
                "expression cannot carry"
            )
        escaped = (
            value.replace("\\", "\\\\")
            .replace('"', '\\"')
            .replace("\n", "\\n")
            .replace("\r", "\\r")
            .replace("\t", "\\t")
        )
        return f'"{escaped}"'
    raise QuARIInputError(f"filter constant {value!r} has no Milvus form")


class _Translator:
    def __init__(self, fields: Mapping[str, bool] | None, primary: str) -> None:
        self.fields = fields
        self.always = f"{primary} >= 0"  # row ids are never negative
        self.never = f"{primary} < 0"

    # -- leaves ---------------------------------------------------------------------------------
    def column(self, node: Node, where: Node) -> str:
        if not isinstance(node, Field):
            raise QuARIInputError(
                f"filter part '{where}': Milvus can only test a column here, not '{node}'"
            )
        name = node.name
        if not _IDENTIFIER.match(name) or name.lower() in _RESERVED:
            raise QuARIInputError(
                f"filter part '{where}': the column name {name!r} cannot be used in a Milvus "
                "expression (field names must be identifiers and not keywords)"
            )
        if self.fields is not None and name not in self.fields:
            known = ", ".join(sorted(self.fields)) or "none"
            raise NotFoundError(
                f"filter part '{where}': column {name!r} is not a field of the Milvus "
                f"collection (its fields: {known}); rebuild the index with it among the fields"
            )
        return name

    def not_null(self, *columns: str) -> str:
        """``is not null`` guards for the columns that may hold nulls."""
        nullable = [c for c in columns if self.fields is None or self.fields.get(c, True)]
        return " and ".join(f"{c} is not null" for c in nullable)

    def negate(self, expr: str, *columns: str) -> str:
        """Where ``expr`` (a null-propagating test of ``columns``) is false, nulls excluded."""
        guard = self.not_null(*columns)
        return f"({guard} and not ({expr}))" if guard else f"(not ({expr}))"

    # -- nodes ----------------------------------------------------------------------------------
    def pair(self, node: Node) -> _Pair:
        if isinstance(node, Field):
            name = self.column(node, node)
            return _Pair(f"{name} == true", f"{name} == false")
        if isinstance(node, Compare):
            return self.compare(node)
        if isinstance(node, IsIn):
            return self.isin(node)
        if isinstance(node, IsNull):
            name = self.column(node.operand, node)
            null, valid = f"{name} is null", f"{name} is not null"
            return _Pair(valid, null) if node.negated else _Pair(null, valid)
        if isinstance(node, StringMatch):
            return self.string_match(node)
        if isinstance(node, BoolOp):
            parts = [self.pair(p) for p in node.parts]
            exact = all(p.exact for p in parts)
            trues, falses = [p.true for p in parts], [p.false for p in parts]
            if node.op == "and":
                return _Pair(_join(" and ", trues), _join(" or ", falses), exact)
            return _Pair(_join(" or ", trues), _join(" and ", falses), exact)
        if isinstance(node, Not):
            # An inexact pair is a superset on both sides (see string_match), so the swap
            # keeps a superset of the passing rows.
            inner = self.pair(node.part)
            return _Pair(inner.false, inner.true, inner.exact)
        raise QuARIInputError(f"filter part '{node}': not a condition Milvus can evaluate")

    def compare(self, node: Compare) -> _Pair:
        left, right, op = node.left, node.right, node.op
        if isinstance(left, Literal) and isinstance(right, Literal):
            raise QuARIInputError(f"filter part '{node}' compares two constants")
        if isinstance(left, Literal):  # 5 < width  →  width > 5
            left, right, op = right, left, _FLIP[op]
        a = self.column(left, node)
        if isinstance(right, Literal):
            expr = f"{a} {op} {milvus_literal(right.value)}"
            return _Pair(expr, self.negate(expr, a))
        b = self.column(right, node)
        expr = f"{a} {op} {b}"
        return _Pair(expr, self.negate(expr, a, b))

    def isin(self, node: IsIn) -> _Pair:
        # pyarrow's is_in is never null: a null matches only a None in the list. So "in" and
        # "not in" are complements over every row, nulls included.
        name = self.column(node.operand, node)
        values = [v for v in node.values if v is not None]
        with_null = len(values) < len(node.values)
        listed = f"{name} in [{', '.join(milvus_literal(v) for v in values)}]" if values else ""
        if listed:
            hit = f"({listed} or {name} is null)" if with_null else listed
            miss_valid = f"not ({listed})"
            miss = (
                f"({name} is not null and {miss_valid})"
                if with_null
                else f"({name} is null or {miss_valid})"
            )
        else:  # in [] / in [None]
            hit = f"{name} is null" if with_null else self.never
            miss = f"{name} is not null" if with_null else self.always
        return _Pair(miss, hit) if node.negated else _Pair(hit, miss)

    def string_match(self, node: StringMatch) -> _Pair:
        name = self.column(node.operand, node)
        text = node.pattern
        if "\\" in text:
            # No portable escape: keep every non-null row on both sides (a superset).
            valid = f"{name} is not null"
            return _Pair(valid, valid, False)
        pattern = {"startswith": f"{text}%", "endswith": f"%{text}", "contains": f"%{text}%"}
        expr = f"{name} like {milvus_literal(pattern[node.function])}"
        if "%" in text or "_" in text:
            # The wildcards match more than the literal characters: a superset where true; the
            # false side cannot be narrowed, so it is every non-null row.
            return _Pair(expr, f"{name} is not null", False)
        return _Pair(expr, self.negate(expr, name))


def _join(op: str, parts: list[str]) -> str:
    return "(" + op.join(parts) + ")"
