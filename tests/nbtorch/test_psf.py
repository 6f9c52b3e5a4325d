"""Point-spread function: kernels conserve photons and have the requested width, the fibre profile's tail follows
g/√(g² + r²), photons spread off a panel are lost, and derivatives in the FWHM and the image are right."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nbtorch.psf import FIBER_G_PER_FWHM, GAUSS_FWHM_PER_SIGMA, apply_psf, psf_kernel, psf_radius


@pytest.mark.parametrize("kind", ["gauss", "fiber"])
def test_photons_are_conserved_away_from_panel_edges(kind):
    kernel = psf_kernel(kind, 60.0, 0.05, radius=6)
    assert kernel.shape == (13, 13) and float(kernel.min()) > 0
    torch.testing.assert_close(kernel.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(kernel, kernel.flip(0).flip(1).T, rtol=1e-12, atol=0)
    image = torch.zeros(2, 40, 50, dtype=torch.float64)
    image[:, 6:-6, 6:-6] = torch.rand(2, 28, 38, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = apply_psf(image, kernel)
    torch.testing.assert_close(out.sum((1, 2)), image.sum((1, 2)), rtol=1e-12, atol=0)
    assert float(out[:, 6:-6, 6:-6].sum()) < float(image.sum())  # it spread


def test_gaussian_width_is_the_requested_fwhm():
    fwhm, pixel = 100.0, 0.01  # µm, mm: 10 pixels across the FWHM
    k = psf_kernel("gauss", fwhm, pixel, radius=40)  # 9.4 σ: the truncated tail changes the variance < 1e-15
    marginal = k.sum(0).numpy()
    x = (np.arange(marginal.size) - marginal.size // 2) * 1000 * pixel
    var = float((marginal * x * x).sum()) - (1000 * pixel) ** 2 / 12  # pixel integration adds p²/12
    assert math.sqrt(var) * GAUSS_FWHM_PER_SIGMA == pytest.approx(fwhm, rel=1e-6)


@pytest.mark.parametrize("kind", ["gauss", "fiber"])
def test_a_single_pixel_spreads_to_the_requested_fwhm(kind):
    fwhm, pixel = 46.0, 0.001  # noisify's default FWHM on 1 µm pixels
    k = psf_kernel(kind, fwhm, pixel, radius=60)
    row = k[60].numpy()
    half = row.max() / 2
    j = int(np.nonzero(row[60:] < half)[0][0]) + 60  # first pixel right of the peak below half maximum
    crossing = (j - 1) + (row[j - 1] - half) / (row[j - 1] - row[j]) - 60
    assert 2 * crossing * 1000 * pixel == pytest.approx(fwhm, rel=0.01)


def test_fiber_tail_follows_the_profile():
    fwhm, pixel, R = 40.0, 0.002, 300
    g = FIBER_G_PER_FWHM * fwhm
    k = psf_kernel("fiber", fwhm, pixel, radius=R).numpy()
    a = (R + 0.5) * 1000 * pixel
    lost = 1 - 4 * math.atan(a * a / (g * math.sqrt(g * g + 2 * a * a))) / (2 * math.pi)  # beyond the square
    jj, ii = np.meshgrid(np.arange(-R, R + 1), np.arange(-R, R + 1))
    r_um = np.hypot(ii, jj) * 1000 * pixel
    for r in (2 * g, 5 * g, 10 * g):  # circles inside the kernel's square
        beyond = float(k[r_um > r].sum())
        assert beyond == pytest.approx((g / math.hypot(g, r) - lost) / (1 - lost), rel=0.02)


def test_default_radius_keeps_the_lost_fraction_below_the_bound():
    for kind in ("gauss", "fiber"):
        R = psf_radius(kind, 46.0, 0.075)
        assert R >= 1
    g = FIBER_G_PER_FWHM * 46.0
    R = psf_radius("fiber", 46.0, 0.075)
    assert g / math.hypot(g, (R + 0.5) * 75) < 1e-3 <= g / math.hypot(g, (R - 0.5) * 75)
    sigma = 100.0 / GAUSS_FWHM_PER_SIGMA
    R = psf_radius("gauss", 100.0, 0.01)
    assert 2 * math.erfc((R + 0.5) * 10 / (sigma * math.sqrt(2))) < 1e-3


def test_photons_spread_off_a_panel_are_lost():
    kernel = psf_kernel("gauss", 120.0, 0.05, radius=5)
    image = torch.zeros(2, 12, 12, dtype=torch.float64)
    image[0, 0, 0] = 1.0  # a corner pixel
    image[1, 7, 7] = 1.0  # inside panel 1, which has 9 × 9 pixels
    extent = torch.zeros(2, 12, 12, dtype=torch.bool)
    extent[0] = True
    extent[1, :9, :9] = True
    out = apply_psf(image, kernel, extent)
    w = kernel.sum(0)
    kept = ((1 + w[5] / w.sum()) / 2) ** 2  # the quarter plane of the pixel's spread, its own row/column halved
    torch.testing.assert_close(out[0].sum(), kept, rtol=1e-12, atol=0)
    assert float(out[1, 9:].abs().sum() + out[1, :, 9:].abs().sum()) == 0
    assert float(out[1].sum()) < 1.0


@pytest.mark.parametrize("kind", ["gauss", "fiber"])
def test_gradients_in_fwhm_and_image_match_finite_differences(kind):
    image = torch.rand(1, 6, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    fwhm = torch.tensor(70.0, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(1, 6, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def f(w, img):
        return (apply_psf(img, psf_kernel(kind, w, 0.05, radius=4)) * weights).sum()

    assert torch.autograd.gradcheck(f, (fwhm, image), eps=1e-6, atol=1e-8, rtol=1e-6)
    jf = torch.func.jacfwd(f)(fwhm.detach(), image.detach())
    h = 1e-4
    fd = (f(fwhm.detach() + h, image.detach()) - f(fwhm.detach() - h, image.detach())) / (2 * h)
    torch.testing.assert_close(jf, fd, rtol=1e-6, atol=0)
    batch = torch.func.vmap(lambda w: f(w, image.detach()))(torch.tensor([50.0, 70.0], dtype=torch.float64))
    torch.testing.assert_close(batch[1], f(fwhm.detach(), image.detach()), rtol=1e-12, atol=0)


def test_float32_blur_matches_float64():
    image = torch.rand(3, 30, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 1e4
    k = psf_kernel("fiber", 46.0, 0.075)
    out64 = apply_psf(image, k)
    out32 = apply_psf(image.float(), k.float())
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-2)


def test_bad_requests_name_the_flag():
    with pytest.raises(ValueError, match=r"-psf must be one of gauss, fiber, got 'lorentz'"):
        psf_kernel("lorentz", 40.0, 0.1)
    with pytest.raises(ValueError, match=r"-psf_fwhm must be a finite number of µm > 0, got -3"):
        psf_radius("gauss", -3.0, 0.1)
    with pytest.raises(ValueError, match=r"-psf_radius must be a whole number of pixels >= 0"):
        psf_kernel("gauss", 40.0, 0.1, radius=2.5)
    with pytest.raises(ValueError, match=r"square with an odd side"):
        apply_psf(torch.zeros(4, 4), torch.ones(2, 2))
