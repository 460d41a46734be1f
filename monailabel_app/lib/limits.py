"""Size checks made from headers only, before a volume's voxels are read into memory."""

from __future__ import annotations

import logging
from pathlib import Path

from langmamba.errors import InputError

logger = logging.getLogger(__name__)

_ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".nii", ".nii.gz")


class VolumeTooLargeError(InputError):
    """The upload, or the volume its header declares, is larger than the server accepts."""


def declared_voxels(path: Path) -> int | None:
    """Voxel count the header of ``path`` declares (NRRD, MetaImage, NIfTI, DICOM file); ``None`` when the header
    cannot be read, so that the reader reports the actual problem."""
    name = path.name.lower()
    if path.is_dir():
        return None
    if name.endswith(_ITK_SUFFIXES):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return None
        count = reader.GetNumberOfComponents()
        for size in reader.GetSize():
            count *= int(size)
        return count
    import pydicom

    try:
        header = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # pydicom raises many types for non-DICOM or damaged content
        return None
    rows, columns = header.get("Rows"), header.get("Columns")
    if rows is None or columns is None:
        return None
    return int(rows) * int(columns) * int(header.get("NumberOfFrames", 1) or 1) * int(header.get("SamplesPerPixel", 1))


def check_voxel_count(path: Path, max_voxels: int) -> None:
    """Raise :class:`VolumeTooLargeError` when ``path``'s header declares more than ``max_voxels`` voxels."""
    count = declared_voxels(path)
    if count is not None and count > max_voxels:
        raise VolumeTooLargeError(
            f"the volume has {count:,} voxels; this server accepts at most {max_voxels:,} "
            f"(e.g. {max_voxels // (512 * 512):,} slices of 512x512)"
        )
