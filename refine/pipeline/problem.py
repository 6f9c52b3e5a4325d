"""What a fit is about and where it stands: the :class:`Problem` of N ≥ 1 images (observed pixels, one
parameterisation per image, the scalars they share, the target and options) and the :class:`FitState` between stages.

    state = refine.prepare(observed, params, setup, options)                       # one image
    state = prepare_many(observed_list, params_list, setups, shared, options)      # N images (refine.fit_many)

One image is N = 1 with nothing shared: its X is its x.  Every check, the usable pixels, the degenerate pairs and the
start are the same for any N.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import shlex
import warnings
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from nbtorch.types import Params, Setup
from nbtorch.validate import check_params

from ..model.degeneracy import Degeneracy, degenerate_pairs
from ..model.layout import Layout, align_shared, make_layout
from ..model.parameters import Parameterisation, parameterise, total_rotation
from ..model.psf import point_spread
from ..targets import Gaussian, Objective, Target, make_target, observed_array, usable_mask
from ..targets.boxes import spot_boxes
from ..targets.detector import check_gain, read_noise_photons, readout_text
from .options import FitOptions
from .report import reported_plane


class DegeneracyWarning(UserWarning):
    """A free combination of parameters the image cannot determine (see :mod:`refine.model.degeneracy`)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """What a fit is about, the same for all its stages.

    Per image (tuples of length N): ``observed`` [slow, fast] (photons, non-finite values zeroed), ``usable`` (bool
    [slow, fast]), ``pars`` (parameterisations about the aligned starting models), ``paths`` (labels) and ``flags``
    (the starting nanoBragg flags, or None).  ``layout`` (the scalars the images share and each one's own),
    ``target``, ``options`` (:class:`~refine.pipeline.options.FitOptions`), ``notes`` (what a summary should say),
    ``degeneracies``, ``batch`` (images of equal set-up simulated together under vmap), ``progress`` (None or
    ``progress(what, done, total)`` over the images)."""

    observed: Tuple[torch.Tensor, ...]
    usable: Tuple[np.ndarray, ...]
    pars: Tuple[Parameterisation, ...]
    layout: Layout
    target: Target
    options: FitOptions
    notes: Tuple[str, ...] = ()
    degeneracies: Tuple[Degeneracy, ...] = ()
    paths: Tuple[Optional[str], ...] = ()
    flags: Tuple[Optional[List[str]], ...] = ()
    batch: bool = True
    progress: Optional[Callable[[str, int, int], None]] = None

    @property
    def par(self) -> Parameterisation:
        """The first image's parameterisation (the only one of a one-image fit)."""
        return self.pars[0]

    @functools.cached_property
    def usable_index(self) -> Tuple[np.ndarray, ...]:
        """Flat slow-major indices of each image's usable pixels."""
        return tuple(np.flatnonzero(u.reshape(-1)) for u in self.usable)

    def reporter(self, prefix: str) -> Optional[Callable[[str, int, int], None]]:
        """``progress`` with ``prefix: `` before each ``what`` (None without progress)."""
        if self.progress is None:
            return None
        return lambda what, done, total: self.progress(f"{prefix}: {what}", done, total)

    def objective_on(self, pars: Optional[Sequence[Parameterisation]] = None, pixels=None,
                  target: Optional[Target] = None, what: str = "loss") -> Objective:
        """The objective on ``pixels`` (per image; default every usable pixel) with ``pars`` (default the fit's) and
        ``target`` (default the fit's)."""
        o = self.options
        return Objective(self.pars if pars is None else pars, self.observed,
                         self.usable_index if pixels is None else pixels, self.target if target is None else target,
                         o.chunk_pixels, o.fused, layout=self.layout, batch=self.batch, progress=self.reporter(what))

    @functools.cached_property
    def objective(self) -> Objective:
        """The fit's target on every usable pixel with the real model (what ``loss_all`` evaluates)."""
        return self.objective_on()


class FinalRun(NamedTuple):
    """The last minimisation of a non-preliminary stage: ``x``, ``converged``, ``message``, ``pixels`` (flat indices
    it fitted, per image), ``target`` (name), ``normal`` ((active, BlockNormal, models) at x when the minimiser
    computed them on the real model, else None)."""

    x: torch.Tensor
    converged: bool
    message: str
    pixels: Tuple[np.ndarray, ...]
    target: str
    normal: Optional[tuple]


@dataclasses.dataclass(frozen=True, eq=False)
class FitState:
    """A fit between stages (immutable; :func:`~refine.pipeline.strategy.run_stage` returns a new one).

    ``problem``; ``x`` [n] increments about the starting models (X of all images); ``history`` (one dict per
    iteration: stage, iteration, loss on the stage's own pixels, step, damping, accepted, seconds, pixels);
    ``stages`` (one dict per stage run or skipped, with ``loss_all`` on all usable pixels); ``iterations``,
    ``evaluations`` (totals); ``start_loss`` (``loss_all`` at the start); ``final`` (:class:`FinalRun` or None);
    ``seconds`` (stage time).
    """

    problem: Problem
    x: torch.Tensor
    history: Tuple[dict, ...] = ()
    stages: Tuple[dict, ...] = ()
    iterations: int = 0
    evaluations: int = 0
    start_loss: float = math.nan
    final: Optional[FinalRun] = None
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------------------
# inputs


def image_inputs(observed_list, params_list, setup_list, paths=None, flags=None):
    """Checked lists (observed, params, setups, paths, flags) of equal length: one Setup serves every image, paths
    default to the observed paths (when given as paths), one flag string to every image."""
    n = len(observed_list)
    if n == 0:
        raise ValueError("fit_many needs at least one image")
    setups = list(setup_list) if isinstance(setup_list, (list, tuple)) else [setup_list] * n
    if len(params_list) != n or len(setups) != n:
        raise ValueError(f"fit_many: {n} observed images but {len(params_list)} models and {len(setups)} set-ups")
    paths = list(paths) if paths is not None else [os.fspath(o) if isinstance(o, (str, os.PathLike)) else None
                                                   for o in observed_list]
    flags = [None] * n if flags is None else ([flags] * n if isinstance(flags, str) else list(flags))
    flags = [None if f is None else (shlex.split(f) if isinstance(f, str) else [str(t) for t in f]) for f in flags]
    if len(paths) != n or len(flags) != n:
        raise ValueError(f"fit_many: {n} images but {len(paths)} paths and {len(flags)} flag lists")
    return list(observed_list), list(params_list), setups, paths, flags


def _labelled(k: int, paths, exc: Exception) -> Exception:
    """``exc`` with 'image k (path): ' before its message when there are several images."""
    if len(paths) == 1:
        return exc
    return type(exc)(f"image {k}{f' ({paths[k - 1]})' if paths[k - 1] else ''}: {exc}")


def fit_target(options: FitOptions, image_gain=None, shape=None) -> Target:
    """The target of a fit: ``options.target``; the gaussian target's read-out noise in photons is
    ``options.readout_noise_adu`` / gain per pixel (gain: ``options.gain``, else ``image_gain``, the gain the
    observed image was read with, else 1; ValueError naming ``gain`` when a map is not of ``shape``), else
    ``options.read_noise``."""
    if options.readout_noise_adu is None:
        return make_target(options.target, read_noise=options.read_noise, weights=options.weights)
    gain = check_gain(options.gain if options.gain is not None else image_gain, shape)
    sigma = read_noise_photons(options.readout_noise_adu, gain)
    if np.ndim(sigma) == 0:
        return make_target("gaussian", read_noise=sigma)
    return make_target("gaussian", read_noise_map=sigma)


def _target_note(target: Target, options: FitOptions) -> str:
    """What the summary says of a Gaussian–Poisson target whose read-out noise came in ADU ('' otherwise)."""
    if options.readout_noise_adu is None or not isinstance(target, Gaussian):
        return ""
    if target.read_noise_map is None:
        return (f"gaussian target: read-out noise {options.readout_noise_adu:g} ADU = {target.read_noise:.4g} "
                f"photons (gain {options.readout_noise_adu / target.read_noise if target.read_noise else 1:.4g} "
                "ADU/photon)")
    sig = target.read_noise_map[np.isfinite(target.read_noise_map)]
    over = " over a per-pixel gain map" if np.ndim(options.readout_noise_adu) == 0 else ""
    return (f"gaussian target: read-out noise {readout_text(options.readout_noise_adu)}{over} = "
            f"{sig.min():.4g}–{sig.max():.4g} photons")


def image_spots(spots, n: int) -> list:
    """Each of ``n`` images' spots (``FitOptions.spots``): None, one table or array for one image, or a list / tuple
    of ``n`` of them (one per image; an image's entry may be None: its whole image).  ValueError naming ``spots``."""
    if isinstance(spots, (list, tuple)):
        if len(spots) != n:
            raise ValueError(f"spots: {len(spots)} spot lists for {n} images (give one per image, or an array)")
        return list(spots)
    if spots is not None and n > 1:
        raise ValueError(f"spots: give one spot list per image (a list of {n}), not one for all")
    return [spots] * n


def _image(observed, params: Params, setup: Setup, options: FitOptions, crystal_system: str, spots=None):
    """(observed tensor, usable bool image, parameterisation, target) of one image, checked (the target as
    :func:`fit_target` makes it with this image's gain); ``spots``: this image's spots (a spot-ROI fit) or None."""
    check_params(params, setup)  # types, dtype, device and values first: one-line errors before any work
    arr, own_mask, gain = observed_array(observed, setup, options.geometry)
    target = fit_target(options, gain, arr.shape)
    usable = usable_mask(arr, setup, options.mask, options.overload, target.lowest_observed(arr.shape))
    if own_mask is not None:
        usable &= own_mask
    o = options
    boxes, background = None, o.background
    if spots is not None:
        boxes = spot_boxes(setup, spots, options.roi_size, options.max_spots)
        usable &= boxes.mask
        background = boxes.starting_planes(arr, usable) if o.background is None else o.background
    if not usable.any():
        raise ValueError("no usable pixels: check the mask, the overload level and the ROI"
                         + (" (and the spots' boxes)" if boxes is not None else ""))
    if not (np.nan_to_num(arr[usable]) > 0).any():
        raise ValueError("the observed image is zero (or negative) in every usable pixel: nothing to fit (a blank or "
                         "wrong file, or an ADC offset (adc) larger than the counts)")
    par = parameterise(params, setup, o.free, crystal_system=crystal_system, ncells_mode=o.ncells_mode,
                       background=background, bounds=o.bounds, priors=o.priors,
                       psf=point_spread(o.psf, o.psf_fwhm, setup, o.psf_radius), boxes=boxes)
    observed_t = torch.as_tensor(np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0), dtype=par.dtype,
                                 device=par.device)
    return observed_t, usable, par, target


def _degeneracies(par: Parameterisation, options: FitOptions) -> Tuple[Degeneracy, ...]:
    """Degenerate pairs of the free scalars: a ``DegeneracyWarning`` each, or ValueError unless allowed."""
    degs = tuple(degenerate_pairs(par))
    if degs and not options.allow_degenerate:
        raise ValueError(f"{degs[0].message()} (or allow it: allow_degenerate=True)")
    for d in degs:
        warnings.warn(d.message(), DegeneracyWarning, stacklevel=4)
    return degs


def check_geometry(geometry, setup: Setup) -> None:
    """ValueError unless ``geometry`` (a CrystFEL :class:`~nbtorch.io.crystfel.Geometry`, or None) describes the
    panels of ``setup`` (the same names in the same order)."""
    if geometry is None:
        return
    have = [p.name for p in setup.panels.panels] if setup.panels is not None else []
    want = [p.name for p in geometry.panels]
    if have != want:
        raise ValueError(f"geometry: the CrystFEL file's {len(want)} panels ({', '.join(want[:4])}"
                         f"{' …' if len(want) > 4 else ''}) are not the detector's "
                         f"{'one nanoBragg panel' if not have else f'{len(have)} panels'}: build the set-up from "
                         "that geometry (nbtorch.detector.with_panels and nbtorch.panels.layout_from_crystfel)")


def build_problem(observed_list, params_list, setups, options: FitOptions, shared: Sequence[str] = (),
                  paths=None, flags=None, batch: bool = True, progress=None) -> Problem:
    """The problem of N images: the ``shared`` groups' starting values aligned on image 1's, each image's observed
    pixels and parameterisation (:func:`_image`), the layout of X, degenerate pairs, the target.
    ``progress('preparing', k, N)`` after each image (when given)."""
    n = len(observed_list)
    paths = tuple(paths) if paths is not None else (None,) * n
    for s in dict.fromkeys(setups):
        check_geometry(options.geometry, s)
    spots = image_spots(options.spots, n)
    plane = [g for g in shared if str(g).split(".")[0] == "background" and str(g) != "background.water"]
    if plane and any(sp is not None for sp in spots):
        raise ValueError(f"shared {plane[0]}: a spot-ROI fit gives every image's boxes their own background planes; "
                         "refine them per image")
    params_list, notes = (align_shared(list(params_list), shared, setups[0].panels) if shared
                          else (list(params_list), []))
    observed, usable, pars, targets = [], [], [], []
    for k, (ob, p, s, sp) in enumerate(zip(observed_list, params_list, setups, spots), 1):
        try:
            system = options.crystal_system if k == 1 else pars[0].crystal_system
            o_t, u, par, target = _image(ob, p, s, options, system, sp)
        except (ValueError, OSError) as exc:
            raise _labelled(k, paths, exc) from None
        observed.append(o_t)
        usable.append(u)
        pars.append(par)
        targets.append(target)
        if progress is not None:
            progress("preparing", k, n)
    degs = _degeneracies(pars[0], options)
    target = targets[0]  # one target for all images: the first image's gain converts a read-out noise in ADU
    notes = tuple(nt for nt in (pars[0].crystal_system_note, _target_note(target, options)) if nt) + tuple(notes) \
        + tuple(d.message() for d in degs)
    return Problem(tuple(observed), tuple(usable), tuple(pars), make_layout(pars, shared), target, options, notes,
                   degs, paths, tuple(flags) if flags is not None else (None,) * n, batch, progress)


# ---------------------------------------------------------------------------------------------------------------
# the start


def _differing(a: Params, b: Params) -> List[str]:
    """Leaves (and the crystal rotation) in which two models differ beyond rounding."""
    out = []
    for part in ("crystal", "beam", "detector", "background"):
        for name, u in getattr(a, part)._asdict().items():
            v = getattr(getattr(b, part), name)
            if name not in ("misset", "orientation") and (
                    u.shape != v.shape or not torch.allclose(u, v.to(u), rtol=1e-9, atol=1e-12)):
                out.append(f"{part}.{name}")
    if not torch.allclose(total_rotation(a), total_rotation(b).to(a.crystal.cell), rtol=0, atol=1e-12):
        out.append("crystal orientation")
    return out


def start_point(par: Parameterisation, start=None) -> torch.Tensor:
    """Starting increments [n]: zeros (None), the given increments, or a previous :class:`refine.Result`'s refined
    model packed about ``par``'s reference (ValueError when it was fitted on another set-up or differs from the
    reference in parameters that are not free here)."""
    if start is None:
        return par.zeros()
    if hasattr(start, "params") and hasattr(start, "setup"):
        if start.setup != par.setup:
            raise ValueError("start: the Result was fitted with a different Setup than this fit's")
        plane = torch.as_tensor(reported_plane(start.parameters), dtype=par.dtype, device=par.device)
        x = par.pack(start.params, plane, getattr(start, "values", {}).get("psf"))  # a refined PSF FWHM (µm)
        bad = _differing(par.unpack(x), start.params)
        if bad:
            raise ValueError(f"start: the Result's model differs from the starting model in {', '.join(bad)}, which "
                             "are not free here: pass result.params as the starting model, or free them")
        return x
    x = torch.as_tensor(start, dtype=par.dtype, device=par.device).reshape(-1)
    if x.shape != (par.n,) or not bool(torch.isfinite(x).all()):
        raise ValueError(f"start must be {par.n} finite increments ({', '.join(par.names) or 'none'}) or a "
                         f"refine.Result; got shape {tuple(x.shape)}")
    return x.clone()


def initial_state(pb: Problem, x0: torch.Tensor) -> FitState:
    """The state before the first stage at X = ``x0`` (checked), with its loss on all usable pixels."""
    for i, par in enumerate(pb.pars):
        check_params(par.unpack(pb.layout.image_x(x0, i)), par.setup)
    return FitState(pb, x0, start_loss=pb.objective.loss(x0))


def prepare(observed, params: Params, setup: Setup, options: FitOptions, start=None) -> FitState:
    """The state of a one-image fit before its first stage: observed image (tensor, array, ObservedImage or path)
    and usable pixels, parameterisation, target, degenerate pairs (a ``DegeneracyWarning``, or ``ValueError`` unless
    ``options.allow_degenerate``), starting point (:func:`start_point`) and its loss on all usable pixels."""
    flags = options.nanobragg_args
    obs, params, setups, paths, flags = image_inputs([observed], [params], setup, None,
                                                     None if flags is None else [flags])
    pb = build_problem(obs, params, setups, options, paths=paths, flags=flags)
    return initial_state(pb, start_point(pb.par, start))
