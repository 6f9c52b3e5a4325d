"""Running the benchmarks' processes: every workload in a fresh process (its peak RSS and whole wall time are its
own), with the thread count and the kernel cache of the run."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

ROOT = pathlib.Path(__file__).resolve().parent.parent


def env(threads: int, cache: Optional[str] = None) -> Dict[str, str]:
    """The environment of a benchmark process: ``threads`` OpenMP threads, the repository on the path and, when
    given, a kernel cache folder of its own (``cache``)."""
    out = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    if cache:
        out["NBTORCH_CACHE_DIR"] = cache
    return out


def timed(cmd: List[str], environ: Dict[str, str], cwd: str, timeout: int = 3600) -> float:
    """Wall seconds of one process run in ``cwd`` (where nanoBragg's default int and PGM images land); raises with
    its stderr when it fails."""
    return timed_output(cmd, environ, cwd, timeout)[0]


def timed_output(cmd: List[str], environ: Dict[str, str], cwd: str, timeout: int = 3600) -> Tuple[float, str]:
    """(wall seconds, stdout) of one process run as :func:`timed` runs it."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} … failed ({proc.returncode}): {proc.stderr[-800:]}")
    return time.perf_counter() - t, proc.stdout


def compile_bytecode() -> None:
    """Write the bytecode of nbtorch and refine (``python -m compileall``), as an installed package has it and as
    Python writes it on a first import: a machine with ``PYTHONDONTWRITEBYTECODE=1`` (this one) would otherwise
    recompile ≈ 0.2 s of nbtorch's sources in every process and count that as start-up."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "nbtorch"), str(ROOT / "refine")],
                   check=True, capture_output=True)


def wait_for_builders(timeout: float = 900.0) -> None:
    """Wait (at most ``timeout`` seconds) until no background kernel builder (``python -m nbtorch.precompile build``,
    :mod:`nbtorch.builder`) runs on this machine, so that the next timing has the cores to itself."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and _builder_pids():
        time.sleep(2.0)


def _builder_pids() -> List[int]:
    """Process ids of the background kernel builders running on this machine."""
    found = subprocess.run(["pgrep", "-f", "nbtorch.precompile build"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def stop_builders() -> None:
    """Stop every background kernel builder on this machine (each runs in a session of its own, with its compile
    workers: the whole process group goes), for a timing that repeats a cold run instead of waiting for one."""
    for pid in _builder_pids():
        try:
            os.killpg(os.getpgid(pid), signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    wait_for_builders(timeout=30.0)


def module_json(module: str, threads: int, *args: str, cache: Optional[str] = None) -> dict:
    """Run ``python -m MODULE ARGS --threads T`` in a fresh process → the JSON figures of its last output line."""
    proc = subprocess.run([sys.executable, "-m", module, *args, "--threads", str(threads)],
                          env=env(threads, cache), capture_output=True, text=True, timeout=7200, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{module} {' '.join(args)} failed: {proc.stderr[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def workload(name: str, threads: int, *args: str, cache: Optional[str] = None) -> dict:
    """Run ``benchmarks.workloads NAME`` in a fresh process → its JSON figures."""
    return module_json("benchmarks.workloads", threads, name, *args, cache=cache)
