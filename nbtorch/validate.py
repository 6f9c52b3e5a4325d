"""Input validation: clear ``ValueError`` messages naming the parameter and the allowed range.

``check_setup`` runs when a :class:`~nbtorch.types.Setup` is made.  ``check_params`` checks shapes always and values
whenever the tensors are concrete (not inside a ``torch.func`` transform, where reading values is impossible).
"""
from __future__ import annotations

import math

import torch

_SHAPES = {
    "crystal.cell": (6,),
    "crystal.misset": (3,),
    "crystal.orientation": (3, 3),
    "crystal.ncells": (3,),
    "crystal.mosaic_spread": (),
    "beam.wavelength": (),
    "beam.fluence": (),
    "beam.polarization": (),
    "detector.distance": (),
    "detector.beam_center": (2,),
    "detector.rotation": (3,),
    "detector.twotheta": (),
    "structure.default_F": (),
    "background.water_size": (),
}


def _is_concrete(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    try:
        from torch._C._functorch import is_functorch_wrapped_tensor

        if is_functorch_wrapped_tensor(t):
            return False
    except ImportError:  # pragma: no cover
        pass
    if getattr(t, "_is_view_of_fake", False) or type(t).__name__ in ("FakeTensor", "FunctionalTensor"):
        return False
    return True


def check_setup(setup) -> None:
    """Validate a Setup's static fields; raises ``ValueError`` naming the field and the allowed values."""
    from .types import CONVENTIONS, SHAPES

    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    for name in ("fpixels", "spixels", "oversample", "phisteps", "thicksteps", "sample_budget"):
        v = getattr(setup, name)
        need(isinstance(v, int) and v >= 1, f"Setup.{name} must be an integer >= 1, got {v!r}")
    for name in ("pixel_size", "fudge"):
        v = getattr(setup, name)
        need(math.isfinite(v) and v > 0, f"Setup.{name} must be a finite number > 0, got {v!r}")
    for name in ("phi0", "phistep", "thickness_um", "mu_per_um", "thickstep_um", "dmin"):
        v = getattr(setup, name)
        need(math.isfinite(v), f"Setup.{name} must be finite, got {v!r}")
    need(setup.thickness_um >= 0 and setup.mu_per_um >= 0 and setup.thickstep_um >= 0 and setup.dmin >= 0,
         "Setup.thickness_um, mu_per_um, thickstep_um and dmin must be >= 0")
    need(setup.convention in CONVENTIONS, f"Setup.convention must be one of {', '.join(CONVENTIONS)}; got {setup.convention!r}")
    need(setup.pivot in ("beam", "sample"), f"Setup.pivot must be 'beam' or 'sample', got {setup.pivot!r}")
    need(setup.shape in SHAPES, f"Setup.shape must be one of {', '.join(SHAPES)}; got {setup.shape!r}")
    for name in ("fdet", "sdet", "odet", "beam", "polar_axis", "spindle", "twotheta_axis"):
        v = getattr(setup, name)
        need(len(v) == 3 and all(math.isfinite(x) for x in v), f"Setup.{name} must be 3 finite numbers, got {v!r}")
        n = math.sqrt(sum(x * x for x in v))
        need(abs(n - 1.0) < 1e-6, f"Setup.{name} must be a unit vector (|v| = 1), got |v| = {n:g}")
    need(len(setup.mosaic_axes) == len(setup.mosaic_fractions) >= 1,
         "Setup.mosaic_axes and Setup.mosaic_fractions must have the same length >= 1")
    for k, ax in enumerate(setup.mosaic_axes):
        need(len(ax) == 3 and all(math.isfinite(x) for x in ax) and abs(math.sqrt(sum(x * x for x in ax)) - 1) < 1e-6,
             f"Setup.mosaic_axes[{k}] must be a finite unit vector, got {ax!r}")
    need(all(math.isfinite(x) for x in setup.mosaic_fractions), "Setup.mosaic_fractions must be finite")

    def cross_norm(u, v):
        c = (u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0])
        return math.sqrt(sum(x * x for x in c))

    need(setup.nopolar or cross_norm(setup.polar_axis, setup.beam) > 1e-6,
         "Setup.polar_axis (-polar_vector) must not be parallel to Setup.beam (-beam_vector): the polarization "
         "plane is undefined")
    need(cross_norm(setup.fdet, setup.sdet) > 1e-6, "Setup.fdet and Setup.sdet (-fdet_vector, -sdet_vector) must "
         "not be parallel")
    need(setup.fpixels * setup.spixels <= 1 << 31, f"Setup.fpixels × spixels must be at most 2^31, got "
         f"{setup.fpixels} × {setup.spixels}")
    need(setup.oversample <= 64, f"Setup.oversample must be between 1 and 64, got {setup.oversample}")
    need(len(setup.hkl_min) == 3 and all(isinstance(x, int) for x in setup.hkl_min),
         f"Setup.hkl_min must be 3 integers, got {setup.hkl_min!r}")
    need(len(setup.sources) >= 1, "Setup.sources must hold at least one source")
    for k, (d, lf) in enumerate(setup.sources):
        need(len(d) == 3 and all(math.isfinite(x) for x in d) and abs(math.sqrt(sum(x * x for x in d)) - 1) < 1e-6,
             f"Setup.sources[{k}] direction must be a finite unit vector, got {d!r}")
        need(math.isfinite(lf) and lf > 0, f"Setup.sources[{k}] wavelength factor must be > 0, got {lf!r}")
    if setup.roi is not None:
        x0, x1, y0, y1 = setup.roi
        need(0 <= x0 <= x1 < setup.fpixels and 0 <= y0 <= y1 < setup.spixels,
             f"Setup.roi (xmin, xmax, ymin, ymax) must satisfy 0 <= xmin <= xmax < {setup.fpixels} and "
             f"0 <= ymin <= ymax < {setup.spixels}; got {setup.roi}")
    if setup.mask is not None:
        need(len(setup.mask) == setup.fpixels * setup.spixels,
             f"Setup.mask must hold fpixels*spixels = {setup.fpixels * setup.spixels} bytes, got {len(setup.mask)}")


def check_params(params, setup=None) -> None:
    """Validate shapes (always) and values (when concrete) of a Params pytree; ``ValueError`` names the field."""
    from .types import tree_leaves

    leaves = tree_leaves(params)
    first_dtype = None
    for name, t in leaves:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"params.{name} must be a torch.Tensor, got {type(t).__name__}")
        want = _SHAPES.get(name)
        if want is not None and tuple(t.shape) != want:
            raise ValueError(f"params.{name} must have shape {list(want)}, got {list(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"params.{name} must be a floating-point tensor, got {t.dtype}")
        if first_dtype is None:
            first_dtype = (name, t.dtype)
        elif t.dtype != first_dtype[1]:
            raise ValueError(f"all params leaves must share one dtype: params.{name} is {t.dtype} but "
                             f"params.{first_dtype[0]} is {first_dtype[1]}")
    if torch.compiler.is_compiling():
        return
    F = params.structure.F
    if F.dim() != 3:
        raise ValueError(f"params.structure.F must be a 3-D [nh, nk, nl] table, got shape {list(F.shape)}")
    if not all(_is_concrete(t) for _, t in leaves):
        return
    for name, t in leaves:
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"params.{name} contains NaN or inf: {t.detach().cpu().numpy()!r}")
    check_cell(params.crystal.cell)
    _positive("crystal.ncells", params.crystal.ncells, "> 0 (number of unit cells along a, b, c)")
    _range("crystal.mosaic_spread", params.crystal.mosaic_spread, 0.0, 90.0, "degrees")
    _positive("beam.wavelength", params.beam.wavelength, "> 0 Å")
    _range("beam.fluence", params.beam.fluence, 0.0, math.inf, "photons/m²")
    _range("beam.polarization", params.beam.polarization, -1.0, 1.0, "(Kahn factor)")
    _positive("detector.distance", params.detector.distance, "> 0 mm")
    _range("structure.default_F", params.structure.default_F, 0.0, math.inf, "")
    _range("background.water_size", params.background.water_size, 0.0, math.inf, "µm")
    O = params.crystal.orientation.detach().double()
    if float((O @ O.T - torch.eye(3, dtype=O.dtype)).abs().max()) > 1e-6 or float(torch.linalg.det(O)) < 0:
        raise ValueError("params.crystal.orientation must be a proper rotation matrix (orthonormal, det +1)")
    if setup is not None:
        check_detector(params.detector, setup)


def check_detector(det, setup) -> None:
    """Raise ``ValueError`` unless the detector plane lies in front of the sample and the beam can reach it.

    ``det``: concrete :class:`~nbtorch.types.Detector`; the perpendicular distance must exceed 1e-6 of the detector's
    extent plus its distance, and the beam must not run parallel to the (rotated, before two-theta) plane.
    """
    from .detector import detector_frame
    from .rotation import rot_xyz
    from .units import deg2rad

    with torch.no_grad():
        det = type(det)(*(t.detach().double().cpu() for t in det))
        o0 = torch.tensor(setup.odet, dtype=torch.float64)
        ratio = float((torch.tensor(setup.beam, dtype=torch.float64) * (rot_xyz(deg2rad(det.rotation)) @ o0)).sum())
        if abs(ratio) < 1e-6:
            raise ValueError(
                "detector.rotation makes the beam run parallel to the detector plane (beam·normal = "
                f"{ratio:.3g}): the distance along the beam is undefined; check detector.rotation / -detector_rot*")
        frame = detector_frame(det, setup)
        size = setup.pixel_size * (setup.fpixels + setup.spixels)
        scale = float(torch.linalg.vector_norm(frame.pix0)) + size
        close = float(frame.close)
        if not close > 1e-6 * scale:
            raise ValueError(
                "detector geometry puts the detector plane behind or through the sample (close distance "
                f"{close:.3g} mm): check detector.distance, detector.rotation and detector.twotheta "
                "(-distance, -detector_rot*, -twotheta)")


def _positive(name, t, allowed):
    if not bool((t > 0).all()):
        raise ValueError(f"params.{name} must be {allowed}, got {t.detach().cpu().numpy()!r}")


def _range(name, t, lo, hi, unit):
    if not bool(((t >= lo) & (t <= hi)).all()):
        raise ValueError(f"params.{name} must be within [{lo:g}, {hi:g}] {unit}, got {t.detach().cpu().numpy()!r}")


def check_cell(cell: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``cell`` [6] is a possible unit cell: lengths > 0 Å, angles in (0, 180)°, and angles
    that can close (α < β + γ, β < γ + α, γ < α + β, α + β + γ < 360°)."""
    c = [float(x) for x in cell.detach().cpu().reshape(-1)]
    if len(c) != 6:
        raise ValueError(f"cell must have 6 values (a, b, c in Å; alpha, beta, gamma in degrees), got {len(c)}")
    a, b, cc, al, be, ga = c
    if min(a, b, cc) <= 0:
        raise ValueError(f"cell lengths a, b, c must be > 0 Å, got {a:g} {b:g} {cc:g}")
    if not all(0 < x < 180 for x in (al, be, ga)):
        raise ValueError(f"cell angles alpha, beta, gamma must be in (0, 180) degrees, got {al:g} {be:g} {ga:g}")
    if not (al < be + ga and be < ga + al and ga < al + be and al + be + ga < 360):
        raise ValueError(
            f"cell angles {al:g} {be:g} {ga:g} cannot close: each angle must be less than the sum of the other two "
            "and their sum less than 360 degrees"
        )
