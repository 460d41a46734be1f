"""Confined reading: an untrusted input (an upload to a server) may make the reader open nothing but itself.

NRRD and MetaImage headers can name another file that holds the voxels (``data file: /etc/shadow`` in a
``.nhdr``, ``ElementDataFile = ../other.raw`` in a ``.mhd``), and a path can be a symbolic link to any file: a
server that reads such an upload hands back the bytes of a file the client could not otherwise read. In confined
mode (:func:`langmamba.io.read_volume` with ``confined=True``) the input must be a regular file (or a folder of
regular files) that holds its own voxels; a user's own detached headers are still read without it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from langmamba.errors import CorruptFileError, InputError, UnsafeInputError
from langmamba.io.formats import Format

MAX_HEADER_BYTES = 1 << 20
"""Longest NRRD or MetaImage header read in confined mode (Slicer's segmentation headers are a few kB)."""
_NRRD_MAGIC = b"NRRD000"
_ITK_IO = {Format.NRRD: "NrrdImageIO", Format.METAIMAGE: "MetaImageIO"}


def itk_io_name(fmt: Format) -> str:
    """The ITK ImageIO that must read a confined ``fmt`` file, so that no other reader's rules apply to it."""
    return _ITK_IO[fmt]


def check_not_link(path: Path) -> None:
    """Raise :class:`UnsafeInputError` when ``path`` itself is a symbolic link."""
    try:
        mode = os.lstat(path).st_mode
    except OSError as err:
        raise InputError(f"{path}: cannot be opened ({err.strerror})") from err
    if stat.S_ISLNK(mode):
        raise UnsafeInputError(f"{path}: a symbolic link; only the uploaded file itself is read")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UnsafeInputError(f"{path}: not a regular file or folder")


def check_folder_entries(folder: Path) -> None:
    """Raise :class:`UnsafeInputError` when an entry of ``folder`` is a symbolic link or a special file."""
    for entry in os.scandir(folder):
        if entry.is_symlink():
            raise UnsafeInputError(f"{folder}: holds a symbolic link; only the uploaded files themselves are read")
        if not (entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)):
            raise UnsafeInputError(f"{folder}: holds a special file (device, pipe or socket)")


def _header_lines(path: Path, until, what: str) -> list[bytes]:
    """The header lines of ``path`` (opened without following links) up to and including the line for which
    ``until(line)`` is true, or to the end of the file; at most :data:`MAX_HEADER_BYTES`."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        raise UnsafeInputError(f"{path}: cannot be opened as a regular file ({err.strerror})") from err
    with os.fdopen(fd, "rb") as handle:
        head = handle.read(MAX_HEADER_BYTES + 1)
    lines = []
    start = 0
    while start < len(head):
        end = head.find(b"\n", start)
        if end < 0:
            if len(head) > MAX_HEADER_BYTES:
                break
            end = len(head)
        line = head[start:end].rstrip(b"\r")
        lines.append(line)
        if until(line):
            return lines
        start = end + 1
    if len(head) > MAX_HEADER_BYTES:
        raise CorruptFileError(f"{path}: the {what} header does not end within {MAX_HEADER_BYTES:,} bytes")
    return lines


def _field_name(line: bytes, separator: bytes) -> str:
    return line.split(separator, 1)[0].decode("latin-1").replace(" ", "").replace("\t", "").lower()


def check_nrrd_self_contained(path: Path) -> None:
    """Raise :class:`UnsafeInputError` when the NRRD header of ``path`` names a data file (``data file:``, a
    list or a pattern of files) instead of holding its voxels after the header.

    Raises:
        CorruptFileError: the file does not start with the NRRD magic, or its header does not end within
            :data:`MAX_HEADER_BYTES`.
    """
    lines = _header_lines(path, lambda line: line == b"", "NRRD")
    if not lines or not lines[0].startswith(_NRRD_MAGIC):
        raise CorruptFileError(f"{path}: not an NRRD file (no 'NRRD000x' magic on the first line)")
    for line in lines[1:]:
        if line.startswith(b"#") or b":" not in line:
            continue
        if _field_name(line, b":") == "datafile":
            raise UnsafeInputError(
                f"{path}: a detached NRRD header (its 'data file' field names another file); upload an NRRD "
                "file that holds its own voxels (.nrrd with attached data)"
            )


def check_metaimage_self_contained(path: Path) -> None:
    """Raise :class:`UnsafeInputError` when the MetaImage header of ``path`` has ``ElementDataFile`` other
    than ``LOCAL`` (a separate ``.raw`` file, a list or a pattern of files).

    Raises:
        CorruptFileError: the header has no ``ElementDataFile`` within :data:`MAX_HEADER_BYTES`.
    """
    lines = _header_lines(path, lambda line: b"=" in line and _field_name(line, b"=") == "elementdatafile",
                          "MetaImage")
    last = lines[-1] if lines else b""
    if not (b"=" in last and _field_name(last, b"=") == "elementdatafile"):
        raise CorruptFileError(f"{path}: not a MetaImage file (no ElementDataFile in its header)")
    if last.split(b"=", 1)[1].strip().upper() != b"LOCAL":
        raise UnsafeInputError(
            f"{path}: a MetaImage header whose ElementDataFile names another file; upload a MetaImage file "
            "that holds its own voxels (.mha, ElementDataFile = LOCAL)"
        )


def check_confined(path: Path, fmt: Format | None) -> None:
    """Raise :class:`UnsafeInputError` unless reading ``path`` (a file of format ``fmt``, or a DICOM folder when
    ``fmt`` is ``None``) opens nothing but ``path`` itself (or the regular files directly inside the folder)."""
    check_not_link(path)
    if fmt is None:
        check_folder_entries(path)
    elif fmt is Format.NRRD:
        check_nrrd_self_contained(path)
    elif fmt is Format.METAIMAGE:
        check_metaimage_self_contained(path)
