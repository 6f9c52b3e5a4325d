"""``nbtorch-sweep``: a global search (Optuna study) of starting models about a nanoBragg model.

    nbtorch-sweep OBSERVED --search GROUP:RANGE[,GROUP:RANGE...] --n-trials N [--workers N] [--storage URL]
                  [--study-name NAME] [--sampler tpe|cmaes|gp|random] [--pruner median|hyperband|none] [--json OUT]
                  [--plots DIR] [--storage-timeout SECONDS] [more --options] <nanoBragg flags of the start>

Ranges: orientation in degrees (about the lab axes), cell in percent (lengths), distance in mm, beam_center in
pixels.  Each trial starts a short coarse-to-fine refinement from a model sampled in that box; the best trial's
model is then refined to convergence and written as JSON (``nanobragg_args``, ``loss``, ``trial``, ``n_trials``,
``parameters``, ``esd`` …).  The study lives in ``--storage`` (default: an SQLite file next to ``--json``, else
``nbtorch-sweep.db``); re-running with the same storage and study name adds trials to it, and the same command on
other machines with a ``postgresql://`` URL joins it (a server must answer within ``--storage-timeout`` seconds,
default 10; its password is never printed).  One progress line per trial goes to stderr.

Exit status: 0 done, 1 the study failed (no trial completed, a worker process died) or an output could not be
written, 2 a user error (an option, --search, --storage, OBSERVED, the flags: one line naming it, nothing done),
3 the best model's refinement did not converge, 4 it converged but is a poor fit (χ²/ν of a likelihood target
outside [1/3, 3], as ``nbtorch-refine``; e.g. an image in counts, not photons: ``--adc``/``--gain``), 130 interrupted (finished trials stay in the storage).
The observed image is converted to photons as by ``nbtorch-refine``: (value − ``--adc``)/``--gain``, else the
header's ``ADC_OFFSET``/``GAIN``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional, Sequence

from .checks import EXIT_USAGE, fit_status

#: Our options and how many values each takes (everything else after OBSERVED is the starting model's flags).
OPTIONS = {
    "--search": 1, "--n-trials": 1, "--workers": 1, "--storage": 1, "--study-name": 1, "--sampler": 1,
    "--pruner": 1, "--json": 1, "--plots": 1, "--refine": 1, "--seed": 1, "--trial-iter": 1, "--prelim-pixels": 1,
    "--target": 1, "--method": 1, "--max-iter": 1, "--threads": 1, "--dtype": 1, "--quiet": 0, "--help": 0,
    "--allow-degenerate": 0, "--storage-timeout": 1, "--adc": 1, "--gain": 1,
}
#: Exit statuses (:mod:`refine.cli_checks` has the shared ones): the study failed (no trial completed, a worker
#: process died) or an output could not be written.
EXIT_FAILED = 1


def parser() -> argparse.ArgumentParser:
    """The argument parser of our ``--`` options (the nanoBragg flags are split off first, :func:`split_argv`)."""
    from .checks import OneLineParser
    from ..studies import CONNECT_TIMEOUT, PRUNERS, SAMPLERS, STORAGE_FORMS

    ap = OneLineParser(
        prog="nbtorch-sweep",
        usage=("nbtorch-sweep OBSERVED --search GROUP:RANGE[,GROUP:RANGE...] --n-trials N [--workers N] "
               "[--storage URL] [--study-name NAME] [--sampler tpe|cmaes|gp|random] [--pruner median|hyperband|none] "
               "[--json OUT] [--plots DIR] <nanoBragg flags of the start>"),
        description="Global search of starting models (an Optuna study) about a nanoBragg model, then a full "
                    "refinement of the best.",
        epilog=("Ranges: orientation degrees, cell percent, distance mm, beam_center pixels.  Storage: "
                f"{STORAGE_FORMS}.  Example:\n  nbtorch-sweep obs.img --search orientation:5,beam_center:10 "
                "--n-trials 60 --json sweep.json -cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -default_F 100 "
                "-distance 60 -detpixels 96 -pixel 0.2"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("observed", help="observed image (SMV, raw float with the shape of the flags, CBF, ...)")
    ap.add_argument("--search", required=True, help="GROUP:RANGE[,GROUP:RANGE...] half-widths of the box")
    ap.add_argument("--n-trials", type=int, required=True, help="trials this command runs (shared by its workers)")
    ap.add_argument("--workers", type=int, default=1, help="processes sharing the storage (default 1)")
    ap.add_argument("--storage", default=None, help="study storage URL (default sqlite:///<json stem>.db)")
    ap.add_argument("--storage-timeout", type=float, default=CONNECT_TIMEOUT, metavar="SECONDS",
                    help=f"seconds a PostgreSQL server may take to connect (default {CONNECT_TIMEOUT:g})")
    ap.add_argument("--study-name", default="nbtorch-sweep", help="study name (default nbtorch-sweep)")
    ap.add_argument("--sampler", default="tpe", choices=SAMPLERS, help="sampler (default tpe, seeded)")
    ap.add_argument("--pruner", default="median", choices=PRUNERS, help="pruner (default median)")
    ap.add_argument("--seed", type=int, default=0, help="sampler seed in [0, 2**32 - workers] (worker k of a new "
                    "study uses seed + k; workers joining a study also mix in the "
                    "host name and trial count; default 0)")
    ap.add_argument("--json", default=None, help="write the best refined model and the study summary here")
    ap.add_argument("--plots", default=None, help="write history.png, importances.png, surface.png here")
    ap.add_argument("--refine", default=None, help="free groups (default: the searched groups and scale)")
    ap.add_argument("--trial-iter", type=int, default=4, help="minimiser iterations per stage of a trial")
    ap.add_argument("--prelim-pixels", type=int, default=65536, help="pixels of a trial's preliminary stages")
    ap.add_argument("--target", default="poisson", choices=["poisson", "gaussian", "lsq", "anscombe"])
    ap.add_argument("--method", default="lm", choices=["lm", "lbfgs", "adam"])
    ap.add_argument("--max-iter", type=int, default=None, help="iterations of the best model's final refinement")
    ap.add_argument("--allow-degenerate", action="store_true", help="refine combinations the image cannot tell apart")
    ap.add_argument("--adc", type=float, default=None, help="ADC offset (counts) subtracted from OBSERVED (default: "
                    "the header's ADC_OFFSET, which nbtorch writes, else 0)")
    ap.add_argument("--gain", type=float, default=None, help="counts per photon of OBSERVED (default: the header's "
                    "GAIN, else 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--quiet", action="store_true", help="no per-trial progress")
    return ap


def split_argv(argv: Sequence[str]):
    """(our tokens incl. OBSERVED, nanoBragg flags): ``--`` options and their values are ours, the first bare word
    is OBSERVED, everything else is a nanoBragg flag."""
    ours: List[str] = []
    flags: List[str] = []
    argv, i, seen = list(argv), 0, False
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--") or tok == "-h":
            n = 0 if "=" in tok or tok == "-h" else OPTIONS.get(tok, 0)
            ours.extend(argv[i: i + 1 + n])
            i += 1 + n
        elif not seen and not tok.startswith("-"):
            ours.append(tok)
            seen, i = True, i + 1
        else:
            flags.append(tok)
            i += 1
    return ours, flags


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
    from .checks import UsageError, check_threads
    from ..pipeline.fit import fit_options
    from ..studies import check_connect_timeout

    if not flags:
        return "give the starting model as nanoBragg flags after OBSERVED (see --help)"
    if not os.path.isfile(ns.observed):
        return f"OBSERVED {ns.observed}: no such file"
    for name in ("n_trials", "workers", "trial_iter", "prelim_pixels"):
        if getattr(ns, name) < 1:
            return f"--{name.replace('_', '-')} must be an integer >= 1; got {getattr(ns, name)}"
    if ns.max_iter is not None and ns.max_iter < 0:
        return f"--max-iter must be an integer >= 0; got {ns.max_iter}"
    if not 0 <= ns.seed <= MAX_SEED - (ns.workers - 1):
        return f"--seed must be an integer in [0, {MAX_SEED - (ns.workers - 1)}] (with --workers {ns.workers}); " \
               f"got {ns.seed}"
    try:
        check_threads(ns.threads)
        check_connect_timeout(ns.storage_timeout)
        if ns.refine is not None:
            fit_options(free=_free(ns, {}))
    except (UsageError, ValueError) as exc:
        return (f"--refine {ns.refine!r}: " if str(exc).startswith("unknown") else "") + str(exc)
    return None


def _free(ns, search) -> List[str]:
    """The free groups: ``--refine``'s (comma or space separated; :class:`~refine.cli_checks.UsageError` when
    empty), else the searched groups and scale."""
    from .checks import free_groups

    if ns.refine is not None:
        return free_groups(ns.refine)
    return list(dict.fromkeys([n.split(".")[0] for n in search] + ["scale"]))


def _load(ns, flags):
    """(observed image in photons (``--adc``/``--gain``, else the header's), params, setup) from OBSERVED and the
    flags."""
    import torch

    import nbtorch

    from ..targets.observed import read_observed

    params, setup = nbtorch.from_nanobragg_args(flags, dtype=torch.float64 if ns.dtype == "float64" else
                                                torch.float32)
    return read_observed(ns.observed, setup, params, adc=ns.adc, gain=ns.gain), params, setup


def summary(outcome, spec, flags, n_run: int) -> dict:
    """The JSON of a sweep: the contract keys ``nanobragg_args`` (best refined model as flags), ``loss`` (its loss on
    all usable pixels), ``trial`` (best trial number), ``n_trials`` (trials in the study, every state),
    ``parameters``, ``esd``; and ``study_name``, ``storage`` (password hidden), ``states`` (count per state),
    ``n_trials_run`` (this command's), ``best_start`` (the best trial's sampled start), ``converged``, ``ok``,
    ``chi2_nu``, ``poor_fit`` (the best model's fit, as :class:`refine.Result`: ``poor_fit`` null or why it is poor),
    ``refined`` (the full refinement's JSON)."""
    from collections import Counter

    from ..studies import redact

    res, study = outcome.result, outcome.study
    refined = res.to_dict()
    trials = study.get_trials(deepcopy=False)
    return {
        "nanobragg_args": refined["nanobragg_args"], "loss": float(res.loss_all), "trial": int(outcome.trial),
        "n_trials": len(trials), "parameters": refined["parameters"], "esd": refined["esd"],
        "study_name": spec.study_name, "storage": redact(spec.storage), "n_trials_run": int(n_run),
        "states": dict(Counter(t.state.name for t in trials)),
        "best_start": dict(study.trials[outcome.trial].params), "converged": bool(res.converged),
        "ok": refined["ok"], "chi2_nu": refined["chi2_nu"], "poor_fit": refined["poor_fit"],
        "start_flags": list(flags), "refined": refined,
    }


#: The figures ``--plots DIR`` holds (surface.png only with two or more searched parameters).
PLOT_NAMES = ("history.png", "importances.png", "surface.png")


def write_plots(study, directory: str) -> List[str]:
    """history.png, importances.png and (with two or more searched parameters) surface.png in ``directory``, each
    written atomically under the safe-output rule (as every figure: :func:`refine.plots._save`)."""
    from .. import studies

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
    from .checks import flag_inputs

    if not any(flag == "-mat" for flag, _ in flag_inputs(flags)):
        return None
    return (os.path.splitext(ns.json)[0] + ".mat") if ns.json else "refined.mat"


def output_problem(ns, flags) -> Optional[str]:
    """The safe-output rule before the study runs (:func:`refine.cli_checks.check_outputs`): ``--json``, the refined
    matrix of a ``-mat`` start and the ``--plots`` folder and figures are not OBSERVED, a file of the flags or each
    other, and can be written.  The message (naming the option), or None."""
    from nbtorch.io.safe_output import check_output_folder

    from .checks import UsageError, check_outputs, flag_inputs

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
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, flags = split_argv(argv)
    from nbtorch.interrupt import one_line_warnings

    from .checks import UsageError

    one_line_warnings("nbtorch-sweep")  # e.g. OBSERVED's header against the flags

    try:
        ns = parser().parse_args(ours)
    except UsageError as exc:
        print(f"nbtorch-sweep: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    problem = _usage_checks(ns, flags) or output_problem(ns, flags) or _photon_problem(ns)
    try:
        from .. import studies

        studies.require_optuna()
        search = studies.parse_search(ns.search) if problem is None else {}
        spec = studies.StudySpec(default_storage(ns), ns.study_name, ns.sampler, ns.pruner, ns.seed,
                                 connect_timeout=ns.storage_timeout if problem is None else studies.CONNECT_TIMEOUT)
    except (ValueError, ImportError) as exc:
        problem = problem or str(exc)
    if problem:
        print(_redacted(f"nbtorch-sweep: {problem}", ns), file=sys.stderr)
        return EXIT_USAGE
    return _run(ns, flags, search, spec)


def _photon_problem(ns) -> Optional[str]:
    """The ``--adc``/``--gain`` error message (:func:`refine.cli_checks.check_adc_gain`), or None."""
    from .checks import UsageError, check_adc_gain

    try:
        check_adc_gain(ns.adc, ns.gain)
    except UsageError as exc:
        return str(exc)
    return None


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _redacted(text: str, ns) -> str:
    """``text`` with the password of ``--storage`` hidden (:func:`refine.studies.redact_text`)."""
    from ..studies import redact_text

    return redact_text(text, ns.storage)


def _run(ns, flags, search, spec) -> int:
    """Load the data, run the study, refine the best, write the outputs."""
    import torch

    from .. import studies

    if ns.threads:
        torch.set_num_threads(int(ns.threads))
    studies.require_optuna().logging.set_verbosity(studies.require_optuna().logging.WARNING)
    t0 = time.perf_counter()
    free = _free(ns, search)
    try:
        obs, params, setup = _load(ns, flags)
        studies.open_storage(spec.storage, connect_timeout=spec.connect_timeout)  # reachable? (before any trial)
    except (ValueError, OSError, ImportError) as exc:  # the image, the flags or --storage: the user's
        print(_redacted(f"nbtorch-sweep: {_first_line(exc)}", ns), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nbtorch-sweep: interrupted before the study started", file=sys.stderr)
        return 130
    try:
        matrix_out = matrix_path(ns, flags)  # a -mat model is written back with a new MOSFLM matrix
        outcome = studies.global_search(
            obs, params, setup, search, ns.n_trials, spec=spec, workers=ns.workers, iterations=ns.trial_iter,
            progress=not ns.quiet, threads=ns.threads, free=tuple(free), target=ns.target, method=ns.method,
            max_iter=ns.max_iter, prelim_pixels=ns.prelim_pixels, nanobragg_args=flags,
            allow_degenerate=ns.allow_degenerate, matrix_path=matrix_out)
        if matrix_out is not None:
            outcome.result.to_nanobragg_args(matrix_path=matrix_out, write_matrix=True)
    except KeyboardInterrupt:
        print(f"nbtorch-sweep: interrupted; the finished trials are kept in {studies.redact(spec.storage)} (run the "
              "same command again to add trials)", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:  # ValueError: the options (groups, degeneracy ...)
        print(_redacted(f"nbtorch-sweep: {_first_line(exc)}", ns), file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILED
    print(outcome.result.summary())
    print(f"best trial {outcome.trial} of {len(outcome.study.trials)} in study {spec.study_name!r} "
          f"({studies.redact(spec.storage)})")
    data = summary(outcome, spec, flags, ns.n_trials)
    if data["nanobragg_args"]:
        print("refined model: nbtorch " + " ".join(data["nanobragg_args"]))
    if ns.json:
        from nbtorch.io._atomic import atomic_write

        atomic_write(ns.json, (json.dumps(data, indent=2, allow_nan=True) + "\n").encode())
    if ns.plots:
        write_plots(outcome.study, ns.plots)
    if not ns.quiet:
        print(f"total {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return fit_status(outcome.result.converged, outcome.result.ok)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
