"""``FitOptions``: every knob of :func:`refine.fit`, frozen and validated on construction.

    opts = refine.FitOptions(free=("distance", "beam_center"), method="lbfgs", max_iter=50)
    result = refine.fit(observed, params, setup, options=opts)
    result = refine.fit(observed, params, setup, options=opts, max_iter=10)   # keyword arguments override

Bad values raise a one-line ``ValueError`` naming the option and its allowed values.
"""
from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import numpy as np
from nbtorch.io.crystfel import Geometry
from nbtorch.psf import PSF_KINDS

from ..model.cells import CRYSTAL_SYSTEMS
from ..minimise import MINIMISERS, SCHEDULES
from ..minimise.lm import DEFAULT_DAMPING, DEFAULT_FTOL
from ..model.parameters import NCELLS_MODES, expand_free
from ..model.table import DEFAULT_FREE
from ..targets import TARGETS, Target
from ..targets.detector import check_readout
from .report import ESD_SCALES
from .stages import Stage

#: The fit methods (:data:`refine.minimise.MINIMISERS`).
METHODS = tuple(MINIMISERS)
#: Iterations of the final stage when ``max_iter`` is None, per method.
DEFAULT_MAX_ITER = {name: m.default_max_iter for name, m in MINIMISERS.items()}


def psf_options(outputs) -> dict:
    """The :class:`FitOptions` (``psf``, ``psf_fwhm``, ``psf_radius``) of nbtorch's ``-psf``/``-psf_fwhm``/
    ``-psf_radius`` flags, from :func:`nbtorch.args.build`'s ``Extras.outputs`` (its radius resolved): {} without
    ``-psf``.  ``refine.fit(..., **psf_options(extras.outputs))`` fits the blurred model the flags describe."""
    if getattr(outputs, "psf", None) is None:
        return {}
    return dict(psf=str(outputs.psf), psf_fwhm=float(outputs.psf_fwhm), psf_radius=outputs.psf_radius)


def check_choice(name: str, value, allowed) -> None:
    """ValueError naming ``name`` and the ``allowed`` values unless ``value`` is one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _at_least(name: str, value, low, integer: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low
    if not ok or (integer and int(value) != value):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind} >= {low:g}{' or None' if optional else ''}; got {value!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class FitOptions:
    """The options of a fit (see :func:`refine.fit` for each one's meaning).

    What to refine: ``free`` (groups, sub-groups or scalars), ``crystal_system`` ('auto' or a system),
    ``ncells_mode``, ``background`` (starting plane c0, c_fast, c_slow, photons/pixel), ``bounds``, ``priors``
    (reported units), ``allow_degenerate`` (False: refuse combinations the image cannot determine).
    Against what: ``target``, ``read_noise`` (photons), ``readout_noise_adu`` (ADU, a number or a per-pixel map;
    the gaussian target's read-out noise is then this / ``gain`` per pixel, overriding ``read_noise``), ``gain``
    (ADU per photon: a number or a per-pixel map of the image's shape; None: the gain the observed image was read
    with, else 1),
    ``weights`` (lsq image), ``mask`` (bool image, True = use), ``overload``, ``spots_only``, ``spot_dilate``
    (pixels), ``background_fraction``.
    The detector's point-spread function: ``psf`` ('gauss', 'fiber' or None: no blur), ``psf_fwhm`` (its starting
    FWHM, µm; the ``psf`` group refines it), ``psf_radius`` (kernel radius in pixels, fixed during the fit; None:
    :func:`refine.model.psf.point_spread`'s default) — nbtorch's ``-psf``/``-psf_fwhm``/``-psf_radius``.
    Spot-ROI refinement: ``spots`` (a DIALS :class:`~nbtorch.io.refl.ReflectionTable` of the image's observed spots,
    or an array [n, 2|3] of (fast, slow[, panel]) pixel coordinates; None: the whole image): only pixels in square
    boxes of side ``roi_size`` pixels about them take part, each box (overlapping boxes merged) with its own
    background plane (:mod:`refine.targets.boxes`; ``background`` is then every region's starting plane, by default
    each region's median with no slope); ``max_spots`` keeps the strongest.
    How: ``method``, ``max_iter`` (final stage; None: 30 LM, 100 L-BFGS, 300 Adam), ``coarse_to_fine`` ('auto':
    the default stages, or only the final stage when resuming from a Result; True; False; or a sequence of
    :class:`~refine.pipeline.stages.Stage`), ``coarse_iter``, ``robust_iter``, ``max_shift`` (pixels),
    ``search_distance`` (relative), ``prelim_pixels``, ``chunk_pixels``, ``ftol`` (log-likelihood units), ``lr``,
    ``damping`` (initial LM μ, relative to diag H), ``schedule``, ``esd_scale``, ``fused``, ``callback``.
    Output: ``nanobragg_args`` (the starting flags), ``matrix_path``, ``geometry`` (the CrystFEL
    :class:`~nbtorch.io.crystfel.Geometry` a panel detector was read from, :func:`nbtorch.io.crystfel.read_geom`: what
    :meth:`~refine.pipeline.result.Result.write_geom` moves to the refined panels).
    """

    free: Tuple[str, ...] = DEFAULT_FREE
    method: str = "lm"
    target: Union[str, Target] = "poisson"
    mask: Any = None
    overload: Optional[float] = None
    read_noise: float = 1.0
    readout_noise_adu: Any = None
    gain: Any = None
    weights: Any = None
    crystal_system: str = "auto"
    ncells_mode: str = "auto"
    background: Optional[Tuple[float, float, float]] = None
    bounds: Optional[types.MappingProxyType] = None
    priors: Optional[types.MappingProxyType] = None
    allow_degenerate: bool = True
    max_iter: Optional[int] = None
    coarse_to_fine: Union[str, bool, Tuple[Any, ...]] = "auto"
    coarse_iter: int = 8
    robust_iter: int = 10
    max_shift: int = 8
    search_distance: float = 0.05
    spots_only: bool = False
    prelim_pixels: Optional[int] = 65536
    spot_dilate: int = 3
    background_fraction: float = 0.05
    chunk_pixels: int = 16384
    ftol: float = DEFAULT_FTOL
    lr: float = 0.05
    damping: float = DEFAULT_DAMPING
    schedule: str = "cosine"
    esd_scale: str = "auto"
    fused: Optional[bool] = None
    callback: Optional[Callable[[dict], None]] = None
    nanobragg_args: Optional[Union[str, Sequence[str]]] = None
    matrix_path: Optional[str] = None
    geometry: Any = None
    psf: Optional[str] = None
    psf_fwhm: Optional[float] = None
    psf_radius: Optional[int] = None
    spots: Any = None
    roi_size: int = 11
    max_spots: Optional[int] = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        free = self.free.replace(",", " ").split() if isinstance(self.free, str) else list(self.free)
        expand_free(free)  # validates the names
        put("free", tuple(free))
        for name in ("bounds", "priors"):
            value = getattr(self, name)
            put(name, None if value is None else types.MappingProxyType(dict(value)))
        if self.background is not None:
            put("background", tuple(float(v) for v in self.background))
        if self.gain is not None and np.ndim(self.gain) > 0:
            put("gain", np.asarray(self.gain, dtype=np.float64))
        if self.readout_noise_adu is not None:  # a number or a per-pixel map (a detector file's, one per panel)
            put("readout_noise_adu", check_readout(self.readout_noise_adu))
        if not isinstance(self.coarse_to_fine, (str, bool)) and self.coarse_to_fine is not None:
            put("coarse_to_fine", tuple(self.coarse_to_fine))
        self._validate()

    def _validate(self) -> None:
        check_choice("method", self.method, tuple(MINIMISERS))
        if not isinstance(self.target, Target):
            check_choice("target", self.target, TARGETS)
        check_choice("crystal_system", self.crystal_system, ("auto",) + tuple(CRYSTAL_SYSTEMS))
        check_choice("ncells_mode", self.ncells_mode, NCELLS_MODES)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("esd_scale", self.esd_scale, ESD_SCALES)
        check_choice("fused", self.fused, (None, True, False))
        for name in ("coarse_iter", "robust_iter", "max_shift", "spot_dilate"):
            _at_least(name, getattr(self, name), 0, integer=True)
        _at_least("max_iter", self.max_iter, 0, integer=True, optional=True)
        _at_least("prelim_pixels", self.prelim_pixels, 1, integer=True, optional=True)
        _at_least("chunk_pixels", self.chunk_pixels, 1, integer=True)
        _at_least("read_noise", self.read_noise, 0)
        _at_least("roi_size", self.roi_size, 1, integer=True)
        _at_least("max_spots", self.max_spots, 1, integer=True, optional=True)
        self._validate_detector()
        self._validate_psf()
        for name in ("ftol", "lr", "damping"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a number > 0; got {getattr(self, name)!r}")
        if not 0 <= self.search_distance <= 0.5:
            raise ValueError(f"search_distance must be within [0, 0.5] (relative); got {self.search_distance!r}")
        if not 0 <= self.background_fraction <= 1:
            raise ValueError(f"background_fraction must be within [0, 1]; got {self.background_fraction!r}")
        if self.background is not None and len(self.background) != 3:
            raise ValueError(f"background must be 3 numbers (c0, c_fast, c_slow) in photons/pixel; got "
                             f"{list(self.background)}")
        if self.geometry is not None and not isinstance(self.geometry, Geometry):
            raise ValueError(f"geometry must be a CrystFEL Geometry (nbtorch.io.crystfel.read_geom) or None; got "
                             f"{type(self.geometry).__name__}")
        if isinstance(self.coarse_to_fine, str):
            check_choice("coarse_to_fine", self.coarse_to_fine, ("auto",))
        elif isinstance(self.coarse_to_fine, tuple):
            if not self.coarse_to_fine or not all(isinstance(s, Stage) for s in self.coarse_to_fine):
                raise ValueError("coarse_to_fine must be 'auto', True, False or a non-empty list of "
                                 "refine.pipeline.stages.Stage")

    def _validate_detector(self) -> None:
        """``readout_noise_adu`` (>= 0 ADU, with the gaussian target) and ``gain`` (> 0, or a per-pixel map)."""
        if self.readout_noise_adu is not None and self.target != "gaussian":
            raise ValueError(f"readout_noise_adu is the read-out noise of the Gaussian–Poisson target: give "
                             f"target='gaussian' (got target={getattr(self.target, 'name', self.target)!r})")
        if self.gain is None:
            return
        if np.ndim(self.gain) == 0:
            _at_least("gain", self.gain, 0)
            if not self.gain > 0:
                raise ValueError(f"gain must be a number > 0 (ADU per photon) or a per-pixel map; got {self.gain!r}")
        elif self.gain.ndim < 2:
            raise ValueError(f"gain must be a number > 0 (ADU per photon) or a per-pixel map of the image's shape; "
                             f"got shape {list(self.gain.shape)}")

    def _validate_psf(self) -> None:
        """``psf`` (None or a profile), ``psf_fwhm`` (> 0 µm, needed with a profile), ``psf_radius`` (>= 0 pixels);
        ``psf_fwhm``/``psf_radius`` only with ``psf``."""
        check_choice("psf", self.psf, (None,) + PSF_KINDS)
        if self.psf is None:
            given = [n for n in ("psf_fwhm", "psf_radius") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{given[0]} needs psf='gauss' or 'fiber' (the point-spread function it describes)")
            return
        _at_least("psf_fwhm", self.psf_fwhm, 0)
        if not self.psf_fwhm > 0:
            raise ValueError(f"psf_fwhm must be a number of µm > 0 with psf={self.psf!r}; got {self.psf_fwhm!r}")
        _at_least("psf_radius", self.psf_radius, 0, integer=True, optional=True)

    @property
    def final_max_iter(self) -> int:
        """Iterations of the final stage: ``max_iter`` or the method's default."""
        return MINIMISERS[self.method].default_max_iter if self.max_iter is None else int(self.max_iter)

    def replace(self, **changes) -> "FitOptions":
        """A copy with ``changes`` (TypeError naming any unknown option)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown fit option {unknown[0]!r}; options: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)
