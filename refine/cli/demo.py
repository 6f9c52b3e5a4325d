"""The main job on built-in defaults: simulate an observed still from a known model, refine a perturbed start, report.

Run ``nbtorch-demo [--out DIR]``.  Steps: (1) simulate the true model with nbtorch and add Poisson noise — the
"observed" image; (2) perturb the model by errors typical of indexing (cell 0.7 %, orientation 0.4°, distance 1.5 mm,
beam centre 2.5 px, scale ×2); (3) refine cell, orientation, distance, beam centre and scale with Levenberg–Marquardt
(coarse-to-fine); (4) print a table of true / start / refined ± ESD.  Writes ``DIR/observed.img`` (SMV),
``DIR/observed.png``, ``DIR/fit.png`` (observed / model / residual and the loss curve), ``DIR/fit.json`` and
``DIR/refined_flags.txt`` (the refined model as nanoBragg flags: ``nbtorch $(cat refined_flags.txt)`` re-simulates it).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

import nbtorch
from nbtorch.io import atomic_write, atomic_write_from, write_smv

from .. import fit
from ..model.table import DEFAULT_FREE
from .checks import OneLineParser, UsageError, check_outputs, run

TRUE_ARGS = (
    "-cell 52 61 73 90 90 90 -misset 12 -25 31 -default_F 100 -N 8 -lambda 1.0 -distance 80 -pixel 0.2 "
    "-detpixels 256 -oversample 1 -polar 0.95 -water 0.1 -fluence 1e28"
)
FREE = list(DEFAULT_FREE)
#: The files a run writes into ``--out`` (checked by the safe-output rule before any work).
FILES = ("observed.img", "observed.png", "fit.png", "fit.json", "refined.mat", "refined_flags.txt", "summary.json")
#: The table's rows: the model's reported values (:data:`KEYS`, flattened) and their labels.
KEYS = ("cell", "misset_deg", "distance_mm", "beam_center", "fluence")
LABELS = ("a (Å)", "b (Å)", "c (Å)", "alpha (deg)", "beta (deg)", "gamma (deg)", "misset x (deg)", "misset y (deg)",
          "misset z (deg)", "distance (mm)", "Xbeam (mm)", "Ybeam (mm)", "fluence (ph/m²)")


def save_picture(path: str, image, title: str) -> None:
    """Write a PNG of a ``[slow, fast]`` image (log-scaled photons), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    im = ax.imshow(np.log1p(np.clip(image, 0, None)), cmap="gray_r", origin="upper")
    ax.set(title=title, xlabel="fast (pixels)", ylabel="slow (pixels)")
    fig.colorbar(im, ax=ax, fraction=0.046, label="log(1 + photons)")
    fig.tight_layout()
    atomic_write_from(path, lambda scratch: fig.savefig(scratch, dpi=110))
    plt.close(fig)


def perturb(params, setup):
    """The demo's starting model: ``params`` with errors typical of indexing (cell lengths × 1.007, misset 0.4° ×
    (1, −0.6, 0.8), distance + 1.5 mm, beam centre + 2.5 pixels × (1, −0.7), fluence × 2)."""
    c, d, b = params.crystal, params.detector, params.beam
    t = lambda values: torch.tensor(values, dtype=c.cell.dtype)  # noqa: E731
    crystal = c._replace(cell=c.cell * t([1.007] * 3 + [1.0] * 3), misset=c.misset + 0.4 * t([1.0, -0.6, 0.8]))
    detector = d._replace(distance=d.distance + 1.5, beam_center=d.beam_center + 2.5 * setup.pixel_size
                          * t([1.0, -0.7]))
    beam = b._replace(fluence=b.fluence * 2.0)
    return params._replace(crystal=crystal, detector=detector, beam=beam)


def _numbers(values) -> list:
    """The :data:`LABELS` numbers of a model: ``Params``, or the reported values of a result (keyed by :data:`KEYS`;
    beam centre in mm)."""
    if not isinstance(values, dict):
        c, d = values.crystal, values.detector
        values = dict(zip(KEYS, (c.cell, c.misset, d.distance, d.beam_center, values.beam.fluence)))
    return [float(v) for key in KEYS for v in np.atleast_1d(np.asarray(values[key], dtype=float))]


#: Largest noise seed (torch's generators take a signed 64-bit seed).
MAX_SEED = 2**63 - 1


def main(argv=None) -> int:
    """Entry point of ``nbtorch-demo``: exit 0 converged, 3 not converged, 2 a bad option or an output folder that
    cannot be made (one line), 1 an output that cannot be written, 130/143 interrupted."""
    ap = OneLineParser(prog="nbtorch-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="nbtorch-demo", help="output folder (default nbtorch-demo)")
    ap.add_argument("--seed", type=int, default=1, help=f"noise seed, 0 … {MAX_SEED} (default 1)")
    return run("nbtorch-demo", lambda: _checked_run(ap.parse_args(argv)), lambda exc: "nbtorch-demo: error: "
               + ("cannot write an output: " if isinstance(exc, OSError) else "") + str(exc))


def _checked_run(a) -> int:
    """:func:`_run` once ``--seed`` and the ``--out`` folder and its :data:`FILES` (the safe-output rule) are
    checked; :class:`~refine.cli.checks.UsageError`."""
    if not 0 <= a.seed <= MAX_SEED:
        raise UsageError(f"--seed must be an integer in 0 … {MAX_SEED}, got {a.seed}")
    check_outputs([], folder=("--out", a.out, FILES))
    return _run(a)


def _run(a) -> int:
    """Simulate, perturb, refine and report into ``a.out`` (see the module docstring); the exit status."""
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    true, setup = nbtorch.from_nanobragg_args(TRUE_ARGS)
    ideal = nbtorch.simulate(true, setup)
    gen = torch.Generator().manual_seed(a.seed)
    observed = torch.poisson(ideal, generator=gen)
    print(f"simulated the observed {setup.fpixels}×{setup.spixels} still in {time.perf_counter() - t0:.2f} s "
          f"(max {ideal.max():.0f} photons, mean {ideal.mean():.1f}) and added Poisson noise")
    write_smv(os.path.join(a.out, "observed.img"), np.clip(observed.numpy(), 0, 65535).astype(np.uint16),
              {"PIXEL_SIZE": setup.pixel_size, "DISTANCE": true.detector.distance.item(),
               "WAVELENGTH": true.beam.wavelength.item()})
    save_picture(os.path.join(a.out, "observed.png"), observed.numpy(), "observed (photons)")

    start = perturb(true, setup)
    print(f"refining {', '.join(FREE)} from a perturbed start (Levenberg–Marquardt, coarse to fine) ...")
    result = fit(observed, start, setup, free=FREE, method="lm", nanobragg_args=TRUE_ARGS)
    result.plot(os.path.join(a.out, "fit.png"))
    result.to_json(os.path.join(a.out, "fit.json"))
    flags = result.to_nanobragg_args(matrix_path=os.path.join(a.out, "refined.mat"))
    atomic_write(os.path.join(a.out, "refined_flags.txt"), (" ".join(flags) + "\n").encode())

    columns = zip(LABELS, *map(_numbers, (true, start, result.parameters, result.parameter_esd)))
    table = [dict(zip(("parameter", "true", "start", "refined", "esd"), row)) for row in columns]
    print(f"\n{'parameter':18s} {'true':>14s} {'start':>14s} {'refined':>14s} {'± ESD':>11s} {'|err|/ESD':>9s}")
    for row in table:
        tv, rv, ev = row["true"], row["refined"], row["esd"]
        z = abs(rv - tv) / ev if ev > 0 else float("nan")
        print(f"{row['parameter']:18s} {tv:14.6g} {row['start']:14.6g} {rv:14.6g} {ev:11.2g} {z:9.2f}")
    print(f"\n{'converged' if result.converged else 'NOT converged'} in {result.iterations} iterations, "
          f"{result.seconds:.1f} s; reduced χ² {result.chi2_reduced:.3f}")
    summary = {"true_args": TRUE_ARGS, "free": FREE, "table": table, "converged": bool(result.converged),
               "seconds": result.seconds}
    atomic_write(os.path.join(a.out, "summary.json"), json.dumps(summary, indent=1).encode())
    print(f"wrote {a.out}/: observed.img, observed.png, fit.png (observed / model / residual), fit.json, "
          "refined_flags.txt, summary.json")
    return 0 if result.converged else 3


if __name__ == "__main__":
    raise SystemExit(main())
