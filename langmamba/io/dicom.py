"""Reading CT volumes from DICOM: a series folder, one slice file, or an Enhanced (multi-frame) CT.

Slices are ordered along the slice normal and checked by :mod:`langmamba.io.dicom_geometry`.
Stored values become HU through the modality transform (``RescaleSlope``/``RescaleIntercept`` or a
Modality LUT; per frame for Enhanced CT). Compressed transfer syntaxes (JPEG lossless, JPEG 2000)
are decoded with the pylibjpeg plugins first, then pydicom's other handlers.
Voxels equal to ``PixelPaddingValue`` (or inside ``PixelPaddingValue``..``PixelPaddingRangeLimit``)
lie outside the reconstructed field of view; they are set to :data:`AIR_HU` (-1024 HU) so that they
read as air instead of an arbitrary number such as -3024 HU. Values below -1024 HU that are not
declared as padding are kept as stored.

The returned :attr:`CTVolume.dicom` is the header of the first slice (in sorted order) without
pixel data, plus a private element (creator :data:`PRIVATE_CREATOR`) listing the SOP Instance UID
(and frame number, for multi-frame objects) of every slice, so a derived series can reference its
source images slice by slice (:func:`source_references`).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixel_data_handlers.util import apply_modality_lut
from pydicom.uid import UID, CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage
from tqdm import tqdm

from langmamba import workers
from langmamba.errors import (
    CorruptFileError,
    EmptyInputError,
    InputError,
    MixedSeriesError,
    NotAnImageError,
    NotCTError,
    UnsupportedFormatError,
    VolumeTooLargeError,
)
from langmamba.io.dicom_geometry import Frame, frames_of, series_geometry
from langmamba.io.formats import has_dicom_magic, suffix_of
from langmamba.io.limits import MAX_DICOM_HEADER_READS, MAX_VOLUME_BYTES, ReadBudget, check_dicom_bytes
from langmamba.io.validate import check_finite, check_hu_range
from langmamba.io.volume import CTVolume

logger = logging.getLogger(__name__)

AIR_HU = -1024.0
"""HU given to padding voxels (outside the reconstructed field of view)."""

CT_SOP_CLASSES = frozenset({CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage})
PRIVATE_GROUP = 0x0009
PRIVATE_CREATOR = "LANGMAMBA 1"
_SOURCE_UIDS = 0x01
_SOURCE_FRAMES = 0x02
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Objects with pixel data that are not images of the patient: segmentations and dose grids often share a folder
# (and sometimes the series) with the CT they were drawn on, and must not be read as slices of it.
_DERIVED_NON_IMAGE_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage (DICOM SEG)
        "1.2.840.10008.5.1.4.1.1.66.5",  # Surface Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose Storage
    }
)
_DERIVED_NON_IMAGE_MODALITIES = frozenset({"SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "REG"})
# Files in a series folder that are certainly not DICOM and are not worth a forced parse.
_NOT_DICOM_SUFFIXES = frozenset(
    [
        ".nii",
        ".nii.gz",
        ".nrrd",
        ".nhdr",
        ".mha",
        ".mhd",
        ".raw",
        ".zraw",
        ".gz",
        ".png",
        ".jpg",
        ".jpeg",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".txt",
        ".xml",
        ".json",
        ".html",
        ".htm",
        ".pdf",
        ".zip",
        ".exe",
        ".ini",
        ".csv",
    ]
)


@contextmanager
def _quiet_pydicom(path: Path) -> Iterator[None]:
    """Route pydicom's warnings about odd but readable files to the debug log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for item in caught:
        logger.debug("%s: %s", path.name, item.message)


def _sop_class(ds: Dataset) -> UID | None:
    uid = ds.get("SOPClassUID") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", None)
    return UID(str(uid)) if uid else None


# (0008,0016) SOP Class UID and (0008,0060) Modality, little and big endian
_IDENTITY_TAGS = (b"\x08\x00\x16\x00", b"\x08\x00\x60\x00", b"\x00\x08\x00\x16", b"\x00\x08\x00\x60")
_FORCED_PARSE_PREFIX = 1 << 16


def _may_be_dicom(path: Path) -> bool:
    """Whether a file without the Part 10 marker holds the tag of a SOP Class UID or a Modality in its first
    64 kB; a forced parse of anything else (such as a file of zeros, 0.4 s of CPU per MB) finds neither."""
    with open(path, "rb") as handle:
        head = handle.read(_FORCED_PARSE_PREFIX)
    return any(tag in head for tag in _IDENTITY_TAGS)


@overload
def _read_dataset(
    path: Path, *, header_only: bool, strict: Literal[True], budget: ReadBudget | None = None
) -> Dataset: ...
@overload
def _read_dataset(
    path: Path, *, header_only: bool, strict: bool, budget: ReadBudget | None = None
) -> Dataset | None: ...
def _read_dataset(path: Path, *, header_only: bool, strict: bool, budget: ReadBudget | None = None) -> Dataset | None:
    """Read a DICOM file; ``None`` when it is not DICOM and ``strict`` is False.

    Files without the Part 10 preamble are retried with ``force=True`` if their start holds the tag of a SOP Class
    UID or a Modality, and accepted only if they hold one.

    Raises:
        CorruptFileError: a DICOM file (marker or ``strict``) that cannot be parsed.
        VolumeTooLargeError: parsing it took more reads than ``budget`` had left.
    """
    try:
        with _quiet_pydicom(path), open(path, "rb") as handle:
            source = handle if budget is None else budget.wrap(handle)
            ds: Dataset
            try:
                ds = pydicom.dcmread(source, stop_before_pixels=header_only)
            except InvalidDicomError:
                handle.seek(0)
                ds = (
                    pydicom.dcmread(source, stop_before_pixels=header_only, force=True)
                    if _may_be_dicom(path)
                    else Dataset()
                )
            # Parsing is lazy: touching every element surfaces damaged values now.
            for _ in ds.iterall():
                pass
    except VolumeTooLargeError:
        raise
    except PermissionError as err:
        raise InputError(f"{path}: cannot be opened (permission denied)") from err
    except Exception as err:  # pydicom raises many types for damaged files
        if strict or has_dicom_magic(path):
            raise CorruptFileError(f"{path}: damaged DICOM file ({type(err).__name__}: {err})") from err
        return None
    if _sop_class(ds) is None and "Modality" not in ds:
        if strict or has_dicom_magic(path):
            raise CorruptFileError(f"{path}: not a readable DICOM file (no SOP Class, truncated?)")
        return None
    return ds


def _is_image(ds: Dataset, path: Path) -> bool:
    """Whether ``ds`` is an image object; raises for an image object that lost its image header.

    Segmentations (SEG), RT dose grids and other derived objects are not images even though they hold pixels.
    """
    sop = _sop_class(ds)
    if sop in _DERIVED_NON_IMAGE_CLASSES or str(ds.get("Modality", "")) in _DERIVED_NON_IMAGE_MODALITIES:
        return False
    if "Rows" in ds and "Columns" in ds:
        return True
    if any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise CorruptFileError(f"{path}: pixel data without Rows/Columns (damaged header)")
    if sop is not None and "Image" in sop.name:
        raise CorruptFileError(f"{path}: a {sop.name} object without its image attributes (truncated?)")
    return False


def _describe_object(ds: Dataset) -> str:
    sop = _sop_class(ds)
    name = sop.name if sop is not None else "unknown SOP class"
    return f"{name} (Modality {ds.get('Modality', '?')})"


def _decode(ds: Dataset, path: Path) -> NDArray[Any]:
    """Stored pixel values of every frame, shape ``(frames, rows, cols)``."""
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise CorruptFileError(f"{path}: the image has no pixel data (truncated file?)")
    syntax = getattr(ds.get("file_meta"), "TransferSyntaxUID", None)
    try:
        with _quiet_pydicom(path):
            if syntax is not None and syntax.is_compressed:
                try:
                    ds.convert_pixel_data("pylibjpeg")  # exact for signed JPEG 2000, unlike Pillow
                except Exception:
                    logger.debug("%s: pylibjpeg cannot decode %s", path.name, syntax.name)
            pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError) as err:
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise UnsupportedFormatError(f"{path}: no installed decoder reads pixel data compressed as {name}") from err
    except Exception as err:
        raise CorruptFileError(f"{path}: the pixel data cannot be decoded (truncated or damaged: {err})") from err
    return pixels.reshape(-1, int(ds.Rows), int(ds.Columns))


def _padding_mask(ds: Dataset, stored: NDArray[Any]) -> NDArray[Any] | None:
    """Voxels marked as padding by PixelPaddingValue (and PixelPaddingRangeLimit)."""
    if "PixelPaddingValue" not in ds or ds.PixelPaddingValue is None:
        return None
    info = np.iinfo(stored.dtype) if stored.dtype.kind in "iu" else None
    values = []
    for value in (ds.PixelPaddingValue, ds.get("PixelPaddingRangeLimit")):
        if value is None:
            continue
        value = int(value)
        if info is not None and value > info.max:  # signed data with the value read as US
            value -= 1 << (8 * stored.dtype.itemsize)
        elif info is not None and value < info.min:  # unsigned data with the value read as SS
            value += 1 << (8 * stored.dtype.itemsize)
        values.append(value)
    lo, hi = min(values), max(values)
    return (stored >= lo) & (stored <= hi)


def _to_hu(ds: Dataset, stored: NDArray[Any], frames: list[Frame]) -> NDArray[Any]:
    """HU of every frame of one object, float32 ``(frames, rows, cols)``."""
    if frames[0].rescale is None:
        hu = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32).reshape(stored.shape)
    else:
        hu = stored.astype(np.float32)
        for k, frame in enumerate(frames):
            assert frame.rescale is not None, "frames_of gives every frame of a rescaled object its rescale"
            slope, intercept = frame.rescale
            hu[k] = hu[k] * np.float32(slope) + np.float32(intercept)
    padding = _padding_mask(ds, stored)
    if padding is not None:
        hu[padding] = AIR_HU
    return hu


def _header(ds: Dataset, frames: list[Frame]) -> Dataset:
    """The first slice's header plus the private list of source instances (see module doc)."""
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(_SOURCE_UIDS, "UI", [f.sop_uid for f in frames])
    if any(f.multi_frame for f in frames):
        block.add_new(_SOURCE_FRAMES, "UL", [f.index + 1 for f in frames])
    return ds


def source_references(header: Dataset | None) -> list[tuple[str, int | None]]:
    """Per slice ``(SOPInstanceUID, frame number or None)`` of the images a volume was read from.

    Args:
        header: :attr:`CTVolume.dicom` of a volume read from DICOM.

    Returns:
        One entry per slice in volume order; empty when the header carries no such list.
    """
    if header is None:
        return []
    try:
        block = header.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        return []
    if _SOURCE_UIDS not in block:
        return []
    uids = [str(u) for u in _as_list(block[_SOURCE_UIDS].value)]
    frames: list[int | None] = [None] * len(uids)
    if _SOURCE_FRAMES in block:
        frames = [int(v) for v in _as_list(block[_SOURCE_FRAMES].value)]
    return list(zip(uids, frames))


def _as_list(value: Any) -> list[Any]:
    """pydicom gives a single value for VM 1 and a MultiValue otherwise."""
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _read_voxels(items: list[tuple[Path, list[Frame]]], slots: list[list[int]], target: Any) -> list[NDArray[Any]]:
    """Read the HU ``(frames, rows, cols)`` of each ``(file, its frames)`` into the slices ``slots`` of the
    :func:`langmamba.workers.shared_empty` array ``target``, or return them when ``target`` is ``None``; run by
    :mod:`langmamba.workers` processes."""
    volume = None if target is None else workers.open_shared(target)
    voxels = []
    for (path, file_frames), file_slots in zip(items, slots):
        ds = _read_dataset(path, header_only=False, strict=True)
        values = _to_hu(ds, _decode(ds, path), file_frames)
        if values.shape[0] != len(file_frames):
            raise CorruptFileError(f"{path}: {values.shape[0]} frames of pixel data for {len(file_frames)} declared")
        if volume is None:
            voxels.append(values)
        else:
            volume[file_slots] = values
    return voxels


def _volume(
    headers: dict[Path, Dataset], label: str, progress: bool, max_bytes: int | None = MAX_VOLUME_BYTES
) -> CTVolume:
    """Build the volume from the header-only datasets of one series (one or more files), refusing one larger
    than ``max_bytes`` before its frames are listed."""
    modalities = {str(ds.get("Modality", "")) for ds in headers.values()}
    if modalities != {"CT"}:
        named = ", ".join(sorted(m or "missing" for m in modalities))
        raise NotCTError(f"{label}: DICOM Modality is {named}, not CT; langmamba denoises CT only")
    check_dicom_bytes(headers.values(), label, max_bytes)
    frames_by_file = {path: frames_of(ds, path) for path, ds in headers.items()}
    frames = [f for fs in frames_by_file.values() for f in fs]
    geometry = series_geometry(frames, next(iter(headers.values())), label)
    slot = {id(frames[i]): z for z, i in enumerate(geometry.order)}
    items = list(frames_by_file.items())
    slots = [[slot[id(frame)] for frame in file_frames] for _, file_frames in items]
    parts = workers.split(len(items))
    with workers.shared_empty((len(frames), frames[0].rows, frames[0].cols), np.float32) as (hu, target):
        futures = [
            workers.submit(_read_voxels, items[part.start : part.stop], slots[part.start : part.stop], target)
            for part in parts
        ]
        with tqdm(total=len(items), desc="Reading DICOM", unit="file", disable=not progress) as bar:
            for part, voxels in zip(parts, workers.results(futures)):
                for file_slots, values in zip(slots[part.start : part.stop], voxels):
                    hu[file_slots] = values
                bar.update(len(part))
    check_finite(hu, label)
    if any(_sop_class(ds) not in CT_SOP_CLASSES for ds in headers.values()):
        check_hu_range(hu, label)  # e.g. a secondary capture labelled CT
    first = frames[geometry.order[0]]
    with _quiet_pydicom(first.file):  # source UIDs may be malformed
        header = _header(headers[first.file], [frames[i] for i in geometry.order])
    return CTVolume(
        hu=hu,
        spacing=geometry.spacing,
        origin=geometry.origin,
        direction=geometry.direction,
        dicom=header,
        source=label,
    )


def _series_listing(series: dict[str, dict[Path, Dataset]]) -> str:
    lines = []
    for uid, members in series.items():
        ds = next(iter(members.values()))
        description = str(ds.get("SeriesDescription", "")) or "no description"
        lines.append(
            f"  {uid or '(no SeriesInstanceUID)'}: {ds.get('Modality', '?')} '{description}', "
            f"{len(members)} file(s) of {ds.get('Columns', '?')}x{ds.get('Rows', '?')}"
        )
    return "\n".join(lines)


def _scan_headers(paths: list[Path], reads: int, where: str) -> list[tuple[bool, Dataset | None]]:
    """``(empty, header or None when not DICOM)`` of each file, parsed within ``reads`` reads in all (see
    :class:`langmamba.io.limits.ReadBudget`); run by :mod:`langmamba.workers` processes."""
    budget = ReadBudget(reads, where, MAX_DICOM_HEADER_READS)
    scanned: list[tuple[bool, Dataset | None]] = []
    for path in paths:
        if path.stat().st_size == 0:
            scanned.append((True, None))
            continue
        maybe_dicom = suffix_of(path) not in _NOT_DICOM_SUFFIXES or has_dicom_magic(path)
        scanned.append(
            (False, _read_dataset(path, header_only=True, strict=False, budget=budget) if maybe_dicom else None)
        )
    return scanned


def read_dicom_folder(
    folder: Path, *, series_uid: str | None = None, progress: bool = False, max_bytes: int | None = MAX_VOLUME_BYTES
) -> CTVolume:
    """Read the DICOM series stored directly in ``folder`` (subfolders are not searched).

    Non-DICOM files (e.g. ``DICOMDIR``, viewer programs, text files) and non-image objects (structured
    reports, presentation states, RT structure sets and plans, DICOM SEG, RT dose) next to the images are
    ignored.

    Args:
        folder: the series folder.
        series_uid: the SeriesInstanceUID to read when the folder holds several series.
        progress: show a tqdm progress bar.
        max_bytes: the size limit checked from the headers before reading voxels (:mod:`langmamba.io.limits`).

    Returns:
        CTVolume with ``hu`` of shape ``(Z, Y, X)`` in HU and the geometry of the series.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR")
    if not files:
        raise EmptyInputError(
            f"{folder}: the folder holds no files (subfolders are not searched; give the series folder itself)"
        )
    headers: dict[Path, Dataset] = {}
    seen: set[str] = set()
    parts = workers.split(len(files))
    scans = [
        workers.submit(
            _scan_headers,
            files[part.start : part.stop],
            -(-MAX_DICOM_HEADER_READS * len(part) // len(files)),
            str(folder),
        )
        for part in parts
    ]
    scanned = (result for part in workers.results(scans) for result in part)
    for path, (empty, ds) in tqdm(
        zip(files, scanned), total=len(files), desc="Scanning DICOM", unit="file", disable=not progress
    ):
        if empty:
            logger.warning("%s: skipping the empty file %s", folder, path.name)
            continue
        if ds is None:
            logger.info("%s: skipping %s, not a DICOM file", folder, path.name)
            continue
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid and uid in seen:
            logger.info("%s: skipping %s, a copy of an instance already read", folder, path.name)
            continue
        seen.add(uid)
        headers[path] = ds
    if not headers:
        raise EmptyInputError(f"{folder}: none of its {len(files)} files is a DICOM file")
    images = {path: ds for path, ds in headers.items() if _is_image(ds, path)}
    if not images:
        kinds = Counter(_describe_object(ds) for ds in headers.values())
        listing = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
        raise NotAnImageError(f"{folder}: the DICOM files hold no images ({listing})")
    if len(images) < len(headers):
        logger.info("%s: ignoring %d non-image DICOM objects", folder, len(headers) - len(images))
    series: dict[str, dict[Path, Dataset]] = defaultdict(dict)
    for path, ds in images.items():
        series[str(ds.get("SeriesInstanceUID", ""))][path] = ds
    if series_uid is not None:
        if series_uid not in series:
            raise EmptyInputError(f"{folder}: holds no series {series_uid}; it holds:\n{_series_listing(series)}")
        chosen = series[series_uid]
    elif len(series) > 1:
        raise MixedSeriesError(
            f"{folder}: the folder holds {len(series)} series; choose one with series_uid=...:\n"
            f"{_series_listing(series)}"
        )
    else:
        chosen = next(iter(series.values()))
    return _volume(chosen, str(folder), progress, max_bytes)


def read_dicom_file(path: Path, *, progress: bool = False, max_bytes: int | None = MAX_VOLUME_BYTES) -> CTVolume:
    """Read one DICOM file: a CT slice (a volume of one slice) or a multi-frame Enhanced CT, refusing one larger
    than ``max_bytes`` (:mod:`langmamba.io.limits`) from its header.

    Returns:
        CTVolume with ``hu`` of shape ``(Z, Y, X)`` in HU.
    """
    budget = ReadBudget(MAX_DICOM_HEADER_READS, str(path), MAX_DICOM_HEADER_READS)
    ds = _read_dataset(path, header_only=True, strict=True, budget=budget)
    if not _is_image(ds, path):
        raise NotAnImageError(f"{path}: a {_describe_object(ds)} object, which holds no image")
    return _volume({path: ds}, str(path), progress, max_bytes)
