"""Confinement of image ids and result writes to the datastore.

- An image id names a datastore entry, never a path: ids with a separator, a NUL or control character, a leading
  dot or ``~``, or over 200 characters are refused exactly like unknown ids (one error, 404, whatever the path, so
  the server never tells which paths exist).
- Results are written only as ``<studies>/<name>.nrrd`` (the extension is the server's), never through a symlink,
  never over an existing file unless the request asked to replace an earlier result of the same image.
- Start-up removes the hidden temporaries that an interrupted atomic write (:mod:`langmamba.io.atomic`) leaves.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from langmamba.errors import InputError, OverwriteError

logger = logging.getLogger(__name__)

RESULT_SUFFIX = ".nrrd"
_ID = re.compile(r"[^/\\\x00-\x1f\x7f]{1,200}")
_TEMPORARY = re.compile(r"\..+\.(tmp|old)-[0-9a-f]{8}")  # langmamba.io.atomic's hidden siblings


class ImageNotFoundError(InputError):
    """The request names no usable datastore image (unknown id, a path, or an empty or unreadable entry)."""


def not_found(image_id: str) -> ImageNotFoundError:
    """The one error for every image id that does not name a usable datastore entry."""
    shown = image_id if len(image_id) <= 80 else image_id[:77] + "..."
    return ImageNotFoundError(f"the datastore holds no usable image with id {shown!r}")


def check_image_id(image_id: str) -> str:
    """``image_id`` if it can only name a datastore entry; else :func:`not_found`."""
    if (
        not isinstance(image_id, str)
        or not _ID.fullmatch(image_id)
        or image_id[0] in ".~"
        or image_id != image_id.strip()
    ):
        raise not_found(str(image_id))
    return image_id


def check_servable(path: Path, image_id: str) -> Path:
    """``path`` (a datastore entry's file or DICOM folder) if it can be read: not empty, readable."""
    try:
        if path.is_dir():
            if not any(p.is_file() for p in path.iterdir()):
                raise OSError("empty folder")
            return path
        if path.stat().st_size == 0:
            raise OSError("empty file")
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as err:
        logger.warning("refusing to serve a datastore entry: %s", err.strerror or err)
        raise not_found(image_id) from err
    return path


def result_path(studies: Path, name: str, *, listed: bool, overwrite: bool, replaceable: bool) -> Path:
    """Where a result called ``name`` is written: ``<studies>/<name>.nrrd``.

    Args:
        studies: the datastore's image folder.
        name: the result's image id.
        listed: the datastore already holds an image ``name`` (in any format).
        overwrite: the request asked to replace an existing result.
        replaceable: that existing image is an earlier LangMamba result of the same source, stored as NRRD.

    Raises:
        OverwriteError: the target exists (and may not be replaced), is a symlink, or lies outside ``studies``.
    """
    root = studies.resolve()
    target = root / f"{check_image_id(name)}{RESULT_SUFFIX}"
    if target.parent != root:
        raise OverwriteError(f"the result name {name!r} does not stay in the studies folder")
    if target.is_symlink():
        raise OverwriteError(f"the result {name!r} would be written through a symbolic link; refused")
    if listed or target.exists():
        if not overwrite:
            raise OverwriteError(
                f'the datastore already holds {name!r}; pass "overwrite": true in params to replace it'
            )
        if not replaceable:
            raise OverwriteError(
                f"the datastore entry {name!r} is not an earlier LangMamba result of this image; it is never replaced"
            )
    return target


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Remove the hidden temporaries of interrupted atomic writes directly in ``folder``; returns their names.
    Symlinks are unlinked, never followed."""
    removed = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        if not _TEMPORARY.fullmatch(entry.name):
            continue
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink(missing_ok=True)
        else:
            shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    if removed:
        logger.warning("removed %d temporary file(s) left by an interrupted write in the studies folder", len(removed))
    return removed
