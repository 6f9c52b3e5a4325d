"""Stages as data and the one coarse-to-fine schedule that every fit and study trial runs (see
:mod:`refine.pipeline.strategy` for why and how each stage runs)."""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import numpy as np
import torch

from nbtorch.types import Params, Setup

from ..model.table import GEOMETRY_GROUPS

#: Trust region of the preliminary stages, in typical errors (orientation 2 mrad, distance 0.5 mm, beam centre one
#: pixel, cell 0.5 %, tilts 2 mrad, ln-scale 0.1 …).
TRUST = 10.0
#: Convergence tolerance of the preliminary stages (log-likelihood units).
PRELIMINARY_FTOL = 0.5


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a refinement (data; run by :func:`run_stage`).

    ``name``; ``ncells_factor`` (N_stage = factor·N, not below min(N, 1); the fluence is divided by the same factor
    per axis so integrated spot intensities are unchanged); ``mosaic_factor`` (mosaic spread × factor); ``shape``
    (None = the model's, or 'square' | 'round' | 'gauss' | 'tophat'); ``active`` (groups refined, None = all free
    groups); ``max_iter`` (None = the fit's ``max_iter``; 0 = no minimisation); ``search_beam_center`` (distance
    grid × beam-centre translation first, :func:`~refine.pipeline.search.search_geometry`); ``prefit_scale`` (linear
    pre-fit of scale and constant background); ``target`` (None = the fit's target, or a name such as 'anscombe');
    ``trust`` (None, or: every scalar but the linear background moves at most ``trust`` × its typical error from
    where the stage starts); ``ftol`` (None = the fit's tolerance, log-likelihood units); ``preliminary`` (at most
    ``prelim_pixels`` pixels, skipped when it has nothing to do, see :func:`skip_reason`; None: a schedule's stages
    but the last are preliminary, a stage run on its own is not); ``skip_in_place`` (a broadened preliminary stage is
    skipped when the real model's spots are already on the observed ones, :func:`spots_close`).
    """

    name: str = "fine"
    ncells_factor: float = 1.0
    mosaic_factor: float = 1.0
    shape: Optional[str] = None
    active: Optional[Tuple[str, ...]] = None
    max_iter: Optional[int] = None
    search_beam_center: bool = False
    prefit_scale: bool = False
    target: Optional[str] = None
    trust: Optional[float] = None
    ftol: Optional[float] = None
    preliminary: Optional[bool] = None
    skip_in_place: bool = True

    @property
    def broadened(self) -> bool:
        """True when the stage changes the spot model (N, mosaic or shape)."""
        return self.ncells_factor != 1.0 or self.mosaic_factor != 1.0 or self.shape is not None


def default_stages(coarse_iter: int = 8, robust_iter: int = 10, final_iter: Optional[int] = None) -> List[Stage]:
    """The coarse-to-fine schedule (see the module docstring): search, coarse and medium (``coarse_iter``
    iterations each), robust (``robust_iter``), then the final stage (``final_iter``; None: the fit's ``max_iter``).
    Every fit and every study trial runs it."""
    prelim = dict(target="anscombe", trust=TRUST, ftol=PRELIMINARY_FTOL, preliminary=True)
    return [
        Stage("search", ncells_factor=0.5, max_iter=0, search_beam_center=True, prefit_scale=True, preliminary=True),
        Stage("coarse", ncells_factor=0.3, active=GEOMETRY_GROUPS, max_iter=coarse_iter, **prelim),
        Stage("medium", ncells_factor=0.6, active=GEOMETRY_GROUPS, max_iter=coarse_iter, **prelim),
        Stage("robust", max_iter=robust_iter, **prelim),
        Stage("fine", max_iter=final_iter, preliminary=False),
    ]


def apply_stage(params: Params, setup: Setup, stage: Stage) -> Tuple[Params, Setup]:
    """The stage's model: N scaled (with the fluence compensated so integrated spot intensities stay the same, and the
    water size so the water background stays the same), mosaic spread scaled, shape replaced."""
    if stage.ncells_factor == 1.0 and stage.mosaic_factor == 1.0 and stage.shape in (None, setup.shape):
        return params, setup
    c, b = params.crystal, params.beam
    N, Ns, fluence = c.ncells, c.ncells, b.fluence
    if stage.ncells_factor != 1.0:
        Ns = torch.maximum(N * stage.ncells_factor, torch.clamp(N, max=1.0))
        fluence = b.fluence * torch.prod(N / Ns)
    # nanoBragg's water term scales as water_size³·fluence² (spec Q10): keep it unchanged when the fluence changes
    water = params.background.water_size * (b.fluence / fluence) ** (2.0 / 3.0)
    p = params._replace(crystal=c._replace(ncells=Ns, mosaic_spread=c.mosaic_spread * stage.mosaic_factor),
                        beam=b._replace(fluence=fluence), background=params.background._replace(water_size=water))
    return p, (setup if stage.shape in (None, setup.shape) else setup.replace(shape=stage.shape))


def spots_close(observed: np.ndarray, model: np.ndarray, background: np.ndarray, min_pixels: int = 10,
                fraction: float = 0.5) -> bool:
    """True when the model's spots already lie on the observed ones (the fit is in the sharp model's basin, so
    broadened spots have nothing to add): on the pixels where either is 3 Poisson σ above the ``background``, the
    correlation of the observed and model spot photons is at least ``fraction`` of the highest that the observed
    image's Poisson noise allows (sharp spots half a pixel off, or rotated by about their angular width, fall below
    it).  ``observed``, ``model`` (photons, background included) and ``background`` are 1-d arrays over the usable
    pixels.  Fewer than ``min_pixels`` such pixels, or spots too weak to tell (that highest correlation below 0.3):
    False."""
    sigma = np.sqrt(np.maximum(background, 0.0) + 1.0)
    seen, spot = observed - background, model - background
    sel = (seen > 3.0 * sigma) | (spot > 3.0 * sigma)
    if int(sel.sum()) < min_pixels:
        return False
    a, b = seen[sel] - seen[sel].mean(), spot[sel] - spot[sel].mean()
    var_a, var_b = float((a * a).sum()), float((b * b).sum())
    if var_a <= 0 or var_b <= 0:
        return False
    ceiling = np.sqrt(max(0.0, 1.0 - float(np.maximum(observed[sel], 0.0).sum()) / var_a))
    return bool(ceiling >= 0.3 and float((a * b).sum()) / np.sqrt(var_a * var_b) >= fraction * ceiling)
