"""langmamba.io.archive: unpacking untrusted zip archives (zip bombs, lying headers, many entries, links, paths)."""

from __future__ import annotations

import gzip
import io
import stat
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from langmamba.errors import EmptyInputError, InputError, VolumeTooLargeError
from langmamba.io import read_volume
from langmamba.io.archive import MAX_ZIP_MEMBERS, copy_at_most, count_members, extract_zip_series
from tests.measure import measured

MiB = 1 << 20
GiB = 1 << 30


def deflated_zeros(size: int) -> bytes:
    """A raw deflate stream of ``size`` zero bytes (a multiple of 1 MiB), about 1 kB per MiB: one fully flushed
    block repeated, so a 2 GiB stream takes milliseconds to make."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(MiB)) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert compressor.compress(bytes(MiB)) + compressor.flush(zlib.Z_FULL_FLUSH) == block  # independent blocks
    return block * (size // MiB) + compressor.flush(zlib.Z_FINISH)


def zip_bytes(
    members: list[dict], entries_declared: int | None = None, zip64: bool = False, prefix: bytes = b""
) -> bytes:
    """A zip archive written byte by byte, so its headers can say what a test needs.

    Each member: ``name``, ``data`` (as stored), and optionally ``method`` (8 deflate, 0 stored), ``size``
    (declared unpacked size), ``crc``, ``mode`` (Unix mode in the external attributes), ``flags``.
    ``entries_declared``: the entry count the end record claims; ``zip64``: end with ZIP64 end records;
    ``prefix``: bytes before the archive (a self-extracting archive's program), not counted in its offsets.
    """
    body, directory = io.BytesIO(), io.BytesIO()
    for member in members:
        name, data = member["name"].encode(), member["data"]
        method, size = member.get("method", 0), member.get("size", len(member["data"]))
        crc, flags = member.get("crc", zlib.crc32(data) if method == 0 else 0), member.get("flags", 0)
        offset = body.tell()
        body.write(
            struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, flags, method, 0, 0x21, crc, len(data), size, len(name), 0)
            + name
            + data
        )
        attributes = member.get("mode", 0o100644) << 16
        directory.write(
            struct.pack(
                "<4s6H3L5H2L",
                b"PK\x01\x02",
                0x031E,
                20,
                flags,
                method,
                0,
                0x21,
                crc,
                len(data),
                size,
                len(name),
                0,
                0,
                0,
                0,
                attributes,
                offset,
            )
            + name
        )
    count = len(members) if entries_declared is None else entries_declared
    if not zip64:
        end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, directory.tell(), body.tell(), 0)
    else:
        record = body.tell() + directory.tell()
        end = (
            struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, directory.tell(), body.tell())
            + struct.pack("<4sLQL", b"PK\x06\x07", 0, record, 1)
            + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
        )
    return prefix + body.getvalue() + directory.getvalue() + end


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_zipped_dicom_series_unpacks_flat_and_reads_confined(tmp_path, dicom_ct_series):
    source, volume = dicom_ct_series
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(source.iterdir()):
            zipped.write(path, f"study/series/{path.name}")
        zipped.writestr("study/.DS_Store", b"junk")
        zipped.writestr("__MACOSX/study/._000.dcm", b"resource fork")
        zipped.writestr("study/empty/", b"")
    folder = extract_zip_series(archive, tmp_path / "unpacked", max_bytes=10 * MiB)
    assert folder == tmp_path / "unpacked"
    files = sorted(folder.iterdir())
    assert [p.name for p in files] == [f"{i:06d}.dcm" for i in range(volume.shape[0])]
    assert [p.read_bytes() for p in files] == [p.read_bytes() for p in sorted(source.iterdir())]
    np.testing.assert_array_equal(read_volume(folder, confined=True).hu, volume.hu)


def test_member_paths_are_never_used(tmp_path):
    names = ["../../escape.dcm", "/etc/cron.d/x", "a/../../b.dcm", "C:\\windows\\x.dcm", "ok.dcm"]
    archive = write(tmp_path / "paths.zip", zip_bytes([{"name": n, "data": n.encode()} for n in names]))
    (tmp_path / "out").mkdir()
    folder = extract_zip_series(archive, tmp_path / "out" / "series", max_bytes=MiB)
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.dcm" for i in range(len(names))]
    assert [p.read_bytes() for p in sorted(folder.iterdir())] == [n.encode() for n in names]
    assert not (tmp_path.parent / "b.dcm").exists() and not (tmp_path.parent / "escape.dcm").exists()
    assert {p.relative_to(tmp_path) for p in tmp_path.rglob("*")} == {
        Path("paths.zip"),
        Path("out"),
        Path("out/series"),
        *(Path("out/series") / f"{i:06d}.dcm" for i in range(5)),
    }


@pytest.mark.parametrize(
    "declared, max_bytes, expected",
    [
        ("honest", GiB, ("VolumeTooLargeError", "unpacks to 2,147,483,648 bytes, more than the limit")),
        ("honest", 4 * GiB, ("VolumeTooLargeError", "more than 100 times its size")),  # the server's 4x 1 GiB uploads
        ("lying", 4 * GiB, ("InputError", "cannot be read (Bad CRC-32")),
    ],
)
def test_a_zip_bomb_is_refused_at_once(tmp_path, declared, max_bytes, expected):
    """2 MB that inflate to 2 GiB of zeros, declared as such or as 1,000 bytes."""
    bomb = deflated_zeros(2 * GiB)
    size = 2 * GiB if declared == "honest" else 1000
    archive = write(tmp_path / "bomb.zip", zip_bytes([{"name": "bomb.dcm", "data": bomb, "method": 8, "size": size}]))
    assert archive.stat().st_size < 2.5e6
    result = measured(
        "from langmamba.io.archive import extract_zip_series",
        f"extract_zip_series({str(archive)!r}, {str(tmp_path / 'series')!r}, max_bytes={max_bytes})",
    )
    assert result["error"][0] == expected[0] and expected[1] in result["error"][1], result["error"]
    assert result["cpu_s"] < 2.0
    assert result["memory_growth"] < 200 * MiB
    assert not (tmp_path / "series").exists()


def test_sizes_that_add_up_beyond_the_limit_are_refused_before_unpacking(tmp_path):
    block = deflated_zeros(64 * MiB)
    archive = write(
        tmp_path / "many.zip",
        zip_bytes([{"name": f"{i}.dcm", "data": block, "method": 8, "size": 64 * MiB, "crc": 0} for i in range(40)]),
    )
    start = time.process_time()
    with pytest.raises(
        VolumeTooLargeError, match="unpacks to 2,684,354,560 bytes, more than the limit of 1,073,741,824"
    ):
        extract_zip_series(archive, tmp_path / "series", max_bytes=GiB)
    assert time.process_time() - start < 1.0
    assert not (tmp_path / "series").exists()


def test_archives_that_unpack_far_beyond_their_size_are_refused(tmp_path):
    """A bomb within the size limit: 100 MiB of zeros in 100 kB; zeros below the floor of 64 MiB are accepted."""
    bomb = write(
        tmp_path / "bomb.zip",
        zip_bytes(
            [
                {
                    "name": "a.dcm",
                    "data": deflated_zeros(100 * MiB),
                    "method": 8,
                    "size": 100 * MiB,
                    "crc": zlib.crc32(bytes(100 * MiB)),
                }
            ]
        ),
    )
    with pytest.raises(VolumeTooLargeError, match=r"unpacks to 104,857,600 bytes, more than 100 times its size"):
        extract_zip_series(bomb, tmp_path / "series", max_bytes=GiB)
    assert not (tmp_path / "series").exists()
    assert (
        extract_zip_series(bomb, tmp_path / "series", max_bytes=GiB, max_ratio=2000) / "000000.dcm"
    ).stat().st_size == 100 * MiB
    small = write(
        tmp_path / "small.zip",
        zip_bytes(
            [
                {
                    "name": "a.dcm",
                    "data": deflated_zeros(10 * MiB),
                    "method": 8,
                    "size": 10 * MiB,
                    "crc": zlib.crc32(bytes(10 * MiB)),
                }
            ]
        ),
    )
    assert (extract_zip_series(small, tmp_path / "small", max_bytes=GiB) / "000000.dcm").read_bytes() == bytes(10 * MiB)


def test_unpacked_bytes_are_counted_while_copying(tmp_path):
    """The copy stops at the budget whatever the source says about itself (here a gzip stream, 1 GiB of zeros)."""
    compressed = io.BytesIO(gzip.compress(bytes(64 * MiB), compresslevel=1) * 16)
    target = tmp_path / "out"
    with (
        open(target, "wb") as out,
        gzip.GzipFile(fileobj=compressed) as source,
        pytest.raises(VolumeTooLargeError, match="more than 3,000,000 bytes"),
    ):
        copy_at_most(source, out, 3_000_000)
    assert target.stat().st_size <= 3_000_000
    with open(tmp_path / "small", "wb") as out:
        assert copy_at_most(io.BytesIO(b"x" * 1000), out, 1000) == 1000


def test_too_many_entries_are_refused_before_zipfile_lists_them(tmp_path):
    many = zip_bytes([{"name": f"{i}", "data": b""} for i in range(MAX_ZIP_MEMBERS + 1)])
    archive = write(tmp_path / "many.zip", many)
    start = time.process_time()
    with pytest.raises(InputError, match=f"more than {MAX_ZIP_MEMBERS:,} entries"):
        extract_zip_series(archive, tmp_path / "series", max_bytes=GiB)
    assert time.process_time() - start < 1.0
    assert not (tmp_path / "series").exists()
    assert count_members(archive, MAX_ZIP_MEMBERS + 1) == MAX_ZIP_MEMBERS + 1


def test_the_entry_count_is_counted_not_taken_from_the_end_record(tmp_path):
    archive = write(
        tmp_path / "lying.zip", zip_bytes([{"name": f"{i}.dcm", "data": b"x"} for i in range(150)], entries_declared=1)
    )
    assert count_members(archive, 1000) == 150
    with pytest.raises(InputError, match="more than 100 entries"):
        extract_zip_series(archive, tmp_path / "series", max_bytes=MiB, max_members=100)
    assert len(list(extract_zip_series(archive, tmp_path / "series", max_bytes=MiB, max_members=150).iterdir())) == 150


@pytest.mark.parametrize("zip64, prefix", [(False, b"#!/bin/sh\nexit 0\n"), (True, b""), (True, b"MZ" * 100)])
def test_archives_with_a_prefix_or_zip64_end_records_are_counted(tmp_path, zip64, prefix):
    """Self-extracting archives (a program before the zip) and ZIP64 end records: the directory is found as
    zipfile finds it."""
    members = [{"name": f"{i}.dcm", "data": b"slice %d" % i} for i in range(3)]
    archive = write(tmp_path / "a.zip", zip_bytes(members, zip64=zip64, prefix=prefix))
    assert count_members(archive, 10) == 3
    with pytest.raises(InputError, match="more than 2 entries"):
        extract_zip_series(archive, tmp_path / "series", max_bytes=MiB, max_members=2)
    folder = extract_zip_series(archive, tmp_path / "series", max_bytes=MiB)
    assert [p.read_bytes() for p in sorted(folder.iterdir())] == [m["data"] for m in members]


@pytest.mark.parametrize(
    "member, message",
    [
        ({"name": "link.dcm", "data": b"/etc/passwd", "mode": stat.S_IFLNK | 0o777}, "symbolic link"),
        ({"name": "secret.dcm", "data": b"x" * 12, "flags": 0x1}, "encrypted"),
        ({"name": "bz.dcm", "data": b"BZh9", "method": 12}, "compression method 12"),
    ],
)
def test_links_encryption_and_unbounded_compressions_are_refused(tmp_path, member, message):
    archive = write(tmp_path / "bad.zip", zip_bytes([{"name": "fine.dcm", "data": b"slice"}, member]))
    with pytest.raises(InputError, match=message):
        extract_zip_series(archive, tmp_path / "series", max_bytes=MiB)
    assert not (tmp_path / "series").exists()


def test_a_damaged_member_leaves_no_folder(tmp_path):
    archive = write(
        tmp_path / "bad.zip",
        zip_bytes(
            [{"name": "a.dcm", "data": b"slice"}, {"name": "b.dcm", "data": b"garbage!", "method": 8, "size": 100}]
        ),
    )
    with pytest.raises(InputError, match="cannot be read"):
        extract_zip_series(archive, tmp_path / "series", max_bytes=MiB)
    assert not (tmp_path / "series").exists()


def test_empty_and_non_zip_inputs(tmp_path):
    empty = io.BytesIO()
    with zipfile.ZipFile(empty, "w") as zipped:
        zipped.writestr("folder/", b"")
        zipped.writestr(".hidden", b"x")
    with pytest.raises(EmptyInputError, match="holds no files"):
        extract_zip_series(write(tmp_path / "empty.zip", empty.getvalue()), tmp_path / "a", max_bytes=MiB)
    for name, data in [
        ("text.zip", b"not a zip at all"),
        ("cut.zip", zip_bytes([{"name": "a", "data": b"x"}])[:-5]),
        ("nothing.zip", b""),
    ]:
        with pytest.raises(InputError, match="cannot be read"):
            extract_zip_series(write(tmp_path / name, data), tmp_path / "b", max_bytes=MiB)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
