"""``nbtorch-refine --images LIST``: many images, jointly or independently.

    nbtorch-refine --images LIST --shared GROUPS --per-image GROUPS [--json OUT] [options] [common nanoBragg flags]
    nbtorch-refine --images LIST --independent --refine GROUPS --results OUT.jsonl [--workers N]
                   [--scheduler tls://HOST:PORT [--tls-ca-file CA --tls-cert CERT --tls-key KEY]] [options]
                   [common nanoBragg flags]

LIST has one line per image, ``PATH <nanoBragg flags of its starting model>`` (:mod:`refine.imagelist`); flags
given on the command line come first on every line.  The joint mode refines the shared groups once for all images
and the per-image groups per image (:func:`refine.fit_many`) and writes ``--json``; the independent mode refines
each image on its own on Dask (:mod:`refine.scaleout`) and appends one JSON line per image to ``--results``.

Images are converted to photons as in single-image mode: (value − ADC offset)/gain with ``--adc``/``--gain`` for
every image, else each image's header ``ADC_OFFSET``/``GAIN``.  A local cluster (``--workers``) runs over TLS with
credentials made for the run; ``--scheduler tls://HOST:PORT`` takes this client's certificates from ``--tls-ca-file``,
``--tls-cert``, ``--tls-key`` or dask's configuration (``tcp://`` is warned about: anyone who reaches it can run code).

Exit status (:mod:`refine.cli_checks`, as a single-image fit's; in the independent mode judged on every listed
image's line in the results, this run's or an earlier one's): 0 converged with χ²/ν near 1, 3 finished but not
converged, or some images failed or are still missing (a ``--limit``), 4 converged but a poor fit (of the whole fit
or of any image: χ²/ν of a likelihood target outside [1/3, 3], ``poor_fit`` in the JSON), 1 bad input found while
fitting (a degenerate pair without ``--allow-degenerate``), 2 bad usage or a bad LIST line (a missing file, bad
flags, an image listed twice, in the joint mode an unreadable image: the message names the line).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from typing import List, Optional, Sequence

from .checks import check_adc_gain, fit_status

_OPTIONS = {
    "--images": 1, "--shared": 1, "--per-image": 1, "--json": 1, "--independent": 0, "--refine": 1, "--workers": 1,
    "--scheduler": 1, "--results": 1, "--limit": 1, "--target": 1, "--read-noise": 1, "--max-iter": 1,
    "--no-coarse": 0, "--coarse-iter": 1, "--crystal-system": 1, "--ncells-mode": 1, "--overload": 1,
    "--threads": 1, "--dtype": 1, "--quiet": 0, "--allow-degenerate": 0, "--esd-scale": 1, "--help": 0,
    "--adc": 1, "--gain": 1, "--tls-ca-file": 1, "--tls-cert": 1, "--tls-key": 1,
}


def _parser() -> argparse.ArgumentParser:
    from ..model.parameters import CRYSTAL_SYSTEMS

    from .checks import OneLineParser

    ap = OneLineParser(
        prog="nbtorch-refine --images",
        usage=("nbtorch-refine --images LIST (--shared GROUPS --per-image GROUPS [--json OUT] | --independent "
               "--refine GROUPS --results OUT.jsonl [--workers N] [--scheduler ADDRESS]) [options] "
               "[nanoBragg flags common to every line]"),
        description="Refine many images: jointly (shared + per-image groups) or independently on Dask.")
    ap.add_argument("--images", required=True, help="LIST file: one line per image, PATH <nanoBragg flags>")
    ap.add_argument("--shared", default="", help="joint: groups with one value for all images "
                    "(e.g. distance,beam_center,detector_rotation.y,detector_rotation.z)")
    ap.add_argument("--per-image", default="", help="joint: groups with one value per image (e.g. orientation,scale)")
    ap.add_argument("--json", default=None, help="joint: write the result as JSON here")
    ap.add_argument("--independent", action="store_true", help="refine each image on its own, in parallel on Dask")
    ap.add_argument("--refine", default=None, help="independent: groups to refine per image")
    ap.add_argument("--workers", type=int, default=None, help="independent: local Dask worker processes "
                    "(default one per core)")
    ap.add_argument("--scheduler", default=None, help="independent: address of a running Dask scheduler "
                    "(tls://host:8786; an unprotected tcp:// address is warned about) instead of a local cluster")
    ap.add_argument("--tls-ca-file", default=None, help="independent, tls:// scheduler: the CA certificate (PEM) "
                    "that signed the scheduler's and workers' certificates (default: dask's configuration)")
    ap.add_argument("--tls-cert", default=None, help="independent, tls:// scheduler: this client's certificate (PEM)")
    ap.add_argument("--tls-key", default=None, help="independent, tls:// scheduler: this client's private key (PEM; "
                    "not needed when it is in --tls-cert)")
    ap.add_argument("--results", default=None, help="independent: JSON-lines file, one line per image (a rerun "
                    "skips the images already in it)")
    ap.add_argument("--limit", type=int, default=None, help="independent: stop after this many new images")
    ap.add_argument("--target", default="poisson", choices=["poisson", "gaussian", "lsq", "anscombe"])
    ap.add_argument("--read-noise", type=float, default=1.0, help="read noise σ (photons) of the gaussian target")
    ap.add_argument("--max-iter", type=int, default=None, help="iterations of the final stage")
    ap.add_argument("--no-coarse", action="store_true", help="skip the coarse-to-fine stages")
    ap.add_argument("--coarse-iter", type=int, default=8, help="iterations of each broadened stage (default 8)")
    ap.add_argument("--crystal-system", default="auto", choices=["auto"] + list(CRYSTAL_SYSTEMS))
    ap.add_argument("--ncells-mode", default="auto", choices=["auto", "isotropic", "anisotropic"])
    ap.add_argument("--overload", type=float, default=None, help="exclude pixels at or above this value")
    ap.add_argument("--adc", type=float, default=None, help="ADC offset (counts) subtracted from every image "
                    "(default: each image's header ADC_OFFSET, else 0)")
    ap.add_argument("--gain", type=float, default=None, help="counts per photon of every image (default: each "
                    "image's header GAIN, else 1)")
    ap.add_argument("--esd-scale", default="auto", choices=["auto", "chi2", "none"])
    ap.add_argument("--allow-degenerate", action="store_true", help="refine combinations the images cannot tell apart")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (per worker when independent)")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


def split_argv(argv: Sequence[str]):
    """(our tokens, nanoBragg flags common to every LIST line)."""
    ours: List[str] = []
    flags: List[str] = []
    i, argv = 0, list(argv)
    while i < len(argv):
        tok = argv[i]
        name = tok.split("=", 1)[0]
        if tok.startswith("--") or tok == "-h":
            n = 0 if ("=" in tok or tok == "-h") else _OPTIONS.get(name, 0)
            ours.extend(argv[i: i + 1 + n])
            i += 1 + n
        else:
            flags.append(tok)
            i += 1
    return ours, flags


def _fit_options(ns) -> dict:
    """Keyword arguments of refine.fit / fit_many from the options (plain values, picklable)."""
    return dict(target=ns.target, read_noise=ns.read_noise, max_iter=ns.max_iter, coarse_to_fine=not ns.no_coarse,
                coarse_iter=ns.coarse_iter, crystal_system=ns.crystal_system, ncells_mode=ns.ncells_mode,
                overload=ns.overload, esd_scale=ns.esd_scale, allow_degenerate=ns.allow_degenerate)


def _tls_given(ns) -> bool:
    """Whether any of --tls-ca-file, --tls-cert, --tls-key was given."""
    return any((ns.tls_ca_file, ns.tls_cert, ns.tls_key))


def _usage_error(ns) -> str:
    """The first inconsistency between the options of the two modes ('' when none)."""
    if ns.independent:
        if ns.shared or ns.per_image or ns.json:
            return "--shared, --per-image and --json belong to the joint mode; --independent takes --refine"
        if not ns.refine:
            return "--independent needs --refine GROUPS"
        if not ns.results:
            return "--independent needs --results OUT.jsonl"
        if ns.workers is not None and ns.workers < 1:
            return "--workers must be at least 1"
        if _tls_given(ns) and not ns.scheduler:
            return ("--tls-ca-file, --tls-cert and --tls-key are for --scheduler tls://...; a local cluster makes "
                    "its own")
        return ""
    if ns.refine or ns.results or ns.workers or ns.scheduler or ns.limit is not None or _tls_given(ns):
        return "--refine, --results, --workers, --scheduler, --tls-* and --limit need --independent"
    if not (ns.shared or ns.per_image):
        return "the joint mode needs --shared and/or --per-image GROUPS (or --independent --refine GROUPS)"
    return ""


#: Seconds between two counter lines of a joint fit's progress when stderr is not a terminal (a log).
LOG_INTERVAL = 10.0


class JointProgress:
    """A joint fit's progress on stderr: one line per Levenberg–Marquardt iteration (:class:`refine.cli.Progress`)
    and, while the images are read, prepared, simulated or their Jacobians computed, a counter ``what: done/total
    images`` — redrawn in place on a terminal (at most 5 times a second), else printed as a line every
    :data:`LOG_INTERVAL` seconds of a long pass.  Call it with iteration records (``callback``); :meth:`work` is
    ``fit_many``'s ``progress``."""

    def __init__(self, stream=None):
        from .fit import Progress

        self.stream = sys.stderr if stream is None else stream
        self.lines = Progress(self.stream)
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.drawn, self.what, self.last = False, None, 0.0

    def __call__(self, record: dict) -> None:
        """One iteration line (the counter on the terminal line is cleared first)."""
        self.clear()
        self.lines(record)

    def work(self, what: str, done: int, total: int) -> None:
        """Show that ``done`` of ``total`` images of the pass ``what`` are done."""
        import math
        import time

        now = time.monotonic()
        if what != self.what:  # a new pass: on a terminal at once, in a log once it has run LOG_INTERVAL
            self.what, self.last = what, (-math.inf if self.tty else now)
        if now - self.last < (0.2 if self.tty else LOG_INTERVAL) and not (self.tty and done >= total):
            return
        self.last = now
        text = f"{what}: {done}/{total} images"
        if self.tty:
            print(f"\r{text}\x1b[K", end="", file=self.stream, flush=True)
            self.drawn = True
        else:
            print(text, file=self.stream, flush=True)

    def clear(self) -> None:
        """Erase the counter from the terminal line."""
        if self.drawn:
            print("\r\x1b[K", end="", file=self.stream, flush=True)
            self.drawn = False


def _run_joint(ns, entries) -> int:
    import torch

    from ..imagelist import load_entries
    from ..pipeline.many import fit_many

    shown = None if ns.quiet else JointProgress()
    try:
        obs, params, setups = load_entries(entries, torch.float64 if ns.dtype == "float64" else torch.float32,
                                           ns.overload, ns.adc, ns.gain, progress=shown and shown.work)
        result = fit_many(obs, params, setups, shared=ns.shared, per_image=ns.per_image,
                          paths=[e.path for e in entries], nanobragg_args=[e.flags for e in entries],
                          callback=shown, progress=shown and shown.work, **_fit_options(ns))
    finally:
        if shown is not None:
            shown.clear()
    for k, img in enumerate(result.images):
        if not img.setup.nanobragg_cell:  # a -mat model: its refined matrix goes next to the JSON
            stem = os.path.splitext(ns.json)[0] if ns.json else "refined"
            result.images[k] = dataclasses.replace(img, matrix_path=f"{stem}.image{k + 1}.mat")
            if ns.json:
                result.images[k].to_nanobragg_args(write_matrix=True)
    print(result.summary())
    if ns.json:
        result.to_json(ns.json)
    return fit_status(result.converged, result.ok)


def _run_independent(ns, entries) -> int:
    from ..scaleout import refine_images

    for module, why in (("distributed", "--independent runs on Dask: pip install 'dask[distributed]'"),
                        ("cryptography", "a local Dask cluster runs over TLS: pip install cryptography")):
        if importlib.util.find_spec(module) is None:
            print(f"nbtorch-refine: error: {why} (the dask extra: pip install -e '.[dask]')", file=sys.stderr)
            return 2
    if ns.scheduler_warning:
        print(f"nbtorch-refine: warning: {ns.scheduler_warning}", file=sys.stderr)
    free = [g for g in ns.refine.replace(",", " ").split() if g]
    summary = refine_images(entries, free, ns.results, workers=ns.workers, scheduler=ns.scheduler,
                            options=_fit_options(ns), threads=ns.threads, dtype=ns.dtype, limit=ns.limit,
                            progress=not ns.quiet, security=ns.security, adc=ns.adc, gain=ns.gain)
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
    from ..scaleout import read_results

    recs = {r.get("path"): r for r in read_results(results)}
    lines = [recs.get(e.path) for e in entries]
    converged = all(r is not None and not r.get("error") and r.get("converged") for r in lines)
    return fit_status(converged, converged and not any(r.get("poor_fit") for r in lines))


def _scheduler_security(ns):
    """(credentials, warning) for ``--scheduler`` (:func:`refine.scaleout.scheduler_security`; (None, '') without
    it, or without Dask installed, which the run reports); :class:`~refine.cli_checks.UsageError`."""
    from .checks import UsageError

    if not ns.scheduler or importlib.util.find_spec("distributed") is None:
        return None, ""
    from ..scaleout import scheduler_security

    try:
        return scheduler_security(ns.scheduler, ns.tls_ca_file, ns.tls_cert, ns.tls_key)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _checked(argv: Sequence[str]):
    """(options, LIST entries): every option, the LIST (each line's file and flags), the groups, the fit options
    and the output paths checked before any work; :class:`~refine.cli_checks.UsageError` (one line)."""
    from .checks import UsageError, check_outputs, check_threads
    from ..pipeline.fit import fit_options
    from ..imagelist import parse_image_list

    ours, flags = split_argv(argv)
    ns = _parser().parse_args(ours)
    problem = _usage_error(ns)
    if problem:
        raise UsageError(problem)
    check_threads(ns.threads)
    check_adc_gain(ns.adc, ns.gain)
    ns.security, ns.scheduler_warning = _scheduler_security(ns)
    check_outputs([("--json", ns.json), ("--results", ns.results)], inputs=[("--images", ns.images)])
    try:
        entries = parse_image_list(ns.images, flags)
        free = (ns.refine,) if ns.independent else (ns.shared, ns.per_image)
        fit_options(None, free=[g for groups in free for g in groups.replace(",", " ").split()], **_fit_options(ns))
    except OSError as exc:
        raise UsageError(f"--images {ns.images}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    _check_files(ns, entries)
    return ns, entries


def _check_files(ns, entries) -> None:
    """The safe-output rule over the whole run (:func:`refine.cli_checks.check_outputs`): ``--json`` (with the
    refined matrices of ``-mat`` models next to it) and ``--results`` against the LIST, every listed image and every
    line's input files; an existing ``--results`` must be a results file.  :class:`UsageError` (one line)."""
    from .checks import UsageError, check_outputs, flag_inputs
    from ..scaleout import read_results

    inputs, outputs = [("--images", ns.images)], [("--json", ns.json), ("--results", ns.results)]
    for k, e in enumerate(entries):
        files = flag_inputs(e.flags, e.base_dir)
        inputs += [(e.where(), e.path)] + [(f"{e.where()} {flag}", path) for flag, path in files]
        if ns.json and any(flag == "-mat" for flag, _ in files):  # _run_joint writes its refined matrix
            outputs.append((f"--json (-mat of image {k + 1})", f"{os.path.splitext(ns.json)[0]}.image{k + 1}.mat"))
    check_outputs(outputs, inputs)
    if ns.results:
        try:
            read_results(ns.results)
        except ValueError as exc:
            raise UsageError(f"--results {exc}") from None
        except OSError as exc:
            raise UsageError(f"--results {ns.results}: {exc.strerror or exc}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``nbtorch-refine --images`` (returns the exit status)."""
    from nbtorch.interrupt import one_line_warnings

    from .checks import UsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ns, entries = _checked(argv)
    except UsageError as exc:
        print(f"nbtorch-refine: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    one_line_warnings("nbtorch-refine")  # e.g. a results line cut short by a kill, dropped on resume
    if ns.threads:
        import torch

        torch.set_num_threads(int(ns.threads))
    try:
        return _run_independent(ns, entries) if ns.independent else _run_joint(ns, entries)
    except ValueError as exc:
        line_error = " line " in str(exc) and ns.images in str(exc)
        print(f"nbtorch-refine: error: {exc}", file=sys.stderr)
        return 2 if line_error else 1
    except OSError as exc:
        print(f"nbtorch-refine: error: {exc}", file=sys.stderr)
        return 1
