"""NIfTI, NRRD and MetaImage volumes: reading into and writing from :class:`CTVolume`.

NRRD and MetaImage go through SimpleITK, which already uses the LPS conventions of CTVolume.
NIfTI is read with nibabel: the NIfTI library inside ITK silently opens ``name.nii`` when asked for
``name.nii.gz`` if both exist, which could hand back the wrong volume. nibabel's RAS affine (sform,
else qform) is converted to LPS. Writing uses SimpleITK for all three formats, so the files carry
the qform/sform codes and space fields that 3D Slicer and ITK expect.
"""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.spatialimages import SpatialImage
from numpy.typing import NDArray

from langmamba.errors import CorruptFileError, UnsupportedImageError
from langmamba.io.limits import MAX_NIFTI_HEADER_BYTES, MAX_VOLUME_BYTES, check_volume_bytes
from langmamba.io.volume import CTVolume

logger = logging.getLogger(__name__)

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
_ORTHONORMAL_TOLERANCE = 1e-3
_INT16 = np.iinfo(np.int16)
# sizeof_hdr -> byte offset and struct format of vox_offset, for NIfTI-1 and NIfTI-2
_NIFTI_VOX_OFFSET = {348: (108, "f"), 540: (168, "q")}
_EXTENSION_STEP = 1 << 20


def _check_dimensions(path: Path, shape: tuple[int, ...], components: int) -> None:
    """Reject colour/vector pixels, 2-D pictures and 4-D series; ``shape`` is in file (x, y, z, t) order."""
    if components > 1:
        raise UnsupportedImageError(
            f"{path}: pixels have {components} components (colour/RGB or vector image); "
            "langmamba needs a grey-value CT volume in HU"
        )
    spatial = tuple(shape[:3]) if len(shape) == 4 and shape[3] == 1 else tuple(shape)
    if len(spatial) < 3:
        raise UnsupportedImageError(
            f"{path}: a {len(spatial)}-D image of size {'x'.join(map(str, spatial))}; langmamba needs a 3-D CT volume"
        )
    if len(spatial) > 3:
        raise UnsupportedImageError(
            f"{path}: a {len(shape)}-D image of size {'x'.join(map(str, shape))} (time series or "
            "vector field?); langmamba needs a single 3-D CT volume"
        )


def _geometry_from_matrix(path: Path, matrix: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
    """Split a 3×3 LPS matrix (columns = axis step vectors, mm) into spacing and unit directions."""
    spacing = np.linalg.norm(matrix, axis=0)
    if not np.all(spacing > 0):
        raise CorruptFileError(f"{path}: the header gives a voxel size of 0 mm")
    direction = matrix / spacing
    if np.abs(direction.T @ direction - np.eye(3)).max() > _ORTHONORMAL_TOLERANCE:
        raise UnsupportedImageError(
            f"{path}: the voxel axes are not perpendicular (sheared affine); resample the image "
            "onto a regular grid first"
        )
    return spacing, direction


def _check_nifti_extensions(path: Path) -> None:
    """Refuse a NIfTI file whose header extensions would make nibabel read more than
    :data:`MAX_NIFTI_HEADER_BYTES` before any check: nibabel reads each extension whole at the size it declares
    (up to 2 GB), even past the voxel offset. Files this cannot parse are left to nibabel to report."""
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as handle:
            head = handle.read(540 + 4)
            if len(head) < 348:
                return
            for order in "<>":
                sizeof_hdr = struct.unpack_from(order + "i", head)[0]
                if sizeof_hdr in _NIFTI_VOX_OFFSET:
                    break
            else:
                return
            at, kind = _NIFTI_VOX_OFFSET[sizeof_hdr]
            vox_offset = struct.unpack_from(order + kind, head, at)[0]
            if not 0 <= vox_offset <= MAX_NIFTI_HEADER_BYTES:
                raise CorruptFileError(
                    f"{path}: the NIfTI header declares voxels at byte {vox_offset:g}; langmamba "
                    f"reads headers and extensions of at most {MAX_NIFTI_HEADER_BYTES:,} bytes"
                )
            if len(head) < sizeof_hdr + 4 or head[sizeof_hdr : sizeof_hdr + 1] == b"\0":
                return  # no extensions
            left = int(vox_offset) - sizeof_hdr - 4
            if left < 0:  # nibabel would read extensions to the end of the file
                raise CorruptFileError(
                    f"{path}: the NIfTI header has extensions but declares voxels at byte "
                    f"{vox_offset:g}, inside the header"
                )
            handle.seek(sizeof_hdr + 4)
            while left >= 16:
                step = handle.read(8)
                size = struct.unpack_from(order + "i", step)[0] if len(step) == 8 else -1
                if not 8 <= size <= left:
                    raise CorruptFileError(
                        f"{path}: damaged NIfTI header extension (size {size} where "
                        f"{left} bytes are left before the voxels)"
                    )
                skip = size - 8
                while skip > 0 and (chunk := handle.read(min(_EXTENSION_STEP, skip))):
                    skip -= len(chunk)
                left -= size
    except (OSError, EOFError):  # not gzip, unreadable: nibabel says why
        return


def read_nifti(path: Path, *, max_bytes: int | None = MAX_VOLUME_BYTES) -> CTVolume:
    """Read a ``.nii``/``.nii.gz`` file (scaled by ``scl_slope``/``scl_inter``) into a CTVolume.

    Args:
        path: the file.
        max_bytes: the size limit checked from the header before reading voxels (:mod:`langmamba.io.limits`).

    Returns:
        CTVolume with ``hu`` of shape ``(Z, Y, X)`` (float32, not yet checked for HU).
    """
    _check_nifti_extensions(path)
    try:
        image = nib.load(str(path))
        if not isinstance(image, SpatialImage):
            raise TypeError(f"nibabel read a {type(image).__name__}, not an image with a voxel grid")
        dtype = image.get_data_dtype()
        shape = tuple(int(n) for n in image.shape)
    except Exception as err:  # nibabel raises many types for damaged headers
        raise CorruptFileError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err})") from err
    components = len(dtype.names) if dtype.names else 1
    _check_dimensions(path, shape, components)
    if dtype.kind == "c":
        raise UnsupportedImageError(f"{path}: complex-valued voxels; langmamba needs CT values in HU")
    check_volume_bytes(str(path), shape, dtype.itemsize, max_bytes)
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as err:  # truncated or corrupt compressed data
        raise CorruptFileError(f"{path}: the voxel data cannot be read (truncated or damaged file: {err})") from err
    data = data.reshape(shape[:3])
    lps = _RAS_TO_LPS @ np.asarray(image.affine, dtype=np.float64)[:3, :]
    spacing, direction = _geometry_from_matrix(path, lps[:, :3])
    return CTVolume(
        hu=np.ascontiguousarray(data.transpose(2, 1, 0)),
        spacing=tuple(spacing),
        origin=tuple(lps[:, 3]),
        direction=direction,
        source=str(path),
    )


def read_sitk(
    path: Path, format_name: str, *, max_bytes: int | None = MAX_VOLUME_BYTES, image_io: str | None = None
) -> CTVolume:
    """Read an NRRD (``.nrrd``/``.nhdr``) or MetaImage (``.mha``/``.mhd``) file into a CTVolume.

    Args:
        path: the file (a header, for detached ``.nhdr``/``.mhd``).
        format_name: the format named in error messages.
        max_bytes: the size limit checked from the header before reading voxels (:mod:`langmamba.io.limits`).
        image_io: the ITK ImageIO to read with (e.g. ``"NrrdImageIO"``); ``None``: ITK picks one by content.

    Returns:
        CTVolume with ``hu`` of shape ``(Z, Y, X)`` (float32, not yet checked for HU).
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    if image_io is not None:
        reader.SetImageIO(image_io)
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise CorruptFileError(f"{path}: cannot be read as {format_name} (damaged header)") from err
    _check_dimensions(path, tuple(reader.GetSize()), reader.GetNumberOfComponents())
    check_volume_bytes(str(path), reader.GetSize(), _element_bytes(reader.GetPixelID()), max_bytes)
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise CorruptFileError(f"{path}: the voxel data cannot be read (truncated file or missing data file)") from err
    ndim = image.GetDimension()
    data = sitk.GetArrayViewFromImage(image).astype(np.float32).reshape(image.GetSize()[:3][::-1])
    matrix = np.asarray(image.GetDirection()).reshape(ndim, ndim)[:3, :3] * np.asarray(image.GetSpacing()[:3])
    spacing, direction = _geometry_from_matrix(path, matrix)
    return CTVolume(
        hu=data,
        spacing=tuple(spacing),
        origin=tuple(image.GetOrigin()[:3]),
        direction=direction,
        source=str(path),
    )


def _element_bytes(pixel_id: int) -> int:
    """Bytes per voxel component of a SimpleITK pixel type (8, the largest real type, if SimpleITK cannot say)."""
    try:
        size = sitk.Image([1, 1, 1], pixel_id).GetSizeOfPixelComponent()
    except RuntimeError:
        size = 0
    return size or 8


def reject_picture(path: Path, *, inspect: bool = True) -> None:
    """Raise :class:`UnsupportedImageError` describing a picture file (PNG, JPEG, TIFF ...); its size and colours
    only when ``inspect`` (ITK picks its reader by content, and a "picture" may be any file)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        if not inspect:
            raise RuntimeError("not inspected")
        reader.ReadImageInformation()
        size = "x".join(str(n) for n in reader.GetSize())
        kind = "colour (RGB)" if reader.GetNumberOfComponents() > 1 else "grey-scale"
        what = f"a {reader.GetDimension()}-D {kind} picture of {size} pixels"
    except RuntimeError:
        what = "a picture file"
    raise UnsupportedImageError(
        f"{path}: {what}, without Hounsfield units or patient geometry; langmamba needs a 3-D CT "
        "volume (DICOM series, NIfTI, NRRD or MetaImage)"
    )


def storage_array(hu: NDArray[Any]) -> NDArray[Any]:
    """Values to store: int16 when every HU is an integer in range (exact, half the size), else float32."""
    if hu.size and float(hu.min()) >= _INT16.min and float(hu.max()) <= _INT16.max and np.array_equal(hu, np.rint(hu)):
        return hu.astype(np.int16)
    return hu.astype(np.float32, copy=False)


def write_sitk(volume: CTVolume, filename: Path) -> None:
    """Write ``volume`` to ``filename`` (format from its extension) with SimpleITK.

    Args:
        volume: the CT volume; ``hu`` of shape ``(Z, Y, X)``.
        filename: the file to create, normally inside the temporary folder of
            :func:`langmamba.io.atomic.atomic_output`.

    Raises:
        OSError: SimpleITK could not write the file (disk full, permissions ...).
    """
    write_array(storage_array(volume.hu), volume, filename)


def write_array(values: NDArray[Any], geometry: CTVolume, filename: Path) -> None:
    """Write ``values (Z, Y, X)``, stored in their own dtype, on the grid of ``geometry`` (its voxels are not
    read) to ``filename`` with SimpleITK; errors as :func:`write_sitk`."""
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(tuple(geometry.direction.flatten()))
    try:
        sitk.WriteImage(image, str(filename), True)
    except RuntimeError as err:
        raise OSError(f"could not write {filename.name}: {str(err).strip().splitlines()[-1]}") from err
