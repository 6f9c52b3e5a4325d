"""Wall time of a joint Levenberg–Marquardt refinement of a 512×512 still (refine.fit, issue #4).

Usage: python benchmarks/bench_refine.py [--size 512] [--threads 2] [--seed 1] [--spots-only] [--append-readme]

Simulates a Poisson-noisy still, perturbs the model by errors typical of indexing (cell ~1 %, orientation 0.4°,
distance 1.5 mm, beam centre 2.5 px, scale × 2), refines cell, orientation, distance, beam centre and scale with the
default coarse-to-fine strategy, and prints wall time to convergence, iterations and the final errors.  With
``--append-readme`` the result row is appended to benchmarks/README.md (section "refine").
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's packages, however the script is invoked

import numpy as np  # noqa: E402
import torch  # noqa: E402

import nbtorch  # noqa: E402
import refine  # noqa: E402
from nbtorch.mosaic import matrix_to_xyz_angles  # noqa: E402
from nbtorch.rotation import rot_axis  # noqa: E402
from refine.model.parameters import total_rotation  # noqa: E402

ARGS = ("-default_F 100 -cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -lambda 1 -distance 100 -pixel 0.1 "
        "-detpixels {n} -oversample 1 -fluence 1e30")
FREE = ["cell", "orientation", "distance", "beam_center", "scale"]


def start_model(p, s, seed):
    rng = np.random.default_rng(seed)
    ax = rng.normal(size=3)
    R = rot_axis(torch.tensor(ax / np.linalg.norm(ax)), torch.tensor(math.radians(0.4), dtype=torch.float64))
    mis = torch.tensor(np.degrees(matrix_to_xyz_angles((R @ total_rotation(p)).numpy())), dtype=torch.float64)
    cell = p.crystal.cell.clone()
    cell[:3] *= torch.tensor([1.008, 0.994, 1.01], dtype=torch.float64)
    d = p.detector
    bc = d.beam_center + torch.tensor([2.5, -2.5], dtype=torch.float64) * s.pixel_size
    return p._replace(crystal=p.crystal._replace(cell=cell, misset=mis, orientation=torch.eye(3, dtype=torch.float64)),
                      detector=d._replace(distance=d.distance + 1.5, beam_center=bc),
                      beam=p.beam._replace(fluence=p.beam.fluence * 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--spots-only", action="store_true", help="fit only pixels near spots (+5 %% background)")
    ap.add_argument("--append-readme", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p, s = nbtorch.from_nanobragg_args(ARGS.format(n=a.size))
    truth_img = nbtorch.simulate(p, s)
    obs = torch.poisson(truth_img, generator=torch.Generator().manual_seed(a.seed))
    start = start_model(p, s, a.seed)
    t0 = time.perf_counter()
    res = refine.fit(obs, start, s, free=FREE, crystal_system="orthorhombic", spots_only=a.spots_only)
    wall = time.perf_counter() - t0
    R = total_rotation(res.params) @ total_rotation(p).T
    rot = math.degrees(math.acos(min(1.0, (float(torch.trace(R)) - 1) / 2)))
    cell = float(((res.params.crystal.cell[:3] - p.crystal.cell[:3]) / p.crystal.cell[:3]).abs().max()) * 100
    dist = abs(float(res.params.detector.distance - p.detector.distance))
    bc = float((res.params.detector.beam_center - p.detector.beam_center).abs().max()) / s.pixel_size
    per_stage = ", ".join(f"{st['stage']} {st['iterations']}" for st in res.stages)
    print(f"{s.fpixels}×{s.spixels} px, {res.n_pixels} fitted, {len(res.names)} parameters, {a.threads} threads, "
          f"torch {torch.__version__}")
    print(f"converged={res.converged} ({res.message}); wall {wall:.1f} s; iterations {res.iterations} ({per_stage})")
    print(f"errors: cell {cell:.4f} %, orientation {rot:.4f} deg, distance {dist:.4f} mm, beam centre {bc:.4f} px")
    row = (f"| {s.fpixels}×{s.spixels} | {'spots only' if a.spots_only else 'all'} ({res.n_pixels} px) | "
           f"{len(res.names)} | {a.threads} | {wall:.1f} | {res.iterations} | {res.converged} | "
           f"{cell:.4f} % / {rot:.4f}° / {dist:.4f} mm / {bc:.4f} px | {platform.processor() or platform.machine()} |")
    print(row)
    if a.append_readme:
        path = os.path.join(ROOT, "benchmarks", "README.md")
        text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
        head = "## refine: joint LM refinement of a still (benchmarks/bench_refine.py)"
        if head not in text:
            text = text.rstrip("\n") + "\n\n" + head + "\n\n" + (
                "Cell, orientation, distance, beam centre and scale refined jointly with `refine.fit` (Levenberg–"
                "Marquardt, default coarse-to-fine strategy, Poisson target) from errors typical of indexing (cell "
                "~1 %, orientation 0.4°, distance 1.5 mm, beam centre 2.5 px, scale × 2).  Wall time to "
                "convergence includes the search stage and the final ESDs.\n\n"
                "| detector | pixels fitted | parameters | threads | seconds | iterations | converged | "
                "final errors (cell / orientation / distance / beam centre) | CPU |\n"
                "|---|---|---|---|---|---|---|---|---|\n")
        lines = text.rstrip("\n").split("\n")
        # append the row at the end of this section's table
        start = lines.index(head)
        end = start + 1
        while end < len(lines) and not lines[end].startswith("## "):
            end += 1
        while end > start and not lines[end - 1].startswith("|"):
            end -= 1
        lines.insert(end, row)
        from nbtorch.io._atomic import atomic_write

        atomic_write(path, ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
