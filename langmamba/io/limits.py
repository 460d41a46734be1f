"""Size limits checked from a header before anything of the size it declares is allocated.

A header of a kilobyte can declare a volume of any size (``sizes: 512 512 1900`` of ``type: double`` is 4 GB);
readers that trust it allocate first and find the data missing afterwards. Every reader of :mod:`langmamba.io`
calls :func:`check_volume_bytes` with the header's declared size before reading voxels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, BinaryIO

from langmamba.errors import CorruptFileError, VolumeTooLargeError

HU_BYTES = 4
"""Bytes per voxel of the float32 HU array every reader returns."""
MAX_VOLUME_BYTES = 512 * 512 * 2000 * HU_BYTES
"""Default ``max_bytes`` of :func:`langmamba.io.read_volume`: a float32 volume of 2,000 slices of 512×512 (2.1 GB),
the MONAI Label server's default ``max_voxels``."""

MAX_NIFTI_HEADER_BYTES = 16 << 20
"""Most bytes of a NIfTI header with its extensions (the voxel offset); extensions are read whole into memory."""
MAX_SLICES = 100_000
"""Most frames of one DICOM series: each costs its header's bookkeeping whatever its size (1×1-pixel frames)."""
MAX_DICOM_HEADER_READS = 2_500_000
"""Most reads pydicom may make parsing the headers of one series (or file). A header element costs about 3 reads
(3.4 µs each, so at most about 8.5 s in all, under the server's 10 s per request for an attack): a CT slice's header
takes a few hundred, so a series at the volume limit (2,000 slices) fits with room to spare; a file of 8-byte
filler elements (20 MB took 8 s) is refused when the reads run out."""


def volume_bytes(shape: Sequence[int], element_bytes: int) -> int:
    """Bytes of the largest array a read of ``shape`` allocates: the voxels as stored (``element_bytes`` each) or
    the float32 HU array, whichever is larger."""
    voxels = 1
    for size in shape:
        voxels *= int(size)
    return voxels * max(int(element_bytes), HU_BYTES)


def check_volume_bytes(where: str, shape: Sequence[int], element_bytes: int, max_bytes: int | None) -> None:
    """Raise :class:`VolumeTooLargeError` when a volume of ``shape`` (any order, from a header) with
    ``element_bytes`` per stored voxel needs more than ``max_bytes`` bytes (see :func:`volume_bytes`).

    Args:
        where: the file named in the message.
        shape: the declared size of every axis, in voxels.
        element_bytes: bytes per stored voxel.
        max_bytes: the limit in bytes; ``None``: no limit.
    """
    if max_bytes is None:
        return
    if any(int(size) < 0 for size in shape):
        raise VolumeTooLargeError(f"{where}: the header declares a negative size {tuple(shape)}")
    needed = volume_bytes(shape, element_bytes)
    if needed > max_bytes:
        size = "x".join(str(int(n)) for n in shape)
        raise VolumeTooLargeError(
            f"{where}: the header declares {size} voxels of {element_bytes} byte(s), {needed / 1e9:.2f} GB to "
            f"read; the limit (max_bytes) is {max_bytes:,} bytes ({max_bytes / 1e9:.2f} GB)"
        )


def check_dicom_bytes(headers: Iterable[Any], where: str, max_bytes: int | None) -> None:
    """Refuse, from the headers (pydicom datasets) of one series' image files, a series of more than
    :data:`MAX_SLICES` frames or larger than ``max_bytes`` (as :func:`check_volume_bytes`, every file counted at
    the largest Rows, Columns and BitsAllocated), before its frames are listed or its voxels allocated.

    Raises:
        VolumeTooLargeError: the series is too large.
        CorruptFileError: a header's image size is not a number.
    """
    headers = list(headers)
    try:
        frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in headers)
        rows = max(int(ds.Rows) for ds in headers)
        cols = max(int(ds.Columns) for ds in headers)
        element_bytes = max(-(-int(ds.get("BitsAllocated", 16) or 16) // 8) for ds in headers)
    except (AttributeError, TypeError, ValueError) as err:
        raise CorruptFileError(f"{where}: damaged image size in a DICOM header ({err})") from err
    if frames > MAX_SLICES:
        raise VolumeTooLargeError(f"{where}: the headers declare {frames:,} frames; the limit is {MAX_SLICES:,}")
    check_volume_bytes(where, (frames, rows, cols), element_bytes, max_bytes)


class ReadBudget:
    """Reads left for parsing the DICOM headers of one task's files, ``reads`` of the ``limit`` for the whole series
    (:data:`MAX_DICOM_HEADER_READS`) named in the error; :meth:`wrap` hands pydicom a file whose reads count."""

    def __init__(self, reads: int, where: str, limit: int) -> None:
        self.left, self.where, self.limit = int(reads), where, limit

    def wrap(self, handle: BinaryIO) -> _CountedFile:
        return _CountedFile(handle, self)

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise VolumeTooLargeError(
                f"{self.where}: the DICOM headers hold more elements than langmamba parses (at most {self.limit:,} "
                "reads for one series; a CT slice's header takes a few hundred)"
            )


class _CountedFile:
    """A binary file whose ``read`` calls are counted against a :class:`ReadBudget`."""

    def __init__(self, handle: BinaryIO, budget: ReadBudget) -> None:
        self._handle, self._budget = handle, budget
        self.name = getattr(handle, "name", None)

    def read(self, size: int = -1) -> bytes:
        self._budget.spend()
        return self._handle.read(size)

    def __getattr__(self, name: str) -> Any:  # seek, tell, close ... as the file's own
        return getattr(self._handle, name)
