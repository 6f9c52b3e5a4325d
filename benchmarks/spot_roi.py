"""``python -m benchmarks.spot_roi``: a spot-ROI fit (pixels in boxes about the observed spots, one background plane per
box: ``refine.fit(..., spots=...)``, ``nbtorch-refine --refl``) against the whole-image fit of the same still, in one
process (issue 21, item 3), reported as a ratio of wall times.

The still: a 30 × 35 × 40 Å orthorhombic cell on 512 × 512 pixels of 0.1 mm at 100 mm (sparse spots, as a real still's
are), 5 photons/pixel of flat background, Poisson noise; the spots are the local maxima of the noiseless image above
2 % of its highest (what a spot finder would give; ``--max-spots N``: the N brightest of them).  Both fits start
from the same indexing-grade model (cell ~1 %, 0.2°, 0.5 mm, 1 px) and refine cell, orientation, distance, beam centre, scale and background with the default
stages, float64, after one warm-up fit of each (so compilation is not timed).  Reported: each fit's wall time (best of
``--repeat``), pixels, the ratio, and the largest difference of a refined value between the two fits in units of the
ROI fit's ESD.  ``--write`` replaces the "Spot-ROI refinement" section of ``benchmarks/RESULTS.md`` and the
``spot_roi`` entry of ``benchmarks/results.json``; the last line printed is always the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

import nbtorch
import refine

from .report import replace_section

HERE = pathlib.Path(__file__).resolve().parent
HEADING = "## Spot-ROI refinement"
FLAGS = ("-default_F 100 -cell 30 35 40 90 90 90 -misset 10 20 30 -N 8 -lambda 1 -distance 100 -pixel 0.1 "
         "-detpixels {n} -oversample 1 -fluence 1e30 -mosaic 0.05 -mosaic_domains 1")
FREE = ("cell", "orientation", "distance", "beam_center", "scale", "background")


def _case(n: int, max_spots=None):
    """(observed, start, setup, spots [k, 2] px) of the still on n × n pixels (the ``max_spots`` brightest)."""
    truth, setup = nbtorch.from_nanobragg_args(FLAGS.format(n=n), dtype=torch.float64)
    image = nbtorch.simulate(truth, setup)
    observed = torch.poisson(image + 5.0, generator=torch.Generator().manual_seed(0))
    a = image.numpy()
    win = sliding_window_view(np.pad(a, 1), (3, 3))
    s, f = np.nonzero((a == win.max((-1, -2))) & (a > 0.02 * a.max()))
    if max_spots is not None:
        keep = np.sort(np.argsort(-a[s, f], kind="stable")[:max_spots])
        s, f = s[keep], f[keep]
    det = truth.detector
    start = truth._replace(
        crystal=truth.crystal._replace(cell=truth.crystal.cell * torch.tensor([1.008, 0.994, 1.01, 1, 1, 1],
                                                                             dtype=torch.float64),
                                       misset=truth.crystal.misset + torch.tensor([0.1, -0.15, 0.1],
                                                                                  dtype=torch.float64)),
        detector=det._replace(distance=det.distance + 0.5,
                              beam_center=det.beam_center + torch.tensor([0.1, -0.08], dtype=torch.float64)),
        beam=truth.beam._replace(fluence=truth.beam.fluence * 2))
    return observed, start, setup, np.stack([f + 0.5, s + 0.5], 1)


def _timed(fit, repeat: int):
    fit()  # warm-up: kernels compiled, caches filled
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fit()
        best = min(best, time.perf_counter() - t0)
    return best, result


def run(n: int, repeat: int, roi_size: int, max_spots=None) -> dict:
    """The figures of one run (see the module docstring)."""
    observed, start, setup, spots = _case(n, max_spots)
    t_whole, whole = _timed(lambda: refine.fit(observed, start, setup, free=FREE), repeat)
    t_roi, roi = _timed(lambda: refine.fit(observed, start, setup, free=FREE, spots=spots, roi_size=roi_size),
                        repeat)
    names = [k for k in whole.values if not k.startswith("background")]
    worst = max(abs(roi.values[k] - whole.values[k]) / roi.esd[k] for k in names)
    return {"pixels": n * n, "spots": len(spots), "roi_size": roi_size, "whole_s": t_whole, "roi_s": t_roi,
            "whole_pixels": whole.n_pixels, "roi_pixels": roi.n_pixels, "ratio": t_whole / t_roi,
            "converged": [bool(whole.converged), bool(roi.converged)], "max_diff_in_esd": worst,
            "threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
            "cores": __import__("os").cpu_count(), "date": time.strftime("%Y-%m-%d")}


def section(res: dict) -> str:
    """The RESULTS.md section of ``res``."""
    return "\n".join([
        HEADING, "",
        f"`python -m benchmarks.spot_roi` on {res['machine']}, {res['cores']} cores, {res['threads']} threads, torch "
        f"{res['torch']}, {res['date']}: one noisy still of {res['pixels']} pixels with {res['spots']} spots, cell, "
        "orientation, distance, beam centre, scale and background refined from the same indexing-grade start with "
        "the default stages (float64, warm; best of the repeats).", "",
        "| fit | pixels fitted | wall time | converged |", "|---|---:|---:|---|",
        f"| whole image | {res['whole_pixels']} | {res['whole_s']:.2f} s | {res['converged'][0]} |",
        f"| spot ROIs ({res['roi_size']} px boxes, one plane each) | {res['roi_pixels']} | {res['roi_s']:.2f} s | "
        f"{res['converged'][1]} |", "",
        f"Speed-up {res['ratio']:.1f}×; the largest difference of a refined value between the two fits is "
        f"{res['max_diff_in_esd']:.2f} ESDs of the ROI fit.", ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.spot_roi", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pixels", type=int, default=512, help="detector side (default 512)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--roi-size", type=int, default=11)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-spots", type=int, default=None, help="box only the N brightest spots")
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md and results.json")
    ns = ap.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    res = run(ns.pixels, ns.repeat, ns.roi_size, ns.max_spots)
    if ns.write:
        replace_section(HERE / "RESULTS.md", HEADING, section(res), first=False)
        path = HERE / "results.json"
        allres = json.loads(path.read_text()) if path.exists() else {}
        allres["spot_roi"] = res
        path.write_text(json.dumps(allres, indent=1) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
