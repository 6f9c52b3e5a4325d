"""Structure factors from many stills (issue 23): stills per minute and seconds per outer cycle of
``refine.fit_structure_factors`` against the number of stills and of Dask workers.

Usage: python benchmarks/ensemble.py [--stills 5,10,20] [--workers 0,1,2] [--cycles 2] [--per-image scale] [--write]

Each case: N Poisson-noisy 48×48 stills (one sample per pixel, a 25 × 27 × 29 Å P1 cell, N = 5 cells, ~300
reflections in view) of random orientations, started from |F| 30 % off (uniform, per reflection) and fluence × 1.2;
``--per-image`` groups refined per shot (final stage only, 10 iterations), then the F step.  Workers 0: in this
process; k ≥ 1: a local Dask cluster of k worker processes (``refine.scaleout.make_client``; its start is timed
apart).  Reported: seconds per cycle (the mean), stills per minute (stills × cycles / run minutes, cluster start
excluded) and the final CC to the true |F|, after a warm-up run; and the memory of one still's design (the sparse
pixel × table coefficients the F step works from, :mod:`refine.ensemble.design`) against its observed pixels.
Prints a Markdown table; ``--write`` also puts it in benchmarks/RESULTS.md (section "Structure factors from many
stills").  Run it on an idle machine: the numbers are wall-clock times.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's packages, however the script is invoked

import numpy as np  # noqa: E402
import torch  # noqa: E402

import nbtorch  # noqa: E402
import refine  # noqa: E402
from nbtorch.types import Structure  # noqa: E402
from refine.ensemble import asu_map  # noqa: E402

BASE = ("-default_F 1 -cell 25 27 29 90 90 90 -N 5 -lambda 1 -distance 50 -pixel 0.3 -detpixels 48 -oversample 1 "
        "-fluence 1e30")
SHAPE, HKL_MIN = (13, 13, 13), (-6, -6, -6)
HEADING = "## Structure factors from many stills"


def stills(n: int, seed: int = 0):
    """(observed, starts, setup, true class |F|) of n stills."""
    p0, s0 = nbtorch.from_nanobragg_args(BASE, dtype=torch.float64)
    setup = s0.replace(hkl_min=HKL_MIN)
    amap = asu_map(HKL_MIN, SHAPE, "P 1")
    ids = amap.ids.reshape(-1)
    rng = np.random.default_rng(seed)
    F_true = rng.uniform(40, 160, amap.n)
    F_start = F_true * (1 + 0.3 * rng.uniform(-1, 1, amap.n))

    def table(values):
        return torch.as_tensor(np.where(ids >= 0, values[np.maximum(ids, 0)], 0.0).reshape(SHAPE))

    zero = p0.structure.default_F * 0
    obs, starts = [], []
    for k in range(n):
        crystal = p0.crystal._replace(misset=torch.tensor(rng.uniform(0, 360, 3), dtype=torch.float64))
        p = p0._replace(structure=Structure(table(F_true), zero), crystal=crystal)
        obs.append(torch.poisson(nbtorch.simulate(p, setup, fused=False), generator=torch.Generator().manual_seed(k)))
        starts.append(p._replace(structure=Structure(table(F_start), zero),
                                 beam=p.beam._replace(fluence=p.beam.fluence * 1.2)))
    return obs, starts, setup, F_true


def run_case(n: int, workers: int, cycles: int, per_image) -> dict:
    """One timed run: its row of the table."""
    obs, starts, setup, F_true = stills(n)
    client, cluster, started = None, None, 0.0
    if workers:
        from refine.scaleout import make_client

        t0 = time.perf_counter()
        client, cluster, _ = make_client(workers)
        started = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        res = refine.fit_structure_factors(obs, starts, setup, space_group="P 1", per_image=per_image,
                                           cycles=cycles, max_iter=10, coarse_to_fine=False, client=client)
        seconds = time.perf_counter() - t0
    finally:
        if client is not None:
            client.close()
            cluster.close()
    on = res.refined
    return {"stills": n, "workers": workers, "start": started, "seconds": seconds,
            "per_cycle": float(np.mean([r["seconds"] for r in res.rows])), "per_minute": 60.0 * n * cycles / seconds,
            "refined": int(on.sum()), "cc": float(np.corrcoef(res.F[on], F_true[on])[0, 1])}


def design_memory() -> dict:
    """Bytes of one still's design (all its pixels; row, col int64, coef float64, const float64) and of its observed
    pixels (float64), and the design's entries per pixel."""
    from refine.ensemble.design import shot_design

    obs, starts, setup, _ = stills(1)
    index = torch.arange(obs[0].numel())
    d = shot_design(starts[0], setup, index)
    nbytes = sum(t.numel() * t.element_size() for t in (d.row, d.col, d.coef, d.const))
    return {"design_bytes": nbytes, "observed_bytes": obs[0].numel() * 8, "per_pixel": len(d.row) / len(index)}


def table(rows, cycles: int, per_image, memory: dict) -> str:
    """The Markdown table of the runs, with a line on the design's memory."""
    head = (f"`python benchmarks/ensemble.py` on {platform.processor() or platform.machine()}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads; {cycles} cycles, per image: "
            f"{','.join(per_image)}\n\n| stills | workers | cluster start (s) | run (s) | s per cycle | stills/min | "
            "refined | CC to truth |\n|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['stills']} | {r['workers'] or 'in process'} | {r['start']:.1f} | {r['seconds']:.1f} | "
             f"{r['per_cycle']:.2f} | {r['per_minute']:.0f} | {r['refined']} | {r['cc']:.4f} |" for r in rows]
    mem = (f"\nOne still's design: {memory['per_pixel']:.2f} entries per pixel, {memory['design_bytes'] / 1024:.0f} KiB "
           f"= {memory['design_bytes'] / memory['observed_bytes']:.1f}× its observed pixels in float64 (memory grows "
           "with the pixels fitted, not with pixels × reflections).")
    return "\n".join([head] + lines) + "\n" + mem


def main(argv=None) -> int:
    """Run the cases and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stills", default="5,10,20", help="numbers of stills, comma-separated")
    ap.add_argument("--workers", default="0,1,2", help="Dask workers per case (0: in this process)")
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--per-image", default="scale", help="groups refined per shot")
    ap.add_argument("--write", action="store_true", help="also write the table to benchmarks/RESULTS.md")
    ns = ap.parse_args(argv)
    per_image = ns.per_image.split(",")
    run_case(2, 0, 1, per_image)  # warm-up: first calls, caches
    rows = [run_case(int(n), int(w), ns.cycles, per_image) for n in ns.stills.split(",")
            for w in ns.workers.split(",")]
    text = table(rows, ns.cycles, per_image, design_memory())
    print(text)
    if ns.write:
        from benchmarks.report import replace_section

        replace_section(pathlib.Path(ROOT) / "benchmarks" / "RESULTS.md", HEADING, f"{HEADING}\n\n{text}\n",
                        first=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
