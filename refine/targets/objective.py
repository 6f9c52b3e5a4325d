"""The objective of a fit of N ≥ 1 images: model, loss, gradient and normal equations on the chosen pixels.

The increments of all images form one flat vector X (:class:`~refine.model.layout.Layout`).  Images with the same
set-up, pixels, free scalars and structure factors form a group computed in one ``torch.func.vmap`` (a group of one
image is called directly, so it may use the compiled tiles), chunk by chunk of pixels (memory is set by the chunk):
J = ∂m/∂x by ``jacfwd``, H = JᵀWJ and g = Jᵀ·∂L/∂m accumulated in block form (:mod:`refine.targets.normal`) and J
discarded.  A model with a non-finite value gives an infinite loss: the step is rejected.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import numbers
import threading
import weakref
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.func import jacfwd, vmap

from nbtorch.simulate import choose_fused
from nbtorch.types import Params

from ..model.layout import Layout, make_layout
from ..model.parameters import Parameterisation
from ..model.predict import Predict, image_axes, pixel_index
from .losses import Target
from .normal import BlockNormal


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
    """Images evaluated in one batch: same set-up, pixels and free scalars (``ids`` into the objective's images).

    ``o`` [B, P] observed photons at the flat pixel ``index`` [P], ``w`` [P] the target's per-pixel data (weights,
    or a Gaussian's σ² per pixel: :meth:`~refine.targets.losses.Target.pixel_weights`; or None);
    ``chunks``: one :class:`~refine.model.predict.Predict` per slice ``slices[k]`` of the pixels."""

    def __init__(self, ids: Sequence[int], pars: Sequence[Parameterisation], observed: Sequence[torch.Tensor],
                 index: np.ndarray, target: Target, chunk_pixels: int, fused: Optional[bool]):
        t = pars[0]
        self.ids, self.template = list(ids), t
        # compiled tiles are not vmapped; one image chooses them by the work of all its chunks
        fused = choose_fused(fused, t.setup, len(index)) if len(ids) == 1 else False
        self.ref, self.R0 = _batched_ref(pars), torch.stack([p.R0 for p in pars])
        self.cell_base = torch.stack([p.cell_base for p in pars])
        self.plane_ref = torch.stack([p.background_ref for p in pars])
        self.index = torch.as_tensor(index, dtype=torch.long, device=t.device)
        self.o = torch.stack([o.reshape(-1)[self.index] for o in observed]).to(dtype=t.dtype, device=t.device)
        self.w = target.pixel_weights(index, tuple(t.setup.image_shape), t.dtype, t.device)
        step = max(1, int(chunk_pixels) // len(ids))
        self.slices = [slice(a, a + step) for a in range(0, len(index), step)]
        self.chunks = [Predict(t, t.setup, index[sl], fused) for sl in self.slices]
        # one image's model without gradients in one call (simulate tiles it itself): fewer calls per loss
        self.whole = Predict(t, t.setup, index, fused) if len(ids) == 1 else None

    def _fn(self, k: int):
        """model(x [n], ref, R0, cell_base, plane_ref) → photons [P_chunk] of chunk ``k`` for one image."""
        t, chunk = self.template, self.chunks[k]

        def model(x, ref, R0, cell_base, plane_ref):
            par = t if ref is t.ref else dataclasses.replace(t, ref=ref, R0=R0, cell_base=cell_base,
                                                             background_ref=plane_ref)
            return chunk(x, par=par)

        return model

    def _apply(self, f, *xs):
        """``f(*x, ref, R0, cell_base, plane_ref)`` for every image: vmapped over a group of several images, called
        directly for one, outputs with a leading image axis."""
        if len(self.ids) > 1:
            dims = (0,) * len(xs) + (REF_DIMS, 0, 0, 0)
            return vmap(f, in_dims=dims)(*xs, self.ref, self.R0, self.cell_base, self.plane_ref)
        t = self.template
        out = f(*(x[0] for x in xs), t.ref, t.R0, t.cell_base, t.background_ref)
        return tuple(o[None] for o in out) if isinstance(out, tuple) else out[None]

    def models(self, Xb: torch.Tensor, tick: Optional[Callable[[float], None]] = None) -> torch.Tensor:
        """Model photons [B, P] at increments Xb [B, n] (no gradient); ``tick(fraction done)`` after each chunk."""
        out = []
        with torch.no_grad():
            if self.whole is not None:
                m = self.whole(Xb[0])[None]
                if tick is not None:
                    tick(1.0)
                return m
            for k in range(len(self.chunks)):
                out.append(self._apply(self._fn(k), Xb))
                if tick is not None:
                    tick((k + 1) / len(self.chunks))
        return torch.cat(out, 1)

    def loss_and_grad(self, Xb: torch.Tensor, target: Target) -> Tuple[float, Optional[torch.Tensor]]:
        """(loss, ∂loss/∂Xb [B, n]) by reverse mode chunk by chunk; (inf, None) where the model is not finite."""
        g, total = torch.zeros_like(Xb), 0.0
        for k, sl in enumerate(self.slices):
            xr = Xb.detach().clone().requires_grad_(True)
            m = self._apply(self._fn(k), xr)
            Lc = target.loss(m, self.o[:, sl], None if self.w is None else self.w[sl])
            if not (bool(torch.isfinite(m.detach()).all()) and math.isfinite(float(Lc.detach()))):
                return math.inf, None
            (gc,) = torch.autograd.grad(Lc, xr)
            total += float(Lc.detach())
            g += gc
        return total, g

    def normal(self, Xb: torch.Tensor, act: Sequence[int], target: Target,
               tick: Optional[Callable[[float], None]] = None, keep: Optional[list] = None):
        """(models [B, P], g [B, k], H [B, k, k]) over the ``act`` positions of each image's x: J by forward mode
        per pixel chunk (vmapped over the images), H = JᵀWJ, g = Jᵀ·∂L/∂m; ``tick(fraction done)`` per chunk;
        ``keep``: a list that receives every chunk's J [B, P_chunk, k] (for :meth:`chord_gradient`)."""
        B, k = Xb.shape[0], len(act)
        H, g, ms = Xb.new_zeros(B, k, k), Xb.new_zeros(B, k), []
        if k == 0:
            return self.models(Xb, tick), g, H
        specs = [self.template.scalars[a].spec for a in act]
        lin = [j for j, sp in enumerate(specs) if sp.leaf == "plane"]  # linear: their columns in closed form
        scale = [j for j, sp in enumerate(specs) if self._closed_scale(sp)]  # Bragg photons ∝ fluence
        mod = [j for j, sp in enumerate(specs) if sp.leaf != "plane" and j not in scale]
        act_t = torch.as_tensor([act[j] for j in mod], dtype=torch.long, device=Xb.device)
        for j, sl in enumerate(self.slices):
            J, m = self._jacobian(j, Xb, act_t, (mod, lin, scale), specs)
            o, w = self.o[:, sl], (None if self.w is None else self.w[sl])
            H += torch.einsum("bpk,bp,bpl->bkl", J, target.fisher(m, o, w), J)
            g += torch.einsum("bpk,bp->bk", J, target.dloss(m, o, w))
            ms.append(m)
            if keep is not None:
                keep.append(J)
            if tick is not None:
                tick((j + 1) / len(self.slices))
        return torch.cat(ms, 1), g, H

    def chord_gradient(self, Js: Sequence[torch.Tensor], models: torch.Tensor, target: Target) -> torch.Tensor:
        """g [B, k] = J₀ᵀ·∂L/∂m at ``models`` [B, P] with the chunks' Jacobians ``Js`` kept by :meth:`normal` at
        another point (a chord step's gradient: no derivative pass)."""
        g = models.new_zeros(models.shape[0], Js[0].shape[2])
        for J, sl in zip(Js, self.slices):
            g += torch.einsum("bpk,bp->bk", J, target.dloss(models[:, sl], self.o[:, sl],
                                                             None if self.w is None else self.w[sl]))
        return g

    def _closed_scale(self, spec) -> bool:
        """True when ``spec`` is the log fluence and the model's photons are Bragg + plane only (no water, whose
        term goes as fluence²): its column is then scale·(model − plane)."""
        return (spec.leaf == "beam.fluence" and spec.transform == "log" and spec.index is None
                and not bool((self.ref.background.water_size != 0).any()))

    def _jacobian(self, j: int, Xb: torch.Tensor, act_t: torch.Tensor, cols, specs):
        """(J [B, P_chunk, k], models [B, P_chunk]) of chunk ``j``: the columns ``mod`` (positions ``act_t`` of x) by
        forward mode, the background plane's columns ``lin`` in closed form (the same for every image), the log
        fluence's ``scale`` as scale·(model − plane) (``cols`` = (mod, lin, scale))."""
        mod, lin, scale = cols
        fn, chunk = self._fn(j), self.chunks[j]

        def f(xa, x0, *rest):
            m = fn(x0.index_put((act_t,), xa), *rest)
            return m, m

        if mod:
            Jm, m = self._apply(jacfwd(f, has_aux=True), Xb[:, act_t], Xb)
            Jm = Jm.to(Xb.dtype)  # torch 2.13 gives a 0-dim tensor × Python float a float64 tangent (float32 fits)
        else:
            Jm, m = None, self._apply(fn, Xb)
        if not lin and not scale:
            return Jm, m
        J = Xb.new_zeros(Xb.shape[0], m.shape[1], len(specs))
        if mod:
            J[:, :, mod] = Jm
        if lin:
            J[:, :, lin] = chunk.plane_jacobian(range(len(lin)), [specs[i] for i in lin]).to(Xb.dtype)
        for i in scale:
            bragg = m if chunk.basis is None else m - self._apply(self._plane_fn(j), Xb)
            J[:, :, i] = specs[i].scale * bragg
        return J, m

    def _plane_fn(self, k: int):
        """plane(x [n], ref, R0, cell_base, plane_ref) → the background plane's photons [P_chunk] of chunk ``k``."""
        t, chunk = self.template, self.chunks[k]

        def plane(x, ref, R0, cell_base, plane_ref):
            return chunk.background(x, par=t if plane_ref is t.background_ref else
                                    dataclasses.replace(t, background_ref=plane_ref))

        return plane


def _group_key(par: Parameterisation, index: np.ndarray):
    """Images with equal keys are simulated in one vmapped batch: same set-up, pixels, free scalars, structure
    factors and point-spread function (which are not batched)."""
    st = par.ref.structure
    table = hashlib.blake2b(st.F.detach().cpu().numpy().tobytes(), digest_size=16).hexdigest()
    return (par.setup, tuple(par.names), hashlib.blake2b(index.tobytes(), digest_size=16).hexdigest(),
            par.crystal_system, par.ncells_iso, tuple(par.cell_rows), tuple(st.F.shape), table,
            float(st.default_F), par.psf, id(par.boxes) if par.boxes is not None else None)


#: Largest Jacobian (pixels × images × active scalars) an objective keeps for chord steps (64 MB in float64).
CHORD_ENTRIES = 8 * 2**20


class _ProblemKey:
    """A hashable identity of an objective's inputs: the objects (compared by identity, held weakly: the losses of a
    problem are forgotten when one of its objects is) and the pixel choice's digest and options."""

    def __init__(self, objects, rest):
        self.key = (tuple(id(o) for o in objects), rest)
        self.refs = [weakref.ref(o, self._forget) for o in objects]

    def _forget(self, _ref) -> None:
        _DEAD.append(self)  # purged before the memo's next use (a callback may run inside one)

    alive = property(lambda self: all(r() is not None for r in self.refs), doc="Every object still exists.")

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _ProblemKey) and self.key == other.key


#: Most model values the loss memo keeps (those of its newest entry only).
MEMO_PIXELS = 4 * 2**20
#: The last few losses computed, by (problem, X): see :meth:`Objective._remember`.
_LOSSES: "collections.OrderedDict" = collections.OrderedDict()
_DEAD: list = []  # problems one of whose objects is gone
_LOCK = threading.RLock()


def _memo_get(key):
    """The memo's (loss, models or None) at ``key``, or None (call under ``_LOCK``; forgotten problems purged)."""
    while _DEAD:
        gone = _DEAD.pop()
        for k in [k for k in _LOSSES if k[0] == gone]:
            _LOSSES.pop(k, None)
    return _LOSSES.get(key)


class Objective:
    """Model, loss, gradient and normal equations of N ≥ 1 images on chosen pixels.

    Args:
        pars: one :class:`~refine.model.parameters.Parameterisation` (one image) or a sequence (one per image, shared
            scalars about identical references).
        observed: the observed image(s) [slow, fast] (tensors or arrays, photons), like ``pars``.
        pixels: the pixels that take part, like ``pars``: bool images (``setup.image_shape``) or flat slow-major
            indices.
        target: a :class:`~refine.targets.losses.Target`.
        chunk_pixels: pixels per Jacobian chunk, shared among a group's images (about chunk_pixels × n_params
            tangents in memory).
        fused: see :func:`nbtorch.simulate.simulate`.
        layout: where each image's scalars sit in X (default: one image's x, nothing shared).
        batch: simulate images of equal set-up together under vmap (False: one image per group).
        progress: None, or ``progress(what, done, total)`` after every pixel chunk of a pass over the images
            ('simulating' or 'Jacobians', ``done`` of ``total`` images).

    X vectors have the parameterisations' dtype and length ``n``; ``active`` (sorted positions in X) restricts
    derivatives to a subset.  Nothing is changed after construction but the Jacobians kept for chord steps.
    """

    def __init__(self, pars, observed, pixels, target: Target, chunk_pixels: int = 16384,
                 fused: Optional[bool] = None, *, layout: Optional[Layout] = None, batch: bool = True,
                 progress: Optional[Callable[[str, int, int], None]] = None):
        if isinstance(pars, Parameterisation):
            pars, observed, pixels = [pars], [observed], [pixels]
        if isinstance(chunk_pixels, bool) or not isinstance(chunk_pixels, numbers.Integral) or chunk_pixels < 1:
            raise ValueError(f"chunk_pixels must be an integer >= 1, got {chunk_pixels!r}")
        self.pars, self.target, self.progress = list(pars), target, progress
        self.layout = make_layout(self.pars, ()) if layout is None else layout
        self.index = [pixel_index(p, par.setup) for p, par in zip(pixels, self.pars)]
        if any(len(idx) == 0 for idx in self.index):
            raise ValueError("no usable pixels: check the mask, the overload level and the ROI")
        self.n_pixels = sum(len(idx) for idx in self.index)
        obs = [o if torch.is_tensor(o) else torch.as_tensor(np.asarray(o, dtype=np.float64)) for o in observed]
        for o, st in zip(obs, (par.setup for par in self.pars)):
            if tuple(o.shape) != tuple(st.image_shape):
                raise ValueError(f"observed image has shape {tuple(o.shape)}, expected {image_axes(st)} = "
                                 f"{tuple(st.image_shape)}")
        keys: dict = {}
        for i, (par, idx) in enumerate(zip(self.pars, self.index)):
            keys.setdefault(_group_key(par, idx) if batch else i, []).append(i)
        self.groups = [ImageGroup(ids, [self.pars[i] for i in ids], [obs[i] for i in ids], self.index[ids[0]],
                                  target, chunk_pixels, fused) for ids in keys.values()]
        self._before = np.cumsum([0] + [len(gr.ids) for gr in self.groups])[:-1].tolist()
        slots: dict = {}  # X position → (image, position in its x) of every scalar with a prior, each X position once
        for i, par in enumerate(self.pars):
            for j, s in enumerate(par.scalars):
                if s.prior is not None:
                    slots.setdefault(self.layout.position(i, j), (i, j))
        self._priors = [(i, j, pos) for pos, (i, j) in slots.items()]
        self._kept = None  # (active, per group (Jacobian chunks, H)) of the last normal(..., keep=True)
        # identifies the problem for the loss memo (weakly: see _ProblemKey)
        lay = self.layout
        self._problem = _ProblemKey(list(self.pars) + list(obs) + [target],
                                    (tuple(hashlib.blake2b(i.tobytes(), digest_size=16).hexdigest()
                                           for i in self.index), bool(batch), fused,
                                     (lay.shared, lay.names, lay.shared_pos, lay.own_pos)))

    # ------------------------------------------------------------------ the flat vector
    @property
    def n(self) -> int:
        """Length of X."""
        return self.layout.n

    @property
    def names(self) -> List[str]:
        """The name of every entry of X (:meth:`~refine.model.layout.Layout.x_names`)."""
        return self.layout.x_names()

    def bounds(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds on X ([n] each; ±inf where none)."""
        b = [p.bounds() for p in self.pars]
        return self.layout.pack([lo for lo, _ in b]), self.layout.pack([hi for _, hi in b])

    def typical(self) -> torch.Tensor:
        """Typical error of each entry of X ([n], x units)."""
        return self.layout.pack([p.typical() for p in self.pars])

    def pixels(self, i: int = 0) -> np.ndarray:
        """bool of the image's shape (``setup.image_shape``): the pixels of image ``i`` that take part."""
        st = self.pars[i].setup
        out = np.zeros(st.n_pixels, dtype=bool)
        out[self.index[i]] = True
        return out.reshape(st.image_shape)

    def _xb(self, X: torch.Tensor, ids) -> torch.Tensor:
        return torch.stack([self.layout.image_x(X, i) for i in ids])

    def _tick(self, what: str, j: int) -> Optional[Callable[[float], None]]:
        """The chunk reporter of group ``j`` in a pass called ``what`` (None without ``progress``)."""
        if self.progress is None:
            return None
        start, size, total = self._before[j], len(self.groups[j].ids), len(self.pars)
        return lambda fraction: self.progress(what, start + int(size * fraction), total)

    # ------------------------------------------------------------------ priors
    def prior_loss(self, X: torch.Tensor) -> torch.Tensor:
        """½ Σ prior residuals² (differentiable in X)."""
        tot = X.new_zeros(())
        for i, j, pos in self._priors:
            mean, sigma = self.pars[i].scalars[j].prior
            tot = tot + 0.5 * ((self.pars[i].values(self.layout.image_x(X, i))[j] - mean) / sigma) ** 2
        return tot

    # ------------------------------------------------------------------ model and loss
    def models(self, X: torch.Tensor) -> List[torch.Tensor]:
        """Model photons at each image's pixels (list of [P_i], image order; no gradient)."""
        out: List[Optional[torch.Tensor]] = [None] * len(self.pars)
        for j, gr in enumerate(self.groups):
            for b, m in zip(gr.ids, gr.models(self._xb(X, gr.ids), self._tick("simulating", j))):
                out[b] = m
        return out

    def image_terms(self, models: Sequence[torch.Tensor], what: str = "loss") -> List[torch.Tensor]:
        """Per image, the per-pixel ``what`` ('loss' or 'chi2') terms [P_i] of its ``models``."""
        out: List[Optional[torch.Tensor]] = [None] * len(self.pars)
        f = self.target.loss_terms if what == "loss" else self.target.chi2_terms
        for gr in self.groups:
            for b, i in enumerate(gr.ids):
                out[i] = f(models[i], gr.o[b], gr.w)
        return out

    def image_losses(self, X: torch.Tensor, models: Optional[Sequence[torch.Tensor]] = None) -> List[float]:
        """Data loss of every image at X (+inf where a model value is not finite); priors not included."""
        models = self.models(X) if models is None else models
        out = []
        for m, t in zip(models, self.image_terms(models)):
            L = float(t.sum())
            out.append(L if bool(torch.isfinite(m).all()) and math.isfinite(L) else math.inf)
        return out

    def loss(self, X: torch.Tensor) -> float:
        """Total loss (data + priors) at X as a float; +inf where the model is not finite (a rejected step)."""
        with _LOCK:
            hit = _memo_get(self._signature(X))
        return self.loss_models(X)[0] if hit is None else hit[0]

    def loss_models(self, X: torch.Tensor) -> Tuple[float, List[torch.Tensor]]:
        """(:meth:`loss`, :meth:`models`) at X."""
        with _LOCK:
            hit = _memo_get(self._signature(X))
        if hit is not None and hit[1] is not None:
            return hit
        with torch.no_grad():
            ms = self.models(X)
            v = sum(self.image_losses(X, ms)) + float(self.prior_loss(X))
        v = v if math.isfinite(v) else math.inf
        self._remember(X, v, ms)
        return v, ms

    def _signature(self, X: torch.Tensor):
        """What a loss at X depends on: this problem (images, pixels, target, models) and X's values."""
        x = X.detach().to("cpu", torch.float64).numpy()
        return (self._problem, x.tobytes())

    def _remember(self, X: torch.Tensor, value: float, models: Optional[List[torch.Tensor]] = None) -> None:
        """Keep the loss at X for any objective of the same problem (a stage's loss on every pixel repeats its
        minimiser's last one, the result's the final stage's); the most recent few are kept, and the models of the
        newest (up to :data:`MEMO_PIXELS`)."""
        if not self._problem.alive:
            return
        key = self._signature(X)
        kept = list(models) if models is not None and self.n_pixels <= MEMO_PIXELS else None
        with _LOCK:
            _memo_get(key)
            _LOSSES.pop(key, None)
            if _LOSSES:
                last = next(reversed(_LOSSES))
                _LOSSES[last] = (_LOSSES[last][0], None)
            _LOSSES[key] = (value, kept)
            while len(_LOSSES) > 8:
                _LOSSES.popitem(last=False)

    def loss_and_grad(self, X: torch.Tensor) -> Tuple[float, torch.Tensor]:
        """Loss and its gradient [n] by reverse mode, chunk by chunk (bounded memory); (inf, partial) where the
        model is not finite."""
        g, total = torch.zeros_like(X), 0.0
        for gr in self.groups:
            Xr = X.detach().clone().requires_grad_(True)
            Xb = self._xb(Xr, gr.ids)
            L, gb = gr.loss_and_grad(Xb.detach(), self.target)
            if gb is None:
                return math.inf, g
            (gx,) = torch.autograd.grad(Xb, Xr, gb)
            g += gx
            total += L
        Xr = X.detach().clone().requires_grad_(True)
        Lp = self.prior_loss(Xr)
        if Lp.requires_grad:
            (gp,) = torch.autograd.grad(Lp, Xr)
            g += gp
        total += float(Lp.detach())
        return (total if math.isfinite(total) else math.inf), g

    # ------------------------------------------------------------------ normal equations
    def normal(self, X: torch.Tensor, active: Optional[Sequence[int]] = None, keep: bool = False):
        """(loss, :class:`~refine.targets.normal.BlockNormal`, models [P_i] per image) at X over the ``active``
        positions of X (default all): the blocks of the active shared scalars and of each image's active own ones,
        prior terms included.  The loss is +inf where the model is not finite.  ``keep``: hold the Jacobians (when
        they fit in :data:`CHORD_ENTRIES`) for :meth:`chord` steps about X."""
        active = list(range(self.layout.n)) if active is None else sorted(active)
        acts = self._group_active(active)
        big = sum(len(gr.ids) * len(gr.index) for gr in self.groups) * len(active) > CHORD_ENTRIES
        kept = None if (not keep or big) else []
        parts = []
        for jg, (gr, act) in enumerate(zip(self.groups, acts)):
            Js = None if kept is None else []
            m, g, H = gr.normal(self._xb(X, gr.ids), act, self.target, self._tick("Jacobians", jg), Js)
            parts.append((g, H, m))
            if kept is not None:
                kept.append((Js, H))
        self._kept = None if kept is None else (list(active), kept)
        return self._assemble(X, active, parts)

    def chord(self, X: torch.Tensor, models: Sequence[torch.Tensor]):
        """(loss, BlockNormal, models) at X as :meth:`normal` gives them, but for H and J, which are those kept by
        the last ``normal(..., keep=True)`` (a chord step: g = J₀ᵀ·∂L/∂m at X's ``models`` [P_i] per image, no
        derivative pass); None when nothing is kept."""
        if self._kept is None:
            return None
        active, kept = self._kept
        parts = []
        for gr, (Js, H) in zip(self.groups, kept):
            mb = torch.stack([models[i] for i in gr.ids])
            parts.append((gr.chord_gradient(Js, mb, self.target), H, mb))
        return self._assemble(X, active, parts)

    def _group_active(self, active: Sequence[int]) -> List[List[int]]:
        """Per group, the positions in its images' x of the ``active`` positions of X (shared ones first)."""
        lay, ns = self.layout, len(self.layout.shared)
        act_s = [p for p in active if p < ns]
        out = []
        for gr in self.groups:
            i0 = gr.ids[0]
            own = [p - lay.offset[i0] for p in active if lay.offset[i0] <= p < lay.offset[i0] + len(lay.own_pos[i0])]
            out.append([lay.shared_pos[i0][j] for j in act_s] + [lay.own_pos[i0][j] for j in own])
        return out

    def _assemble(self, X: torch.Tensor, active: Sequence[int], parts):
        """(loss, BlockNormal, models per image) from each group's (g [B, k], H [B, k, k], models [B, P])."""
        lay, n_img = self.layout, len(self.pars)
        ks = len([p for p in active if p < len(lay.shared)])
        A, gs = X.new_zeros(ks, ks), X.new_zeros(ks)
        B, C, gp, Hs, ms = ([None] * n_img for _ in range(5))
        for gr, (g, H, m) in zip(self.groups, parts):
            for b, i in enumerate(gr.ids):
                A += H[b, :ks, :ks]
                gs += g[b, :ks]
                B[i], C[i], gp[i], Hs[i], ms[i] = H[b, :ks, ks:], H[b, ks:, ks:], g[b, ks:], H[b], m[b]
        priors = []  # (position in X, residual r = (u − mean)/sigma, dr/dx) of every prior at X
        for i, j, pos in self._priors:
            s, xi = self.pars[i].scalars[j], float(X[pos])
            mean, sigma = s.prior
            priors.append((pos, (float(s.value(torch.tensor(xi, dtype=torch.float64))) - mean) / sigma,
                           s.dvalue_dx(xi) / sigma))
        L = sum(self.image_losses(X, ms)) + float(self.prior_loss(X.detach()))
        blk = BlockNormal(A, gs, B, C, gp, Hs).with_priors(priors, active, lay)
        L = L if math.isfinite(L) else math.inf
        self._remember(X, L, ms)
        return L, blk, ms

    def normal_equations(self, X: torch.Tensor, active: Optional[Sequence[int]] = None):
        """Loss, gradient g [k], normal matrix H = JᵀWJ [k, k] (+ prior terms) over the ``active`` positions
        (default all) and the model [n_pixels], all at X: :meth:`normal` in dense form."""
        L, blk, ms = self.normal(X, active)
        H, g = blk.dense()
        return L, g, H, (ms[0] if len(ms) == 1 else torch.cat(ms))

    # ------------------------------------------------------------------ statistics
    def likelihood_unit(self, loss: float, n_free: int) -> float:
        """Size of one log-likelihood unit of the loss: 1 for NLL targets, σ̂² = 2L/(n − p) for least squares."""
        if self.target.likelihood:
            return 1.0
        return max(2.0 * loss / max(self.n_pixels - n_free, 1), 1e-300)

    def chi2_reduced(self, models, n_free: int) -> float:
        """Pearson χ²/(n − p) of the ``models`` (per image, or one image's [n_pixels])."""
        models = [models] if torch.is_tensor(models) else list(models)
        return float(sum(t.sum() for t in self.image_terms(models, "chi2"))) / max(self.n_pixels - n_free, 1)
