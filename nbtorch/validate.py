"""Input validation: clear ``ValueError`` messages naming the parameter and the allowed range, in plain numbers.

``check_params`` checks a :class:`~nbtorch.types.Params`' shapes always and its values whenever the tensors are
concrete (not inside a ``torch.func`` transform, where reading values is impossible); given a ``Setup`` it also
checks the detector geometry (:func:`nbtorch.detector.check_detector`).  The static ``Setup`` checks live in
:mod:`nbtorch.setup_checks` (they run when a ``Setup`` is made) and are re-exported here with ``check_detector``.
"""
from __future__ import annotations

import math

import torch

from .detector import check_detector
from .pytree import tree_leaves
from .setup_checks import check_setup, plain
from .types import Params, Setup

try:
    from torch._C._functorch import is_functorch_wrapped_tensor
except ImportError:  # pragma: no cover - older torch
    def is_functorch_wrapped_tensor(t) -> bool:  # noqa: D103
        return False

__all__ = ["check_params", "check_cell", "check_detector", "check_setup"]

_SHAPES = {
    "crystal.cell": (6,),
    "crystal.misset": (3,),
    "crystal.orientation": (3, 3),
    "crystal.ncells": (3,),
    "crystal.mosaic_spread": (),
    "beam.wavelength": (),
    "beam.fluence": (),
    "beam.polarization": (),
    "beam.spectrum_shift": (),
    "detector.distance": (),
    "detector.beam_center": (2,),
    "detector.rotation": (3,),
    "detector.twotheta": (),
    "structure.default_F": (),
    "background.water_size": (),
}


def _is_concrete(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or is_functorch_wrapped_tensor(t):
        return False
    if t.device.type == "meta" or getattr(t, "_is_view_of_fake", False) or type(t).__name__ in ("FakeTensor", "FunctionalTensor"):
        return False
    return True


#: ``check_params``' default for ``setup``: no set-up given (an explicit None is an error: simulate(p, None)).
_NO_SETUP = object()


def check_params(params, setup=_NO_SETUP) -> None:
    """Validate types, shapes, dtype and device (always) and values (when concrete) of a Params pytree;
    ``ValueError`` names the field.

    ``params``: :class:`~nbtorch.types.Params` (Å, mm, degrees); ``setup``: its :class:`~nbtorch.types.Setup`, when
    given the detector geometry is checked too (:func:`~nbtorch.detector.check_detector`); passing something else
    (None included) is an error."""
    if not isinstance(params, Params):
        raise ValueError(f"params must be an nbtorch.Params, got {type(params).__name__}")
    if setup is not _NO_SETUP and not isinstance(setup, Setup):
        raise ValueError(f"setup must be an nbtorch.Setup (e.g. from nbtorch.from_nanobragg_args), got "
                         f"{type(setup).__name__}")
    leaves = tree_leaves(params)
    _check_leaves(leaves)
    if torch.compiler.is_compiling():
        return
    if setup is not _NO_SETUP:
        _check_group_shapes(params.detector, setup)
    _check_values(params, leaves, None if setup is _NO_SETUP else setup)


def _check_group_shapes(det, setup) -> None:
    """``group_shift``/``group_rotation`` hold one row per rigid body of ``setup.panels`` (none for one panel)."""
    for name in ("group_shift", "group_rotation"):
        t = getattr(det, name)
        if tuple(t.shape) != (setup.n_groups, 3):
            raise ValueError(f"params.detector.{name} must have shape [{setup.n_groups}, 3], got {list(t.shape)} "
                             "(one row per rigid body of the set-up's panel hierarchy, Setup.panels.nodes)")


def _check_leaves(leaves) -> None:
    """Every leaf a floating-point tensor of its shape; one dtype and one device for all."""
    first = None
    for name, t in leaves:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"params.{name} must be a torch.Tensor, got {type(t).__name__}")
        want = _SHAPES.get(name)
        if want is not None and tuple(t.shape) != want:
            raise ValueError(f"params.{name} must have shape {list(want)}, got {list(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"params.{name} must be a floating-point tensor, got {t.dtype}")
        if first is None:
            first = (name, t)
        elif t.dtype != first[1].dtype:
            raise ValueError(f"all params leaves must share one dtype: params.{name} is {t.dtype} but "
                             f"params.{first[0]} is {first[1].dtype}")
        elif t.device != first[1].device:
            raise ValueError(f"all params leaves must be on one device: params.{name} is on {t.device} but "
                             f"params.{first[0]} is on {first[1].device} (move them with .to(device))")


def _check_values(params, leaves, setup) -> None:
    """Value checks of concrete leaves (finite, in range, a proper rotation; the detector with ``setup``)."""
    F = params.structure.F
    if F.dim() != 3:
        raise ValueError(f"params.structure.F must be a 3-D [nh, nk, nl] table, got shape {list(F.shape)}")
    if not all(_is_concrete(t) for _, t in leaves):
        return
    for name, t in leaves:
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"params.{name} contains NaN or inf: {plain(t)}")
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
        shortest = params.beam.wavelength * min(f for _, f in setup.sources) + params.beam.spectrum_shift
        _positive("beam.spectrum_shift", shortest, f"> -λ0·(smallest source factor) (every source's wavelength "
                  f"λ0·factor + shift > 0 Å; the shortest would be {plain(shortest)} Å)")


def _positive(name, t, allowed):
    if not bool((t > 0).all()):
        raise ValueError(f"params.{name} must be {allowed}, got {plain(t)}")


def _range(name, t, lo, hi, unit):
    if not bool(((t >= lo) & (t <= hi)).all()):
        raise ValueError(f"params.{name} must be within [{lo:g}, {hi:g}] {unit}, got {plain(t)}")


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
