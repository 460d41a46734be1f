"""Writing a :class:`CTVolume` as a derived DICOM CT series: one file per slice.

Each file is a CT Image Storage object in Explicit VR Little Endian with int16 stored values and
``RescaleSlope`` 1, so integer HU round-trip exactly (non-integer HU are rounded to the nearest
integer, at most 0.5 HU). The series is new (SeriesInstanceUID, SOPInstanceUIDs, a SeriesNumber
1000 above the source's), marked ``DERIVED\\SECONDARY``, and keeps the patient, study and frame of
reference of the source header so viewers file it with the original and overlay the two.

Slice ``k`` sits at ``origin + k * spacing_z * direction[:, 2]``; DICOM readers (ours, ITK) order
slices along ``row × column``, so a volume whose direction matrix has determinant -1 reads back
flipped along z, with the same patient-space geometry.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds
from tqdm import tqdm

from langmamba import workers
from langmamba.errors import UnsupportedImageError
from langmamba.io.dicom import source_references
from langmamba.io.volume import CTVolume
from langmamba.version import __version__

logger = logging.getLogger(__name__)

ANONYMOUS = "Anonymous"
SERIES_NUMBER_OFFSET = 1000
_INT16 = np.iinfo(np.int16)
_MAX_IS = 2**31 - 1

# Attributes copied from the source header: patient, study, frame of reference and acquisition.
_KEPT_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "BodyPartExamined",
    "PatientPosition",
    "AcquisitionDate",
    "AcquisitionTime",
    "KVP",
    "XRayTubeCurrent",
    "ExposureTime",
    "Exposure",
    "CTDIvol",
    "WindowCenter",
    "WindowWidth",
)
# Type 2 attributes of the CT Image IOD: present, possibly empty, when the source lacks them.
_TYPE2_DEFAULTS = {
    "PatientBirthDate": "",
    "PatientSex": "",
    "StudyID": "",
    "AccessionNumber": "",
    "ReferringPhysicianName": "",
    "PositionReferenceIndicator": "",
    "PatientPosition": "",
    "KVP": "",
    "AcquisitionNumber": "",
}


def stored_values(hu: NDArray[Any]) -> tuple[NDArray[Any], int]:
    """int16 stored values and the RescaleIntercept that gives back the (rounded) HU.

    The intercept is 0 when the HU fit in int16, else shifted to fit the range; HU spanning more
    than 65535 are clipped (with a warning).

    Args:
        hu: HU, any shape (finite).

    Returns:
        ``(stored, intercept)`` with ``stored + intercept == round(hu)`` wherever not clipped.
    """
    rounded = np.rint(hu)
    lo, hi = float(rounded.min()), float(rounded.max())
    intercept = 0
    if (lo < _INT16.min or hi > _INT16.max) and hi - lo <= _INT16.max - _INT16.min:
        intercept = int(lo) - int(_INT16.min)
    # In place on the rounded copy: a 1,000-slice volume must not need several full-size temporaries.
    rounded -= intercept
    clipped = int(np.count_nonzero((rounded < _INT16.min) | (rounded > _INT16.max)))
    if clipped:
        logger.warning("%d voxels outside the int16 range of DICOM were clipped", clipped)
    np.clip(rounded, _INT16.min, _INT16.max, out=rounded)
    return rounded.astype(np.int16), intercept


def _ds_numbers(values: Iterable[Any]) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


def _series_number(header: Dataset | None) -> int:
    source = header.get("SeriesNumber") if header is not None else None
    if source is None:
        return SERIES_NUMBER_OFFSET + 1
    try:
        number = int(source) + SERIES_NUMBER_OFFSET
    except (TypeError, ValueError):
        return SERIES_NUMBER_OFFSET + 1
    return number if number <= _MAX_IS else 1


def _base_dataset(
    volume: CTVolume, header: Dataset | None, series_description: str, intercept: int, now: datetime
) -> Dataset:
    """The attributes shared by every slice of the new series."""
    ds = Dataset()
    if header is not None:
        for keyword in _KEPT_KEYWORDS:
            if keyword in header:
                ds.add(copy.deepcopy(header[keyword]))
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.setdefault("PatientName", ANONYMOUS)
    ds.setdefault("PatientID", ANONYMOUS)
    ds.setdefault("StudyInstanceUID", generate_uid())
    ds.setdefault("StudyDate", date)
    ds.setdefault("StudyTime", time)
    ds.setdefault("FrameOfReferenceUID", generate_uid())
    for keyword, value in _TYPE2_DEFAULTS.items():
        ds.setdefault(keyword, value)
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = _series_number(header)
    ds.SeriesDescription = series_description
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.DerivationDescription = f"{series_description}; written by langmamba {__version__}"[:1024]
    ds.Manufacturer = "LangMamba"
    ds.SoftwareVersions = __version__
    direction = volume.direction
    ds.ImageOrientationPatient = _ds_numbers(np.concatenate([direction[:, 0], direction[:, 1]]))
    ds.PixelSpacing = _ds_numbers([volume.spacing[1], volume.spacing[0]])
    thickness = header.get("SliceThickness") if header is not None else None
    ds.SliceThickness = thickness if thickness not in (None, "") else format_number_as_ds(volume.spacing[2])
    ds.SpacingBetweenSlices = format_number_as_ds(volume.spacing[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = f"LANGMAMBA_{__version__}"[:16]
    ds.is_little_endian, ds.is_implicit_VR = True, False
    return ds


def _same_grid(a: CTVolume, b: CTVolume) -> bool:
    return (
        a.shape == b.shape
        and np.allclose(a.spacing, b.spacing, atol=1e-3)
        and np.allclose(a.origin, b.origin, atol=1e-3)
        and np.allclose(a.direction, b.direction, atol=1e-4)
    )


_References = tuple[Dataset, Dataset | None]


def _reference_items(volume: CTVolume, derived_from: CTVolume | None) -> list[_References | None]:
    """Per slice ``(ReferencedSeriesSequence item, SourceImageSequence item or None)``, or Nones."""
    nothing: list[_References | None] = [None] * volume.shape[0]
    if derived_from is None:
        return nothing
    source = derived_from.dicom
    if source is None or "SeriesInstanceUID" not in source:
        logger.warning("derived_from has no DICOM header; the new series will not reference its source")
        return nothing
    sop_class = str(source.get("SOPClassUID", CTImageStorage))
    refs = source_references(source)
    per_slice = len(refs) == volume.shape[0] and _same_grid(volume, derived_from)
    items: list[_References | None] = []
    for k in range(volume.shape[0]):
        uid, frame = refs[k] if per_slice else (str(source.get("SOPInstanceUID", "")), None)
        instance = Dataset()
        instance.ReferencedSOPClassUID = sop_class
        instance.ReferencedSOPInstanceUID = uid
        if frame is not None:
            instance.ReferencedFrameNumber = frame
        series = Dataset()
        series.SeriesInstanceUID = source.SeriesInstanceUID
        series.ReferencedInstanceSequence = Sequence([instance])
        items.append((series, copy.deepcopy(instance) if per_slice else None))
    return items


def _write_slice(ds: Dataset, path: Path) -> None:
    pydicom.dcmwrite(str(path), ds, write_like_original=False)


def write_dicom_series(
    volume: CTVolume,
    folder: Path,
    *,
    series_description: str = "LangMamba denoised",
    derived_from: CTVolume | None = None,
    progress: bool = False,
) -> None:
    """Write ``volume`` into the existing, empty ``folder``, one ``NNNN.dcm`` file per slice.

    Args:
        volume: the CT volume, ``hu`` of shape ``(Z, Y, X)`` in HU (finite).
        folder: where to write, normally the temporary folder of
            :func:`langmamba.io.atomic.atomic_output`.
        series_description: SeriesDescription (and start of DerivationDescription).
        derived_from: the volume this one was computed from; with a DICOM header, every slice
            references its source (ReferencedSeriesSequence, and SourceImageSequence when the
            two volumes share one grid).
        progress: show a tqdm progress bar.
    """
    direction = volume.direction
    if np.abs(direction.T @ direction - np.eye(3)).max() > 1e-4:
        raise UnsupportedImageError("the volume's axes are not perpendicular; DICOM cannot store it")
    header = volume.dicom if volume.dicom is not None else getattr(derived_from, "dicom", None)
    stored, intercept = stored_values(volume.hu)
    ds = _base_dataset(volume, header, series_description, intercept, datetime.now())
    references = _reference_items(volume, derived_from)
    width = max(4, len(str(volume.shape[0])))
    placement = (
        np.asarray(volume.origin, dtype=np.float64),
        volume.spacing[2] * direction[:, 2],
        np.cross(direction[:, 0], direction[:, 1]),
    )
    # pydicom encodes in Python: worker processes (langmamba.workers) write slices side by side.
    with workers.shared_copy(stored) as handle:
        tasks = [
            (
                ds,
                folder,
                width,
                placement,
                part,
                references[part.start : part.stop],
                (handle, 0) if handle is not None else (stored[part.start : part.stop], part.start),
            )
            for part in workers.split(volume.shape[0])
        ]
        with tqdm(total=volume.shape[0], desc="Writing DICOM", unit="slice", disable=not progress) as bar:
            for written in workers.results([workers.submit(_write_slices, *task) for task in tasks]):
                bar.update(written)


def _write_slices(
    ds: Dataset,
    folder: Path,
    width: int,
    placement: tuple[NDArray[Any], NDArray[Any], NDArray[Any]],
    part: range,
    references: list[_References | None],
    pixels: tuple[Any, int],
) -> int:
    """Write slices ``part`` of a series whose shared attributes are ``ds``, with their references; ``placement``
    is the origin, the step between slices and the slice normal in LPS mm. ``pixels`` is ``(values, first)``: the
    int16 stored values of slice ``k`` are row ``k - first`` of ``values``, an array or a
    :func:`langmamba.workers.shared_empty` handle."""
    values, first = pixels
    stored = workers.open_shared(values, writable=False)
    origin, step, normal = placement
    for i, k in enumerate(part):
        position = origin + k * step
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = _ds_numbers(position)
        ds.SliceLocation = format_number_as_ds(float(position @ normal))
        reference = references[i]
        if reference is not None:
            series_item, source_item = reference
            ds.ReferencedSeriesSequence = Sequence([series_item])
            if source_item is not None:
                ds.SourceImageSequence = Sequence([source_item])
        ds.PixelData = stored[k - first].tobytes()
        _write_slice(ds, folder / f"{k + 1:0{width}d}.dcm")
    return len(part)
