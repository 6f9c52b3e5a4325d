"""Filling the kernel cache ahead of use: the background builder and ``precompile`` for clusters and images.

``python -m nbtorch.precompile build --kind K --spec JSON --dtype D --device DEV`` builds one package (what a job
whose kernel is missing starts in the background, :func:`nbtorch.builder.start_background_build`; on failure it leaves
a mark that stops later jobs from starting the same build for a day).  ``python -m nbtorch.precompile [--dtype
float32,float64] [--specs common|all] [--device cpu]`` (also ``nbtorch --precompile``) builds a set of kernels in
the foreground, so that no job on the machine (or in a container image made from it) pays for the compiler; a cache
filled this way and made readable to all can serve everyone as a shared, read-only cache
(``NBTORCH_SHARED_CACHE``, :func:`nbtorch.cachedir.shared_subdir`).

The sets: ``common`` — the forward tile of every crystal shape with and without an F table, the derivative
moments of the default spec and its crystal-only reverse-mode kernel (``orientation``: a cell or orientation gradient)
(what ``nbtorch`` and ``nbtorch-refine`` use on nanoBragg's defaults); ``all`` — those
with and without a thick sensor and a ``-dmin`` cut each.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import aot, builder, fused
from .cachedir import cache_root, cache_subdir
from .kernel import KernelSpec

__all__ = ["kernel_set", "precompile", "build_one", "main"]

#: The crystal shapes of the lattice factor (``-square_xtal`` …).
SHAPES = ("square", "round", "gauss", "tophat")
SETS = ("common", "all")


def kernel_set(name: str) -> List[Tuple[str, KernelSpec]]:
    """The (kind, spec) pairs of the set ``name`` (:data:`SETS`)."""
    if name not in SETS:
        raise ValueError(f"--specs must be one of {', '.join(SETS)}, got {name!r}")
    switches = [(False, False)] if name == "common" else list(itertools.product((False, True), repeat=2))
    out = []
    for thick, dmin in switches:
        out += [("forward", KernelSpec(shape=s, table=t, thick=thick, dmin=dmin))
                for s in SHAPES for t in (False, True)]
        out += [(kind, KernelSpec(thick=thick, dmin=dmin)) for kind in ("moments", "orientation")]
    return out


def build_one(kind: str, spec: KernelSpec, dtype: torch.dtype, device: torch.device) -> None:
    """Build (or find) the package of kernel ``kind`` of ``spec`` in the cache; raises what building raises."""
    fused.prepare_compiler()
    aot.load(cache_root(), kind, spec, dtype, device)
    fused.mark_compiled_ok()


def precompile(dtypes: Sequence[torch.dtype], specs: str = "common", device: str = "cpu",
               progress: Optional[Callable[[str], None]] = None) -> int:
    """Build every kernel of the set ``specs`` for each of ``dtypes`` on ``device`` → how many failed (each
    reported through ``progress`` with its error)."""
    todo = [(k, s, d) for d in dtypes for k, s in kernel_set(specs)]
    failed = 0
    for i, (kind, spec, dtype) in enumerate(todo, 1):
        try:
            build_one(kind, spec, dtype, torch.device(device))
            note = "ready"
        except Exception as err:  # noqa: BLE001 - reported, and the others are still built
            failed += 1
            note = f"FAILED ({type(err).__name__}: {str(err)[:200]})"
        if progress is not None:
            progress(f"[{i}/{len(todo)}] {kind} {spec.shape}{' F-table' if spec.table else ''}"
                     f"{' thick' if spec.thick else ''}{' dmin' if spec.dmin else ''} {dtype}: {note}")
    return failed


def _background_build(ns) -> int:
    """One package, as a background builder: low priority, a failure mark instead of a traceback for the job."""
    try:
        os.nice(10)
    except OSError:
        pass
    spec, dtype, device = builder.spec_from_text(ns.spec), getattr(torch, ns.dtype), torch.device(ns.device)
    path = cache_subdir("aot") / aot.package_path(cache_root(), ns.kind, spec, dtype, device).name
    mark = path.with_name(path.name + builder.FAILED_SUFFIX)
    try:
        build_one(ns.kind, spec, dtype, device)
    except Exception as err:  # noqa: BLE001 - the mark tells later jobs (and the user) why
        mark.write_text(f"{type(err).__name__}: {err}\n", encoding="utf-8")
        print(f"nbtorch: background build of {path.name} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if mark.exists():
        mark.unlink()
    print(f"nbtorch: built {path.name}")
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nbtorch.precompile", description=__doc__.split("\n\n")[1])
    sub = ap.add_subparsers(dest="command")
    one = sub.add_parser("build", help="build one kernel package (what a background builder runs)")
    one.add_argument("--kind", required=True, choices=sorted(aot.KERNELS))
    one.add_argument("--spec", required=True, help="the kernel spec as JSON")
    one.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    one.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32,float64", help="comma-separated: float32, float64")
    ap.add_argument("--specs", default="common", choices=SETS)
    ap.add_argument("--device", default="cpu")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line (see the module's text); exit 0 when everything was built, 1 otherwise, 2 for bad usage."""
    ns = _parser().parse_args(argv)
    if ns.command == "build":
        return _background_build(ns)
    names = [d.strip() for d in ns.dtype.split(",") if d.strip()]
    bad = [d for d in names if d not in ("float32", "float64")]
    if bad or not names:
        print(f"--dtype: expected float32 and/or float64, got {ns.dtype!r}", file=sys.stderr)
        return 2
    failed = precompile([getattr(torch, d) for d in names], ns.specs, ns.device, progress=print)
    print(f"kernel cache {cache_root()}: {'all built' if not failed else f'{failed} failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
