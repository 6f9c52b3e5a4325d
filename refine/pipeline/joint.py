"""The pieces of a joint fit: which scalars are shared, the flat vector's layout, and the joint objective.

A joint fit refines N images together: the *shared* scalars (one value for all images, e.g. the detector distance)
and each image's *own* scalars (e.g. its orientation and scale).  Every image keeps its own
:class:`~refine.parameters.Parameterisation` over (shared + own) scalars about its own starting model; the shared
parts of the starting models are made identical first (image 1's values, :func:`align_shared`), so a shared increment
means the same change in every image.  The flat vector is X = (x_s [n_s], x_1 [n_1], …, x_N [n_N]) (:class:`Layout`).

:class:`JointObjective` evaluates the loss and the block normal equations (:class:`refine.schur.BlockNormal`).  Images
with the same set-up, the same pixels and the same free scalars form a group whose Jacobians are computed in one
``torch.func.vmap`` of ``jacfwd`` over the images (one batched simulation instead of a Python loop); images of other
detector sizes form groups of their own.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.func import jacfwd, vmap

from nbtorch.simulate import simulate_pixels
from nbtorch.types import Params

from ..model.parameters import Parameterisation, get_leaf, set_leaf
from ..model.predict import plane_basis
from ..minimise.schur import BlockNormal
from ..model.table import SCALARS, SUBGROUPS
from ..targets import Target


def _specs_of(names: Sequence[str]):
    """Table entries a list of groups / sub-groups / scalar names covers."""
    out = []
    for n in names:
        sub = SUBGROUPS.get(n, ())
        out += [s for s in SCALARS if n in (s.group, s.name) or s.name in sub]
    return out


def align_shared(params_list: Sequence[Params], shared: Sequence[str]) -> Tuple[List[Params], List[str]]:
    """Copy the leaves of the ``shared`` groups/scalars from the first model to every other one: (models, notes
    naming the leaves whose starting values differed).  The background plane is refine's (``FitOptions.background``)
    and the same for every image."""
    first, out, notes = params_list[0], [params_list[0]], []
    leaves = []
    for s in _specs_of(shared):
        if s.transform == "rotation":
            leaves += [("crystal.misset", None), ("crystal.orientation", None)]
        elif s.leaf != "plane":
            leaves.append((s.leaf, s.index if s.transform != "cell" else None))
    leaves = list(dict.fromkeys(leaves))
    for k, p in enumerate(params_list[1:], start=2):
        for leaf, index in leaves:
            ref, cur = get_leaf(first, leaf), get_leaf(p, leaf)
            new = ref.clone() if index is None or ref.dim() == 0 else cur.clone().index_put((torch.tensor(index),),
                                                                                             ref[index])
            if new.shape != cur.shape or not torch.allclose(new.to(cur), cur, rtol=1e-9, atol=1e-12):
                notes.append(f"image {k}: starting {leaf} differs from image 1's; the shared start is image 1's")
            p = set_leaf(p, leaf, new.to(cur))
        out.append(p)
    return out, notes


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each image's scalars sit in the flat vector X.

    ``shared`` (names, the first n_s entries of X); per image ``names`` (its parameterisation's order),
    ``shared_pos`` (positions of the shared names in it), ``own_pos`` (positions of its own scalars, in order) and
    ``offset`` (where its own scalars start in X)."""

    shared: Tuple[str, ...]
    names: Tuple[Tuple[str, ...], ...]
    shared_pos: Tuple[Tuple[int, ...], ...]
    own_pos: Tuple[Tuple[int, ...], ...]
    offset: Tuple[int, ...]

    @property
    def n(self) -> int:
        """Length of X."""
        return len(self.shared) + sum(len(p) for p in self.own_pos)

    def own_names(self, i: int) -> List[str]:
        """Image ``i``'s own scalar names, in X order."""
        return [self.names[i][j] for j in self.own_pos[i]]

    def image_x(self, X: torch.Tensor, i: int) -> torch.Tensor:
        """Image ``i``'s increments [n_i] (its parameterisation's order) from X."""
        x = X.new_zeros(len(self.names[i]))
        ns, o = len(self.shared), self.offset[i]
        x[list(self.shared_pos[i])] = X[:ns]
        x[list(self.own_pos[i])] = X[o:o + len(self.own_pos[i])]
        return x

    def pack(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """X from per-image increments (shared values from image 1)."""
        parts = [xs[0][list(self.shared_pos[0])]] + [x[list(p)] for x, p in zip(xs, self.own_pos)]
        return torch.cat(parts)


def make_layout(pars: Sequence[Parameterisation], shared: Sequence[str]) -> Layout:
    """The :class:`Layout` of parameterisations whose scalars in the ``shared`` groups are shared (ValueError when an
    image lacks one of image 1's shared scalars)."""
    wanted = {s.name for s in _specs_of(shared)}
    shared_names = tuple(n for n in pars[0].names if n in wanted)
    names, spos, opos, offs = [], [], [], []
    k = len(shared_names)
    for i, par in enumerate(pars):
        missing = [n for n in shared_names if n not in par.names]
        if missing:
            raise ValueError(f"image {i + 1} has no shared scalar {missing[0]} (a different crystal system?)")
        names.append(tuple(par.names))
        spos.append(tuple(par.names.index(n) for n in shared_names))
        own = tuple(j for j, n in enumerate(par.names) if n not in shared_names)
        opos.append(own)
        offs.append(k)
        k += len(own)
    return Layout(shared_names, tuple(names), tuple(spos), tuple(opos), tuple(offs))


# ---------------------------------------------------------------------------------------------------------------
# a group of images evaluated together


def _batched_ref(pars: Sequence[Parameterisation]) -> Params:
    """The images' reference models stacked on a leading axis, except the structure factors (shared, not copied)."""
    refs = [p.ref._replace(structure=None) for p in pars]
    fields = {}
    for part in ("crystal", "beam", "detector", "background"):
        node = getattr(refs[0], part)
        fields[part] = type(node)(*(torch.stack([getattr(getattr(r, part), f) for r in refs])
                                    for f in node._fields))
    return Params(structure=pars[0].ref.structure, **fields)


#: vmap's in_dims for a stacked reference model: every leaf batched but the structure factors.
REF_DIMS = Params(0, 0, 0, None, 0)


class ImageGroup:
    """Images evaluated in one batch: same set-up, pixels and free scalars (``ids`` into the joint problem).

    ``o`` [B, P] observed photons at the flat pixel ``index`` [P]; the model of image b at increments x [n] is
    ``simulate_pixels`` of its parameterisation plus its background plane."""

    def __init__(self, ids: Sequence[int], pars: Sequence[Parameterisation], observed: Sequence[torch.Tensor],
                 index: np.ndarray, chunk_pixels: int, fused: Optional[bool]):
        t = pars[0]
        self.ids, self.template, self.setup = list(ids), t, t.setup
        self.fused = fused if len(ids) == 1 else False  # compiled tiles are not vmapped
        self.ref, self.R0 = _batched_ref(pars), torch.stack([p.R0 for p in pars])
        self.cell_base = torch.stack([p.cell_base for p in pars])
        self.plane_ref = torch.stack([p.background_ref for p in pars])
        self.index = torch.as_tensor(index, dtype=torch.long, device=t.device)
        self.o = torch.stack([o.reshape(-1)[self.index] for o in observed]).to(t.dtype)
        has_plane = any(p.has_plane() for p in pars)
        self.basis = plane_basis(t.setup, t.dtype, t.device, self.index) if has_plane else None
        step = max(64, int(chunk_pixels) // len(ids))
        self.slices = [slice(a, a + step) for a in range(0, len(index), step)]

    def _fn(self, sl: slice):
        """model(x [n], ref, R0, cell_base, plane_ref) → photons [P_chunk] for one image of the group."""
        t, setup, idx = self.template, self.setup, self.index[sl]
        basis = None if self.basis is None else self.basis[:, sl]

        def model(x, ref, R0, cell_base, plane_ref):
            par = dataclasses.replace(t, ref=ref, R0=R0, cell_base=cell_base, background_ref=plane_ref)
            m = simulate_pixels(par.unpack(x), setup, idx, check=False, fused=self.fused)
            return m if basis is None else m + par.plane(x) @ basis

        return model

    def _apply(self, f, *xs):
        """``f(*x, ref, R0, cell_base, plane_ref)`` for every image: vmapped over a group of several images, called
        directly for one (so a single image may use the compiled tiles), outputs with a leading image axis."""
        if len(self.ids) > 1:
            dims = (0,) * len(xs) + (REF_DIMS, 0, 0, 0)
            return vmap(f, in_dims=dims)(*xs, self.ref, self.R0, self.cell_base, self.plane_ref)
        t = self.template
        out = f(*(x[0] for x in xs), t.ref, t.R0, t.cell_base, t.background_ref)
        return tuple(o[None] for o in out) if isinstance(out, tuple) else out[None]

    def models(self, Xb: torch.Tensor, tick: Optional[Callable[[float], None]] = None) -> torch.Tensor:
        """Model photons [B, P] at increments Xb [B, n] (no gradient); ``tick(fraction of the pixels done)`` after
        each chunk."""
        out = []
        with torch.no_grad():
            for j, sl in enumerate(self.slices, start=1):
                out.append(self._apply(self._fn(sl), Xb))
                if tick is not None:
                    tick(j / len(self.slices))
        return torch.cat(out, 1)

    def normal(self, Xb: torch.Tensor, act: Sequence[int], target: Target,
               tick: Optional[Callable[[float], None]] = None):
        """(models [B, P], g [B, k], H [B, k, k]) over the ``act`` positions of x: J by forward mode per pixel chunk
        (vmapped over the images), H = JᵀWJ and g = Jᵀ·∂L/∂m; ``tick(fraction of the pixels done)`` after each
        chunk."""
        act_t = torch.as_tensor(list(act), dtype=torch.long, device=Xb.device)
        B, k = Xb.shape[0], len(act)
        H, g, ms = Xb.new_zeros(B, k, k), Xb.new_zeros(B, k), []
        if k == 0:
            return self.models(Xb, tick), g, H
        for j, sl in enumerate(self.slices, start=1):
            fn = self._fn(sl)

            def f(xa, x0, *rest, fn=fn):
                m = fn(x0.index_put((act_t,), xa), *rest)
                return m, m

            J, m = self._apply(jacfwd(f, has_aux=True), Xb[:, act_t], Xb)
            o = self.o[:, sl]
            H += torch.einsum("bpk,bp,bpl->bkl", J, target.fisher(m, o), J)
            g += torch.einsum("bpk,bp->bk", J, target.dloss(m, o))
            ms.append(m)
            if tick is not None:
                tick(j / len(self.slices))
        return torch.cat(ms, 1), g, H


def _group_key(par: Parameterisation, index: np.ndarray):
    """Images with equal keys are simulated in one vmapped batch: same set-up, pixels, free scalars and structure
    factors (which are not batched)."""
    st = par.ref.structure
    table = hashlib.blake2b(st.F.detach().cpu().numpy().tobytes(), digest_size=16).hexdigest()
    return (par.setup, tuple(par.names), hashlib.blake2b(index.tobytes(), digest_size=16).hexdigest(),
            par.crystal_system, par.ncells_iso, tuple(par.cell_rows), tuple(st.F.shape), table,
            float(st.default_F))


class JointObjective:
    """Loss and block normal equations of N images with shared scalars (the joint fit's objective).

    Args: ``pars`` (one parameterisation per image, shared scalars about identical references), ``layout``,
    ``observed`` (images [slow, fast], photons), ``pixels`` (flat indices per image), ``target``, ``chunk_pixels``
    (pixels per Jacobian chunk, divided among a group's images), ``fused``, ``batch`` (False: one image per group),
    ``progress`` (None, or ``progress(what, done, total)`` called after every pixel chunk of a pass over the images:
    ``what`` 'simulating' or 'Jacobians', ``done`` of ``total`` images, a group's images counted in proportion to
    its chunks done).
    """

    def __init__(self, pars, layout: Layout, observed, pixels, target: Target, chunk_pixels: int = 16384,
                 fused: Optional[bool] = None, batch: bool = True,
                 progress: Optional[Callable[[str, int, int], None]] = None):
        self.pars, self.layout, self.target, self.progress = list(pars), layout, target, progress
        self.n_pixels = sum(len(p) for p in pixels)
        keys: dict = {}
        for i, (par, idx) in enumerate(zip(pars, pixels)):
            key = _group_key(par, np.asarray(idx)) if batch else i
            keys.setdefault(key, []).append(i)
        self.groups = [ImageGroup(ids, [pars[i] for i in ids], [observed[i] for i in ids], np.asarray(pixels[ids[0]]),
                                  chunk_pixels, fused) for ids in keys.values()]
        self._before = np.cumsum([0] + [len(gr.ids) for gr in self.groups])[:-1].tolist()  # images in earlier groups

    def _tick(self, what: str, j: int) -> Optional[Callable[[float], None]]:
        """The chunk reporter of group ``j`` in a pass called ``what`` (None without ``progress``)."""
        if self.progress is None:
            return None
        start, size, total = self._before[j], len(self.groups[j].ids), len(self.pars)
        return lambda fraction: self.progress(what, start + int(size * fraction), total)

    def _xb(self, X: torch.Tensor, ids) -> torch.Tensor:
        return torch.stack([self.layout.image_x(X, i) for i in ids])

    def image_losses(self, X: torch.Tensor) -> torch.Tensor:
        """Loss of every image [N] at X (+inf where a model value is not finite)."""
        out = X.new_zeros(len(self.pars))
        for j, gr in enumerate(self.groups):
            m = gr.models(self._xb(X, gr.ids), self._tick("simulating", j))
            L = self.target.loss_terms(m, gr.o).sum(-1)
            out[gr.ids] = torch.where(torch.isfinite(m).all(-1) & torch.isfinite(L), L, torch.full_like(L, np.inf))
        return out

    def loss(self, X: torch.Tensor) -> float:
        """Total loss (sum over images, log-likelihood units for NLL targets) at X."""
        return float(self.image_losses(X).sum())

    def models(self, X: torch.Tensor) -> List[torch.Tensor]:
        """Model photons at each image's pixels (list of [P_i])."""
        out: List[Optional[torch.Tensor]] = [None] * len(self.pars)
        for j, gr in enumerate(self.groups):
            for b, m in zip(gr.ids, gr.models(self._xb(X, gr.ids), self._tick("simulating", j))):
                out[b] = m
        return out

    def normal(self, X: torch.Tensor, act_s: Sequence[int], act_own: Sequence[Sequence[int]]):
        """(loss, :class:`~refine.schur.BlockNormal`, per-image H [k_i, k_i]) at X over the active shared positions
        ``act_s`` (into the shared names) and each image's active own positions ``act_own[i]`` (into its own
        scalars); each image's H is in (shared, own) order."""
        lay, ks = self.layout, len(act_s)
        n_img = len(self.pars)
        A, gs = X.new_zeros(ks, ks), X.new_zeros(ks)
        B, C, gp, Hs = [None] * n_img, [None] * n_img, [None] * n_img, [None] * n_img
        total = 0.0
        for jg, gr in enumerate(self.groups):
            i0 = gr.ids[0]
            act = [lay.shared_pos[i0][j] for j in act_s] + [lay.own_pos[i0][j] for j in act_own[i0]]
            m, g, H = gr.normal(self._xb(X, gr.ids), act, self.target, self._tick("Jacobians", jg))
            L = self.target.loss_terms(m, gr.o).sum(-1)
            total += float(L.sum()) if bool(torch.isfinite(m).all()) else np.inf
            for b, i in enumerate(gr.ids):
                A += H[b, :ks, :ks]
                gs += g[b, :ks]
                B[i], C[i], gp[i], Hs[i] = H[b, :ks, ks:], H[b, ks:, ks:], g[b, ks:], H[b]
        return (total if np.isfinite(total) else np.inf), BlockNormal(A, gs, B, C, gp), Hs

    def likelihood_unit(self, loss: float, n_free: int) -> float:
        """One log-likelihood unit of the loss: 1 for NLL targets, σ̂² = 2L/(n − p) for least squares."""
        if self.target.likelihood:
            return 1.0
        return max(2.0 * loss / max(self.n_pixels - n_free, 1), 1e-300)
