"""Beam spectra: one channel is today's monochromatic image, a weighted spectrum is the weighted mean of
monochromatic images, equal weights equal nanoBragg's -sourcefile, rebinning keeps total weight and mean wavelength
and changes a still by less than the documented bound, and derivatives through a spectrum are right (eager and
compiled)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nbtorch
from nbtorch.spectrum import read_lam, rebin_spectrum, with_spectrum, write_lam

FLAGS = ("-default_F 100 -cell 40 50 60 90 90 90 -N 6 -lambda 1 -distance 60 -detpixels 40 -pixel 0.3 "
         "-misset 10 20 30 -fluence 1e30")


def _model(extra: str = ""):
    return nbtorch.from_nanobragg_args(FLAGS + " " + extra, dtype=torch.float64)


def _sase(n: int, seed: int = 0):
    """A SASE-like spectrum: spikes under a Gaussian envelope, 0.5 % wide around 1 Å."""
    rng = np.random.default_rng(seed)
    lam = np.linspace(0.9975, 1.0025, n)
    w = np.exp(-0.5 * ((lam - 1.0) / 0.001) ** 2) * rng.exponential(1.0, n)
    return lam, w


def test_one_channel_is_the_monochromatic_image():
    params, setup = _model()
    p1, s1 = with_spectrum(params, setup, [1.0], [3.7])
    assert s1.normalised_source_weights == (1.0,) and float(p1.beam.wavelength) == 1.0
    assert torch.equal(nbtorch.simulate(p1, s1, fused=False), nbtorch.simulate(params, setup, fused=False))


def test_a_spectrum_is_the_weighted_mean_of_monochromatic_images():
    params, setup = _model()
    lam, w = _sase(5, seed=3)
    ps, ss = with_spectrum(params, setup, lam, w)
    image = nbtorch.simulate(ps, ss, fused=False)
    mono = [nbtorch.simulate(params._replace(beam=params.beam._replace(wavelength=torch.tensor(x, dtype=torch.float64))),
                             setup, fused=False) for x in lam]
    expected = sum(wc * m for wc, m in zip(w, mono)) / w.sum()
    torch.testing.assert_close(image, expected, rtol=1e-10, atol=0)
    equal = nbtorch.simulate(*with_spectrum(params, setup, lam, np.ones_like(w)), fused=False)
    assert float((equal - image).abs().max()) > 1e-3 * float(image.max())  # the weights matter


def test_equal_weights_equal_nanobraggs_sourcefile(tmp_path):
    lam, _ = _sase(4)
    write_lam(tmp_path / "flat.lam", lam, np.ones_like(lam))
    got_lam, got_w = read_lam(tmp_path / "flat.lam")
    np.testing.assert_array_equal(got_lam, lam)
    src = tmp_path / "src.txt"
    src.write_text("".join(f"-10 0 0 1 {float(x) * 1e-10!r}\n" for x in lam))
    params, setup = _model()
    from_lam = nbtorch.simulate(*with_spectrum(params, setup, got_lam, got_w), fused=False)
    p2, s2 = nbtorch.from_nanobragg_args(f"{FLAGS} -lambda {float(lam.mean())!r} -sourcefile {src}", dtype=torch.float64)
    torch.testing.assert_close(from_lam, nbtorch.simulate(p2, s2, fused=False), rtol=1e-10, atol=0)


def test_rebinning_keeps_weight_and_mean_and_changes_a_still_little():
    lam, w = _sase(100, seed=1)
    lam20, w20 = rebin_spectrum(lam, w, 20)
    assert len(lam20) <= 20
    assert w20.sum() == pytest.approx(w.sum(), rel=1e-13)
    assert (lam20 * w20).sum() / w20.sum() == pytest.approx((lam * w).sum() / w.sum(), rel=1e-13)
    params, setup = _model()
    full = nbtorch.simulate(*with_spectrum(params, setup, lam, w), fused=False)
    binned = nbtorch.simulate(*with_spectrum(params, setup, lam20, w20), fused=False)
    change = float((binned - full).abs().sum() / full.sum())
    assert change < 1e-4  # the bound the module documents
    assert rebin_spectrum(lam[:3], w[:3], 20)[0].size == 3


def test_gradients_through_a_spectrum_eager_and_compiled():
    params, setup = _model("-detpixels 12")
    ps, ss = with_spectrum(params, setup, *_sase(6, seed=2))
    cell = ps.crystal.cell

    def total(c, fused):
        return nbtorch.simulate(ps._replace(crystal=ps.crystal._replace(cell=c)), ss, fused=fused).sum()

    h = 1e-5
    fd = torch.stack([(total(cell + h * e, False) - total(cell - h * e, False)) / (2 * h)
                      for e in torch.eye(6, dtype=torch.float64)])
    jac = torch.func.jacfwd(total)(cell, False)
    torch.testing.assert_close(jac, fd, rtol=1e-5, atol=1e-8 * float(fd.abs().max()))
    for fused in (True,):
        torch.testing.assert_close(torch.func.jacfwd(total)(cell, fused), jac, rtol=1e-10,
                                   atol=1e-10 * float(jac.abs().max()))
        torch.testing.assert_close(torch.func.grad(total)(cell, fused), jac, rtol=1e-10,
                                   atol=1e-10 * float(jac.abs().max()))
        torch.testing.assert_close(nbtorch.simulate(ps, ss, fused=fused), nbtorch.simulate(ps, ss, fused=False),
                                   rtol=1e-10, atol=0)


def test_bad_spectra_and_weights_are_refused(tmp_path):
    bad = tmp_path / "bad.lam"
    bad.write_text("wavelength,weight\n1.0,0.5\n1.001;0.4\n")
    with pytest.raises(ValueError, match=r"bad\.lam, line 3: expected 'wavelength,weight'"):
        read_lam(bad)
    bad.write_text("wavelength,weight\n1.0,-1\n")
    with pytest.raises(ValueError, match=r"bad\.lam: weights must be finite, >= 0 and not all 0"):
        read_lam(bad)
    with pytest.raises(ValueError, match=r"-spectrum_bins must be a whole number >= 1"):
        rebin_spectrum([1.0, 1.1], [1, 1], 0)
    params, setup = _model()
    with pytest.raises(ValueError, match=r"Setup\.source_weights must hold one weight per source \(1\), got 2"):
        setup.replace(source_weights=(1.0, 2.0))
    ps, ss = with_spectrum(params, setup, [1.0, 1.01], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"unequal weights \(a spectrum\)"):
        nbtorch.to_nanobragg_args(ps, ss)


def _shifted(params, s):
    return params._replace(beam=params.beam._replace(spectrum_shift=torch.as_tensor(s, dtype=torch.float64)))


def test_a_shift_moves_every_channel():
    params, setup = _model()
    lam, w = _sase(5, seed=4)
    ps, ss = with_spectrum(params, setup, lam, w)
    shifted = nbtorch.simulate(_shifted(ps, 0.002), ss, fused=False)
    moved = nbtorch.simulate(*with_spectrum(params, setup, lam + 0.002, w), fused=False)
    torch.testing.assert_close(shifted, moved, rtol=1e-10, atol=1e-12 * float(moved.max()))
    with pytest.raises(ValueError, match=r"params\.beam\.spectrum_shift must be > -λ0"):
        nbtorch.simulate(_shifted(ps, -1.5), ss)
    with pytest.raises(ValueError, match=r"spectrum is shifted"):
        nbtorch.to_nanobragg_args(_shifted(params, 0.001), setup)


@pytest.mark.parametrize("fused", [False, True])
def test_shift_and_stretch_derivatives_match_finite_differences(fused):
    """lam0 (spectrum_shift) and lam1 (λ0's scale) of λ' = lam0 + lam1·λ, at a shift away from 0 (where the
    moments' per-channel factors differ from 1), eager and compiled."""
    params, setup = _model("-detpixels 12")
    ps, ss = with_spectrum(params, setup, *_sase(6, seed=5))
    ps = _shifted(ps, 0.003)

    def total(v):
        beam = ps.beam._replace(wavelength=v[0], spectrum_shift=v[1])
        return nbtorch.simulate(ps._replace(beam=beam), ss, fused=fused).sum()

    v = torch.stack([ps.beam.wavelength, ps.beam.spectrum_shift])
    h = 1e-7
    fd = torch.stack([(total(v + h * e) - total(v - h * e)) / (2 * h) for e in torch.eye(2, dtype=torch.float64)])
    for got in (torch.func.jacfwd(total)(v), torch.func.grad(total)(v)):
        torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-7 * float(fd.abs().max()))
    assert float(fd.abs().min()) > 0
