"""Speed of simulate(): float64 vs float32, eager vs torch.compile, and gradient cost — reported as ratios in one run.

Usage: python benchmarks/bench_simulate.py [--size 256] [--compile]
Prints a markdown table; wall-clock numbers depend on the machine, the ratios much less.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.func import jacfwd

import nbtorch

ARGS = ("-default_F 100 -cell 79 79 38 90 90 90 -misset 10 20 30 -N 10 -lambda 1 -distance 100 -pixel 0.1 "
        "-detpixels {n} -oversample 2 -mosaic 0.3 -mosaic_domains 5 -hdivrange 0.5 -vdivrange 0.5 -divsteps 3")


def bench(fn, repeat=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow first call)")
    a = ap.parse_args()
    rows = []
    p64, s = nbtorch.from_nanobragg_args(ARGS.format(n=a.size))
    p32, _ = nbtorch.from_nanobragg_args(ARGS.format(n=a.size), dtype=torch.float32)
    samples = s.fpixels * s.spixels * s.oversample**2 * s.n_sources * s.n_domains
    with torch.no_grad():
        t64 = bench(lambda: nbtorch.simulate(p64, s))
        t32 = bench(lambda: nbtorch.simulate(p32, s))
    rows.append(("eager float64", t64, 1.0))
    rows.append(("eager float32", t32, t64 / t32))

    def f(cell):
        return nbtorch.simulate(p64._replace(crystal=p64.crystal._replace(cell=cell)), s)

    tj = bench(lambda: jacfwd(f)(p64.crystal.cell), repeat=1)
    rows.append(("jacfwd over cell (6 columns), float64", tj, t64 / tj))
    if a.compile:
        cs = torch.compile(nbtorch.simulate)
        t0 = time.perf_counter()
        cs(p32, s)
        first = time.perf_counter() - t0
        tc = bench(lambda: cs(p32, s))
        rows.append((f"torch.compile float32 (first call {first:.1f} s)", tc, t64 / tc))
    print(f"{s.fpixels}×{s.spixels} pixels, {s.oversample**2} sub-pixels, {s.n_sources} sources, {s.n_domains} domains "
          f"= {samples / 1e6:.1f} M samples; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| variant | seconds | speed vs eager float64 |\n|---|---|---|")
    for name, t, r in rows:
        print(f"| {name} | {t:.3f} | {r:.2f}× |")
    print(f"\neager float64 throughput: {samples / t64 / 1e6:.1f} M samples/s")


if __name__ == "__main__":
    main()
