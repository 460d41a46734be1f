"""`langmamba bench batches`: the training data pipeline timed with and without its appearance augmentation."""

import json

import numpy as np
import pytest

from langmamba.bench import batches
from langmamba.data import CTSlice
from langmamba.train import data as train_data


def ellipse_slices() -> list[CTSlice]:
    """Three 96² slices of a water ellipse in air, two of patient a and one of b."""
    y, x = np.mgrid[:96, :96] - 47.5
    body = np.where((x / 40) ** 2 + (y / 34) ** 2 <= 1, 40.0, -1000.0).astype(np.float32)
    return [CTSlice(full=body.copy(), spacing_mm=(1.5, 1.5), patient=name) for name in ("a", "a", "b")]


def test_bench_times_both_variants_of_the_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_data, "load_slices", lambda config: (ellipse_slices(), None))
    config = tmp_path / "recipe.yaml"
    config.write_text(
        "model: redcnn\n"
        "data: {patch_size: 64, zoom: [1.5, 1.5], soften_probability: 1.0, soften_sigma_mm: [1.0, 2.0],\n"
        "       validation_patients: [b], validation_doses: [0.25, 0.1]}\n"
        "optim: {batch_size: 4}\n"
    )
    calls = []
    real_build = train_data.TrainingData.build

    def build(config, *args, **kwargs):
        calls.append((config.zoom, config.soften_probability, list(config.validation_doses)))
        return real_build(config, *args, **kwargs)

    monkeypatch.setattr(train_data.TrainingData, "build", build)
    assert batches.main(["--config", str(config), "--batches", "2", "--warmup", "1", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    # The configured augmentation, then the same recipe without it; validation simulated at one dose only.
    assert calls == [([1.5, 1.5], 1.0, [0.25]), (None, 0.0, [0.25])]
    assert report["batch_size"] == 4 and report["patch_size"] == 64 and report["device"] == "cpu"
    for name in ("as configured", "without zoom and softening"):
        seconds = report[name]["seconds_per_batch"]
        assert seconds > 0 and report[name]["patches_per_second"] == pytest.approx(4 / seconds)
    assert report["slowdown"] == pytest.approx(
        report["as configured"]["seconds_per_batch"] / report["without zoom and softening"]["seconds_per_batch"]
    )
