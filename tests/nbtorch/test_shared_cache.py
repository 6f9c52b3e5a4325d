"""A shared, read-only kernel cache (NBTORCH_SHARED_CACHE, filled once by ``python -m nbtorch.precompile``): its
packages are loaded without building anything in the user's own cache, and one that is writable by others or does
not match its hash record is skipped with a warning."""
from __future__ import annotations

import os
import shutil
import stat

import pytest
import torch

import nbtorch
from nbtorch import aot, cachedir
from nbtorch.simulate import kernel_spec

FLAGS = "-default_F 100 -cell 50 60 70 90 90 90 -N 4 -lambda 1 -distance 100 -detpixels 16 -pixel 0.2 -misset 5 6 7"
CPU = torch.device("cpu")


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """A shared cache in tmp_path/shared holding the forward package of FLAGS (built into the user's cache first if
    needed), the user's cache moved to an empty tmp_path/own, and no kernel loaded yet."""
    params, setup = nbtorch.from_nanobragg_args(FLAGS, dtype=torch.float64)
    spec = kernel_spec(params, setup)
    nbtorch.simulate(params, setup, fused=True)  # makes sure the package exists in the user's cache
    name = aot.package_path(cachedir.cache_root(), "forward", spec, torch.float64, CPU).name
    src = cachedir.cache_subdir("aot") / name
    dest = tmp_path / "shared" / "aot"
    dest.mkdir(parents=True)
    for f in (src, src.with_name(name + cachedir.HASH_SUFFIX)):
        shutil.copy(f, dest / f.name)
    for d in (dest, dest.parent):
        os.chmod(d, 0o755)  # readable by everyone, written by its owner only: how a shared cache is installed
    monkeypatch.setenv(cachedir.SHARED_ENV, str(tmp_path / "shared"))
    monkeypatch.setenv(cachedir.CACHE_ENV, str(tmp_path / "own"))
    monkeypatch.setattr(aot, "_loaded", {})
    monkeypatch.setattr(cachedir, "_warned", set())
    return params, setup, spec, dest / name


def test_a_shared_package_is_loaded_and_nothing_is_built(shared, tmp_path):
    params, setup, spec, _ = shared
    image = nbtorch.simulate(params, setup, fused=True)
    assert ("forward", spec, torch.float64, "cpu", None) in aot._loaded
    assert not list((tmp_path / "own").glob("aot/*.pt2"))
    torch.testing.assert_close(image, nbtorch.simulate(params, setup, fused=False), rtol=1e-10,
                               atol=1e-10 * float(image.max()))


def test_a_shared_cache_others_can_write_is_not_used(shared, tmp_path):
    params, setup, spec, package = shared
    os.chmod(package.parent, 0o777)
    with pytest.warns(RuntimeWarning, match=r"shared kernel cache .* is not used: .* writable by group or others"):
        assert aot.load(cachedir.cache_root(), "forward", spec, torch.float64, CPU, build_missing=False) is None


def test_a_shared_package_that_fails_its_hash_is_not_used(shared):
    params, setup, spec, package = shared
    record = package.with_name(package.name + cachedir.HASH_SUFFIX)
    os.chmod(record, stat.S_IRUSR | stat.S_IWUSR)
    record.write_text("0" * 64 + "  " + package.name + "\n")
    with pytest.warns(RuntimeWarning, match=r"shared cached compiled code .* is not used \(its SHA-256 does not match"):
        assert aot.load(cachedir.cache_root(), "forward", spec, torch.float64, CPU, build_missing=False) is None
