"""``nbtorch-refine``: refine a nanoBragg model against an observed image from the command line.

    nbtorch-refine OBSERVED [--refine GROUPS] [--method lm|lbfgs|adam] [--max-iter N] [--json OUT] [--image OUT]
                   [more --options] <nanoBragg flags of the starting model>

Options start with ``--``; everything else after OBSERVED is the starting model as nanoBragg flags (single dash, as
``nbtorch``/``nanoBragg`` take them).  The observed image is read with :func:`nbtorch.io.images.read_image` (SMV,
raw float — its shape comes from the flags — or anything fabio reads).  Progress (one line per iteration: stage,
iteration, loss, change, step in standard errors, damping) goes to stderr; the summary to stdout.

Exit status: 0 converged, 3 finished without meeting a convergence rule, 1 bad input, 2 bad usage.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

# our options and how many values each takes (everything else after OBSERVED goes to the nanoBragg parser)
_OPTIONS = {
    "--refine": 1, "--method": 1, "--max-iter": 1, "--json": 1, "--image": 1, "--target": 1, "--read-noise": 1,
    "--crystal-system": 1, "--ncells-mode": 1, "--no-coarse": 0, "--spots-only": 0, "--overload": 1,
    "--background": 3, "--matrix-out": 1, "--plot": 1, "--esd-scale": 1, "--threads": 1, "--quiet": 0,
    "--coarse-iter": 1, "--max-shift": 1, "--lr": 1, "--schedule": 1, "--dtype": 1, "--help": 0,
    "--allow-degenerate": 0,
}


def _parser() -> argparse.ArgumentParser:
    from .parameters import CRYSTAL_SYSTEMS, DEFAULT_FREE, GROUPS

    ap = argparse.ArgumentParser(
        prog="nbtorch-refine",
        usage=("nbtorch-refine OBSERVED [--refine GROUPS] [--method lm|lbfgs|adam] [--max-iter N] [--json OUT] "
               "[--image OUT] [more --options] <nanoBragg flags of the starting model>"),
        description="Refine a nanoBragg model (given as nanoBragg flags) against an observed diffraction image.",
        epilog=(
            "Groups: " + ", ".join(GROUPS) + " (sub-groups background.plane, background.constant, background.water; "
            "single scalars such as cell.a, orientation.z, detector_rotation.y).  Many images: nbtorch-refine "
            "--images LIST --help.  Example:\n"
            "  nbtorch-refine obs.img --refine cell,orientation,distance,beam_center,scale --json fit.json "
            "-cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -default_F 100 -distance 60 -detpixels 96 -pixel 0.2"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("observed", help="observed image (SMV .img, raw float .bin with the shape of the flags, CBF, ...)")
    ap.add_argument("--refine", default=",".join(DEFAULT_FREE), help="comma-separated groups to refine "
                    f"(default {','.join(DEFAULT_FREE)})")
    ap.add_argument("--method", default="lm", choices=["lm", "lbfgs", "adam"], help="minimiser (default lm)")
    ap.add_argument("--max-iter", type=int, default=None, help="iterations of the final stage")
    ap.add_argument("--json", default=None, help="write the result as JSON here")
    ap.add_argument("--image", default=None, help="write the refined model image here (.png/.pdf/.svg: a plot of "
                    "observed/model/residual and the loss; .img/.smv: SMV float; else raw float32)")
    ap.add_argument("--target", default="poisson", choices=["poisson", "gaussian", "lsq", "anscombe"])
    ap.add_argument("--read-noise", type=float, default=1.0, help="read noise σ (photons) of the gaussian target")
    ap.add_argument("--crystal-system", default="auto", choices=["auto"] + list(CRYSTAL_SYSTEMS),
                    help="constrain the cell (default auto: the highest symmetry the starting cell satisfies within "
                    "0.1%% and 0.1 deg)")
    ap.add_argument("--allow-degenerate", action="store_true", help="refine free parameters the image cannot tell "
                    "apart (a detector rotation about the beam with the crystal's; two-theta with the detector "
                    "rotation about its axis under a beam pivot); refused otherwise")
    ap.add_argument("--ncells-mode", default="auto", choices=["auto", "isotropic", "anisotropic"])
    ap.add_argument("--no-coarse", action="store_true", help="skip the coarse-to-fine stages")
    ap.add_argument("--coarse-iter", type=int, default=8, help="iterations of each broadened stage (default 8)")
    ap.add_argument("--max-shift", type=int, default=8, help="beam-centre translation search radius (pixels)")
    ap.add_argument("--spots-only", action="store_true", help="fit only pixels near spots plus a background sample")
    ap.add_argument("--overload", type=float, default=None, help="exclude pixels at or above this value")
    ap.add_argument("--background", type=float, nargs=3, default=None, metavar=("C0", "CFAST", "CSLOW"),
                    help="starting background plane (photons/pixel)")
    ap.add_argument("--matrix-out", default=None, help="where to write the refined MOSFLM matrix of a -mat model "
                    "(default: next to --json, else refined.mat)")
    ap.add_argument("--plot", default=None, help="also save the observed/model/residual/loss figure here")
    ap.add_argument("--esd-scale", default="auto", choices=["auto", "chi2", "none"])
    ap.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (typical errors per step)")
    ap.add_argument("--schedule", default="cosine", choices=["constant", "cosine", "exponential", "plateau"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--quiet", action="store_true", help="no per-iteration progress")
    return ap


def split_argv(argv: Sequence[str]):
    """Split the command line into (our tokens incl. OBSERVED, nanoBragg flags)."""
    ours: List[str] = []
    flags: List[str] = []
    observed_seen = False
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            name = tok.split("=", 1)[0]
            n = _OPTIONS.get(name)
            if n is None:
                ours.append(tok)  # argparse reports it
                i += 1
                continue
            take = 0 if "=" in tok else n
            ours.extend(argv[i: i + 1 + take])
            i += 1 + take
        elif tok in ("-h",):
            ours.append(tok)
            i += 1
        elif not observed_seen and not tok.startswith("-"):
            ours.append(tok)
            observed_seen = True
            i += 1
        else:
            flags.append(tok)
            i += 1
    return ours, flags


class Progress:
    """Per-iteration progress lines on a stream."""

    def __init__(self, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.prev = None
        self.stage = None
        print(f"{'stage':9s} {'iter':>4s} {'loss':>17s} {'change':>12s} {'step/σ':>9s} {'damping':>10s}",
              file=self.stream)

    def __call__(self, h: dict):
        if h.get("stage") != self.stage:
            self.stage, self.prev = h.get("stage"), None
        change = "" if self.prev is None else f"{h['loss'] - self.prev:12.5g}"
        self.prev = h["loss"]
        print(f"{str(h.get('stage', '')):9s} {h['iteration']:4d} {h['loss']:17.10g} {change:>12s} "
              f"{h['step']:9.3g} {h['damping']:10.3g}", file=self.stream, flush=True)


def _write_image(path: str, result) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
        result.plot(path)
        return
    import numpy as np

    img = result.model_image().detach().cpu().numpy().astype(np.float32)
    if ext in (".img", ".smv"):
        from nbtorch.io.smv import write_smv

        write_smv(path, img, {"PIXEL_SIZE": result.setup.pixel_size,
                              "DISTANCE": float(result.params.detector.distance),
                              "WAVELENGTH": float(result.params.beam.wavelength)})
    else:
        from nbtorch.io.images import write_raw_float

        write_raw_float(path, img)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``nbtorch-refine`` (returns the exit status)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(t == "--images" or t.startswith("--images=") for t in argv):  # many images: refine/cli_many.py
        from .cli_many import main as main_many

        return main_many(argv)
    ours, flags = split_argv(argv)
    ap = _parser()
    try:
        ns = ap.parse_args(ours)
    except SystemExit as exc:
        return int(exc.code or 0)
    import torch

    import nbtorch
    from nbtorch.io.images import RAW_EXTENSIONS, read_image

    from .fit import fit

    if ns.threads:
        torch.set_num_threads(int(ns.threads))
    if not flags:
        print("nbtorch-refine: give the starting model as nanoBragg flags after OBSERVED (see --help)",
              file=sys.stderr)
        return 2
    dtype = torch.float64 if ns.dtype == "float64" else torch.float32
    try:
        params, setup = nbtorch.from_nanobragg_args(flags, dtype=dtype)
        raw = os.path.splitext(ns.observed)[1].lower() in RAW_EXTENSIONS
        obs = read_image(ns.observed, shape=(setup.spixels, setup.fpixels) if raw else None, overload=ns.overload)
        if obs.data.shape != (setup.spixels, setup.fpixels):
            raise ValueError(f"{ns.observed} is {obs.data.shape[1]}×{obs.data.shape[0]} pixels (fast × slow) but the "
                             f"flags describe a {setup.fpixels}×{setup.spixels} detector")
        matrix_out = ns.matrix_out
        if matrix_out is None and not setup.nanobragg_cell:
            matrix_out = (os.path.splitext(ns.json)[0] + ".mat") if ns.json else "refined.mat"
        free = [g for g in ns.refine.replace(",", " ").split() if g]
        t0 = time.perf_counter()
        result = fit(
            obs, params, setup, free=free, method=ns.method, target=ns.target, read_noise=ns.read_noise,
            crystal_system=ns.crystal_system, ncells_mode=ns.ncells_mode, background=ns.background,
            max_iter=ns.max_iter, coarse_to_fine=not ns.no_coarse, coarse_iter=ns.coarse_iter,
            max_shift=ns.max_shift, spots_only=ns.spots_only, lr=ns.lr, schedule=ns.schedule,
            esd_scale=ns.esd_scale, callback=None if ns.quiet else Progress(), nanobragg_args=flags,
            matrix_path=matrix_out, allow_degenerate=ns.allow_degenerate,
        )
    except (ValueError, OSError) as exc:
        print(f"nbtorch-refine: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    try:
        if matrix_out is not None:
            result.to_nanobragg_args(matrix_path=matrix_out, write_matrix=True)
        print("refined model: nbtorch " + result.nanobragg_command(write_matrix=False))
    except ValueError as exc:
        print(f"nbtorch-refine: cannot write the model as flags: {exc}", file=sys.stderr)
    if ns.json:
        result.to_json(ns.json)
    if ns.image:
        _write_image(ns.image, result)
    if ns.plot:
        result.plot(ns.plot)
    if not ns.quiet:
        print(f"total {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return 0 if result.converged else 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
