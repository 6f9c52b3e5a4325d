"""Uncertainties and reported quantities: the covariance of the increments, and every model quantity with its ESD.

At the solution the normal matrix H = JᵀWJ (+ prior terms) is built over every free scalar on the fitted pixels; the
covariance of the increments is ``cov = H⁻¹·k`` with k = 1 for likelihood targets (Poisson, Gaussian, Anscombe: H is
the Fisher information) and k = reduced χ² for least squares (``esd_scale='auto'``); ``'chi2'`` forces the χ²
scaling, ``'none'`` disables it.  Every reported quantity (:data:`REPORT_FIELDS`, and the motion of every panel
group with a free scalar) is a function of the increments, and its ESD is propagated with the Jacobian of that
function (delta method).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch.func import jacfwd

from nbtorch.detector import beam_center_to_pixels
from nbtorch.units import rad2deg

from ..model.parameters import Parameterisation, total_rotation, xyz_angles
from ..model.table import NODE_GROUP, NODE_LEVELS, REPORT_FIELDS

#: How ESDs are scaled: by χ²/ν for least squares only ('auto'), always ('chi2'), never ('none').
ESD_SCALES = ("auto", "chi2", "none")
#: The report key of a spot-ROI fit's per-region background planes.
BOX_PLANES = "background_boxes"
from ..minimise.solve import pseudo_inverse
from ..targets.objective import Objective



def refined_nodes(par: Parameterisation) -> Tuple[int, ...]:
    """Indices (into ``par.setup.panels.nodes``) of the panel groups with at least one free scalar, in order."""
    return tuple(sorted({s.spec.index // 3 for s in par.scalars if s.group == NODE_GROUP}))


def mean_factor(setup) -> float:
    """The weighted mean wavelength factor of ``setup``'s sources (1 for a spectrum made by
    :func:`nbtorch.spectrum.with_spectrum`): their mean wavelength is λ0·this + ``spectrum_shift`` (Å)."""
    factors = [float(f) for _, f in setup.sources]
    return math.fsum(w * f for w, f in zip(setup.normalised_source_weights, factors)) / len(factors)


def psf_fwhm_report(par: Parameterisation, x: torch.Tensor) -> torch.Tensor:
    """The reported ``psf_fwhm_um``: the point-spread function's FWHM (µm) at ``x``, 0 without one."""
    fwhm = par.psf_fwhm(x)
    return x.new_zeros(()) if fwhm is None else fwhm


def report_vector(par: Parameterisation, x: torch.Tensor) -> torch.Tensor:
    """Every reported quantity at increments ``x`` [n] as one flat vector (order of :data:`REPORT_FIELDS`, then per
    refined panel group (:func:`refined_nodes`) its shift (mm, 3) and rotation (degrees, 3)); differentiable.
    ``scale`` is the fluence relative to the parameterisation's reference (the starting model); so is
    ``spectrum_lam1``, λ0 relative to it (``spectrum_lam0_A``: the spectrum's shift, Å; ``spectrum_mean_A``: the
    weighted mean wavelength of the sources, Å, which a still determines far better than lam0 or lam1 alone).  In a
    spot-ROI fit ``background`` is the mean of the regions' planes, and every region's plane follows (c0, c_fast,
    c_slow per region, :data:`BOX_PLANES`).  ``psf_fwhm_um``: the point-spread function's FWHM
    (:func:`psf_fwhm_report`)."""
    p = par.unpack(x)
    st = par.setup
    misset = rad2deg(xyz_angles(total_rotation(p)))
    bc = p.detector.beam_center
    parts = [
        p.crystal.cell, misset, p.detector.distance, bc, beam_center_to_pixels(bc, st.convention, st.pixel_size),
        p.detector.rotation, p.detector.twotheta, p.beam.wavelength,
        p.beam.spectrum_shift, p.beam.wavelength / par.ref.beam.wavelength,
        p.beam.wavelength * mean_factor(st) + p.beam.spectrum_shift, p.crystal.ncells, p.crystal.mosaic_spread,
        p.beam.fluence, p.beam.fluence / par.ref.beam.fluence, par.plane(x).reshape(-1, 3).mean(0),
        p.background.water_size, psf_fwhm_report(par, x),
    ]
    nodes = list(refined_nodes(par))
    if nodes:
        parts.append(torch.cat([p.detector.group_shift[nodes], p.detector.group_rotation[nodes]], -1))
    if par.boxes is not None:
        parts.append(par.plane(x))
    return torch.cat([t.reshape(-1).to(x.dtype) for t in parts])


def split_report(vec, par: Optional[Parameterisation] = None) -> Dict[str, object]:
    """Flat report vector → {name: float or list of floats}; with refined panel groups (of ``par``) also
    ``panel_groups``: {node name: {"shift_mm": [x, y, z], "rotation_deg": [x, y, z]}} (lab axes; rotation XYZ
    about the node's nominal centre); in a spot-ROI fit also ``background_boxes``: [[c0, c_fast, c_slow] per region]
    (photons/pixel; u, v in box sides about the region's centre, :mod:`refine.targets.boxes`)."""
    out, k = {}, 0
    v = [float(t) for t in vec]
    for name, n in REPORT_FIELDS:
        out[name] = v[k] if n == 1 else v[k: k + n]
        k += n
    nodes = refined_nodes(par) if par is not None else ()
    if nodes:
        names = [par.setup.panels.nodes[g].name for g in nodes]
        out[NODE_LEVELS] = {nm: {"shift_mm": v[k + 6 * j: k + 6 * j + 3],
                                 "rotation_deg": v[k + 6 * j + 3: k + 6 * j + 6]} for j, nm in enumerate(names)}
        k += 6 * len(nodes)
    if par is not None and par.boxes is not None:
        out[BOX_PLANES] = [v[k + 3 * b: k + 3 * b + 3] for b in range(par.boxes.n)]
    return out


def reported_plane(parameters: Dict[str, object]):
    """The background coefficients of a report (:func:`split_report`): [c0, c_fast, c_slow], or one per region of a
    spot-ROI fit ([B, 3]) — what :meth:`~refine.model.parameters.Parameterisation.pack` takes as ``plane``."""
    return parameters[BOX_PLANES] if BOX_PLANES in parameters else parameters["background"]


def propagate(par: Parameterisation, x: torch.Tensor, cov: torch.Tensor):
    """(values, ESDs) of every :data:`REPORT_FIELDS` quantity at ``x`` with covariance ``cov`` [n, n] of x (delta
    method through the Jacobian of :func:`report_vector`), as two {name: value} dicts."""
    vec = report_vector(par, x)
    if par.n == 0:
        return split_report(vec, par), split_report(torch.zeros_like(vec), par)
    J = jacfwd(lambda xx: report_vector(par, xx))(x)
    var = torch.einsum("ij,jk,ik->i", J, cov.to(J.dtype), J).clamp_min(0)  # float32 fits: cov is float64
    return split_report(vec, par), split_report(torch.sqrt(var), par)


def correlation_from_covariance(cov: torch.Tensor) -> torch.Tensor:
    """Correlation matrix [n, n] of a covariance matrix (zero rows where the variance is 0)."""
    sd = torch.sqrt(torch.clamp(torch.diagonal(cov), min=0))
    inv = torch.where(sd > 0, 1.0 / torch.where(sd > 0, sd, torch.ones_like(sd)), torch.zeros_like(sd))
    return cov * inv[:, None] * inv[None, :]


def esd_factor(esd_scale: str, likelihood: bool, chi2_reduced: float) -> float:
    """The factor k of the covariance H⁻¹·k: the reduced χ² for least squares (``'auto'``) or always (``'chi2'``),
    else 1."""
    if esd_scale not in ESD_SCALES:
        raise ValueError(f"esd_scale must be one of {', '.join(ESD_SCALES)}; got {esd_scale!r}")
    return chi2_reduced if (esd_scale == "chi2" or (esd_scale == "auto" and not likelihood)) else 1.0


def covariance(objective: Objective, x: torch.Tensor, esd_scale: str = "auto", rcond: float = 1e-10, normal=None):
    """Covariance of the increments at ``x``: ``H⁻¹·k`` (see the module docstring and :func:`pseudo_inverse`).

    ``normal``: optional (BlockNormal, models) already computed at ``x`` over every scalar (by the last LM
    iteration).

    Returns ``(cov [n, n], chi2_reduced, k, loss, degenerate)`` with ``degenerate`` a list of lists of scalar names
    (empty when H is well conditioned)."""
    if normal is not None:
        blk, models = normal
        L = objective.loss(x)
    else:
        L, blk, models = objective.normal(x)
    chi2 = objective.chi2_reduced(models, objective.n)
    k = esd_factor(esd_scale, objective.target.likelihood, chi2)
    cov, degenerate = pseudo_inverse(blk.dense()[0], objective.names, rcond)
    return cov * k, chi2, k, L, degenerate
