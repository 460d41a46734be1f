"""Reading untrusted input: confined reads open nothing but the input itself, and declared sizes are checked
from the header before anything of that size is allocated."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from langmamba.errors import (
    CorruptFileError,
    InputError,
    UnsafeInputError,
    UnsupportedImageError,
    VolumeTooLargeError,
)
from langmamba.io import read_volume, write_volume
from langmamba.io.confine import MAX_HEADER_BYTES
from langmamba.io.limits import MAX_SLICES, MAX_VOLUME_BYTES
from tests.measure import measured

MiB = 1 << 20
SECRET = np.arange(-1000, 1000, 125, dtype=np.int16).reshape(2, 2, 4)  # looks enough like HU to be read


def secret_file(folder: Path) -> Path:
    """A file of someone else's, outside the upload: 16 int16 values."""
    path = folder / "elsewhere" / "secret.raw"
    path.parent.mkdir()
    path.write_bytes(SECRET.tobytes())
    return path


def nrrd_header(fields: str, sizes: str = "4 2 2", kind: str = "short") -> bytes:
    return (
        f"NRRD0004\ntype: {kind}\ndimension: 3\nspace: left-posterior-superior\nsizes: {sizes}\n"
        "space directions: (1,0,0) (0,1,0) (0,0,1)\nkinds: domain domain domain\nendian: little\n"
        f"encoding: raw\nspace origin: (0,0,0)\n{fields}"
    ).encode()


def metaimage_header(data_file: str, sizes: str = "4 2 2", kind: str = "MET_SHORT") -> bytes:
    return (
        f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"ElementSpacing = 1 1 1\nDimSize = {sizes}\nElementType = {kind}\nElementDataFile = {data_file}\n"
    ).encode()


def upload(folder: Path, name: str, data: bytes) -> Path:
    path = folder / "upload" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


# (upload name, its header given the secret's path, whether an unconfined read hands back the secret's voxels)
_NAMING_ANOTHER_FILE = [
    ("x.nhdr", lambda secret: nrrd_header(f"data file: {secret}\n\n"), True),
    ("x.nrrd", lambda secret: nrrd_header(f"# a comment\nDataFile: {secret}\n\n"), True),
    ("x.nrrd", lambda secret: nrrd_header(f"datafile: ../elsewhere/{secret.name}\n\n"), True),
    ("x.nhdr", lambda secret: nrrd_header(f"data file: LIST\n{secret}\n"), False),
    ("x.nrrd", lambda secret: nrrd_header(f"# comment\rdata files: {secret}\r\n\r\n"), False),
    ("x.mhd", lambda secret: metaimage_header(str(secret)), True),
    ("x.mha", lambda secret: metaimage_header(f"../elsewhere/{secret.name}"), True),
    ("x.mhd", lambda secret: metaimage_header("LIST") + f"{secret}\n".encode(), False),
    ("x.mha", lambda secret: metaimage_header(str(secret)).replace(b"ElementDataFile = ", b"ElementDataFile: "), True),
    ("x.mha", lambda secret: b"elementdatafile = LOCAL\n" + metaimage_header(str(secret)), True),
    ("x.mha", lambda secret: b"Comment = x\rElementDataFile = LOCAL\n" + metaimage_header(str(secret)), True),
    ("x.mha", lambda secret: metaimage_header("LoCaL"), False),  # a file named LoCaL beside the header
    ("x.mha", lambda secret: metaimage_header("LOCAL\rjunk"), False),
]


@pytest.mark.parametrize("name, header, leaks", _NAMING_ANOTHER_FILE)
def test_a_header_naming_another_file_is_refused_when_confined(tmp_path, name, header, leaks):
    secret = secret_file(tmp_path)
    path = upload(tmp_path, name, header(secret))
    if leaks:
        np.testing.assert_array_equal(read_volume(path, check_hu=False).hu, SECRET.reshape(2, 2, 4))
    with pytest.raises(UnsafeInputError, match="another file"):
        read_volume(path, confined=True)


def test_a_users_own_detached_header_is_read_unconfined(tmp_path, tiny_ct_volume):
    for name in ("x.nhdr", "x.mhd"):
        header = write_volume(tiny_ct_volume, tmp_path / name)
        np.testing.assert_array_equal(read_volume(header).hu, tiny_ct_volume.hu)
        with pytest.raises(UnsafeInputError):
            read_volume(header, confined=True)


@pytest.mark.parametrize("name", ["ct.nrrd", "ct.mha", "ct.nii.gz", "ct.nii", "series/"])
def test_self_contained_files_are_read_confined(tmp_path, tiny_ct_volume, name):
    path = write_volume(tiny_ct_volume, tmp_path / name)
    np.testing.assert_array_equal(read_volume(path, confined=True).hu, tiny_ct_volume.hu)


def test_an_attached_nrrd_with_an_empty_line_in_its_data_is_read_confined(tmp_path, tiny_ct_volume):
    """Only the header up to its first empty line is checked: the voxels after it may hold any bytes."""
    hu = tiny_ct_volume.hu.copy()
    hu.flat[:4] = [2570, 2570, 2570, 2570]  # int16 0x0A0A: "\n\n" in the data
    path = upload(tmp_path, "x.nrrd", nrrd_header("\n", sizes="32 40 6") + hu.astype("<i2").tobytes())
    np.testing.assert_array_equal(read_volume(path, confined=True).hu, hu)


def test_links_are_refused_when_confined(tmp_path, tiny_ct_volume, dicom_ct_series):
    real = write_volume(tiny_ct_volume, tmp_path / "ct.nrrd")
    link = tmp_path / "upload.nrrd"
    link.symlink_to(real)
    np.testing.assert_array_equal(read_volume(link).hu, tiny_ct_volume.hu)
    with pytest.raises(UnsafeInputError, match="symbolic link"):
        read_volume(link, confined=True)
    dangling = tmp_path / "dangling.nrrd"
    dangling.symlink_to(tmp_path / "nowhere.nrrd")
    with pytest.raises(UnsafeInputError, match="symbolic link"):
        read_volume(dangling, confined=True)
    folder, volume = dicom_ct_series
    (folder / "extra.dcm").symlink_to(real)
    with pytest.raises(UnsafeInputError, match="symbolic link"):
        read_volume(folder, confined=True)
    linked_folder = tmp_path / "linked"
    linked_folder.symlink_to(folder)
    with pytest.raises(UnsafeInputError, match="symbolic link"):
        read_volume(linked_folder, confined=True)


def test_confined_reads_use_the_reader_of_the_extension(tmp_path):
    """A ``.nrrd`` upload holding a MetaImage header is not handed to ITK's MetaImage reader."""
    secret = secret_file(tmp_path)
    path = upload(tmp_path, "x.nrrd", metaimage_header(str(secret)))
    with pytest.raises(CorruptFileError, match="not an NRRD file"):
        read_volume(path, confined=True)
    path = upload(tmp_path, "y.mha", nrrd_header(f"data file: {secret}\n\n"))
    with pytest.raises(CorruptFileError, match="not a MetaImage file"):
        read_volume(path, confined=True)


def test_a_picture_upload_is_refused_without_parsing_it(tmp_path):
    """Pictures are refused by their name alone when confined: no image library parses an untrusted one."""
    picture = tmp_path / "photo.png"
    sitk.WriteImage(sitk.Image([32, 24], sitk.sitkUInt8), str(picture))
    with pytest.raises(UnsupportedImageError, match="a 2-D grey-scale picture of 32x24 pixels"):
        read_volume(picture)
    with pytest.raises(UnsupportedImageError, match="photo.png: a picture file, without Hounsfield units"):
        read_volume(picture, confined=True)


def test_a_header_too_long_to_check_is_refused(tmp_path):
    secret = secret_file(tmp_path)
    padding = "".join(f"# {'x' * 1000}\n" for _ in range(MAX_HEADER_BYTES // 1000 + 1))
    path = upload(tmp_path, "x.nrrd", nrrd_header(padding + f"data file: {secret}\n\n"))
    with pytest.raises(CorruptFileError, match="does not end within"):
        read_volume(path, confined=True)


# Headers of about a kilobyte that declare 512x512x1900 doubles (4 GB) or more, and hold almost no data.
def _nrrd_bomb(folder: Path) -> Path:
    return upload(folder, "bomb.nrrd", nrrd_header("\n", sizes="512 512 1900", kind="double") + bytes(1000))


def _metaimage_bomb(folder: Path) -> Path:
    return upload(folder, "bomb.mha", metaimage_header("LOCAL", sizes="512 512 1900", kind="MET_DOUBLE") + bytes(1000))


def _nifti_bomb(folder: Path) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 1900))
    header.set_data_dtype(np.float64)
    header.set_sform(np.eye(4), code=1)
    return upload(folder, "bomb.nii", header.binaryblock + b"\0" * 4 + bytes(1000))


def _enhanced_ct(frames: int, rows: int, cols: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.SeriesInstanceUID = "CT", generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    plane = Dataset()
    plane.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = Sequence([plane])
    measures = Dataset()
    measures.PixelSpacing = [1, 1]
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    if frames <= 1000:  # positions of every frame, so that only the size is wrong
        per_frame = []
        for index in range(frames):
            position = Dataset()
            position.ImagePositionPatient = [0, 0, float(index)]
            item = Dataset()
            item.PlanePositionSequence = Sequence([position])
            per_frame.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = bytes(1000)
    return ds


def _dicom_bomb(folder: Path) -> Path:
    path = folder / "upload" / "bomb.dcm"
    path.parent.mkdir(exist_ok=True)
    pydicom.dcmwrite(str(path), _enhanced_ct(frames=100, rows=4096, cols=4096), write_like_original=False)
    return path


def _dicom_frames_bomb(folder: Path) -> Path:
    path = folder / "upload" / "frames.dcm"
    path.parent.mkdir(exist_ok=True)
    pydicom.dcmwrite(str(path), _enhanced_ct(frames=50_000_000, rows=1, cols=1), write_like_original=False)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (_nrrd_bomb, "512x512x1900 voxels of 8 byte"),
        (_metaimage_bomb, "512x512x1900 voxels of 8 byte"),
        (_nifti_bomb, "512x512x1900 voxels of 8 byte"),
        (_dicom_bomb, "100x4096x4096 voxels of 2 byte"),
        (_dicom_frames_bomb, f"50,000,000 frames; the limit is {MAX_SLICES:,}"),
    ],
)
def test_a_small_header_declaring_a_huge_volume_is_refused_before_allocating(tmp_path, make, message):
    path = make(tmp_path)
    assert path.stat().st_size < 20_000
    result = measured(
        "from langmamba.io import itk_formats, read_volume",
        f"read_volume({str(path)!r}, confined=True)",
        LANGMAMBA_WORKERS="0",
    )
    assert result["error"][0] == "VolumeTooLargeError" and message in result["error"][1], result["error"]
    assert result["cpu_s"] < 2.0
    assert result["memory_growth"] < 200 * MiB


def test_the_size_limit_is_a_parameter(tmp_path, tiny_ct_volume, dicom_ct_series):
    needed = int(np.prod(tiny_ct_volume.shape)) * 4  # float32 HU
    assert MAX_VOLUME_BYTES == 512 * 512 * 2000 * 4
    for path in (
        write_volume(tiny_ct_volume, tmp_path / "ct.nrrd"),
        write_volume(tiny_ct_volume, tmp_path / "ct.nii"),
        write_volume(tiny_ct_volume, tmp_path / "ct.mha"),
        dicom_ct_series[0],
    ):
        with pytest.raises(VolumeTooLargeError, match=f"the limit \\(max_bytes\\) is {needed - 1:,} bytes"):
            read_volume(path, max_bytes=needed - 1)
        np.testing.assert_array_equal(read_volume(path, max_bytes=needed).hu, tiny_ct_volume.hu)
        np.testing.assert_array_equal(read_volume(path, max_bytes=None).hu, tiny_ct_volume.hu)
    assert issubclass(VolumeTooLargeError, InputError) and issubclass(UnsafeInputError, InputError)


def _nifti_with_extension(folder: Path, name: str, vox_offset: int, extension_size: int, unpacked: int) -> Path:
    """A gzipped NIfTI whose extension declares ``extension_size`` bytes and holds ``unpacked`` zero bytes (1 MB
    gzipped per GB)."""
    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    header.set_data_dtype(np.int16)
    header["vox_offset"] = vox_offset
    path = folder / "upload" / name
    path.parent.mkdir(exist_ok=True)
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(header.binaryblock + bytes([1, 0, 0, 0]) + np.array([extension_size, 6], "<i4").tobytes())
        for _ in range(unpacked // MiB):
            out.write(bytes(MiB))
    return path


@pytest.mark.parametrize(
    "vox_offset, extension_size, message",
    [
        (368, 1 << 30, "damaged NIfTI header extension"),  # an extension larger than the room before the voxels
        (0, 1 << 30, "inside the header"),  # nibabel would read extensions to the end of the file
        (352 + (1 << 30), 1 << 30, "declares voxels at byte"),
    ],
)
@pytest.mark.slow
def test_nifti_extensions_cannot_make_the_reader_load_gigabytes(tmp_path, vox_offset, extension_size, message):
    path = _nifti_with_extension(tmp_path, "ext.nii.gz", vox_offset, extension_size, unpacked=1 << 30)
    assert path.stat().st_size < 5 * MiB
    start = time.process_time()
    with pytest.raises(CorruptFileError, match=message):
        read_volume(path, confined=True)
    assert time.process_time() - start < 2.0


def test_filler_beside_a_dicom_series_costs_no_parse(dicom_ct_series):
    """Files without the DICOM marker are parsed only if their start names a SOP Class or Modality: 20 MB of
    zeros (a zip bomb's usual content) took 8 s of CPU to parse as DICOM elements."""
    folder, volume = dicom_ct_series
    (folder / "filler.dcm").write_bytes(bytes(20 * MiB))
    start = time.process_time()
    np.testing.assert_array_equal(read_volume(folder, confined=True).hu, volume.hu)
    assert time.process_time() - start < 2.0
    with pytest.raises(CorruptFileError, match="filler.dcm: not a readable DICOM file"):
        read_volume(folder / "filler.dcm")


def _header_then_filler(source: Path, target: Path, filler_bytes: int) -> Path:
    """``source``'s DICOM header without its pixels, then ``filler_bytes`` of zeros: empty elements, 8 bytes each."""
    ds = pydicom.dcmread(source)
    del ds.PixelData
    pydicom.dcmwrite(str(target), ds, write_like_original=False)
    with open(target, "ab") as out:
        out.write(bytes(filler_bytes))
    return target


def test_headers_of_filler_elements_are_refused_within_a_read_budget(dicom_ct_series, monkeypatch, in_process):
    """A valid DICOM header followed by millions of empty elements: each costs pydicom about 3 µs."""
    from langmamba.io import dicom

    monkeypatch.setattr(dicom, "MAX_DICOM_HEADER_READS", 100_000)
    folder, volume = dicom_ct_series
    np.testing.assert_array_equal(read_volume(folder).hu, volume.hu)  # a few hundred reads
    filler = _header_then_filler(sorted(folder.iterdir())[0], folder.parent / "filler.dcm", MiB)
    start = time.process_time()
    with pytest.raises(
        VolumeTooLargeError,
        match="filler.dcm: the DICOM headers hold more elements than langmamba parses \\(at most 100,000 reads",
    ):
        read_volume(filler)
    filler.rename(folder / "filler.dcm")
    with pytest.raises(VolumeTooLargeError, match=f"{folder}: the DICOM headers hold more elements"):
        read_volume(folder)
    assert time.process_time() - start < 2.0
