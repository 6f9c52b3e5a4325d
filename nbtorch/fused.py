"""Compiled tile kernels and the autograd rules that make them differentiable under every ``torch.func`` transform.

The math lives in :mod:`nbtorch.kernel`; here it is compiled (``torch.compile``: inductor emits one vectorised,
OpenMP-parallel C++ loop nest per kernel on the CPU, Triton on a GPU) and wrapped in :class:`TileFunction`, an
``autograd.Function`` that recomputes a tile in the backward pass instead of keeping its graph, so reverse-mode memory
is set by the tile size, not by the image.

Per :class:`~nbtorch.kernel.KernelSpec`: the forward tile and the derivative moments (one pass over the samples
from which every first derivative is a small product) are compiled ahead of time (:mod:`nbtorch.aot`: packages that
a process loads in milliseconds, without dynamo).  Forward mode (``jacfwd``) takes value and tangents from one pass
of the moments (:class:`TileMoments`); reverse mode takes their transpose where they apply
(:func:`~nbtorch.kernel.has_fast_derivatives`), else runs the tile compiled by ``torch.compile`` under autograd
(AOTAutograd compiles its backward).  Compiled kernels are used when every input is a plain
tensor; under an outer ``torch.func`` transform (vmap over parameter sets, ``hessian``, …) the same math runs eagerly,
so every transform keeps working and gives the same numbers.  Compiled code is cached on disk (by default
``~/.cache/nbtorch``, see :mod:`nbtorch.cachedir`), so a second process loads it instead of compiling; where no
compiler works, or the cache is not the user's own, the eager code runs instead, with a warning.
"""
from __future__ import annotations

import enum
import os
import pathlib
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch._C._functorch import (TransformType, get_unwrapped, is_functorch_wrapped_tensor, maybe_get_level,
                                 peek_interpreter_stack)
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

from . import aot, builder
from .cachedir import UntrustedCacheError, cache_root, cache_subdir, scratch_dir
from .kernel import (KernelSpec, PixelMoments, TileConsts, TileParams, factor_jacobian, has_fast_derivatives,
                     ORIENTATION_FIELDS, jvp_from_moments, orientation_moments, sample_moments, tile_sums,
                     vjp_from_moments)

#: Environment variable: "0" forces the eager kernels, "1" the compiled ones (``simulate(fused=...)`` wins).
FUSED_ENV = "NBTORCH_FUSED"
#: Environment variable: "wait" makes jobs that chose compiled kernels by themselves build a missing one first (as an
#: explicit ``fused=True`` does); "background" (default) runs them eagerly while another process builds it.
BUILD_ENV = "NBTORCH_BUILD"


class Compiled(enum.IntEnum):
    """What a ``fused`` argument asks for (``False``/``True`` are ``NO``/``YES``): eager code; compiled kernels, a
    missing one built first; compiled kernels when they are in the cache, else eager code while a background process
    builds them (:func:`nbtorch.builder.request_build`; what ``simulate(fused=None)`` picks by itself)."""

    NO = 0
    YES = 1
    WHEN_READY = 2


def build_in_background() -> bool:
    """Whether jobs that chose compiled kernels by themselves leave a missing kernel to a background builder
    (:data:`BUILD_ENV`; ValueError for a value other than "background" or "wait")."""
    v = os.environ.get(BUILD_ENV, "background").strip().lower() or "background"
    if v not in ("background", "wait"):
        raise ValueError(f"{BUILD_ENV} must be 'background' or 'wait', got {v!r}")
    return v == "background"
_compiled: Dict[tuple, object] = {}
_broken: Dict[tuple, str] = {}


def cache_dir() -> pathlib.Path:
    """Directory of ``torch.compile``'s on-disk cache for nbtorch's kernels: ``<cache root>/inductor`` (see
    :mod:`nbtorch.cachedir`)."""
    return cache_root() / "inductor"


def _inductor_dir() -> pathlib.Path:
    """:func:`cache_dir`, created private and checked (:func:`nbtorch.cachedir.cache_subdir`); when it is not the
    user's own (warned once) or cannot be created, a private temporary directory for this process."""
    try:
        return cache_subdir(cache_dir().name)
    except (UntrustedCacheError, OSError):
        return scratch_dir()


#: ``TORCHINDUCTOR_CACHE_DIR`` as the user set it before nbtorch was imported (torch sets the variable itself, to its
#: shared default under /tmp, the first time it asks for its cache folder: that must not count as the user's choice).
_USER_INDUCTOR_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def _compiled_ok_marker() -> pathlib.Path:
    """The file whose presence says compiled kernels worked here before, for this CPU capability (ATen's, which
    ``ATEN_CPU_CAPABILITY`` can lower: code vectorised for AVX-512 does not build where ATen runs its default path)."""
    capability = torch._C._get_cpu_capability().lower()
    return pathlib.Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / f"nbtorch-compiled-ok-{capability}"


def prepare_compiler() -> None:
    """Point inductor's cache at :func:`_inductor_dir` (unless the user chose one with ``TORCHINDUCTOR_CACHE_DIR``)
    and skip its per-process CPU-ISA probe once a previous process has shown that compiled kernels work on this
    machine with this CPU capability."""
    if _USER_INDUCTOR_DIR is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_inductor_dir())
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = _USER_INDUCTOR_DIR
    # (not with ATEN's default capability: skipping the probe there lets inductor emit vector code that its
    # precompiled header for that capability does not declare)
    if _compiled_ok_marker().exists() and torch._C._get_cpu_capability().lower() != "default":
        import torch._inductor.config as inductor_config

        inductor_config.cpp.vec_isa_ok = True


def mark_compiled_ok() -> None:
    try:
        marker = _compiled_ok_marker()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:  # a read-only cache only costs the probe next time
        pass


def fused_default() -> Optional[bool]:
    """The ``NBTORCH_FUSED`` environment setting: True, False, or None (choose by the amount of work)."""
    v = os.environ.get(FUSED_ENV, "").strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    return None


def compiler_available() -> bool:
    """Whether ``torch.compile`` can be tried here (dynamo supports this Python; a kernel that then fails to build
    falls back to eager code)."""
    try:
        return torch._dynamo.is_dynamo_supported()
    except Exception:  # pragma: no cover
        return False


def _is_plain(tensors) -> bool:
    return all(not (isinstance(t, torch.Tensor) and is_functorch_wrapped_tensor(t)) for t in tensors)


def _kernel(kind: str, spec: KernelSpec):
    """The compiled kernel ``kind`` (see :data:`_KERNEL_OPTIONS`) for ``spec``, or None when it failed to build."""
    key = (kind, spec)
    if key in _broken:
        return None
    fn = _compiled.get(key)
    if fn is None:
        prepare_compiler()

        def tile(tp, tc):
            return tile_sums(tp, tc, spec)

        fn = torch.compile(tile, dynamic=None, options=dict(_KERNEL_OPTIONS[kind]))
        _compiled[key] = fn
    return fn


#: The ``torch.compile`` kernels: the tile for reverse mode ("grad": AOTAutograd compiles its backward too;
#: inductor's default fusion, because the forward tile's settings (:data:`nbtorch.aot.KERNELS`) made its
#: backward slower and longer to build).  The forward tile is compiled ahead of time (:mod:`nbtorch.aot`).
_KERNEL_OPTIONS = {"grad": {}}


def _run(kind: str, spec: KernelSpec, eager, *args, grad: bool = False):
    """Run the compiled kernel (under ``torch.no_grad`` unless ``grad``), or ``eager(*args)`` if it cannot be built
    here (warned once per kernel)."""
    fn = _kernel(kind, spec)
    if fn is None:
        return eager(*args)
    try:
        with torch.set_grad_enabled(grad), torch._dynamo.config.patch(recompile_limit=64,
                                                                      accumulated_recompile_limit=4096):
            out = fn(*args)
    except Exception as err:  # compiler missing or broken: remember, warn once, compute eagerly
        key = (kind, spec)
        _broken[key] = f"{type(err).__name__}: {err}"
        warnings.warn(f"nbtorch: compiled {kind} kernel unavailable ({type(err).__name__}); using eager code",
                      RuntimeWarning, stacklevel=3)
        return eager(*args)
    mark_compiled_ok()
    return out


# ----------------------------------------------------------------------------------------------------------------
# the three operations: compiled (derivatives from one pass of moments) or eager (autograd of the forward tile)


def _unrecorded(tp: TileParams) -> bool:
    """Whether the leaves of ``tp`` are plain tensors that autograd is not recording (where the forward tile needs no
    derivative rule; compiled kernels are not differentiable themselves: their derivatives are the other kernels)."""
    return _is_plain(tp) and not (torch.is_grad_enabled() and any(v.requires_grad for v in tp))


def _eager_sums(spec, tc):
    def f(tp):
        return tile_sums(tp, tc, spec)
    return f


def _zeros_for_none(tp: TileParams, tan: TileParams) -> TileParams:
    return TileParams(*(torch.zeros_like(v) if t is None else t for v, t in zip(tp, tan)))


def forward(spec: KernelSpec, tc: TileConsts, tp: TileParams, fused: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(S [P], factor [P]) of a tile, values only (what :func:`apply_tile` returns where nothing records derivatives,
    and :class:`TileFunction`'s forward, whose derivatives come from the other kernels); compiled ahead of time
    (:mod:`nbtorch.aot`) when ``fused`` and every input is a plain tensor, else eager."""
    fn = _aot_kernel("forward", spec, tp.A, fused) if fused and _unrecorded(tp) else None
    if fn is None:
        return tile_sums(tp, tc, spec, values_only=True)
    with torch.no_grad():
        return fn(tp, tc)


def _aot_kernel(kind: str, spec: KernelSpec, like: torch.Tensor, fused: int = Compiled.YES):
    """The ahead-of-time compiled kernel ``kind``, or None: with a warning, once, when it cannot be built or loaded
    here; silently while a background process builds it (``fused`` is :attr:`Compiled.WHEN_READY`).  With
    :attr:`Compiled.YES` a missing kernel is built first, in this process."""
    key = (kind, spec, like.dtype, like.device.type)
    if key in _broken:
        return None
    try:
        root = cache_root()
        fn = aot.load(root, kind, spec, like.dtype, like.device, build_missing=False)  # no dynamo, no inductor
        if fn is None and fused == Compiled.WHEN_READY:
            return _left_to_builder(root, kind, spec, like)
        if fn is None:  # only a build needs the compiler
            prepare_compiler()
            fn = aot.load(root, kind, spec, like.dtype, like.device)
            mark_compiled_ok()
    except UntrustedCacheError as err:  # already warned (once for all kernels): compute eagerly
        _broken[key] = f"{type(err).__name__}: {err}"
        return None
    except Exception as err:  # compiler missing or broken: remember, warn once, compute eagerly
        _broken[key] = f"{type(err).__name__}: {err}"
        warnings.warn(f"nbtorch: compiled {kind} kernel unavailable ({type(err).__name__}: {str(err)[:200]}); "
                      "using eager code", RuntimeWarning, stacklevel=4)
        return None
    return fn


def _left_to_builder(root: pathlib.Path, kind: str, spec: KernelSpec, like: torch.Tensor) -> None:
    """Start (or leave at work) the background builder of a missing kernel; warn once, and stop asking, when its
    build failed recently.  Always None: this call computes eagerly."""
    path = aot.package_path(root, kind, spec, like.dtype, like.device)
    failure = builder.build_failure(path)
    if failure is not None:
        _broken[(kind, spec, like.dtype, like.device.type)] = failure
        warnings.warn(f"nbtorch: compiled {kind} kernel unavailable (its build failed: {failure[:200]}; log "
                      f"{path}{builder.LOG_SUFFIX}); using eager code", RuntimeWarning, stacklevel=5)
        return None
    builder.request_build(root, kind, spec, like.dtype, like.device)
    return None


def _tangent(tangents: TileParams, c: int) -> TileParams:
    return TileParams(*(None if t is None else t[c] for t in tangents))


def jvp(spec: KernelSpec, tc: TileConsts, tp: TileParams, tangents: TileParams, fused: bool):
    """(Ṡ [C, P], ḟactor [C, P]) for C tangent directions: a TileParams whose leaves have a leading C axis, or are
    None (no tangent).  Where :func:`~nbtorch.kernel.has_fast_derivatives` holds, one pass over the samples serves
    all C columns (:func:`_moments`); otherwise one forward-mode pass per column.

    With ``fused`` the sample moments come from a kernel compiled ahead of time (:mod:`nbtorch.aot`)."""
    C = next(t.shape[0] for t in tangents if t is not None)
    # a tangent's dtype follows its primal's (torch can hand a float32 primal a float64 tangent under jacfwd)
    tangents = TileParams(*(None if t is None else t.to(v.dtype) for t, v in zip(tangents, tp)))
    if _is_plain(tp) and _is_plain(tangents) and has_fast_derivatives(spec):  # no F table: its tangent is moot
        with torch.no_grad():
            return jvp_from_moments(_moments(spec, tc, tp, fused), tp, tangents)
    f = _eager_sums(spec, tc)
    outs = [torch.func.jvp(f, (tp,), (_zeros_for_none(tp, _tangent(tangents, c)),))[1] for c in range(C)]
    return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


def vjp(spec: KernelSpec, tc: TileConsts, tp: TileParams, gS: torch.Tensor, gf: torch.Tensor,
        needs: Tuple[bool, ...], fused: bool = False) -> TileParams:
    """Gradients of ⟨gS, S⟩ + ⟨gf, factor⟩ (gS, gf: [P]) with respect to the leaves of ``tp`` flagged in ``needs``
    (the others None), by reverse-mode autograd of the tile recomputed here: compiled forward and backward when
    ``fused`` and every input is a plain tensor, else eager code.  Compiled, the
    :func:`~nbtorch.kernel.has_fast_derivatives` cases take the transpose of forward mode instead
    (:func:`~nbtorch.kernel.vjp_from_moments`: one pass of the derivative moments, compiled ahead of time — no
    tracing; ≈ 1.8× faster than the compiled autograd backward on case B, about as fast with one sample per source
    and orientation)."""
    idx = [i for i, n in enumerate(needs) if n]

    def tile_of(*chosen):
        return TileParams(*_substitute(tp, idx, chosen))

    def eager(*chosen):
        return torch.func.vjp(lambda *c: tile_sums(tile_of(*c), tc, spec), *chosen)[1]((gS, gf))

    chosen = [tp[i] for i in idx]
    plain = fused and _is_plain(tp) and _is_plain((gS, gf))
    if plain and has_fast_derivatives(spec):
        grads = _vjp_from_moments(spec, tc, tp, gS, gf, idx, fused)
    elif plain:
        grads = _compiled_vjp(spec, tc, tile_of, chosen, (gS, gf), eager)
    else:
        grads = eager(*chosen)
    return TileParams(*_substitute([None] * len(tp), idx, grads))


def _sample_moments(spec: KernelSpec, tc: TileConsts, tp: TileParams, fused: bool,
                    kind: str = "moments") -> Tuple[torch.Tensor, ...]:
    """:func:`~nbtorch.kernel.sample_moments` (``kind`` "moments") or :func:`~nbtorch.kernel.orientation_moments`
    ("orientation") of a tile of plain tensors, compiled ahead of time when ``fused`` (eager where the kernel cannot
    be built)."""
    fn = _aot_kernel(kind, spec, tp.A, fused) if fused else None
    if fn is None:
        return (sample_moments if kind == "moments" else orientation_moments)(tp, tc, spec)
    return fn(tp, tc)


def _moments(spec: KernelSpec, tc: TileConsts, tp: TileParams, fused: bool) -> PixelMoments:
    """The derivative moments of a tile of plain tensors (:func:`~nbtorch.kernel.derivative_moments`): the sample
    part from :func:`_sample_moments` and the factor's Jacobian."""
    return PixelMoments(*_sample_moments(spec, tc, tp, fused), *factor_jacobian(tp, tc, spec))


def _vjp_from_moments(spec: KernelSpec, tc: TileConsts, tp: TileParams, gS, gf, idx, fused: int) -> list:
    """Reverse mode from the compiled sample moments: the gradients of the leaves ``idx`` (zeros where the tile
    does not depend on a leaf)."""
    fields = [TileParams._fields[i] for i in idx]
    kind = "orientation" if set(fields) <= set(ORIENTATION_FIELDS) else "moments"  # crystal parameters alone
    with torch.no_grad():
        grads = vjp_from_moments(_sample_moments(spec, tc, tp, fused, kind), tp, tc, spec, gS, gf, fields)
    return [grads.get(TileParams._fields[i], torch.zeros_like(tp[i])) for i in idx]


def _compiled_vjp(spec, tc, tile_of, chosen, cotangents, eager):
    """Reverse mode through the compiled "grad" kernel: its forward under autograd, then ``torch.autograd.grad``
    (AOTAutograd's compiled backward)."""
    leaves = [c.detach().requires_grad_() for c in chosen]
    with torch.enable_grad():
        out = _run("grad", spec, lambda *a: None, tile_of(*leaves), tc, grad=True)
    if out is None:  # the kernel could not be built here
        return eager(*chosen)
    pairs = [(o, c) for o, c in zip(out, cotangents) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(c) for c in chosen]
    return torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs], allow_unused=True,
                               materialize_grads=True)


# ----------------------------------------------------------------------------------------------------------------
# autograd rules

_NLEAF = len(TileParams._fields)


class TileFunction(torch.autograd.Function):
    """(S, factor) of one tile as a differentiable operation that keeps no graph: the backward pass recomputes the
    tile (so reverse-mode memory is one tile's, whatever the image size), forward mode goes through
    :class:`TileTangent` (all ``jacfwd`` columns in one pass), and vmap over parameter sets runs the forward eagerly.

    ``apply(spec, tc, fused, *leaves)`` with ``leaves`` the fields of a :class:`~nbtorch.kernel.TileParams`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(spec, tc, fused, *leaves):
        return forward(spec, tc, TileParams(*leaves), fused)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, tc, fused, *leaves = inputs
        ctx.spec, ctx.tc, ctx.fused = spec, tc, fused
        ctx.save_for_backward(*leaves)
        ctx.save_for_forward(*leaves)
        ctx.set_materialize_grads(False)  # undefined output gradients arrive as None: no pass over the tile

    @staticmethod
    def backward(ctx, gS, gf):
        if gS is None and gf is None:
            return (None,) * (3 + _NLEAF)
        tp = TileParams(*ctx.saved_tensors)
        gS, gf = (gS if gS is not None else torch.zeros_like(gf)), (gf if gf is not None else torch.zeros_like(gS))
        needs = tuple(ctx.needs_input_grad[3:])
        return (None, None, None) + tuple(vjp(ctx.spec, ctx.tc, tp, gS, gf, needs, ctx.fused))

    @staticmethod
    def jvp(ctx, _spec, _tc, _fused, *tangents):
        return TileTangent.apply(ctx.spec, ctx.tc, ctx.fused, *ctx.saved_tensors, *tangents)


class TileTangent(torch.autograd.Function):
    """Forward-mode derivative of :class:`TileFunction`: ``apply(spec, tc, fused, *leaves, *tangents)`` → (Ṡ, ḟactor).

    Its vmap rule turns a batch of tangents (``jacfwd``) into one compiled pass with C tangent directions; its own
    derivatives (second order) are those of the eager code.
    """

    @staticmethod
    def forward(spec, tc, fused, *args):
        tp = TileParams(*args[:_NLEAF])
        tan = TileParams(*(None if t is None else t[None] for t in args[_NLEAF:]))
        Sd, fd = jvp(spec, tc, tp, tan, fused)
        return Sd[0], fd[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, tc, fused, *args = inputs
        ctx.spec, ctx.tc, ctx.present = spec, tc, tuple(a is not None for a in args)
        ctx.save_for_backward(*[a for a in args if a is not None])
        ctx.save_for_forward(*[a for a in args if a is not None])

    @staticmethod
    def vmap(info, in_dims, spec, tc, fused, *args):
        leaf_dims, tan_dims = in_dims[3:3 + _NLEAF], in_dims[3 + _NLEAF:]
        if all(d is None for d in leaf_dims):
            tp = TileParams(*args[:_NLEAF])
            B = info.batch_size
            tangents = TileParams(*(None if t is None else (t.movedim(d, 0) if d is not None else t.expand(B, *t.shape))
                                    for t, d in zip(args[_NLEAF:], tan_dims)))
            return jvp(spec, tc, tp, tangents, fused), (0, 0)
        out = torch.func.vmap(_eager_tangent(spec, tc), in_dims=tuple(in_dims[3:]),
                              randomness=info.randomness)(*args)
        return out, (0, 0)

    @staticmethod
    def backward(ctx, gSd, gfd):
        args, idx, f = _saved_tangent_function(ctx)
        grads = torch.func.vjp(f, *[args[i] for i in idx])[1]((gSd, gfd))
        return (None, None, None) + tuple(_substitute([None] * len(args), idx, grads))

    @staticmethod
    def jvp(ctx, _spec, _tc, _fused, *tangents):
        args, idx, f = _saved_tangent_function(ctx)
        tans = tuple(torch.zeros_like(args[i]) if tangents[i] is None else tangents[i] for i in idx)
        return torch.func.jvp(f, tuple(args[i] for i in idx), tans)[1]


class TileMoments(torch.autograd.Function):
    """(S, factor) of one tile under forward mode, computed from its derivative moments in one pass: the forward
    returns them with the value (non-differentiable extra outputs, saved for ``jvp``), so ``jacfwd`` does not run the
    forward tile and the moments separately.  ``apply(spec, tc, *leaves)``; only for
    :func:`~nbtorch.kernel.has_fast_derivatives` specs whose primals are plain tensors (:func:`apply_tile` checks).
    (functorch hands ``jvp`` a tangent for every input, zeros included, so the factor's Jacobian is always formed.)
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(spec, tc, fused, *leaves):
        tp = TileParams(*leaves)
        with torch.no_grad(), temporarily_clear_interpreter_stack():  # plain tensors: no transform applies here
            pm = _moments(spec, tc, tp, fused)
        return (tp.I_bg + pm.S, pm.factor, *pm)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _spec, _tc, _fused, *leaves = inputs
        ctx.mark_non_differentiable(*output[2:])
        ctx.save_for_forward(*output[2:], *leaves)

    @staticmethod
    def jvp(ctx, _spec, _tc, _fused, *tangents):
        saved = ctx.saved_tensors
        n = len(PixelMoments._fields)
        pm, tp = PixelMoments(*saved[:n]), TileParams(*saved[n:])
        tan = TileParams(*(None if t is None else t.to(v.dtype)[None] for t, v in zip(tangents, tp)))
        Sd, fd = jvp_from_moments(pm, tp, tan)
        return (Sd[0], fd[0]) + (None,) * n


def _forward_mode_of_plain(tp: TileParams) -> bool:
    """Whether the innermost ``torch.func`` transform is forward mode (``jvp``, ``jacfwd``) over primals that are
    plain tensors beneath it (what :class:`TileMoments` needs)."""
    interp = peek_interpreter_stack()  # None when no transform is active
    if interp is None or interp.key() != TransformType.Jvp:
        return False
    level = interp.level()
    return all(not is_functorch_wrapped_tensor(t) or (maybe_get_level(t) == level
                                                      and not is_functorch_wrapped_tensor(get_unwrapped(t)))
               for t in tp)


def apply_tile(spec: KernelSpec, tc: TileConsts, tp: TileParams, fused: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(S [P], factor [P]) of a tile, differentiable under autograd and every ``torch.func`` transform: the plain
    forward when nothing records derivatives, :class:`TileMoments` under forward mode of plain primals (compiled,
    :func:`~nbtorch.kernel.has_fast_derivatives` specs), else :class:`TileFunction`."""
    if _unrecorded(tp):
        return forward(spec, tc, tp, fused)
    if fused and has_fast_derivatives(spec) and _forward_mode_of_plain(tp):
        return TileMoments.apply(spec, tc, fused, *tp)[:2]
    return TileFunction.apply(spec, tc, fused, *tp)


def _substitute(values, idx, chosen) -> list:
    """``values`` as a list with ``values[i]`` replaced by ``chosen[k]`` for the k-th index ``i`` of ``idx``."""
    full = list(values)
    for i, v in zip(idx, chosen):
        full[i] = v
    return full


def _saved_tangent_function(ctx):
    """TileTangent's saved inputs (None where absent), the indices present, and the eager tangent as a function of
    the present ones (what its second-order rules differentiate)."""
    args = _unpack_saved(ctx.present, ctx.saved_tensors)
    idx = [i for i, a in enumerate(args) if a is not None]

    def f(*present):
        return _eager_tangent(ctx.spec, ctx.tc)(*_substitute(args, idx, present))

    return args, idx, f


def _unpack_saved(present, saved):
    it = iter(saved)
    return [next(it) if p else None for p in present]


def _eager_tangent(spec: KernelSpec, tc: TileConsts):
    """(Ṡ, ḟactor) for one tangent by autograd of the eager forward tile (None tangents are zero)."""
    f = _eager_sums(spec, tc)

    def tangent(*args):
        tp, tan = TileParams(*args[:_NLEAF]), TileParams(*args[_NLEAF:])
        return torch.func.jvp(f, (tp,), (_zeros_for_none(tp, tan),))[1]

    return tangent
