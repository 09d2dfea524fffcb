"""Metadata filters: a small, safe expression language, parsed to a tree and compiled to
pyarrow expressions (or, by :mod:`quari.index.milvus_filters`, to Milvus boolean expressions).

The Python API takes ``pyarrow.compute.Expression`` objects directly. On the command line
(``quari search --where``) a filter is a Python-like expression, parsed with :mod:`ast` and
translated node by node — nothing is ever evaluated, so a filter cannot run code::

    label == "cat" and width >= 512
    species in ["Mungos mungo", "Suricata suricatta"] and not (year < 2020)
    caption is not None and contains(caption, "red")
    field("image path") != "x"        # a column whose name is not an identifier

Supported: comparisons (``== != < <= > >=``, chained), ``in`` / ``not in`` a list,
``is None`` / ``is not None``, ``and`` / ``or`` / ``not``, parentheses, string/number/bool
literals, and the functions ``field(name)``, ``startswith(col, s)``, ``endswith(col, s)``,
``contains(col, s)``.

:func:`parse_filter` returns the parsed tree (:data:`Node`: :class:`Field`, :class:`Literal`,
:class:`Compare`, :class:`IsIn`, :class:`IsNull`, :class:`StringMatch`, :class:`BoolOp`,
:class:`Not`); :func:`to_expression` compiles a tree to pyarrow and :func:`parse_where` does both.
Backends that filter inside their own engine translate the tree, so the same filter means the
same thing everywhere. The semantics are pyarrow's: comparisons with a null are null, ``and`` /
``or`` follow Kleene logic, a row passes when the filter is true.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, TypeAlias

import pyarrow as pa
import pyarrow.compute as pc

from quari.errors import LimitError, QuARIInputError

__all__ = [
    "MAX_FILTER_CHARS",
    "MAX_FILTER_DEPTH",
    "BoolOp",
    "Compare",
    "Field",
    "IsIn",
    "IsNull",
    "Literal",
    "Node",
    "Not",
    "StringMatch",
    "parse_filter",
    "parse_where",
    "to_expression",
]

#: Longest filter string accepted.
MAX_FILTER_CHARS = 10_000
#: Deepest nesting of the filter's syntax tree (and/or/not/comparisons/calls).
MAX_FILTER_DEPTH = 64


# -- the tree -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    """A metadata column (as a condition on its own: a boolean column)."""

    name: str

    def __str__(self) -> str:
        return self.name if self.name.isidentifier() else f"field({self.name!r})"


@dataclass(frozen=True)
class Literal:
    """A string, int, float or bool constant."""

    value: str | int | float | bool

    def __str__(self) -> str:
        return repr(self.value)


@dataclass(frozen=True)
class Compare:
    """``left op right`` with ``op`` one of ``== != < <= > >=``."""

    op: str
    left: Node
    right: Node

    def __str__(self) -> str:
        return f"{_wrap(self.left)} {self.op} {_wrap(self.right)}"


@dataclass(frozen=True)
class IsIn:
    """``operand in [values]`` (``negated``: ``not in``); a None among the values matches
    nulls."""

    operand: Node
    values: tuple[Any, ...]
    negated: bool = False

    def __str__(self) -> str:
        return f"{_wrap(self.operand)} {'not in' if self.negated else 'in'} {list(self.values)!r}"


@dataclass(frozen=True)
class IsNull:
    """``operand is None`` (``negated``: ``is not None``)."""

    operand: Node
    negated: bool = False

    def __str__(self) -> str:
        return f"{_wrap(self.operand)} is {'not ' if self.negated else ''}None"


@dataclass(frozen=True)
class StringMatch:
    """``startswith`` / ``endswith`` / ``contains`` (substring) of a string operand."""

    function: str
    operand: Node
    pattern: str

    def __str__(self) -> str:
        return f"{self.function}({self.operand}, {self.pattern!r})"


@dataclass(frozen=True)
class BoolOp:
    """``and`` / ``or`` of two or more conditions."""

    op: str
    parts: tuple[Node, ...]

    def __str__(self) -> str:
        return f" {self.op} ".join(_wrap(p) for p in self.parts)


@dataclass(frozen=True)
class Not:
    """``not part``."""

    part: Node

    def __str__(self) -> str:
        return f"not {_wrap(self.part)}"


#: A node of a parsed filter.
Node: TypeAlias = "Field | Literal | Compare | IsIn | IsNull | StringMatch | BoolOp | Not"
_CONDITIONS = (Field, Compare, IsIn, IsNull, StringMatch, BoolOp, Not)


def _wrap(node: Node) -> str:
    return f"({node})" if isinstance(node, (Compare, BoolOp, IsIn, IsNull, Not)) else str(node)


# -- parsing --------------------------------------------------------------------------------------
_COMPARE_OPS = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
}
_STRING_FUNCS = ("startswith", "endswith", "contains")


def parse_filter(text: str) -> Node:
    """Parses a filter string into its tree (a condition node).

    Args:
        text: The filter, e.g. ``'label == "cat" and width > 100'``.

    Returns:
        The root :data:`Node` (never a bare :class:`Literal`).

    Raises:
        QuARIInputError: on a syntax error or an unsupported construct (named with its column).

    Example:
        >>> str(parse_filter('label in ["cat", "dog"] and not score <= 0.5'))
        "(label in ['cat', 'dog']) and (not (score <= 0.5))"
    """
    if not isinstance(text, str):
        raise QuARIInputError(f"filter must be a string, got {type(text).__name__}")
    if len(text) > MAX_FILTER_CHARS:
        raise LimitError(
            f"filter of {len(text):,} characters is longer than the limit of {MAX_FILTER_CHARS:,}"
        )
    shown = text if len(text) <= 80 else text[:77] + "..."
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise QuARIInputError(
            f"filter {shown!r}: syntax error at column {exc.offset}: {exc.msg}"
        ) from None
    except (RecursionError, MemoryError, ValueError) as exc:  # pathological nesting, NUL bytes
        raise QuARIInputError(
            f"filter {shown!r}: cannot be parsed ({type(exc).__name__})"
        ) from None
    depth = _depth(tree.body)
    if depth > MAX_FILTER_DEPTH:
        raise LimitError(
            f"filter {shown!r}: nested {depth} levels deep, more than the limit of "
            f"{MAX_FILTER_DEPTH}"
        )
    node = _Parser(shown).visit(tree.body)
    if not isinstance(node, _CONDITIONS):
        raise QuARIInputError(f"filter {shown!r}: must be a condition, not a single value")
    return node


def _depth(root: ast.AST) -> int:
    """Depth of a syntax tree, measured without recursion (the parser below recurses)."""
    deepest, stack = 0, [(root, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if level <= MAX_FILTER_DEPTH:
            stack.extend((child, level + 1) for child in ast.iter_child_nodes(node))
    return deepest


class _Parser(ast.NodeVisitor):
    def __init__(self, text: str) -> None:
        self.text = text

    def fail(self, node: ast.AST, what: str) -> QuARIInputError:
        col = getattr(node, "col_offset", 0) + 1
        return QuARIInputError(f"filter {self.text!r}: {what} (at column {col})")

    def generic_visit(self, node: ast.AST) -> Any:
        raise self.fail(node, f"unsupported syntax {type(node).__name__}")

    def visit_BoolOp(self, node: ast.BoolOp) -> BoolOp:
        parts = tuple(self.condition(v) for v in node.values)
        return BoolOp("and" if isinstance(node.op, ast.And) else "or", parts)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Any:
        if isinstance(node.op, ast.Not):
            return Not(self.condition(node.operand))
        if isinstance(node.op, ast.USub):
            value = self.visit(node.operand)
            if isinstance(value, Literal) and _is_number(value.value):
                return Literal(-value.value)
        raise self.fail(node, "unsupported unary operator")

    def visit_Compare(self, node: ast.Compare) -> Node:
        parts: list[Node] = []
        left_node, left = node.left, self.visit(node.left)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = None
            if isinstance(op, (ast.In, ast.NotIn)):
                if not isinstance(right_node, (ast.List, ast.Tuple, ast.Set)):
                    raise self.fail(right_node, "'in' needs a list of literals")
                values = tuple(self.literal(e) for e in right_node.elts)
                try:
                    pa.array(values)
                except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                    raise self.fail(right_node, f"mixed value types in the list ({exc})") from exc
                part = IsIn(self.operand(left_node, left), values, isinstance(op, ast.NotIn))
            elif isinstance(op, (ast.Is, ast.IsNot)):
                if not (isinstance(right_node, ast.Constant) and right_node.value is None):
                    raise self.fail(right_node, "'is' only compares with None")
                part = IsNull(self.operand(left_node, left), isinstance(op, ast.IsNot))
            else:
                right = self.visit(right_node)
                part = Compare(
                    _COMPARE_OPS[type(op)],
                    self.operand(left_node, left),
                    self.operand(right_node, right),
                )
            parts.append(part)
            left_node, left = right_node, right
        return parts[0] if len(parts) == 1 else BoolOp("and", tuple(parts))

    def visit_Call(self, node: ast.Call) -> Node:
        if not isinstance(node.func, ast.Name) or node.keywords:
            raise self.fail(node, "only field(), startswith(), endswith(), contains() calls")
        name, args = node.func.id, node.args
        if name == "field":
            if len(args) != 1 or not isinstance(self.literal(args[0]), str):
                raise self.fail(node, "field() takes one column name")
            return Field(self.literal(args[0]))
        if name in _STRING_FUNCS:
            if len(args) != 2 or not isinstance(self.literal(args[1]), str):
                raise self.fail(node, f"{name}(column, text) takes a column and a string")
            operand = self.operand(args[0], self.visit(args[0]))
            return StringMatch(name, operand, self.literal(args[1]))
        raise self.fail(node, f"unknown function {name}()")

    def visit_Name(self, node: ast.Name) -> Field:
        return Field(node.id)

    def visit_Constant(self, node: ast.Constant) -> Literal | None:
        value = self.literal(node)
        return None if value is None else Literal(value)

    def literal(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool)):
            return node.value
        if isinstance(node, ast.Constant) and node.value is None:
            return None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            value = self.literal(node.operand)
            if _is_number(value):
                return -value
        raise self.fail(node, "expected a literal (string, number, bool or None)")

    def operand(self, node: ast.AST, value: Any) -> Node:
        if value is None:
            raise self.fail(node, "compare with None using 'is None' / 'is not None'")
        return value

    def condition(self, node: ast.AST) -> Node:
        value = self.visit(node)
        if not isinstance(value, _CONDITIONS):
            raise self.fail(node, "expected a condition")
        return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- pyarrow --------------------------------------------------------------------------------------
_ARROW_COMPARE = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}
_ARROW_STRING = {
    "startswith": lambda col, s: pc.starts_with(col, pattern=s),
    "endswith": lambda col, s: pc.ends_with(col, pattern=s),
    "contains": lambda col, s: pc.match_substring(col, pattern=s),
}


def to_expression(node: Node) -> pc.Expression:
    """Compiles a parsed filter to a pyarrow expression (``&``/``|`` are Kleene and/or).

    Example:
        >>> to_expression(parse_filter("width > 3"))
        <pyarrow.compute.Expression (width > 3)>
    """
    if isinstance(node, Field):
        return pc.field(node.name)
    if isinstance(node, Literal):
        return pc.scalar(node.value)
    if isinstance(node, Compare):
        return _ARROW_COMPARE[node.op](to_expression(node.left), to_expression(node.right))
    if isinstance(node, IsIn):
        part = to_expression(node.operand).isin(pa.array(node.values))
        return ~part if node.negated else part
    if isinstance(node, IsNull):
        operand = to_expression(node.operand)
        return operand.is_valid() if node.negated else operand.is_null()
    if isinstance(node, StringMatch):
        return _ARROW_STRING[node.function](to_expression(node.operand), node.pattern)
    if isinstance(node, BoolOp):
        out = to_expression(node.parts[0])
        for part in node.parts[1:]:
            out = (out & to_expression(part)) if node.op == "and" else (out | to_expression(part))
        return out
    if isinstance(node, Not):
        return ~to_expression(node.part)
    raise QuARIInputError(f"not a filter node: {node!r}")


def parse_where(text: str) -> pc.Expression:
    """Compiles a filter expression string into a pyarrow expression.

    Args:
        text: The filter, e.g. ``'label == "cat" and width > 100'``.

    Returns:
        A ``pyarrow.compute.Expression`` for :meth:`quari.store.EmbeddingSet.select`.

    Raises:
        QuARIInputError: on a syntax error or an unsupported construct (named with its column).

    Example:
        >>> parse_where('label in ["cat", "dog"] and score > 0.5')
        <pyarrow.compute.Expression (is_in(label, ...) and (score > 0.5))>
    """
    return to_expression(parse_filter(text))
