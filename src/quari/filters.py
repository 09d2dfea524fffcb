"""Metadata filters: a small, safe expression language compiled to pyarrow expressions.

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
"""

from __future__ import annotations

import ast
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from quari.errors import LimitError, QuARIInputError

__all__ = ["MAX_FILTER_CHARS", "MAX_FILTER_DEPTH", "parse_where"]

#: Longest filter string accepted.
MAX_FILTER_CHARS = 10_000
#: Deepest nesting of the filter's syntax tree (and/or/not/comparisons/calls).
MAX_FILTER_DEPTH = 64

_COMPARE = {
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
}
_STRING_FUNCS = {
    "startswith": lambda col, s: pc.starts_with(col, pattern=s),
    "endswith": lambda col, s: pc.ends_with(col, pattern=s),
    "contains": lambda col, s: pc.match_substring(col, pattern=s),
}


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
    expr = _Compiler(shown).visit(tree.body)
    if not isinstance(expr, pc.Expression):
        raise QuARIInputError(f"filter {text!r}: must be a condition, not a single value")
    return expr


def _depth(root: ast.AST) -> int:
    """Depth of a syntax tree, measured without recursion (the compiler below recurses)."""
    deepest, stack = 0, [(root, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if level <= MAX_FILTER_DEPTH:
            stack.extend((child, level + 1) for child in ast.iter_child_nodes(node))
    return deepest


class _Compiler(ast.NodeVisitor):
    def __init__(self, text: str) -> None:
        self.text = text

    def fail(self, node: ast.AST, what: str) -> QuARIInputError:
        col = getattr(node, "col_offset", 0) + 1
        return QuARIInputError(f"filter {self.text!r}: {what} (at column {col})")

    def generic_visit(self, node: ast.AST) -> Any:
        raise self.fail(node, f"unsupported syntax {type(node).__name__}")

    def visit_BoolOp(self, node: ast.BoolOp) -> pc.Expression:
        parts = [self.condition(v) for v in node.values]
        out = parts[0]
        for part in parts[1:]:
            out = (out & part) if isinstance(node.op, ast.And) else (out | part)
        return out

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Any:
        if isinstance(node.op, ast.Not):
            return ~self.condition(node.operand)
        if isinstance(node.op, ast.USub):
            value = self.visit(node.operand)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return -value
        raise self.fail(node, "unsupported unary operator")

    def visit_Compare(self, node: ast.Compare) -> pc.Expression:
        out = None
        left_node, left = node.left, self.visit(node.left)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = None
            if isinstance(op, (ast.In, ast.NotIn)):
                if not isinstance(right_node, (ast.List, ast.Tuple, ast.Set)):
                    raise self.fail(right_node, "'in' needs a list of literals")
                try:
                    values = pa.array([self.literal(e) for e in right_node.elts])
                except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                    raise self.fail(right_node, f"mixed value types in the list ({exc})") from exc
                part = self.operand(left_node, left).isin(values)
                part = ~part if isinstance(op, ast.NotIn) else part
            elif isinstance(op, (ast.Is, ast.IsNot)):
                if not (isinstance(right_node, ast.Constant) and right_node.value is None):
                    raise self.fail(right_node, "'is' only compares with None")
                operand = self.operand(left_node, left)
                part = operand.is_null() if isinstance(op, ast.Is) else operand.is_valid()
            else:
                right = self.visit(right_node)
                part = _COMPARE[type(op)](
                    self.operand(left_node, left), self.operand(right_node, right)
                )
            out = part if out is None else out & part
            left_node, left = right_node, right
        return out

    def visit_Call(self, node: ast.Call) -> pc.Expression:
        if not isinstance(node.func, ast.Name) or node.keywords:
            raise self.fail(node, "only field(), startswith(), endswith(), contains() calls")
        name, args = node.func.id, node.args
        if name == "field":
            if len(args) != 1 or not isinstance(self.literal(args[0]), str):
                raise self.fail(node, "field() takes one column name")
            return pc.field(self.literal(args[0]))
        if name in _STRING_FUNCS:
            if len(args) != 2 or not isinstance(self.literal(args[1]), str):
                raise self.fail(node, f"{name}(column, text) takes a column and a string")
            return _STRING_FUNCS[name](
                self.operand(args[0], self.visit(args[0])), self.literal(args[1])
            )
        raise self.fail(node, f"unknown function {name}()")

    def visit_Name(self, node: ast.Name) -> pc.Expression:
        if node.id in ("True", "False", "None"):  # pragma: no cover - parsed as Constant
            return self.literal(node)
        return pc.field(node.id)

    def visit_Constant(self, node: ast.Constant) -> Any:
        return self.literal(node)

    def literal(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool)):
            return node.value
        if isinstance(node, ast.Constant) and node.value is None:
            return None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            value = self.literal(node.operand)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return -value
        raise self.fail(node, "expected a literal (string, number, bool or None)")

    def operand(self, node: ast.AST, value: Any) -> Any:
        if isinstance(value, pc.Expression):
            return value
        if value is None:
            raise self.fail(node, "compare with None using 'is None' / 'is not None'")
        return pc.scalar(value)

    def condition(self, node: ast.AST) -> pc.Expression:
        value = self.visit(node)
        if not isinstance(value, pc.Expression):
            raise self.fail(node, "expected a condition")
        return value
