"""The flat vector of N images, X = (x_s [n_s], x_1 [n_1], …, x_N [n_N]): the shared scalars (one value for all
images), then each image's own.  Every image keeps its own :class:`~refine.model.parameters.Parameterisation` about
its own starting model, whose shared parts are made identical first (:func:`align_shared`), so a shared increment
means the same change in every image.  One image alone has no shared scalars: X is its x."""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import List, Sequence, Tuple

import torch

from nbtorch.types import Params

from .parameters import Parameterisation, get_leaf, resolve_nodes, set_leaf
from .table import OWN_LEAVES, SUBGROUPS, catalogue


def _specs_of(names: Sequence[str], panels=None):
    """Table entries a list of groups / sub-groups / scalar names covers (panel-group names resolved on the panel
    layout ``panels``)."""
    out, names = [], resolve_nodes(names, panels)
    for n in names:
        sub = SUBGROUPS.get(n, ())
        out += [s for s in catalogue(panels) if n in (s.group, s.name) or s.name in sub]
    return out


def _copy_component(ref: torch.Tensor, cur: torch.Tensor, index) -> torch.Tensor:
    """``cur`` with component ``index`` (of the flattened leaf; None or a scalar leaf: all of it) taken from ``ref``."""
    if index is None or ref.dim() == 0:
        return ref.clone()
    flat = cur.reshape(-1).clone()
    flat[index] = ref.reshape(-1)[index]
    return flat.reshape(cur.shape)


def align_shared(params_list: Sequence[Params], shared: Sequence[str],
                 panels=None) -> Tuple[List[Params], List[str]]:
    """Copy the leaves of the ``shared`` groups/scalars from the first model to every other one: (models, notes
    naming the leaves whose starting values differed).  The background plane and the PSF FWHM are refine's
    (``FitOptions.background``, ``psf_fwhm``) and the same for every image; ``panels``: the panel layout that
    resolves panel-group names."""
    first, out, notes = params_list[0], [params_list[0]], []
    leaves = []
    for s in _specs_of(shared, panels):
        if s.transform == "rotation":
            leaves += [("crystal.misset", None), ("crystal.orientation", None)]
        elif s.leaf not in OWN_LEAVES:
            leaves.append((s.leaf, s.index if s.transform != "cell" else None))
    leaves = list(dict.fromkeys(leaves))
    for k, p in enumerate(params_list[1:], start=2):
        for leaf, index in leaves:
            ref, cur = get_leaf(first, leaf), get_leaf(p, leaf)
            new = _copy_component(ref, cur, index) if ref.shape == cur.shape else ref.clone()
            if new.shape != cur.shape or not torch.allclose(new.to(cur), cur, rtol=1e-9, atol=1e-12):
                notes.append(f"image {k}: starting {leaf} differs from image 1's; the shared start is image 1's")
            p = set_leaf(p, leaf, new.to(cur))
        out.append(p)
    return out, notes


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each image's scalars sit in the flat vector X.

    ``shared`` (names, the first n_s entries of X); per image ``names`` (its parameterisation's order),
    ``shared_pos`` (positions of the shared names in it) and ``own_pos`` (positions of its own scalars, in order)."""

    shared: Tuple[str, ...]
    names: Tuple[Tuple[str, ...], ...]
    shared_pos: Tuple[Tuple[int, ...], ...]
    own_pos: Tuple[Tuple[int, ...], ...]

    @functools.cached_property
    def offset(self) -> Tuple[int, ...]:
        """Where each image's own scalars start in X."""
        return tuple(itertools.accumulate((len(p) for p in self.own_pos[:-1]), initial=len(self.shared)))

    @property
    def n(self) -> int:
        """Length of X."""
        return len(self.shared) + sum(len(p) for p in self.own_pos)

    def x_names(self) -> List[str]:
        """The name of every entry of X: the shared scalars', then each image's own (with ``@image k`` when there
        are several images)."""
        many = len(self.names) > 1
        return list(self.shared) + [self.names[i][j] + (f"@image {i + 1}" if many else "")
                                    for i, own in enumerate(self.own_pos) for j in own]

    def image_x(self, X: torch.Tensor, i: int) -> torch.Tensor:
        """Image ``i``'s increments [n_i] (its parameterisation's order) from X."""
        x = X.new_zeros(len(self.names[i]))
        ns, o = len(self.shared), self.offset[i]
        x[list(self.shared_pos[i])] = X[:ns]
        x[list(self.own_pos[i])] = X[o:o + len(self.own_pos[i])]
        return x

    def position(self, i: int, j: int) -> int:
        """Where scalar ``j`` of image ``i``'s parameterisation sits in X."""
        if j in self.shared_pos[i]:
            return self.shared_pos[i].index(j)
        return self.offset[i] + self.own_pos[i].index(j)

    def pack(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """X from per-image increments (shared values from image 1)."""
        return torch.cat([xs[0][list(self.shared_pos[0])]] + [x[list(p)] for x, p in zip(xs, self.own_pos)])


def make_layout(pars: Sequence[Parameterisation], shared: Sequence[str]) -> Layout:
    """The :class:`Layout` of parameterisations whose scalars in the ``shared`` groups are shared (ValueError when an
    image lacks one of image 1's shared scalars)."""
    wanted = {s.name for s in _specs_of(shared, pars[0].setup.panels)}
    shared_names = tuple(n for n in pars[0].names if n in wanted)
    for i, par in enumerate(pars):
        missing = [n for n in shared_names if n not in par.names]
        if missing:
            raise ValueError(f"image {i + 1} has no shared scalar {missing[0]} (a different crystal system?)")
    return Layout(shared_names, tuple(tuple(par.names) for par in pars),
                  tuple(tuple(par.names.index(n) for n in shared_names) for par in pars),
                  tuple(tuple(j for j, n in enumerate(par.names) if n not in shared_names) for par in pars))
