"""`langmamba bench step`: whole training steps timed per phase, with an optional operator profile."""

import json

import pytest

from langmamba.bench import train_step
from langmamba.train import data as train_data
from tests.test_bench_batches import ellipse_slices


def test_bench_times_every_phase_of_the_configs_training_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_data, "load_slices", lambda config: (ellipse_slices(), None))
    config = tmp_path / "recipe.yaml"
    config.write_text(
        "model: redcnn\n"
        "data: {patch_size: 64, validation_patients: [b], validation_doses: [0.25]}\n"
        "optim: {batch_size: 2}\n"
        "redcnn: {channels: 8}\n"
    )
    drawn = []
    real_batch = train_data.TrainingData.batch

    def batch(self, size):
        drawn.append(size)
        return real_batch(self, size)

    monkeypatch.setattr(train_data.TrainingData, "batch", batch)
    argv = ["--config", str(config), "--steps", "2", "--warmup", "1", "--device", "cpu", "--profile", "5"]
    assert train_step.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[: printed.index("\n}\n") + 2])
    # Warm-up, timed and profiled steps all draw a batch of the configured size.
    assert drawn == [2] * (1 + 2 + 3)
    assert report["model"] == "redcnn" and report["batch_size"] == 2 and report["patch_size"] == 64
    phases = report["seconds_per_phase"]
    assert set(phases) == set(train_step.PHASES) and all(seconds > 0 for seconds in phases.values())
    assert report["seconds_per_step"] == pytest.approx(sum(phases.values()))
    assert "aten::" in printed[printed.index("\n}\n") :]  # the operator table follows the JSON
