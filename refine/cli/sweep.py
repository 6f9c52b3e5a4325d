"""``nbtorch-sweep``: a global search (Optuna study) of starting models about a nanoBragg model (:data:`USAGE`;
options: :mod:`refine.cli.table`).

Each trial starts a short coarse-to-fine refinement from a model sampled in the ``--search`` box; the best trial's
model is then refined to convergence and written as JSON (``nanobragg_args``, ``loss``, ``trial``, ``n_trials``,
``parameters``, ``esd`` …).  The study lives in ``--storage`` (default: an SQLite file next to ``--json``, else
``nbtorch-sweep.db``); re-running with the same storage and study name adds trials to it, and the same command on
other machines with a ``postgresql://`` URL joins it (a server must answer within ``--storage-timeout`` seconds,
default 10; its password is never printed).  One progress line per trial goes to stderr.

Exit status: 0 done, 1 the study failed (no trial completed, a worker process died) or an output could not be
written, 2 a user error (an option, --search, --storage, OBSERVED, the flags: one line naming it, nothing done),
3 the best model's refinement did not converge, 4 it converged but is a poor fit (χ²/ν of a likelihood target
outside [1/3, 3], as ``nbtorch-refine``; e.g. an image in counts, not photons: ``--adc``/``--gain``), 130
interrupted (finished trials stay in the storage).  The observed image is converted to photons as by
``nbtorch-refine``: (value − ``--adc``)/``--gain``, else the header's ``ADC_OFFSET``/``GAIN``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from typing import List, Optional, Sequence

import torch

import nbtorch
from nbtorch.interrupt import one_line_warnings
from nbtorch.io._atomic import atomic_write
from nbtorch.io.safe_output import check_output_folder

from .. import fit_options, studies
from ..targets.observed import read_observed
from .checks import EXIT_USAGE, UsageError, check_outputs, fit_status, flag_inputs, free_groups
from .table import arguments, check_values, flag_message, parser, split_argv

#: Exit statuses (:mod:`refine.cli.checks` has the shared ones): the study failed (no trial completed, a worker
#: process died) or an output could not be written.
EXIT_FAILED = 1
USAGE = ("nbtorch-sweep OBSERVED --search GROUP:RANGE[,GROUP:RANGE...] --n-trials N [--workers N] [--storage URL] "
         "[--study-name NAME] [--sampler tpe|cmaes|gp|random] [--pruner median|hyperband|none] [--json OUT] "
         "[--plots DIR] <nanoBragg flags of the start>")


def _parser():
    return parser("sweep", prog="nbtorch-sweep", usage=USAGE, description="Global search of starting models (an "
                  "Optuna study) about a nanoBragg model, then a full refinement of the best.", epilog=(
                      "Ranges: orientation degrees, cell percent, distance mm, beam_center pixels.  Storage: "
                      f"{studies.STORAGE_FORMS}.  Example:\n  nbtorch-sweep obs.img --search orientation:5,"
                      "beam_center:10 --n-trials 60 --json sweep.json -cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 "
                      "-default_F 100 -distance 60 -detpixels 96 -pixel 0.2"))


def default_storage(ns) -> str:
    """``--storage``, or an SQLite file next to ``--json`` (its stem + .db), or ./nbtorch-sweep.db."""
    if ns.storage:
        return ns.storage
    stem = os.path.splitext(ns.json)[0] if ns.json else "nbtorch-sweep"
    return "sqlite:///" + os.path.abspath(stem + ".db")


#: The largest ``--seed``: NumPy seeds are below 2**32, and worker k seeds its sampler with seed + k.
MAX_SEED = 2 ** 32 - 1


def _usage_checks(ns, flags) -> Optional[str]:
    """A usage error message naming the option and its allowed values, or None (before any work)."""
    if not flags:
        return "give the starting model as nanoBragg flags after OBSERVED (see --help)"
    if not os.path.isfile(ns.observed):
        return f"OBSERVED {ns.observed}: no such file"
    try:
        check_values(ns, "sweep")
    except UsageError as exc:
        return str(exc)
    if not 0 <= ns.seed <= MAX_SEED - (ns.workers - 1):
        return f"--seed must be an integer in [0, {MAX_SEED - (ns.workers - 1)}] (with --workers {ns.workers}); " \
               f"got {ns.seed}"
    try:
        if ns.refine is not None:
            fit_options(free=_free(ns, {}))
    except (UsageError, ValueError) as exc:
        return (f"--refine {ns.refine!r}: " if str(exc).startswith("unknown") else "") + str(exc)
    return None


def _free(ns, search) -> List[str]:
    """The free groups: ``--refine``'s (comma or space separated; :class:`~refine.cli.checks.UsageError` when
    empty), else the searched groups and scale."""
    if ns.refine is not None:
        return free_groups(ns.refine)
    return list(dict.fromkeys([n.split(".")[0] for n in search] + ["scale"]))


def summary(outcome, spec, flags, n_run: int) -> dict:
    """The JSON of a sweep: the contract keys ``nanobragg_args`` (best refined model as flags), ``loss`` (its loss on
    all usable pixels), ``trial`` (best trial number), ``n_trials`` (trials in the study, every state),
    ``parameters``, ``esd``; and ``study_name``, ``storage`` (password hidden), ``states`` (count per state),
    ``n_trials_run`` (this command's), ``best_start`` (the best trial's sampled start), ``converged``, ``ok``,
    ``chi2_nu``, ``poor_fit`` (the best model's fit, as :class:`refine.Result`: ``poor_fit`` null or why it is poor),
    ``refined`` (the full refinement's JSON)."""
    res, study = outcome.result, outcome.study
    refined = res.to_dict()
    trials = study.get_trials(deepcopy=False)
    return {
        "nanobragg_args": refined["nanobragg_args"], "loss": float(res.loss_all), "trial": int(outcome.trial),
        "n_trials": len(trials), "parameters": refined["parameters"], "esd": refined["esd"],
        "study_name": spec.study_name, "storage": studies.redact(spec.storage), "n_trials_run": int(n_run),
        "states": dict(Counter(t.state.name for t in trials)),
        "best_start": dict(study.trials[outcome.trial].params), "converged": bool(res.converged),
        "ok": refined["ok"], "chi2_nu": refined["chi2_nu"], "poor_fit": refined["poor_fit"],
        "start_flags": list(flags), "refined": refined,
    }


#: The figures ``--plots DIR`` holds (surface.png only with two or more searched parameters).
PLOT_NAMES = ("history.png", "importances.png", "surface.png")


def write_plots(study, directory: str) -> List[str]:
    """history.png, importances.png and (with two or more searched parameters) surface.png in ``directory``, each
    written atomically under the safe-output rule (as every figure: :func:`refine.pipeline.plots._save`)."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, n) for n in PLOT_NAMES]
    studies.plot_history(study, paths[0])
    studies.plot_importances(study, paths[1])
    try:
        studies.plot_surface(study, path=paths[2])
    except ValueError:
        paths.pop()
    return paths


def matrix_path(ns, flags) -> Optional[str]:
    """Where the refined MOSFLM matrix of a ``-mat`` start goes (next to ``--json``, else refined.mat); None for a
    ``-cell`` start."""
    if not any(flag == "-mat" for flag, _ in flag_inputs(flags)):
        return None
    return (os.path.splitext(ns.json)[0] + ".mat") if ns.json else "refined.mat"


def output_problem(ns, flags) -> Optional[str]:
    """The safe-output rule before the study runs (:func:`refine.cli.checks.check_outputs`): ``--json``, the refined
    matrix of a ``-mat`` start and the ``--plots`` folder and figures are not OBSERVED, a file of the flags or each
    other, and can be written.  The message (naming the option), or None."""
    outputs = [("--json", ns.json), ("--json (refined -mat)" if ns.json else "refined matrix", matrix_path(ns, flags))]
    try:
        if ns.plots is not None and check_output_folder("--plots", ns.plots):
            outputs += [("--plots", os.path.join(ns.plots, n)) for n in PLOT_NAMES]
        check_outputs(outputs, [("OBSERVED", ns.observed)] + flag_inputs(flags))
    except (UsageError, ValueError) as exc:
        return str(exc)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``nbtorch-sweep`` (returns the exit status)."""
    ours, flags = split_argv(list(sys.argv[1:] if argv is None else argv), "sweep")
    one_line_warnings("nbtorch-sweep")  # e.g. OBSERVED's header against the flags
    try:
        ns = _parser().parse_args(ours)
    except UsageError as exc:
        print(f"nbtorch-sweep: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    problem = _usage_checks(ns, flags) or output_problem(ns, flags)
    if problem is None:
        try:
            studies.require_optuna()
            search = studies.parse_search(ns.search)
            spec = studies.StudySpec(**dict(arguments(ns, "sweep", "StudySpec"), storage=default_storage(ns)))
        except (ValueError, ImportError) as exc:
            problem = str(exc)
    if problem:
        print(_said(problem, ns), file=sys.stderr)
        return EXIT_USAGE
    return _run(ns, flags, search, spec)


def _said(problem, ns) -> str:
    """The line that reports ``problem`` (an exception: the first line of its message, else its type's name): Python
    names written as flags (:func:`~refine.cli.table.flag_message`), the password of ``--storage`` hidden."""
    text = str(problem).strip()
    text = text.splitlines()[0] if text else type(problem).__name__
    return studies.redact_text(f"nbtorch-sweep: {flag_message(text, 'sweep')}", ns.storage)


def _run(ns, flags, search, spec) -> int:
    """Load the data, run the study, refine the best, write the outputs."""
    if ns.threads:
        torch.set_num_threads(int(ns.threads))
    studies.require_optuna().logging.set_verbosity(studies.require_optuna().logging.WARNING)
    t0 = time.perf_counter()
    free = _free(ns, search)
    try:
        params, setup = nbtorch.from_nanobragg_args(flags, dtype=getattr(torch, ns.dtype))
        obs = read_observed(ns.observed, setup, params, adc=ns.adc, gain=ns.gain)
        studies.open_storage(spec.storage, connect_timeout=spec.connect_timeout)  # reachable? (before any trial)
    except (ValueError, OSError, ImportError) as exc:  # the image, the flags or --storage: the user's
        print(_said(exc, ns), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nbtorch-sweep: interrupted before the study started", file=sys.stderr)
        return 130
    try:
        matrix_out = matrix_path(ns, flags)  # a -mat model is written back with a new MOSFLM matrix
        outcome = studies.global_search(
            obs, params, setup, search, ns.n_trials, spec=spec, workers=ns.workers, iterations=ns.trial_iter,
            progress=not ns.quiet, threads=ns.threads, **dict(arguments(ns, "sweep"), free=tuple(free),
                                                              nanobragg_args=flags, matrix_path=matrix_out))
        if matrix_out is not None:
            outcome.result.to_nanobragg_args(matrix_path=matrix_out, write_matrix=True)
    except KeyboardInterrupt:
        print(f"nbtorch-sweep: interrupted; the finished trials are kept in {studies.redact(spec.storage)} (run the "
              "same command again to add trials)", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:  # ValueError: the options (groups, degeneracy ...)
        print(_said(exc, ns), file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILED
    print(outcome.result.summary())
    print(f"best trial {outcome.trial} of {len(outcome.study.trials)} in study {spec.study_name!r} "
          f"({studies.redact(spec.storage)})")
    data = summary(outcome, spec, flags, ns.n_trials)
    if data["nanobragg_args"]:
        print("refined model: nbtorch " + " ".join(data["nanobragg_args"]))
    if ns.json:
        atomic_write(ns.json, (json.dumps(data, indent=2, allow_nan=True) + "\n").encode())
    if ns.plots:
        write_plots(outcome.study, ns.plots)
    if not ns.quiet:
        print(f"total {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return fit_status(outcome.result.converged, outcome.result.ok)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
