"""Optuna studies over refinements: global search beyond the local basin, and hyperparameter sweeps.

    from refine import studies
    found = studies.global_search(observed, params, setup, {"orientation": 5.0}, n_trials=40,
                                  free=("orientation", "scale"), spec=studies.StudySpec("sqlite:///search.db"))
    print(found.result.summary())             # the best trial's model refined to convergence, with ESDs

A global search samples starting models in a box about the user's start (:data:`SEARCH_UNITS`; the start is trial
0), runs a short coarse-to-fine refinement from each, reports the loss after every stage to the pruner and refines
the best to convergence.  A hyperparameter sweep samples the fit's own settings.  Modules: :mod:`.objectives`
(objective factories, no storage or process), :mod:`.storage` (storage URLs and their passwords, samplers, pruners,
:class:`StudySpec`), :mod:`.workers` (:func:`run_study` in worker processes, :func:`global_search`,
:func:`hyperparameter_sweep`), :mod:`.plots`.  Errors name the Python argument.  Optuna is an optional dependency
(``pip install 'nbtorch[optuna]'``), imported when a function needs it.
"""
from ..model.table import DEFAULT_RANGES, SEARCH_SUFFIX, SEARCH_UNITS  # noqa: F401
from . import plots as study_plots  # noqa: F401  (the module's former name)
from .objectives import (CONDITIONS, HYPER_SPACE, Dimension, GlobalSearchObjective,  # noqa: F401
                         HyperparameterObjective, check_search_name, check_space, finish_best,
                         global_search_objective, hyperparameter_objective, parse_search, search_dimensions,
                         suggest_hyperparameters, trial_stages)
from .plots import importances, plot_history, plot_importances, plot_surface, surface_parameters  # noqa: F401
from .storage import (CONNECT_TIMEOUT, PRUNERS, SAMPLERS, STORAGE_FORMS, StudySpec,  # noqa: F401
                      check_connect_timeout, count_started, load_study, make_pruner, make_sampler, normalise_url,
                      open_storage, redact, redact_text, require_optuna, storage_kind)
from .workers import (TRIAL_ERRORS, SearchOutcome, _worker, best_or_none, fail_orphaned_trials,  # noqa: F401
                      global_search, hyperparameter_sweep, optimize, run_study, worker_id)
