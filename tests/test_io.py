"""langmamba.io: reading, writing and describing CT volumes, and every kind of bad input."""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import matplotlib
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.data.data_manager import DataTypes
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import BasicTextSRStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from langmamba.errors import (
    CorruptFileError,
    EmptyInputError,
    InputError,
    IrregularSpacingError,
    MixedSeriesError,
    NonFiniteVoxelsError,
    NotAnImageError,
    NotCTError,
    OverwriteError,
    UnsupportedFormatError,
    UnsupportedImageError,
)
from langmamba.io import AIR_HU, CTVolume, describe_volume, dicom_write, read_volume, write_labels, write_volume

matplotlib.use("Agg")

GEOMETRY_TOLERANCE_MM = 1e-4


def pydicom_file(name: str) -> str:
    """Path of a pydicom or pydicom-data test file, without network access."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pkg_resources deprecation, raised inside pydicom
            path = get_testdata_file(name, download=False)
    except ModuleNotFoundError:
        # pydicom 2.4 looks up pydicom-data through pkg_resources, which setuptools>=81 no longer ships.
        path = None
    if path is None:
        from data_store import DataStore

        path = DataStore().get_path(name, dtype=DataTypes.DATASET)
    return str(path)


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """A right-handed rotation matrix (degrees about x, then y, then z)."""
    ax, ay, az = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture
def oblique_volume() -> CTVolume:
    """64 columns × 80 rows × 5 slices, integer HU from -1024 to 3071, oblique right-handed axes."""
    hu = np.random.default_rng(3).integers(-1024, 3072, size=(5, 80, 64)).astype(np.float32)
    return CTVolume(
        hu=hu,
        spacing=(0.703125, 0.8134567, 2.5),
        origin=(-201.123456, -180.987654, 1234.56789),
        direction=rotation(20.0, -15.0, 35.0),
    )


def assert_same_geometry(a: CTVolume, b: CTVolume) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=GEOMETRY_TOLERANCE_MM, rtol=0)
    np.testing.assert_allclose(a.origin, b.origin, atol=GEOMETRY_TOLERANCE_MM, rtol=0)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.nrrd", "ct.nhdr", "ct.mha", "ct.mhd"])
@pytest.mark.parametrize("handedness", [1, -1])
def test_file_formats_round_trip(tmp_path, oblique_volume, name, handedness):
    direction = oblique_volume.direction.copy()
    direction[:, 2] *= handedness
    volume = CTVolume(oblique_volume.hu, oblique_volume.spacing, oblique_volume.origin, direction)
    written = write_volume(volume, tmp_path / name)
    assert written == tmp_path / name
    back = read_volume(written)
    assert back.hu.dtype == np.float32
    assert_same_geometry(back, volume)
    np.testing.assert_array_equal(back.hu, volume.hu)
    assert back.source == str(written) and back.dicom is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_non_integer_hu_round_trip_as_float(tmp_path, tiny_ct_volume):
    volume = tiny_ct_volume.with_hu(tiny_ct_volume.hu + 0.25)
    back = read_volume(write_volume(volume, tmp_path / "float.nii.gz"))
    np.testing.assert_array_equal(back.hu, volume.hu)
    assert nib.load(tmp_path / "float.nii.gz").get_data_dtype() == np.float32
    assert nib.load(write_volume(tiny_ct_volume, tmp_path / "int.nii.gz")).get_data_dtype() == np.int16


def test_nifti_is_read_from_the_named_file_only(tmp_path, tiny_ct_volume):
    """ITK's NIfTI library opens x.nii when asked for x.nii.gz if both exist; nibabel does not."""
    write_volume(tiny_ct_volume, tmp_path / "x.nii.gz")
    write_volume(tiny_ct_volume.with_hu(tiny_ct_volume.hu + 7), tmp_path / "x.nii")
    np.testing.assert_array_equal(read_volume(tmp_path / "x.nii.gz").hu, tiny_ct_volume.hu)


def test_dicom_round_trip_oblique_non_square(tmp_path, oblique_volume):
    folder = write_volume(oblique_volume, str(tmp_path / "out") + "/")
    assert folder == tmp_path / "out" and folder.is_dir()
    files = sorted(folder.iterdir())
    assert len(files) == oblique_volume.shape[0]
    back = read_volume(folder)
    assert_same_geometry(back, oblique_volume)
    np.testing.assert_array_equal(back.hu, oblique_volume.hu)

    headers = [pydicom.dcmread(f) for f in files]
    first = headers[0]
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert first.SOPClassUID == pydicom.uid.CTImageStorage == first.file_meta.MediaStorageSOPClassUID
    assert list(first.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert first.SeriesDescription == "LangMamba denoised" and "LangMamba" in first.DerivationDescription
    assert str(first.PatientName) == "Anonymous" and first.StudyInstanceUID
    assert first.RescaleSlope == 1 and first.pixel_array.dtype == np.int16
    assert len({h.SOPInstanceUID for h in headers}) == len(files)
    assert {h.SeriesInstanceUID for h in headers} == {first.SeriesInstanceUID}
    assert sorted(int(h.InstanceNumber) for h in headers) == list(range(1, len(files) + 1))
    assert float(first.SpacingBetweenSlices) == pytest.approx(2.5)

    # SimpleITK (GDCM) reads the series with the same geometry and values.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), oblique_volume.hu)
    np.testing.assert_allclose(image.GetOrigin(), oblique_volume.origin, atol=GEOMETRY_TOLERANCE_MM)
    np.testing.assert_allclose(image.GetSpacing(), oblique_volume.spacing, atol=GEOMETRY_TOLERANCE_MM)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), oblique_volume.direction, atol=1e-6)


def test_dicom_output_keeps_patient_and_references_source(tmp_path, dicom_ct_series):
    folder, expected = dicom_ct_series
    source = read_volume(folder)
    denoised = source.with_hu(source.hu + 1)
    out = write_volume(denoised, tmp_path / "denoised", series_description="test output", derived_from=source)
    back = read_volume(out)
    np.testing.assert_array_equal(back.hu, expected.hu + 1)
    assert_same_geometry(back, expected)

    source_files = {pydicom.dcmread(p).ImagePositionPatient[2]: pydicom.dcmread(p) for p in folder.iterdir()}
    for path in out.iterdir():
        ds = pydicom.dcmread(path)
        assert ds.PatientID == "PHANTOM01" and ds.StudyInstanceUID == source.dicom.StudyInstanceUID
        assert ds.FrameOfReferenceUID == source.dicom.FrameOfReferenceUID
        assert ds.SeriesInstanceUID != source.dicom.SeriesInstanceUID
        assert int(ds.SeriesNumber) != int(source.dicom.SeriesNumber)
        assert ds.SeriesDescription == "test output"
        original = source_files[ds.ImagePositionPatient[2]]
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
        reference = ds.ReferencedSeriesSequence[0]
        assert reference.SeriesInstanceUID == original.SeriesInstanceUID
        assert reference.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID


def test_dicom_intercept_keeps_hu_beyond_int16(tmp_path, tiny_ct_volume):
    hu = tiny_ct_volume.hu.copy()
    hu[0, 0, :4] = [40000, 50000, 33000, 32768]
    volume = tiny_ct_volume.with_hu(hu)
    np.testing.assert_array_equal(read_volume(write_volume(volume, tmp_path / "big")).hu, hu)


def test_dicom_rounds_fractional_hu(tmp_path, tiny_ct_volume):
    volume = tiny_ct_volume.with_hu(tiny_ct_volume.hu + 0.4)
    back = read_volume(write_volume(volume, tmp_path / "frac"))
    np.testing.assert_array_equal(back.hu, tiny_ct_volume.hu)


# --------------------------------------------------------------------------------------------- DICOM reading


def test_unsorted_slices_are_ordered_by_position(tmp_path, dicom_series_writer, oblique_volume):
    folder = tmp_path / "shuffled"
    paths = dicom_series_writer(
        folder,
        oblique_volume.hu,
        spacing=oblique_volume.spacing,
        origin=oblique_volume.origin,
        direction=oblique_volume.direction,
        shuffle=True,
    )
    numbers = [int(pydicom.dcmread(p).InstanceNumber) for p in paths]
    assert numbers != sorted(numbers) and [p.name for p in paths] != sorted(p.name for p in paths)
    volume = read_volume(folder)
    np.testing.assert_array_equal(volume.hu, oblique_volume.hu)
    assert_same_geometry(volume, oblique_volume)
    assert volume.dicom.SOPInstanceUID == pydicom.dcmread(paths[0]).SOPInstanceUID
    assert "PixelData" not in volume.dicom and volume.dicom.Modality == "CT"


def test_series_folder_ignores_other_files(dicom_ct_series):
    folder, expected = dicom_ct_series
    (folder / "README.txt").write_text("exported by a viewer")
    sr = _structured_report()
    sr.StudyInstanceUID = pydicom.dcmread(next(folder.glob("*.dcm"))).StudyInstanceUID
    pydicom.dcmwrite(str(folder / "report.dcm"), sr, write_like_original=False)
    volume = read_volume(folder)
    np.testing.assert_array_equal(volume.hu, expected.hu)
    assert volume.source == str(folder)


def test_pixel_padding_becomes_air(tmp_path, dicom_series_writer, tiny_ct_volume):
    pad = np.zeros(tiny_ct_volume.shape, dtype=bool)
    pad[:, :3, :] = True
    dicom_series_writer(tmp_path / "pad", tiny_ct_volume.hu, pad_mask=pad, padding_value=-2000)
    volume = read_volume(tmp_path / "pad")
    assert np.all(volume.hu[pad] == AIR_HU)
    np.testing.assert_array_equal(volume.hu[~pad], tiny_ct_volume.hu[~pad])


def test_pydicom_ct_small():
    path = pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    volume = read_volume(path)
    assert volume.shape == (1, 128, 128)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.hu[0], expected)
    np.testing.assert_allclose(volume.origin, [float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(volume.spacing[:2], [float(v) for v in ds.PixelSpacing[::-1]])


def test_pydicom_jpeg2000_matches_uncompressed():
    """693_J2KR is 693_UNCR (a 512×512 CT slice with PixelPaddingValue -2000) in lossless JPEG 2000."""
    raw = pydicom.dcmread(pydicom_file("693_UNCR.dcm"))
    plain, j2k = read_volume(pydicom_file("693_UNCR.dcm")), read_volume(pydicom_file("693_J2KR.dcm"))
    np.testing.assert_array_equal(j2k.hu, plain.hu)
    padded = raw.pixel_array == -2000
    assert padded.any() and np.all(plain.hu[0][padded] == AIR_HU)
    np.testing.assert_array_equal(plain.hu[0][~padded], raw.pixel_array[~padded] - 1024.0)


@pytest.mark.parametrize(
    ("name", "syntax"),
    [("explicit_VR-UN.dcm", pydicom.uid.JPEG2000Lossless), ("bad_sequence.dcm", pydicom.uid.JPEGLosslessSV1)],
)
def test_pydicom_compressed_ct_matches_gdcm(name, syntax):
    """Decoded HU and geometry agree with SimpleITK's own (GDCM) decoder."""
    path = pydicom_file(name)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    volume = read_volume(path)
    image = sitk.ReadImage(path)
    assert volume.shape == (1, 512, 512)
    np.testing.assert_array_equal(volume.hu, sitk.GetArrayFromImage(image).astype(np.float32))
    np.testing.assert_allclose(volume.origin, image.GetOrigin(), atol=GEOMETRY_TOLERANCE_MM)
    np.testing.assert_allclose(volume.direction.flatten(), image.GetDirection(), atol=1e-6)
    assert -1100 < volume.hu.min() < -900  # air in HU


def _enhanced_ct(path: Path, volume: CTVolume, frame_order: list[int], intercepts: list[float]) -> None:
    """An Enhanced CT Image Storage object whose frames are stored in ``frame_order``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", generate_uid(), generate_uid()
    ds.NumberOfFrames = len(frame_order)
    ds.Rows, ds.Columns = volume.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    measures, orientation = Dataset(), Dataset()
    measures.PixelSpacing = [volume.spacing[1], volume.spacing[0]]
    measures.SliceThickness = volume.spacing[2]
    orientation.ImageOrientationPatient = list(volume.direction[:, :2].T.flatten())
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, stored = [], []
    for k, intercept in zip(frame_order, intercepts):
        position, transform, item = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = list(volume.index_to_lps([0, 0, k]))
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, intercept, "HU"
        item.PlanePositionSequence = Sequence([position])
        item.PixelValueTransformationSequence = Sequence([transform])
        frames.append(item)
        stored.append(np.rint(volume.hu[k] - intercept).astype(np.int16))
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack(stored).tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    pydicom.dcmwrite(str(path), ds, write_like_original=False)


def test_enhanced_multiframe_ct(tmp_path, oblique_volume):
    order = [3, 0, 4, 1, 2]
    _enhanced_ct(tmp_path / "enhanced.dcm", oblique_volume, order, [-1024.0, -1000.0, -1024.0, 0.0, -1024.0])
    volume = read_volume(tmp_path / "enhanced.dcm")
    np.testing.assert_array_equal(volume.hu, oblique_volume.hu)
    assert_same_geometry(volume, oblique_volume)
    # the derived series references each source frame
    out = write_volume(volume.with_hu(volume.hu), tmp_path / "derived", derived_from=volume)
    refs = [pydicom.dcmread(p).SourceImageSequence[0] for p in sorted(out.iterdir())]
    assert [int(r.ReferencedFrameNumber) for r in refs] == [order.index(k) + 1 for k in range(5)]


# --------------------------------------------------------------------------------------------- bad input


def _structured_report() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = BasicTextSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "SR", generate_uid(), generate_uid()
    ds.PatientName = "Test^Phantom"
    ds.is_little_endian, ds.is_implicit_VR = True, False
    return ds


def test_mr_dicom_is_not_ct():
    with pytest.raises(NotCTError, match="MR"):
        read_volume(pydicom_file("MR_small.dcm"))


def test_mr_series_folder_is_not_ct(tmp_path, dicom_series_writer, tiny_ct_volume):
    dicom_series_writer(tmp_path / "mr", tiny_ct_volume.hu, modality="MR")
    with pytest.raises(NotCTError, match="MR"):
        read_volume(tmp_path / "mr")


def test_structured_report_is_not_an_image(tmp_path):
    pydicom.dcmwrite(str(tmp_path / "sr.dcm"), _structured_report(), write_like_original=False)
    with pytest.raises(NotAnImageError, match="SR"):
        read_volume(tmp_path / "sr.dcm")
    with pytest.raises(NotAnImageError):
        read_volume(tmp_path)


def test_folder_with_two_series(tmp_path, dicom_series_writer, tiny_ct_volume):
    hu = tiny_ct_volume.hu
    dicom_series_writer(tmp_path, hu, description="chest soft", series_uid="1.2.3.1")
    second = tmp_path / "second"
    dicom_series_writer(second, hu[:4] + 5, description="chest lung", series_uid="1.2.3.2")
    for path in second.iterdir():
        path.rename(tmp_path / f"b{path.name}")
    second.rmdir()
    with pytest.raises(MixedSeriesError) as caught:
        read_volume(tmp_path)
    message = str(caught.value)
    assert "2 series" in message and "chest soft" in message and "chest lung" in message
    assert "1.2.3.2" in message and "Phantom" not in message
    np.testing.assert_array_equal(read_volume(tmp_path, series_uid="1.2.3.2").hu, hu[:4] + 5)
    with pytest.raises(EmptyInputError, match="9.9.9"):
        read_volume(tmp_path, series_uid="9.9.9")


def test_missing_slice(tmp_path, dicom_series_writer, tiny_ct_volume):
    paths = dicom_series_writer(tmp_path / "s", tiny_ct_volume.hu, spacing=(0.8, 0.7, 2.5))
    paths[3].unlink()
    with pytest.raises(IrregularSpacingError, match=r"gap of 5\.00 mm.*1 slice"):
        read_volume(tmp_path / "s")


def test_uneven_spacing(tmp_path, dicom_series_writer, tiny_ct_volume):
    paths = dicom_series_writer(tmp_path / "s", tiny_ct_volume.hu, spacing=(0.8, 0.7, 2.5))
    ds = pydicom.dcmread(paths[2])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.6
    ds.save_as(paths[2])
    with pytest.raises(IrregularSpacingError, match="varies"):
        read_volume(tmp_path / "s")


@pytest.mark.parametrize(
    ("change", "message"), [("size", "different sizes"), ("orientation", "orientations"), ("repeat", "share")]
)
def test_mixed_slices(tmp_path, dicom_series_writer, tiny_ct_volume, change, message):
    hu = tiny_ct_volume.hu
    uid = generate_uid()
    dicom_series_writer(tmp_path, hu, series_uid=uid)
    odd = tmp_path / "odd"
    if change == "size":
        dicom_series_writer(odd, hu[:1, :20], series_uid=uid, origin=(0, 0, 100))
    elif change == "orientation":
        dicom_series_writer(odd, hu[:1], series_uid=uid, origin=(0, 0, 100), direction=rotation(0, 90, 0))
    else:  # a second acquisition at a position already in the series
        dicom_series_writer(odd, hu[:1], series_uid=uid, origin=(0, 0, 5.0))
    (odd / "000.dcm").rename(tmp_path / "odd.dcm")
    odd.rmdir()
    with pytest.raises(MixedSeriesError, match=message):
        read_volume(tmp_path)


def test_gantry_tilt_is_rejected(tmp_path, dicom_series_writer, tiny_ct_volume):
    paths = dicom_series_writer(tmp_path / "s", tiny_ct_volume.hu, spacing=(0.8, 0.7, 2.5))
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient[1] = k * 0.5  # the table moves 0.5 mm in y per 2.5 mm slice: ~11 degrees
        ds.save_as(path)
    with pytest.raises(UnsupportedImageError, match="tilt"):
        read_volume(tmp_path / "s")


def test_empty_inputs(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    for path in ("empty.dcm", "empty.nii.gz", "folder"):
        with pytest.raises(EmptyInputError):
            read_volume(tmp_path / path)
    (tmp_path / "folder" / "notes.txt").write_text("not DICOM")
    with pytest.raises(EmptyInputError, match="none of its 1 files"):
        read_volume(tmp_path / "folder")


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_dicom(tmp_path, keep):
    data = Path(pydicom_file("CT_small.dcm")).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptFileError):
        read_volume(tmp_path / "cut.dcm")


def test_truncated_slice_in_series(dicom_ct_series):
    folder, _ = dicom_ct_series
    victim = sorted(folder.iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match=victim.name):
        read_volume(folder)


def test_garbage_files(tmp_path, tiny_ct_volume):
    garbage = np.random.default_rng(0).bytes(2048)
    (tmp_path / "garbage.nii.gz").write_bytes(garbage)
    (tmp_path / "fake.nrrd").write_bytes(garbage)
    (tmp_path / "garbage.dcm").write_bytes(garbage)
    for name in ("garbage.nii.gz", "fake.nrrd", "garbage.dcm"):
        with pytest.raises(CorruptFileError, match=name):
            read_volume(tmp_path / name)
    good = write_volume(tiny_ct_volume, tmp_path / "good.nii.gz")
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(gzip.decompress(good.read_bytes())[:-500]))
    with pytest.raises(CorruptFileError, match="truncated"):
        read_volume(tmp_path / "cut.nii.gz")
    header = write_volume(tiny_ct_volume, tmp_path / "detached.mhd")
    (tmp_path / "detached.zraw").unlink()
    with pytest.raises(CorruptFileError, match="missing data file"):
        read_volume(header)


def test_rgb_png_is_rejected(tmp_path):
    import matplotlib.pyplot as plt

    plt.imsave(tmp_path / "photo.png", np.random.default_rng(0).random((24, 32, 3)))
    with pytest.raises(UnsupportedImageError, match="RGB"):
        read_volume(tmp_path / "photo.png")


def test_2d_and_vector_images_are_rejected(tmp_path):
    nib.save(nib.Nifti1Image(np.full((16, 12), -500, np.int16), np.eye(4)), tmp_path / "slice.nii.gz")
    with pytest.raises(UnsupportedImageError, match="2-D"):
        read_volume(tmp_path / "slice.nii.gz")
    vector = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32) - 500, isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "vector.mha"))
    with pytest.raises(UnsupportedImageError, match="3 components"):
        read_volume(tmp_path / "vector.mha")


def test_values_that_are_not_hu(tmp_path, tiny_ct_volume):
    label = tiny_ct_volume.with_hu((tiny_ct_volume.hu > 0).astype(np.float32))
    write_volume(label, tmp_path / "mask.nrrd")
    with pytest.raises(NotCTError, match="label map"):
        read_volume(tmp_path / "mask.nrrd")
    normalised = tiny_ct_volume.with_hu(tiny_ct_volume.hu / 3072.0)
    write_volume(normalised, tmp_path / "norm.nii.gz")
    with pytest.raises(NotCTError, match="normalised"):
        read_volume(tmp_path / "norm.nii.gz")
    assert read_volume(tmp_path / "norm.nii.gz", check_hu=False).shape == tiny_ct_volume.shape


def test_non_finite_voxels(tmp_path, tiny_ct_volume):
    hu = tiny_ct_volume.hu.copy()
    hu[1, 2, 3] = np.nan
    hu[2, 2, 3] = np.inf
    affine = np.diag([-0.8, -0.7, 2.5, 1.0])
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0), affine), tmp_path / "nan.nii.gz")
    with pytest.raises(NonFiniteVoxelsError, match="1 NaN, 1 infinite"):
        read_volume(tmp_path / "nan.nii.gz")
    with pytest.raises(NonFiniteVoxelsError):
        write_volume(tiny_ct_volume.with_hu(hu), tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()


def test_unknown_extension_and_missing_path(tmp_path, tiny_ct_volume):
    (tmp_path / "volume.xyz").write_bytes(b"\x00" * 64)
    with pytest.raises(UnsupportedFormatError, match=r"\.xyz"):
        read_volume(tmp_path / "volume.xyz")
    with pytest.raises(UnsupportedFormatError):
        write_volume(tiny_ct_volume, tmp_path / "out.xyz")
    with pytest.raises(UnsupportedFormatError, match="folder"):
        write_volume(tiny_ct_volume, tmp_path / "out.dcm")
    with pytest.raises(InputError, match="no such"):
        read_volume(tmp_path / "absent.nii.gz")


# --------------------------------------------------------------------------------------------- safety


def test_never_writes_over_the_input(tmp_path, dicom_ct_series, tiny_ct_volume):
    folder, _ = dicom_ct_series
    source = read_volume(folder)
    before = sorted(p.name for p in folder.iterdir())
    for target in (folder, folder / "inside", folder / "x.nii.gz", tmp_path, str(folder) + "/"):
        with pytest.raises(OverwriteError):
            write_volume(source, target, overwrite=True)
    with pytest.raises(OverwriteError):  # the source of derived_from is protected as well
        write_volume(tiny_ct_volume, folder / "y.nrrd", derived_from=source, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == before
    nifti = write_volume(tiny_ct_volume, tmp_path / "ct.nii.gz")
    with pytest.raises(OverwriteError):
        write_volume(read_volume(nifti), nifti, overwrite=True)


def test_existing_output_needs_overwrite(tmp_path, tiny_ct_volume):
    out = write_volume(tiny_ct_volume, tmp_path / "ct.mha")
    with pytest.raises(OverwriteError, match="overwrite=True"):
        write_volume(tiny_ct_volume.with_hu(tiny_ct_volume.hu + 1), out)
    np.testing.assert_array_equal(read_volume(out).hu, tiny_ct_volume.hu)
    write_volume(tiny_ct_volume.with_hu(tiny_ct_volume.hu + 1), out, overwrite=True)
    np.testing.assert_array_equal(read_volume(out).hu, tiny_ct_volume.hu + 1)

    folder = write_volume(tiny_ct_volume, tmp_path / "series")
    with pytest.raises(OverwriteError):
        write_volume(tiny_ct_volume, folder)
    write_volume(tiny_ct_volume.with_hu(tiny_ct_volume.hu + 2), folder, overwrite=True)
    np.testing.assert_array_equal(read_volume(folder).hu, tiny_ct_volume.hu + 2)
    (folder / "notes.txt").write_text("not DICOM")
    with pytest.raises(OverwriteError, match="notes.txt"):
        write_volume(tiny_ct_volume, folder, overwrite=True)


def test_failed_dicom_write_leaves_nothing(tmp_path, tiny_ct_volume, monkeypatch, in_process):
    existing = write_volume(tiny_ct_volume, tmp_path / "kept")
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    real = dicom_write._write_slice
    written = []

    def fail_after_first_slice(ds, path):
        if written:
            raise OSError("disk full")
        written.append(path)
        real(ds, path)

    monkeypatch.setattr(dicom_write, "_write_slice", fail_after_first_slice)
    with pytest.raises(OSError, match="disk full"):
        write_volume(tiny_ct_volume, tmp_path / "new")
    written.clear()
    with pytest.raises(OSError, match="disk full"):
        write_volume(tiny_ct_volume.with_hu(tiny_ct_volume.hu + 1), existing, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before


def test_failed_file_write_leaves_nothing(tmp_path, tiny_ct_volume, monkeypatch):
    import langmamba.io.itk_formats as lio

    def partial_then_fail(volume, filename):
        filename.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lio, "write_sitk", partial_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_volume(tiny_ct_volume, tmp_path / "ct.nii.gz")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------- describe


def test_describe_volume(dicom_ct_series):
    folder, expected = dicom_ct_series
    info = describe_volume(read_volume(folder))
    assert info["shape"] == list(expected.shape)
    np.testing.assert_allclose(info["spacing_mm"], expected.spacing)
    np.testing.assert_allclose(info["origin_mm"], expected.origin)
    assert info["orientation"] == "LPS" and info["format"] == "DICOM" and info["modality"] == "CT"
    assert info["series_description"] == "synthetic CT"
    assert info["hu"]["min"] == expected.hu.min() and info["hu"]["max"] == expected.hu.max()
    assert info["hu"]["p50"] == pytest.approx(float(np.median(expected.hu)))
    assert info["hu"]["mean"] == pytest.approx(float(expected.hu.mean()), abs=1e-3)
    assert "Phantom" not in repr(info) and "PHANTOM01" not in repr(info) and str(folder) not in repr(info)


def test_describe_nifti_volume(tmp_path, tiny_ct_volume):
    info = describe_volume(read_volume(write_volume(tiny_ct_volume, tmp_path / "ct.nii.gz")))
    assert info["format"] == "NIfTI" and info["modality"] is None and info["series_description"] is None
    assert info["extent_mm"] == pytest.approx([32 * 0.8, 40 * 0.7, 6 * 2.5])
    assert info["non_finite_voxels"] == 0


def test_dicom_series_round_trip_needs_neither_simpleitk_nor_nibabel(tmp_path):
    """DICOM-only machines (the GPU benchmark host) read and write series with pydicom alone."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "sys.modules['SimpleITK'] = None\n"
        "sys.modules['nibabel'] = None\n"
        "import numpy as np\n"
        "from langmamba.io import CTVolume, read_volume, write_volume\n"
        "hu = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8) - 50\n"
        "path = write_volume(CTVolume(hu=hu, spacing=(0.5, 0.5, 2.0)), sys.argv[1])\n"
        "back = read_volume(path)\n"
        "assert np.array_equal(back.hu, hu) and back.spacing == (0.5, 0.5, 2.0), (back.hu, back.spacing)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "series")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "series").iterdir())) == 2


def test_label_maps_are_written_as_int16_on_the_volume_grid(tmp_path, tiny_ct_volume):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 316, size=tiny_ct_volume.shape).astype(np.int32)
    path = write_labels(labels, tiny_ct_volume, tmp_path / "labels.nrrd")
    image = sitk.ReadImage(str(path))
    assert image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    np.testing.assert_allclose(image.GetSpacing(), tiny_ct_volume.spacing)
    np.testing.assert_allclose(image.GetOrigin(), tiny_ct_volume.origin)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), tiny_ct_volume.direction)
    with pytest.raises(OverwriteError):
        write_labels(labels, tiny_ct_volume, path)
    as_dicom = read_volume(write_labels(labels, tiny_ct_volume, tmp_path / "labels-series"), check_hu=False)
    np.testing.assert_array_equal(as_dicom.hu, labels)
    with pytest.raises(InputError, match="integers of shape"):
        write_labels(labels[:1], tiny_ct_volume, tmp_path / "short.nrrd")
    with pytest.raises(InputError, match="integers of shape"):
        write_labels(labels.astype(np.float32), tiny_ct_volume, tmp_path / "float.nrrd")
    with pytest.raises(InputError, match="int16"):
        write_labels(labels + 40000, tiny_ct_volume, tmp_path / "big.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels-series", "labels.nrrd"]
