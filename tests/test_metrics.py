"""Metrics against values computed by hand."""

import numpy as np
import pytest

from langmamba import metrics
from langmamba.errors import InputError


def test_psnr_and_rmse_hand_computed():
    reference = np.zeros((2, 16, 16), np.float32)  # -> 0.4 in the [-160, 240] window
    prediction = reference.copy()
    prediction[:, :8] = 40.0  # half the pixels off by 40 HU = 0.1 in window units
    # MSE = 0.5 * 0.1**2 = 0.005 -> PSNR = 10 log10(1 / 0.005)
    assert metrics.psnr(prediction, reference) == pytest.approx(10 * np.log10(200), abs=1e-9)
    assert metrics.rmse(prediction, reference) == pytest.approx(np.sqrt(0.5) * 40, abs=1e-9)
    # In the wide window the same error is 40/2000 = 0.02 -> MSE 2e-4.
    assert metrics.psnr(prediction, reference, window=(-1000, 1000)) == pytest.approx(10 * np.log10(5000), abs=1e-9)


def test_window_clipping_hides_errors_outside_window():
    reference = np.full((16, 16), 500.0)
    prediction = np.full((16, 16), 900.0)  # both above 240 HU: identical after clipping
    assert metrics.rmse(prediction, reference) == 0.0
    assert metrics.psnr(prediction, reference) == np.inf
    assert metrics.rmse(prediction, reference, window=(-1000, 1000)) == pytest.approx(400.0)


def test_psnr_averages_per_slice():
    reference = np.zeros((2, 16, 16))
    prediction = reference.copy()
    prediction[0] = 40.0  # MSE 0.01 -> 20 dB
    prediction[1] = 4.0  # MSE 1e-4 -> 40 dB
    assert metrics.psnr(prediction, reference) == pytest.approx(30.0)


def test_ssim_of_constant_images_matches_formula():
    # Constant images: variances and covariance vanish, SSIM = (2 mx my + C1) / (mx^2 + my^2 + C1).
    x, y = np.full((32, 32), -60.0), np.full((32, 32), 40.0)  # 0.25 and 0.5 in window units
    c1 = 0.01**2
    expected = (2 * 0.25 * 0.5 + c1) / (0.25**2 + 0.5**2 + c1)
    assert metrics.ssim(x, y) == pytest.approx(expected, rel=1e-12)


def test_ssim_identical_is_one_and_noise_lowers_it():
    rng = np.random.default_rng(0)
    image = rng.normal(40, 60, (64, 64))
    assert metrics.ssim(image, image) == pytest.approx(1.0)
    assert metrics.ssim(image + rng.normal(0, 30, image.shape), image) < 0.95


def test_ssim_map_is_valid_region_only():
    assert metrics.ssim_map(np.zeros((40, 50)), np.zeros((40, 50))).shape == (30, 40)


def test_mask_restricts_metrics():
    reference = np.zeros((16, 16))
    prediction = reference.copy()
    prediction[:, 8:] = 100.0
    mask = np.zeros_like(reference, dtype=bool)
    mask[:, :8] = True
    assert metrics.rmse(prediction, reference, mask=mask) == 0.0
    assert metrics.rmse(prediction, reference, mask=~mask) == pytest.approx(100.0)


def test_noise_sigma_and_cnr_hand_computed():
    hu = np.zeros((1, 4, 4))
    hu[0, 0, :] = [10, -10, 10, -10]
    lesion = np.zeros_like(hu, dtype=bool)
    lesion[0, 3, 3] = True
    hu[0, 3, 3] = 60
    background = np.zeros_like(hu, dtype=bool)
    background[0, 0, :] = True
    sigma = np.std([10, -10, 10, -10], ddof=1)
    assert metrics.noise_sigma(hu, background) == pytest.approx(sigma)
    assert metrics.cnr(hu, lesion, background) == pytest.approx(60 / sigma)


def test_body_mask_fills_lungs_and_drops_table():
    hu = np.full((64, 64), -1000.0)
    yy, xx = np.mgrid[:64, :64]
    hu[(yy - 30) ** 2 + (xx - 32) ** 2 < 20**2] = 40.0  # body
    hu[(yy - 30) ** 2 + (xx - 25) ** 2 < 5**2] = -850.0  # a lung inside it
    hu[60:62, 5:60] = 200.0  # the table: a separate, smaller object
    mask = metrics.body_mask(hu)
    assert mask.shape == hu.shape
    assert mask[30, 25] and mask[30, 32]
    assert not mask[61, 30] and not mask[0, 0]


def test_background_ring_surrounds_lesion():
    lesion = np.zeros((1, 40, 40), dtype=bool)
    lesion[0, 18:22, 18:22] = True
    ring = metrics.background_ring(lesion, inner_mm=2, outer_mm=5)
    assert ring.any() and not (ring & lesion).any()
    assert not ring[0, 20, 20] and ring[0, 20, 26] and not ring[0, 20, 35]


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(InputError, match="same shape"):
        metrics.psnr(np.zeros((8, 8)), np.zeros((8, 9)))
