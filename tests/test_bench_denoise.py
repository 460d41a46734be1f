"""`langmamba bench denoise`: the end-to-end pipeline measured in a fresh process (tiny volume)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from langmamba.bench.denoise import summarise, synthetic_volume
from langmamba.cli import main
from langmamba.io import read_volume
from langmamba.sample_data import sample_path


def test_synthetic_volume_tiles_real_slices_back_and_forth():
    source = read_volume(sample_path("lung1"))
    depth, height, width = source.shape
    volume = synthetic_volume(2 * depth + 1, size=64, noise_hu=0.0)
    assert volume.shape == (2 * depth + 1, 64, 64) and volume.hu.dtype == np.float32
    crop = source.hu[:, (height - 64) // 2 : (height + 64) // 2, (width - 64) // 2 : (width + 64) // 2]
    for z, k in ((0, 0), (depth - 1, depth - 1), (depth, depth - 1), (2 * depth - 1, 0), (2 * depth, 0)):
        np.testing.assert_array_equal(volume.hu[z], np.rint(crop[k]))
    noisy = synthetic_volume(2, size=64, noise_hu=25.0)
    assert 20 < np.std(noisy.hu - volume.hu[:2]) < 30


@pytest.mark.slow
def test_bench_runs_the_pipeline_and_reports(tmp_path, capsys):
    assert (
        main(
            [
                "bench",
                "denoise",
                "--slices",
                "3",
                "--size",
                "64",
                "--device",
                "cpu",
                "--batch-size",
                "2",
                "--format",
                "nrrd",
                "--labels",
                "--runs",
                "2",
                "--workdir",
                str(tmp_path),
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["shape"] == [3, 64, 64] and result["device"] == "cpu"
    assert result["runs"] == 2 and result["first_run_total_s"] > 0
    seconds = result["seconds"]
    assert set(seconds) == {"read", "denoise", "explain", "write", "total"}
    assert seconds["total"] >= seconds["denoise"] + seconds["explain"] > 0
    assert 0 < result["io_share"] < 1 and 0 < result["compute_share"] <= 1
    assert result["io_share"] + result["compute_share"] <= 1.0001
    assert result["s_per_slice"] == pytest.approx(seconds["total"] / 3, rel=1e-2)
    assert result["peak_rss_gb"] >= result["peak_rss_model_loaded_gb"] > 0
    assert result["gflops_per_slice"]["denoise"] > 0 and result["gflops_per_slice"]["explain"] > 0
    assert result["achieved_tflops"] > 0 and result["model_flops_utilisation"] is None  # no peak on a CPU
    assert list(tmp_path.iterdir()) == []  # the temporary volumes are removed


def test_summary_arithmetic():
    measured = {
        "device": "cuda:0",
        "device_name": "test",
        "torch_threads": 1,
        "shape": [100, 512, 512],
        "timings_s": {"read": 1.0, "denoise": 4.0, "explain": 4.0, "write": 1.0},
        "total_s": 10.0,
        "first_total_s": 30.0,
        "runs": 2,
        "peak_rss_bytes": 3e9,
        "peak_rss_model_loaded_bytes": 1e9,
        "flops_per_slice": {"denoise": 3e10, "explain": 5e10},
    }
    result = summarise(measured, source="x", batch_size=4, explain=True, labels=False, report=False, peak_tflops=1.0)
    assert (result["slices_per_s"], result["s_per_slice"]) == (10.0, 0.1)
    assert (result["runs"], result["first_run_total_s"]) == (2, 30.0)
    assert (result["io_share"], result["compute_share"]) == (0.2, 0.8)
    assert result["achieved_tflops"] == pytest.approx(8e10 * 100 / 8.0 / 1e12)
    assert result["denoise_tflops"] == pytest.approx(3e10 * 100 / 4.0 / 1e12)
    assert result["model_flops_utilisation"] == pytest.approx(1.0, abs=1e-4)
    no_explain = summarise(
        measured, source="x", batch_size=4, explain=False, labels=False, report=False, peak_tflops=1.0
    )
    assert no_explain["achieved_tflops"] == pytest.approx(3e10 * 100 / 8.0 / 1e12)
