"""A job that chose compiled kernels by itself never waits for the compiler: with the kernel missing from the cache
it computes eagerly and starts one background builder (none when a builder holds the lock, none again after a
failed build, which is warned once); the builder's package is then used by later jobs and gives the same image."""
from __future__ import annotations

import importlib
import os
import pathlib
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

import nbtorch
from nbtorch import aot, builder, cachedir, fused, precompile
from nbtorch.simulate import kernel_spec

simmod = importlib.import_module("nbtorch.simulate")  # the module (``nbtorch.simulate`` is also the function)
ROOT = pathlib.Path(__file__).resolve().parents[2]
FLAGS = "-default_F 100 -cell 50 60 70 90 90 90 -N 4 -lambda 1 -distance 100 -detpixels 24 -pixel 0.2 -misset 5 6 7"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A fresh cache, auto mode for every image size, background building, and a record of builder starts."""
    monkeypatch.setenv(cachedir.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(fused.FUSED_ENV, raising=False)
    monkeypatch.setenv(fused.BUILD_ENV, "background")
    monkeypatch.setattr(simmod, "FUSED_MIN_SAMPLES", 1)
    monkeypatch.setattr(builder, "_started", {})
    monkeypatch.setattr(builder, "_pending", {})
    monkeypatch.setattr(fused, "_broken", {})
    monkeypatch.setattr(aot, "_loaded", {})  # nothing loaded by earlier tests of this process
    started = []
    monkeypatch.setattr(builder.subprocess, "Popen", lambda cmd, **kw: started.append((cmd, kw)))
    return started


def test_a_missing_kernel_is_left_to_one_background_builder(empty_cache):
    params, setup = nbtorch.from_nanobragg_args(FLAGS, dtype=torch.float64)
    assert simmod.choose_fused(None, setup, setup.n_pixels) == fused.Compiled.WHEN_READY
    t = time.perf_counter()
    image = nbtorch.simulate(params, setup)
    assert time.perf_counter() - t < 20  # no compiler in this process
    torch.testing.assert_close(image, nbtorch.simulate(params, setup, fused=False), rtol=1e-12, atol=0)
    assert empty_cache == []  # asked for, started as the job exits (a builder beside a short job slows it)
    assert builder.start_pending() == 1 and len(empty_cache) == 1
    cmd, kw = empty_cache[0]
    assert cmd[1:5] == ["-c", builder.IDLE_LAUNCHER, "nbtorch.precompile", "build"] and kw["start_new_session"]
    assert "preexec_fn" not in kw  # a job starts it without copying its memory map (the launcher lowers its priority)
    assert builder.spec_from_text(cmd[cmd.index("--spec") + 1]) == kernel_spec(params, setup)
    assert cmd[cmd.index("--dtype") + 1] == "float64"
    nbtorch.simulate(params, setup)
    assert builder.start_pending() == 0 and len(empty_cache) == 1  # this process started its builder already


def test_a_job_still_running_after_the_delay_starts_its_builder_itself(empty_cache, monkeypatch):
    params, setup = nbtorch.from_nanobragg_args(FLAGS, dtype=torch.float64)
    clock = [1000.0]
    monkeypatch.setattr(builder.time, "monotonic", lambda: clock[0])
    nbtorch.simulate(params, setup)
    clock[0] += builder.START_AFTER_S - 1
    nbtorch.simulate(params, setup)
    assert empty_cache == []
    clock[0] += 1
    nbtorch.simulate(params, setup)
    assert len(empty_cache) == 1 and builder.start_pending() == 0
    nbtorch.simulate(params, setup)
    assert len(empty_cache) == 1


def test_no_builder_while_another_holds_the_lock_and_none_after_a_failure(empty_cache):
    params, setup = nbtorch.from_nanobragg_args(FLAGS, dtype=torch.float64)
    root = cachedir.cache_root()
    path = cachedir.cache_subdir("aot", root) / aot.package_path(root, "forward", kernel_spec(params, setup),
                                                                  torch.float64, torch.device("cpu")).name
    fd = cachedir.builder_lock(path)
    try:
        nbtorch.simulate(params, setup)
        assert builder.start_pending() == 0
    finally:
        os.close(fd)
    assert empty_cache == []
    path.with_name(path.name + builder.FAILED_SUFFIX).write_text("RuntimeError: no C compiler\n")
    with pytest.warns(RuntimeWarning, match=r"compiled forward kernel unavailable \(its build failed: "
                                            r"RuntimeError: no C compiler"):
        image = nbtorch.simulate(params, setup)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        nbtorch.simulate(params, setup)
    assert empty_cache == []
    torch.testing.assert_close(image, nbtorch.simulate(params, setup, fused=False), rtol=1e-12, atol=0)


def test_build_policy_and_spec_text_are_checked(monkeypatch):
    monkeypatch.setenv(fused.BUILD_ENV, "later")
    with pytest.raises(ValueError, match=r"NBTORCH_BUILD must be 'background' or 'wait', got 'later'"):
        fused.build_in_background()
    with pytest.raises(ValueError, match=r"unknown kernel spec fields: colour"):
        builder.spec_from_text('{"colour": 1}')
    spec = nbtorch.kernel.KernelSpec(shape="gauss", table=True, dmin=True, fudge=2.0)
    assert builder.spec_from_text(builder.spec_to_text(spec)) == spec


_JOB = textwrap.dedent("""
    import importlib, json, sys, time, torch, nbtorch
    from nbtorch import aot
    sm = importlib.import_module("nbtorch.simulate")
    sm.FUSED_MIN_SAMPLES = 1
    p, s = nbtorch.from_nanobragg_args(sys.argv[1], dtype=torch.float64)
    t = time.perf_counter()
    img = nbtorch.simulate(p, s)
    torch.save(img, sys.argv[2])
    print(json.dumps({"seconds": time.perf_counter() - t, "compiled": any(k[0] == "forward" for k in aot._loaded)}))
""")


def test_the_background_builder_fills_the_cache_for_later_jobs(tmp_path):
    env = dict(os.environ, NBTORCH_CACHE_DIR=str(tmp_path / "cache"), NBTORCH_BUILD="background",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop(fused.FUSED_ENV, None)

    def job(out):
        proc = subprocess.run([sys.executable, "-c", _JOB, FLAGS, str(tmp_path / out)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return eval(proc.stdout.strip().splitlines()[-1].replace("true", "True").replace("false", "False"))

    first = job("first.pt")
    assert not first["compiled"]
    aot_dir = tmp_path / "cache" / "aot"
    deadline = time.time() + 540
    while not list(aot_dir.glob("forward-*.pt2.sha256")) and time.time() < deadline:
        assert not list(aot_dir.glob("*.failed")), [p.read_text() for p in aot_dir.glob("*.log")]
        time.sleep(2)
    assert list(aot_dir.glob("forward-*.pt2")), [p.read_text()[-2000:] for p in aot_dir.glob("*.log")]
    second = job("second.pt")
    assert second["compiled"]
    a, b = torch.load(tmp_path / "first.pt"), torch.load(tmp_path / "second.pt")
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10 * float(a.abs().max()))


def test_precompile_sets_and_usage(capsys):
    common, every = precompile.kernel_set("common"), precompile.kernel_set("all")
    assert len(common) == 10 and len(every) == 40 and set(common) < set(every)
    assert {k for k, _ in every} == {"forward", "moments", "orientation"}
    assert {s.shape for _, s in common} == set(precompile.SHAPES)
    assert precompile.main(["--dtype", "float16"]) == 2
    assert "--dtype: expected float32 and/or float64, got 'float16'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        precompile.main(["--specs", "most"])
    assert exit_.value.code == 2


def test_a_builder_runs_in_the_idle_scheduling_class(tmp_path):
    """The builder process (and whatever it starts) runs only on cores nothing else wants: Linux's SCHED_IDLE, else
    the lowest priority (a niced builder still slowed a job's threads tenfold on 2 cores); the launcher runs the
    module as ``python -m`` would, with its arguments."""
    import os
    import subprocess
    import sys

    (tmp_path / "probe.py").write_text(
        "import os, sys\n"
        "idle = os.sched_getscheduler(0) == getattr(os, 'SCHED_IDLE', -1) or os.nice(0) >= 19\n"
        "import subprocess\n"  # a process it starts inherits the class
        "child = subprocess.run([sys.executable, '-c', 'import os; print(os.sched_getscheduler(0), os.nice(0))'],\n"
        "                       capture_output=True, text=True).stdout.split()\n"
        "inherited = child[0] == str(getattr(os, 'SCHED_IDLE', -1)) or int(child[1]) >= 19\n"
        "print(__name__, sys.argv[1:], idle, inherited)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", builder.IDLE_LAUNCHER, "probe", "build", "--kind", "forward"],
                         capture_output=True, text=True, check=True, env=env).stdout.strip()
    assert out == "__main__ ['build', '--kind', 'forward'] True True"
    child = subprocess.run([sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert child == str(getattr(os, "SCHED_OTHER", 0))  # this process is left as it was