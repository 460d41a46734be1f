"""Shared fixtures: small synthetic CT volumes and DICOM series (no files outside the test's tmp_path), and the
session's check that no test leaves a process running (:mod:`tests.process_leaks`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from langmamba import workers
from langmamba.io.volume import CTVolume
from tests import servers
from tests.process_leaks import pytest_sessionfinish, pytest_sessionstart  # noqa: F401  (session hooks)


def _phantom(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Integer HU: air around an elliptic body (40 HU) with two lungs (-850 HU) and a bone (700 HU)."""
    z, y, x = shape
    yy, xx = np.mgrid[:y, :x]
    cy, cx = (y - 1) / 2, (x - 1) / 2
    body = ((yy - cy) / (0.45 * y)) ** 2 + ((xx - cx) / (0.45 * x)) ** 2 <= 1
    lungs = (((yy - cy) / (0.25 * y)) ** 2 + ((np.abs(xx - cx) - 0.2 * x) / (0.12 * x)) ** 2) <= 1
    bone = ((yy - 0.8 * y) ** 2 + (xx - cx) ** 2) <= (0.06 * min(x, y)) ** 2
    plane = np.where(body, 40.0, -1000.0)
    plane[lungs & body] = -850.0
    plane[bone & body] = 700.0
    noise = np.random.default_rng(seed).normal(0.0, 20.0, size=shape)
    return np.rint(plane[None] + noise).astype(np.float32)


@pytest.fixture
def tiny_ct_volume() -> CTVolume:
    """A (Z, Y, X) = (6, 40, 32) CT in integer HU, non-square, 0.8×0.7×2.5 mm, axial (identity) LPS."""
    return CTVolume(
        hu=_phantom((6, 40, 32)),
        spacing=(0.8, 0.7, 2.5),
        origin=(-12.5, -14.0, 31.25),
        direction=np.eye(3),
    )


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (0.8, 0.7, 2.5),
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    direction: np.ndarray | None = None,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    description: str = "synthetic CT",
    modality: str = "CT",
    shuffle: bool = False,
    pad_mask: np.ndarray | None = None,
    padding_value: int = -2000,
) -> list[Path]:
    """Write ``hu`` (Z, Y, X) as classic single-frame DICOM slices with pydicom, independently of
    langmamba's writer. Stored value = HU - intercept (RescaleSlope 1), int16.

    ``shuffle`` gives the files random names and InstanceNumbers unrelated to the position;
    ``pad_mask`` (same shape as ``hu``) stores ``padding_value`` there and declares it as
    PixelPaddingValue. Returns the file paths in slice (position) order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    stored = np.rint(hu - intercept).astype(np.int16)
    if pad_mask is not None:
        stored[pad_mask] = padding_value
    rng = np.random.default_rng(1)
    numbers = rng.permutation(len(hu)) if shuffle else np.arange(len(hu))
    series_uid, study_uid = series_uid or generate_uid(), study_uid or generate_uid()
    frame_uid = generate_uid()
    paths = []
    for k in range(len(hu)):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PatientName, ds.PatientID = "Test^Phantom", "PHANTOM01"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber = modality, description, 3
        ds.InstanceNumber = int(numbers[k]) + 1
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[2] * direction[:, 2]]
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([direction[:, 0], direction[:, 1]])]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
        if pad_mask is not None:
            ds.add_new("PixelPaddingValue", "SS", padding_value)
        ds.PixelData = stored[k].tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        name = f"{rng.integers(1 << 40):x}.dcm" if shuffle else f"{k:03d}.dcm"
        path = folder / name
        pydicom.dcmwrite(str(path), ds, write_like_original=False)
        paths.append(path)
    return paths


@pytest.fixture
def dicom_series_writer() -> Callable[..., list[Path]]:
    """The function :func:`write_ct_series`, to write synthetic DICOM CT series in a test."""
    return write_ct_series


@pytest.fixture
def dicom_ct_series(tmp_path: Path, tiny_ct_volume: CTVolume) -> tuple[Path, CTVolume]:
    """``tiny_ct_volume`` written as a DICOM series folder; returns ``(folder, volume)``."""
    folder = tmp_path / "series"
    vol = tiny_ct_volume
    write_ct_series(folder, vol.hu, spacing=vol.spacing, origin=vol.origin, direction=vol.direction)
    return folder, vol


@pytest.fixture
def worker_processes() -> Iterator[int]:
    """Two :mod:`langmamba.workers` processes for the test (whatever the machine's cores), then the default."""
    workers.configure(2)
    yield 2
    workers.configure(None)


@pytest.fixture
def in_process() -> Iterator[None]:
    """No :mod:`langmamba.workers` processes for the test (for monkeypatched functions), then the default."""
    workers.configure(0)
    yield
    workers.configure(None)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tell :mod:`tests.servers` which test runs, so a server started by an unmarked test is refused."""
    servers.running_test = item
