"""`langmamba denoise IN_FOLDER OUT_FOLDER`: one output set per study, resume, failures, torchrun shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import _phantom, write_ct_series

from langmamba.cli import main
from langmamba.denoise import find_studies, is_study_folder
from langmamba.errors import InputError
from langmamba.explain import explanation_label_map, validate_explanation
from langmamba.io import read_volume, write_volume
from langmamba.io.volume import CTVolume

ROOT = Path(__file__).resolve().parents[1]
# A rotated, anisotropic geometry a NIfTI study must keep (columns: LPS directions of the x, y, z axes).
ROTATED = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def make_studies(root: Path, *, bad: bool = True) -> Path:
    """IN with a DICOM series ``a``, an NRRD ``b.nrrd``, a rotated NIfTI ``d.nii.gz`` and, with ``bad``,
    a sub-folder ``c`` whose only file is not DICOM."""
    studies = root / "in"
    write_ct_series(studies / "a", _phantom((3, 32, 48), seed=1), spacing=(0.8, 0.7, 2.5), origin=(-10.0, 5.0, 40.0))
    write_volume(
        CTVolume(_phantom((2, 48, 32), seed=2), spacing=(0.9, 0.6, 3.0), origin=(1.0, 2.0, 3.0)), studies / "b.nrrd"
    )
    write_volume(
        CTVolume(_phantom((2, 32, 32), seed=3), spacing=(0.7, 0.75, 2.0), origin=(-5.0, 9.0, 1.5), direction=ROTATED),
        studies / "d.nii.gz",
    )
    (studies / "notes.txt").write_text("not a study\n")
    if bad:
        (studies / "c").mkdir()
        (studies / "c" / "0001.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"broken")
    return studies


def outputs_of(out: Path) -> dict[str, Path]:
    names = [
        "a",
        "a.explanations.json",
        "a.labels.nrrd",
        "a.labels.ctbl",
        "a.report.html",
        "b.nrrd",
        "b.explanations.json",
        "b.labels.nrrd",
        "b.labels.ctbl",
        "b.report.html",
        "d.nii.gz",
        "d.explanations.json",
        "d.labels.nrrd",
        "d.labels.ctbl",
        "d.report.html",
    ]
    return {name: out / name for name in names}


def mtimes(paths) -> dict:
    return {p: p.stat().st_mtime_ns for p in paths}


def test_studies_are_found_and_named(tmp_path):
    studies = make_studies(tmp_path)
    assert [(s.name, s.path.name, s.dicom) for s in find_studies(studies)] == [
        ("a", "a", True),
        ("b", "b.nrrd", False),
        ("c", "c", True),
        ("d", "d.nii.gz", False),
    ]
    assert is_study_folder(studies) and not is_study_folder(studies / "a") and not is_study_folder(studies / "b.nrrd")
    write_volume(CTVolume(_phantom((1, 16, 16))), studies / "b.nii.gz")
    with pytest.raises(InputError, match="several studies would be named b"):
        find_studies(studies)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM series sub-folders or volume files"):
        find_studies(tmp_path / "empty")


@pytest.mark.slow
def test_folder_run_writes_every_study_survives_a_bad_one_and_resumes(tmp_path, capsys):
    studies, out = make_studies(tmp_path), tmp_path / "out"
    args = [
        "denoise",
        str(studies),
        str(out),
        "--explain",
        "--labels",
        "--report",
        "--level",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(args) == 1  # study c failed
    captured = capsys.readouterr()
    assert "3 done, 0 skipped (finished earlier), 1 failed" in captured.out
    assert "c: FAILED:" in captured.out and "failed: c:" in captured.err
    expected = outputs_of(out)
    assert all(p.exists() for p in expected.values())
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)  # nothing else: no staging left over

    # DICOM in, DICOM out: geometry, patient and study kept, a new series.
    source, denoised = read_volume(studies / "a"), read_volume(out / "a")
    assert denoised.shape == source.shape
    np.testing.assert_allclose(denoised.spacing, source.spacing, atol=1e-4)
    np.testing.assert_allclose(denoised.origin, source.origin, atol=1e-4)
    np.testing.assert_allclose(denoised.direction, source.direction, atol=1e-6)
    first = pydicom.dcmread(sorted((out / "a").iterdir())[0])
    assert first.PatientID == source.dicom.PatientID and first.StudyInstanceUID == source.dicom.StudyInstanceUID
    assert first.SeriesInstanceUID != source.dicom.SeriesInstanceUID
    # NRRD and NIfTI (rotated) in: same format and geometry out, label maps on the same grid.
    for name, label in (("b.nrrd", "b"), ("d.nii.gz", "d")):
        source, result = read_volume(studies / name), read_volume(out / name)
        labels = read_volume(out / f"{label}.labels.nrrd", check_hu=False)
        for volume in (result, labels):
            assert volume.shape == source.shape
            np.testing.assert_allclose(volume.spacing, source.spacing, atol=1e-5)
            np.testing.assert_allclose(volume.origin, source.origin, atol=1e-5)
            np.testing.assert_allclose(volume.direction, source.direction, atol=1e-6)
        assert np.abs(result.hu - source.hu).mean() > 0.5  # denoised, not copied

    # The explanations of the rotated study: valid, boxes inside the volume, voxel -> mm by its geometry.
    document = json.loads((out / "d.explanations.json").read_text())
    validate_explanation(document)
    source = read_volume(studies / "d.nii.gz")
    depth, height, width = source.shape
    for entry in document["slices"]:
        for level_entry in entry["levels"]:
            for region in level_entry["regions"]:
                box = region["bbox_voxel"]
                assert 0 <= box["x0"] < box["x1"] <= width and 0 <= box["y0"] < box["y1"] <= height
                assert 0 <= box["z"] < depth
                corners = [[box["x0"] - 0.5, box["y0"] - 0.5, box["z"]], [box["x1"] - 0.5, box["y1"] - 0.5, box["z"]]]
                np.testing.assert_allclose(region["bbox_mm"]["lps"], source.index_to_lps(np.array(corners)), atol=1e-3)
    assert "<img" in (out / "a.report.html").read_text()
    # The label map paints the explanations' level-1 top words (as explanation_label_map does from the JSON).
    expected_labels, table = explanation_label_map(document, 1, source.shape)
    np.testing.assert_array_equal(read_volume(out / "d.labels.nrrd", check_hu=False).hu, expected_labels)
    colours = [line.split() for line in (out / "d.labels.ctbl").read_text().splitlines() if line[0] != "#"]
    assert [int(row[0]) for row in colours] == [0] + [value for value, _, _ in table]

    # Rerun: the finished studies are skipped and left untouched; c fails again.
    before = mtimes(expected.values())
    assert main(args) == 1
    assert "0 done, 3 skipped (finished earlier), 1 failed" in capsys.readouterr().out
    assert mtimes(expected.values()) == before

    # An interrupted study: one output missing and a stale staging folder beside it. Only b is redone.
    (out / "b.report.html").unlink()
    stale = out / ".b.report.html.tmp-0123abcd"
    stale.mkdir()
    (stale / "b.report.html").write_text("<html>partial")
    assert main(args) == 1
    assert "1 done, 2 skipped (finished earlier), 1 failed" in capsys.readouterr().out
    assert not stale.exists() and "<img" in (out / "b.report.html").read_text()
    after = mtimes(expected.values())
    assert all(after[p] == before[p] for p in expected.values() if not p.name.startswith("b."))
    assert after[out / "b.nrrd"] > before[out / "b.nrrd"]


def test_folder_options_are_checked(tmp_path, capsys):
    studies = make_studies(tmp_path, bad=False)
    assert main(["denoise", str(studies), str(tmp_path / "out"), "--explain", "x.json", "--device", "cpu"]) == 2
    assert "takes no path when IN is a folder of studies" in capsys.readouterr().err
    assert main(["denoise", str(studies / "b.nrrd"), str(tmp_path / "o.nrrd"), "--report", "--device", "cpu"]) == 2
    assert "--report needs a file name" in capsys.readouterr().err
    assert main(["denoise", str(studies), str(tmp_path / "o.nrrd"), "--device", "cpu"]) == 2
    assert "needs an output folder" in capsys.readouterr().err
    assert main(["denoise", str(studies), str(studies / "out"), "--device", "cpu"]) == 2
    assert "input" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (studies / "out").exists()


@pytest.mark.slow
def test_torchrun_ranks_share_the_studies(tmp_path):
    studies, out = make_studies(tmp_path, bad=False), tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "langmamba",
        "denoise",
        str(studies),
        str(out),
        "--explain",
        "--device",
        "cpu",
        "--no-progress",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    done = sorted(line.split("] ")[-1].split(":")[0] for line in lines if ": done in" in line)
    assert done == ["a", "b", "d"]  # each study once
    # Studies sorted a, b, d: rank 0 takes a and d, rank 1 takes b.
    assert any(line.startswith("[rank 0] [1/2] a: done") for line in lines)
    assert any(line.startswith("[rank 1] [1/1] b: done") for line in lines)
    assert any(line.startswith("[rank 0] [2/2] d: done") for line in lines)
    assert sum("3 studies: 3 done, 0 skipped (finished earlier), 0 failed" in line for line in lines) == 1
    assert all(
        (out / name).exists()
        for name in ("a", "b.nrrd", "d.nii.gz", "a.explanations.json", "b.explanations.json", "d.explanations.json")
    )
