"""Wall time of a Levenberg–Marquardt refinement of a noisy still (refine.fit, issues #4 and #24).

Usage: python benchmarks/bench_refine.py [--case ortho|triclinic|mosaic] [--size N] [--threads 2] [--seed 1]
       [--spots-only] [--compare DIR [--repeat R]] [--json] [--append-readme]

Cases: ``ortho`` (512², orthorhombic: cell, orientation, distance, beam centre and scale from errors typical of
indexing: cell ~1 %, orientation 0.4°, distance 1.5 mm, beam centre 2.5 px, scale × 2); ``triclinic`` (384², a
triclinic cell: the same groups plus two detector tilts, 3 mrad each); ``mosaic`` (the whole ``nbtorch-refine``
process of ``python -m benchmarks``' refinement row: 512², 25 mosaic domains, orientation, N, mosaic spread and
scale).  Prints wall time to convergence, iterations, per-stage seconds and the final errors.

``--compare DIR`` runs the case ``--repeat`` times (default 2) alternately with the ``refine`` package of DIR (a
checkout of another revision: ``git worktree add DIR REV``) and of this tree, each in a fresh process, and prints the
best times and their ratio with the load average (compare ratios of one run: the machine may be shared).
``--append-readme`` appends an ``ortho``/``triclinic`` result row to benchmarks/README.md (section "refine").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.environ.get("BENCH_REFINE_ROOT") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's packages (or --compare's other tree), however the script is invoked

import numpy as np  # noqa: E402
import torch  # noqa: E402

import nbtorch  # noqa: E402
import refine  # noqa: E402
from nbtorch.mosaic import matrix_to_xyz_angles  # noqa: E402
from nbtorch.rotation import rot_axis  # noqa: E402
from refine.model.parameters import total_rotation  # noqa: E402

ARGS = {"ortho": ("-default_F 100 -cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -lambda 1 -distance 100 "
                  "-pixel 0.1 -detpixels {n} -oversample 1 -fluence 1e30", 512, "orthorhombic"),
        "triclinic": ("-default_F 100 -cell 40 50 60 80 95 105 -misset 10 20 30 -N 6 -lambda 1 -distance 100 "
                      "-pixel 0.1 -detpixels {n} -oversample 1 -fluence 1e30", 384, "triclinic")}
FREE = ["cell", "orientation", "distance", "beam_center", "scale"]
TILTS = ["detector_rotation.y", "detector_rotation.z"]  # x is the beam (MOSFLM)
MOSAIC_TRUTH = ("-default_F 100 -cell 60 70 80 90 90 90 -misset 10 20 30 -N 8 -lambda 1 -distance 100 -pixel 0.1 "
                "-detpixels 512 -mosaic 0.3 -mosaic_domains 25 -fluence 1e29 -seed 5")
MOSAIC_START = MOSAIC_TRUTH.replace("-misset 10 20 30", "-misset 10.15 19.9 30.1").replace(
    "-N 8", "-N 7").replace("-mosaic 0.3", "-mosaic 0.4").replace("-fluence 1e29", "-fluence 1.5e29")


def start_model(p, s, seed, tilt_mrad: float = 0.0):
    """The starting model: the truth ``p`` with indexing-grade errors (see the module docstring)."""
    rng = np.random.default_rng(seed)
    ax = rng.normal(size=3)
    R = rot_axis(torch.tensor(ax / np.linalg.norm(ax)), torch.tensor(math.radians(0.4), dtype=torch.float64))
    mis = torch.tensor(np.degrees(matrix_to_xyz_angles((R @ total_rotation(p)).numpy())), dtype=torch.float64)
    cell = p.crystal.cell.clone()
    cell[:3] *= torch.tensor([1.008, 0.994, 1.01], dtype=torch.float64)
    d = p.detector
    bc = d.beam_center + torch.tensor([2.5, -2.5], dtype=torch.float64) * s.pixel_size
    rot = d.rotation + torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64) * math.degrees(tilt_mrad / 1000)
    return p._replace(crystal=p.crystal._replace(cell=cell, misset=mis, orientation=torch.eye(3, dtype=torch.float64)),
                      detector=d._replace(distance=d.distance + 1.5, beam_center=bc, rotation=rot),
                      beam=p.beam._replace(fluence=p.beam.fluence * 2))


def still(a) -> dict:
    """Fit the ``ortho`` or ``triclinic`` case in this process: figures as a dict."""
    flags, size, system = ARGS[a.case]
    p, s = nbtorch.from_nanobragg_args(flags.format(n=a.size or size), dtype=torch.float64)
    obs = torch.poisson(nbtorch.simulate(p, s), generator=torch.Generator().manual_seed(a.seed))
    tilts = a.case == "triclinic"
    start = start_model(p, s, a.seed, 3.0 if tilts else 0.0)
    t0 = time.perf_counter()
    res = refine.fit(obs, start, s, free=FREE + (TILTS if tilts else []), crystal_system=system,
                     spots_only=a.spots_only)
    wall = time.perf_counter() - t0
    R = total_rotation(res.params) @ total_rotation(p).T
    return {"case": a.case, "pixels": s.fpixels * s.spixels, "fitted": res.n_pixels, "parameters": len(res.names),
            "seconds": wall, "iterations": res.iterations, "converged": bool(res.converged),
            "stages": {st["stage"]: [round(st["seconds"], 2), st.get("iterations"), st.get("evaluations")] for st in res.stages},
            "orientation_deg": math.degrees(math.acos(min(1.0, (float(torch.trace(R)) - 1) / 2))),
            "cell_pct": float(((res.params.crystal.cell[:3] - p.crystal.cell[:3]) / p.crystal.cell[:3]).abs().max())
            * 100, "distance_mm": abs(float(res.params.detector.distance - p.detector.distance)),
            "values": {k: float(v) for k, v in res.values.items()}}


def mosaic(a) -> dict:
    """The whole ``nbtorch-refine`` process of the 25-domain still (the observed image simulated first)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(a.threads))
    with tempfile.TemporaryDirectory() as tmp:
        obs, fit = os.path.join(tmp, "obs.img"), os.path.join(tmp, "fit.json")
        subprocess.run([sys.executable, "-m", "nbtorch", *MOSAIC_TRUTH.split(), "-noisefile", obs, "-floatfile",
                        os.path.join(tmp, "truth.bin")], env=env, cwd=tmp, check=True, capture_output=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "refine.cli", obs, "--refine", "orientation,ncells,mosaic,scale",
                        "--json", fit, "--quiet", "--threads", str(a.threads), *MOSAIC_START.split()], env=env,
                       cwd=tmp, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        res = json.loads(open(fit).read())
    return {"case": "mosaic", "seconds": wall, "iterations": res["iterations"], "converged": res["converged"],
            "stages": {st["stage"]: [round(st["seconds"], 2), st.get("iterations"), st.get("evaluations")] for st in res["stages"]}, "values": res["values"]}


def append_readme(res: dict, threads: int) -> None:
    """Append ``res`` (an ``ortho``/``triclinic`` fit) as a row of benchmarks/README.md's "refine" table."""
    path = os.path.join(ROOT, "benchmarks", "README.md")
    head = "## refine: joint LM refinement of a still (benchmarks/bench_refine.py)"
    side = int(round(math.sqrt(res["pixels"])))
    row = (f"| {side}×{side} | {res['fitted']} px | {res['parameters']} | {threads} | {res['seconds']:.1f} | "
           f"{res['iterations']} | {res['converged']} | {res['cell_pct']:.4f} % / {res['orientation_deg']:.4f}° / "
           f"{res['distance_mm']:.4f} mm / — | {platform.processor() or platform.machine()} |")
    lines = open(path).read().rstrip("\n").split("\n")
    end = lines.index(head) + 1
    while end < len(lines) and not lines[end].startswith("## "):
        end += 1
    while not lines[end - 1].startswith("|"):
        end -= 1
    lines.insert(end, row)
    from nbtorch.io._atomic import atomic_write

    atomic_write(path, ("\n".join(lines) + "\n").encode())


def compare(a) -> None:
    """Alternate runs of this tree and of ``a.compare``'s (fresh processes); print best times and the ratio."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, os.path.abspath(__file__), "--case", a.case, "--threads", str(a.threads), "--seed",
            str(a.seed), "--json"] + (["--size", str(a.size)] if a.size else []) + (
        ["--spots-only"] if a.spots_only else [])
    best = {}
    for _ in range(a.repeat):
        for name, root in (("before", os.path.abspath(a.compare)), ("after", here)):
            out = subprocess.run(argv, env=dict(os.environ, BENCH_REFINE_ROOT=root), check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            res = json.loads(out)
            print(name, json.dumps(res), flush=True)
            if name not in best or res["seconds"] < best[name]["seconds"]:
                best[name] = res
    b, f = best["before"]["seconds"], best["after"]["seconds"]
    print(f"{a.case}: before {b:.1f} s, after {f:.1f} s, ratio {b / f:.2f}× (best of {a.repeat}; load average "
          f"{os.getloadavg()[0]:.1f}; {a.threads} threads; {platform.processor() or platform.machine()})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("ortho", "triclinic", "mosaic"), default="ortho")
    ap.add_argument("--size", type=int, default=None, help="detector side (default: the case's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--spots-only", action="store_true", help="fit only pixels near spots (+5 %% background)")
    ap.add_argument("--compare", metavar="DIR", help="a tree with another revision's refine package")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    ap.add_argument("--append-readme", action="store_true", help="add the result row to benchmarks/README.md")
    a = ap.parse_args()
    if a.compare:
        return compare(a)
    torch.set_num_threads(a.threads)
    res = mosaic(a) if a.case == "mosaic" else still(a)
    if a.append_readme and a.case != "mosaic":
        append_readme(res, a.threads)
    if a.json:
        print(json.dumps(res))
        return None
    print(f"{a.case}: converged={res['converged']}; wall {res['seconds']:.1f} s; iterations {res['iterations']}; "
          f"stages {res['stages']}; {a.threads} threads, torch {torch.__version__}")
    print({k: v for k, v in res.items() if k.endswith(("_deg", "_pct", "_mm"))})
    return None


if __name__ == "__main__":
    main()
