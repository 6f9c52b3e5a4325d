"""Parameter pytrees (dynamic, differentiable) and the frozen, hashable simulation set-up (static).

``Params`` is a NamedTuple of NamedTuples of tensors: every leaf is continuous, may carry gradients and may be batched
with ``torch.func.vmap``.  ``Setup`` holds everything that changes array shapes or control flow (pixel counts,
oversampling, numbers of domains/sources/phi steps, convention, shape model, feature switches); it is a frozen
dataclass, so it can be used as a cache key.

Units (API): Å for cell and wavelength, mm for detector lengths, degrees for angles, µm for sensor thickness and water
size, photons/m² for fluence.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

import torch

from .conventions import CONVENTIONS
from .pytree import get_leaf, replace_leaf, tree_leaves, tree_map
from .setup_checks import SHAPES, check_setup

__all__ = ["Vec3", "Crystal", "Beam", "Detector", "Structure", "Background", "Params", "Setup", "CONVENTIONS",
           "SHAPES", "tree_map", "tree_leaves", "get_leaf", "replace_leaf"]

Vec3 = Tuple[float, float, float]


class Crystal(NamedTuple):
    """Crystal model.

    cell:          [6]   a, b, c (Å), α, β, γ (degrees).
    misset:        [3]   XYZ rotation (degrees), nanoBragg's ``-misset``: applied on top of ``orientation``.
    orientation:   [3,3] base orientation U0 (identity unless the model came from a ``-mat`` file); the
                         reciprocal basis is ``XYZ(misset)·U0·B(cell)``.
    ncells:        [3]   number of unit cells along a, b, c (continuous, > 0).
    mosaic_spread: []    mosaic spread (degrees): the cap radius of the domain rotation angles.
    """

    cell: torch.Tensor
    misset: torch.Tensor
    orientation: torch.Tensor
    ncells: torch.Tensor
    mosaic_spread: torch.Tensor


class Beam(NamedTuple):
    """Incident beam.

    wavelength:   []  central wavelength λ0 (Å); every source's wavelength scales with it.
    fluence:      []  integrated fluence (photons/m²).
    polarization: []  Kahn polarization factor K (0 = unpolarized, 1 = fully polarized along the E vector).
    """

    wavelength: torch.Tensor
    fluence: torch.Tensor
    polarization: torch.Tensor


class Detector(NamedTuple):
    """Detector position.

    distance:    []  sample-to-detector distance along the beam (mm), or the perpendicular (close) distance when
                     ``Setup.distance_is_close`` (``-close_distance``).
    beam_center: [2] always mm, from the convention's detector origin: MOSFLM/DENZO/ADXV/CUSTOM ``(Xbeam, Ybeam)``
                     with the convention's meaning; XDS/DIALS the near point along (fast, slow) from the outer
                     corner of pixel (0, 0), ``((ORGX − ½)·p, (ORGY − ½)·p)`` (``-ORGX/-ORGY`` pixels are
                     converted at the flag boundary: :func:`nbtorch.detector.orgx_to_mm`).
    rotation:    [3] detector_rotx/y/z (degrees), applied XYZ about the sample.
    twotheta:    []  two-theta swing (degrees) about the convention's two-theta axis.
    """

    distance: torch.Tensor
    beam_center: torch.Tensor
    rotation: torch.Tensor
    twotheta: torch.Tensor


class Structure(NamedTuple):
    """Structure factor amplitudes.

    F:         [nh, nk, nl] amplitudes on a dense grid starting at ``Setup.hkl_min`` (may be ``[0,0,0]``-shaped
               when no table is used).
    default_F: []  amplitude of every reflection outside the table (``-default_F``).
    """

    F: torch.Tensor
    default_F: torch.Tensor


class Background(NamedTuple):
    """Background scatterers.

    water_size: []  edge of the cube of water in the beam (µm), nanoBragg's ``-water``; 0 disables it.
    """

    water_size: torch.Tensor


class Params(NamedTuple):
    """All continuous model parameters (a pytree of tensors)."""

    crystal: Crystal
    beam: Beam
    detector: Detector
    structure: Structure
    background: Background


@dataclasses.dataclass(frozen=True)
class Setup:
    """Static simulation set-up (hashable).  Lengths in mm, angles in degrees unless stated.

    Detector: ``fpixels`` × ``spixels`` pixels of ``pixel_size`` mm; ``convention`` one of :data:`CONVENTIONS`;
    ``pivot`` 'beam' or 'sample'; unit vectors ``fdet``, ``sdet``, ``odet``, ``beam``, ``polar_axis``
    (E vector), ``spindle``, ``twotheta_axis`` in the lab frame.
    Sampling: ``oversample`` (n×n sub-pixels), ``phi0``/``phistep``/``phisteps``, mosaic domain axes and angle fractions
    (``mosaic_axes`` [M] unit vectors, ``mosaic_fractions`` [M], angle_m = spread·fraction_m), ``sources``: incident
    unit vectors (direction of propagation) with wavelength factors (λ_k = λ0·factor_k).
    Sensor: ``thickness_um``, ``mu_per_um`` (attenuation coefficient, 1/µm), ``thicksteps``, ``thickstep_um``.
    Switches: ``point_pixel``, ``curved_det``, ``nopolar``, ``oversample_thick/_polar/_omega`` (nanoBragg's
    running-sum behaviour, spec Q7), ``shape`` (:data:`SHAPES`) with ``fudge``, ``interpolate`` (tricubic F),
    ``hkl_min`` (first index of the F table), ``dmin`` (Å, 0 = off), ``roi`` (xmin, xmax, ymin, ymax inclusive,
    fast/slow pixels), ``mask`` (bytes, one per pixel slow-major, 0 = skip).
    ``nanobragg_cell``: build the lattice from ``cell`` exactly as nanoBragg's ``-cell`` does (its triclinic cells are
    slightly sheared, see docs/nanobragg-differences.md); False gives the exact cell (used for ``-mat`` models).
    ``sample_budget``: samples (pixel × layer × sub-pixel × source × orientation) per tile: bounds memory, not
    results.
    """

    fpixels: int = 1024
    spixels: int = 1024
    pixel_size: float = 0.1
    convention: str = "MOSFLM"
    pivot: str = "beam"
    fdet: Vec3 = (0.0, 0.0, 1.0)
    sdet: Vec3 = (0.0, -1.0, 0.0)
    odet: Vec3 = (1.0, 0.0, 0.0)
    beam: Vec3 = (1.0, 0.0, 0.0)
    polar_axis: Vec3 = (0.0, 0.0, 1.0)
    spindle: Vec3 = (0.0, 0.0, 1.0)
    twotheta_axis: Vec3 = (0.0, 0.0, -1.0)
    distance_is_close: bool = False
    oversample: int = 1
    phi0: float = 0.0
    phistep: float = 0.0
    phisteps: int = 1
    mosaic_axes: Tuple[Vec3, ...] = ((1.0, 0.0, 0.0),)
    mosaic_fractions: Tuple[float, ...] = (0.0,)
    sources: Tuple[Tuple[Vec3, float], ...] = (((1.0, 0.0, 0.0), 1.0),)
    thickness_um: float = 0.0
    mu_per_um: float = 0.0
    thicksteps: int = 1
    thickstep_um: float = 0.0
    point_pixel: bool = False
    curved_det: bool = False
    nopolar: bool = False
    oversample_thick: bool = False
    oversample_polar: bool = False
    oversample_omega: bool = False
    shape: str = "square"
    fudge: float = 1.0
    interpolate: bool = False
    hkl_min: Tuple[int, int, int] = (0, 0, 0)
    dmin: float = 0.0
    roi: Optional[Tuple[int, int, int, int]] = None
    mask: Optional[bytes] = None
    nanobragg_cell: bool = True
    sample_budget: int = 1 << 19

    def __post_init__(self):
        check_setup(self)

    @property
    def n_domains(self) -> int:
        return len(self.mosaic_fractions)

    @property
    def n_sources(self) -> int:
        return len(self.sources)

    @property
    def steps(self) -> int:
        """nanoBragg's normalisation: sources · mosaic domains · phi steps · oversample²."""
        return self.n_sources * self.n_domains * self.phisteps * self.oversample**2

    def replace(self, **changes) -> "Setup":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

