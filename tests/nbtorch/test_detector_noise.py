"""noisify's detector terms: off by default (nanoBragg's noise image exactly), each term with its stated statistics,
the Gaussian–Poisson variance gain²·E + σ_r² that refinement's likelihood assumes, determinism for a seed, and
errors naming the flag."""
from __future__ import annotations

import numpy as np
import pytest

from nbtorch.noise import DetectorNoise, detector_adu, poisson_noise

SHAPE = (200, 500)  # 10⁵ pixels


def test_ideal_detector_is_nanobraggs_noise_image():
    img = np.random.default_rng(0).uniform(0, 50, (30, 40)).astype(np.float32)
    adu, photons = detector_adu(img, seed=7)
    counts = poisson_noise(img, seed=7)
    np.testing.assert_array_equal(adu, counts)
    assert photons == counts.sum() and DetectorNoise().is_ideal


def test_gaussian_poisson_variance_and_determinism():
    img = np.full(SHAPE, 100.0, dtype=np.float32)
    noise = DetectorNoise(gain=2.0, readout_adu=3.0)
    adu, _ = detector_adu(img, seed=11, noise=noise)
    assert adu.mean() == pytest.approx(200.0, rel=2e-3)
    assert adu.var() == pytest.approx(2.0 ** 2 * 100.0 + 3.0 ** 2, rel=0.02)
    np.testing.assert_array_equal(adu, detector_adu(img, seed=11, noise=noise)[0])
    assert not np.array_equal(adu, detector_adu(img, seed=12, noise=noise)[0])
    zero, photons = detector_adu(np.zeros(SHAPE, np.float32), seed=3, noise=DetectorNoise(readout_adu=3.0))
    assert photons == 0 and zero.std() == pytest.approx(3.0, rel=0.02) and abs(zero.mean()) < 0.05


def test_calibration_error_is_static_per_pixel_and_flicker_is_one_factor_per_image():
    img = np.full((50, 60), 1e8, dtype=np.float32)  # counting noise 1e-4: the fractional terms dominate
    cal = DetectorNoise(calibration=0.05)
    a, b = (detector_adu(img, seed=s, noise=cal)[0] / 1e8 for s in (1, 2))
    np.testing.assert_allclose(a, b, rtol=1e-3)  # the same pixel errors in every image
    assert (a - 1).std() == pytest.approx(0.05, rel=0.1)
    other = detector_adu(img, seed=1, noise=cal._replace(calib_seed=5))[0] / 1e8
    assert np.corrcoef((a - 1).ravel(), (other - 1).ravel())[0, 1] < 0.1
    factors = []
    for seed in range(40):
        f = detector_adu(img, seed=seed, noise=DetectorNoise(flicker=0.1))[0] / 1e8
        assert f.std() < 1e-3  # one factor for the whole image
        factors.append(f.mean())
    assert 0.06 < np.std(factors) < 0.14


def test_roi_and_mask_pixels_stay_zero():
    img = np.full((6, 8), 10.0, dtype=np.float32)
    mask = np.ones((6, 8), np.uint8)
    mask[2, 3] = 0
    adu, _ = detector_adu(img, seed=1, noise=DetectorNoise(readout_adu=2.0), roi=(1, 6, 0, 4), mask=mask)
    assert adu[2, 3] == 0 and (adu[5] == 0).all() and (adu[:, 0] == 0).all() and (adu[:, 7] == 0).all()


@pytest.mark.parametrize("field, value, message", [
    ("gain", 0.0, r"-gain must be a finite number > 0, got 0"),
    ("readout_adu", -1.0, r"-readout_noise must be a finite number >= 0"),
    ("flicker", 1.5, r"-flicker must be a finite number in \[0, 1\)"),
    ("calibration", float("nan"), r"-calibration must be a finite number in \[0, 1\)"),
])
def test_bad_noise_settings_name_the_flag(field, value, message):
    with pytest.raises(ValueError, match=message):
        detector_adu(np.ones((2, 2), np.float32), seed=1, noise=DetectorNoise(**{field: value}))
