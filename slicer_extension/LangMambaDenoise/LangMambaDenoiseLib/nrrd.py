"""Minimal NRRD reader and writer for 3-D scalar volumes (numpy only; no pynrrd or ITK in the module).

Arrays are ``(K, J, I)`` = ``(Z, Y, X)`` as :func:`slicer.util.arrayFromVolume` gives them; the NRRD
header's first axis is ``I`` (columns), so the C-order bytes of the array are the NRRD's data order.
Geometry is an ``ijk_to_lps`` 4x4 matrix (columns: voxel steps along I, J, K in LPS mm; last column:
LPS mm of voxel (0, 0, 0)). Supported: attached data, ``raw`` and ``gzip`` encodings, integer and
floating-point scalar types, ``space`` LPS or RAS (converted to LPS).
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass

import numpy as np

_TYPES = {
    np.dtype(np.int8): "signed char",
    np.dtype(np.uint8): "unsigned char",
    np.dtype(np.int16): "short",
    np.dtype(np.uint16): "unsigned short",
    np.dtype(np.int32): "int",
    np.dtype(np.uint32): "unsigned int",
    np.dtype(np.int64): "long long",
    np.dtype(np.uint64): "unsigned long long",
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
}
_TYPE_NAMES = {
    np.int8: ("signed char", "int8", "int8_t"),
    np.uint8: ("uchar", "unsigned char", "uint8", "uint8_t"),
    np.int16: ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    np.uint16: ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    np.int32: ("int", "signed int", "int32", "int32_t"),
    np.uint32: ("uint", "unsigned int", "uint32", "uint32_t"),
    np.int64: (
        "longlong",
        "long long",
        "long long int",
        "signed long long",
        "signed long long int",
        "int64",
        "int64_t",
    ),
    np.uint64: ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    np.float32: ("float",),
    np.float64: ("double",),
}
_DTYPE_OF = {name: np.dtype(dtype) for dtype, names in _TYPE_NAMES.items() for name in names}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SPACES = {"left-posterior-superior": "LPS", "lps": "LPS", "right-anterior-superior": "RAS", "ras": "RAS"}


class NrrdError(ValueError):
    """A NRRD file this reader cannot use; the message names the problem."""


@dataclass
class NrrdVolume:
    """A scalar volume: ``array`` ``(Z, Y, X)`` and ``ijk_to_lps`` (4x4, mm)."""

    array: np.ndarray
    ijk_to_lps: np.ndarray

    @property
    def ijk_to_ras(self) -> np.ndarray:
        return _LPS_TO_RAS @ self.ijk_to_lps


def lps_from_ras(ijk_to_ras: np.ndarray) -> np.ndarray:
    """The ``ijk_to_lps`` matrix of a volume whose ``ijk_to_ras`` (Slicer's IJKToRAS) is given."""
    return _LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=np.float64)


def _vector(values) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def encode(array: np.ndarray, ijk_to_lps: np.ndarray, compress: bool = True) -> bytes:
    """NRRD bytes of ``array`` ``(Z, Y, X)`` with geometry ``ijk_to_lps`` (4x4, LPS mm).

    ``compress`` uses gzip level 1 (CT halves in size at little CPU cost).
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise NrrdError(f"only 3-D volumes are written, got shape {array.shape}")
    if array.dtype not in _TYPES:
        raise NrrdError(f"unsupported voxel type {array.dtype}")
    matrix = np.asarray(ijk_to_lps, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise NrrdError("the geometry must be a finite 4x4 matrix")
    z, y, x = array.shape
    header = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {_TYPES[array.dtype]}",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {x} {y} {z}",
        "space directions: " + " ".join(_vector(matrix[:3, axis]) for axis in range(3)),
        "kinds: domain domain domain",
        "endian: little",
        f"encoding: {'gzip' if compress else 'raw'}",
        "space origin: " + _vector(matrix[:3, 3]),
    ]
    data = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False)).tobytes()
    if compress:
        data = gzip.compress(data, compresslevel=1)
    return ("\n".join(header) + "\n\n").encode("ascii") + data


def _parse_vector(text: str, what: str) -> list[float]:
    match = re.fullmatch(r"\(([^)]*)\)", text.strip())
    if not match:
        raise NrrdError(f"cannot read the {what} {text!r}")
    try:
        return [float(v) for v in match.group(1).split(",")]
    except ValueError as error:
        raise NrrdError(f"cannot read the {what} {text!r}") from error


def decode(data: bytes) -> NrrdVolume:
    """Read NRRD bytes (attached data) into a :class:`NrrdVolume` in LPS."""
    if not data.startswith(b"NRRD000"):
        raise NrrdError("not a NRRD file (no NRRD magic)")
    end = data.find(b"\n\n")
    if end < 0:
        raise NrrdError("the NRRD header has no end (blank line)")
    lines = data[:end].decode("ascii", errors="replace").splitlines()[1:]
    fields: dict[str, str] = {}
    for line in lines:
        if line.startswith("#") or ":=" in line or not line.strip():
            continue
        if ":" not in line:
            raise NrrdError(f"cannot read the NRRD header line {line!r}")
        key, value = line.split(":", 1)
        fields[key.strip().lower()] = value.strip()
    if "data file" in fields or "datafile" in fields:
        raise NrrdError("detached NRRD data files are not supported; send a single .nrrd file")
    if int(fields.get("dimension", "0")) != 3:
        raise NrrdError(f"expected a 3-D scalar volume, got dimension {fields.get('dimension')}")
    dtype = _DTYPE_OF.get(fields.get("type", "").lower())
    if dtype is None:
        raise NrrdError(f"unsupported NRRD type {fields.get('type')!r}")
    sizes = [int(v) for v in fields.get("sizes", "").split()]
    if len(sizes) != 3 or min(sizes) < 1:
        raise NrrdError(f"bad NRRD sizes {fields.get('sizes')!r}")
    space = _SPACES.get(fields.get("space", "left-posterior-superior").lower())
    if space is None:
        raise NrrdError(f"unsupported NRRD space {fields.get('space')!r}")
    matrix = np.eye(4)
    if "space directions" in fields:
        vectors = re.findall(r"\([^)]*\)|none", fields["space directions"])
        if len(vectors) != 3 or "none" in vectors:
            raise NrrdError(f"bad NRRD space directions {fields['space directions']!r}")
        for axis, text in enumerate(vectors):
            matrix[:3, axis] = _parse_vector(text, "space direction")
    elif "spacings" in fields:
        matrix[:3, :3] = np.diag([float(v) for v in fields["spacings"].split()])
    if "space origin" in fields:
        matrix[:3, 3] = _parse_vector(fields["space origin"], "space origin")
    if space == "RAS":
        matrix = _LPS_TO_RAS @ matrix
    encoding = fields.get("encoding", "raw").lower()
    payload = data[end + 2 :]
    if encoding in ("gzip", "gz"):
        payload = gzip.decompress(payload)
    elif encoding != "raw":
        raise NrrdError(f"unsupported NRRD encoding {encoding!r} (raw and gzip are read)")
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<" if fields.get("endian", "little").lower() == "little" else ">")
    count = sizes[0] * sizes[1] * sizes[2]
    if len(payload) < count * dtype.itemsize:
        raise NrrdError(f"the NRRD data holds {len(payload)} bytes, {count * dtype.itemsize} expected")
    skip = len(payload) - count * dtype.itemsize if fields.get("byte skip") == "-1" else 0
    array = np.frombuffer(payload, dtype=dtype, count=count, offset=skip).reshape(sizes[::-1])
    return NrrdVolume(array.astype(dtype.newbyteorder("="), copy=True), matrix)
