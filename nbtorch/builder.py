"""Background builders of compiled kernels: a job never waits for the compiler.

A job that chose compiled kernels by itself (:class:`nbtorch.fused.Compiled` ``WHEN_READY``) and finds one missing
from the cache runs eagerly and asks for a build (:func:`request_build`): one detached, idle-priority process that
builds it (``python -m nbtorch.precompile build …``, output in ``<package>.log``) starts as the job exits, or, in a
job still running :data:`START_AFTER_S` seconds after its first request, then; later calls, or later jobs, load it
once it is there.  (A builder beside a running job, even in the idle scheduling class, slowed the job's eager code
several-fold on 2 cores — the compiler shares the caches and memory bandwidth — so a short job never shares the
machine with one.)  One builder per package and machine: the cache's builder lock (:mod:`nbtorch.cachedir`) — a
process that finds the lock held starts none, and parallel builders wait for each other and then load what the first
built.  A
builder that fails leaves ``<package>.failed`` (its error) and for :data:`RETRY_FAILED_AFTER_S` no job starts that
build again.  (Kept out of :mod:`nbtorch.aot`, whose source is part of every package's key.)
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Dict, Optional

import torch

from . import aot, cachedir
from .kernel import KernelSpec

__all__ = ["request_build", "start_pending", "start_background_build", "build_failure", "spec_to_text",
           "spec_from_text", "LOG_SUFFIX", "FAILED_SUFFIX"]

#: Next to a package: the log of its background build, and the mark left by one that failed.
LOG_SUFFIX, FAILED_SUFFIX = ".log", ".failed"
#: Seconds during which a failed background build keeps later processes from starting another.
RETRY_FAILED_AFTER_S = 24 * 3600.0
#: The module whose ``build`` command a background builder runs (``python -m nbtorch.precompile build …``).
BUILDER_MODULE = "nbtorch.precompile"
#: ``python -c IDLE_LAUNCHER MODULE ARGS…`` runs ``python -m MODULE ARGS…`` in Linux's idle scheduling class (which
#: a process passes on to every process it starts: compile workers, the C++ compiler), else at the lowest nice value:
#: it runs only on cores nothing else wants (a niced builder still slowed a job's OpenMP threads tenfold on 2 cores).
#: The new process lowers its own priority, before importing anything: a job starts it without a ``preexec_fn``, so
#: without copying the job's memory map (≈ 20 ms for a 400 MB job, against 0.5 ms).
IDLE_LAUNCHER = """\
import os, runpy, sys
try:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
except (AttributeError, OSError):
    try:
        os.nice(19)
    except OSError:
        pass
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""
#: Seconds after a job's first request for a missing kernel from which it starts the builder while running (a job
#: that ends sooner starts it as it exits).
START_AFTER_S = 60.0
_started: Dict[tuple, float] = {}
#: Requested builds not yet started: key → (arguments of :func:`start_background_build`, monotonic time asked).
_pending: Dict[tuple, tuple] = {}
_at_exit: list = []


def spec_to_text(spec: KernelSpec) -> str:
    """``spec`` as one line of JSON (a builder process's argument)."""
    return json.dumps(dataclasses.asdict(spec), sort_keys=True)


def spec_from_text(text: str) -> KernelSpec:
    """The :class:`~nbtorch.kernel.KernelSpec` of :func:`spec_to_text`; ValueError for unknown fields."""
    fields = json.loads(text)
    unknown = set(fields) - {f.name for f in dataclasses.fields(KernelSpec)}
    if unknown:
        raise ValueError(f"unknown kernel spec fields: {', '.join(sorted(unknown))}")
    return KernelSpec(**fields)


def build_failure(path: pathlib.Path) -> Optional[str]:
    """The first line of the failure mark of package ``path`` when a background build failed less than
    :data:`RETRY_FAILED_AFTER_S` ago, else None."""
    mark = path.with_name(path.name + FAILED_SUFFIX)
    try:
        if time.time() - mark.stat().st_mtime > RETRY_FAILED_AFTER_S:
            return None
        return (mark.read_text(encoding="utf-8", errors="replace").splitlines() or ["failed"])[0]
    except OSError:
        return None


def _key(kind: str, spec: KernelSpec, dtype: torch.dtype, device: torch.device) -> tuple:
    return (kind, spec, dtype, device.type, device.index)


def request_build(root: pathlib.Path, kind: str, spec: KernelSpec, dtype: torch.dtype, device: torch.device) -> bool:
    """Ask for the background build of kernel ``kind`` of ``spec`` into the cache under ``root``: remembered, and
    started (:func:`start_background_build`) when this process exits or, on a request :data:`START_AFTER_S` seconds
    or more after the first one for it, at once.  Returns at once: whether a builder was started now."""
    key = _key(kind, spec, dtype, device)
    if key in _started:
        return False
    asked = _pending.setdefault(key, ((root, kind, spec, dtype, device), time.monotonic()))[1]
    if not _at_exit:
        atexit.register(start_pending)
        _at_exit.append(True)
    if time.monotonic() - asked < START_AFTER_S:
        return False
    del _pending[key]
    return start_background_build(root, kind, spec, dtype, device)


def start_pending() -> int:
    """Start every requested build not started yet (what runs as the process exits); returns how many started."""
    started = 0
    while _pending:
        args, _ = _pending.pop(next(iter(_pending)))
        try:
            started += bool(start_background_build(*args))
        except OSError:  # a cache that cannot be written to: the next job asks again
            pass
    return started


def start_background_build(root: pathlib.Path, kind: str, spec: KernelSpec, dtype: torch.dtype,
                           device: torch.device) -> bool:
    """Start a detached, low-priority process that builds kernel ``kind`` of ``spec`` into the cache under ``root``
    (``python -m nbtorch.precompile build`` through :data:`IDLE_LAUNCHER`; its output in ``<package>.log``), unless
    this process started one already, another process holds the package's builder lock, or a build failed recently
    (:func:`build_failure`).  Returns at once: whether a builder was started.  The builder outlives this process;
    the cache's lock makes parallel builders of one package wait for each other (:mod:`nbtorch.cachedir`)."""
    key = _key(kind, spec, dtype, device)
    if key in _started:
        return False
    path = cachedir.cache_subdir("aot", root) / aot.package_path(root, kind, spec, dtype, device).name
    if build_failure(path) is not None:
        return False
    fd = cachedir.builder_lock(path, blocking=False)
    if fd is None:  # a builder is at work
        return False
    os.close(fd)
    _started[key] = time.time()
    cmd = [sys.executable, "-c", IDLE_LAUNCHER, BUILDER_MODULE, "build", "--kind", kind, "--spec", spec_to_text(spec),
           "--dtype", str(dtype).replace("torch.", ""), "--device", str(device)]
    env = dict(os.environ, **{cachedir.CACHE_ENV: str(root)})
    with open(path.with_name(path.name + LOG_SUFFIX), "ab") as log:
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                         start_new_session=True, close_fds=True)
    return True

