"""Model-card evaluation arithmetic on a tiny constructed volume."""

import numpy as np
import pytest

from langmamba.evaluate import noise_roi, score_methods


def _phantom():
    yy, xx = np.mgrid[:48, :48]
    body = (yy - 24) ** 2 + (xx - 24) ** 2 < 20**2
    reference = np.where(body, 40.0, -1000.0)[None].repeat(2, 0)
    return reference, np.broadcast_to(body, reference.shape)


def test_scores_match_hand_computation():
    reference, body = _phantom()
    shifted = reference + 40.0 * body  # 40 HU too bright inside the body, exact outside
    scores = score_methods({"shifted": shifted, "exact": reference.copy()}, reference)
    fraction = body[0].mean()
    row = scores["window_-160_240"]["shifted"]
    # 40 HU = 0.1 of the 400 HU window: MSE = 0.01 * body fraction
    assert row["psnr"] == pytest.approx(10 * np.log10(1 / (0.01 * fraction)), abs=1e-9)
    assert row["rmse"] == pytest.approx(40 * np.sqrt(fraction), abs=1e-9)
    wide = scores["window_-1000_1000"]["shifted"]
    assert wide["psnr"] == pytest.approx(10 * np.log10(1 / (0.0004 * fraction)), abs=1e-9)
    assert scores["window_-160_240"]["exact"]["psnr"] == np.inf
    assert scores["window_-160_240"]["exact"]["ssim"] == pytest.approx(1.0)
    # a constant shift adds no noise inside the uniform ROI
    assert scores["noise_sigma_hu"]["shifted"] == pytest.approx(0.0, abs=1e-9)


def test_noise_sigma_and_lesion_cnr():
    reference, body = _phantom()
    rng = np.random.default_rng(1)
    noisy = reference + rng.normal(0, 10, reference.shape) * body
    lesion = np.zeros(reference.shape, bool)
    lesion[:, 22:27, 22:27] = True
    reference[lesion] = 100.0
    noisy[lesion] += 60.0
    scores = score_methods({"noisy": noisy}, reference, label=lesion, spacing_mm=(1.0, 1.0))
    assert scores["noise_sigma_hu"]["ndct"] == pytest.approx(0.0, abs=1e-9)
    assert scores["noise_sigma_hu"]["noisy"] == pytest.approx(10.0, rel=0.25)
    # background = the dense part of the ring (the lesion sits in soft tissue), σ = 10 HU there
    assert scores["lesion_cnr"]["noisy"] == pytest.approx(60 / 10, rel=0.3)
    assert scores["lesion_cnr"]["ndct"] == np.inf


def test_noise_roi_is_uniform_soft_tissue_inside_the_body():
    reference, body = _phantom()
    roi = noise_roi(reference, body)
    assert roi.any() and not (roi & ~body).any()
    assert np.all(reference[roi] == 40.0)


def test_lung_lesion_background_is_lung_only():
    reference, body = _phantom()
    yy, xx = np.mgrid[:48, :48]
    lung = ((yy - 24) ** 2 + (xx - 24) ** 2 < 12**2)[None].repeat(2, 0)
    reference[lung] = -850.0
    lesion = np.zeros(reference.shape, bool)
    lesion[:, 22:27, 22:27] = True
    reference[lesion] = 30.0
    rng = np.random.default_rng(2)
    noisy = reference + rng.normal(0, 20, reference.shape) * body
    scores = score_methods({"noisy": noisy}, reference, label=lesion)
    # the ring lies in lung: contrast 880 HU over σ 20 HU
    assert scores["lesion_cnr"]["noisy"] == pytest.approx(880 / 20, rel=0.2)


def test_markdown_table_lists_every_method():
    from langmamba.evaluate import METHOD_ORDER, markdown_table

    reference, body = _phantom()
    outputs = {name: reference + 10.0 * i * body for i, name in enumerate(METHOD_ORDER)}
    scores = score_methods(outputs, reference)
    table = markdown_table(scores)
    assert table.count("\n") == len(METHOD_ORDER) + 2
    assert "RED-CNN" in table and "LangMamba w/o LangDA" in table
