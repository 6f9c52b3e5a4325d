"""Simulate the issue's bounded-memory case and print peak RSS: 1024×1024 pixels, 10 mosaic domains × 15 sources
(3×3 round divergence grid → 5 directions × 3 wavelengths) × 4 sub-pixels, float32.

Usage: python benchmarks/memory_case.py [--rows N]   (N < 1024 renders only the first N rows, for quick checks)
Prints one JSON line: {"seconds", "peak_rss_mb", "samples", "max", "rows"}.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch

import nbtorch

ARGS = ("-default_F 100 -cell 100 100 100 90 90 90 -misset 10 20 30 -N 10 -lambda 1 -distance 100 -pixel 0.1 "
        "-detpixels 1024 -oversample 2 -mosaic 0.5 -mosaic_domains 10 -hdivrange 1 -vdivrange 1 -divsteps 3 "
        "-dispersion 0.5 -dispsteps 3")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    a = ap.parse_args()
    params, setup = nbtorch.from_nanobragg_args(ARGS, dtype=torch.float32)
    assert (setup.n_domains, setup.n_sources, setup.oversample**2) == (10, 15, 4)
    if a.rows < setup.spixels:
        setup = setup.replace(roi=(0, setup.fpixels - 1, 0, a.rows - 1))
    t = time.perf_counter()
    with torch.no_grad():
        img = nbtorch.simulate(params, setup)
    dt = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    samples = a.rows * setup.fpixels * setup.n_domains * setup.n_sources * setup.oversample**2
    print(json.dumps({"seconds": round(dt, 2), "peak_rss_mb": round(rss, 1), "samples": samples,
                      "max": float(img.max()), "rows": a.rows}))


if __name__ == "__main__":
    main()
