"""JSON values of a DIALS experiment list with their place in the file, for one-line error messages (private to
:mod:`nbtorch.io.dials` and :mod:`nbtorch.io.dials_experiments`).

A :class:`Node` is a JSON value with the file's name and its JSON path (``detector[0].panels[3].fast_axis``); its
readers check the value's type, length and range and raise :class:`ExptFileError` naming both.
"""
from __future__ import annotations

import json
import math
from typing import Optional


class ExptFileError(ValueError):
    """A malformed ``.expt`` file: the message is one line ``"<file>: <JSON path>: <problem>"``."""


MISSING = object()


class Node:
    """A JSON value with the file name and its JSON path, for one-line messages."""

    def __init__(self, name: str, path: str, value):
        self.name, self.path, self.value = name, path, value

    def error(self, problem: str) -> ExptFileError:
        """An :class:`ExptFileError` naming the file and this value's JSON path."""
        return ExptFileError(f"{self.name}: {self.path or '(top level)'}: {problem}")

    def obj(self) -> "Node":
        """This node, checked to be a JSON object."""
        if not isinstance(self.value, dict):
            raise self.error(f"expected a JSON object, got {kind(self.value)}")
        return self

    def key(self, key: str, default=MISSING) -> Optional["Node"]:
        """The member ``key`` (an error naming it when missing and no default is given; None for a default)."""
        value = self.obj().value.get(key, MISSING)
        path = f"{self.path}.{key}" if self.path else key
        if value is MISSING:
            if default is MISSING:
                raise ExptFileError(f"{self.name}: {path}: missing")
            return None
        return Node(self.name, path, value)

    def items(self, length: Optional[int] = None):
        """The members of a JSON list as nodes (``length`` of them when given)."""
        if not isinstance(self.value, list):
            raise self.error(f"expected a JSON list, got {kind(self.value)}")
        if length is not None and len(self.value) != length:
            raise self.error(f"expected {length} values, got {len(self.value)}")
        return [Node(self.name, f"{self.path}[{i}]", v) for i, v in enumerate(self.value)]

    def number(self, low: Optional[float] = None, strict: bool = False) -> float:
        """A finite number (not a bool), >= ``low`` (> with ``strict``) when given."""
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.error(f"expected a number, got {kind(v)}")
        if low is not None and (v < low or (strict and v == low)):
            raise self.error(f"must be {'>' if strict else '>='} {low}, got {v!r}")
        return float(v)

    def integer(self, low: Optional[int] = None) -> int:
        """An integer (not a bool), >= ``low`` when given."""
        v = self.value
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(f"expected an integer, got {kind(v)}")
        if low is not None and v < low:
            raise self.error(f"must be >= {low}, got {v}")
        return v

    def string(self) -> str:
        """A string."""
        if not isinstance(self.value, str):
            raise self.error(f"expected a string, got {kind(self.value)}")
        return self.value

    def vector(self, length: int = 3, nonzero: bool = False) -> tuple:
        """``length`` finite numbers (not all zero with ``nonzero``) as a tuple."""
        out = tuple(n.number() for n in self.items(length))
        if nonzero and not any(out):
            raise self.error("a zero-length vector")
        return out


def kind(value) -> str:
    """How a message names a JSON value: ``an object``, ``a list``, ``a string``, ``null`` or the number."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    names = {dict: "an object", list: "a list", str: "a string"}
    return names.get(type(value), repr(value) if isinstance(value, (int, float)) else type(value).__name__)


def optional(node: Node, key: str, default, read):
    """``read(member)`` of member ``key``, or ``default`` when the key is absent."""
    child = node.key(key, None)
    return default if child is None else read(child)
