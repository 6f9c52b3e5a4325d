"""``python -m benchmarks``: the performance suite of issue 7, measured in one run, written to
``benchmarks/RESULTS.md`` (section "Performance") and ``benchmarks/results.json``.

Every workload runs in a fresh process (``benchmarks.workloads``) so that its peak RSS and, for the command lines,
its whole wall time (start-up and compilation included) are measured.  With ``NB_C_BINARY`` naming a nanoBragg
executable the C program runs the same cases in the same run, and the figures are reported as ratios to it.
Panel detectors against one panel (``benchmarks.panels``) have their own section.  Options: ``--threads T`` (default
2), ``--quick`` (skip the gradient-stability workload and the eager float64 case B; the panel comparison ``--small``),
``--only SECTION,…`` (rerun these sections of results.json — command_lines, startup, case_b, derivatives, backward_memory,
gradient_stability, refinement, panels — and keep the others as recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import sys
import tempfile
import time
from typing import Dict, Optional

import torch

from .report import write_panels, write_results
from .runner import (compile_bytecode, env, module_json, stop_builders, timed, timed_output, wait_for_builders,
                     workload)
from .workloads import CASE_A, CASE_B

HERE = pathlib.Path(__file__).resolve().parent
REFINE_TRUTH = ("-default_F 100 -cell 60 70 80 90 90 90 -misset 10 20 30 -N 8 -lambda 1 -distance 100 -pixel 0.1 "
                "-detpixels 512 -mosaic 0.3 -mosaic_domains 25 -fluence 1e29 -seed 5")
REFINE_START = REFINE_TRUTH.replace("-misset 10 20 30", "-misset 10.15 19.9 30.1").replace(
    "-N 8", "-N 7").replace("-mosaic 0.3", "-mosaic 0.4").replace("-fluence 1e29", "-fluence 1.5e29")


def command_lines(threads: int, tmp: str, c_binary: Optional[str], repeats: int = 3, short_repeats: int = 5) -> dict:
    """Cases A and B as whole processes, the best of ``repeats`` runs each (of ``short_repeats`` for case A, whose
    1.5 s runs vary by ±10 % on a shared machine): nbtorch with a cold kernel cache (the job runs eagerly and starts
    the builder as it exits; that builder is stopped), eager (``NBTORCH_FUSED=0``), and with a cache a builder
    filled (warm), float32 and float64; C.  Every cold and eager run starts from an empty cache (a first run on a new
    machine: both compile the native noise routine, ≈ 0.1 s), so that the two differ only in what the cold run adds
    (its kernel lookup and its builder); they alternate, so that a shared machine's drift falls on both.  One
    untimed process first: the first process of a run read torch's files from disk."""
    out: Dict[str, float] = {}
    img = os.path.join(tmp, "img.bin")
    caches = tempfile.mkdtemp(dir=tmp)
    timed([sys.executable, "-c", "import torch"], env(threads), tmp)

    def best(run) -> float:
        return min(run() for _ in range(n))

    def on_empty_cache(cmd, **extra) -> float:
        seconds = timed(cmd, dict(env(threads, tempfile.mkdtemp(dir=caches)), **extra), tmp)
        stop_builders()
        return seconds

    for case, flags, n in (("A", CASE_A, short_repeats), ("B", CASE_B.format(n=512), repeats)):
        for dtype in ("float32", "float64"):
            cmd = [sys.executable, "-m", "nbtorch", *flags.split(), "-floatfile", img, "--dtype", dtype]
            pairs = [(on_empty_cache(cmd), on_empty_cache(cmd, NBTORCH_FUSED="0")) for _ in range(n)]
            out[f"{case}_{dtype}_cold"], out[f"{case}_{dtype}_eager"] = (min(t) for t in zip(*pairs))
            warm = env(threads, tempfile.mkdtemp(dir=caches))
            timed(cmd, warm, tmp)  # its builder fills this cache
            wait_for_builders()
            out[f"{case}_{dtype}_warm"] = best(lambda: timed(cmd, warm, tmp))
            out[f"{case}_{dtype}_nonoise"] = best(lambda: timed(cmd + ["-nonoise"], warm, tmp))
        if c_binary:
            for suffix, extra in (("", []), ("_nonoise", ["-nonoise"])):
                c_cmd = [c_binary, *flags.split(), "-floatfile", img, *extra]
                out[f"{case}_C{suffix}"] = best(lambda: timed(c_cmd, env(threads), tmp))
    return out


def startup(threads: int, tmp: str, repeats: int = 3) -> dict:
    """Case A's process start-up (float32, warm kernel cache), best of ``repeats`` runs each: the interpreter alone
    (``python -c pass``), ``python -c "import torch"``, and the ``nbtorch`` command with the simulation it reports
    ("simulated … in T s"); nbtorch's own start-up (flag parsing, planning, loading, writing) is the command's wall
    time less importing torch and that simulation."""
    cmd = [sys.executable, "-m", "nbtorch", *CASE_A.split(), "-floatfile", os.path.join(tmp, "a.bin"),
           "--dtype", "float32"]
    cache = tempfile.mkdtemp(dir=tmp)
    timed(cmd, env(threads, cache), tmp)  # its builder fills the cache as it exits
    wait_for_builders()

    def best(c):
        return min(timed(c, env(threads, cache), tmp) for _ in range(repeats))

    runs = [timed_output(cmd, env(threads, cache), tmp) for _ in range(repeats)]
    wall, text = min(runs)
    simulate_s = float(re.search(r"simulated \d+ pixels in ([0-9.]+) s", text).group(1))
    out = {"python_s": best([sys.executable, "-c", "pass"]),
           "import_torch_s": best([sys.executable, "-c", "import torch"]), "wall_s": wall, "simulate_s": simulate_s}
    out["own_s"] = wall - out["import_torch_s"] - simulate_s
    return out


def refinement(threads: int, tmp: str) -> dict:
    """nbtorch-refine of a noisy 512² still with 25 mosaic domains: orientation, N, mosaic spread and scale."""
    obs = os.path.join(tmp, "obs.img")
    timed([sys.executable, "-m", "nbtorch", *REFINE_TRUTH.split(), "-noisefile", obs, "-floatfile",
           os.path.join(tmp, "truth.bin")], env(threads), tmp)
    fit = os.path.join(tmp, "fit.json")
    cmd = [sys.executable, "-m", "refine.cli", obs, "--refine", "orientation,ncells,mosaic,scale", "--json", fit,
           "--quiet", "--threads", str(threads), *REFINE_START.split()]
    seconds = timed(cmd, env(threads), tmp)
    res = json.loads(pathlib.Path(fit).read_text())
    return {"seconds": seconds, "converged": res.get("converged"), "parameters": res.get("parameters")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated sections to rerun (default: all)")
    a = ap.parse_args(argv)
    path = HERE / "results.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    only = set(filter(None, a.only.split(",")))
    run = (lambda name: not only or name in only)
    c_binary = os.environ.get("NB_C_BINARY")
    res: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {a.threads} threads, torch "
                            f"{torch.__version__}, {time.strftime('%Y-%m-%d')}", "c_binary": bool(c_binary)}
    compile_bytecode()
    with tempfile.TemporaryDirectory() as tmp:
        sections = {
            "command_lines": lambda: command_lines(a.threads, tmp, c_binary),
            "startup": lambda: startup(a.threads, tmp),
            "case_b": lambda: {f"{dt}_{'eager' if eager else 'compiled'}": workload(
                "case_b", a.threads, "--dtype", dt, *(["--eager"] if eager else []))
                for dt in ("float32", "float64") for eager in (False, True)
                if not (a.quick and eager and dt == "float64")},
            "derivatives": lambda: workload("derivatives", a.threads),
            "backward_memory": lambda: workload("backward_memory", a.threads),
            "gradient_stability": lambda: None if a.quick else workload("gradient_stability", a.threads),
            "refinement": lambda: refinement(a.threads, tmp),
            "panels": lambda: module_json("benchmarks.panels", a.threads, *(["--small"] if a.quick else [])),
        }
        for name, measure in sections.items():
            value = measure() if run(name) else old.get(name)
            if value is not None:
                res[name] = value
    carried = {k: v for k, v in old.get("command_lines", {}).items() if "_C" in k}
    if not run("command_lines"):  # its rows, C times included, are an earlier run's: they say what that run said
        res["c_binary"] = old.get("c_binary", False)
        res["c_from"] = old.get("c_from")
    elif not c_binary and carried and not any("_C" in k for k in res["command_lines"]):
        res["command_lines"].update(carried)  # the C program's times of an earlier run, said so in the report
        day = re.search(r"\d{4}-\d{2}-\d{2}", old.get("machine", ""))
        res["c_from"] = (day.group(0) if old.get("c_binary") and day else old.get("c_from")) or "an earlier run"
    if only:
        res["machine"] += f" (sections {', '.join(sorted(only))}; the others as recorded before)"
    path.write_text(json.dumps(dict(old, **res), indent=1) + "\n")
    write_results(res, HERE / "RESULTS.md")
    write_panels(res["panels"], HERE / "RESULTS.md")
    print((HERE / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
