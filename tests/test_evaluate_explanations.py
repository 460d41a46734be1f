"""Explanation metrics on synthetic cases whose answers are known."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from langmamba.checkpoint import load_checkpoint, save_checkpoint
from langmamba.evaluate_explanations import (
    bootstrap_interval,
    erase_lesion,
    evaluate_explanations,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    fit_top_word_temperature,
    main,
    region_truth,
    top_word_bce,
    word_classes,
)
from langmamba.models.langae import LangAE
from langmamba.vlm.regions import REGION_CLASSES
from langmamba.vlm.token_codes import principal_codes
from langmamba.vlm.vocabulary import load_word_classes
from tests.old_checkpoints import old_langae, write_old_format

ROOT = Path(__file__).resolve().parent.parent


def test_expected_calibration_error_of_known_cases():
    confidence = np.full(100, 0.8)
    assert expected_calibration_error(confidence, np.arange(100) < 50) == pytest.approx(0.3)
    assert expected_calibration_error(confidence, np.arange(100) < 80) == pytest.approx(0.0)
    # Two bins, each off by 0.1, half the samples each.
    conf = np.r_[np.full(50, 0.95), np.full(50, 0.25)]
    hits = np.r_[np.arange(50) < 42, np.arange(50) < 15]
    assert expected_calibration_error(conf, hits) == pytest.approx(0.5 * 0.11 + 0.5 * 0.05)


def test_bootstrap_interval_brackets_the_ratio():
    pairs = [(i % 3, 3) for i in range(30)]
    low, high = bootstrap_interval(pairs)
    ratio = sum(p[0] for p in pairs) / sum(p[1] for p in pairs)
    assert low <= ratio <= high and high - low < 0.5
    assert all(np.isnan(bootstrap_interval([])))


def test_fit_temperature_recovers_the_sharpness_of_the_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 6, generator=g)
    labels = torch.multinomial(torch.softmax(2.5 * logits, -1), 1, generator=g)[:, 0]
    mask = F.one_hot(labels, 6).bool()
    assert fit_temperature(logits, mask) == pytest.approx(2.5, rel=0.1)


def test_top_word_temperature_makes_the_shown_probability_come_true():
    g = torch.Generator().manual_seed(0)
    logits = 0.3 * torch.randn(20000, 8, generator=g)  # far too flat: every top word reads about 1/8
    truth = torch.softmax(4.0 * logits, -1).max(-1).values  # how often the top word is really right
    correct = torch.rand(truth.shape, generator=g) < truth
    t = fit_top_word_temperature(logits, correct)
    assert t == pytest.approx(4.0, rel=0.1)
    shown = torch.softmax(t * logits, -1).max(-1).values.numpy()
    before = torch.softmax(logits, -1).max(-1).values.numpy()
    right = correct.numpy()
    assert expected_calibration_error(shown, right) < 0.02 < expected_calibration_error(before, right)
    assert top_word_bce(logits, correct, t) < top_word_bce(logits, correct, 1.0)


@pytest.mark.slow
def test_erase_lesion_fills_with_the_surrounding_tissue():
    rng = np.random.default_rng(0)
    hu = (40 + rng.normal(0, 5, (2, 64, 64))).astype(np.float32)
    hu[:, 20:40, 20:40] = 300.0
    lesion = np.zeros(hu.shape, bool)
    lesion[0, 20:40, 20:40] = True
    erased = erase_lesion(hu, lesion)
    assert abs(erased[0, 20:40, 20:40].mean() - 40) < 3
    assert np.array_equal(erased[0, :10], hu[0, :10]) and np.array_equal(erased[1], hu[1])
    assert hu[0, 30, 30] == 300.0  # the input is not modified


def _phantom(count: int = 2, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    hu = np.full((count, size, size), -1000.0, np.float32)
    hu[:, (yy - 32) ** 2 + (xx - 32) ** 2 < 28**2] = -100.0  # fat body
    hu[:, 16:32, 16:32] = -850.0  # lung
    hu[:, 32:48, 32:48] = 45.0  # soft tissue = the tumour
    lesion = np.zeros(hu.shape, bool)
    lesion[:, 32:48, 32:48] = True
    return hu, lesion


@pytest.mark.slow
def test_region_truth_of_a_phantom():
    hu, lesion = _phantom(1)
    truth = region_truth(torch.as_tensor(hu), torch.as_tensor(lesion).float(), 16, (4, 4))
    names = [[REGION_CLASSES[i] for i in row] for row in truth["dominant"][0].tolist()]
    assert names[1][1] == "lung" and names[2][2] == "soft tissue" and names[1][2] == "fat"
    assert not truth["body"][0, 0, 0] and truth["body"][0, 1, 1]
    assert truth["lesion_fraction"][0, 2, 2] == 1.0 and truth["lesion_fraction"][0, 1, 1] == 0.0


def _tiny_langae() -> LangAE:
    torch.manual_seed(0)
    classes = load_word_classes()
    codebook = F.normalize(torch.randn(len(classes), 16), dim=1)
    codes, projection = principal_codes(torch.randn(300, 16), 4, 2)
    return LangAE(
        codebook=codebook,
        vocabulary=list(classes),
        word_classes=list(classes.values()),
        detail_codebook=codes,
        detail_projection=projection,
        base_channels=8,
        channel_multipliers=(1, 1, 2),
        z_channels=8,
        quantizer="residual",
        normalize_latent=False,
        region_sizes=(4, 2, 1),
        detail_stages=2,
        detail_groups=2,
    ).eval()


@pytest.mark.slow
def test_evaluation_counts_and_known_answers():
    hu, lesion = _phantom()
    model = _tiny_langae()
    low = hu + np.random.default_rng(1).normal(0, 20, hu.shape).astype(np.float32)
    result = evaluate_explanations(model, hu, low, low.copy(), lesion)
    truth = region_truth(torch.as_tensor(hu), torch.as_tensor(lesion).float(), 4, (16, 16))
    assert result["grid"] == [16, 16] and result["region_px"] == 4 and result["level"] == 2
    assert result["tissue_agreement"]["regions"] == int(truth["body"].sum())
    dominant = truth["dominant"][truth["body"]]
    majority = np.bincount(dominant.numpy()).argmax()
    assert result["tissue_agreement"]["majority_baseline"]["class"] == REGION_CLASSES[majority] == "fat"
    assert 0 <= result["tissue_agreement"]["value"] <= 1
    tumour = truth["lesion_fraction"] >= 0.5
    assert result["lesion_grounding"]["tumour_read_as_lesion"]["regions"] == int(tumour.sum())
    # The denoised output equals the low-dose input: no gain, and the explainer flags nothing.
    assert result["stability"]["gain"]["value"] == 0.0
    assert result["change_flags"]["honest_flag_rate"]["value"] == 0.0
    assert 0 <= result["change_flags"]["erased_tumour_sensitivity"]["value"] <= 1
    assert result["reconstruction"]["rmse_body_hu_quantized"]["value"] > 0
    assert result["code_usage"]["coarse_distinct_words"] >= 1
    assert 0 < result["calibration"]["mean_top_probability"] <= 1
    json.dumps(result)


def test_word_classes_of_old_weights_come_from_the_region_vocabulary(tmp_path):
    """A v0.1 LangAE keeps no word classes: they are looked up in the packaged region vocabulary."""
    model = load_checkpoint(write_old_format(old_langae(), tmp_path / "langae"))
    assert not model.word_classes
    classes = word_classes(model)
    vocabulary = model.vocabulary
    assert classes[vocabulary.index("fat")] == "fat" and classes[vocabulary.index("ct")] is None


def test_word_classes_of_the_shipped_langae_are_its_own():
    model = load_checkpoint(ROOT / "weights" / "langae")
    assert model.word_classes and word_classes(model) == list(model.word_classes)
    assert len(word_classes(model)) == len(model.vocabulary)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["top_word", "candidates"])
def test_fit_calibration_lowers_its_loss_and_is_saved(tmp_path, objective):
    hu, lesion = _phantom()
    model = _tiny_langae()
    report = fit_calibration(model, hu, lesion, objective=objective)
    assert report["objective"] == objective and all(n > 0 for n in report["regions"])
    if objective == "top_word":
        assert all(0 <= a <= 1 for a in report["agreement"]) and len(report["ece_after"]) == len(report["regions"])
    assert all(after <= before + 1e-9 for before, after in zip(report["loss_before"], report["loss_after"]))
    assert torch.allclose(model.quantizer.calibration, torch.tensor(report["temperature"], dtype=torch.float32))
    np.savez(tmp_path / "case.npz", normal=hu, label=lesion)
    save_checkpoint(_tiny_langae(), tmp_path / "model")
    assert (
        main(
            [
                str(tmp_path / "case.npz"),
                "--model",
                str(tmp_path / "model"),
                "--device",
                "cpu",
                "--calibrate",
                str(tmp_path / "calibrated"),
                "--objective",
                objective,
            ]
        )
        == 0
    )
    calibrated = load_checkpoint(tmp_path / "calibrated")
    assert torch.allclose(calibrated.quantizer.calibration, model.quantizer.calibration, rtol=1e-3)
    assert (
        main(
            [
                str(tmp_path / "case.npz"),
                "--model",
                str(tmp_path / "calibrated"),
                "--device",
                "cpu",
                "--no-flags",
                "--output",
                str(tmp_path / "out.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "out.json").read_text())["slices"] == 2


def test_finest_words_of_the_shipped_model_are_its_finest_tokens():
    from langmamba.evaluate import finest_words
    from langmamba.normalization import hu_to_model

    model = load_checkpoint(ROOT / "weights" / "langmamba")
    hu, _ = _phantom(1)
    words = finest_words(model, hu)
    with torch.no_grad():
        langae = model.langae.float()
        out = langae.quantize(langae.encode(torch.as_tensor(hu_to_model(hu))[:, None]))
    # The residual quantizer's word is its reading of the region (its top logit), not the residual's token.
    assert np.array_equal(words, out.word_logits[-1].argmax(-1).numpy())


def test_finest_words_of_an_averaging_langae_are_its_finest_tokens():
    from langmamba.evaluate import finest_words
    from langmamba.normalization import hu_to_model

    langae = old_langae()
    hu, _ = _phantom(1)
    words = finest_words(SimpleNamespace(langae=langae), hu)
    with torch.no_grad():
        tokens = langae.quantize(langae.encode(torch.as_tensor(hu_to_model(hu))[:, None])).token_ids[-1]
    assert np.array_equal(words, tokens.numpy())


def test_evaluate_hook_adds_the_langae_reconstruction(tmp_path):
    from langmamba.evaluate import explanation_metrics

    hu, lesion = _phantom()
    model = _tiny_langae()
    save_checkpoint(model, tmp_path / "langae")
    result = explanation_metrics(tmp_path, model, hu, hu, hu, lesion, device="cpu", max_slices=2)
    assert result["command"] == f"langmamba evaluate --weights {tmp_path} --slices 2"
    assert result["reconstruction"]["checkpoint"] == "langae"
    assert result["reconstruction"]["rmse_body_hu_quantized"]["value"] > 0
    assert result["stability"]["gain"]["value"] == 0.0
