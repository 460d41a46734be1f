"""Unpacking an untrusted zip archive of a DICOM series, within limits on its members and unpacked size.

A zip can be tiny and unpack to gigabytes (a zip bomb), declare sizes it does not keep, hold millions of entries
(each one a parse of its own), name paths outside the target folder (``../../x``) or hold symbolic links.
:func:`extract_zip_series` counts the entries of the central directory itself before :mod:`zipfile` builds its
list of them, refuses declared sizes above the limit before unpacking anything, counts the bytes actually
unpacked while it writes them, and uses no name or path from the archive.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO, BinaryIO

from langmamba.errors import EmptyInputError, InputError, VolumeTooLargeError

MAX_ZIP_MEMBERS = 10_000
"""Default most entries of an archive: a series of 2,000 slices with room for viewers and reports beside it."""
MAX_ZIP_RATIO = 100.0
"""Default most unpacked bytes per byte of archive. Deflate packs a CT series 2-10 times and zeros about 1,000
times; files made of repeated bytes are what a bomb unpacks to, and parsing them as DICOM costs minutes of CPU."""
RATIO_FLOOR_BYTES = 64 << 20
"""Archives unpacking to at most this many bytes are never refused for their ratio."""
_CHUNK = 1 << 20
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL_ENTRY = struct.Struct("<4s6H3L5H2L")
_EOCD_SEARCH = _EOCD.size + 0xFFFF  # the record, then a comment of at most 64 KiB
# zipfile bounds what one read of a deflated member unpacks; bzip2 and LZMA members it unpacks whole per read.
_BOUNDED_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})


def _central_directory(handle: BinaryIO, size: int) -> tuple[int, int]:
    """``(offset, size)`` in bytes of the central directory, located from the end record (ZIP64 included)."""
    tail_start = max(0, size - _EOCD_SEARCH)
    handle.seek(tail_start)
    tail = handle.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise zipfile.BadZipFile("no end of central directory record")
    _, _, _, _, _, cd_size, _, _ = _EOCD.unpack_from(tail, at)
    record = tail_start + at
    locator = record - _ZIP64_LOCATOR.size
    if locator >= 0:
        handle.seek(locator)
        signature = _ZIP64_LOCATOR.unpack(handle.read(_ZIP64_LOCATOR.size))[0]
        if signature == b"PK\x06\x07":
            record = locator - _ZIP64_EOCD.size
            handle.seek(record)
            fields = _ZIP64_EOCD.unpack(handle.read(_ZIP64_EOCD.size))
            if fields[0] != b"PK\x06\x06":
                raise zipfile.BadZipFile("damaged ZIP64 end of central directory record")
            cd_size = fields[8]
    # Measured back from the end record, as zipfile does, so data prepended to the archive does not matter.
    offset = record - cd_size
    if offset < 0:
        raise zipfile.BadZipFile("the central directory does not fit in the file")
    return offset, cd_size


def count_members(archive: Path, max_members: int) -> int:
    """Entries of the central directory of ``archive`` (counted, not the count the end record declares), reading
    no further than entry ``max_members + 1``.

    Raises:
        InputError: the archive holds more than ``max_members`` entries, or is not a readable zip.
    """
    try:
        with open(archive, "rb") as handle:
            offset, cd_size = _central_directory(handle, os.fstat(handle.fileno()).st_size)
            handle.seek(offset)
            count = position = 0
            while position < cd_size:
                entry = handle.read(_CENTRAL_ENTRY.size)
                if len(entry) < _CENTRAL_ENTRY.size or entry[:4] != b"PK\x01\x02":
                    raise zipfile.BadZipFile("damaged central directory")
                fields = _CENTRAL_ENTRY.unpack(entry)
                variable = fields[10] + fields[11] + fields[12]  # name, extra field, comment
                handle.seek(variable, os.SEEK_CUR)
                position += _CENTRAL_ENTRY.size + variable
                count += 1
                if count > max_members:
                    raise InputError(
                        f"the uploaded zip archive holds more than {max_members:,} entries, the limit (max_members)"
                    )
    except (zipfile.BadZipFile, struct.error) as err:
        raise InputError(f"the uploaded zip archive cannot be read ({err})") from err
    return count


def _is_link(member: zipfile.ZipInfo) -> bool:
    """A Unix symbolic link stored as such (its mode in the high bits of the external attributes)."""
    return stat.S_ISLNK(member.external_attr >> 16)


def copy_at_most(source: IO[bytes], target: IO[bytes], budget: int) -> int:
    """Copy ``source`` to ``target`` in chunks and return the bytes copied, raising
    :class:`VolumeTooLargeError` as soon as they would exceed ``budget`` (nothing past it is written)."""
    copied = 0
    while chunk := source.read(min(_CHUNK, budget - copied + 1)):
        copied += len(chunk)
        if copied > budget:
            raise VolumeTooLargeError(f"the uploaded zip archive unpacks to more than {budget:,} bytes")
        target.write(chunk)
    return copied


def extract_zip_series(
    archive: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    max_bytes: int,
    max_members: int = MAX_ZIP_MEMBERS,
    max_ratio: float = MAX_ZIP_RATIO,
) -> Path:
    """Unpack the files of a zipped DICOM series into the new ``folder``, flattened and renamed
    ``000000.dcm``, ``000001.dcm`` ... in archive order (no name or path from the archive is used).

    Folders and hidden files (a name starting with ``.``, e.g. macOS ``__MACOSX/._x``) are skipped. Nothing is
    unpacked unless the archive holds at most ``max_members`` entries (counted in its central directory) whose
    declared sizes add up to at most ``max_bytes`` and to at most ``max_ratio`` times the archive's size (above
    :data:`RATIO_FLOOR_BYTES`), none of them a symbolic link, encrypted, or compressed other than stored or
    deflated; while unpacking, the bytes actually written are counted against ``max_bytes`` too.
    On any error ``folder`` is removed again.

    Args:
        archive: the zip file.
        folder: the folder to create (its parent must exist; it must not).
        max_bytes: most bytes unpacked, all files together.
        max_members: most entries of the archive, folders and skipped files included.
        max_ratio: most unpacked bytes per byte of the archive file.

    Returns:
        ``folder``.

    Raises:
        VolumeTooLargeError: the files unpack (declared or actually) to more than ``max_bytes``, or to more
            than ``max_ratio`` times the archive's size.
        EmptyInputError: the archive holds no files.
        InputError: more than ``max_members`` entries, a symbolic link, an encrypted or bzip2/LZMA member, or a
            damaged archive (a size or CRC that does not match the data included).
    """
    archive, folder = Path(archive), Path(folder)
    count_members(archive, max_members)
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir() and not Path(m.filename).name.startswith(".")]
            if not members:
                raise EmptyInputError("the uploaded zip archive holds no files")
            _check_members(members, max_bytes)
            _check_ratio(sum(m.file_size for m in members), archive.stat().st_size, max_ratio)
            folder.mkdir()
            try:
                written = 0
                for index, member in enumerate(members):
                    with zipped.open(member) as source, open(folder / f"{index:06d}.dcm", "xb") as target:
                        written += copy_at_most(source, target, max_bytes - written)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError) as err:
        raise InputError(f"the uploaded zip archive cannot be read ({err})") from err
    return folder


def _check_members(members: list[zipfile.ZipInfo], max_bytes: int) -> None:
    """Refuse, before unpacking, links, encrypted members, compressions other than stored/deflated (bzip2 and
    LZMA members are unpacked by :mod:`zipfile` without an output bound) and declared sizes above ``max_bytes``."""
    for member in members:
        if _is_link(member):
            raise InputError("the uploaded zip archive holds a symbolic link; zip the files themselves")
        if member.flag_bits & 0x1:
            raise InputError("the uploaded zip archive is encrypted; upload it without a password")
        if member.compress_type not in _BOUNDED_METHODS:
            raise InputError(
                f"the uploaded zip archive uses compression method {member.compress_type}; zip it stored or "
                "deflated (the ordinary zip compression)"
            )
    declared = sum(m.file_size for m in members)
    if declared > max_bytes:
        raise VolumeTooLargeError(
            f"the uploaded zip archive unpacks to {declared:,} bytes, more than the limit of {max_bytes:,} bytes"
        )


def _check_ratio(unpacked: int, packed: int, max_ratio: float) -> None:
    if unpacked > RATIO_FLOOR_BYTES and unpacked > max_ratio * packed:
        raise VolumeTooLargeError(
            f"the uploaded zip archive of {packed:,} bytes unpacks to {unpacked:,} bytes, more than {max_ratio:g} "
            "times its size (max_ratio); a CT series packs far less tightly (a zip bomb?)"
        )
