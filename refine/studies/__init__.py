"""Optuna studies over refinements: global search beyond the local basin, and hyperparameter sweeps.

    from refine import studies
    found = studies.global_search(observed, params, setup, {"orientation": 5.0}, n_trials=40,
                                  free=("orientation", "scale"), spec=studies.StudySpec("sqlite:///search.db"))
    print(found.result.summary())             # the best trial's model refined to convergence, with ESDs

Modules: :mod:`.objectives` (objective factories, no storage or process), :mod:`.storage` (URLs, their passwords
hidden, samplers, pruners, :class:`StudySpec`), :mod:`.workers` (:func:`run_study`, :func:`global_search`,
:func:`hyperparameter_sweep`), :mod:`.plots`.  Optuna (``pip install 'nbtorch[optuna]'``) is imported when needed.
"""
from ..model.table import DEFAULT_RANGES, SEARCH_SUFFIX, SEARCH_UNITS  # noqa: F401
from . import plots as study_plots  # noqa: F401  (the module's former name)
from .objectives import (CONDITIONS, HYPER_SPACE, Dimension, GlobalSearchObjective,  # noqa: F401
                         HyperparameterObjective, check_search_name, finish_best, global_search_objective,
                         hyperparameter_objective, parse_search, trial_stages)
from .plots import importances, plot_history, plot_importances, plot_surface, surface_parameters  # noqa: F401
from .storage import (CONNECT_TIMEOUT, PRUNERS, SAMPLERS, STORAGE_FORMS, StudySpec,  # noqa: F401
                      check_connect_timeout, count_started, load_study, make_pruner, make_sampler, normalise_url,
                      open_storage, redact, redact_text, require_optuna, storage_kind)
from .workers import (TRIAL_ERRORS, SearchOutcome, _worker, best_or_none, fail_orphaned_trials,  # noqa: F401
                      global_search, hyperparameter_sweep, optimize, run_study, worker_id)
