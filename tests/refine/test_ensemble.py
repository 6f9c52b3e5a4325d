"""Structure factors from many stills (refine.ensemble, refine.fit_structure_factors): reflection classes, the
per-shot design against reverse mode through the kernel and finite differences, recovery of |F| started 30 % off
from 20 stills (P1 and P 43 21 2), SIGF coverage, Dask = one process, resume from a checkpoint, MTZ output.

Stills of 48×48 pixels, one sample per pixel, a 25–29 Å cell (a few hundred reflections), float64."""
from __future__ import annotations

import json
import math
from pathlib import Path

import gemmi
import numpy as np
import pytest
import torch

import nbtorch
import refine
from nbtorch.io.structure_files import read_mtz
from nbtorch.types import Structure
from refine.ensemble import Restraints, asu_map
from refine.ensemble.checkpoint import CHECKPOINT_NAME
from refine.ensemble.design import shot_design
from refine.ensemble.fmodel import FModel
from refine.ensemble.shots import Shot, fit_shot, inverse_root, shot_loss_direct, shot_value_grad

BASE = ("-default_F 1 -N 5 -lambda 1 -distance 50 -pixel 0.3 -detpixels 48 -oversample 1 -fluence 1e30")
CELLS = {"P 1": "25 27 29 90 90 90", "P 43 21 2": "25 25 29 90 90 90"}
SHAPE, HKL_MIN = (13, 13, 13), (-6, -6, -6)


def _table(amap, values):
    ids = amap.ids.reshape(-1)
    return torch.as_tensor(np.where(ids >= 0, values[np.maximum(ids, 0)], 0.0).reshape(SHAPE))


def make_stills(space_group: str, n: int, seed: int = 0, flags: str = ""):
    """n noisy stills at random orientations from known |F| (uniform 40–160 per class), and starting models with
    |F| 30 % off (uniform, per class) and fluence × 1.2: (observed, starts, setup, amap, F_true, F_start); ``flags``
    added to :data:`BASE`."""
    p0, s0 = nbtorch.from_nanobragg_args(f"{BASE} {flags} -cell {CELLS[space_group]}", dtype=torch.float64)
    setup = s0.replace(hkl_min=HKL_MIN)
    amap = asu_map(HKL_MIN, SHAPE, space_group)
    rng = np.random.default_rng(seed)
    F_true = rng.uniform(40, 160, amap.n)
    F_start = F_true * (1 + 0.3 * rng.uniform(-1, 1, amap.n))
    zero = p0.structure.default_F * 0
    obs, starts = [], []
    for k in range(n):
        crystal = p0.crystal._replace(misset=torch.tensor(rng.uniform(0, 360, 3), dtype=torch.float64))
        p = p0._replace(structure=Structure(_table(amap, F_true), zero), crystal=crystal)
        obs.append(torch.poisson(nbtorch.simulate(p, setup, fused=False), generator=torch.Generator().manual_seed(k)))
        starts.append(p._replace(structure=Structure(_table(amap, F_start), zero),
                                 beam=p.beam._replace(fluence=p.beam.fluence * 1.2)))
    return obs, starts, setup, amap, F_true, F_start


def coverage(result, F_true):
    """(CC of the refined |F| with the truth, fraction with |k·F − F_true| ≤ 2·k·SIGF): k the overall scale, a
    1/SIGF²-weighted fit (the data fix |F| only up to one scale shared with the per-shot scales)."""
    on = result.refined
    F, S, T = result.F[on], result.SIGF[on], F_true[on]
    w = 1 / S ** 2
    k = (w * F * T).sum() / (w * F * F).sum()
    return float(np.corrcoef(F, T)[0, 1]), float(np.mean(np.abs(k * F - T) <= 2 * k * S))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread in this module: its many small simulations run faster so on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def p1_stills():
    return make_stills("P 1", 20)


@pytest.fixture(scope="module")
def p1_result(p1_stills):
    obs, starts, setup, *_ = p1_stills
    return refine.fit_structure_factors(obs, starts, setup, space_group="P 1", per_image=["scale"], cycles=1,
                                        max_iter=10, coarse_to_fine=False)


# ----------------------------------------------------------------------------------------------------------------
# reflection classes


def test_symmetry_equivalents_share_one_class_and_friedel_mates_unless_anomalous():
    amap = asu_map(HKL_MIN, SHAPE, "P 43 21 2")
    ops = gemmi.SpaceGroup("P 43 21 2").operations()

    def cls(h, m=amap):
        return int(m.ids[tuple(np.asarray(h) - HKL_MIN)])

    for h in ([1, 2, 3], [2, 0, 5], [3, 1, 1]):
        mates = {tuple(op.apply_to_hkl(h)) for op in ops.sym_ops}
        assert len(mates) > 1 and len({cls(m) for m in mates}) == 1
        assert cls([-v for v in h]) == cls(h)  # Friedel mate, not anomalous
    assert cls([1, 2, 3]) != cls([1, 2, 4])
    assert cls([0, 0, 1]) == -1 and cls([0, 0, 0]) == -1  # 4_3 screw axis: 00l absent unless l = 4n; F000 fixed
    anom = asu_map(HKL_MIN, SHAPE, "P 43 21 2", anomalous=True)
    assert cls([1, 2, 3], anom) != cls([-1, -2, -3], anom)  # acentric: F(+) and F(-) apart
    assert cls([1, 2, 0], anom) == cls([-1, -2, 0], anom)  # hk0 is centric in 422: one class
    assert anom.n > amap.n and anom.plus.sum() + (~anom.plus).sum() == anom.n
    p1 = asu_map(HKL_MIN, SHAPE, "P 1")
    assert p1.n == (np.prod(SHAPE) - 1) // 2  # every entry but F000, Friedel pairs together
    with pytest.raises(ValueError, match="space_group"):
        asu_map(HKL_MIN, SHAPE, "P 7")


# ----------------------------------------------------------------------------------------------------------------
# the design and the gradient


@pytest.fixture(scope="module")
def fitted_shots(p1_stills):
    obs, starts, setup, amap, F_true, F_start = p1_stills
    table = _table(amap, F_start).reshape(-1)
    shots = [Shot(f"s{k}", obs[k], setup, starts[k], k) for k in range(2)]
    options = {"max_iter": 5, "coarse_to_fine": False}
    return [fit_shot(s, table, SHAPE, HKL_MIN, ["scale"], options, False, 1) for s in shots], amap, F_start


def test_design_rebuilds_the_simulation_and_its_gradient_is_reverse_modes(fitted_shots):
    shots, amap, F_start = fitted_shots
    shot = shots[0]
    d = shot_design(shot.model, shot.setup, shot.index)
    assert d.colours == 1 and len(d.row) >= len(shot.index)
    table = _table(amap, F_start).reshape(-1).clone().requires_grad_(True)
    shot_loss_direct(shot, table).backward()  # reverse mode through the kernel
    loss, gT, _ = shot_value_grad(shot, (table.detach() ** 2))
    assert loss == pytest.approx(float(shot_loss_direct(shot, table.detach())), rel=1e-11)
    g_design = gT * 2 * table.detach()  # ∂L/∂F = ∂L/∂T · 2F
    assert torch.allclose(g_design, table.grad, rtol=1e-9, atol=1e-9 * float(table.grad.abs().max()))


def test_objective_gradient_matches_finite_differences(fitted_shots):
    """∂(Σ losses + restraints)/∂x for a handful of classes: the design's gradient against central differences of
    the loss from full simulations (float64)."""
    shots, amap, F_start = fitted_shots
    fm = FModel(amap, _table(amap, F_start).numpy(), [25, 27, 29, 90, 90, 90])
    fm.refined[:] = True
    r = Restraints(start=3.0)
    x0 = torch.as_tensor(np.random.default_rng(3).normal(0, 0.05, fm.n))

    def objective(x):
        return sum(float(shot_loss_direct(s, fm.table(x))) for s in shots) + float(fm.restraint(x, r))

    x = x0.clone().requires_grad_(True)
    T = fm.table(x) ** 2
    gT = sum(shot_value_grad(s, T.detach())[1] for s in shots)
    ((T * gT).sum() + fm.restraint(x, r)).backward()
    seen = np.flatnonzero(np.abs(x.grad.numpy()) > 1e-3 * np.abs(x.grad.numpy()).max())
    for a in seen[:: max(1, len(seen) // 5)][:5]:
        e = torch.zeros(fm.n, dtype=torch.float64)
        e[a] = 1e-5
        fd = (objective(x0 + e) - objective(x0 - e)) / 2e-5
        assert float(x.grad[a]) == pytest.approx(fd, rel=1e-5, abs=1e-6 * abs(fd) + 1e-6)


# ----------------------------------------------------------------------------------------------------------------
# SIGF: the profiled Gauss–Newton matrix


@pytest.fixture(scope="module")
def sigma_problem():
    """3 stills of 2×2 samples per pixel (a pixel between reflections sees two classes) fitted with orientation and
    scale (4 free scalars each), an anomalous P1 model of their classes with every restraint on (Friedel pairs
    couple), log-scales x and shot log-scales s away from 0: (shots, fm, backend, x, s, restraints)."""
    from refine.ensemble.backend import LocalShards
    from refine.ensemble.run import _curvature
    from refine.ensemble.shots import Shard

    obs, starts, setup, amap, F_true, F_start = make_stills("P 1", 3, seed=4, flags="-oversample 2")
    table = _table(amap, F_start).reshape(-1)
    options = {"max_iter": 5, "coarse_to_fine": False}
    shots = [fit_shot(Shot(f"s{k}", obs[k], setup, starts[k], k), table, SHAPE, HKL_MIN, ["orientation", "scale"],
                      options, False, 1) for k in range(3)]
    fm = FModel(asu_map(HKL_MIN, SHAPE, "P 1", anomalous=True), table.numpy(), [25, 27, 29, 90, 90, 90])
    backend = LocalShards([Shard(shots, torch.as_tensor(fm.ids), fm.n, ["orientation", "scale"], {}, False)])
    fm.refined = _curvature(backend, fm, torch.zeros(fm.n, dtype=torch.float64), np.zeros(3)).diag > 0
    x = torch.as_tensor(np.random.default_rng(5).normal(0, 0.05, fm.n))
    return shots, fm, backend, x, np.array([0.1, -0.05, 0.02]), Restraints(start=1.0, bins=2.0, friedel=5.0)


def joint_matrix(shots, fm, x, scales, r):
    """The full Gauss–Newton matrix [m + Σk, m + Σk] of (x of the m refined classes, every shot's θ), dense from
    explicit Jacobians (jacfwd of the design model in x, the shot's ∂m/∂θ), plus the restraints' Hessian (autograd),
    and the refined classes' indices."""
    act = torch.as_tensor(np.flatnonzero(fm.refined & fm.movable()))
    m, ks = len(act), [s.jacobian.shape[1] for s in shots]
    H = torch.zeros(m + sum(ks), m + sum(ks), dtype=torch.float64)
    off = m
    for shot, s, k in zip(shots, scales, ks):
        def model(xa, shot=shot, s=s):
            T = fm.table(x.index_put((act,), xa)) ** 2
            return math.exp(s) * shot.design.model(T) + shot.background

        J = torch.zeros(len(shot.o), m + sum(ks), dtype=torch.float64)
        J[:, :m] = torch.func.jacfwd(model)(x[act])
        J[:, off:off + k] = math.exp(s) * shot.jacobian
        W = shot.target.fisher(model(x[act]), shot.o, shot.w)
        H += J.T @ (W[:, None] * J)
        off += k
    H[:m, :m] += torch.func.hessian(lambda xa: fm.restraint(x.index_put((act,), xa), r))(x[act])
    return H, act.numpy()


def test_sigf_is_the_diagonal_of_the_inverse_of_the_joint_gauss_newton_matrix(sigma_problem):
    """The Schur-complement identity: SIGF from the shards' sparse JᵀWJ and low-rank factors equals |F|·sqrt of the
    x block's diagonal of the inverse of the full joint matrix, and, with the common scale held, of that block's
    conditional covariance given the mean of x; the diagonal-only formula is 1/(Schur complement)_aa and never
    larger than the full inverse's."""
    from refine.ensemble.run import _curvature, diagonal_sigma, structure_factor_sigmas

    shots, fm, backend, x, scales, r = sigma_problem
    H, act = joint_matrix(shots, fm, x, scales, r)
    m = len(act)
    assert m > 200 and len(H) == m + 12 and np.any(fm.restraint_hessian(r)[2] < 0)  # Friedel pairs are coupled
    a, b, _ = _curvature(backend, fm, x, scales, full=True).pairs
    assert np.sum(a != b) > 100  # classes that share pixels are coupled
    d = H.diagonal().rsqrt()
    inv = torch.cholesky_inverse(torch.linalg.cholesky(H * d[:, None] * d[None, :])) * d[:, None] * d[None, :]
    F = fm.amplitudes(x).numpy()[act]
    sigma = structure_factor_sigmas(backend, fm, x, scales, r)
    assert sigma.method == "inverse" and sigma.note == "" and math.isnan(sigma.scale_sigma)
    assert np.allclose(sigma.sigF[act], F * np.sqrt(inv.diagonal()[:m].numpy()), rtol=1e-9, atol=0)
    assert np.isnan(np.delete(sigma.sigF, act)).all()
    z = inv[:m, :m].sum(1).numpy()  # Σu, u = 1: the covariance with the mean of x
    held = structure_factor_sigmas(backend, fm, x, scales, r, fixed_scale=True)
    assert np.allclose(held.sigF[act], F * np.sqrt(inv.diagonal()[:m].numpy() - z * z / z.sum()), rtol=1e-9, atol=0)
    assert held.scale_sigma == pytest.approx(math.sqrt(z.sum()) / m, rel=1e-9)
    schur = H[:m, :m] - H[:m, m:] @ torch.linalg.solve(H[m:, m:], H[m:, :m])
    diag = diagonal_sigma(fm, x, _curvature(backend, fm, x, scales), r)
    assert np.allclose(diag[act], F / np.sqrt(schur.diagonal().numpy()), rtol=1e-9, atol=0)
    ratio = sigma.sigF[act] / diag[act]
    print(f"SIGF inverse / diagonal over {m} classes: median {np.median(ratio):.3f}, max {ratio.max():.3f}; scale "
          f"held: median {np.median(held.sigF[act] / diag[act]):.3f}")
    assert np.all(ratio >= 1 - 1e-12) and ratio.max() > 1.01


def test_sigf_falls_back_to_the_diagonal_above_the_dense_limit(sigma_problem, monkeypatch):
    from refine.ensemble import run
    from refine.ensemble.run import _curvature, diagonal_sigma, inverse_diagonal, structure_factor_sigmas

    shots, fm, backend, x, scales, r = sigma_problem
    monkeypatch.setattr(run, "DENSE_SIGF_MAX", 10)
    sigma = structure_factor_sigmas(backend, fm, x, scales, r)
    m = int((fm.refined & fm.movable()).sum())
    assert sigma.method == "diagonal" and sigma.note == f"{m} refined classes > DENSE_SIGF_MAX = 10"
    assert np.array_equal(sigma.sigF, diagonal_sigma(fm, x, _curvature(backend, fm, x, scales), r), equal_nan=True)
    var, note, _ = inverse_diagonal(np.array([[1.0, 2.0], [2.0, 1.0]]))  # indefinite
    assert var is None and "not positive definite" in note
    var, note, uHu = inverse_diagonal(np.array([[4.0, 1.0], [1.0, 2.0]]))
    assert note == "" and uHu is None and np.allclose(var, [2 / 7, 4 / 7], rtol=1e-14)
    var, note, uHu = inverse_diagonal(np.array([[4.0, 1.0], [1.0, 2.0]]), fixed=np.ones(2))
    assert np.allclose(var, [1 / 4, 1 / 4], rtol=1e-14) and uHu == pytest.approx(4 / 7, rel=1e-14)  # x1 | x1 + x2


def test_a_run_reports_how_it_found_sigf(p1_stills, monkeypatch):
    """The cycles' rows and the summary say which SIGF a run gives; the limit forced low: the diagonal formula."""
    from refine.ensemble import run

    obs, starts, setup, *_ = p1_stills
    kw = dict(space_group="P 1", per_image=["scale"], cycles=1, max_iter=5, coarse_to_fine=False)
    dense = refine.fit_structure_factors(obs[:3], starts[:3], setup, **kw)
    monkeypatch.setattr(run, "DENSE_SIGF_MAX", 10)
    diagonal = refine.fit_structure_factors(obs[:3], starts[:3], setup, **kw)
    on = dense.refined
    assert dense.sigf_method == "inverse" and dense.rows[0]["sigf_note"] == "" and dense.rows[0]["sigf_seconds"] >= 0
    esd = dense.rows[0]["scale_esd"]  # the shots' scales are refined: SIGF holds the common scale, its σ apart
    assert 0 < esd < 1 and f"fix it to ±{100 * esd:.2g} %" in dense.summary()
    assert "SIGF from the diagonal of the inverse" in dense.summary()
    assert diagonal.sigf_method == "diagonal" and "DENSE_SIGF_MAX = 10" in diagonal.summary()
    assert math.isnan(diagonal.rows[0]["scale_esd"])
    assert np.array_equal(dense.F, diagonal.F) and np.median(dense.SIGF[on] / diagonal.SIGF[on]) > 1


def test_inverse_root_is_a_generalized_inverse_when_free_scalars_are_redundant():
    """M = KᵀWK of badly scaled columns, then with a column that repeats a sum of two others (M singular): C·R·Rᵀ·Cᵀ
    is C·M⁻¹·Cᵀ and unchanged by the redundant column."""
    rng = np.random.default_rng(2)
    K = torch.as_tensor(rng.normal(size=(300, 4)) * np.array([1e-3, 1.0, 1e2, 1e4]))
    W = torch.as_tensor(rng.uniform(0.5, 2.0, 300))
    J = torch.as_tensor(rng.normal(size=(300, 6)))

    def schur_part(K):
        C = J.T @ (W[:, None] * K)
        R = inverse_root(K.T @ (W[:, None] * K))
        return (C @ R) @ (C @ R).T

    M = K.T @ (W[:, None] * K)
    C = J.T @ (W[:, None] * K)
    exact = C @ torch.linalg.solve(M, C.T)
    assert torch.allclose(schur_part(K), exact, rtol=1e-10, atol=1e-12 * float(exact.abs().max()))
    redundant = torch.cat([K, (K[:, 1] + K[:, 2])[:, None]], 1)
    assert torch.allclose(schur_part(redundant), exact, rtol=1e-9, atol=1e-10 * float(exact.abs().max()))


# ----------------------------------------------------------------------------------------------------------------
# recovery


def test_p1_structure_factors_recovered_from_20_stills(p1_stills, p1_result):
    obs, starts, setup, amap, F_true, F_start = p1_stills
    res = p1_result
    on = res.refined
    cc_start = float(np.corrcoef(F_start[on], F_true[on])[0, 1])
    cc, covered = coverage(res, F_true)
    print(f"P1, 20 stills: CC to the truth {cc_start:.3f} -> {cc:.3f}; {covered:.0%} within 2 SIGF")
    assert cc >= 0.95 and cc > cc_start + 0.05 and covered >= 0.8
    assert 100 < on.sum() < amap.n and np.all(res.F[~on] == F_start[~on])  # unseen classes kept, reported
    table = res.structure_table().numpy()
    assert np.array_equal(table, table[::-1, ::-1, ::-1])  # Friedel mates equal (the grid is symmetric about 000)
    row = res.rows[0]
    assert row["cycle"] == 1 and row["refined"] == on.sum() and 0 < row["r_change"] < 0.5
    assert len(res.records) == 20 and all(r["converged"] is not None for r in res.records)
    assert row["sigf_method"] == "inverse"


@pytest.fixture(scope="module")
def p43212_stills():
    return make_stills("P 43 21 2", 20, seed=1)


def test_higher_symmetry_shares_parameters_and_recovers(p43212_stills):
    obs, starts, setup, amap, F_true, F_start = p43212_stills
    res = refine.fit_structure_factors(obs, starts, setup, space_group="P 43 21 2", per_image=["scale"], cycles=1,
                                       max_iter=10, coarse_to_fine=False)
    on = res.refined
    cc_start = float(np.corrcoef(F_start[on], F_true[on])[0, 1])
    cc, covered = coverage(res, F_true)
    print(f"P 43 21 2, 20 stills: CC {cc_start:.3f} -> {cc:.3f}; {covered:.0%} within 2 SIGF")
    assert cc >= 0.95 and cc > cc_start + 0.05 and covered >= 0.8
    table = res.structure_table().numpy()
    ops = gemmi.SpaceGroup("P 43 21 2").operations()
    for h in res.hkl[on][:20]:
        vals = {float(table[tuple(np.asarray(op.apply_to_hkl(h.tolist())) - HKL_MIN)]) for op in ops.sym_ops}
        assert len(vals) == 1  # every symmetry mate takes its class's one value


def test_orientation_and_scale_per_shot_converge_over_cycles(p43212_stills):
    """8 stills whose starting orientations are also 0.02° off about each axis: orientation and scale refined per
    shot, 3 cycles; the |F| change shrinks from cycle to cycle."""
    obs, starts, setup, amap, F_true, F_start = p43212_stills
    starts = [p._replace(crystal=p.crystal._replace(misset=p.crystal.misset + 0.02)) for p in starts[:8]]
    res = refine.fit_structure_factors(obs[:8], starts, setup, space_group="P 43 21 2",
                                       per_image=["orientation", "scale"], cycles=3, max_iter=10, coarse_to_fine=False)
    on = res.refined
    cc, covered = coverage(res, F_true)
    print(f"P 43 21 2, 8 stills, orientation + scale: CC {float(np.corrcoef(F_start[on], F_true[on])[0, 1]):.3f} -> "
          f"{cc:.3f}; {covered:.0%} within 2 SIGF")
    assert cc > float(np.corrcoef(F_start[on], F_true[on])[0, 1]) + 0.05 and covered >= 0.8
    changes = [r["r_change"] for r in res.rows]
    assert changes[2] < changes[1] < changes[0] and res.rows[2]["cc_previous"] > 0.999


def test_cc_improves_with_more_stills(p1_stills, p1_result):
    """CC to the truth against the number of stills (5, 10, 20) over the reflections all runs refine."""
    obs, starts, setup, amap, F_true, F_start = p1_stills
    runs = {n: refine.fit_structure_factors(obs[:n], starts[:n], setup, space_group="P 1", per_image=["scale"],
                                            cycles=1, max_iter=10, coarse_to_fine=False)
            for n in (5, 10)}
    runs[20] = p1_result
    common = runs[5].refined & runs[10].refined & runs[20].refined
    cc = {n: float(np.corrcoef(r.F[common], F_true[common])[0, 1]) for n, r in runs.items()}
    print("CC against stills:", {n: round(v, 4) for n, v in cc.items()})
    assert cc[20] > cc[5] and cc[10] > float(np.corrcoef(F_start[common], F_true[common])[0, 1])


# ----------------------------------------------------------------------------------------------------------------
# Dask, checkpoints, outputs


@pytest.fixture(scope="module")
def small_run(p1_stills):
    obs, starts, setup, *_ = p1_stills
    kw = dict(space_group="P 1", per_image=["scale"], cycles=2, max_iter=5, f_iter=30, coarse_to_fine=False)
    return (obs[:6], starts[:6], setup), kw, refine.fit_structure_factors(obs[:6], starts[:6], setup, **kw)


def test_dask_run_equals_the_one_process_run(small_run):
    pytest.importorskip("distributed")
    from distributed import Client

    data, kw, local = small_run
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        on_dask = refine.fit_structure_factors(*data, client=client, **kw)
    assert np.allclose(on_dask.F, local.F, rtol=1e-9) and np.array_equal(on_dask.refined, local.refined)
    assert np.allclose(on_dask.SIGF[local.refined], local.SIGF[local.refined], rtol=1e-8)
    assert [r["objective"] for r in on_dask.rows] == pytest.approx([r["objective"] for r in local.rows], rel=1e-10)


def test_a_run_stopped_after_a_cycle_resumes_from_its_checkpoint(small_run, tmp_path):
    data, kw, local = small_run

    def stop(row):
        raise KeyboardInterrupt  # killed once the first cycle's checkpoint is written

    with pytest.raises(KeyboardInterrupt):
        refine.fit_structure_factors(*data, checkpoint=str(tmp_path), callback=stop, **kw)
    assert (tmp_path / CHECKPOINT_NAME).exists()
    cycles = []
    resumed = refine.fit_structure_factors(*data, checkpoint=str(tmp_path), callback=cycles.append, **kw)
    assert [r["cycle"] for r in cycles] == [2]  # only the second cycle ran
    assert np.allclose(resumed.F, local.F, rtol=1e-9) and len(resumed.rows) == 2
    again = refine.fit_structure_factors(*data, checkpoint=str(tmp_path), callback=cycles.append, **kw)
    assert len(cycles) == 1 and np.array_equal(again.F, resumed.F)  # all done: nothing runs
    with pytest.raises(ValueError, match="another run"):
        refine.fit_structure_factors(*data, checkpoint=str(tmp_path), **dict(kw, space_group="P -1"))
    with pytest.raises(ValueError, match="cycles must be an integer >= 1"):
        refine.fit_structure_factors(*data, **dict(kw, cycles=0))


def test_mtz_holds_the_refined_reflections_and_reads_back(p1_result, tmp_path):
    res = p1_result
    path = str(tmp_path / "F.mtz")
    res.write_mtz(path)
    mtz = gemmi.read_mtz_file(path)
    assert [c.label for c in mtz.columns] == ["H", "K", "L", "F", "SIGF"]
    assert mtz.spacegroup.hm == "P 1" and mtz.cell.a == pytest.approx(25.0)
    assert mtz.nreflections == int(res.refined.sum())
    table, hkl_min, _ = read_mtz(path, default_F=0.0)
    on = np.flatnonzero(res.refined)
    for a in on[:10]:
        h = tuple(res.hkl[a] - np.asarray(hkl_min))
        assert table[h] == pytest.approx(res.F[a], rel=1e-6)  # float32 columns
    res.write_shots(str(tmp_path / "shots.jsonl"))
    assert len((tmp_path / "shots.jsonl").read_text().splitlines()) == 20
    assert "20 stills, P 1" in res.summary()


def test_anomalous_keeps_friedel_mates_apart_and_writes_their_columns(p1_stills, tmp_path):
    obs, starts, setup, *_ = p1_stills
    res = refine.fit_structure_factors(obs[:4], starts[:4], setup, space_group="P 1", anomalous=True,
                                       per_image=["scale"], cycles=1, max_iter=5, coarse_to_fine=False,
                                       restraints=Restraints(start=1.0, friedel=10.0))
    assert not res.plus.all() and res.anomalous
    res.write_mtz(str(tmp_path / "anom.mtz"))
    labels = [c.label for c in gemmi.read_mtz_file(str(tmp_path / "anom.mtz")).columns]
    assert labels == ["H", "K", "L", "F", "SIGF", "F(+)", "SIGF(+)", "F(-)", "SIGF(-)"]
    assert math.isfinite(res.rows[0]["objective"])


# ----------------------------------------------------------------------------------------------------------------
# the command line


def _write_list(folder, stills, n: int) -> str:
    """n stills as raw float images, their starting |F| as an h k l F file and a LIST of their starting models."""
    obs, starts, setup, amap, F_true, F_start = stills
    from nbtorch.io.hkl import write_hkl
    from nbtorch.io.images import write_raw_float
    from refine.ensemble.asu import table_indices

    table = _table(amap, F_start).numpy().reshape(-1)
    write_hkl(str(folder / "start.hkl"), table_indices(HKL_MIN, SHAPE), table)
    lines = []
    for k in range(n):
        write_raw_float(str(folder / f"img{k}.bin"), obs[k].numpy().astype(np.float32))
        m = " ".join(f"{float(v)!r}" for v in starts[k].crystal.misset)
        lines.append(f"img{k}.bin -misset {m} -fluence {float(starts[k].beam.fluence)!r}")
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    return str(folder / "list.txt")


def test_command_line_refines_f_from_a_list(p1_stills, tmp_path, capsys):
    from refine.cli.fit import main

    lst = _write_list(tmp_path, p1_stills, 4)
    common = ["--images", lst, "-cell", *CELLS["P 1"].split(), *BASE.replace("-default_F 1", "-default_F 0").split(),
              "-hkl", str(tmp_path / "start.hkl")]
    out = str(tmp_path / "F.mtz")
    argv = common + ["--refine-f", "--per-image", "scale", "--cycles", "1", "--max-iter", "5", "--no-coarse",
                     "--out-mtz", out, "--checkpoint", str(tmp_path / "ck"), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "structure factors from 4 stills, P 1" in printed and "R(change)" in printed
    assert gemmi.read_mtz_file(out).nreflections > 50
    assert len((tmp_path / "F_shots.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "ck" / CHECKPOINT_NAME).exists()
    for extra, message in ((["--space-group", "P 7"], "--space-group"), (["--restrain-start", "-1"], "--restrain-start"),
                           (["--independent"], "two modes"), (["--results", "r.jsonl"], "--results")):
        bad = [a for a in argv if a != "--quiet"] + extra
        bad[bad.index("--out-mtz") + 1] = str(tmp_path / "G.mtz")
        assert main(bad) == 2 and message in capsys.readouterr().err
    assert main([a for a in argv if a not in ("--out-mtz", out)]) == 2
    assert "--out-mtz" in capsys.readouterr().err
    again = str(tmp_path / "again.mtz")  # a run started from the first one's MTZ (--f-start, as -hkl F.mtz)
    start = [a for a in common if a not in ("-hkl", str(tmp_path / "start.hkl"))]
    assert main(start + ["--refine-f", "--f-start", out, "--per-image", "scale", "--cycles", "1", "--max-iter", "5",
                         "--no-coarse", "--out-mtz", again, "--quiet"]) == 0
    first, second = (gemmi.read_mtz_file(p) for p in (out, again))
    assert second.nreflections >= 0.9 * first.nreflections


def test_list_shots_read_on_their_dask_worker_give_the_local_run(p1_stills, tmp_path):
    """The --images path on Dask: each shard is read by a task on its worker (refine.ensemble.cli's loaders)."""
    pytest.importorskip("distributed")
    from distributed import Client

    from refine.ensemble.cli import _loaders
    from refine.ensemble.run import RunConfig, run_ensemble
    from refine.ensemble.shots import entry_label
    from refine.imagelist import entry_start, parse_image_list

    lst = _write_list(tmp_path, p1_stills, 3)
    flags = ["-cell", *CELLS["P 1"].split(), *BASE.replace("-default_F 1", "-default_F 0").split(), "-hkl",
             str(tmp_path / "start.hkl")]
    entries = parse_image_list(lst, flags)
    models = [entry_start(e)[:2] for e in entries]
    cfg = RunConfig("P 1", False, ("scale",), 1, Restraints(), 30)
    args = ([p for p, _ in models], [s for _, s in models], [entry_label(e) for e in entries], cfg,
            {"max_iter": 5, "coarse_to_fine": False, "fused": False})
    local = run_ensemble(_loaders(entries, {"dtype": "float64"}), *args, None)
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        on_dask = run_ensemble(_loaders(entries, {"dtype": "float64"}), *args, {"client": client})
    assert local.refined.sum() > 20 and np.allclose(on_dask.F, local.F, rtol=1e-9)


def test_expt_list_shots_from_default_f_write_their_refined_experiment_lists(tmp_path, capsys):
    """--expt-list stills (P 2 2 2, three .expt) from -default_F alone: the table is made to the detector corners'
    resolution, and each shot's refined experiment list is written next to --out-mtz."""
    from refine.cli.fit import main

    from .test_expt_list import FLAGS, _write_shot

    for k in range(3):
        _write_shot(tmp_path, k)
    (tmp_path / "list.txt").write_text("".join(f"shot{k}.expt\n" for k in range(3)))
    out = tmp_path / "F.mtz"
    assert main(["--expt-list", str(tmp_path / "list.txt"), "--refine-f", "--space-group", "P 2 2 2", "--per-image",
                 "scale", "--cycles", "1", "--max-iter", "3", "--no-coarse", "--out-mtz", str(out), "--quiet"]
                + FLAGS) == 0, capsys.readouterr().err
    mtz = gemmi.read_mtz_file(str(out))
    assert mtz.spacegroup.hm == "P 2 2 2" and mtz.nreflections > 20
    lines = [json.loads(t) for t in (tmp_path / "F_shots.jsonl").read_text().splitlines()]
    assert [rec["label"] for rec in lines] == [f"{tmp_path / f'shot{k}.expt'}#0" for k in range(3)]
    for k, rec in enumerate(lines):
        assert rec["out_expt"] == str(tmp_path / "F_refined" / f"shot{k}_line{k + 1}_refined.expt")
        assert Path(rec["out_expt"]).exists()


def test_a_shot_whose_fit_fails_sits_out_and_is_reported(p1_stills):
    obs, starts, setup, *_ = p1_stills
    bad = torch.full_like(obs[0], float("nan"))  # no usable pixel: its fit raises
    res = refine.fit_structure_factors([obs[0], bad, obs[2]], [starts[0], starts[1], starts[2]], setup,
                                       space_group="P 1", per_image=["scale"], cycles=1, max_iter=5,
                                       coarse_to_fine=False)
    assert res.records[1]["error"] and not res.records[1]["ok"] and res.rows[0]["failed"] == 1
    assert res.records[0].get("error") is None and res.refined.sum() > 20 and np.isfinite(res.F).all()
    assert "shot shot2 left out of cycle 1" in res.summary()
