"""The prepared training set's file: slices, lesion masks and candidate words in one ``.npz`` file.

Preparing runs where the data and the vision-language model live (reading DICOM, scoring words); training then
needs nothing but this file, numpy and torch, which is what a GPU machine without the imaging stack has.

Format 2 stores every slice losslessly as int16 HU, its two bytes split into planes and compressed with LZMA
(Python's standard library), and lesion masks as LZMA-compressed bit planes: on body-cropped CT this is 25-30 %
smaller than the zlib of ``np.savez_compressed`` (measured on lung1, RIDER, platipy and Lung-PET-CT-Dx), which
is what lets all training and validation cases fit one 64 MiB copy to a GPU machine. Per slice it keeps the
patient, case, split role, pixel spacing, crop offset and slice index. Format 1 files still load.
"""

from __future__ import annotations

import json
import lzma
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.atomic import write_npz
from .slices import CTSlice

FORMAT = 2
READABLE_FORMATS = (1, 2)


def write_prepared(
    output: str | Path,
    slices: Sequence[CTSlice],
    words: Sequence[Sequence[np.ndarray]],
    codebook: np.ndarray,
    vocabulary: Sequence[str],
    language_space: dict,
    thresholds: Sequence[float],
) -> Path:
    """Write a prepared set of format :data:`FORMAT` atomically to ``output`` (.npz); returns its path.

    Args:
        slices: the slices (HU, with their patient, case, role, crop offset and index).
        words: per slice, the candidate word ids of each pyramid level.
        codebook: ``(V, E)`` word embeddings of the language space.
        vocabulary: the ``V`` words.
        language_space: the language space's description (``describe()``), stored as JSON.
        thresholds: the word-selection threshold of each level.
    """
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT),
        "spacing_mm": np.array([s.spacing_mm for s in slices], np.float64),
        "patients": np.array([s.patient for s in slices]),
        "cases": np.array([s.case or "" for s in slices]),
        "roles": np.array([s.role or "" for s in slices]),
        "offsets": np.array([s.offset for s in slices], np.int32).reshape(-1, 2),
        "indices": np.array([-1 if s.index is None else s.index for s in slices], np.int32),
        "shapes": np.array([s.full.shape for s in slices], np.int32).reshape(-1, 2),
        "codebook": np.asarray(codebook),
        "vocabulary": np.array(vocabulary),
        "language_space": np.array(json.dumps(language_space)),
        "thresholds": np.array(thresholds, np.float64),
    }
    for i, (s, per_level) in enumerate(zip(slices, words)):
        arrays[f"full_{i}"] = _pack_hu(s.full)
        if s.low is not None:
            arrays[f"low_{i}"] = _pack_hu(s.low)
        if s.label is not None:
            arrays[f"label_{i}"] = _pack_mask(s.label)
        for level, ids in enumerate(per_level):
            arrays[f"words{level}_{i}"] = np.asarray(ids, np.int64)
    return write_npz(output, arrays, compressed=False)  # the slices are compressed already


def _origin(extra: dict[str, np.ndarray], i: int) -> dict:
    """Case, role, crop offset and slice index of slice ``i`` (format 2; format 1 files have none)."""
    if "cases" not in extra:
        return {}
    index = int(extra["indices"][i])
    return {
        "case": str(extra["cases"][i]) or None,
        "role": str(extra["roles"][i]) or None,
        "offset": (int(extra["offsets"][i][0]), int(extra["offsets"][i][1])),
        "index": index if index >= 0 else None,
    }


def _pack_hu(hu: np.ndarray) -> np.ndarray:
    """uint8 blob: ``b"i"`` + LZMA of the int16 HU's low-byte plane then high-byte plane (lossless, integer HU),
    or ``b"f"`` + LZMA of float32 values (non-integer HU, e.g. real low-dose pairs stored as floats)."""
    values = _compact(hu)
    if values.dtype == np.int16:
        planes = np.ascontiguousarray(values.astype("<i2").view(np.uint8).reshape(-1, 2).T).tobytes()
        return np.frombuffer(b"i" + lzma.compress(planes, preset=6), np.uint8)
    return np.frombuffer(b"f" + lzma.compress(values.astype("<f4").tobytes(), preset=6), np.uint8)


def _unpack_hu(blob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """float32 HU (H, W) of a :func:`_pack_hu` blob."""
    raw = blob.tobytes()
    data = lzma.decompress(raw[1:])
    if raw[:1] == b"i":
        planes = np.frombuffer(data, np.uint8).reshape(2, -1)
        return np.ascontiguousarray(planes.T).view("<i2").reshape(shape).astype(np.float32)
    return np.frombuffer(data, "<f4").reshape(shape).astype(np.float32)


def _pack_mask(mask: np.ndarray) -> np.ndarray:
    return np.frombuffer(lzma.compress(np.packbits(np.asarray(mask, bool)).tobytes(), preset=6), np.uint8)


def _unpack_mask(blob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    bits = np.frombuffer(lzma.decompress(blob.tobytes()), np.uint8)
    return np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)


def _compact(hu: np.ndarray) -> np.ndarray:
    """int16 when that is lossless (clinical CT stores integer HU), float32 otherwise."""
    if np.all(hu == np.rint(hu)) and hu.min() >= -32768 and hu.max() <= 32767:
        return hu.astype(np.int16)
    return hu.astype(np.float32)


def load_prepared(path: str | Path) -> tuple[list[CTSlice], dict]:
    """The slices of a prepared file and its language space: ``codebook`` (V, E), ``vocabulary``, ``describe``."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(
            f"{path} is not a prepared training set (.npz written by `langmamba prepare-data`): {error}"
        ) from None
    with archive:
        version = int(archive["format"]) if "format" in archive else None
        if version not in READABLE_FORMATS:
            formats = " or ".join(map(str, READABLE_FORMATS))
            raise InputError(f"{path} is not a prepared training set of format {formats}")
        count = len(archive["patients"])
        extra = {name: archive[name] for name in ("cases", "roles", "offsets", "indices", "shapes") if name in archive}
        names = set(archive.files)
        slices = []
        for i, (spacing, patient) in enumerate(zip(archive["spacing_mm"], archive["patients"])):
            if version == 1:
                get = lambda name, i=i: archive[f"{name}_{i}"] if f"{name}_{i}" in names else None  # noqa: E731
                full, low, label = get("full").astype(np.float32), get("low"), get("label")
                low = None if low is None else low.astype(np.float32)
            else:
                shape = tuple(int(n) for n in extra["shapes"][i])
                full = _unpack_hu(archive[f"full_{i}"], shape)
                low = _unpack_hu(archive[f"low_{i}"], shape) if f"low_{i}" in names else None
                label = _unpack_mask(archive[f"label_{i}"], shape) if f"label_{i}" in names else None
            slices.append(
                CTSlice(
                    full=full,
                    spacing_mm=tuple(spacing),
                    patient=str(patient),
                    low=low,
                    label=label,
                    words=[archive[f"words{level}_{i}"] for level in range(3)],
                    **_origin(extra, i),
                )
            )
        if len(slices) != count:
            raise InputError(f"{path}: damaged prepared set ({len(slices)} of {count} slices)")
        language = {
            "codebook": archive["codebook"],
            "vocabulary": [str(v) for v in archive["vocabulary"]],
            "describe": json.loads(str(archive["language_space"])),
        }
    return slices, language
