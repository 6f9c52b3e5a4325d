"""Studies end to end: :func:`global_search` (search starting models in a box, refine the best) and
:func:`hyperparameter_sweep` (fits with sampled hyperparameters): an objective factory of
:mod:`refine.studies.objectives`, built here and in every worker process, run by
:func:`~refine.studies.workers.run_study`."""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, NamedTuple, Optional

from ..pipeline.fit import fit_options
from ..pipeline.options import FitOptions
from ..pipeline.result import Result
from .objectives import (HYPER_SPACE, GlobalSearchObjective, best_x, finish_best, global_search_objective,
                         hyperparameter_objective, trial_stages)
from .storage import StudySpec
from .workers import best_or_none, run_study


def option_fields(options: FitOptions) -> dict:
    """The fields of ``options`` as keyword arguments that pickle (bounds and priors as plain dicts), so that a
    factory partial can travel to worker processes."""
    out = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    for name in ("bounds", "priors"):
        if out[name] is not None:
            out[name] = dict(out[name])
    return out


def _factories(factory, args: tuple, kwargs: dict, options: FitOptions):
    """(the objective ``factory(*args, **kwargs)`` with the fit's ``options``, built in this process; a picklable
    partial building the same in a worker process)."""
    return (factory(*args, options=options, **kwargs),
            functools.partial(factory, *args, **kwargs, **option_fields(options)))


class SearchOutcome(NamedTuple):
    """What :func:`global_search` found: ``study``, ``trial`` (best trial number), ``result`` (its model refined to
    convergence, :class:`refine.Result`), ``objective`` (:class:`GlobalSearchObjective`)."""

    study: object
    trial: int
    result: Result
    objective: GlobalSearchObjective


def global_search(observed, params, setup, search: Mapping[str, float], n_trials: int = 50, *,
                  spec: Optional[StudySpec] = None, workers: int = 1, options: Optional[FitOptions] = None,
                  iterations: int = 4, progress: bool = False, threads: Optional[int] = None,
                  **overrides) -> SearchOutcome:
    """Search starting models in a box about ``params`` and refine the best (see :mod:`refine.studies`).

    ``search`` as for :func:`global_search_objective` (degrees, percent, mm, pixels); ``spec`` the storage, study
    name, sampler and pruner (:class:`StudySpec`, default in memory, TPE seeded 0, median pruner); ``workers``
    processes; ``iterations`` per stage of each trial; ``options``/``overrides`` the fit's options (``free`` ...).
    The user's start is trial 0 (enqueued).  Returns :class:`SearchOutcome`; RuntimeError when no trial completed.
    """
    stages = trial_stages(iterations)
    objective, make = _factories(global_search_objective, (observed, params, setup, dict(search)),
                                 {"stages": stages}, fit_options(options, **overrides))
    spec = dataclasses.replace(spec or StudySpec(), n_steps=len(stages))
    study = run_study(make, n_trials, spec, workers=workers, enqueue=objective.start_params(), progress=progress,
                      threads=threads, objective=objective, attrs={"problem": objective.fingerprint()})
    if best_or_none(study) is None:
        raise RuntimeError("no trial of the study completed: nothing to refine (see the FAIL/PRUNED trials)")
    return SearchOutcome(study, best_x(study, objective)[0], finish_best(study, objective), objective)


def hyperparameter_sweep(observed, params, setup, n_trials: int, space: Optional[Mapping[str, object]] = None, *,
                         truth=None, truth_background=None, spec: Optional[StudySpec] = None, workers: int = 1,
                         progress: bool = False, threads: Optional[int] = None, options: Optional[FitOptions] = None,
                         **overrides):
    """Run a hyperparameter sweep (:func:`hyperparameter_objective`) as a study: ``n_trials`` fits in ``workers``
    processes on ``spec``'s storage (default in memory, TPE seeded 0; no pruning, as the fits report no
    intermediate values).  Returns the study; ``study.best_params`` are the best hyperparameters."""
    space = HYPER_SPACE if space is None else dict(space)
    objective, make = _factories(hyperparameter_objective, (observed, params, setup, space),
                                 {"truth": truth, "truth_background": truth_background},
                                 fit_options(options, **overrides))
    spec = dataclasses.replace(spec or StudySpec(study_name="nbtorch-hyperparameters"), pruner="none")
    return run_study(make, n_trials, spec, workers=workers, progress=progress, threads=threads, objective=objective)
