"""``nbtorch-refine``: refine a nanoBragg model against an observed image (:data:`USAGE`; options:
:mod:`refine.cli.table`; many images: :mod:`refine.cli.many`; exit statuses: :mod:`refine.cli.checks`; the user's
guide: docs/refine.md).  Every option, flag, input file and output path is checked before any work; progress goes to
stderr, the summary to stdout."""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import List, Optional, Sequence

import numpy as np
import torch

from nbtorch.args import build, parse_args
from nbtorch.io.crystfel import panels_to_slab
from nbtorch.io.dials import read_expt
from nbtorch.io.images import write_raw_float
from nbtorch.io.refl import ReflectionTable, read_reflections, write_reflections
from nbtorch.io.smv import write_smv

from .. import fit, fit_options
from ..model.table import GROUPS, NODE_GROUP
from ..pipeline.options import psf_options
from ..pipeline.predicted import check_rows, predicted_rows, predicted_table, rows_of_experiment
from ..targets.detector import DetectorResponse, from_crystfel, from_dials, photon_energy_eV, readout_option
from ..targets.observed import read_gain_map, read_observed
from .checks import (EXIT_OK, EXIT_OUTPUT, PLOT_EXTENSIONS, UsageError, check_outputs, fit_status, flag_inputs,
                     matrix_output, run)
from .expt import ExptInput, ObservedFile, expt_input, observed_image
from .many import Progress
from .many import main as main_many
from .table import arguments, flag_message, start, usage

USAGE = ("nbtorch-refine OBSERVED|--expt FILE " + usage("refine", "--experiment", "--refine", "--method",
                                                        "--max-iter", "--json", "--out-expt", "--image")
         + " [more --options] <nanoBragg flags of the starting model>")
EPILOG = ("Groups: " + ", ".join(g for g in GROUPS if g != NODE_GROUP) + " (sub-groups background.plane, "
          "background.constant, background.water; single scalars such as cell.a, orientation.z, detector_rotation.y; "
          "a -geom/-expt detector's panel groups: panel_groups (the first level), panel_groups.LEVEL, "
          "panel_group:NAME).  Many images: nbtorch-refine --images "
          "LIST --help.  Example:\n  nbtorch-refine obs.img --refine cell,orientation,distance,beam_center,scale "
          "--json fit.json -cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -default_F 100 -distance 60 -detpixels 96 "
          "-pixel 0.2\n  nbtorch-refine --expt indexed.expt --experiment 0 --refine orientation,cell,panel_groups,"
          "scale --out-expt refined.expt --json fit.json -default_F 100 -N 10 -fluence 1e24")


def _reflections(ns, source: Optional[ExptInput], setup) -> Optional[ReflectionTable]:
    """The ``--refl`` rows of the refined experiment (:func:`~refine.pipeline.predicted.rows_of_experiment`: its
    ``id``, or its identifier in the table's map; experiment 0 without ``--expt``), read before the fit; None without
    ``--refl``.  :class:`UsageError`: ``--out-refl`` without ``--refl`` or ``--expt``, a table that cannot be read,
    none of its rows the experiment's, rows ``--out-refl`` cannot predict for ``setup`` (no ``miller_index``, a
    panel the detector lacks)."""
    if ns.out_refl is not None and (ns.refl is None or source is None):
        raise UsageError(f"--out-refl {ns.out_refl}: the predicted table holds the rows of the input reflections of "
                         "a DIALS experiment: give " + ("--refl FILE" if ns.refl is None else "--expt FILE"))
    if ns.refl is None:
        return None
    index, identifier = (0, "") if source is None else (source.index, source.record.identifier)
    try:
        rows = rows_of_experiment(read_reflections(ns.refl), index, identifier)
        if ns.out_refl is not None:
            check_rows(rows, setup)
    except (ValueError, OSError) as exc:
        raise UsageError(f"--refl {ns.refl}: " + ("no such file" if isinstance(exc, FileNotFoundError) else str(exc))) \
            from None
    if rows.nrows == 0:
        raise UsageError(f"--refl {ns.refl}: no reflection of experiment {index}"
                         + (f" ({identifier!r})" if identifier else "") + " (column 'id')")
    return rows


def _expt_report(ns, source: ExptInput) -> dict:
    """The JSON report's ``expt`` entry (:meth:`~refine.cli.expt.ExptInput.report`), with ``out_refl`` when
    ``--out-refl`` is given."""
    entry = source.report(ns.out_expt)
    return entry if ns.out_refl is None else {**entry, "out_refl": ns.out_refl}


def _write_out_refl(ns, result, rows: Optional[ReflectionTable], source: Optional[ExptInput]) -> int:
    """Write the ``--out-refl`` table (atomically): ``rows`` with the refined model's predicted centroids
    (:func:`~refine.pipeline.predicted.predicted_table`).  :data:`EXIT_OK`, or :data:`EXIT_OUTPUT` when it could not
    be written (one line)."""
    if ns.out_refl is None:
        return EXIT_OK
    try:
        table = predicted_table(rows, result.params, result.setup, source.index)
        write_reflections(ns.out_refl, table)
    except (ValueError, OSError) as exc:
        print(f"nbtorch-refine: error: cannot write --out-refl {ns.out_refl}: {exc}", file=sys.stderr)
        return EXIT_OUTPUT
    if not ns.quiet:
        print(f"{ns.out_refl}: {int(predicted_rows(table).sum())} of {table.nrows} reflections predicted",
              file=sys.stderr)
    return EXIT_OK


def _write_image(path: str, result) -> None:
    """The refined model image at ``path``: a figure (:data:`~refine.cli.checks.PLOT_EXTENSIONS`), SMV float
    (.img/.smv) or raw float32 (photons/pixel, [slow, fast]; a panel detector's in the layout nbtorch writes it: a
    -geom file's data slab, else the panels stacked along slow)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in PLOT_EXTENSIONS:
        return result.plot(path)
    img = result.model_image().detach().cpu().numpy().astype(np.float32)
    if img.ndim == 3:
        img = panels_to_slab(img, result.geometry) if result.geometry is not None else img.reshape(-1, img.shape[-1])
    if ext not in (".img", ".smv"):
        return write_raw_float(path, img)
    write_smv(path, img, {"PIXEL_SIZE": result.setup.pixel_size, "DISTANCE": float(result.params.detector.distance),
                          "WAVELENGTH": float(result.params.beam.wavelength)})


def _load(ns, flags: List[str], observed: ObservedFile):
    """(params, setup, observed image in photons, the CrystFEL geometry of ``-geom`` or None, the fit options of the
    flags' point-spread function (``-psf``) and of the -geom/-expt file's read-out noise when the gaussian target has
    no ``--readout-noise-adu`` ({} without)) from the flags and the ``observed`` file (its frame);
    :class:`UsageError`."""
    try:
        params, setup, extras = build(parse_args(flags), dtype=getattr(torch, ns.dtype))
        if ns.matrix_out is not None and setup.nanobragg_cell:
            raise UsageError(f"--matrix-out {ns.matrix_out}: the starting model has a -cell, not a -mat matrix; its "
                             "refined cell is written as -cell (drop --matrix-out)")
        geometry = extras.panels.geometry if extras.panels is not None else None
        if ns.out_geom is not None and geometry is None:
            raise UsageError(f"--out-geom {ns.out_geom}: the refined detector is written as a CrystFEL geometry only "
                             "for a detector read from one: give -geom FILE")
        gain, detector = _gain_option(ns, setup, geometry), _detector_file(extras.panels, setup, params)
        return params, setup, read_observed(observed.path, setup, params, overload=ns.overload, adc=ns.adc,
                                            gain=gain, geometry=geometry, label=observed.label,
                                            frame=observed.frame, detector=detector), geometry, \
            {**psf_options(extras.outputs), **readout_option(detector, ns.target, ns.readout_noise_adu)}
    except (ValueError, OSError, ImportError) as exc:
        raise UsageError(str(exc)) from None


def _gain_option(ns, setup, geometry):
    """The gain the options give: ``--gain`` (a number), the ``--gain-map`` file's per-pixel map, or None."""
    if ns.gain_map is None:
        return ns.gain
    if ns.gain is not None:
        raise UsageError(f"--gain {ns.gain:g} and --gain-map {ns.gain_map} both give the gain: give one")
    return read_gain_map(ns.gain_map, setup, geometry)


def _detector_file(source, setup, params) -> Optional[DetectorResponse]:
    """What the -geom or -expt file says of the detector's values (:mod:`refine.targets.detector`), or None."""
    if source is None:
        return None
    if source.geometry is not None:
        return from_crystfel(source.geometry, setup, photon_energy_eV(float(params.beam.wavelength)))
    return from_dials(read_expt(source.name).detector_of(source.experiment), setup, f"-expt {source.name}")


def _write_flags(result, matrix_out: Optional[str], source: Optional[ExptInput]) -> int:
    """Print the refined model as flags (and write the ``--matrix-out`` matrix): :data:`EXIT_OK`, or
    :data:`EXIT_OUTPUT` when the matrix could not be written.  A model whose crystal is an ``.expt``'s exact lattice
    has no flags without a matrix: a note names the outputs that hold it."""
    if source is not None and matrix_out is None and not result.setup.nanobragg_cell:
        print("nbtorch-refine: note: the refined model is not written as flags (its crystal is the .expt's exact "
              "lattice): the refined crystal is written with --out-expt OUT.expt or --matrix-out OUT.mat",
              file=sys.stderr)
        return EXIT_OK
    try:
        if matrix_out is not None:
            result.to_nanobragg_args(matrix_path=matrix_out, write_matrix=True)
        print("refined model: nbtorch " + result.nanobragg_command(write_matrix=False))
    except OSError as exc:
        print(f"nbtorch-refine: error: cannot write --matrix-out {matrix_out}: {exc}", file=sys.stderr)
        return EXIT_OUTPUT
    except ValueError as exc:
        print(f"nbtorch-refine: cannot write the model as flags: {exc}", file=sys.stderr)
    return EXIT_OK


def _write_outputs(ns, result, matrix_out: Optional[str], source: Optional[ExptInput]) -> int:
    """The matrix, JSON, image, plot and detector or experiment files a run asked for: :data:`EXIT_OK`, or
    :data:`EXIT_OUTPUT` when one could not be written (one line each; the others are still written)."""
    status = _write_flags(result, matrix_out, source)
    for option, path, write in (("--json", ns.json, result.to_json), ("--image", ns.image,
                                lambda p: _write_image(p, result)), ("--plot", ns.plot, result.plot),
                                ("--out-geom", ns.out_geom, result.write_geom),
                                ("--out-spectrum", ns.out_spectrum, result.write_spectrum),
                                ("--out-expt", ns.out_expt, lambda p: result.write_expt(p, source.path,
                                                                                        source.record))):
        if path:
            try:
                write(path)
            except (ValueError, OSError) as exc:
                print(f"nbtorch-refine: error: cannot write {option} {path}: {exc}", file=sys.stderr)
                status = EXIT_OUTPUT
    return status


def _inputs(ns, flags: List[str], source: Optional[ExptInput]):
    """(nanoBragg flags of the build, observed image file (:class:`~refine.cli.expt.ObservedFile`), matrix output or
    None), checked with every output before any work: a ``-mat`` model's matrix goes next to ``--json`` unless
    ``--matrix-out`` says where.  :class:`UsageError`."""
    if source is not None:
        flags = source.flags
    observed = ObservedFile(ns.observed) if ns.observed is not None else observed_image(source)
    inputs = flag_inputs(flags)
    matrix_out = ns.matrix_out
    if matrix_out is None and any(flag == "-mat" for flag, _ in inputs):  # a -mat model: its refined matrix
        matrix_out = matrix_output(ns.json)
    check_outputs([("--json", ns.json), ("--image", ns.image), ("--plot", ns.plot), ("--matrix-out", matrix_out),
                   ("--out-geom", ns.out_geom), ("--out-expt", ns.out_expt),
                   ("--out-spectrum", ns.out_spectrum), ("--out-refl", ns.out_refl)],
                  [("OBSERVED", observed.path)] + inputs + ([("--expt", source.path)] if source is not None else [])
                  + ([("--refl", ns.refl)] if ns.refl is not None else []))
    return flags, observed, matrix_out


def _single(argv: List[str]) -> int:
    """One observed image: parse and check, fit, report, write (the exit status)."""
    ns, flags = start(argv, "refine", prog="nbtorch-refine", usage=USAGE, epilog=EPILOG, description="Refine a "
                      "nanoBragg model (given as nanoBragg flags, or an experiment of a DIALS .expt) against an "
                      "observed diffraction image.")
    source = expt_input(ns, flags)
    flags, observed, matrix_out = _inputs(ns, flags, source)
    options = fit_options(nanobragg_args=flags, matrix_path=matrix_out, **arguments(ns, "refine"))
    params, setup, obs, geometry, psf = _load(ns, flags, observed)
    options = options.replace(geometry=geometry, **psf)
    reflections = _reflections(ns, source, setup)
    if reflections is not None:  # a spot-ROI fit: the boxes about the experiment's observed spots
        options = options.replace(spots=reflections)
    t0 = time.perf_counter()
    result = fit(obs, params, setup, options=options, callback=None if ns.quiet else Progress())
    result = dataclasses.replace(result, spectrum_path=ns.out_spectrum)
    if source is not None:
        result = dataclasses.replace(result, expt=_expt_report(ns, source))
    if np.ndim(obs.gain) > 0:
        print(f"note: {observed.path}: photons = (value - {obs.adc_offset:g}) / gain per pixel "
              f"({np.nanmin(obs.gain):g}–{np.nanmax(obs.gain):g} ADU/photon)")
    elif obs.adc_offset or obs.gain != 1.0:
        print(f"note: {observed.path}: photons = (value - {obs.adc_offset:g}) / {obs.gain:g} (ADC offset, gain)")
    print(result.summary())
    status = _write_outputs(ns, result, matrix_out, source)
    status = _write_out_refl(ns, result, reflections, source) or status
    if not ns.quiet:
        print(f"total {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return status if status != EXIT_OK else fit_status(result.converged, result.ok)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``nbtorch-refine`` (its exit status, :mod:`refine.cli.checks`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    images = any(t.split("=", 1)[0] in ("--images", "--expt-list") for t in argv)  # many images: .many
    command = "images" if images else "refine"
    return run("nbtorch-refine", lambda: main_many(argv) if images else _single(argv),
               lambda exc: f"nbtorch-refine: error: {flag_message(str(exc), command)}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
