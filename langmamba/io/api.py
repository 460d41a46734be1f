"""read_volume, write_volume and write_labels: format dispatch, input checks and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from langmamba.errors import EmptyInputError, InputError
from langmamba.io.atomic import atomic_output, check_not_input
from langmamba.io.confine import check_confined, check_not_link, itk_io_name
from langmamba.io.dicom import read_dicom_file, read_dicom_folder
from langmamba.io.dicom_write import write_dicom_series
from langmamba.io.formats import Format, format_for_reading, format_for_writing
from langmamba.io.limits import MAX_VOLUME_BYTES
from langmamba.io.validate import check_finite, check_hu_range
from langmamba.io.volume import CTVolume

_INT16 = np.iinfo(np.int16)


def read_volume(
    path: str | os.PathLike[str],
    *,
    series_uid: str | None = None,
    check_hu: bool = True,
    progress: bool = False,
    confined: bool = False,
    max_bytes: int | None = MAX_VOLUME_BYTES,
) -> CTVolume:
    """Read a CT volume in HU from a DICOM series folder, a DICOM file, NIfTI, NRRD or MetaImage.

    Args:
        path: a folder holding one DICOM series (its files, not subfolders), a DICOM file (one
            CT slice, or a multi-frame Enhanced CT), ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr`` or
            ``.mha``/``.mhd``.
        series_uid: SeriesInstanceUID to read from a folder that holds several series.
        check_hu: for formats without a modality (NIfTI, NRRD, MetaImage), reject value ranges
            that cannot be HU (see :mod:`langmamba.io.validate`).
        progress: show tqdm progress bars while reading DICOM files.
        confined: read nothing but ``path`` itself, for untrusted input such as an upload to a server: refuse a
            symbolic link (the path itself or an entry of the folder), an NRRD header with a ``data file`` field
            and a MetaImage header whose ``ElementDataFile`` is not ``LOCAL`` (see :mod:`langmamba.io.confine`).
            Off, a user's own detached ``.nhdr``/``.mhd`` headers are read with their data files.
        max_bytes: refuse, from the header and before allocating, a volume whose voxels as stored or as float32
            HU need more than this many bytes (see :mod:`langmamba.io.limits`); ``None``: no limit.

    Returns:
        CTVolume with ``hu`` float32 of shape ``(Z, Y, X)`` in HU, spacing/origin in mm (LPS),
        ``dicom`` = first slice header for DICOM input and ``source`` = ``str(path)``.

    Raises:
        InputError: the path does not exist or cannot be opened; and its subclasses
            EmptyInputError, CorruptFileError, UnsupportedFormatError, UnsupportedImageError,
            NotAnImageError, NotCTError, MixedSeriesError, IrregularSpacingError,
            NonFiniteVoxelsError, VolumeTooLargeError, UnsafeInputError for the problems their names say.
    """
    path = Path(path).expanduser()
    if confined and os.path.lexists(path):
        check_not_link(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        if confined:
            check_confined(path, None)
        return read_dicom_folder(path, series_uid=series_uid, progress=progress, max_bytes=max_bytes)
    if path.stat().st_size == 0:
        raise EmptyInputError(f"{path}: the file is empty (0 bytes)")
    fmt = format_for_reading(path)
    if confined:
        check_confined(path, fmt)
    if fmt is Format.DICOM:
        return read_dicom_file(path, progress=progress, max_bytes=max_bytes)
    from langmamba.io import itk_formats  # SimpleITK and nibabel: only the non-DICOM formats need them

    if fmt is Format.PICTURE:
        itk_formats.reject_picture(path, inspect=not confined)
    if fmt is Format.NIFTI:
        volume = itk_formats.read_nifti(path, max_bytes=max_bytes)
    else:
        volume = itk_formats.read_sitk(
            path, fmt.value, max_bytes=max_bytes, image_io=itk_io_name(fmt) if confined else None
        )
    check_finite(volume.hu, str(path))
    if check_hu:
        check_hu_range(volume.hu, str(path))
    return volume


def write_volume(
    volume: CTVolume,
    path: str | os.PathLike[str],
    *,
    series_description: str = "LangMamba denoised",
    overwrite: bool = False,
    derived_from: CTVolume | None = None,
    progress: bool = False,
) -> Path:
    """Write ``volume`` atomically as NIfTI, NRRD, MetaImage (by extension) or a DICOM series.

    A path ending in ``/``, without extension, or naming an existing folder is written as a
    DICOM series folder (see :mod:`langmamba.io.dicom_write`). NIfTI/NRRD/MetaImage store int16
    when every HU is an integer in range, else float32.

    Args:
        volume: the CT volume, ``hu`` of shape ``(Z, Y, X)`` in HU.
        path: the output file or folder.
        series_description: DICOM SeriesDescription (DICOM output only).
        overwrite: replace an existing output (never the input, and only a folder that holds
            nothing but DICOM files).
        derived_from: the volume ``volume`` was computed from; its DICOM header is referenced by
            the new series, and its source is protected like ``volume.source``.
        progress: show a tqdm progress bar while writing DICOM slices.

    Returns:
        The path written (without a trailing ``/``).

    Raises:
        OverwriteError: the output is, contains or lies inside the input, or exists and
            ``overwrite`` is False.
        UnsupportedFormatError: the extension names no format langmamba writes.
        NonFiniteVoxelsError: the volume holds NaN or infinite values.
    """
    fmt = format_for_writing(path)
    output = Path(path).expanduser()
    check_not_input(output, [volume.source, getattr(derived_from, "source", None)])
    check_finite(volume.hu, "the volume to write")
    with atomic_output(output, as_folder=fmt is Format.DICOM, overwrite=overwrite) as staging:
        if fmt is Format.DICOM:
            write_dicom_series(
                volume,
                staging,
                series_description=series_description,
                derived_from=derived_from,
                progress=progress,
            )
        else:
            from langmamba.io import itk_formats

            itk_formats.write_sitk(volume, staging / output.name)
    return output


def write_labels(
    labels: NDArray[Any],
    geometry: CTVolume,
    path: str | os.PathLike[str],
    *,
    series_description: str = "LangMamba labels",
    overwrite: bool = False,
) -> Path:
    """Write an integer label volume on the grid of ``geometry`` atomically, like :func:`write_volume`.

    NIfTI, NRRD and MetaImage files store ``labels`` as int16 straight from the array: a 1,000-slice 512² map
    is 0.5 GB, where :func:`write_volume` would first make float32 copies of 1 GB each. A DICOM series goes
    through :func:`write_volume`.

    Args:
        labels: integers ``(Z, Y, X)`` within int16, e.g. explanation word ids + 1.
        geometry: spacing, origin, direction (and DICOM header) of the grid; its voxels are not read.
        path, series_description, overwrite: as for :func:`write_volume`.

    Raises:
        InputError: ``labels`` is not an integer array of ``geometry``'s shape within int16.
        OverwriteError, UnsupportedFormatError: as for :func:`write_volume`.
    """
    if labels.shape != tuple(geometry.shape) or labels.dtype.kind not in "iu":
        raise InputError(f"labels must be integers of shape {tuple(geometry.shape)}, got {labels.dtype} {labels.shape}")
    if labels.size and (int(labels.min()) < _INT16.min or int(labels.max()) > _INT16.max):
        raise InputError("label values must fit in int16")
    fmt = format_for_writing(path)
    if fmt is Format.DICOM:
        return write_volume(geometry.with_hu(labels), path, series_description=series_description, overwrite=overwrite)
    from langmamba.io import itk_formats

    output = Path(path).expanduser()
    check_not_input(output, [geometry.source])
    with atomic_output(output, as_folder=False, overwrite=overwrite) as staging:
        itk_formats.write_array(labels.astype(np.int16, copy=False), geometry, staging / output.name)
    return output
