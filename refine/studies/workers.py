"""Running studies: :func:`run_study` (worker processes sharing one storage, trials of dead processes marked FAIL,
one progress line per trial) and studies end to end, :func:`global_search` and :func:`hyperparameter_sweep`.
Public Optuna API only."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import multiprocessing
import os
import socket
import sys
import warnings
from typing import Callable, List, Mapping, NamedTuple, Optional

import torch

from ..pipeline.fit import fit_options
from ..pipeline.options import FitOptions
from ..pipeline.result import Result
from .objectives import (HYPER_SPACE, GlobalSearchObjective, finish_best, global_search_objective,
                         hyperparameter_objective, trial_stages)
from .storage import StudySpec, count_started, first_line, load_study, redact_text, require_optuna

#: Exceptions a trial may raise without stopping the study (the trial is marked FAIL).
TRIAL_ERRORS = (ValueError, RuntimeError, FloatingPointError, ArithmeticError)


def worker_id() -> str:
    """'host:pid' of this process (recorded on every trial it runs)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_orphaned_trials(study) -> List[int]:
    """Mark FAIL the RUNNING trials whose process is gone; returns their numbers.  Stale trials (no heartbeat for
    the grace period: RDB storages, any machine) by ``optuna.storages.fail_stale_trials``; those of a process of this
    machine that no longer exists (user attribute ``worker``) at once by ``study.tell`` (journals have no heartbeat)."""
    optuna = require_optuna()
    state = optuna.trial.TrialState
    running = study.get_trials(deepcopy=False, states=(state.RUNNING,))
    with warnings.catch_warnings():  # fail_stale_trials is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    for t in running:
        w_host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if w_host == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(RuntimeError):  # finished meanwhile (optuna's UpdateFinishedTrialError)
                study.tell(t.number, state=state.FAIL, skip_if_finished=True)
    failed = {t.number for t in study.get_trials(deepcopy=False, states=(state.FAIL,))}
    return [t.number for t in running if t.number in failed]


def best_or_none(study):
    """The best COMPLETE trial, or None when there is none."""
    try:
        return study.best_trial
    except ValueError:
        return None


def _progress(study, trial) -> None:
    """Optuna callback: one line on stderr per trial: number, state, (last reported) loss, best so far."""
    best = best_or_none(study)
    value = trial.intermediate_values.get(trial.last_step) if trial.value is None else trial.value
    text = f"trial {trial.number:4d} {trial.state.name:8s} loss {'-' if value is None else f'{value:.10g}'}"
    if best is not None:
        text += f"  best {best.value:.10g} (trial {best.number})"
    print(text, file=sys.stderr, flush=True)


def optimize(study, objective, n_trials: int, progress: bool = True) -> None:
    """``study.optimize`` for ``n_trials`` trials, each recording :func:`worker_id` as user attribute ``worker``; a
    trial raising one of :data:`TRIAL_ERRORS` is marked FAIL; one progress line per trial on stderr if ``progress``."""

    def recorded(trial):
        trial.set_user_attr("worker", worker_id())
        return objective(trial)

    study.optimize(recorded, n_trials=int(n_trials), catch=TRIAL_ERRORS,
                   callbacks=[_progress] if progress else None)


def _worker(make_objective, n_trials: int, spec: StudySpec, index: int, progress: bool, threads: int,
            n_existing: int) -> None:
    """Body of a worker process: run ``n_trials`` trials; an error is one line on stderr (password hidden), exit 1."""
    try:
        torch.set_num_threads(max(1, int(threads)))
        require_optuna().logging.set_verbosity(require_optuna().logging.WARNING)
        study = load_study(spec, worker=index, n_existing=n_existing)
        optimize(study, make_objective(), n_trials, progress)
    except Exception as exc:  # noqa: BLE001 - reported by the parent as a failed worker
        print(redact_text(f"worker {index} ({worker_id()}): {first_line(exc)}", spec.storage), file=sys.stderr,
              flush=True)
        sys.exit(1)


def run_study(make_objective: Callable[[], Callable], n_trials: int, spec: StudySpec, workers: int = 1,
              enqueue: Optional[Mapping[str, float]] = None, progress: bool = True, threads: Optional[int] = None,
              objective=None, attrs: Optional[Mapping[str, str]] = None):
    """Run ``n_trials`` more trials of the study ``spec`` in ``workers`` processes sharing its storage; returns it.
    ``make_objective()`` builds the objective in each worker (picklable: a functools.partial), ``objective`` serves
    this process; ``enqueue``: trial parameters run first, here, unless a trial has them; ``attrs``: recorded on a
    new study, matched by an existing one.  Orphaned trials are failed first.  ValueError naming ``n_trials``,
    ``workers`` (also > 1 without storage URL) or ``study_name`` (another problem's); RuntimeError: a worker failed."""
    for name, value in (("n_trials", n_trials), ("workers", workers)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if workers > 1 and spec.storage is None:
        raise ValueError("workers > 1 needs a storage URL that processes share (sqlite, journal, postgresql)")
    study = load_study(spec)
    for key, value in (attrs or {}).items():
        have = study.user_attrs.get(key)
        if have is None:
            study.set_user_attr(key, value)
        elif have != value:
            raise ValueError(f"study_name {study.study_name!r} already holds trials of another problem ({key} "
                             f"{have} here, {value} now: a different image, start, search or free set); "
                             "use another study_name")
    fail_orphaned_trials(study)
    n_existing = count_started(study)
    if enqueue is not None:
        study.enqueue_trial(dict(enqueue), skip_if_exists=True)
    waiting = study.get_trials(deepcopy=False, states=(require_optuna().trial.TrialState.WAITING,))
    here = n_trials if workers == 1 else min(1, len(waiting))
    # with workers, the enqueued start runs here first: optuna's pop of a waiting trial is not atomic on SQLite, and
    # two worker processes could both run it (the second then fails with "Cannot tell a COMPLETE trial")
    if here:
        optimize(study, objective if objective is not None else make_objective(), here, progress)
    ctx = multiprocessing.get_context("spawn")
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    rest = n_trials - here
    shares = [rest // workers + (k < rest % workers) for k in range(workers)]  # the first workers get one more
    procs = [ctx.Process(target=_worker, args=(make_objective, n, spec, k, progress, threads, n_existing))
             for k, n in enumerate(shares) if n]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(procs)} worker processes failed (exit status {bad[0]})")
    return study


def _factory(factory, options: FitOptions, *args, **kwargs):
    """``factory(*args, **kwargs)`` with the fit's ``options`` as a partial that pickles (for worker processes)."""
    fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    fields.update({name: dict(fields[name]) for name in ("bounds", "priors") if fields[name] is not None})
    return functools.partial(factory, *args, **kwargs, **fields)


class SearchOutcome(NamedTuple):
    """What :func:`global_search` found: the study, the best trial's number, its refined Result, the objective."""

    study: object
    trial: int
    result: Result
    objective: GlobalSearchObjective


def global_search(observed, params, setup, search: Mapping[str, float], n_trials: int = 50, *,
                  spec: Optional[StudySpec] = None, workers: int = 1, options: Optional[FitOptions] = None,
                  iterations: int = 4, progress: bool = False, threads: Optional[int] = None,
                  **overrides) -> SearchOutcome:
    """Search starting models in a box about ``params`` (``search`` as for :func:`global_search_objective`, the
    user's start enqueued) in ``n_trials`` trials of ``iterations`` per stage, on ``spec`` (default in memory, TPE
    seeded 0, median pruner) in ``workers`` processes, and refine the best; ``options``/``overrides`` the fit's
    options.  Returns :class:`SearchOutcome`; RuntimeError when no trial completed."""
    stages = trial_stages(iterations)
    make = _factory(global_search_objective, fit_options(options, **overrides), observed, params, setup,
                    dict(search), stages=stages)
    objective = make()
    spec = dataclasses.replace(spec or StudySpec(), n_steps=len(stages))
    study = run_study(make, n_trials, spec, workers=workers, enqueue=objective.start_params(), progress=progress,
                      threads=threads, objective=objective, attrs={"problem": objective.fingerprint()})
    best = best_or_none(study)
    if best is None:
        raise RuntimeError("no trial of the study completed: nothing to refine (see the FAIL/PRUNED trials)")
    return SearchOutcome(study, best.number, finish_best(study, objective), objective)


def hyperparameter_sweep(observed, params, setup, n_trials: int, space: Optional[Mapping[str, object]] = None, *,
                         truth=None, truth_background=None, spec: Optional[StudySpec] = None, workers: int = 1,
                         progress: bool = False, threads: Optional[int] = None, options: Optional[FitOptions] = None,
                         **overrides):
    """:func:`hyperparameter_objective` as a study of ``n_trials`` fits in ``workers`` processes on ``spec``
    (default in memory, TPE seeded 0; no pruning).  Returns the study (``study.best_params``)."""
    space = HYPER_SPACE if space is None else dict(space)
    make = _factory(hyperparameter_objective, fit_options(options, **overrides), observed, params, setup, space,
                    truth=truth, truth_background=truth_background)
    spec = dataclasses.replace(spec or StudySpec(study_name="nbtorch-hyperparameters"), pruner="none")
    return run_study(make, n_trials, spec, workers=workers, progress=progress, threads=threads, objective=make())
