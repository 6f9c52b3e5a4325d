"""The performance workloads of ``python -m benchmarks``, each run in its own process.

``python -m benchmarks.workloads NAME [--threads T]`` runs workload NAME and prints one JSON line with its figures
and the process's peak RSS (MB).  Every figure is a wall time of this process or a ratio of two of them.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import time

import numpy as np
import torch

import nbtorch

CASE_A = "-default_F 100 -cell 100 100 100 90 90 90 -N 10 -lambda 1 -distance 100 -detpixels 1024"
CASE_B = ("-default_F 100 -cell 100 100 100 90 90 90 -N 10 -lambda 1 -distance 100 -detpixels {n} -mosaic 0.5 "
          "-mosaic_domains 10 -oversample 2 -dispersion 0.2 -dispsteps 3 -divergence 0.5 -divsteps 3")
GRADSTAB = "-default_F 100 -cell {a} {b} {c} {al} {be} {ga} -N 5 -lambda 1 -distance 100 -detpixels 1024"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _best(fn, repeat: int = 2) -> float:
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _samples(s) -> int:
    return s.fpixels * s.spixels * s.oversample**2 * s.thicksteps * s.n_sources * s.n_domains * s.phisteps


def case_b_in_process(dtype: str, fused: bool) -> dict:
    """Case B (512², 600 samples per pixel) in one warm process: first call (compilation included) and best of two."""
    p, s = nbtorch.from_nanobragg_args(CASE_B.format(n=512), dtype=getattr(torch, dtype))
    with torch.no_grad():
        t = time.perf_counter()
        nbtorch.simulate(p, s, fused=fused)
        first = time.perf_counter() - t
        warm = _best(lambda: nbtorch.simulate(p, s, fused=fused))
    return {"first_s": first, "warm_s": warm, "ns_per_sample": warm / _samples(s) * 1e9}


def _with_cell(p, cell):
    return p._replace(crystal=p.crystal._replace(cell=cell))


def derivatives(n: int = 256) -> dict:
    """Case B's per-pixel work on n² pixels, float64: forward (compiled), forward + backward, and jacfwd over ten
    refinable values (cell 6, misset 3, distance 1); warm figures (after one call) and the first call of the
    process."""
    p, s = nbtorch.from_nanobragg_args(CASE_B.format(n=n))
    x0 = torch.cat([p.crystal.cell, p.crystal.misset, p.detector.distance[None]])

    def image(x):
        q = _with_cell(p, x[:6])
        q = q._replace(crystal=q.crystal._replace(misset=x[6:9]), detector=q.detector._replace(distance=x[9]))
        return nbtorch.simulate(q, s)

    with torch.no_grad():
        image(x0)
        fwd = _best(lambda: image(x0))

    def fwd_bwd():
        x = x0.clone().requires_grad_()
        image(x).sum().backward()

    fb_first = _best(fwd_bwd, 1)  # the first reverse pass of a process loads the kernels (or traces the compiled tile)
    fb = _best(fwd_bwd, 1)
    jf_first = _best(lambda: torch.func.jacfwd(image)(x0), 1)  # torch imports dynamo on a process's first jacfwd
    jf = _best(lambda: torch.func.jacfwd(image)(x0), 2)
    return {"forward_s": fwd, "forward_backward_s": fb, "forward_backward_first_s": fb_first, "jacfwd10_s": jf,
            "jacfwd10_first_s": jf_first, "fb_ratio": fb / fwd, "jacfwd_ratio": jf / fwd}


def backward_memory() -> dict:
    """``simulate(...).sum().backward()`` on case A (1024², automatic oversample), float64: time and peak RSS."""
    p, s = nbtorch.from_nanobragg_args(CASE_A)
    cell = p.crystal.cell.clone().requires_grad_()
    t = time.perf_counter()
    nbtorch.simulate(_with_cell(p, cell), s).sum().backward()
    return {"seconds": time.perf_counter() - t, "oversample": s.oversample, "finite": bool(cell.grad.isfinite().all())}


def gradient_stability(count: int = 25, seed: int = 44) -> dict:
    """25 random triclinic cells (a, b, c ∈ [50, 200] Å, angles ∈ [60, 120]°), 1024², automatic oversample, N=5:
    torch.autograd.gradcheck of the image sum with respect to the six cell values, float64.  Also the time of the
    12 finite-difference forwards of every gradcheck (one forward timed apart per cell × 12): the part of the
    workload that no derivative code can shorten."""
    rng = np.random.default_rng(seed)
    passed, t0, cells, fd_floor, apart = 0, time.perf_counter(), [], 0.0, 0.0
    while len(cells) < count:
        a, b, c = rng.uniform(50, 200, 3)
        al, be, ga = rng.uniform(60, 120, 3)
        try:
            p, s = nbtorch.from_nanobragg_args(GRADSTAB.format(a=a, b=b, c=c, al=al, be=be, ga=ga))
        except ValueError:  # angles that make no cell: draw again
            continue
        cells.append(s.oversample)

        def total(cell):
            return nbtorch.simulate(_with_cell(p, cell), s).sum()

        cell = p.crystal.cell.clone().requires_grad_()
        passed += bool(torch.autograd.gradcheck(total, (cell,), eps=1e-6, atol=1e-5, rtol=1e-3, raise_exception=False))
        with torch.no_grad():  # one forward timed apart (not counted in "seconds"): the 12 central differences
            fwd = _best(lambda: total(p.crystal.cell), 1)
        fd_floor, apart = fd_floor + 12 * fwd, apart + fwd
    return {"seconds": time.perf_counter() - t0 - apart, "passed": passed, "count": count,
            "oversample": [min(cells), max(cells)], "finite_difference_s": fd_floor}


WORKLOADS = {"case_b": case_b_in_process, "derivatives": derivatives, "backward_memory": backward_memory,
             "gradient_stability": gradient_stability}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(WORKLOADS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--eager", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    kw = {"dtype": a.dtype, "fused": not a.eager} if a.name == "case_b" else {}
    out = WORKLOADS[a.name](**kw)
    out["peak_rss_mb"] = _peak_mb()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
