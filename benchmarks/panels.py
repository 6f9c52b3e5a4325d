"""``python -m benchmarks.panels``: the cost of a detector of many panels against one flat panel of the same pixel
count (issue 20, item 7), measured in one process and reported as ratios.

The detectors, all at 100 mm with 75 µm pixels, the beam along +z through their middle (CrystFEL's lab frame):

* a Jungfrau-4M-like layout of 8 modules (2 columns × 4 rows) of 512 × 1024 pixels (slow × fast), each 2 × 4 ASICs
  of 256 × 256, with gaps of :data:`MODULE_GAP` pixels between modules and :data:`ASIC_GAP` pixels between ASICs
  (Jungfrau's double-size pixels at ASIC edges are left out), described three ways: 64 panels (one per ASIC), 16
  panels (one per half module of 2 × 2 ASICs, 512 × 512; the ASIC gap inside a half module left out) and 8 panels
  (one per module, the ASIC gaps inside it left out);
* one panel of 2048 × 2048 pixels described as a panel layout, and nanoBragg's own detector of 2048 × 2048 pixels
  (``setup.panels`` None).

All have 4 194 304 pixels.  Every image is rendered by ``nbtorch.simulate(..., fused=True)``, the compiled kernel
that the command line uses for images of this size, warm (``--repeat`` rounds, the detectors taking turns in every
round; a detector's time relative to another is the median over the rounds of the two times' ratio in one round, so
that the changing load of a shared machine falls on both alike), in float32 and float64, for two
workloads: ``light`` (one sample per pixel: the per-pixel work, panel look-ups included, weighs most) and
``mosaic`` (2 × 2 sub-pixels × 5 mosaic domains = 20 samples per pixel).  ``--small`` divides every side by 4
(ASICs of 64 × 64 pixels, 262 144 pixels in all).

With ``NB_C_BINARY`` naming a nanoBragg executable, the C program renders the 64 ASICs as nanoBragg's users do: one
process per ASIC with the CUSTOM convention's vectors (:func:`custom_flags`), timed whole and summed; otherwise that
comparison is skipped.  ``--write`` replaces the "Panel detectors" section of ``benchmarks/RESULTS.md`` and the
``panels`` entry of ``benchmarks/results.json``; the last line printed is always the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

import nbtorch
from nbtorch.detector import with_panels
from nbtorch.panels import PanelLayout, PanelSpec, make_layout
from nbtorch.simulate import samples_per_pixel

from .report import write_panels
from .runner import env, timed

HERE = pathlib.Path(__file__).resolve().parent
PIXEL = 0.075  # mm
DISTANCE = 100.0  # mm
#: Pixels between neighbouring modules, along fast (x) and slow (y).
MODULE_GAP = (36, 16)
#: Pixels between neighbouring ASICs of a module (in the 64-panel description).
ASIC_GAP = 2
CRYSTAL = ("-default_F 100 -cell 60 70 80 90 90 90 -misset 10 20 30 -N 8 -lambda 1 -beam_vector 0 0 1 "
           "-polar_vector 1 0 0")
WORKLOADS = {"light": "-oversample 1", "mosaic": "-oversample 2 -mosaic 0.3 -mosaic_domains 5"}
#: How each Jungfrau description cuts a module: panels along fast and along slow.
CUTS = {"8 panels": (1, 1), "16 panels": (2, 1), "64 panels": (4, 2)}


def jungfrau_layout(asic: int = 256, cut: str = "64 panels", module_gap: Tuple[int, int] = MODULE_GAP,
                    asic_gap: int = ASIC_GAP) -> PanelLayout:
    """The Jungfrau-4M-like detector with ASICs of ``asic`` × ``asic`` pixels, cut into panels as ``cut`` (a key of
    :data:`CUTS`) says; gaps in pixels (``module_gap`` along fast and slow, ``asic_gap`` between the panels of a
    module).  Panels are named ``m{module}p{k}`` (module-major, slow-major inside a module), each module a group of
    the root ``all``; fast along +x, slow along +y, the beam (+z) through the middle of the whole."""
    per_f, per_s = CUTS[cut]
    pf, ps = 4 * asic // per_f, 2 * asic // per_s  # panel size (fast, slow)
    mod_f, mod_s = 4 * asic + (per_f - 1) * asic_gap, 2 * asic + (per_s - 1) * asic_gap
    width, height = 2 * mod_f + module_gap[0], 4 * mod_s + 3 * module_gap[1]
    panels: List[PanelSpec] = []
    tree: Dict[str, List[str]] = {"all": []}
    for m in range(8):
        x0, y0 = (m % 2) * (mod_f + module_gap[0]), (m // 2) * (mod_s + module_gap[1])
        tree["all"].append(f"m{m}")
        tree[f"m{m}"] = []
        for j in range(per_s):
            for i in range(per_f):
                x, y = x0 + i * (pf + asic_gap), y0 + j * (ps + asic_gap)
                name = f"m{m}p{j * per_f + i}"
                corner = ((x - width / 2) * PIXEL, (y - height / 2) * PIXEL, DISTANCE)
                panels.append(PanelSpec(name, corner, (PIXEL, 0.0, 0.0), (0.0, PIXEL, 0.0), pf, ps))
                tree[f"m{m}"].append(name)
    return make_layout(panels, tree, "all")


def flat_layout(side: int) -> PanelLayout:
    """One panel of ``side`` × ``side`` pixels, centred on the beam at :data:`DISTANCE`, as a panel layout."""
    corner = (-side / 2 * PIXEL, -side / 2 * PIXEL, DISTANCE)
    return make_layout([PanelSpec("flat", corner, (PIXEL, 0.0, 0.0), (0.0, PIXEL, 0.0), side, side)],
                       {"all": ["flat"]}, "all")


def detectors(asic: int, workload: str, dtype: torch.dtype) -> Dict[str, tuple]:
    """``{name: (params, setup)}`` of every detector compared (see the module docstring), ASICs of ``asic`` pixels,
    the sampling of ``workload`` (a key of :data:`WORKLOADS`)."""
    side = 8 * asic
    flags = (f"{CRYSTAL} {WORKLOADS[workload]} -fdet_vector 1 0 0 -sdet_vector 0 1 0 -odet_vector 0 0 1 "
             f"-distance {DISTANCE} -detpixels {side} -pixel {PIXEL}")
    params, setup = nbtorch.from_nanobragg_args(flags, dtype=dtype)
    out = {"nanoBragg detector": (params, setup), "1 panel": with_panels(params, setup, flat_layout(side))}
    for cut in CUTS:
        out[cut] = with_panels(params, setup, jungfrau_layout(asic, cut))
    return out


def _render(model, fused: bool) -> Tuple[float, float]:
    """(wall, CPU) seconds of one ``simulate`` of ``model`` = (params, setup), compiled (``fused``) or eager; the CPU
    time is this process's, all threads."""
    t, c = time.perf_counter(), time.process_time()
    with torch.no_grad():
        nbtorch.simulate(*model, fused=fused)
    return time.perf_counter() - t, time.process_time() - c


def _paired(rounds: List[Dict[str, float]], ref: str) -> Dict[str, List[float]]:
    """For every detector, (median, lowest, highest) over the rounds of its time divided by ``ref``'s time in the
    same round: a ratio that the load of a shared machine, which changes between rounds, disturbs least."""
    out = {}
    for name in rounds[0]:
        r = sorted(t[name] / t[ref] for t in rounds)
        out[name] = [float(np.median(r)), r[0], r[-1]]
    return out


def measure(asic: int, workload: str, dtype: torch.dtype, repeat: int = 5, fused: bool = True) -> dict:
    """Every detector's first call (compilation or the kernel cache's load included), best warm wall time (s), its
    CPU time and ns per sample over ``repeat`` rounds in which the detectors take turns (the order rotating from
    round to round), and its wall and CPU times relative to the flat ones (:func:`_paired`).  ``fused``: the
    compiled kernel (the benchmark) or eager code (quick checks of this module)."""
    models = detectors(asic, workload, dtype)
    names = list(models)
    first = {name: _render(models[name], fused)[0] for name in names}
    rounds = []
    for r in range(repeat):
        order = names[r % len(names):] + names[:r % len(names)]
        rounds.append({name: _render(models[name], fused) for name in order})
    wall = [{k: v[0] for k, v in t.items()} for t in rounds]
    cpu = [{k: v[1] for k, v in t.items()} for t in rounds]
    setup = models["1 panel"][1]
    samples = setup.n_pixels * samples_per_pixel(setup)
    best = {name: min(t[name] for t in wall) for name in names}
    out = {name: {"first_s": first[name], "warm_s": best[name], "cpu_s": min(t[name] for t in cpu),
                  "ns_per_sample": best[name] / samples * 1e9} for name in names}
    return {"pixels": setup.n_pixels, "samples_per_pixel": samples_per_pixel(setup), "detectors": out,
            "ratio_to_1_panel": _paired(wall, "1 panel"), "ratio_to_nanobragg": _paired(wall, "nanoBragg detector"),
            "cpu_ratio_to_1_panel": _paired(cpu, "1 panel")}


def custom_flags(panel: PanelSpec, beam=(0.0, 0.0, 1.0)) -> str:
    """nanoBragg flags (CUSTOM convention, beam pivot) that place its one detector where ``panel`` is: unit fast,
    slow and outward normal vectors, and (``-distance``, ``-Xbeam``, ``-Ybeam``) solved from
    corner = distance·beam − Xbeam·fast − Ybeam·slow (mm); square pixels of the panel's step length."""
    f, s, b = np.asarray(panel.fast), np.asarray(panel.slow), np.asarray(beam, dtype=float)
    pixel = float(np.linalg.norm(f))
    f, s = f / pixel, s / np.linalg.norm(s)
    o = np.cross(f, s) * panel.facing
    x_beam, y_beam, dist = np.linalg.solve(np.stack([-f, -s, b], 1), np.asarray(panel.corner, dtype=float))

    def v(x) -> str:
        return " ".join(repr(float(c)) for c in x)

    return (f"-fdet_vector {v(f)} -sdet_vector {v(s)} -odet_vector {v(o)} -beam_vector {v(b)} "
            f"-distance {float(dist)!r} -Xbeam {float(x_beam)!r} -Ybeam {float(y_beam)!r} "
            f"-detpixels_f {panel.fpixels} -detpixels_s {panel.spixels} -pixel {pixel!r}")


def c_per_asic(binary: str, asic: int, workload: str, threads: int) -> dict:
    """The C program run once per ASIC of the 64-panel layout (``-nonoise``, a float image each): wall seconds of
    every process summed, and the slowest one."""
    layout = jungfrau_layout(asic, "64 panels")
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for panel in layout.panels:
            flags = f"{CRYSTAL} {WORKLOADS[workload]} {custom_flags(panel, layout.beam)}".split()
            times.append(timed([binary, *flags, "-nonoise", "-floatfile", os.path.join(tmp, "asic.bin")],
                               env(threads), tmp))
    return {"processes": len(times), "seconds": sum(times), "slowest_s": max(times)}


def run(asic: int, threads: int, repeat: int, c_binary: Optional[str], fused: bool = True) -> dict:
    """Every workload in float32 and float64 with ASICs of ``asic`` pixels on ``threads`` threads (and the C program
    once per ASIC when ``c_binary`` is given; skipped when it is None)."""
    torch.set_num_threads(threads)
    load = os.getloadavg()[0]  # the machine's 1-minute load average before and after: other work running
    res: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {threads} thread{'s' * (threads != 1)}, torch "
                            f"{torch.__version__}, {time.strftime('%Y-%m-%d')}", "asic": asic, "repeat": repeat,
                 "c_binary": bool(c_binary), "fused": fused, "runs": {}}
    for workload in WORKLOADS:
        for dtype in ("float32", "float64"):
            res["runs"][f"{workload}_{dtype}"] = measure(asic, workload, getattr(torch, dtype), repeat, fused)
        if c_binary:
            res["runs"][f"{workload}_C"] = c_per_asic(c_binary, asic, workload, threads)
    res["load"] = [load, os.getloadavg()[0]]
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="ASICs of 64 × 64 pixels instead of 256 × 256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5, help="rounds of warm renders (best kept)")
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md and results.json")
    a = ap.parse_args(argv)
    if a.threads < 1 or a.repeat < 1:
        ap.error("--threads and --repeat must be at least 1")
    res = run(64 if a.small else 256, a.threads, a.repeat, os.environ.get("NB_C_BINARY") or None)
    if a.write:
        path = HERE / "results.json"
        allres = json.loads(path.read_text()) if path.exists() else {}
        allres["panels"] = res
        path.write_text(json.dumps(allres, indent=1) + "\n")
        write_panels(res, HERE / "RESULTS.md")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
