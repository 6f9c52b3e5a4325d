"""The compiled-code cache (nbtorch/cachedir.py) is trusted only when it is the user's own: directories created 0700
whatever the umask; nothing loaded from a directory that group/others can write or another user owns; a library or
package whose SHA-256 does not match its record (truncated, corrupted, planted) or that fails to load is rebuilt,
never loaded; one builder per file (lock); temporary files of a killed build removed by the next run.

The native poidev library (≈ 1 s to compile) carries most cases; the AOT package cases reuse one package built in
the default cache (as tests/nbtorch/test_kernel.py does) and copy it into temporary caches.  Cases where a wrong
load could crash the interpreter (truncated library, corrupted package) run in a subprocess.  Every test holds as
root and as an ordinary user (files "owned by another user" are chowned to nobody as root, faked otherwise)."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

import nbtorch
import nbtorch.native as native
import nbtorch.rng as rngmod
from nbtorch import aot, cachedir, fused
from nbtorch.rng import Ran1
from nbtorch.simulate import kernel_spec
from tests.nbtorch.test_kernel import SMALL

POIDEV_SRC = native._SRC_DIR / "poidev.c"
_PLANTED_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) { FILE *f = fopen("%s", "w"); if (f) fclose(f); }
"""


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A fresh cache root (not yet created) that the native routine and the kernels use; per-process memos reset."""
    root = tmp_path / "cache"
    monkeypatch.setenv(cachedir.CACHE_ENV, str(root))
    # nbtorch points inductor at the cache once per process (os.environ): restored after the test, so that later
    # tests do not compile into this temporary folder
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)
    monkeypatch.delenv("CC", raising=False)
    for mod, name in ((native, "_libs"), (aot, "_loaded"), (fused, "_broken")):
        monkeypatch.setattr(mod, name, {})
    for name in ("_warned", "_swept"):
        monkeypatch.setattr(cachedir, name, set())
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    return root


def _lib_path(root):
    return root / "native" / native._library_name(POIDEV_SRC, "poidev")


def _plant(path, marker):
    """A shared library at ``path`` whose loading creates the file ``marker``, with a matching hash record."""
    src = path.parent / "planted.c"
    src.write_text(_PLANTED_C % marker)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(path), str(src)], check=True, capture_output=True)
    src.unlink()
    _write_record(path)


def _write_record(path):
    (path.parent / (path.name + ".sha256")).write_text(f"{cachedir.sha256_of(path)}  {path.name}\n")


def _make_foreign(monkeypatch, path):
    """Make ``path`` look owned by another user: chown to nobody as root, else a faked lstat for its inode."""
    if os.geteuid() == 0:
        os.lchown(path, 65534, 65534)
        return
    ino, real_lstat = os.lstat(path).st_ino, os.lstat

    def lstat(p, *a, **k):
        st = real_lstat(p, *a, **k)
        if st.st_ino != ino:
            return st
        fields = list(st)
        fields[stat.ST_UID] = os.geteuid() + 1
        return os.stat_result(fields)

    monkeypatch.setattr(os, "lstat", lstat)


def _python_fallback_is_bit_identical():
    x = np.array([0.0, 3.0, 11.5, 12.0, 40.0, 2e6, 7.0] * 30, np.float32)
    a, b = Ran1(-17), Ran1(-17)
    assert a.poidev_many(x).tobytes() == b._poidev_many_py(x).tobytes()


def _run(code, root, *args, env=None, **kw):
    e = {**os.environ, cachedir.CACHE_ENV: str(root), **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=e, capture_output=True, text=True,
                          timeout=300, **kw)


_LOAD_NATIVE = "import nbtorch.rng as r; print('native:', r._native_poidev() is not None)"


# ----------------------------------------------------------------------------------------------------------------
# directories and trust


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o777])
def test_cache_directories_are_created_0700_whatever_the_umask(tmp_path, umask):
    root = tmp_path / "a" / "b" / "nbtorch"
    old = os.umask(umask)
    try:
        sub = cachedir.cache_subdir("native", root)
    finally:
        os.umask(old)
    assert sub == (root / "native").resolve()
    for d in (tmp_path / "a", tmp_path / "a" / "b", root, root / "native"):
        assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700, d


@pytest.mark.parametrize("where,mode", [("root", 0o777), ("root", 0o770), ("native", 0o722)])
def test_planted_library_in_a_writable_directory_is_not_loaded(cache, tmp_path, where, mode):
    """A library (with a matching hash record) planted in a directory others can write is never loaded: one warning
    naming the directory and its mode, then the Python routine (bit-identical)."""
    lib = _lib_path(cache)
    cachedir.cache_subdir("native")
    marker = tmp_path / "planted-code-ran"
    _plant(lib, marker)
    os.chmod(cache if where == "root" else cache / "native", mode)
    with pytest.warns(RuntimeWarning, match=r"writable by group or others") as rec:
        assert rngmod._native_poidev() is None
        native._libs.clear()  # a second attempt: refused again, without a second warning
        assert rngmod._native_poidev() is None
    msgs = [str(w.message) for w in rec if "nbtorch" in str(w.message)]
    assert len(msgs) == 1 and f"mode {mode:04o}" in msgs[0], msgs
    assert not marker.exists()
    _python_fallback_is_bit_identical()


def test_cache_directory_owned_by_another_user_is_not_used(cache, tmp_path, monkeypatch):
    cachedir.cache_subdir("native")
    marker = tmp_path / "planted-code-ran"
    _plant(_lib_path(cache), marker)
    _make_foreign(monkeypatch, cache / "native")
    with pytest.warns(RuntimeWarning, match=r"owned by another user"):
        assert rngmod._native_poidev() is None
    assert not marker.exists()


def test_symlinked_root_is_checked_at_its_target(cache, tmp_path):
    """A root that is a symbolic link is judged by the directory it points to."""
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    cache.symlink_to(target)
    assert cachedir.cache_subdir("native") == target.resolve() / "native"
    os.chmod(target, 0o777)
    with pytest.warns(RuntimeWarning, match="writable by group or others"):
        with pytest.raises(cachedir.UntrustedCacheError, match=str(target.resolve())):
            cachedir.cache_subdir("native")


def test_library_owned_by_another_user_is_rebuilt_not_loaded(cache, tmp_path, monkeypatch):
    lib = _lib_path(cache)
    cachedir.cache_subdir("native")
    marker = tmp_path / "planted-code-ran"
    _plant(lib, marker)
    _make_foreign(monkeypatch, lib)
    with pytest.warns(RuntimeWarning, match=r"is not used \(.*owned by another user.*rebuilding"):
        assert rngmod._native_poidev() is not None
    assert not marker.exists()
    assert os.lstat(lib).st_uid == os.geteuid() and cachedir.file_problem(lib) is None


# ----------------------------------------------------------------------------------------------------------------
# integrity


def test_hash_is_recorded_at_build_time_in_sha256sum_format(cache):
    assert rngmod._native_poidev() is not None
    lib = _lib_path(cache)
    record = (lib.parent / (lib.name + ".sha256")).read_text()
    assert record == f"{hashlib.sha256(lib.read_bytes()).hexdigest()}  {lib.name}\n"
    for p in lib.parent.iterdir():  # the library and its record: the user's own, private
        assert stat.S_IMODE(os.lstat(p).st_mode) & 0o077 == 0, p
    assert sorted(p.name for p in lib.parent.iterdir()) == sorted([lib.name, lib.name + ".sha256",
                                                                   lib.name + ".lock"])


@pytest.mark.parametrize("damage,reason", [
    ("truncate", "does not match"),
    ("flip", "does not match"),
])
def test_truncated_or_altered_library_is_rebuilt_without_crashing(cache, damage, reason):
    """A truncated library used to kill every run with SIGBUS: now its hash mismatch rebuilds it (in a subprocess,
    so that a regression cannot take the test run down)."""
    assert rngmod._native_poidev() is not None
    lib = _lib_path(cache)
    good = lib.read_bytes()
    data = good[: len(good) // 2] if damage == "truncate" else good[:4000] + bytes(b ^ 0xFF for b in good[4000:4100]) \
        + good[4100:]
    damaged = lib.with_name("damaged")  # (a new inode: this process has the good library mapped, and a file mapped
    damaged.write_bytes(data)           # by a process and then truncated in place kills that process with SIGBUS)
    os.replace(damaged, lib)
    out = _run(_LOAD_NATIVE, cache)
    assert out.returncode == 0 and "native: True" in out.stdout, out.stdout + out.stderr
    assert reason in out.stderr and "rebuilding" in out.stderr, out.stderr
    assert cachedir.file_problem(lib) is None and lib.stat().st_size == len(good)
    again = _run(_LOAD_NATIVE, cache)  # and the next run uses it quietly
    assert "native: True" in again.stdout and "nbtorch" not in again.stderr, again.stderr


@pytest.mark.parametrize("damage,reason", [
    ("no-record", "is missing"),
    ("bad-record", "does not match"),
    ("not-a-library", "loading it failed"),
])
def test_missing_record_wrong_record_or_unloadable_library_is_rebuilt(cache, damage, reason):
    lib = _lib_path(cache)
    record = lib.parent / (lib.name + ".sha256")
    if damage == "not-a-library":  # right hash, but not a shared library: the loader refuses it (nothing loaded
        cachedir.cache_subdir("native")  # from this path before, so the loader cannot reuse an earlier mapping)
        lib.write_bytes(b"not an ELF file\n" * 10)
        _write_record(lib)
    else:
        assert rngmod._native_poidev() is not None
        native._libs.clear()
        if damage == "no-record":
            record.unlink()
        else:
            record.write_text("0" * 64 + f"  {lib.name}\n")
    with pytest.warns(RuntimeWarning, match=reason + r".*rebuilding"):
        assert rngmod._native_poidev() is not None
    assert cachedir.file_problem(lib) is None


# ----------------------------------------------------------------------------------------------------------------
# one builder; temporary files


def _slow_cc(tmp_path, counter):
    cc = tmp_path / "slow-cc"
    cc.write_text(f'#!/bin/sh\necho build >> "{counter}"\nsleep "${{NB_TEST_CC_SLEEP:-0}}"\nexec cc "$@"\n')
    cc.chmod(0o755)
    return str(cc)


_CONCURRENT = """
import pathlib, sys, time
import nbtorch.rng as r
pathlib.Path(sys.argv[1]).touch()
while not pathlib.Path(sys.argv[2]).exists():
    time.sleep(0.01)
print("native:", r._native_poidev() is not None)
"""


def test_two_cold_processes_build_the_library_once(cache, tmp_path):
    counter = tmp_path / "builds"
    env = {"CC": _slow_cc(tmp_path, counter), "NB_TEST_CC_SLEEP": "1"}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(tmp_path / f"ready{i}"), str(go)],
                              env={**os.environ, cachedir.CACHE_ENV: str(cache), **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
            time.sleep(0.02)
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all("native: True" in o for o, _ in outs), outs
    assert counter.read_text().split() == ["build"], outs
    assert not any("nbtorch" in e for _, e in outs), outs


def test_temporary_file_of_a_killed_build_is_removed_by_the_next_run(cache, tmp_path, monkeypatch):
    counter = tmp_path / "builds"
    cc = _slow_cc(tmp_path, counter)
    proc = subprocess.Popen([sys.executable, "-c", _LOAD_NATIVE], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, cachedir.CACHE_ENV: str(cache), "CC": cc, "NB_TEST_CC_SLEEP": "60"})
    try:
        deadline = time.monotonic() + 120
        while not counter.exists() and time.monotonic() < deadline:  # the compiler has started: the build is under way
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    monkeypatch.setenv("CC", cc)
    lib = _lib_path(cache)
    stale = [p for p in lib.parent.iterdir() if p.name.endswith(".tmp.so")]
    assert len(stale) == 1 and stale[0].stat().st_size == 0 and not lib.exists()
    assert rngmod._native_poidev() is not None
    assert not any(p.name.endswith(".tmp.so") for p in lib.parent.iterdir())
    assert cachedir.file_problem(lib) is None


def test_sweep_keeps_the_temporary_files_of_a_live_builder(cache):
    d = cachedir.cache_subdir("native")
    busy, dead = d / "busy.so", d / "dead.so"
    busy_tmp, dead_tmp, legacy_tmp = d / ".busy.so.abc123.tmp.so", d / ".dead.so.x_y9.tmp.so", d / ".poidev-1.so.tmp"
    for p in (busy_tmp, dead_tmp, legacy_tmp):
        p.touch()
    os.close(cachedir.builder_lock(dead))  # a lock file whose holder is gone
    fd = cachedir.builder_lock(busy)
    try:
        assert rngmod._native_poidev() is not None  # the first load from the directory sweeps it
        assert busy_tmp.exists() and not dead_tmp.exists() and not legacy_tmp.exists()
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------
# AOT packages and the inductor cache


@pytest.fixture(scope="module")
def good_package():
    """The float64 forward package of tests/nbtorch/test_kernel.py's SMALL case, built in the default cache if it is
    not there yet (the one AOT build of this module), with its checked hash record."""
    if not fused.compiler_available():
        pytest.skip("no compiler for AOT packages")
    p, s = nbtorch.from_nanobragg_args(SMALL.split())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            nbtorch.simulate(p, s, fused=True)
        except RuntimeWarning as w:
            pytest.skip(f"no compiled kernels here: {w}")
    path = cachedir.cache_subdir("aot") / aot.package_path(cachedir.cache_root(), "forward", kernel_spec(p, s),
                                                           torch.float64, torch.device("cpu")).name
    assert cachedir.file_problem(path) is None
    return path


def _copy_package(good, root):
    d = cachedir.cache_subdir("aot", root)
    shutil.copyfile(good, d / good.name)
    shutil.copyfile(good.parent / (good.name + ".sha256"), d / (good.name + ".sha256"))
    return d / good.name


_AOT_RUN = """
import shutil, sys, torch, nbtorch
from nbtorch import aot
good, args, out = sys.argv[1:4]
builds = []

def build(path, *rest):  # stands in for the 30-50 s compilation: writes the package a build of this spec writes
    builds.append(path)
    shutil.copyfile(good, path)

aot.build = build
p, s = nbtorch.from_nanobragg_args(args.split())
torch.save(nbtorch.simulate(p, s, fused=True), out)
print("builds:", len(builds))
"""


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_package_is_rebuilt_and_the_image_equals_eager(cache, tmp_path, good_package, damage):
    """A corrupted package used to give SIGTRAP or a wrong image, a truncated one a fallback that was never rebuilt:
    now the hash mismatch rebuilds it (once) before anything is loaded (in a subprocess: a regression could crash)."""
    pkg = _copy_package(good_package, cache)
    data = pkg.read_bytes()
    mid = len(data) // 2
    pkg.write_bytes(data[:mid] + bytes(b ^ 0x5A for b in data[mid:mid + 256]) + data[mid + 256:]
                    if damage == "flip" else data[:mid])
    out = _run(_AOT_RUN, cache, good_package, SMALL, tmp_path / "img.pt")
    assert out.returncode == 0 and "builds: 1" in out.stdout, out.stdout + out.stderr
    assert "does not match" in out.stderr and "rebuilding" in out.stderr, out.stderr
    assert pkg.read_bytes() == good_package.read_bytes() and cachedir.file_problem(pkg) is None
    p, s = nbtorch.from_nanobragg_args(SMALL.split())
    eager = nbtorch.simulate(p, s, fused=False)
    torch.testing.assert_close(torch.load(tmp_path / "img.pt"), eager, rtol=1e-10, atol=1e-10 * float(eager.max()))


def test_package_in_an_untrusted_cache_is_not_loaded(cache, good_package, monkeypatch):
    """A package (with a matching record) in a world-writable cache: one warning, the eager image, no load."""
    _copy_package(good_package, cache)
    os.chmod(cache, 0o777)

    def refuse(*args):
        raise AssertionError(f"package loaded: {args}")

    monkeypatch.setattr(torch._C._aoti, "AOTIModelPackageLoader", refuse)
    p, s = nbtorch.from_nanobragg_args(SMALL.split())
    with pytest.warns(RuntimeWarning, match=re.escape(str(cache)) + ".*writable by group or others") as rec:
        img = nbtorch.simulate(p, s, fused=True)
    assert len([w for w in rec if "nbtorch" in str(w.message)]) == 1
    assert not aot._loaded
    torch.testing.assert_close(img, nbtorch.simulate(p, s, fused=False), rtol=0, atol=0)


def test_inductor_cache_is_private_or_replaced_by_a_private_temporary_one(cache):
    assert fused._inductor_dir() == (cache / "inductor").resolve()
    assert stat.S_IMODE(os.lstat(cache / "inductor").st_mode) == 0o700
    os.chmod(cache / "inductor", 0o775)
    with pytest.warns(RuntimeWarning, match="writable by group or others"):
        scratch = fused._inductor_dir()
    assert scratch == cachedir.scratch_dir() and scratch != cache / "inductor"
    st = os.lstat(scratch)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()


def test_inductor_is_pointed_at_the_private_cache_even_after_torch_chose_its_default(cache, monkeypatch):
    """torch sets TORCHINDUCTOR_CACHE_DIR to its shared default under /tmp the first time it asks for its cache (a
    loaded package does): that is not the user's choice, so nbtorch's private cache still wins; a folder the user
    set before nbtorch was imported is kept."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir as torch_cache_dir

    monkeypatch.setattr(fused, "_USER_INDUCTOR_DIR", None)
    assert torch_cache_dir() != str((cache / "inductor").resolve())  # torch's own default, now in os.environ
    fused.prepare_compiler()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((cache / "inductor").resolve())
    monkeypatch.setattr(fused, "_USER_INDUCTOR_DIR", str(cache / "mine"))
    fused.prepare_compiler()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache / "mine")


def test_compiled_ok_marker_is_per_cpu_capability(cache, monkeypatch):
    """Skipping inductor's ISA probe is right only for the capability that compiled before: AVX-512 code does not
    build where ATEN_CPU_CAPABILITY=default (it gave 'at::vec has not been declared')."""
    monkeypatch.setattr(fused, "_USER_INDUCTOR_DIR", None)
    fused.prepare_compiler()
    fused.mark_compiled_ok()
    here = fused._compiled_ok_marker()
    monkeypatch.setattr(torch._C, "_get_cpu_capability", lambda: "OTHER")
    assert fused._compiled_ok_marker() != here and not fused._compiled_ok_marker().exists() and here.exists()
