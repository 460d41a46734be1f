"""Which file format a path names, for reading and for writing."""

from __future__ import annotations

import enum
import os
from pathlib import Path

from langmamba.errors import UnsupportedFormatError


class Format(enum.Enum):
    """File formats langmamba reads; all but ``PICTURE`` are also written."""

    DICOM = "DICOM"
    NIFTI = "NIfTI"
    NRRD = "NRRD"
    METAIMAGE = "MetaImage"
    PICTURE = "picture"  # recognised only to explain why it cannot be used


_SUFFIXES: dict[str, Format] = {
    ".nii": Format.NIFTI,
    ".nii.gz": Format.NIFTI,
    ".nrrd": Format.NRRD,
    ".nhdr": Format.NRRD,
    ".mha": Format.METAIMAGE,
    ".mhd": Format.METAIMAGE,
    ".png": Format.PICTURE,
    ".jpg": Format.PICTURE,
    ".jpeg": Format.PICTURE,
    ".bmp": Format.PICTURE,
    ".gif": Format.PICTURE,
    ".tif": Format.PICTURE,
    ".tiff": Format.PICTURE,
}
_DICOM_SUFFIXES = {".dcm", ".dicom", ".ima", ""}
_DICM_OFFSET = 128
SUPPORTED_TEXT = (
    "a DICOM series folder or DICOM file, NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd)"
)


def suffix_of(path: str | os.PathLike[str]) -> str:
    """Lower-case extension of ``path``, with ``.nii.gz`` as one extension; ``""`` if none."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def has_dicom_magic(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 marker ``DICM`` after its 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            handle.seek(_DICM_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def format_for_reading(path: Path) -> Format:
    """Format of an existing file, from its DICOM marker or else its extension.

    DICOM files are often named by UID (``1.3.12.2.1107...``), so the marker is checked before
    the extension; a file without extension, or ``.dcm``/``.ima``, is taken as DICOM.

    Raises:
        UnsupportedFormatError: the extension is not one langmamba reads.
    """
    suffix = suffix_of(path)
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    if has_dicom_magic(path) or suffix in _DICOM_SUFFIXES:
        return Format.DICOM
    raise UnsupportedFormatError(f"{path}: unknown file type {suffix!r}; langmamba reads {SUPPORTED_TEXT}")


def format_for_writing(path: str | os.PathLike[str]) -> Format:
    """Format of an output path: by extension, or a DICOM series folder.

    A path ending in ``/``, an existing folder, or a name without extension is a DICOM series
    folder (one file per slice). Folder names containing a dot need the trailing ``/``.

    Raises:
        UnsupportedFormatError: the extension names no format langmamba writes.
    """
    text = os.fspath(path)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return Format.DICOM
    suffix = suffix_of(text)
    if suffix == "":
        return Format.DICOM
    fmt = _SUFFIXES.get(suffix)
    if fmt is None or fmt is Format.PICTURE:
        hint = (
            " (a DICOM series is written to a folder: give a path without extension)"
            if (suffix in _DICOM_SUFFIXES)
            else ""
        )
        raise UnsupportedFormatError(
            f"{text}: cannot write {suffix!r} files{hint}; langmamba writes NIfTI (.nii, .nii.gz), "
            "NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"
        )
    return fmt
