"""Pytree helpers for nested NamedTuples of tensors (``Params`` and its groups).

A pytree here is a NamedTuple whose fields are tensors or further NamedTuples; leaves are named by their dotted path
(``'detector.distance'``).  These helpers depend on nothing else in nbtorch, so every module can import them (they
are re-exported by :mod:`nbtorch.types` and :mod:`nbtorch`).
"""
from __future__ import annotations

from typing import Any, Callable, List, Tuple

import torch

__all__ = ["is_node", "tree_map", "tree_leaves", "get_leaf", "replace_leaf"]


def is_node(tree: Any) -> bool:
    """True for an inner node of a pytree (a NamedTuple), False for a leaf."""
    return isinstance(tree, tuple) and hasattr(tree, "_fields")


def tree_map(fn: Callable[[Any], Any], tree):
    """Apply ``fn`` to every leaf of a (nested) NamedTuple, keeping the structure (shapes are whatever ``fn``
    returns)."""
    if is_node(tree):
        return type(tree)(*(tree_map(fn, x) for x in tree))
    return fn(tree)


def tree_leaves(tree, prefix: str = "") -> List[Tuple[str, Any]]:
    """``[(dotted_name, leaf), ...]`` for every leaf of a (nested) NamedTuple, in field order."""
    if is_node(tree):
        out: List[Tuple[str, Any]] = []
        for name, x in zip(tree._fields, tree):
            out += tree_leaves(x, f"{prefix}{name}.")
        return out
    return [(prefix[:-1], tree)]


def get_leaf(params, name: str) -> torch.Tensor:
    """The leaf of ``params`` named ``'group.field'`` (e.g. ``'detector.distance'``), as listed by :func:`tree_leaves`
    (a tensor in the leaf's own shape and unit)."""
    group, field = name.split(".")
    return getattr(getattr(params, group), field)


def replace_leaf(params, name: str, value: torch.Tensor):
    """A copy of ``params`` with the leaf ``'group.field'`` replaced by ``value`` (out of place, transform-safe)."""
    group, field = name.split(".")
    return params._replace(**{group: getattr(params, group)._replace(**{field: value})})
