"""Ahead-of-time compiled tile kernels: a shared library per kernel that a process loads in milliseconds.

``torch.compile`` caches generated code on disk, but every new process still imports dynamo and re-traces the
Python function before it finds that code (seconds per process).  For the forward tile — all the work of
``nbtorch`` on the command line and of every forward ``simulate`` — and for the derivative moments of forward mode
(``jacfwd``), this module instead exports the tile function (:data:`KERNELS`) once per
(:class:`~nbtorch.kernel.KernelSpec`, dtype, device) with symbolic sizes
(pixels per tile, orientations, sources, sub-pixels, sensor layers, F-table extents), compiles it with AOTInductor
into a package in the kernel cache (``<cache>/aot/<key>.pt2``), and runs it through torch's C++ package loader,
which needs neither dynamo nor inductor at run time.  The OpenMP thread count follows ``torch.set_num_threads`` at
run time (not the count at build time).  The key hashes the kernel's source files, the torch version and the target
(CPU architecture and vector instruction set, or GPU compute capability), so an edited kernel, a new torch or a
cache shared with a different machine builds a new package.  Packages are loaded and built under the rules of
:mod:`nbtorch.cachedir` (a private directory, a SHA-256 record checked before loading, one builder at a time).
"""
from __future__ import annotations

import functools
import hashlib
import pathlib
import platform
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from . import cachedir
from .kernel import KernelSpec, TileConsts, TileParams, orientation_moments, sample_moments, tile_sums

__all__ = ["KERNELS", "package_path", "load", "build"]

#: nbtorch modules whose source defines the tile computation (part of the package key).
_SOURCES = ("kernel.py", "shape.py", "structure.py", "units.py", "aot.py")
#: Inductor settings that fuse a whole per-sample expression into the loop that reduces it (no per-sample values
#: written to memory), for kernels whose reductions all run over the same axes: one loop computes every sum.
_FUSE_SAMPLES = {"realize_opcount_threshold": 1000, "realize_reads_threshold": 16, "cpp.dynamic_threads": True}
#: The kernels compiled ahead of time: name → (function of (tp, tc, spec) returning a tuple of tensors, inductor
#: settings).  The forward tile and the orientation moment alone (:func:`nbtorch.kernel.orientation_moments`,
#: reverse mode for crystal parameters: 9 sums over the same axes, 1.2–1.8× faster fused) take
#: :data:`_FUSE_SAMPLES`; the derivative moments (:func:`nbtorch.kernel.sample_moments`, for forward mode: sums over
#: different axes, which fused would recompute the transcendental functions per sum) build faster and run faster with
#: inductor's default fusion.  All read the OpenMP thread count at run time.
KERNELS = {
    "forward": (tile_sums, _FUSE_SAMPLES),
    "moments": (sample_moments, {"cpp.dynamic_threads": True}),
    "orientation": (orientation_moments, _FUSE_SAMPLES),
}

_NP = len(TileParams._fields)
_loaded: Dict[tuple, Callable] = {}


@functools.lru_cache(maxsize=None)
def _source_hash() -> str:
    h = hashlib.sha256(torch.__version__.encode())
    here = pathlib.Path(__file__).parent
    for name in _SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def _target(device: torch.device) -> str:
    """What the compiled code is specific to besides the source: the CPU architecture and the vector instruction set
    it was compiled for (a cache shared by machines with different CPUs must not hand AVX-512 code to an AVX2
    machine), or the GPU's compute capability."""
    if device.type == "cuda":
        return f"cuda-sm{''.join(map(str, torch.cuda.get_device_capability(device)))}"
    return f"{device.type}-{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}"


def package_path(root: pathlib.Path, kind: str, spec: KernelSpec, dtype: torch.dtype,
                 device: torch.device) -> pathlib.Path:
    """Where the package of kernel ``kind`` (a key of :data:`KERNELS`) lives under the cache directory ``root``."""
    key = hashlib.sha256(f"{_source_hash()}|{kind}|{spec!r}|{dtype}|{_target(device)}".encode()).hexdigest()[:32]
    return root / "aot" / f"{kind}-{key}.pt2"


# ----------------------------------------------------------------------------------------------------------------
# building


def _example(spec: KernelSpec, dtype: torch.dtype, device: torch.device) -> Tuple[tuple, tuple]:
    """Example inputs with distinct sizes ≥ 2 along every symbolic axis, and the matching ``dynamic_shapes``."""
    from torch.export import Dim

    def z(*shape):
        return torch.rand(shape, dtype=dtype, device=device) + 0.5

    big = 1 << 40
    P, O, K, Ka, N2, T = (Dim(n, min=1, max=big) for n in ("pixels", "orientations", "sources", "all_sources",
                                                          "subpixels", "layers"))
    nh, nk, nl = (Dim(n, min=1, max=big) for n in ("nh", "nk", "nl"))
    F = z(5, 6, 7) if spec.table else z(0, 0, 0)
    tp = TileParams(pix0=z(3, 11), fdet=z(3, 11), sdet=z(3, 11), odet=z(3, 11), close=z(11), distance=z(),
                    A=z(13, 3, 3), B0=z(3, 3),
                    wavelength=z(), ncells=z(3), polarization=z(), F=F, default_F=z(), I_bg=z(), lam_shift=z())
    tc = TileConsts(fast=z(11), slow=z(11), offsets=z(9, 2), layers=z(2, 11), incident=z(4, 3), lam_factor=z(4),
                    incident_all=z(8, 3), lam_factor_all=z(8), polar_axis=z(3), beam=z(3), pixel=z(), area=z(11),
                    capture_k=z(11),
                    dmin=z(), hkl_min=z(3), weight=z(4), weight_all=z(8))
    dyn_p = {f: None for f in TileParams._fields}
    dyn_p.update(A={0: O}, F={0: nh, 1: nk, 2: nl} if spec.table else None, pix0={1: P}, fdet={1: P}, sdet={1: P},
                 odet={1: P}, close={0: P})
    dyn_c = {f: None for f in TileConsts._fields}
    dyn_c.update(fast={0: P}, slow={0: P}, area={0: P}, capture_k={0: P}, offsets={0: N2}, layers={0: T, 1: P},
                 incident={0: K}, lam_factor={0: K}, incident_all={0: Ka}, lam_factor_all={0: Ka}, weight={0: K},
                 weight_all={0: Ka})
    return tuple(tp) + tuple(tc), (tuple(dyn_p.values()) + tuple(dyn_c.values()),)


class _Tile(torch.nn.Module):
    def __init__(self, kind: str, spec: KernelSpec):
        super().__init__()
        self.fn, self.spec = KERNELS[kind][0], spec

    def forward(self, *flat):
        return tuple(self.fn(TileParams(*flat[:_NP]), TileConsts(*flat[_NP:]), self.spec))


def build(path: pathlib.Path, kind: str, spec: KernelSpec, dtype: torch.dtype, device: torch.device) -> None:
    """Export and compile kernel ``kind`` of ``spec`` into the package file ``path`` (which must end in ``.pt2``;
    :func:`load` builds into a temporary file that :func:`nbtorch.cachedir.load_or_build` renames into place).
    Raises whatever export or compilation raises."""
    import torch._inductor

    args, dynamic = _example(spec, dtype, device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecation notices while building
        program = torch.export.export(_Tile(kind, spec), args, dynamic_shapes=dynamic, strict=False)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                 inductor_configs=dict(KERNELS[kind][1]))


# ----------------------------------------------------------------------------------------------------------------
# loading


def _device_index(device: torch.device) -> int:
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if device.type == "cuda" else -1


def _package_loader(device: torch.device) -> Callable[[pathlib.Path], object]:
    index = _device_index(device)
    return lambda p: torch._C._aoti.AOTIModelPackageLoader(str(p), "model", False, 1, index)


def _kernel_of(runner) -> Callable[[TileParams, TileConsts], Tuple[torch.Tensor, ...]]:
    def fn(tp: TileParams, tc: TileConsts):
        # the compiled code assumes the contiguous layout of the example inputs (the orientation stack, for one,
        # often arrives as a strided view)
        return tuple(runner.run([t.contiguous() for t in (*tp, *tc)]))

    return fn


def load(root: pathlib.Path, kind: str, spec: KernelSpec, dtype: torch.dtype, device: torch.device,
         build_missing: bool = True) -> Optional[Callable[[TileParams, TileConsts], Tuple[torch.Tensor, ...]]]:
    """The compiled kernel ``kind`` of ``spec`` for inputs of ``dtype`` on ``device`` as ``f(tp, tc) -> tuple``
    (what the function of :data:`KERNELS` returns: (S [P], factor [P]) for "forward", the sample moments for
    "moments"): from a shared read-only cache when one is set and holds it (:func:`nbtorch.cachedir.shared_subdir`),
    else from the package cache under ``root`` (:mod:`nbtorch.cachedir`: loaded only from the user's own directory
    and when its SHA-256 matches the record; built first — or rebuilt, with a warning, when it fails a check or does
    not load — when ``build_missing``, else None).  Loaded once per process.  Raises
    :class:`~nbtorch.cachedir.UntrustedCacheError` when the cache is not the user's own."""
    key = (kind, spec, dtype, device.type, device.index)
    fn = _loaded.get(key)
    if fn is not None:
        return fn
    name = package_path(root, kind, spec, dtype, device).name
    shared = cachedir.shared_subdir("aot")
    runner = None if shared is None else cachedir.load_shared(shared / name, _package_loader(device))
    if runner is None:
        path = cachedir.cache_subdir("aot", root) / name
        runner = cachedir.load_or_build(path, lambda tmp: build(tmp, kind, spec, dtype, device),
                                        _package_loader(device), build_missing=build_missing)
    if runner is None:
        return None
    _loaded[key] = fn = _kernel_of(runner)
    return fn
