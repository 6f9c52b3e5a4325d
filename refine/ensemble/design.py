"""A shot's pixels as a sparse linear function of the intensity table T = F² (its crystal model held fixed).

With the nearest-reflection lookup every kernel sample takes F² of one table entry, so at fixed geometry, crystal,
beam and background a pixel's photons are ``m_p = c_p + Σ_h A[p, h]·T_h``: ``c_p`` the photons with every table
entry 0 (reflections outside the table at ``default_F``, water), ``A[p, h]`` the photons per unit F² of entry h.
:func:`shot_design` finds the non-zero ``A[p, h]`` with forward simulations only (:func:`nbtorch.simulate_pixels`,
eager or compiled alike): the entries are split into colour classes by (h mod m, k mod m, l mod m); one pass with
T = 1 on a class gives each pixel's coefficient, one with T = (flat index + 1) on it the entry's index (their ratio),
which is exact while no pixel takes two entries of one class.  m = 1, 2, 3 is tried until the design rebuilds a full
simulation to rounding (a pixel of one sample needs m = 1, the first tried; samples spread over neighbouring
reflections m = 2, where a set-up of several samples per pixel starts).
The model, its gradient with respect to T and the Gauss–Newton curvature are then sparse sums: an F step costs
nothing next to a simulation, and the design is checked against reverse mode through the kernel in the tests.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from nbtorch.simulate import samples_per_pixel, simulate_pixels
from nbtorch.types import Params, Setup, Structure

#: Largest colour modulus tried; beyond it a pixel's samples span reflections 3 apart (a huge mosaic or pixel).
MAX_COLOURS = 3
#: Relative agreement of the design's rebuilt image with a full simulation that accepts the design.
REBUILD_RTOL = 1e-9


class Design(NamedTuple):
    """``m = const + Σ coef·T[col]`` over (row, col, coef): ``row`` long [nnz] positions in the shot's pixel list,
    ``col`` long [nnz] flat table entries, ``coef`` [nnz] photons per unit F², ``const`` [n] photons at T = 0;
    ``colours`` the modulus m that was needed."""

    row: torch.Tensor
    col: torch.Tensor
    coef: torch.Tensor
    const: torch.Tensor
    colours: int

    def model(self, T: torch.Tensor) -> torch.Tensor:
        """Photons [n] of the shot's pixels for the flat intensity table ``T`` [nh·nk·nl] (F², differentiable)."""
        return self.const.index_add(0, self.row, self.coef * T.index_select(0, self.col))


def _with_table(params: Params, F: torch.Tensor) -> Params:
    return params._replace(structure=Structure(F, params.structure.default_F))


def _colour_pass(params: Params, setup: Setup, index, mask: np.ndarray, const, fused):
    """(rows, cols, coefs) of one colour class ``mask`` (bool, flat table)."""
    shape = params.structure.F.shape
    like = params.structure.F
    ones = torch.as_tensor(mask.reshape(shape), dtype=like.dtype, device=like.device)
    label = torch.as_tensor(np.where(mask, np.arange(1, mask.size + 1), 0).reshape(shape), dtype=like.dtype,
                            device=like.device)
    a = simulate_pixels(_with_table(params, ones), setup, index, check=False, fused=fused) - const
    b = simulate_pixels(_with_table(params, label.sqrt()), setup, index, check=False, fused=fused) - const
    rows = torch.nonzero(a > 0).reshape(-1)
    cols = torch.round(b[rows] / a[rows]).long() - 1
    ok = (cols >= 0) & (cols < mask.size)
    return rows[ok], cols[ok], a[rows[ok]]


def shot_design(params: Params, setup: Setup, index, fused=False) -> Design:
    """The :class:`Design` of the pixels ``index`` (flat, as :func:`nbtorch.simulate_pixels` takes them) of the model
    (``params``, ``setup``; its table ``params.structure.F`` the current |F|), detached.  ValueError for a set-up the
    design cannot express (tricubic ``interpolate``, no table) or when no modulus up to :data:`MAX_COLOURS`
    rebuilds the simulation."""
    if setup.interpolate:
        raise ValueError("refining |F| needs the nearest-reflection lookup: drop -interpolate (tricubic F is not "
                         "linear in F²)")
    F = params.structure.F.detach()
    if F.numel() == 0:
        raise ValueError("refining |F| needs a structure-factor table (params.structure.F is empty)")
    params = _with_table(params, F)
    with torch.no_grad():
        const = simulate_pixels(_with_table(params, torch.zeros_like(F)), setup, index, check=False, fused=fused)
        full = simulate_pixels(params, setup, index, check=False, fused=fused)
        hkl = np.stack(np.meshgrid(*[np.arange(n) for n in F.shape], indexing="ij"), -1).reshape(-1, 3)
        T = (F * F).reshape(-1)
        for m in range(1 if samples_per_pixel(setup) == 1 else 2, MAX_COLOURS + 1):
            colour = (hkl % m) @ np.array([m * m, m, 1])
            parts = [_colour_pass(params, setup, index, colour == c, const, fused) for c in range(m ** 3)]
            row, col, coef = (torch.cat([p[i] for p in parts]) for i in range(3))
            design = Design(row, col, coef, const, m)
            err = (design.model(T) - full).abs().max()
            if float(err) <= REBUILD_RTOL * max(float(full.abs().max()), 1e-300):
                return design
    raise ValueError(f"the shot's pixels take several reflections {MAX_COLOURS} or more indices apart (a very large "
                     "mosaic spread, pixel or oversampling): its |F| design cannot be built")
