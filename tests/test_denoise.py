"""`langmamba denoise` with the shipped weights on small real and synthetic volumes."""

import json

import numpy as np
import pytest

from langmamba import workers
from langmamba.checkpoint import load_checkpoint
from langmamba.cli import main
from langmamba.errors import ConfigError
from langmamba.io import read_volume, write_volume
from langmamba.job import DenoiseJob, JobOutputs
from langmamba.runtime import default_weights


@pytest.mark.slow
def test_dicom_in_dicom_out_with_explanations(dicom_ct_series, tmp_path, capsys):
    folder, volume = dicom_ct_series
    out, explain, labels = tmp_path / "denoised", tmp_path / "e.json", tmp_path / "labels.nrrd"
    assert (
        main(
            [
                "denoise",
                str(folder),
                str(out),
                "--explain",
                str(explain),
                "--labels",
                str(labels),
                "--level",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    source, denoised = read_volume(folder), read_volume(out)
    assert denoised.shape == source.shape
    np.testing.assert_allclose(denoised.origin, source.origin, atol=1e-4)
    np.testing.assert_allclose(denoised.spacing, source.spacing, atol=1e-4)
    assert denoised.dicom.SeriesInstanceUID != source.dicom.SeriesInstanceUID
    assert denoised.dicom.StudyInstanceUID == source.dicom.StudyInstanceUID
    assert "LangMamba" in denoised.dicom.SeriesDescription
    document = json.loads(explain.read_text())
    assert document["schema"] == "langmamba-explanations" and len(document["slices"]) == source.shape[0]
    label_map = read_volume(labels, check_hu=False)
    assert label_map.shape == source.shape and label_map.hu.max() > 0
    assert (tmp_path / "labels.ctbl").read_text().strip()


@pytest.mark.slow
def test_worker_processes_give_the_same_outputs(dicom_ct_series, tmp_path, worker_processes):
    """With workers the series is read, written (during the explanations) and explained by other processes."""
    folder, _ = dicom_ct_series
    outputs = {}
    job = DenoiseJob(load_checkpoint(default_weights()), device="cpu")
    for mode in ("workers", "in process"):
        if mode == "in process":
            workers.configure(0)
        out = tmp_path / mode
        result = job.run(folder, JobOutputs(out / "denoised", out / "e.json", out / "labels.nrrd"))
        written = result.written
        assert set(written) == {"denoised", "explanations", "label map", "colour table"}
        assert set(result.timings) == {"read", "denoise", "explain", "write"}
        outputs[mode] = (
            read_volume(written["denoised"]),
            (out / "e.json").read_text(),
            read_volume(written["label map"], check_hu=False).hu,
        )
    (parallel, parallel_text, parallel_labels), (serial, serial_text, serial_labels) = outputs.values()
    np.testing.assert_array_equal(parallel.hu, serial.hu)
    np.testing.assert_array_equal(parallel_labels, serial_labels)
    assert json.loads(parallel_text) == json.loads(serial_text)


@pytest.mark.slow
def test_blend_zero_returns_the_input(tmp_path, tiny_ct_volume):
    source = write_volume(tiny_ct_volume, tmp_path / "in.nrrd")
    assert main(["denoise", str(source), str(tmp_path / "out.nrrd"), "--blend", "0", "--device", "cpu"]) == 0
    np.testing.assert_allclose(read_volume(tmp_path / "out.nrrd").hu, read_volume(source).hu, atol=1e-3)


@pytest.mark.slow
def test_bad_blend_and_overwriting_the_input_are_refused(tmp_path, tiny_ct_volume, capsys):
    source = write_volume(tiny_ct_volume, tmp_path / "in.nrrd")
    assert main(["denoise", str(source), str(tmp_path / "o.nrrd"), "--blend", "2", "--device", "cpu"]) == 2
    assert "blend" in capsys.readouterr().err
    assert main(["denoise", str(source), str(source), "--device", "cpu"]) == 2
    assert "input" in capsys.readouterr().err


@pytest.mark.slow
def test_denoising_lowers_noise_on_real_ct(tmp_path):
    from langmamba.infer import denoise_ct_volume
    from langmamba.sample_data import sample_path
    from langmamba.simulate import simulate_volume

    normal = read_volume(sample_path("lung1"))
    normal = normal.with_hu(normal.hu[24:25])
    low = simulate_volume(normal, dose=0.25, seed=1, device="cpu")
    denoised = denoise_ct_volume(load_checkpoint(default_weights()), low, device="cpu")
    body = normal.hu > -300
    assert np.std((denoised.hu - normal.hu)[body]) < np.std((low.hu - normal.hu)[body])
    with pytest.raises(ConfigError):
        denoise_ct_volume(load_checkpoint(default_weights()), low, blend=-1)


def test_slices_are_blended_and_masked_batch_by_batch_into_one_buffer():
    import torch

    from langmamba.infer import denoise_hu_array
    from langmamba.normalization import hu_to_model, model_to_hu

    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    hu = np.random.default_rng(0).normal(0.0, 400.0, size=(5, 24, 20)).astype(np.float32)
    hu[1, 3, 4], hu[3, 0, 0] = 2500.0, -1500.0  # outside the model's range: kept as they are
    with torch.no_grad():
        full = model_to_hu(model(torch.from_numpy(hu_to_model(hu))[:, None])[:, 0].numpy())
    outside = (hu < -1000) | (hu > 2000)
    full[outside] = hu[outside]
    expected = 0.3 * full + 0.7 * hu
    by_two = denoise_hu_array(model, hu, batch_size=2, device="cpu", blend=0.3)
    np.testing.assert_allclose(by_two, expected, atol=1e-3)
    assert by_two[1, 3, 4] == pytest.approx(2500.0) and by_two[3, 0, 0] == pytest.approx(-1500.0)
    in_place = hu.copy()
    assert denoise_hu_array(model, in_place, batch_size=3, device="cpu", blend=0.3, out=in_place) is in_place
    np.testing.assert_allclose(in_place, expected, atol=1e-3)
    with pytest.raises(ConfigError, match="out must be float32"):
        denoise_hu_array(model, hu, device="cpu", out=np.empty((5, 24, 20), dtype=np.float64))
    with pytest.raises(ConfigError, match="batch size"):
        denoise_hu_array(model, hu, device="cpu", batch_size=0)


@pytest.mark.slow
def test_report_option_writes_one_html_file(tmp_path, tiny_ct_volume, capsys):
    source = write_volume(tiny_ct_volume, tmp_path / "in.nrrd")
    assert (
        main(
            [
                "denoise",
                str(source),
                str(tmp_path / "out.nrrd"),
                "--report",
                str(tmp_path / "r.html"),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "report: " in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nrrd", "out.nrrd", "r.html"]
    assert (tmp_path / "r.html").read_text().count("data:image/png;base64,") >= 2


def test_job_stops_on_request_while_explaining_and_leaves_no_explanations(tmp_path, tiny_ct_volume):
    from langmamba.errors import CancelledError

    source = write_volume(tiny_ct_volume, tmp_path / "in.nrrd")
    batches = []

    def should_stop():  # asked once per denoiser batch, after denoising, then once per explained batch
        batches.append(1)
        return len(batches) > tiny_ct_volume.shape[0] + 2

    job = DenoiseJob(load_checkpoint(default_weights()), device="cpu", batch_size=2)
    with pytest.raises(CancelledError, match="while explaining"):
        job.run(source, JobOutputs(tmp_path / "out.nrrd", tmp_path / "e.json"), should_stop=should_stop)
    assert not (tmp_path / "e.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".e.json")) == []


def test_job_refuses_a_label_level_it_does_not_explain_and_keeps_float32_when_asked(tmp_path, tiny_ct_volume):
    source = write_volume(tiny_ct_volume, tmp_path / "in.nrrd")
    model = load_checkpoint(default_weights())
    with pytest.raises(ConfigError, match="not among the explained levels"):
        DenoiseJob(model, device="cpu", explain_levels=(0,), level=2).run(
            source, JobOutputs(tmp_path / "out.nrrd", labels=tmp_path / "labels.nrrd")
        )
    assert not (tmp_path / "out.nrrd").exists()
    import SimpleITK as sitk

    for float32, pixel in ((False, sitk.sitkInt16), (True, sitk.sitkFloat32)):
        out = tmp_path / f"float32-{float32}.nrrd"
        result = DenoiseJob(model, device="cpu", blend=0.0, float32=float32).run(source, JobOutputs(out))
        assert result.written == {"denoised": out} and result.explanation is None
        assert sitk.ReadImage(str(out)).GetPixelID() == pixel  # blend 0: the integer input itself
        np.testing.assert_array_equal(read_volume(out).hu, tiny_ct_volume.hu)


@pytest.mark.slow
def test_flip_averaging_switch_averages_the_model_over_flips(tmp_path, tiny_ct_volume):
    from langmamba.infer import denoise_hu_array

    source = write_volume(tiny_ct_volume, tmp_path / "in.nrrd")
    common = [str(source), "--device", "cpu", "--no-progress"]
    assert main(["denoise", common[0], str(tmp_path / "plain.nrrd"), *common[1:]]) == 0
    out, report = tmp_path / "tta.nrrd", tmp_path / "tta.html"
    assert main(["denoise", common[0], str(out), *common[1:], "--tta", "--report", str(report)]) == 0
    model = load_checkpoint(default_weights())
    expected = denoise_hu_array(model, read_volume(source).hu, device="cpu", batch_size=1, tta=True)
    averaged, plain = read_volume(out).hu, read_volume(tmp_path / "plain.nrrd").hu
    np.testing.assert_allclose(averaged, expected, atol=0.05)
    assert np.abs(averaged - plain).max() > 0.5  # the switch reached the model
    assert "8 flips/rotations" in report.read_text()
