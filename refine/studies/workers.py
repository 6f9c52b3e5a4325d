"""Running a study: :func:`run_study` shares trials among worker processes on one storage, every trial records the
process that ran it (user attribute ``worker`` = 'host:pid'), trials whose process is gone are marked FAIL
(:func:`fail_orphaned_trials`), a failing trial does not stop the study, and one progress line per trial goes to
stderr.  Public Optuna API only."""
from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import warnings
from typing import Callable, List, Mapping, Optional

import torch

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
    """Mark FAIL the RUNNING trials whose process is gone; returns their numbers.

    Stale trials (no heartbeat for the storage's grace period: RDB storages, any machine) are failed by Optuna's
    ``optuna.storages.fail_stale_trials``; trials started by a process of this machine that no longer exists (the
    user attribute ``worker`` = 'host:pid') are told FAIL at once with ``study.tell`` (journal storages keep no
    heartbeats, and a killed run is re-run sooner than a grace period)."""
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
            try:
                study.tell(t.number, state=state.FAIL, skip_if_finished=True)
            except RuntimeError:  # finished by its process meanwhile (optuna's UpdateFinishedTrialError)
                pass
    failed = {t.number for t in study.get_trials(deepcopy=False, states=(state.FAIL,))}
    return [t.number for t in running if t.number in failed]


def best_or_none(study):
    """The best COMPLETE trial, or None when there is none."""
    try:
        return study.best_trial
    except ValueError:
        return None


class TrialProgress:
    """Optuna callback printing one line per finished trial: number, state, loss (the last reported one for a
    pruned trial), best so far and its trial."""

    def __init__(self, stream=None):
        self.stream = stream

    def __call__(self, study, trial) -> None:
        def fmt(v) -> str:
            return "-" if v is None else f"{v:.10g}"

        best, value = best_or_none(study), trial.value
        value = trial.intermediate_values.get(trial.last_step) if value is None else value  # pruned: last reported
        text = f"trial {trial.number:4d} {trial.state.name:8s} loss {fmt(value)}"
        if best is not None:
            text += f"  best {fmt(best.value)} (trial {best.number})"
        print(text, file=self.stream or sys.stderr, flush=True)


def optimize(study, objective, n_trials: int, progress: bool = True) -> None:
    """``study.optimize`` for ``n_trials`` trials, each recording :func:`worker_id` as its user attribute
    ``worker``; a trial raising one of :data:`TRIAL_ERRORS` is marked FAIL and the study goes on; one progress line
    per trial on stderr unless ``progress`` is False."""

    def recorded(trial):
        trial.set_user_attr("worker", worker_id())
        return objective(trial)

    study.optimize(recorded, n_trials=int(n_trials), catch=TRIAL_ERRORS,
                   callbacks=[TrialProgress()] if progress else None)


def _worker(make_objective, n_trials: int, spec: StudySpec, index: int, progress: bool, threads: int,
            n_existing: int) -> None:
    """Body of a worker process: load the study, build the objective, run ``n_trials`` trials.  An error is one
    line on stderr (the storage's password hidden) and exit status 1."""
    try:
        torch.set_num_threads(max(1, int(threads)))
        require_optuna().logging.set_verbosity(require_optuna().logging.WARNING)
        study = load_study(spec, worker=index, n_existing=n_existing)
        optimize(study, make_objective(), n_trials, progress)
    except Exception as exc:  # noqa: BLE001 - reported by the parent as a failed worker
        print(redact_text(f"worker {index} ({worker_id()}): {first_line(exc)}", spec.storage), file=sys.stderr,
              flush=True)
        sys.exit(1)


def split_trials(n_trials: int, workers: int) -> List[int]:
    """Trials per worker: ``n_trials`` shared as evenly as possible (the first ones get one more)."""
    return [n_trials // workers + (1 if k < n_trials % workers else 0) for k in range(workers)]


def ensure_study_attrs(study, attrs: Mapping[str, str]) -> None:
    """Record ``attrs`` on a new study; on an existing one, ValueError naming ``study_name`` and the first
    attribute that differs (trials of different problems do not compare)."""
    have = study.user_attrs
    for key, value in attrs.items():
        if key in have and have[key] != value:
            raise ValueError(f"study_name {study.study_name!r} already holds trials of another problem ({key} "
                             f"{have[key]} here, {value} now: a different image, start, search or free set); "
                             "use another study_name")
        if key not in have:
            study.set_user_attr(key, value)


def run_study(make_objective: Callable[[], Callable], n_trials: int, spec: StudySpec, workers: int = 1,
              enqueue: Optional[Mapping[str, float]] = None, progress: bool = True, threads: Optional[int] = None,
              objective=None, attrs: Optional[Mapping[str, str]] = None):
    """Run ``n_trials`` more trials of the study ``spec`` in ``workers`` processes sharing its storage; returns it.

    ``make_objective()`` builds the objective in each worker process (picklable when ``workers`` > 1, e.g. a
    functools.partial of a factory); ``objective``, when given, serves this process.  ``enqueue``: trial parameters
    run first unless a trial has them (the user's start; with workers it runs here first, so that it runs once);
    ``attrs``: what an existing study must match (:func:`ensure_study_attrs`).  Trials whose process is gone are
    marked FAIL first (:func:`fail_orphaned_trials`).  ValueError naming ``n_trials`` or ``workers`` (bad counts,
    ``workers`` > 1 without a storage URL); RuntimeError when a worker process fails.
    """
    for name, value in (("n_trials", n_trials), ("workers", workers)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if workers > 1 and spec.storage is None:
        raise ValueError("workers > 1 needs a storage URL that processes share (sqlite, journal, postgresql)")
    study = load_study(spec)
    ensure_study_attrs(study, attrs or {})
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
    procs = [ctx.Process(target=_worker, args=(make_objective, n, spec, k, progress, threads, n_existing), daemon=False)
             for k, n in enumerate(split_trials(n_trials - here, workers)) if n]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(procs)} worker processes failed (exit status {bad[0]})")
    return study
