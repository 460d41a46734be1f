"""Confined reading: an untrusted input (an upload to a server) may make the reader open nothing but itself.

NRRD and MetaImage headers can name another file that holds the voxels (``data file: /etc/shadow`` in a
``.nhdr``, ``ElementDataFile = ../other.raw`` in a ``.mhd``), and a path can be a symbolic link to any file: a
server that reads such an upload hands back the bytes of a file the client could not otherwise read. In confined
mode (:func:`langmamba.io.read_volume` with ``confined=True``) the input must be a regular file (or a folder of
regular files) that holds its own voxels; a user's own detached headers are still read without it.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

from langmamba.errors import CorruptFileError, InputError, UnsafeInputError
from langmamba.io.formats import Format

MAX_HEADER_BYTES = 1 << 20
"""Longest NRRD or MetaImage header read in confined mode (Slicer's segmentation headers are a few kB)."""
_NRRD_MAGIC = b"NRRD000"
_ITK_IO = {Format.NRRD: "NrrdImageIO", Format.METAIMAGE: "MetaImageIO"}
_TEEM_LINE_END = re.compile(rb"\r\n|\r|\n")  # teem (NRRD) ends lines at any of these
_METAIO_LINE_END = re.compile(rb"\n")  # MetaIO ends them at "\n" only
_LOCAL = (b"LOCAL", b"Local", b"local")  # the spellings MetaIO reads as "after this header"; others name a file


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


def _header_lines(path: Path, line_end: re.Pattern[bytes], until: Callable[[bytes], bool], what: str) -> list[bytes]:
    """The header lines of ``path`` (opened without following links, split at ``line_end`` as its reader splits
    them) up to and including the first line for which ``until(line)`` is true, or to the end of the file; at most
    :data:`MAX_HEADER_BYTES`.

    Raises:
        CorruptFileError: no such line within :data:`MAX_HEADER_BYTES` and the file is longer.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        raise UnsafeInputError(f"{path}: cannot be opened as a regular file ({err.strerror})") from err
    with os.fdopen(fd, "rb") as handle:
        head = handle.read(MAX_HEADER_BYTES + 1)
    complete = head if len(head) <= MAX_HEADER_BYTES else head[: max(head.rfind(b"\n"), head.rfind(b"\r"), 0)]
    lines = []
    for line in line_end.split(complete):
        lines.append(line)
        if until(line):
            return lines
    if len(head) > MAX_HEADER_BYTES:
        raise CorruptFileError(f"{path}: the {what} header does not end within {MAX_HEADER_BYTES:,} bytes")
    return lines


def _squeezed(name: bytes) -> str:
    """A field name as compared here: lower case without blanks (a superset of what the readers accept)."""
    return re.sub(r"\s", "", name.decode("latin-1")).lower()


def check_nrrd_self_contained(path: Path) -> None:
    """Raise :class:`UnsafeInputError` when the NRRD header of ``path`` names a data file (``data file:``, a
    list or a pattern of files) instead of holding its voxels after the header.

    Raises:
        CorruptFileError: the file does not start with the NRRD magic, or its header does not end within
            :data:`MAX_HEADER_BYTES`.
    """
    lines = _header_lines(path, _TEEM_LINE_END, lambda line: line == b"", "NRRD")
    if not lines or not lines[0].startswith(_NRRD_MAGIC):
        raise CorruptFileError(f"{path}: not an NRRD file (no 'NRRD000x' magic on the first line)")
    for line in lines[1:]:
        if line.startswith(b"#") or b":" not in line:
            continue
        if _squeezed(line.split(b":", 1)[0]).startswith("datafile"):  # "data file", "datafile", "data files"
            raise UnsafeInputError(
                f"{path}: a detached NRRD header (its 'data file' field names another file); upload an NRRD "
                "file that holds its own voxels (.nrrd with attached data)"
            )


def _metaimage_field(line: bytes) -> tuple[bytes, bytes] | None:
    """``(name, value)`` of a MetaImage header line as MetaIO splits it: the name ends at the first ``=`` or
    ``:``, the value starts after the run of separators and blanks that follows."""
    match = re.match(rb"\s*([^=:]*?)[ \t]*[=:][=:\s]*(.*?)\s*$", line)
    return (match.group(1), match.group(2)) if match else None


def _is_data_file_line(line: bytes) -> bool:
    """Whether MetaIO reads ``line`` as the ``ElementDataFile`` field, the last of the header."""
    field = _metaimage_field(line)
    return field is not None and field[0] == b"ElementDataFile"


def _names_another_file(line: bytes) -> bool:
    """Whether ``line``, or a part of it after a ``\\r``, is an ``ElementDataFile`` field in any spelling of the
    name whose value is not ``LOCAL`` (stricter than MetaIO, so that no reading of the line names a file)."""
    for part in [line, *_TEEM_LINE_END.split(line)]:
        field = _metaimage_field(part)
        if field is not None and _squeezed(field[0]) == "elementdatafile" and field[1] not in _LOCAL:
            return True
    return False


def check_metaimage_self_contained(path: Path) -> None:
    """Raise :class:`UnsafeInputError` when the MetaImage header of ``path`` has an ``ElementDataFile`` (in any
    spelling of the name, up to the line that MetaIO reads as the last) other than ``LOCAL``: a separate ``.raw``
    file, a list or a pattern of files.

    Raises:
        CorruptFileError: the header has no ``ElementDataFile`` within :data:`MAX_HEADER_BYTES`.
    """
    lines = _header_lines(path, _METAIO_LINE_END, _is_data_file_line, "MetaImage")
    if not lines or not _is_data_file_line(lines[-1]):
        raise CorruptFileError(f"{path}: not a MetaImage file (no ElementDataFile in its header)")
    if any(_names_another_file(line) for line in lines):
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
