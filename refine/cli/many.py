"""``nbtorch-refine --images LIST`` / ``--expt-list LIST``: many images, jointly (:func:`refine.fit_many`, ``--json``)
or each on its own on Dask (:mod:`refine.scaleout`, one JSON line per image in ``--results``).  :data:`USAGE`;
options: :mod:`refine.cli.table`; LIST: :mod:`refine.imagelist` (``--images``: the command line's flags come first on
every line; ``--expt-list``: DIALS stills, one shot per experiment, their refined experiment lists written into
``--out-dir``); exit statuses and the cluster's security: docs/refine.md, Many images and Many stills."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
import time
from typing import Sequence

import torch

from .. import fit_many, fit_options
from ..ensemble.cli import f_start_flags, problem as ensemble_problem, run_cli as run_ensemble_cli, shots_path
from ..imagelist import (entry_spots, load_entries, parse_expt_list, parse_image_list, refined_expt_dir,
                         result_key, write_refined_expt)
from ..scaleout import read_results, refine_images, scheduler_security
from .checks import (EXIT_OK, EXIT_OUTPUT, UsageError, check_outputs, fit_status, flag_inputs, free_groups,
                     matrix_output)
from .table import arguments, flag_message, options, start

USAGE = ("nbtorch-refine --images LIST|--expt-list LIST (--shared GROUPS --per-image GROUPS [--json OUT] | "
         "--independent --refine GROUPS --results OUT.jsonl [--workers N] [--scheduler ADDRESS] | --refine-f "
         "--out-mtz F.mtz [--space-group SG] [--per-image GROUPS] [--cycles N] [--checkpoint DIR] [--workers N]) "
         "[options] [nanoBragg flags common to every line]")


def _mode(ns) -> str:
    """The mode of the command line: 'ensemble' (--refine-f), 'independent' or 'joint'."""
    return "ensemble" if ns.refine_f else "independent" if ns.independent else "joint"


def _fit_kwargs(ns) -> dict:
    """Keyword arguments of refine.fit / fit_many from the options (plain values, picklable; ``--refine`` apart);
    ``--overload`` also masks the image in photons here."""
    kw = arguments(ns, _mode(ns))
    kw.pop("free", None)
    return dict(kw, overload=ns.overload)


def _list(ns):
    """(option, LIST path) of the run: ``--images`` or ``--expt-list``."""
    return ("--expt-list", ns.expt_list) if ns.expt_list is not None else ("--images", ns.images)


def _check_mode(ns) -> None:
    """The options agree with the mode (joint or independent) and the LIST option, and Dask is there for
    ``--independent``; :class:`UsageError` naming the first problem."""
    mode = _mode(ns)
    bad = [o for o in options("joint", "independent", "ensemble") if mode not in o.programs
           and getattr(ns, o.dest) != o.parser_default]
    wrong = ", ".join(o.flag for o in bad)
    need = " or ".join(f for m, f in (("independent", "--independent"), ("ensemble", "--refine-f"))
                       if any(m in o.programs for o in bad))
    for broken, problem in (
            (ns.images is not None and ns.expt_list is not None, f"--images {ns.images} and --expt-list "
             f"{ns.expt_list} both give the LIST: give one"),
            (ns.images is None and ns.expt_list is None, "give the LIST: --images LIST (an image path and flags per "
             "line) or --expt-list LIST (EXPT [REFL] [SPECTRUM] per line)"),
            (ns.out_dir is not None and ns.expt_list is None, f"--out-dir {ns.out_dir}: the refined experiment lists "
             "it holds are of --expt-list shots; give --expt-list LIST"),
            (ns.gain is not None and ns.gain_map is not None, f"--gain {ns.gain} and --gain-map {ns.gain_map} both "
             "give the gain: give one"),
            (ns.refine_f and ns.independent, "--refine-f and --independent are two modes: give one"),
            (wrong and ns.refine_f, f"{wrong} do not go with --refine-f"),
            (ns.refine_f and bool(ensemble_problem(ns)), ensemble_problem(ns) if ns.refine_f else ""),
            (wrong and ns.independent, f"{wrong} belong to the joint mode; --independent takes --refine"),
            (wrong, f"{wrong} need {need}"),
            (ns.independent and not ns.refine, "--independent needs --refine GROUPS"),
            (ns.independent and not ns.results, "--independent needs --results OUT.jsonl"),
            (any((ns.tls_ca_file, ns.tls_cert, ns.tls_key)) and not ns.scheduler, "--tls-ca-file, --tls-cert and "
             "--tls-key are for --scheduler tls://...; a local cluster makes its own"),
            (not (ns.refine_f or ns.independent or ns.shared or ns.per_image), "the joint mode needs --shared and/or "
             "--per-image GROUPS (or --independent --refine GROUPS)"),
            ((ns.independent or ns.workers or ns.scheduler) and not importlib.util.find_spec("distributed"),
             f"{'--independent' if ns.independent else '--workers/--scheduler'} runs on Dask: pip install "
             "'dask[distributed]' (the dask extra: pip install -e '.[dask]')"),
            ((ns.independent or ns.workers) and not importlib.util.find_spec("cryptography"), "a local Dask cluster "
             "runs over TLS: pip install cryptography (the dask extra: pip install -e '.[dask]')")):
        if broken:
            raise UsageError(problem)


def _expt_dir(ns):
    """Where the --expt-list shots' refined experiment lists go: ``--out-dir``, else next to ``--results`` (or, joint,
    ``--json``) as :func:`refine.imagelist.refined_expt_dir` names it; None for --images, or a joint fit without
    either."""
    if ns.expt_list is None:
        return None
    next_to = ns.results if ns.independent else ns.out_mtz if ns.refine_f else ns.json
    return ns.out_dir if ns.out_dir is not None else (refined_expt_dir(next_to) if next_to else None)


#: Seconds between two counter lines of a joint fit's progress when stderr is not a terminal (a log).
LOG_INTERVAL = 10.0


class Progress:
    """A fit's progress on a stream (default stderr): called with the fit's iteration records, one line per iteration
    (stage, iteration, loss, change, step/σ, damping); from :meth:`work` (``fit_many``'s ``progress``), while the
    images are read, prepared, simulated or their Jacobians computed, a counter ``what: done/total images`` — redrawn
    in place on a terminal (at most 5 times a second), else printed as a line every :data:`LOG_INTERVAL` seconds."""

    def __init__(self, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.prev = self.stage = self.what = None
        self.started = self.drawn = False
        self.last = 0.0

    def __call__(self, h: dict) -> None:
        """One iteration line (the counter on the terminal line cleared first; the header with the first)."""
        self.clear()
        if not self.started:
            self.started = True
            print(f"{'stage':9s} {'iter':>4s} {'loss':>17s} {'change':>12s} {'step/σ':>9s} {'damping':>10s}",
                  file=self.stream)
        if h.get("stage") != self.stage:
            self.stage, self.prev = h.get("stage"), None
        change = "" if self.prev is None else f"{h['loss'] - self.prev:12.5g}"
        self.prev = h["loss"]
        print(f"{str(h.get('stage', '')):9s} {h['iteration']:4d} {h['loss']:17.10g} {change:>12s} "
              f"{h['step']:9.3g} {h['damping']:10.3g}", file=self.stream, flush=True)

    def work(self, what: str, done: int, total: int) -> None:
        """Show that ``done`` of ``total`` images of the pass ``what`` are done."""
        now = time.monotonic()
        if what != self.what:  # a new pass: on a terminal at once, in a log once it has run LOG_INTERVAL
            self.what, self.last = what, (-math.inf if self.tty else now)
        if now - self.last < (0.2 if self.tty else LOG_INTERVAL) and not (self.tty and done >= total):
            return
        self.last, self.drawn = now, self.tty
        text = f"{what}: {done}/{total} images"
        print(f"\r{text}\x1b[K" if self.tty else text, end="" if self.tty else "\n", file=self.stream, flush=True)

    def clear(self) -> None:
        """Erase the counter from the terminal line."""
        if self.drawn:
            print("\r\x1b[K", end="", file=self.stream, flush=True)
            self.drawn = False


def _write_shots(ns, result, entries) -> int:
    """Each image's refined outputs: an --expt-list shot's experiment list (into :func:`_expt_dir`; its image's
    ``expt`` entry in the JSON), a ``-mat`` model's matrix next to ``--json``.  :data:`EXIT_OK`, or
    :data:`EXIT_OUTPUT` when a file could not be written (one line each; the others are still written)."""
    folder, status = _expt_dir(ns), EXIT_OK
    for k, (img, entry) in enumerate(zip(result.images, entries)):
        if entry.expt:
            try:
                out = write_refined_expt(entry, img, folder) if folder is not None else None
            except (ValueError, OSError) as exc:
                print(f"nbtorch-refine: error: cannot write the refined experiment list of {entry.where()}: {exc}",
                      file=sys.stderr)
                out, status = None, EXIT_OUTPUT
            result.images[k] = dataclasses.replace(img, expt=entry.expt_report(out))
        elif not img.setup.nanobragg_cell:  # a -mat model: its refined matrix goes next to the JSON
            result.images[k] = dataclasses.replace(img, matrix_path=matrix_output(ns.json, f".image{k + 1}"))
            if ns.json:
                result.images[k].to_nanobragg_args(write_matrix=True)
    return status


def _run_joint(ns, entries) -> int:
    """The joint fit of the LIST: summary, ``--json``, refined matrices and experiment lists; the exit status."""
    shown = None if ns.quiet else Progress()
    try:
        obs, params, setups = load_entries(entries, getattr(torch, ns.dtype), ns.overload, ns.adc, ns.gain,
                                           progress=shown and shown.work, gain_map=ns.gain_map)
        spots = [entry_spots(e) for e in entries]  # a shot with a REFL: a spot-ROI fit of its rows
        result = fit_many(obs, params, setups, shared=ns.shared, per_image=ns.per_image,
                          paths=[e.path for e in entries], nanobragg_args=[e.flags for e in entries],
                          spots=spots if any(s is not None for s in spots) else None, callback=shown,
                          progress=shown and shown.work, **_fit_kwargs(ns))
    finally:
        if shown is not None:
            shown.clear()
    status = _write_shots(ns, result, entries)
    print(result.summary())
    if ns.json:
        result.to_json(ns.json)
    return status if status != EXIT_OK else fit_status(result.converged, result.ok)


def _run_independent(ns, entries) -> int:
    """The LIST refined image by image on Dask into ``--results``; the exit status."""
    if ns.scheduler_warning:
        print(f"nbtorch-refine: warning: {ns.scheduler_warning}", file=sys.stderr)
    summary = refine_images(entries, free_groups(ns.refine), ns.results, workers=ns.workers, scheduler=ns.scheduler,
                            options=_fit_kwargs(ns), threads=ns.threads, dtype=ns.dtype, limit=ns.limit,
                            progress=not ns.quiet, security=ns.security, adc=ns.adc, gain=ns.gain,
                            gain_map=ns.gain_map, expt_dir=_expt_dir(ns))
    if not ns.quiet and summary.skipped == summary.total:
        print(f"all {summary.total} images are already in {ns.results}: nothing to do", file=sys.stderr)
    elif not ns.quiet:
        print(f"{summary.total} images: {summary.skipped} already done, {summary.fitted} refined ({summary.poor} "
              f"poor fits), {summary.failed} failed this run ({summary.workers} workers × "
              f"{summary.threads or 'cores/workers'} threads, {summary.seconds:.1f} s); results in {ns.results}",
              file=sys.stderr)
    return results_status(entries, ns.results)


def results_status(entries, results: str) -> int:
    """The exit status of an independent run, judged on every LIST entry's line in ``results`` (this run's or an
    earlier one's): 3 when one is missing, failed or not converged, else 4 when one is a poor fit, else 0."""
    recs = {result_key(r): r for r in read_results(results)}
    lines = [recs.get(e.key()) for e in entries]
    converged = all(r is not None and not r.get("error") and r.get("converged") for r in lines)
    return fit_status(converged, converged and not any(r.get("poor_fit") for r in lines))


def _check_files(ns, entries) -> None:
    """The safe-output rule over the whole run (:func:`refine.cli.checks.check_outputs`): ``--json`` (with the
    refined matrices of ``-mat`` models next to it), ``--results`` and the refined experiment lists in
    :func:`_expt_dir` against the LIST, every listed image and every line's input files (``.expt``, REFL,
    spectrum …); an existing ``--results`` must be a results file.  :class:`UsageError` (one line)."""
    inputs, outputs = [_list(ns)], [("--json", ns.json), ("--results", ns.results), ("--out-mtz", ns.out_mtz),
                                    ("--out-shots", ns.out_mtz and shots_path(ns))]
    for k, e in enumerate(entries):
        files = flag_inputs(e.flags, e.base_dir)
        inputs += [(e.where(), e.path)] + [(f"{e.where()} {flag}", path) for flag, path in files]
        inputs += [(f"{e.where()} REFL", e.refl)] if e.refl else []
        if ns.json and not e.expt and any(flag == "-mat" for flag, _ in files):  # _run_joint writes its matrix
            outputs.append((f"--json (-mat of image {k + 1})", matrix_output(ns.json, f".image{k + 1}")))
    folder = _expt_dir(ns)
    check_outputs(outputs, inputs, ("--out-dir", folder, [e.out_expt_name() for e in entries if e.expt]))
    if ns.results:
        try:
            read_results(ns.results)
        except ValueError as exc:
            raise UsageError(f"--results {exc}") from None
        except OSError as exc:
            raise UsageError(f"--results {ns.results}: {exc.strerror or exc}") from None


def main(argv: Sequence[str]) -> int:
    """``nbtorch-refine --images`` / ``--expt-list``: every option, the mode, ``--scheduler``, the LIST (each line's
    files and flags), the groups, the fit options and the output paths checked, then the run; its exit status (bad
    usage is a :class:`~refine.cli.checks.UsageError` or ValueError, which :func:`refine.cli.fit.main` reports)."""
    ns, flags = start(argv, "images", prog="nbtorch-refine --images", usage=USAGE, description="Refine many images: "
                      "jointly (shared + per-image groups), independently on Dask, or their structure factors "
                      "with per-shot models (--refine-f).")
    _check_mode(ns)
    ns.security, ns.scheduler_warning = (scheduler_security(ns.scheduler, ns.tls_ca_file, ns.tls_cert, ns.tls_key)
                                         if ns.scheduler else (None, ""))
    option, path = _list(ns)
    flags = flags + (f_start_flags(ns.f_start) if ns.f_start else [])
    try:
        entries = (parse_expt_list if ns.expt_list is not None else parse_image_list)(path, flags)
    except OSError as exc:
        raise UsageError(f"{option} {path}: {exc.strerror or exc}") from None
    fit_options(None, free=f"{ns.shared},{ns.per_image}", **_fit_kwargs(ns))  # (--refine: checked as parsed)
    _check_files(ns, entries)
    try:
        if ns.refine_f:
            return run_ensemble_cli(ns, entries, _fit_kwargs(ns), _expt_dir(ns))
        return _run_independent(ns, entries) if ns.independent else _run_joint(ns, entries)
    except ValueError as exc:
        line_error = " line " in str(exc) and path in str(exc)
        print(f"nbtorch-refine: error: {flag_message(str(exc), 'images')}", file=sys.stderr)
        return 2 if line_error else 1
