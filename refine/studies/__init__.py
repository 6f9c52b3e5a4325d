"""Optuna studies over refinements: global search beyond the local basin, and hyperparameter sweeps.

    from refine import studies
    found = studies.global_search(observed, params, setup, {"orientation": 5.0}, n_trials=40,
                                  free=("orientation", "scale"), spec=studies.StudySpec("sqlite:///search.db"))
    print(found.result.summary())             # the best trial's model refined to convergence, with ESDs

    objective = studies.global_search_objective(observed, params, setup, {"orientation": 5.0})
    objective(optuna.trial.FixedTrial({"orientation.x_deg": 1.0, "orientation.y_deg": 0, "orientation.z_deg": 0}))

Local refinement (:func:`refine.fit`) converges only from close starts.  A global search samples starting models
in a box about the user's start (:data:`SEARCH_UNITS`: orientation ± degrees, cell lengths ± percent, distance
± mm, beam centre ± pixels; the user's start is trial 0), runs a short coarse-to-fine refinement from each
(:func:`trial_stages`), reports the loss after every stage to the pruner, scores every trial by its refined model's
loss on all usable pixels (so losses compare) and refines the best to convergence (:func:`finish_best`).  A
hyperparameter sweep (:func:`hyperparameter_objective`, :func:`hyperparameter_sweep`) samples minimiser, damping /
learning rate, schedule, target, spot-ROI size and oversample, scored on the data or against a known truth.

Modules: :mod:`.objectives` (objective factories, no storage or process), :mod:`.storage` (SQLite, journal or
PostgreSQL storages; passwords never shown: :func:`redact`, :func:`redact_text`; :data:`CONNECT_TIMEOUT`;
samplers, pruners, :class:`StudySpec`), :mod:`.workers` (:func:`run_study`: worker processes on one storage, stale
and orphaned trials marked FAIL, progress), :mod:`.sweeps` (:func:`global_search`, :func:`hyperparameter_sweep`),
:mod:`.plots`.  Errors name the Python argument (``search``, ``storage`` ...).  Optuna is an optional dependency
(``pip install 'nbtorch[optuna]'``), imported when a function needs it.
"""
from ..model.table import DEFAULT_RANGES, SEARCH_SUFFIX, SEARCH_UNITS  # noqa: F401
from . import plots as study_plots  # noqa: F401  (the module's former name)
from .objectives import (CONDITIONS, HYPER_SPACE, Dimension, GlobalSearchObjective,  # noqa: F401
                         HyperparameterObjective, best_x, check_search_name, check_space, finish_best,
                         global_search_objective, hyperparameter_objective, parse_search, search_dimensions,
                         suggest_hyperparameters, trial_stages)
from .plots import importances, plot_history, plot_importances, plot_surface, surface_parameters  # noqa: F401
from .storage import (CONNECT_TIMEOUT, PRUNERS, SAMPLERS, STORAGE_FORMS, StudySpec,  # noqa: F401
                      check_connect_timeout, count_started, load_study, make_pruner, make_sampler, normalise_url,
                      open_storage, redact, redact_text, require_optuna, storage_kind)
from .workers import SearchOutcome, global_search, hyperparameter_sweep  # noqa: F401
from .workers import (TRIAL_ERRORS, _worker, best_or_none,  # noqa: F401
                      fail_orphaned_trials, optimize, run_study, worker_id)
