"""Pins for every place where nbtorch deliberately matches or differs from the C program (docs/nanobragg-differences.md)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nbtorch
from nbtorch.lattice import cell_from_real, lattice
from tests.golden import command, in_case_dir

BASE = "-default_F 100 -cell 100 100 100 90 90 90 -misset 10 20 30 -N 5 -lambda 1 -distance 100 -pixel 0.1 " \
       "-detpixels_f 48 -detpixels_s 40 -oversample 1"


def sim(args, **kw):
    p, s = nbtorch.from_nanobragg_args(args, **kw)
    return nbtorch.simulate(p, s)


def test_Q1_phi_zero_is_rotated_like_any_other_angle():
    """C reuses a stale rotation when φ == 0.0 exactly; nbtorch rotates every step (φ = 0 is the identity)."""
    two = sim(BASE + " -phi 0 -osc 2 -phisteps 2")
    a = sim(BASE + " -phi 0")
    b = sim(BASE + " -phi 1")
    # a stale rotation would move whole spots; rounding differs between code paths by ~1e-12 of the peak
    torch.testing.assert_close(two, (a + b) / 2, rtol=1e-10, atol=1e-10 * float(two.max()))


def test_Q4_vector_flags_switch_to_custom():
    p, s = nbtorch.from_nanobragg_args(BASE + " -spindle_axis 0 0 1")
    assert s.convention == "CUSTOM" and s.twotheta_axis == (0.0, 1.0, 0.0)
    # CUSTOM reads Xbeam as the fast coordinate without the half-pixel shift: the default beam spot is centred
    p2, s2 = nbtorch.from_nanobragg_args(BASE)
    assert s2.convention == "MOSFLM"
    assert not torch.equal(nbtorch.simulate(p, s), nbtorch.simulate(p2, s2))


def test_Q6_twotheta_axis_does_not_set_twotheta():
    p, s = nbtorch.from_nanobragg_args(BASE + " -twotheta_axis 0 0 -1")
    assert p.detector.twotheta.item() == 0.0 and s.twotheta_axis == (0.0, 0.0, -1.0)


def test_Q7_oversample_flags_running_sum_matches_sequential_recurrence():
    """nanoBragg multiplies the running sum by per-sample factors; our closed form equals the literal loop."""
    args = BASE + " -detector_thick 100 -polar 0.9 -oversample 2 -oversample_thick -oversample_polar -oversample_omega"
    p, s = nbtorch.from_nanobragg_args(args)
    s = s.replace(roi=(20, 21, 17, 17))
    got = nbtorch.simulate(p, s)[17, 20:22]
    # literal loop over (layer, sub-pixel, source, orientation) with the kernel's per-sample terms
    from nbtorch import kernel as K
    from nbtorch.shape import square
    from nbtorch.simulate import pixel_tile
    from nbtorch.units import R_E_SQUARED_M2

    xt = nbtorch.crystal_orientations(p, s)
    inc = torch.tensor(s.sources[0][0], dtype=torch.float64)
    spec, tp, tc = pixel_tile(p, s, [20, 21], [17, 17])
    dirs, R2, R = K.unit_directions(K.sample_positions(tp, tc, spec))  # 3 × [T, n², 2], [T, n², 2]
    for col in range(2):
        tpc = tp._replace(**{k: getattr(tp, k)[..., col] for k in K.PER_PIXEL})  # this pixel's panel frame
        tcc = tc._replace(area=tc.area[col], capture_k=tc.capture_k[col])
        I = 0.0
        for t in range(s.thicksteps):
            for j in range(s.oversample**2):
                dc = [c[t, j, col] for c in dirs]
                d = torch.stack(dc)
                cap = K.capture_fraction(dc, t, tpc, tcc)
                om = K.solid_angle(R2[t, j, col], R[t, j, col], tpc, tcc, spec)
                pol = K.polarization(inc, dc, tc.polar_axis, tp.polarization)
                h = xt.A[0] @ ((d - inc) / p.beam.wavelength)
                x = (100.0 * square(h - torch.ceil(h - 0.5), p.crystal.ncells)) ** 2
                I = (I + x) * cap * pol * om
        want = R_E_SQUARED_M2 * p.beam.fluence * I / s.steps
        torch.testing.assert_close(got[col], want, rtol=1e-12, atol=0)


def test_Q8_thickness_uses_last_layer_capture_and_step_T_over_n_minus_1():
    p, s = nbtorch.from_nanobragg_args(BASE + " -detector_thick 300 -detector_thicksteps 3")
    assert (s.thicksteps, s.thickstep_um) == (3, 150.0)
    p, s = nbtorch.from_nanobragg_args(BASE + " -detector_thick 300")
    assert (s.thicksteps, s.thickstep_um) == (2, 150.0)


def test_Q10_water_scales_with_fluence_squared_over_steps():
    a = sim(BASE + " -water 1 -default_F 0.0001")
    b = sim(BASE + " -water 1 -default_F 0.0001 -fluence 2.51864030572454e29")  # 2× default fluence
    ratio = (b / a).mean().item()
    assert ratio == pytest.approx(4.0, rel=1e-6)


def test_Q13_flags_match_exactly_misset_seed_does_not_eat_misset():
    p, _ = nbtorch.from_nanobragg_args(BASE + " -misset_seed 5")
    np.testing.assert_allclose(p.crystal.misset.numpy(), [10, 20, 30])
    r1, _ = nbtorch.from_nanobragg_args(BASE.replace("-misset 10 20 30", "-misset random -misset_seed 7"))
    r2, _ = nbtorch.from_nanobragg_args(BASE.replace("-misset 10 20 30", "-misset random -misset_seed 7"))
    r3, _ = nbtorch.from_nanobragg_args(BASE.replace("-misset 10 20 30", "-misset random -misset_seed 8"))
    torch.testing.assert_close(r1.crystal.misset, r2.crystal.misset)
    assert not torch.allclose(r1.crystal.misset, r3.crystal.misset)
    with pytest.raises(ValueError, match="-distance"):
        nbtorch.from_nanobragg_args(BASE + " -distanc 100")


def test_Q14_interpolation_out_of_range_falls_back_per_sample_only():
    rng = np.random.default_rng(0)
    F = torch.tensor(rng.uniform(50, 150, (7, 7, 7)))
    p, s = nbtorch.from_nanobragg_args(BASE.replace("-N 5", "-N 2"))
    p = p._replace(structure=p.structure._replace(F=F))
    s_near = s.replace(hkl_min=(-3, -3, -3), interpolate=False)
    s_int = s.replace(hkl_min=(-3, -3, -3), interpolate=True)
    near, interp = nbtorch.simulate(p, s_near), nbtorch.simulate(p, s_int)
    # pixels whose h, k, l all lie within [min+2, max-2] = [-1, 1] interpolate; the others use the nearest value,
    # independently of pixel order (the C program switches interpolation off for the rest of the run)
    xt = nbtorch.crystal_orientations(p, s)
    from nbtorch.simulate import pixel_lab_positions

    ff, ss = torch.meshgrid(torch.arange(s.fpixels), torch.arange(s.spixels), indexing="xy")
    pos = pixel_lab_positions(p, s, ff.reshape(-1), ss.reshape(-1))[:, 0, 0]
    d = pos / pos.norm(dim=-1, keepdim=True)
    h = (d - torch.tensor(s.beam, dtype=torch.float64)) / p.beam.wavelength @ xt.A[0].T
    inside = ((h >= -1) & (h <= 1)).all(-1).reshape(s.spixels, s.fpixels)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(interp[~inside], near[~inside], rtol=1e-12, atol=0)
    assert not torch.allclose(interp[inside], near[inside])


def test_Q16_curved_det_as_last_argument_works():
    p, s = nbtorch.from_nanobragg_args(BASE + " -curved_det")
    assert s.curved_det


def test_Q19_N_zero_means_one_and_decimal_N_accepted():
    p, _ = nbtorch.from_nanobragg_args(BASE.replace("-N 5", "-N 0"))
    np.testing.assert_allclose(p.crystal.ncells.numpy(), [1, 1, 1])
    p, _ = nbtorch.from_nanobragg_args(BASE.replace("-N 5", "-Na 4.5 -Nb 5 -Nc 6.25"))
    np.testing.assert_allclose(p.crystal.ncells.numpy(), [4.5, 5, 6.25])


def test_Q21_no_silent_fdump_cache(tmp_path, monkeypatch):
    (tmp_path / "Fdump.bin").write_bytes(b"\0" * 64)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="-hkl"):
        nbtorch.from_nanobragg_args(BASE.replace("-default_F 100", ""))
    # and nothing is written there either
    sim(BASE)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["Fdump.bin"]


def test_Q22_detector_abs_zero_disables_thickness():
    _, s = nbtorch.from_nanobragg_args(BASE + " -detector_thick 300 -detector_abs 0")
    assert s.thickness_um == 0 and s.thicksteps == 1


def test_Q27_triclinic_cell_construction():
    """nanoBragg's -cell lattice is sheared for triclinic cells (c* z component uses V/(abc)); nbtorch matches it for
    -cell input (golden 02, 03) and offers the exact construction (Setup.nanobragg_cell=False)."""
    cell = torch.tensor([70.0, 80, 90, 75, 85, 95], dtype=torch.float64)
    R = torch.eye(3, dtype=torch.float64)
    M_exact, B_exact = lattice(cell, R, nanobragg=False)
    M_nb, B_nb = lattice(cell, R, nanobragg=True)
    torch.testing.assert_close(cell_from_real(M_exact), cell, rtol=1e-12, atol=1e-10)
    got = cell_from_real(M_nb)
    torch.testing.assert_close(got[:3], cell[:3], rtol=1e-12, atol=0)  # lengths exact
    assert (got[3:] - cell[3:]).abs().max() > 1e-3  # angles off
    torch.testing.assert_close(B_exact.T @ M_exact, torch.eye(3, dtype=torch.float64))
    # orthogonal cells: both constructions agree
    cub = torch.tensor([50.0, 60, 70, 90, 90, 90], dtype=torch.float64)
    for x, y in zip(lattice(cub, R, nanobragg=False), lattice(cub, R, nanobragg=True)):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-15)
    # the golden is reproduced with the nanoBragg construction only
    with in_case_dir("02_triclinic_misset"):
        p, s = nbtorch.from_nanobragg_args(command("02_triclinic_misset"))
    s = s.replace(roi=(250, 300, 250, 300))
    assert not torch.allclose(nbtorch.simulate(p, s), nbtorch.simulate(p, s.replace(nanobragg_cell=False)), rtol=1e-4)
