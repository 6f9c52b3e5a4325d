"""The objectives of studies, ``objective(trial) -> loss``, apart from any storage or process: a global search's
box and trial, a hyperparameter sweep's space and trial (both work with ``optuna.trial.FixedTrial``)."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

import torch

from nbtorch.pytree import tree_leaves
from nbtorch.units import DEG_PER_MRAD, percent_to_fraction

from ..model.table import SEARCH_SUFFIX, SEARCH_UNITS, SPECS
from ..pipeline.fit import fit, fit_options
from ..pipeline.options import METHODS, FitOptions
from ..pipeline.report import reported_plane
from ..pipeline.result import Result, finish
from ..pipeline.strategy import FitState, Stage, default_stages, prepare, run_stage


def parse_search(text: str) -> Dict[str, float]:
    """``"orientation:5,cell:3"`` → {"orientation": 5.0, "cell": 3.0}: half-widths in :data:`SEARCH_UNITS` of
    groups or single scalars (``beam_center.x``).  ValueError naming ``search`` and what is wrong."""
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise ValueError(f"search is empty: give GROUP:RANGE[,GROUP:RANGE...] with groups {', '.join(SEARCH_UNITS)}")
    out: Dict[str, float] = {}
    for item in items:
        name, sep, value = (part.strip() for part in item.partition(":"))
        if not sep or not name:
            raise ValueError(f"search entry {item!r} is malformed: expected GROUP:RANGE, e.g. orientation:5")
        check_search_name(name)
        try:
            half = float(value)
        except ValueError:
            half = math.nan
        if not (math.isfinite(half) and half > 0):
            raise ValueError(f"search range {value!r} of {name} is not a number > 0 "
                             f"({SEARCH_UNITS[name.split('.')[0]]})")
        out[name] = half
    return out


def check_search_name(name: str) -> None:
    """ValueError unless ``name`` is a searchable group or one of its scalars (cell: the lengths)."""
    group = name.split(".")[0]
    if group not in SEARCH_UNITS or ("." in name and (name not in SPECS or group == "cell" and
                                                      SPECS[name].unit != "Å")):
        raise ValueError(f"search group {name!r} is unknown: searchable groups are "
                         f"{', '.join(f'{g} ({u})' for g, u in SEARCH_UNITS.items())}, or one of their scalars "
                         "(orientation.z, cell.a, beam_center.x ...)")


class Dimension(NamedTuple):
    """One sampled scalar: trial parameter ``name`` ('orientation.x_deg'), ``index`` in x, ``half``-width in the
    group's unit, ``to_x`` increment units per unit (mrad per degree, Å per percent, 1 per mm, mm per pixel)."""

    name: str
    index: int
    half: float
    to_x: float


def trial_stages(iterations: int = 4) -> List[Stage]:
    """A trial's short coarse-to-fine schedule: the default stages with ``iterations`` iterations each."""
    return default_stages(iterations, iterations, iterations)


class GlobalSearchObjective:
    """``objective(trial) -> loss`` of a global search: a trial moves the ``base`` state's x by one value per
    :class:`Dimension` (uniform in ± half), runs the ``stages``, reports each stage's ``loss_all`` as step k (pruned
    when the pruner says so) and returns the last, keeping the refined increments in the user attribute ``x``."""

    def __init__(self, base: FitState, dimensions: Sequence[Dimension], stages: Sequence[Stage]):
        self.base, self.dimensions, self.stages = base, list(dimensions), list(stages)

    def fingerprint(self) -> str:
        """A digest of what trials depend on (pixels, start, Setup, free scalars, dimensions, stages, target)."""
        pb = self.base.problem
        h = hashlib.sha1()
        for t in (*pb.observed, *(t for _, t in tree_leaves(pb.par.ref) if isinstance(t, torch.Tensor))):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(repr((pb.par.setup, pb.par.names, self.dimensions, self.stages, pb.target.name)).encode())
        return h.hexdigest()[:16]

    def start_params(self) -> Dict[str, float]:
        """Trial parameters of the user's start (every value 0)."""
        return {d.name: 0.0 for d in self.dimensions}

    def run(self, x0: torch.Tensor, report: Optional[Callable[[float, int], None]] = None,
            stages: Optional[Sequence[Stage]] = None) -> FitState:
        """The last state of ``stages`` (default ``self.stages``) run from increments ``x0``; ``report(loss_all,
        step)`` after each stage that has a ``loss_all``."""
        state = dataclasses.replace(self.base, x=x0, start_loss=self.base.problem.objective.loss(x0))
        for step, stage in enumerate(self.stages if stages is None else stages):
            state = run_stage(state, stage)
            loss = state.stages[-1].get("loss_all")
            if report is not None and loss is not None:
                report(float(loss), step)
        return state

    def __call__(self, trial) -> float:
        from optuna import TrialPruned

        def report(loss: float, step: int) -> None:
            trial.report(loss if math.isfinite(loss) else sys.float_info.max, step)
            if step < len(self.stages) - 1 and trial.should_prune():  # after the last stage the trial is done
                raise TrialPruned(f"pruned after stage {self.stages[step].name} (loss {loss:.6g})")

        x0 = self.base.x.clone()
        for d in self.dimensions:
            x0[d.index] += trial.suggest_float(d.name, -d.half, d.half) * d.to_x
        state = self.run(x0, report)
        loss = state.stages[-1].get("loss_all") if state.stages else None  # the last stage's, at state.x
        loss = state.problem.objective.loss(state.x) if loss is None else float(loss)
        trial.set_user_attr("x", [float(v) for v in state.x])
        if not math.isfinite(loss):
            raise FloatingPointError(f"trial {trial.number}: the refined model's loss is not finite")
        return float(loss)


def global_search_objective(observed, params, setup, search: Mapping[str, float], *,
                            options: Optional[FitOptions] = None, stages: Optional[Sequence[Stage]] = None,
                            iterations: int = 4, **overrides) -> GlobalSearchObjective:
    """Objective factory of a global search: ``observed`` [slow, fast] (photons), ``params``, ``setup`` as for
    :func:`refine.fit`; ``search`` {free group or scalar: half-width} in degrees, percent (cell lengths), mm, pixels
    (:data:`SEARCH_UNITS`); ``options``/``overrides`` the fit's options; ``stages`` each trial's schedule (default
    :func:`trial_stages` with ``iterations`` per stage).  Returns :class:`GlobalSearchObjective`."""
    base = prepare(observed, params, setup, fit_options(options, **overrides))
    par, dims = base.problem.par, {}
    for name, half in search.items():  # every free scalar of each named group (cell: the free lengths)
        check_search_name(name)
        group = name.split(".")[0]
        idx = [i for i in par.index(name) if not (group == "cell" and par.scalars[i].unit != "Å")]
        if not idx:
            raise ValueError(f"search {name}: not refined here; add it to the free groups to search it")
        for i in idx:
            s = par.scalars[i]
            to_x = {"orientation": 1.0 / DEG_PER_MRAD, "cell": percent_to_fraction(s.ref), "distance": 1.0,
                    "beam_center": par.setup.pixel_size}[group]
            dims[i] = Dimension(s.name + SEARCH_SUFFIX[group], i, float(half), float(to_x))
    stages = list(stages) if stages is not None else trial_stages(iterations)
    return GlobalSearchObjective(base, [dims[i] for i in sorted(dims)], stages)


def finish_best(study, objective: GlobalSearchObjective, stages: Optional[Sequence[Stage]] = None) -> Result:
    """The study's best trial's model refined to convergence (default: one final stage) → :class:`refine.Result`."""
    x = torch.as_tensor(study.best_trial.user_attrs["x"], dtype=objective.base.x.dtype, device=objective.base.x.device)
    return finish(objective.run(x, stages=stages or [Stage("fine", preliminary=False)]))


#: The default hyperparameter space: a list is a categorical choice, a pair of ints an integer range, a pair of
#: floats a log-uniform range.  ``spot_roi`` k > 0 fits only pixels within k px of spots (0: all usable pixels).
HYPER_SPACE = {"method": list(METHODS), "damping": (1e-5, 1.0), "lr": (1e-3, 0.5),
               "schedule": ["coarse_to_fine", "final_only"], "coarse_iter": (2, 12),
               "target": ["poisson", "gaussian", "anscombe"], "spot_roi": (0, 6), "oversample": (1, 3)}
#: Conditional hyperparameters, {name: (the one it depends on, the value for which it applies)}: the initial LM μ
#: for LM, the learning rate for Adam, the coarse stages' iterations for the coarse-to-fine schedule.
CONDITIONS = {"lr": ("method", "adam"), "damping": ("method", "lm"), "coarse_iter": ("schedule", "coarse_to_fine")}


class HyperparameterObjective:
    """``objective(trial) -> score`` of a hyperparameter sweep (built by :func:`hyperparameter_objective`): each
    trial fits with hyperparameters from ``space`` (checked against :data:`HYPER_SPACE`) and is scored on the
    ``reference`` problem (base options, all usable pixels); it keeps the fit's summary as user attributes."""

    def __init__(self, observed, params, setup, options: FitOptions, space: Mapping[str, object], truth=None,
                 truth_background=None):
        for name, spec in space.items():
            if name not in HYPER_SPACE:
                raise ValueError(f"hyperparameter {name!r} is unknown; known: {', '.join(HYPER_SPACE)}")
            if isinstance(spec, tuple):
                if len(spec) != 2 or not spec[0] < spec[1]:
                    raise ValueError(f"hyperparameter {name}: a range must be (low, high) with low < high; got {spec}")
            elif not (isinstance(spec, list) and spec):
                raise ValueError(f"hyperparameter {name}: give a non-empty list of choices or a (low, high) range")
        self.observed, self.params, self.setup, self.options = observed, params, setup, options
        self.space = dict(space)
        self.reference = prepare(observed, params, setup, options)
        par = self.reference.problem.par
        self.truth_x = None
        if truth is not None:
            plane = None if truth_background is None else torch.as_tensor(truth_background, dtype=par.dtype)
            self.truth_x = par.pack(truth, plane)

    def configure(self, hp: Mapping[str, object]):
        """(FitOptions, Setup) of hyperparameters ``hp``."""
        changes = {k: hp[k] for k in ("method", "target", "lr", "damping", "coarse_iter") if k in hp}
        if "schedule" in hp:
            changes["coarse_to_fine"] = hp["schedule"] == "coarse_to_fine"
        if "spot_roi" in hp:
            changes.update(spots_only=int(hp["spot_roi"]) > 0, spot_dilate=max(0, int(hp["spot_roi"])))
        setup = self.setup.replace(oversample=int(hp["oversample"])) if "oversample" in hp else self.setup
        return self.options.replace(callback=None, **changes), setup

    def score(self, result: Result) -> float:
        """Lower is better: the RMS error of the free scalars in typical errors with a truth, else the loss."""
        pb = self.reference.problem
        plane = torch.as_tensor(reported_plane(result.parameters), dtype=pb.par.dtype)
        x = pb.par.pack(result.params, plane)
        if self.truth_x is None:
            return float(pb.objective.loss(x))
        err = (x - self.truth_x) / pb.par.typical()
        return float(torch.sqrt(torch.mean(err ** 2))) if len(err) else 0.0

    def __call__(self, trial) -> float:
        hp: Dict[str, object] = {}
        for name, spec in self.space.items():
            on, value = CONDITIONS.get(name, (None, None))
            if on is not None and hp.get(on, value) != value:  # a conditional one that does not apply
                continue
            if isinstance(spec, list):
                hp[name] = trial.suggest_categorical(name, spec)
            elif all(isinstance(v, int) for v in spec):
                hp[name] = trial.suggest_int(name, spec[0], spec[1])
            else:
                hp[name] = trial.suggest_float(name, float(spec[0]), float(spec[1]), log=True)
        options, setup = self.configure(hp)
        result = fit(self.observed, self.params, setup, options=options)
        value = self.score(result)
        for name, kind in (("converged", bool), ("iterations", int), ("seconds", float), ("loss_all", float)):
            trial.set_user_attr(name, kind(getattr(result, name)))
        if not math.isfinite(value):
            raise FloatingPointError(f"trial {trial.number}: the score is not finite")
        return value


def hyperparameter_objective(observed, params, setup, space: Optional[Mapping[str, object]] = None, *,
                             truth=None, truth_background=None, options: Optional[FitOptions] = None,
                             **overrides) -> HyperparameterObjective:
    """Objective factory of a hyperparameter sweep: ``observed``, ``params``, ``setup`` as for :func:`refine.fit`;
    ``space`` {name: choices | (low, high)} (default :data:`HYPER_SPACE`); ``truth`` the true ``Params`` of
    synthetic data (and ``truth_background``, its plane in photons/pixel) or None; ``options``/``overrides`` the
    base fit options.  Returns :class:`HyperparameterObjective`."""
    return HyperparameterObjective(observed, params, setup, fit_options(options, **overrides),
                                   HYPER_SPACE if space is None else space, truth, truth_background)
