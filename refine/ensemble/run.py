"""``refine.fit_structure_factors``: |F| of the asymmetric unit refined jointly with every still's own model.

    result = refine.fit_structure_factors(observed_list, params_list, setups, space_group="P 43 21 2",
                                          per_image=["orientation", "scale"], cycles=3)
    result.write_mtz("F.mtz"); print(result.summary())

Each outer cycle (docs/refine.md, "Structure factors from many stills"):

1. every shot is refitted with the current |F| (:func:`refine.fit` of its ``per_image`` groups) and its fitted
   pixels' design against the intensity table is built (:mod:`.design`);
2. the classes some pixel sees are refined (:class:`~.fmodel.FModel`); the others keep their value;
3. an F step: L-BFGS (strong-Wolfe) on the summed loss of all shots plus the restraints, over the refined log-scales
   x preconditioned by the Gauss–Newton diagonal; every evaluation sends the table to the shards and sums their
   (loss, ∂loss/∂T) in shard order;
4. SIGF_a = |F_a|·((H⁻¹)_aa)^(1/2), H the Gauss–Newton matrix over the refined classes at the new |F| with every
   shot's own free scalars profiled out, plus the restraints' Hessian: H = Σ_shots (JᵀWJ − C·M⁻¹·Cᵀ) + R
   (C = JᵀWK, M = KᵀWK, K = ∂m/∂θ of the shot's free scalars at its fit) — the diagonal of the inverse, so the
   coupling of reflections through shared pixels and through the shots' parameters is in σ.  With the shots' scales
   refined the data leave the common scale of all |F| to the restraints; SIGF then holds it (the variance given the
   mean of the refined x, as merging programs give σ on their data's own scale) and the cycle's ``scale_esd`` is the
   σ of that mean.  Each shard returns its summed sparse JᵀWJ and each shot's low-rank G with G·Gᵀ = C·M⁻¹·Cᵀ; the client
   assembles H densely and inverts it by Cholesky while there are at most :data:`DENSE_SIGF_MAX` refined classes.
   Above that, or when H is not positive definite, SIGF = |F|·(H_aa)^(−1/2) from H's diagonal alone (slightly
   small where the couplings matter); the cycle's row says which (``sigf_method``, ``sigf_note``);
5. the cycle's row (objective, R of the |F| change, CC to the previous cycle) and, with ``checkpoint``, a checkpoint
   a later run resumes from.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from nbtorch.io.structure_files import detector_corner_resolution

from ..model.parameters import expand_free
from .asu import asu_map
from .backend import LocalShards, dask_shards
from .checkpoint import load_checkpoint, save_checkpoint
from .fmodel import FModel, Restraints
from .result import EnsembleResult, cycle_row
from .shots import (Shard, Shot, shard_apply_scales, shard_curvature, shard_fit, shard_records, shard_set_models,
                    shard_value_grad, shard_write_expt)


def start_table(params_list: Sequence, setups: Sequence):
    """(table numpy [nh, nk, nl], hkl_min) of the run: the first model's (every shot's must have its shape and
    origin), or, without one, a table of ``default_F`` over |h| ≤ a/d_min (likewise k, l; d_min the best corner
    resolution of any shot)."""
    F0 = params_list[0].structure.F
    if F0.numel():
        for k, (p, s) in enumerate(zip(params_list, setups)):
            if tuple(p.structure.F.shape) != tuple(F0.shape) or tuple(s.hkl_min) != tuple(setups[0].hkl_min):
                raise ValueError(f"shot {k + 1}: its structure-factor table is not the first shot's (every shot "
                                 "must start from the same -hkl/-pdb table)")
        return F0.detach().cpu().numpy().astype(np.float64), tuple(int(v) for v in setups[0].hkl_min)
    dmin = min(detector_corner_resolution(p, s) for p, s in zip(params_list, setups))
    hmax = [int(math.floor(float(v) / dmin)) + 1 for v in params_list[0].crystal.cell[:3]]
    shape = tuple(2 * h + 1 for h in hmax)
    return np.full(shape, float(params_list[0].structure.default_F)), tuple(-h for h in hmax)


def _shards(shots, n_shards, ids, n, per_image, options, fused, threads=None):
    """The shots dealt into ``n_shards`` :class:`~.shots.Shard` (shot k into shard k mod n_shards)."""
    return [Shard(shots[k::n_shards], ids, n, list(per_image), dict(options), fused, threads)
            for k in range(n_shards) if shots[k::n_shards]]


#: Most refined classes for which SIGF comes from the inverse of the dense profiled Gauss–Newton matrix: n² float64
#: (6000 classes: 288 MB, about three such arrays at once) and a Cholesky factorisation and inverse of ~n³ flops
#: (seconds); above it the diagonal formula (module docstring, item 4).
DENSE_SIGF_MAX = 6000


class Curvature(NamedTuple):
    """The Gauss–Newton terms at a point, summed over the shards (:class:`~.shots.ShardCurvature`): ``diag`` [n]
    (data, w.r.t. x), ``profile`` [n] (the part the shots' own free scalars explain), ``shot`` [S] (each shot's
    log-scale curvature); with ``full``: ``pairs`` (a, b, v) the sparse JᵀWJ (repeats add) and ``factors`` every
    shot's (cls, G), else None."""

    diag: np.ndarray
    profile: np.ndarray
    shot: np.ndarray
    pairs: Optional[tuple] = None
    factors: Optional[list] = None


def _curvature(backend, fm: FModel, x: torch.Tensor, scales: np.ndarray, full: bool = False) -> Curvature:
    T = (fm.table(x) ** 2).detach().numpy()
    parts = backend.map(shard_curvature, T, scales, full)
    diag, profile, shot = (np.sum([p[i] for p in parts], axis=0) for i in range(3))
    if not full:
        return Curvature(diag, profile, shot)
    pairs = tuple(np.concatenate([p.pairs[i] for p in parts]) for i in range(3))
    return Curvature(diag, profile, shot, pairs, [f for p in parts for f in p.factors])


def _f_step(backend, fm: FModel, x: torch.Tensor, cfg: "RunConfig", H: np.ndarray, Hs: np.ndarray):
    """(new x, per-shot log-scales s [S], objective) after L-BFGS over the refined classes' log-scales and, when
    ``cfg.scales``, the shots' log-scales (mean 0: the overall level of |F| stays the data's), preconditioned by the
    curvature diagonals ``H`` [n] and ``Hs`` [S]."""
    act = torch.as_tensor(np.flatnonzero(fm.refined & fm.movable()))
    live = torch.as_tensor(np.flatnonzero(Hs > 0))  # shots in this F step (a failed fit has no pixels)
    n_act, n_s = len(act), (len(live) if cfg.scales else 0)
    sx = torch.as_tensor(np.sqrt(H[act.numpy()]), dtype=x.dtype)
    ss = torch.as_tensor(np.sqrt(Hs[live.numpy()]), dtype=x.dtype)
    z = torch.zeros(n_act + n_s, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([z], lr=1.0, max_iter=cfg.f_iter, max_eval=2 * cfg.f_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def unpack(zz):
        s = zz.new_zeros(len(Hs))
        if n_s:
            u = zz[n_act:] / ss
            s = s.index_add(0, live, u - u.mean())
        return x.index_add(0, act, zz[:n_act] / sx), s

    def objective(zz):
        xx, s = unpack(zz)
        T = fm.table(xx) ** 2
        loss, gT, gs = 0.0, np.zeros(T.shape[0]), np.zeros(len(Hs))
        for v, g, g_s in backend.map(shard_value_grad, T.detach().numpy(), s.detach().numpy()):
            loss, gT, gs = loss + v, gT + g, gs + g_s
        prior = fm.restraint(xx, cfg.restraints)
        surrogate = (T * torch.as_tensor(gT)).sum() + (s * torch.as_tensor(gs)).sum() + prior
        return loss + float(prior.detach()), surrogate

    def closure():
        opt.zero_grad()
        value, surrogate = objective(z)
        surrogate.backward()
        return torch.tensor(value, dtype=x.dtype)

    if n_act + n_s:
        opt.step(closure)
    with torch.no_grad():
        new, s = unpack(z.detach())
        value, _ = objective(z.detach())
    return new, s.numpy(), value


class Sigma(NamedTuple):
    """SIGF [n] (NaN where not refined) and how it was found: ``method`` 'inverse' (the diagonal of H⁻¹) or
    'diagonal' (1/H_aa), ``note`` why the diagonal ('' for the inverse); ``scale_sigma`` the σ of the mean
    log-scale of the refined |F| (≈ the relative σ of their common scale) when SIGF holds it fixed, else NaN."""

    sigF: np.ndarray
    method: str
    note: str
    scale_sigma: float = math.nan


def diagonal_sigma(fm: FModel, x: torch.Tensor, curv: Curvature, r: Restraints) -> np.ndarray:
    """SIGF [n] = |F|·(H_aa)^(−1/2) of the refined classes (NaN for the others and where H_aa ≤ 0); H_aa the data's
    diagonal less the part the shots' own parameters explain (profiled out) plus the restraints'."""
    H = curv.diag - curv.profile + fm.restraint_curvature(r)
    F = fm.amplitudes(x).detach().numpy()
    ok = fm.refined & fm.movable() & (H > 0)
    return np.where(ok, F / np.sqrt(np.where(ok, H, 1.0)), np.nan)


def profiled_matrix(fm: FModel, curv: Curvature, r: Restraints) -> np.ndarray:
    """H [m, m] over the m refined classes (ascending class order): the summed JᵀWJ (``curv.pairs``) less every
    shot's G·Gᵀ (``curv.factors``) plus the restraints' Hessian (:meth:`~.fmodel.FModel.restraint_hessian`)."""
    act = np.flatnonzero(fm.refined & fm.movable())
    m = len(act)
    pos = np.full(fm.n, -1, dtype=np.int64)
    pos[act] = np.arange(m)
    a, b, v = (np.concatenate(t) for t in zip(curv.pairs, fm.restraint_hessian(r)))
    pa, pb = pos[a], pos[b]
    ok = (pa >= 0) & (pb >= 0)
    H = np.bincount(pa[ok] * m + pb[ok], weights=v[ok], minlength=m * m).astype(np.float64).reshape(m, m)
    for cls, G in curv.factors:
        p = pos[cls]
        keep = p >= 0
        H[np.ix_(p[keep], p[keep])] -= G[keep] @ G[keep].T
    return H


def inverse_diagonal(H: np.ndarray, block: int = 512, fixed: Optional[np.ndarray] = None):
    """((H⁻¹)_aa [m], '', uᵀH⁻¹u or None) of a symmetric positive definite ``H`` [m, m], or (None, why not, None)
    when it is not.  With ``fixed`` = u [m] the variances are those with uᵀx held (the conditional Gaussian:
    (H⁻¹)_aa − (H⁻¹u)_a²/(uᵀH⁻¹u)) and the third item is uᵀH⁻¹u, the variance of uᵀx itself.  H is overwritten:
    scaled to a unit diagonal, then factorised, H = L·Lᵀ (:func:`torch.linalg.cholesky_ex`), and (H⁻¹)_aa =
    Σ_i (L⁻¹)_ia² with L⁻¹ found ``block`` columns at a time (a column of L⁻¹ is 0 above its diagonal, so each
    block solves only the trailing triangle: ~m³/3 flops in all, m·block more memory)."""
    Ht = torch.as_tensor(H)
    d = torch.diagonal(Ht).clone()
    if not bool((d > 0).all()):
        return None, "the profiled Gauss–Newton matrix is not positive definite (a diagonal entry <= 0)", None
    s = d.rsqrt()
    Ht.mul_(s[:, None]).mul_(s[None, :])
    L, info = torch.linalg.cholesky_ex(Ht)
    if int(info):
        return (None, f"the profiled Gauss–Newton matrix is not positive definite (Cholesky fails at column "
                      f"{int(info)})", None)
    m = len(d)
    var = torch.empty(m, dtype=L.dtype)
    for j0 in range(0, m, block):
        j1 = min(m, j0 + block)
        E = torch.zeros(m - j0, j1 - j0, dtype=L.dtype)
        E.diagonal().fill_(1.0)
        var[j0:j1] = (torch.linalg.solve_triangular(L[j0:, j0:], E, upper=False) ** 2).sum(0)
    var = var * s * s
    if fixed is None:
        return var.numpy(), "", None
    u = torch.as_tensor(fixed, dtype=L.dtype)
    z = torch.cholesky_solve((u * s)[:, None], L)[:, 0] * s  # H⁻¹u
    uz = float(u @ z)
    return (var - z * z / uz).numpy(), "", uz


def structure_factor_sigmas(backend, fm: FModel, x: torch.Tensor, scales: np.ndarray, r: Restraints,
                            fixed_scale: bool = False) -> Sigma:
    """SIGF of the refined classes at log-scales ``x`` and the shots' log-scales ``scales`` [S] with restraints
    ``r``: |F|·((H⁻¹)_aa)^(1/2) of :func:`profiled_matrix` while at most :data:`DENSE_SIGF_MAX` classes are refined
    and H is positive definite, else :func:`diagonal_sigma` (module docstring, item 4).  With ``fixed_scale`` (the
    shots' scales are refined, so the data leave the common scale of all |F| to the restraints) the variances are
    those with the mean log-scale of the refined classes held, and :attr:`Sigma.scale_sigma` is that mean's own σ."""
    act = fm.refined & fm.movable()
    m = int(act.sum())
    full = 0 < m <= DENSE_SIGF_MAX
    curv = _curvature(backend, fm, x, scales, full)
    note = f"{m} refined classes > DENSE_SIGF_MAX = {DENSE_SIGF_MAX}" if m else "no refined classes"
    if full:
        u = np.ones(m) if fixed_scale else None
        var, note, uHu = inverse_diagonal(profiled_matrix(fm, curv, r), fixed=u)
        if var is not None:
            sig = np.full(fm.n, np.nan)
            sig[act] = fm.amplitudes(x).detach().numpy()[act] * np.sqrt(var)
            return Sigma(sig, "inverse", "", math.nan if uHu is None else math.sqrt(uHu) / m)
    return Sigma(diagonal_sigma(fm, x, curv, r), "diagonal", note)


@dataclasses.dataclass
class RunConfig:
    """What an ensemble run needs besides its shots: see :func:`fit_structure_factors`."""

    space_group: str = "P 1"
    anomalous: bool = False
    per_image: Sequence[str] = ("orientation", "scale")
    cycles: int = 3
    restraints: Restraints = dataclasses.field(default_factory=Restraints)
    f_iter: int = 50
    checkpoint: Optional[str] = None
    callback: Optional[Callable[[dict], None]] = None
    expt_dir: Optional[str] = None

    @property
    def scales(self) -> bool:
        """Whether the per-shot scale is refined (then the F step refines each shot's scale too)."""
        return "scale" in expand_free(self.per_image)


def run_cycles(backend, fm: FModel, table_shape, hkl_min, labels, cfg: RunConfig, seconds0: float = 0.0):
    """The outer cycles on ``backend`` (resumed from ``cfg.checkpoint`` when it holds one of this run) → an
    :class:`~.result.EnsembleResult`."""
    x = torch.zeros(fm.n, dtype=torch.float64)
    state = load_checkpoint(cfg.checkpoint, fm, labels) if cfg.checkpoint else None
    rows, records, sig, done = [], [], np.full(fm.n, np.nan), 0
    if state is not None:
        x, rows, records, sig, done = state["x"], state["rows"], state["records"], state["sigF"], state["cycle"]
        fm.refined = state["refined"]
        models = [r["model"] for r in state["shots"]]
        backend.update(shard_set_models, models, labels)
    zero = np.zeros(len(labels))
    for cycle in range(done + 1, cfg.cycles + 1):
        t0 = time.perf_counter()
        backend.update(shard_fit, fm.table(x).detach().numpy(), table_shape, hkl_min, cycle)
        curv = _curvature(backend, fm, x, zero)
        fm.refined = curv.diag > 0
        x_old = x
        x, scales, objective = _f_step(backend, fm, x, cfg, curv.diag + fm.restraint_curvature(cfg.restraints),
                                       curv.shot)
        t1 = time.perf_counter()
        sigma = structure_factor_sigmas(backend, fm, x, scales, cfg.restraints, fixed_scale=cfg.scales)
        sig = sigma.sigF
        sigf = {"sigf_method": sigma.method, "sigf_note": sigma.note, "sigf_seconds": time.perf_counter() - t1,
                "scale_esd": sigma.scale_sigma}
        backend.update(shard_apply_scales, scales)
        shots = [r for part in backend.map(shard_records) for r in part]
        records = [r["record"] for r in shots]
        rows.append(cycle_row(cycle, objective, fm, x_old, x, records, time.perf_counter() - t0, **sigf))
        if cfg.checkpoint:
            save_checkpoint(cfg.checkpoint, fm, labels, {"cycle": cycle, "x": x, "rows": rows, "records": records,
                                                          "sigF": sig, "refined": fm.refined, "shots": shots})
        if cfg.callback is not None:
            cfg.callback(rows[-1])
    if cfg.expt_dir and done < cfg.cycles:  # the shots fitted in this run: their refined experiment lists
        backend.update(shard_write_expt, cfg.expt_dir)
        records = [r["record"] for part in backend.map(shard_records) for r in part]
    return EnsembleResult.build(fm, x, sig, rows, records, table_shape, hkl_min)


def run_ensemble(make, params_list, setups, labels, cfg: RunConfig, options: dict, dask_args: Optional[dict]):
    """The run of :func:`fit_structure_factors` and of ``nbtorch-refine --refine-f``: the table and classes from the
    starting models, the shards (``make(n_shards, threads, common)`` → shards, or on Dask loaders ``(fn, args)``
    that build one on a worker; ``common`` = (ids, n, per_image, options, fused)), in this process (``dask_args``
    None) or on Dask (:func:`~.backend.dask_shards`' keyword arguments), then :func:`run_cycles`."""
    t0 = time.perf_counter()
    options = {k: v for k, v in options.items() if k != "callback"}
    fused = options.pop("fused", False)
    table, hkl_min = start_table(params_list, setups)
    fm = FModel(asu_map(hkl_min, table.shape, cfg.space_group, cfg.anomalous), table,
                params_list[0].crystal.cell.tolist())
    common = (torch.as_tensor(fm.ids), fm.n, list(cfg.per_image), options, fused)
    if dask_args is not None:
        backend = dask_shards(lambda k, threads: make(k, threads, common), **dask_args)
    else:
        backend = LocalShards([s if isinstance(s, Shard) else s[0](*s[1]) for s in make(1, None, common)])
    try:
        result = run_cycles(backend, fm, table.shape, hkl_min, labels, cfg)
    finally:
        backend.close()
    result.seconds = time.perf_counter() - t0
    return result


def fit_structure_factors(observed_list=None, params_list=None, setup_list=None, *, space_group: str = "P 1",
                          anomalous: bool = False, per_image=("orientation", "scale"), cycles: int = 3,
                          restraints: Optional[Restraints] = None, f_iter: int = 50, labels=None,
                          nanobragg_args=None, checkpoint: Optional[str] = None, client=None,
                          workers: Optional[int] = None, scheduler: Optional[str] = None, security=None,
                          dask: bool = False, fused: Optional[bool] = False,
                          callback: Optional[Callable[[dict], None]] = None, **options) -> EnsembleResult:
    """Refine the |F| of the asymmetric unit jointly with every still's own model (see the module docstring).

    Args:
        observed_list, params_list, setup_list: the N stills (photons [slow, fast]), their starting models (float64;
            every one with the same |F| table, or none: then a ``default_F`` table to the detector corners) and
            set-ups (one Setup for all, or N).
        space_group: gemmi's name or number; anomalous: F(+) and F(−) apart (Friedel mates otherwise share one |F|).
        per_image: groups refined per shot (:data:`refine.model.table.GROUPS`: orientation, cell, scale, ncells,
            mosaic, background …); cycles: outer cycles; f_iter: L-BFGS iterations per F step.
        restraints: :class:`~refine.ensemble.fmodel.Restraints` (default: towards the start, weight 1).
        labels: a name per shot (default ``shot1``…); nanobragg_args: each shot's starting flags (reports).
        checkpoint: a folder: the state is saved there after every cycle and a run with the same shots and
            space group resumes from it (its finished cycles are not run again).
        client / workers / scheduler / security / dask: on Dask (an existing client, or a local cluster of
            ``workers`` processes, or ``scheduler``, as ``--independent``; ``dask=True`` with neither: a local
            cluster of one worker per core); otherwise in this process.
        fused: compiled kernels for the designs (simulate's ``fused``); callback: called with each cycle's row.
        options: keyword arguments of :func:`refine.fit` for the per-shot fits (target, max_iter, coarse_to_fine …).

    Returns:
        :class:`~refine.ensemble.result.EnsembleResult`.
    """
    t0 = time.perf_counter()
    for name, value in (("cycles", cycles), ("f_iter", f_iter)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    n = len(observed_list)
    setups = list(setup_list) if isinstance(setup_list, (list, tuple)) else [setup_list] * n
    if not (len(params_list) == n == len(setups)) or n == 0:
        raise ValueError(f"need as many starting models and set-ups as observed images (≥ 1); got {n} images, "
                         f"{len(params_list)} models, {len(setups)} set-ups")
    labels = list(labels) if labels is not None else [f"shot{k + 1}" for k in range(n)]
    flags = nanobragg_args if nanobragg_args is not None else [None] * n
    shots = [Shot(lab, torch.as_tensor(o), s, p, k, f) for k, (lab, o, p, s, f) in
             enumerate(zip(labels, observed_list, params_list, setups, flags))]
    cfg = RunConfig(space_group, anomalous, tuple(per_image), int(cycles), restraints or Restraints(), int(f_iter),
                    checkpoint, callback)
    on_dask = dask or client is not None or workers is not None or scheduler is not None
    result = run_ensemble(lambda k, threads, common: _shards(shots, k, *common, threads), params_list, setups,
                          labels, cfg, dict(options, fused=fused),
                          dict(client=client, workers=workers, scheduler=scheduler, security=security) if on_dask
                          else None)
    result.seconds = time.perf_counter() - t0
    return result

