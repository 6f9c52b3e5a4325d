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
import math
from typing import NamedTuple, Optional, Tuple

import torch

from .conventions import CONVENTIONS
from .panels import PanelLayout
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
    spectrum_shift: [] Å added to every source's wavelength: λ_k = λ0·factor_k + spectrum_shift (0 for nanoBragg's
                  beams; with a spectrum, the shift lam0 of λ' = lam0 + lam1·λ, lam1 being λ0's scale).
    """

    wavelength: torch.Tensor
    fluence: torch.Tensor
    polarization: torch.Tensor
    spectrum_shift: torch.Tensor


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
    group_shift:    [G, 3] shift (mm) of every rigid body of a panel detector's hierarchy (``Setup.panels.nodes``;
                    G = 0 for nanoBragg's one panel).
    group_rotation: [G, 3] XYZ rotation (degrees) of every rigid body about its nominal centre.

    For a panel detector (``Setup.panels``) ``distance`` places the point where the beam meets the detector along
    the beam, ``beam_center`` (mm) is that point in the detector's nominal frame relative to where the beam met it
    in the file (0, 0 as read), and ``rotation`` turns the detector about it (:mod:`nbtorch.panels`).
    """

    distance: torch.Tensor
    beam_center: torch.Tensor
    rotation: torch.Tensor
    twotheta: torch.Tensor
    group_shift: torch.Tensor
    group_rotation: torch.Tensor


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
    unit vectors (direction of propagation) with wavelength factors (λ_k = λ0·factor_k), ``source_weights`` their
    relative weights (None: all equal, as nanoBragg's sources; a spectrum's channel weights otherwise).
    Sensor: ``thickness_um``, ``mu_per_um`` (attenuation coefficient, 1/µm), ``thicksteps``, ``thickstep_um``.
    Switches: ``point_pixel``, ``curved_det``, ``nopolar``, ``oversample_thick/_polar/_omega`` (nanoBragg's
    running-sum behaviour, spec Q7), ``shape`` (:data:`SHAPES`) with ``fudge``, ``interpolate`` (tricubic F),
    ``hkl_min`` (first index of the F table), ``dmin`` (Å, 0 = off), ``roi`` (xmin, xmax, ymin, ymax inclusive,
    fast/slow pixels), ``mask`` (bytes, one per pixel slow-major, 0 = skip).
    ``nanobragg_cell``: build the lattice from ``cell`` exactly as nanoBragg's ``-cell`` does (its triclinic cells are
    slightly sheared, see docs/nanobragg-differences.md); False gives the exact cell (used for ``-mat`` models).
    ``sample_budget``: samples (pixel × layer × sub-pixel × source × orientation) per tile: bounds memory, not
    results.
    ``panels``: a detector of many panels (:class:`~nbtorch.panels.PanelLayout`; None = nanoBragg's one panel, set by
    ``convention``, ``pivot`` and the vectors above).  With panels, ``fpixels``/``spixels`` are the largest panel's
    counts (:meth:`for_panels` sets them), ``pixel_size`` the nominal pixel size the panel steps are measured in,
    ``beam`` the beam direction in the layout's lab frame, and images are ``[P, spixels, fpixels]``.
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
    panels: Optional[PanelLayout] = None
    source_weights: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        check_setup(self)

    @property
    def n_domains(self) -> int:
        return len(self.mosaic_fractions)

    @property
    def n_sources(self) -> int:
        return len(self.sources)

    @property
    def normalised_source_weights(self) -> Tuple[float, ...]:
        """Each source's weight scaled to mean 1 (nanoBragg's normalisation divides by the number of sources, so
        the image is the weighted mean over sources); all 1.0 without ``source_weights``."""
        if self.source_weights is None:
            return (1.0,) * self.n_sources
        total = math.fsum(self.source_weights)
        return tuple(w * self.n_sources / total for w in self.source_weights)

    @property
    def steps(self) -> int:
        """nanoBragg's normalisation: sources · mosaic domains · phi steps · oversample²."""
        return self.n_sources * self.n_domains * self.phisteps * self.oversample**2

    @property
    def n_panels(self) -> int:
        """Panels of the detector (1 for nanoBragg's)."""
        return 1 if self.panels is None else self.panels.n_panels

    @property
    def image_shape(self) -> Tuple[int, ...]:
        """Shape of an image: ``(spixels, fpixels)``, or ``(P, spixels, fpixels)`` for a panel detector."""
        if self.panels is None:
            return (self.spixels, self.fpixels)
        return (self.n_panels, self.spixels, self.fpixels)

    @property
    def n_pixels(self) -> int:
        """Pixels of an image (flat indices run over ``image_shape``, slow-major within each panel)."""
        return math.prod(self.image_shape)

    @property
    def has_sensor(self) -> bool:
        """Whether the sensor has a thickness (the set-up's, or any panel's own): capture and parallax are on."""
        own = self.panels is not None and any((p.thickness_um or 0.0) > 0 for p in self.panels.panels)
        return self.thickness_um > 0 or own

    @property
    def n_groups(self) -> int:
        """Rigid bodies of the panel hierarchy (the first axis of ``Detector.group_shift``; 0 for one panel)."""
        return 0 if self.panels is None else len(self.panels.nodes)

    @classmethod
    def for_panels(cls, panels: PanelLayout, **fields) -> "Setup":
        """A Setup for the panel detector ``panels``: ``fpixels``/``spixels`` from its largest panel, ``beam`` its
        beam direction, ``pixel_size`` its first panel's fast step length (mm) unless given; other fields as
        given.  Panels with their own sensor on a set-up without one are sampled as nanoBragg samples a sensor by
        default: two layers, thickness/2 apart."""
        p0 = panels.panels[0]
        if any((p.thickness_um or 0.0) > 0 for p in panels.panels) and not fields.get("thickness_um", 0.0) > 0:
            fields["thicksteps"] = max(int(fields.get("thicksteps", 1)), 2)
        fields.setdefault("pixel_size", float(math.sqrt(sum(c * c for c in p0.fast))))
        fields.setdefault("beam", tuple(panels.beam))
        fields.setdefault("convention", "CUSTOM")
        return cls(fpixels=panels.fpixels, spixels=panels.spixels, panels=panels, **fields)

    def replace(self, **changes) -> "Setup":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

