"""``nbtorch-sweep``: a global search (an Optuna study, :mod:`refine.studies`) of starting models about a nanoBragg
model, then the best refined to convergence (:data:`USAGE`; options: :mod:`refine.cli.table`; its JSON:
:func:`summary`; storage and exit statuses: docs/refine.md).  The password of ``--storage`` is never printed."""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from typing import List, Optional, Sequence

import torch

from nbtorch.args import build, parse_args
from nbtorch.io._atomic import atomic_write

from .. import studies
from ..targets.observed import read_observed
from .checks import UsageError, check_outputs, fit_status, flag_inputs, matrix_output, run
from .table import PLOT_NAMES, arguments, flag_message, start, usage

#: Exit status (:mod:`refine.cli.checks` has the shared ones): the study failed (no trial completed, a worker process
#: died) or an output could not be written.
EXIT_FAILED = 1
#: The largest ``--seed``: NumPy seeds are below 2**32, and worker k seeds its sampler with seed + k.
MAX_SEED = 2 ** 32 - 1
USAGE = ("nbtorch-sweep OBSERVED " + usage("sweep", "--search", "--n-trials", "--workers", "--storage", "--study-name",
                                          "--sampler", "--pruner", "--json", "--plots")
         + " <nanoBragg flags of the start>")
EPILOG = (f"Storage: {studies.STORAGE_FORMS}.  Example:\n  nbtorch-sweep obs.img --search orientation:5,beam_center:10 "
          "--n-trials 60 --json sweep.json -cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -default_F 100 -distance 60 "
          "-detpixels 96 -pixel 0.2")


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


def _said(problem, ns) -> str:
    """The message of ``problem`` (its first line, else its exception type's name) with flags for Python names
    (:func:`~refine.cli.table.flag_message`) and the password of ``--storage`` hidden."""
    text = str(problem).strip()
    text = text.splitlines()[0] if text else type(problem).__name__
    return studies.redact_text(flag_message(text, "sweep"), ns.storage)


def _run(argv: List[str]) -> int:
    """Check every option and the outputs (``--json``, the refined matrix of a ``-mat`` start, the ``--plots``
    folder), load the data, run the study, refine the best, write the outputs; the exit status."""
    ns, flags = start(argv, "sweep", prog="nbtorch-sweep", usage=USAGE, epilog=EPILOG, description="Global search of "
                      "starting models (an Optuna study) about a nanoBragg model, then a full refinement of the best.")
    if not 0 <= ns.seed <= MAX_SEED - (ns.workers - 1):
        raise UsageError(f"--seed must be an integer in [0, {MAX_SEED - (ns.workers - 1)}] (with --workers "
                         f"{ns.workers}); got {ns.seed}")
    kw = arguments(ns, "sweep")
    inputs = flag_inputs(flags)
    matrix_out = matrix_output(ns.json) if any(flag == "-mat" for flag, _ in inputs) else None
    check_outputs([("--json", ns.json), ("--json (refined -mat)" if ns.json else "refined matrix", matrix_out)],
                  [("OBSERVED", ns.observed)] + inputs, folder=("--plots", ns.plots, PLOT_NAMES))
    t0 = time.perf_counter()
    database = os.path.abspath((os.path.splitext(ns.json)[0] if ns.json else "nbtorch-sweep") + ".db")
    try:  # --search, the storage, the flags, the image: the user's
        optuna = studies.require_optuna()
        search = studies.parse_search(ns.search)
        spec = studies.StudySpec(**dict(arguments(ns, "sweep", "StudySpec"), storage=ns.storage or
                                        f"sqlite:///{database}"))
        params, setup, extras = build(parse_args(flags), dtype=getattr(torch, ns.dtype))
        obs = read_observed(ns.observed, setup, params, adc=ns.adc, gain=ns.gain,
                            geometry=extras.panels.geometry if extras.panels is not None else None)
        studies.open_storage(spec.storage, connect_timeout=spec.connect_timeout)  # reachable? (before any trial)
    except (ValueError, OSError, ImportError) as exc:
        raise UsageError(_said(exc, ns)) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kw["free"] = tuple(kw.get("free") or dict.fromkeys([n.split(".")[0] for n in search] + ["scale"]))
    try:
        outcome = studies.global_search(obs, params, setup, search, ns.n_trials, spec=spec, workers=ns.workers,
                                        iterations=ns.trial_iter, progress=not ns.quiet, threads=ns.threads,
                                        nanobragg_args=flags, matrix_path=matrix_out, **kw)
        if matrix_out is not None:  # a -mat model is written back with a new MOSFLM matrix
            outcome.result.to_nanobragg_args(matrix_path=matrix_out, write_matrix=True)
    except KeyboardInterrupt:
        print(f"nbtorch-sweep: interrupted; the finished trials are kept in {studies.redact(spec.storage)} (run the "
              "same command again to add trials)", file=sys.stderr)
        return 130
    except ValueError as exc:  # the options (groups, degeneracy ...)
        raise UsageError(_said(exc, ns)) from None
    except (OSError, RuntimeError) as exc:
        print(f"nbtorch-sweep: {_said(exc, ns)}", file=sys.stderr)
        return EXIT_FAILED
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``nbtorch-sweep`` (returns the exit status)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run("nbtorch-sweep", lambda: _run(argv), lambda exc: f"nbtorch-sweep: {exc}", signals=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
