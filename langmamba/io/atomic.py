"""Safe, all-or-nothing writing of output files and folders.

Every atomic write in langmamba goes through here: the writer writes into a hidden temporary folder next
to the output (same file system, so the final move is a rename) and the result only moves into place once
everything was written. A failure part-way leaves no partial output and no temporary files behind, and an
existing output is replaced only with ``overwrite=True``. Nothing is ever written over the input volume.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from langmamba.errors import OverwriteError
from langmamba.io.formats import has_dicom_magic


def _is_within(inner: Path, outer: Path) -> bool:
    """True when ``inner`` is ``outer`` or lies below it (both resolved)."""
    return inner == outer or outer in inner.parents


def check_not_input(output: Path, sources: Iterable[str | os.PathLike[str] | None]) -> None:
    """Refuse an output that equals, lies inside, or contains an input path.

    Args:
        output: the path about to be written (file or folder).
        sources: the paths the volume(s) were read from; ``None`` entries are ignored.

    Raises:
        OverwriteError: the output would replace or sit inside an input, or an input sits inside
            the output folder (replacing the folder would delete it).
    """
    out = Path(output).expanduser().resolve()
    for source in sources:
        if source is None:
            continue
        src = Path(source).expanduser().resolve()
        if _is_within(out, src):
            raise OverwriteError(
                f"refusing to write {output}: it is (or lies inside) the input {source}; "
                "choose an output path outside the input"
            )
        if _is_within(src, out):
            raise OverwriteError(
                f"refusing to write {output}: the input {source} lies inside it and would be "
                "replaced; choose another output path"
            )


def _check_replaceable_folder(folder: Path) -> None:
    """Only a folder of DICOM files (a previous output) may be replaced, never arbitrary data."""
    for entry in folder.iterdir():
        if not entry.is_file() or not has_dicom_magic(entry):
            raise OverwriteError(
                f"refusing to replace the folder {folder}: it holds {entry.name!r}, which is not a "
                "DICOM file; remove it yourself or choose another output folder"
            )


def check_replaceable(output: Path, *, as_folder: bool, overwrite: bool) -> None:
    """Raise :class:`OverwriteError` if ``output`` exists and may not be replaced.

    Args:
        output: the final output path.
        as_folder: whether the output is a folder (DICOM series) rather than a file.
        overwrite: whether the caller allowed replacing an existing output.
    """
    if not output.exists() and not output.is_symlink():
        return
    if not overwrite:
        raise OverwriteError(f"{output} already exists; pass overwrite=True to replace it")
    if as_folder and not output.is_dir():
        raise OverwriteError(f"cannot write a DICOM folder to {output}: a file of that name exists")
    if not as_folder and output.is_dir():
        raise OverwriteError(f"cannot write a file to {output}: a folder of that name exists")
    if as_folder:
        _check_replaceable_folder(output)


def _temporary_sibling(output: Path, tag: str) -> Path:
    return output.parent / f".{output.name}.{tag}-{uuid.uuid4().hex[:8]}"


def _publish_folder(staging: Path, output: Path) -> None:
    """Rename ``staging`` to ``output``, swapping out an existing output folder."""
    if not output.exists():
        os.rename(staging, output)
        return
    backup = _temporary_sibling(output, "old")
    os.rename(output, backup)
    try:
        os.rename(staging, output)
    except OSError:
        os.rename(backup, output)
        raise
    if backup.is_dir():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.unlink(missing_ok=True)


def _publish_files(staging: Path, output: Path, overwrite: bool) -> None:
    """Move the files written in ``staging`` next to ``output``; the main file goes last.

    Formats with a detached data file (``.mhd``/``.nhdr``) write two files; moving the data file
    first means the header never points at a missing file.
    """
    written = sorted(staging.iterdir(), key=lambda p: p.name == output.name)
    if output.name not in {p.name for p in written}:
        raise OSError(f"the writer did not produce {output.name}")
    for file in written:
        target = output.parent / file.name
        if target != output and target.exists() and not overwrite:
            raise OverwriteError(f"{target} already exists; pass overwrite=True to replace it")
    for file in written:
        os.replace(file, output.parent / file.name)


@contextmanager
def atomic_output(output: Path, *, as_folder: bool, overwrite: bool = False) -> Iterator[Path]:
    """Give the writer a temporary folder and publish its content to ``output`` on success.

    For ``as_folder=True`` the writer fills the yielded folder, which is then renamed to
    ``output``. Otherwise the writer writes ``<yielded>/<output.name>`` (plus any detached data
    file), which is then moved next to ``output``. On any exception the temporary folder is
    deleted and the exception propagates; ``output`` is left as it was.

    Args:
        output: final path of the file or folder.
        as_folder: the output is a folder of files (a DICOM series).
        overwrite: replace an existing output (checked again, after the checks of the caller).

    Yields:
        The temporary folder to write into (a hidden sibling of ``output``).
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(output, as_folder=as_folder, overwrite=overwrite)
    staging = _temporary_sibling(output, "tmp")
    staging.mkdir()
    try:
        yield staging
        if as_folder:
            _publish_folder(staging, output)
        else:
            _publish_files(staging, output, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_folder(output: str | os.PathLike[str]) -> Iterator[Path]:
    """Give the writer a temporary folder that then replaces the folder ``output`` whole.

    For folders langmamba itself makes and owns (a training checkpoint, a data-cache entry, a bundle): an
    existing ``output`` is swapped out whatever it holds, unlike :func:`atomic_output`, which replaces only a
    folder of DICOM files a user may have pointed it at. On any exception the temporary folder is deleted
    and ``output`` is left as it was.

    Yields:
        The temporary folder to fill (a hidden sibling ``.<name>.tmp-XXXXXXXX`` of ``output``).
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = _temporary_sibling(output, "tmp")
    staging.mkdir()
    try:
        yield staging
        _publish_folder(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_npz(path: str | os.PathLike[str], arrays: Mapping[str, NDArray[Any]], *, compressed: bool = True) -> Path:
    """Write ``arrays`` to the ``.npz`` file ``path`` through :func:`atomic_output`, replacing an earlier file:
    readers never see half a file. ``compressed=False`` for arrays that are compressed already."""
    path = Path(path)
    with atomic_output(path, as_folder=False, overwrite=True) as staging, open(staging / path.name, "wb") as handle:
        (np.savez_compressed if compressed else np.savez)(handle, **arrays)
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_output`, replacing an earlier file."""
    path = Path(path)
    with atomic_output(path, as_folder=False, overwrite=True) as staging:
        (staging / path.name).write_text(text, encoding="utf-8")
    return path
