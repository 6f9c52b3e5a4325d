"""Checks of a :class:`~nbtorch.types.Setup`'s static fields, and plain-number text for every check's messages.

:func:`check_setup` runs when a ``Setup`` is made (``Setup.__post_init__``), so this module imports nothing from
nbtorch but the pure-Python convention table: ``types`` imports it, ``validate`` (parameter values) and ``detector``
(geometry) build on it.  Messages name the field and the allowed values, with numbers written as plain text (``0.5``,
``[1, 0, 0]``), never a numpy or torch repr.
"""
from __future__ import annotations

import math
from typing import Sequence

from .conventions import CONVENTIONS

__all__ = ["SHAPES", "MAX_ORIENTATIONS", "MAX_SAMPLES", "MAX_SOURCES", "plain", "check_setup"]

#: Lattice-factor (crystal shape) models (``Setup.shape``).
SHAPES = ("square", "round", "gauss", "tophat")
#: Work limits: samples in one image, and orientations (mosaic domains × phi steps) and beam sources in one Setup
#: (each one a row of a table made before any rendering).  Beyond them a request is refused with what to lower.
MAX_SAMPLES = 10**13
MAX_ORIENTATIONS = 10**6
MAX_SOURCES = 10**6
#: Tolerance on |v| = 1 for the Setup's unit vectors, and on |u × v| for vectors that must not be parallel.
UNIT_TOL = 1e-6


#: Arrays with more values than this are shown by their first and last values, count and shape.
PLAIN_MAX_VALUES = 12


def _array_text(value) -> str:
    """A tensor or numpy array (or numpy scalar) as plain text, summarised when large."""
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu()
        shape, flat = list(value.shape), value.reshape(-1).tolist()
    else:
        shape, flat = list(getattr(value, "shape", ())), value.reshape(-1).tolist() if value.ndim else None
    if flat is None or len(flat) <= PLAIN_MAX_VALUES:
        return plain(value.tolist())
    head = ", ".join(plain(v) for v in flat[:3])
    return f"[{head}, …, {plain(flat[-1])}] ({len(flat)} values, shape {plain(shape)})"


def plain(value) -> str:
    """``value`` as plain text for a message: numbers as the shortest text that reads back the same (integral
    values without a decimal point: ``5``, ``0.1``, ``nan``, ``inf``), tensors and arrays (any shape) and lists as
    ``[a, b, …]`` (arrays of more than :data:`PLAIN_MAX_VALUES` values summarised), tuples as ``(a, b, …)``,
    strings quoted; never ``np.float64(…)`` or ``tensor(…)``."""
    if hasattr(value, "detach") or (hasattr(value, "tolist") and hasattr(value, "reshape")):
        return _array_text(value)  # torch tensor, numpy array or numpy scalar
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(plain(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(plain(v) for v in value) + (",)" if len(value) == 1 else ")")
    return str(value)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _norm(v: Sequence[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _is_unit(v: Sequence[float]) -> bool:
    return len(v) == 3 and all(math.isfinite(x) for x in v) and abs(_norm(v) - 1.0) < UNIT_TOL


def _cross_norm(u: Sequence[float], v: Sequence[float]) -> float:
    return _norm((u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]))


def _check_scalars(setup) -> None:
    """Counts (integers >= 1), positive sizes, finite angles and sensor values, names from the allowed lists."""
    for name in ("fpixels", "spixels", "oversample", "phisteps", "thicksteps", "sample_budget"):
        v = getattr(setup, name)
        _need(isinstance(v, int) and v >= 1, f"Setup.{name} must be an integer >= 1, got {plain(v)}")
    for name in ("pixel_size", "fudge"):
        v = getattr(setup, name)
        _need(math.isfinite(v) and v > 0, f"Setup.{name} must be a finite number > 0, got {plain(v)}")
    for name in ("phi0", "phistep", "thickness_um", "mu_per_um", "thickstep_um", "dmin"):
        v = getattr(setup, name)
        _need(math.isfinite(v), f"Setup.{name} must be finite, got {plain(v)}")
    for name in ("thickness_um", "mu_per_um", "thickstep_um", "dmin"):
        v = getattr(setup, name)
        _need(v >= 0, f"Setup.{name} must be >= 0, got {plain(v)}")
    _need(setup.has_sensor or setup.thicksteps == 1,
          f"Setup.thicksteps must be 1 when Setup.thickness_um is 0 (a sensor without thickness is one layer), "
          f"got {plain(setup.thicksteps)}")
    _need(setup.convention in CONVENTIONS,
          f"Setup.convention must be one of {', '.join(CONVENTIONS)}; got {plain(setup.convention)}")
    _need(setup.pivot in ("beam", "sample"), f"Setup.pivot must be 'beam' or 'sample', got {plain(setup.pivot)}")
    _need(setup.shape in SHAPES, f"Setup.shape must be one of {', '.join(SHAPES)}; got {plain(setup.shape)}")
    _need(setup.fpixels * setup.spixels <= 1 << 31,
          f"Setup.fpixels × spixels must be at most 2^31, got {setup.fpixels} × {setup.spixels}")
    _need(setup.oversample <= 64, f"Setup.oversample must be between 1 and 64, got {plain(setup.oversample)}")


def _check_vectors(setup) -> None:
    """Unit vectors of the frame, mosaic axes and source directions; polarization and detector axes not parallel."""
    for name in ("fdet", "sdet", "odet", "beam", "polar_axis", "spindle", "twotheta_axis"):
        v = getattr(setup, name)
        _need(len(v) == 3 and all(math.isfinite(x) for x in v),
              f"Setup.{name} must be 3 finite numbers, got {plain(v)}")
        _need(abs(_norm(v) - 1.0) < UNIT_TOL, f"Setup.{name} must be a unit vector (|v| = 1), got |v| = {_norm(v):g}")
    _need(len(setup.mosaic_axes) == len(setup.mosaic_fractions) >= 1,
          "Setup.mosaic_axes and Setup.mosaic_fractions must have the same length >= 1")
    for k, ax in enumerate(setup.mosaic_axes):
        _need(_is_unit(ax), f"Setup.mosaic_axes[{k}] must be a finite unit vector, got {plain(ax)}")
    _need(all(math.isfinite(x) for x in setup.mosaic_fractions), "Setup.mosaic_fractions must be finite")
    _need(setup.nopolar or _cross_norm(setup.polar_axis, setup.beam) > UNIT_TOL,
          "Setup.polar_axis (-polar_vector) must not be parallel to Setup.beam (-beam_vector): the polarization "
          "plane is undefined")
    _need(_cross_norm(setup.fdet, setup.sdet) > UNIT_TOL,
          "Setup.fdet and Setup.sdet (-fdet_vector, -sdet_vector) must not be parallel")
    _need(len(setup.sources) >= 1, "Setup.sources must hold at least one source")
    for k, (d, lf) in enumerate(setup.sources):
        _need(_is_unit(d), f"Setup.sources[{k}] direction must be a finite unit vector, got {plain(d)}")
        _need(math.isfinite(lf) and lf > 0, f"Setup.sources[{k}] wavelength factor must be > 0, got {plain(lf)}")
    w = setup.source_weights
    if w is not None:
        _need(len(w) == len(setup.sources), f"Setup.source_weights must hold one weight per source "
              f"({len(setup.sources)}), got {len(w)}")
        _need(all(math.isfinite(x) and x >= 0 for x in w) and sum(w) > 0,
              "Setup.source_weights must be finite, >= 0 and not all 0")


def _check_table_and_pixels(setup) -> None:
    """hkl_min, the ROI inside the detector, and one mask byte per pixel."""
    _need(len(setup.hkl_min) == 3 and all(isinstance(x, int) for x in setup.hkl_min),
          f"Setup.hkl_min must be 3 integers, got {plain(setup.hkl_min)}")
    if setup.roi is not None:
        x0, x1, y0, y1 = setup.roi
        _need(0 <= x0 <= x1 < setup.fpixels and 0 <= y0 <= y1 < setup.spixels,
              f"Setup.roi (xmin, xmax, ymin, ymax) must satisfy 0 <= xmin <= xmax < {setup.fpixels} and "
              f"0 <= ymin <= ymax < {setup.spixels}; got {plain(setup.roi)}")
    if setup.mask is not None:
        what = "fpixels*spixels" if setup.panels is None else "panels*spixels*fpixels"
        _need(len(setup.mask) == setup.n_pixels,
              f"Setup.mask must hold {what} = {setup.n_pixels} bytes, got {len(setup.mask)}")


def _check_panels(setup) -> None:
    """A panel detector: image extents from its largest panel, no one-panel-only features, and every panel a proper
    parallelogram of finite steps."""
    layout = setup.panels
    _need(layout.n_panels >= 1 and len(layout.nodes) >= 1, "Setup.panels must hold at least one panel")
    _need((setup.fpixels, setup.spixels) == (layout.fpixels, layout.spixels),
          f"Setup.fpixels, spixels must be the largest panel's counts {(layout.fpixels, layout.spixels)} with "
          f"Setup.panels, got {(setup.fpixels, setup.spixels)} (Setup.for_panels sets them)")
    for name, why in (("roi", "select pixels with Setup.mask"), ("curved_det", "panels are flat"),
                      ("distance_is_close", "the distance is along the beam")):
        _need(not getattr(setup, name), f"Setup.{name} is for nanoBragg's one-panel detector: {why}")
    for p in layout.panels:
        _need(p.fpixels >= 1 and p.spixels >= 1, f"panel {p.name!r}: pixel counts must be >= 1")
        _need(all(math.isfinite(x) for x in (*p.corner, *p.fast, *p.slow)),
              f"panel {p.name!r}: corner and steps must be finite")
        _need(p.thickness_um is None or (math.isfinite(p.thickness_um) and p.thickness_um >= 0),
              f"panel {p.name!r}: thickness_um must be a finite number >= 0")
        _need(p.mu_per_um is None or (math.isfinite(p.mu_per_um) and p.mu_per_um >= 0),
              f"panel {p.name!r}: mu_per_um must be a finite number >= 0")
        _need(not setup.has_sensor or (p.thickness_um if p.thickness_um is not None else setup.thickness_um) > 0,
              f"panel {p.name!r} has no sensor thickness while others have one: give every panel a thickness")
        _need(p.area > UNIT_TOL * _norm(p.fast) * _norm(p.slow) and p.area > 0,
              f"panel {p.name!r}: the fast and slow steps must not be parallel or zero (|fast × slow| = "
              f"{plain(p.area)} mm²)")


def check_setup(setup) -> None:
    """Validate a Setup's static fields (counts, sizes, names, unit vectors, sources, ROI, mask).

    ``setup``: a :class:`~nbtorch.types.Setup` (lengths mm, angles degrees, sensor µm).  Raises ``ValueError``
    naming the field and the allowed values, in plain numbers."""
    _check_scalars(setup)
    _check_vectors(setup)
    _check_table_and_pixels(setup)
    if setup.panels is not None:
        _check_panels(setup)
