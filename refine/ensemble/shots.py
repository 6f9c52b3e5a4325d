"""Shots of an ensemble refinement, where they live (this process or a Dask worker): per-shot fits with the current
|F|, and each shot's share of the F objective, its gradient and its Gauss–Newton curvature.

A :class:`Shard` is a list of :class:`Shot` that stays where it was loaded; every function here takes a shard and
returns a new one or small arrays (tables of |F|, gradients, curvatures, per-shot records), so a Dask worker can run
them on the shard it holds and the images never move.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.func import jacfwd

from nbtorch.simulate import simulate_pixels
from nbtorch.types import Params, Setup, Structure

from ..imagelist import ImageEntry, entry_image, entry_spots, entry_start, write_refined_expt
from ..model.predict import Predict
from ..pipeline.fit import fit, fit_options
from ..pipeline.problem import fit_target
from ..scaleout import _one_line  # the one copy of a failure's one-line text
from ..targets.pixels import usable_mask
from .design import Design, shot_design

#: Eigenvalues of a shot's M = KᵀWK scaled to a unit diagonal below this fraction of the largest are taken as 0
#: (:func:`inverse_root`): rounding, a direction of its free scalars that no pixel constrains.
PSEUDO_RCOND = 1e-12

#: Keys of a shot's record (a JSON line of the per-shot models): ``label`` (its image path or name), ``cycle``, and
#: refine's :meth:`~refine.pipeline.result.Result.to_dict` entries.
SHOT_KEYS = ("label", "cycle", "converged", "ok", "chi2_nu", "poor_fit", "parameters", "esd", "loss", "n_pixels",
             "seconds", "nanobragg_args")
# (a shot whose fit failed has ``error`` too, the others null; it sits out that cycle's F step)


@dataclasses.dataclass
class Shot:
    """One still: ``label``, ``observed`` image (photons), ``setup``, ``model`` (its current per-shot model; its
    table is replaced by the current |F| before each fit), ``pos`` (its place in the run), ``flags`` (its starting
    flags, for the refined ones), ``spots`` (a spot-ROI fit's, or None).  After :func:`fit_shot`: ``index`` (flat
    indices of every usable pixel: a selection by observed values would bias weak |F|), ``o`` (observed there),
    ``w`` (the target's per-pixel data or None), ``background`` (refine's plane there, photons), ``design``
    (:class:`~refine.ensemble.design.Design`), ``record`` (:data:`SHOT_KEYS`), ``target`` (the per-shot fit's
    :class:`~refine.targets.losses.Target`: the F step uses the same loss), ``jacobian`` (∂m/∂θ [n, k] of its
    free scalars θ at the fit, :func:`shot_jacobian`), ``entry`` (its LIST entry, or None), ``result`` (its last
    :class:`~refine.pipeline.result.Result`)."""

    label: str
    observed: torch.Tensor
    setup: Setup
    model: Params
    pos: int = 0
    flags: Optional[List[str]] = None
    spots: object = None
    index: Optional[np.ndarray] = None
    o: Optional[torch.Tensor] = None
    w: Optional[torch.Tensor] = None
    background: Optional[torch.Tensor] = None
    design: Optional[Design] = None
    record: Optional[dict] = None
    target: object = None
    jacobian: Optional[torch.Tensor] = None
    entry: Optional[ImageEntry] = None
    result: object = None


@dataclasses.dataclass
class Shard:
    """Shots held together (one Dask task each step) and what they share: ``ids`` long [N] (each table entry's
    class, −1 none), ``n`` classes, ``per_image`` groups refined per shot, ``options`` (keyword arguments of
    :func:`refine.fit`), ``fused`` (simulate's), ``threads`` (torch threads, None: as set)."""

    shots: List[Shot]
    ids: torch.Tensor
    n: int
    per_image: Sequence[str]
    options: Dict[str, object]
    fused: Optional[bool] = False
    threads: Optional[int] = None


def entry_shot(entry: ImageEntry, pos: int, load: dict) -> Shot:
    """A shot of a LIST entry (:mod:`refine.imagelist`), read where this runs; ``load``: ``dtype`` ('float64' or
    'float32'), ``overload``, ``adc``, ``gain``, ``gain_map`` as :func:`refine.imagelist.entry_image` takes them."""
    params, setup, geometry = entry_start(entry, getattr(torch, load.get("dtype", "float64")))
    obs = entry_image(entry, setup, load.get("overload"), adc=load.get("adc"), gain=load.get("gain"), params=params,
                      geometry=geometry, gain_map=load.get("gain_map"))
    return Shot(entry_label(entry), obs, setup, params, pos, list(entry.flags), entry_spots(entry), entry=entry)


def entry_label(entry: ImageEntry) -> str:
    """A LIST entry's shot label: its image path, or ``EXPT#K`` for a shot of an --expt-list."""
    return f"{entry.expt}#{entry.experiment}" if entry.expt else entry.path


def load_shard(entries: Sequence[ImageEntry], positions: Sequence[int], load: dict, ids, n: int, per_image,
               options, fused, threads=None) -> Shard:
    """A :class:`Shard` of LIST ``entries`` (at ``positions`` in the run), read where this runs (a Dask task: the
    images are read on the worker that keeps them); ``load`` as :func:`entry_shot`'s."""
    if threads:
        torch.set_num_threads(int(threads))
    return Shard([entry_shot(e, k, load) for e, k in zip(entries, positions)], ids, n, list(per_image),
                 dict(options), fused, threads)


def _with_table(params: Params, table: torch.Tensor, shape) -> Params:
    F = table.to(params.crystal.cell.dtype).reshape(shape)
    return params._replace(structure=Structure(F, params.structure.default_F))


def fit_shot(shot: Shot, table: torch.Tensor, shape, hkl_min, per_image, options, fused, cycle: int) -> Shot:
    """``shot`` refitted (:func:`refine.fit` of the ``per_image`` groups with ``options``) with the flat |F| table
    ``table`` [N] of ``shape`` starting at ``hkl_min``, its fitted pixels' design built at the refined model."""
    t0 = time.perf_counter()
    setup = shot.setup if tuple(shot.setup.hkl_min) == tuple(hkl_min) else shot.setup.replace(hkl_min=tuple(hkl_min))
    start = _with_table(shot.model, table, shape)
    res = fit(shot.observed, start, setup, free=list(per_image), spots=shot.spots, nanobragg_args=shot.flags,
              **options)
    if res.par.psf is not None:
        raise ValueError("refining |F| does not take a point-spread function (psf) in the per-shot model")
    opts = fit_options(None, **{k: v for k, v in options.items() if k != "callback"})
    image_shape = tuple(res.setup.image_shape)
    target = fit_target(opts, None, image_shape)
    obs = np.asarray(res.observed)
    # every usable pixel, not the per-shot fit's selection: pixels picked by their observed values bias weak |F|
    index = np.flatnonzero(usable_mask(obs, res.setup, opts.mask, opts.overload, target.lowest_observed(image_shape)))
    pred = Predict(res.par, res.setup, index)
    with torch.no_grad():
        background = pred.background(res.x.detach())
    design = shot_design(res.params, res.setup, index, fused=fused)
    K = shot_jacobian(res, index, fused)
    d = res.to_dict()
    record = {"label": shot.label, "cycle": cycle, **{k: d.get(k) for k in SHOT_KEYS[2:] if k in d},
              "n_pixels": int(len(index)), "seconds": time.perf_counter() - t0}
    o = torch.as_tensor(obs.reshape(-1)[index], dtype=background.dtype)
    return dataclasses.replace(shot, setup=setup, model=res.params, index=index, o=o,
                               w=target.pixel_weights(index, image_shape, background.dtype),
                               background=background, design=design, record=record, target=target, jacobian=K,
                               result=res)


def shot_jacobian(res, index: np.ndarray, fused, chunk: int = 16384) -> torch.Tensor:
    """∂m/∂θ [n, k] at the pixels ``index`` of a per-shot fit ``res`` (θ its k free scalars, at its refined
    increments; forward mode, ``chunk`` pixels at a time), detached."""
    x = res.x.detach()
    parts = [jacfwd(Predict(res.par, res.setup, index[a:a + chunk], fused))(x) for a in range(0, len(index), chunk)]
    return torch.cat(parts).detach() if parts else x.new_zeros(0, len(x))


def shot_model(shot: Shot, T: torch.Tensor, s: float = 0.0):
    """(model photons [n], Bragg part [n]) of the shot's fitted pixels at the flat intensity table ``T`` = F² [N] and
    the log-scale ``s`` of its Bragg part (the F step's per-shot scale; the plane is not scaled)."""
    bragg = math.exp(s) * shot.design.model(T)
    return bragg + shot.background, bragg


def shot_value_grad(shot: Shot, T: torch.Tensor, s: float = 0.0):
    """(loss, ∂loss/∂T [N], ∂loss/∂s) of the shot at the intensity table ``T`` [N] and log-scale ``s`` (its
    per-shot model otherwise held fixed)."""
    target = shot.target
    m, bragg = shot_model(shot, T, s)
    loss = float(target.loss(m, shot.o, shot.w))
    dm = target.dloss(m, shot.o, shot.w)
    d = shot.design
    gT = torch.zeros_like(T).index_add(0, d.col, math.exp(s) * d.coef * dm.index_select(0, d.row))
    return loss, gT, float((dm * bragg).sum())


def shot_loss_direct(shot: Shot, table: torch.Tensor, s=0.0) -> torch.Tensor:
    """The shot's loss at the flat |F| table ``table`` [N] (differentiable) and log-scale ``s``, by a full
    simulation of its pixels (:func:`nbtorch.simulate.simulate_pixels`, reverse mode through the kernel): what the
    design computes, for checks."""
    params = _with_table(shot.model, table, shot.model.structure.F.shape)
    bragg = simulate_pixels(params, shot.setup, shot.index, check=False, fused=False) * torch.exp(torch.as_tensor(s))
    return shot.target.loss(bragg + shot.background, shot.o, shot.w)


class ShotCurvature(NamedTuple):
    """A shot's Gauss–Newton terms w.r.t. the classes' log-scales x (:func:`shot_curvature`): ``diag`` [n],
    ``profile`` [n], ``shot`` (its log-scale's curvature), ``factor`` (cls long [n_s], G [n_s, k]) and ``pairs``
    (a long [e], b long [e], v [e]: the sparse JᵀWJ, both triangles, or None when not asked for)."""

    diag: torch.Tensor
    profile: torch.Tensor
    shot: float
    factor: tuple
    pairs: Optional[tuple]


def shot_curvature(shot: Shot, T: torch.Tensor, ids: torch.Tensor, n: int, s: float = 0.0,
                   pairs: bool = False) -> ShotCurvature:
    """Gauss–Newton terms of the shot w.r.t. the classes' log-scales x at the intensity table ``T`` [N] and its
    log-scale ``s``, with J_pa = Σ_{h in class a} e^s·A[p, h]·2T_h (members of one class seen by one pixel summed),
    W the target's expected curvature per pixel, K = e^s·∂m/∂θ of its own free scalars θ at its fit, C = JᵀWK [n, k]
    and M = KᵀWK [k, k]:

    * ``diag`` [n] = Σ_p W_p·J_pa² and ``pairs``, with ``pairs=True``, the whole sparse JᵀWJ: an entry (a, b) for
      every two classes that share a pixel;
    * ``factor`` = (cls, G): the classes the shot sees and G [n_s, k] with G·Gᵀ = C·M⁻¹·Cᵀ on them
      (:func:`inverse_root`; M⁻ a generalized inverse when M is singular), the part of JᵀWJ the shot's θ explain;
      ``profile`` [n] its diagonal;
    * ``shot`` = Σ_p W_p·B_p², the curvature of ``s`` (B the Bragg photons).

    Σ_shots (JᵀWJ − G·Gᵀ) is the curvature with every shot's θ profiled out (the Schur complement)."""
    target = shot.target
    m, bragg = shot_model(shot, T, s)
    W = target.fisher(m, shot.o, shot.w)
    d = shot.design
    cls = ids.index_select(0, d.col)
    keep = cls >= 0
    rows, cls = d.row[keep], cls[keep]
    vals = (math.exp(s) * d.coef * 2.0 * T.index_select(0, d.col))[keep]
    key = rows * n + cls
    uniq, inv = torch.unique(key, return_inverse=True)  # sorted: by pixel, then class
    J = torch.zeros(len(uniq), dtype=T.dtype).index_add(0, inv, vals)
    pix, a = uniq // n, uniq % n
    WJ = W.index_select(0, pix) * J
    diag = torch.zeros(n, dtype=T.dtype).index_add(0, a, WJ * J)
    factor = _factor(shot, W, WJ, pix, a, s)
    profile = torch.zeros(n, dtype=T.dtype).index_add(0, factor[0], (factor[1] ** 2).sum(1))
    return ShotCurvature(diag, profile, float((W * bragg * bragg).sum()), factor,
                         _pairs(pix, a, WJ, J, n) if pairs else None)


def inverse_root(M: torch.Tensor) -> torch.Tensor:
    """R [k, k] with R·Rᵀ a generalized inverse of the symmetric positive semi-definite ``M`` [k, k] (M⁻¹ when M is
    regular): M is scaled to a unit diagonal (D = diag(M)^(−1/2), 0 where that is 0), D·M·D = V·Λ·Vᵀ, and
    R = D·V·Λ^(−1/2) over the eigenvalues above :data:`PSEUDO_RCOND`·λ_max (the others' columns 0).  For c in the
    range of M, cᵀ·R·Rᵀ·c = cᵀ·M⁻·c is the same for every generalized inverse."""
    d = torch.diagonal(M)
    D = torch.where(d > 0, d.clamp_min(torch.finfo(M.dtype).tiny).rsqrt(), torch.zeros_like(d))
    lam, V = torch.linalg.eigh(D[:, None] * M * D[None, :])
    keep = lam > PSEUDO_RCOND * lam.max().clamp_min(0)
    root = torch.where(keep, lam.clamp_min(torch.finfo(M.dtype).tiny).rsqrt(), torch.zeros_like(lam))
    return D[:, None] * V * root[None, :]


def _factor(shot: Shot, W, WJ, pix, a, s: float):
    """(cls long [n_s], G [n_s, k]) of :func:`shot_curvature` (k = 0 without free scalars)."""
    K = shot.jacobian
    if K is None or K.shape[1] == 0:
        return a.new_zeros(0), W.new_zeros(0, 0)
    K = K * math.exp(s)
    cls, inv = torch.unique(a, return_inverse=True)
    C = torch.zeros(len(cls), K.shape[1], dtype=W.dtype).index_add(0, inv, WJ[:, None] * K.index_select(0, pix))
    return cls, C @ inverse_root(K.T @ (W[:, None] * K))


def _pairs(pix, a, WJ, J, n: int):
    """(a, b, v): Σ_p W_p·J_pa·J_pb of every two classes a, b that share a pixel (both orders, a = b included),
    from the entries (``pix``, ``a``) sorted by pixel, ``WJ`` = W·J and ``J`` [E]."""
    _, group, counts = torch.unique_consecutive(pix, return_inverse=True, return_counts=True)
    start = torch.cumsum(counts, 0) - counts
    reps = counts.index_select(0, group)  # each entry meets every entry of its pixel
    i = torch.repeat_interleave(torch.arange(len(pix)), reps)
    j = start.index_select(0, group.index_select(0, i)) + torch.arange(len(i)) - torch.repeat_interleave(
        torch.cumsum(reps, 0) - reps, reps)
    return sum_pairs(a.index_select(0, i), a.index_select(0, j), WJ.index_select(0, i) * J.index_select(0, j), n)


def sum_pairs(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor, n: int):
    """Sparse entries (``a``, ``b`` long [e], ``v`` [e]) of an n×n matrix with repeats summed → (a, b, v), sorted."""
    uk, inv = torch.unique(a * n + b, return_inverse=True)
    return uk // n, uk % n, torch.zeros(len(uk), dtype=v.dtype).index_add(0, inv, v)


# ----------------------------------------------------------------------------------------------------------------
# shard steps (what a Dask task runs)


def _threads(shard: Shard) -> None:
    if shard.threads:
        torch.set_num_threads(int(shard.threads))


def shard_fit(shard: Shard, table: np.ndarray, shape, hkl_min, cycle: int) -> Shard:
    """Every shot refitted with the |F| table ``table`` (flat numpy [N]) — a new shard.  From the second cycle on a
    shot starts in its basin: only the final stage runs (``coarse_to_fine=False``) unless the options say otherwise."""
    _threads(shard)
    t = torch.as_tensor(table)
    options = shard.options if cycle == 1 else {"coarse_to_fine": False, **shard.options}
    shots = [_fit_or_fail(s, t, shape, hkl_min, shard.per_image, options, shard.fused, cycle) for s in shard.shots]
    return dataclasses.replace(shard, shots=shots)


def _fit_or_fail(shot: Shot, *args) -> Shot:
    """:func:`fit_shot`, or, when its fit fails, the shot left out of this cycle's F step (no design) with its
    record's ``error`` (type and message, one line): one bad shot does not stop the others."""
    try:
        return fit_shot(shot, *args)
    except Exception as exc:  # noqa: BLE001 - one shot's failure must not stop the run
        record = {**dict.fromkeys(SHOT_KEYS), "label": shot.label, "cycle": args[-1], "converged": False,
                  "ok": False, "error": _one_line(exc)}
        return dataclasses.replace(shot, design=None, jacobian=None, result=None, record=record)


def shard_value_grad(shard: Shard, T: np.ndarray, scales: np.ndarray):
    """(loss, ∂loss/∂T numpy [N], ∂loss/∂s numpy [S]) summed over the shard's shots at the intensity table ``T``
    [N] and the run's per-shot log-scales ``scales`` [S] (each shot's at its ``pos``)."""
    _threads(shard)
    T = torch.as_tensor(T)
    loss, grad, gs = 0.0, torch.zeros_like(T), np.zeros(len(scales))
    for shot in (s for s in shard.shots if s.design is not None):
        v, g, gs[shot.pos] = shot_value_grad(shot, T, float(scales[shot.pos]))
        loss, grad = loss + v, grad + g
    return loss, grad.numpy(), gs


class ShardCurvature(NamedTuple):
    """:func:`shard_curvature`'s sums (numpy): ``diag`` [n], ``profile`` [n], ``shot`` [S]; with ``full``,
    ``pairs`` (a, b, v): the shard's JᵀWJ summed over its shots, and ``factors``: each shot's (cls, G); else None."""

    diag: np.ndarray
    profile: np.ndarray
    shot: np.ndarray
    pairs: Optional[tuple]
    factors: Optional[list]


def shard_curvature(shard: Shard, T: np.ndarray, scales: np.ndarray, full: bool = False) -> ShardCurvature:
    """The Gauss–Newton terms of the shard's shots (:func:`shot_curvature`) at the intensity table ``T`` and the
    per-shot log-scales ``scales`` [S] (each shot's at its ``pos``): the diagonals summed, each shot's scale
    curvature at its ``pos``, and with ``full`` the summed sparse JᵀWJ and every shot's low-rank factor."""
    _threads(shard)
    T = torch.as_tensor(T)
    diag, profile, cs = torch.zeros(shard.n, dtype=T.dtype), torch.zeros(shard.n, dtype=T.dtype), np.zeros(len(scales))
    pairs, factors = [], []
    for shot in (s for s in shard.shots if s.design is not None):
        c = shot_curvature(shot, T, shard.ids, shard.n, float(scales[shot.pos]), full)
        diag, profile, cs[shot.pos] = diag + c.diag, profile + c.profile, c.shot
        if full:
            pairs.append(c.pairs)
            factors.append(tuple(t.numpy() for t in c.factor))
    if not full:
        return ShardCurvature(diag.numpy(), profile.numpy(), cs, None, None)
    cat = [torch.cat([p[i] for p in pairs]) if pairs else torch.zeros(0, dtype=torch.long if i < 2 else T.dtype)
           for i in range(3)]
    return ShardCurvature(diag.numpy(), profile.numpy(), cs, tuple(t.numpy() for t in sum_pairs(*cat, shard.n)),
                          factors)


def shard_apply_scales(shard: Shard, scales: np.ndarray) -> Shard:
    """The shard with each shot's fluence multiplied by e^s of its F-step log-scale (its model then predicts what
    the F step fitted; the next per-shot fit starts there)."""
    shots = []
    for shot in shard.shots:
        beam = shot.model.beam
        shots.append(dataclasses.replace(shot, model=shot.model._replace(
            beam=beam._replace(fluence=beam.fluence * math.exp(float(scales[shot.pos]))))))
    return dataclasses.replace(shard, shots=shots)


def shard_records(shard: Shard) -> List[dict]:
    """Each shot's record of its last fit, with its refined model without the table (``model``: a
    :class:`~nbtorch.types.Params` whose ``structure.F`` is empty) — what a checkpoint keeps."""
    out = []
    for s in shard.shots:
        st = s.model.structure
        model = s.model._replace(structure=Structure(st.F.new_zeros((0, 0, 0)), st.default_F))
        out.append({"record": s.record, "model": model})
    return out


def shard_write_expt(shard: Shard, folder: str) -> Shard:
    """Write the refined experiment list of every --expt-list shot fitted in this run into ``folder``
    (:func:`refine.imagelist.write_refined_expt`), its record gaining ``expt`` (the entry's report) and
    ``out_expt`` (the file, or null with ``expt_error`` when it could not be written) — a new shard."""
    shots = []
    for shot in shard.shots:
        if shot.entry is not None and shot.entry.expt and shot.result is not None:
            try:
                out, error = write_refined_expt(shot.entry, shot.result, folder), None
            except (ValueError, OSError) as exc:
                out, error = None, f"{type(exc).__name__}: {exc}"
            extra = {"expt": shot.entry.expt_report(out), "out_expt": out}
            shot = dataclasses.replace(shot, record={**shot.record, **extra, **({"expt_error": error} if error
                                                                                else {})})
        shots.append(shot)
    return dataclasses.replace(shard, shots=shots)


def shard_set_models(shard: Shard, models: Sequence[Params], labels: Sequence[str]) -> Shard:
    """The shard with its shots' per-shot models replaced (a resumed run's, from its checkpoint): ``models`` in the
    order of the run's ``labels``, each shot's picked by its label."""
    where = {lab: k for k, lab in enumerate(labels)}
    shots = [dataclasses.replace(s, model=models[where[s.label]]._replace(structure=s.model.structure))
             for s in shard.shots]
    return dataclasses.replace(shard, shots=shots)
