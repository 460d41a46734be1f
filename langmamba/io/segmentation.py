"""DICOM SEG objects as masks on the grid of the CT they were drawn on.

A binary or fractional SEG stores one frame per (segment, slice). Each frame is placed on the slice of the CT
volume whose SOP Instance UID it names (Derivation Image / Source Image Sequence); frames that name none are
placed by their Image Position (Patient) along the slice normal.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from langmamba.errors import CorruptFileError, InputError
from langmamba.io.dicom import source_references
from langmamba.io.volume import CTVolume

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _source_uid(frame: Dataset) -> str | None:
    for derivation in frame.get("DerivationImageSequence", []):
        for source in derivation.get("SourceImageSequence", []):
            if "ReferencedSOPInstanceUID" in source:
                return str(source.ReferencedSOPInstanceUID)
    return None


def _position(frame: Dataset, shared: Dataset | None) -> NDArray[Any] | None:
    for group in (frame, shared):
        if group is not None and "PlanePositionSequence" in group:
            return np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
    return None


def read_segmentation(
    path: str | os.PathLike[str], volume: CTVolume, segments: list[int] | None = None
) -> NDArray[Any]:
    """Union of the chosen segments of a DICOM SEG file as a boolean mask on ``volume``'s grid.

    Args:
        path: the SEG file.
        volume: the CT the segmentation refers to, read from DICOM (its slices' SOP Instance UIDs place the frames)
            or any volume on the same grid (frames are then placed by position).
        segments: segment numbers to keep (default: all).

    Returns:
        bool mask of shape ``volume.shape`` = ``(Z, Y, X)``.

    Raises:
        InputError: the file is not a SEG, its frames do not match the volume's slice size, or a frame lies on no
            slice of the volume.
    """
    path = Path(path)
    ds = pydicom.dcmread(str(path))
    if str(ds.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        raise InputError(f"{path}: not a DICOM SEG object (SOP Class {ds.get('SOPClassUID', 'missing')})")
    if (int(ds.Rows), int(ds.Columns)) != volume.shape[1:]:
        raise InputError(
            f"{path}: SEG frames of {ds.Rows}x{ds.Columns} do not match the CT slices of "
            f"{volume.shape[1]}x{volume.shape[2]}"
        )
    try:
        frames = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))
    except Exception as err:
        raise CorruptFileError(f"{path}: the SEG pixel data cannot be decoded ({err})") from err
    per_frame = ds.PerFrameFunctionalGroupsSequence
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    slice_of_uid = {uid: z for z, (uid, _) in enumerate(source_references(volume.dicom))}
    normal = volume.direction[:, 2]
    slice_positions = (np.asarray(volume.origin) @ normal) + np.arange(volume.shape[0]) * volume.spacing[2]
    mask = np.zeros(volume.shape, dtype=bool)
    for frame, pixels in zip(per_frame, frames):
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if segments is not None and number not in segments:
            continue
        uid = _source_uid(frame)
        z = None if uid is None else slice_of_uid.get(uid)
        if z is None:
            position = _position(frame, shared)
            if position is None:
                raise InputError(f"{path}: a frame names neither a source image nor a position")
            distance = np.abs(slice_positions - position @ normal)
            z = int(np.argmin(distance))
            if distance[z] > 0.5 * volume.spacing[2]:
                raise InputError(f"{path}: a frame lies {distance[z]:.2f} mm from the nearest CT slice")
        mask[z] |= pixels > 0
    return mask
