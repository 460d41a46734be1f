"""The command line as a user runs it: real files in, clear messages out."""

import json

import numpy as np
import pytest

from langmamba.cli import main
from langmamba.io import read_volume, write_volume


def test_info_describes_a_dicom_series(dicom_ct_series, capsys):
    folder, volume = dicom_ct_series
    assert main(["info", str(folder), "--json"]) == 0
    description = json.loads(capsys.readouterr().out)
    text = json.dumps(description)
    assert "CT" in text and str(volume.shape[1]) in text
    assert "PatientName" not in text


@pytest.mark.slow
def test_simulate_writes_a_noisier_scan_with_the_same_geometry(tmp_path, tiny_ct_volume, capsys):
    source = write_volume(tiny_ct_volume, tmp_path / "normal.nrrd")
    out = tmp_path / "low.nii.gz"
    assert main(["simulate", str(source), str(out), "--dose", "0.1", "--seed", "3", "--device", "cpu"]) == 0
    assert "wrote simulated 10%-dose scan" in capsys.readouterr().out
    normal, low = read_volume(source), read_volume(out)
    assert low.shape == normal.shape
    np.testing.assert_allclose(low.spacing, normal.spacing, atol=1e-4)
    np.testing.assert_allclose(low.origin, normal.origin, atol=1e-4)
    assert np.std(low.hu - normal.hu) > 1.0  # noise was added


def test_simulate_refuses_to_overwrite_and_names_the_problem(tmp_path, tiny_ct_volume, capsys):
    source = write_volume(tiny_ct_volume, tmp_path / "normal.nrrd")
    before = source.read_bytes()
    assert main(["simulate", str(source), str(source), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "error" in error and "input" in error
    assert source.read_bytes() == before


@pytest.mark.parametrize("content, expected", [(b"", "empty"), (b"not an image at all" * 10, "")])
def test_bad_input_is_one_clear_line(tmp_path, capsys, content, expected):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(content)
    assert main(["info", str(bad)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("langmamba info: error:") and "Traceback" not in error
    assert expected in error.lower()


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("info", "simulate", "train", "select-words", "bench"):
        assert command in text


@pytest.mark.slow
def test_demo_writes_volume_picture_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--slices", "1", "--output", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "lung2_dose25.json").read_text())
    assert summary["slices"] == 1 and 5 < summary["added_noise_sigma_hu_in_body"] < 40
    assert (out / "lung2_dose25.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_volume(out / "lung2_dose25.nrrd").shape[0] == 1
