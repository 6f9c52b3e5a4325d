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
4. SIGF = |F|·(H_aa)^(−1/2), H the diagonal of the Gauss–Newton matrix of the data at the new |F| with every
   shot's own free scalars profiled out (per shot the Schur complement's diagonal, from ∂m/∂θ at its fit), plus
   the restraints' curvature: the diagonal of H, not of H⁻¹ — the coupling of reflections through shared pixels
   and shared shots is left out (σ is slightly underestimated where it matters);
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


class Curvature(NamedTuple):
    """The Gauss–Newton terms at a point: ``diag`` [n] (data, w.r.t. x), ``profile`` [n] (the part the shots' own
    free scalars explain), ``shot`` [S] (each shot's log-scale curvature)."""

    diag: np.ndarray
    profile: np.ndarray
    shot: np.ndarray


def _curvature(backend, fm: FModel, x: torch.Tensor, scales: np.ndarray) -> Curvature:
    T = (fm.table(x) ** 2).detach().numpy()
    parts = backend.map(shard_curvature, T, scales)
    return Curvature(*(np.sum([p[i] for p in parts], axis=0) for i in range(3)))


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


def _sigma(fm: FModel, x: torch.Tensor, curv: Curvature, cfg: "RunConfig") -> np.ndarray:
    """SIGF [n]: |F|·(H_aa)^(−1/2) of the refined classes, NaN for the others; H the data's diagonal less the part
    the shots' own parameters explain (profiled out) plus the restraints'."""
    H = curv.diag - curv.profile + fm.restraint_curvature(cfg.restraints)
    F = fm.amplitudes(x).detach().numpy()
    ok = fm.refined & fm.movable() & (H > 0)
    return np.where(ok, F / np.sqrt(np.where(ok, H, 1.0)), np.nan)


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
        sig = _sigma(fm, x, _curvature(backend, fm, x, scales), cfg)
        backend.update(shard_apply_scales, scales)
        shots = [r for part in backend.map(shard_records) for r in part]
        records = [r["record"] for r in shots]
        rows.append(cycle_row(cycle, objective, fm, x_old, x, records, time.perf_counter() - t0))
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

