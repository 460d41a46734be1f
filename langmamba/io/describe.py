"""A summary of a CT volume for ``langmamba info``: geometry and HU statistics, no patient data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from langmamba.errors import UnsupportedFormatError
from langmamba.io.formats import Format, format_for_reading
from langmamba.io.volume import CTVolume

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def _source_format(volume: CTVolume) -> str | None:
    if volume.dicom is not None:
        return Format.DICOM.value
    if volume.source is None:
        return None
    try:
        return format_for_reading(Path(volume.source)).value
    except UnsupportedFormatError:
        return None


def _header_text(header: Any, keyword: str) -> str | None:
    value = header.get(keyword) if header is not None else None
    return str(value) if value not in (None, "") else None


def describe_volume(volume: CTVolume) -> dict[str, Any]:
    """Geometry, HU statistics, modality and series description of ``volume``.

    Patient identifiers, dates and the source path are left out on purpose (folder names often
    carry patient names), so the result can be logged or shown on screen.

    Args:
        volume: the CT volume, ``hu`` of shape ``(Z, Y, X)``.

    Returns:
        A JSON-serialisable dict: ``shape`` (Z, Y, X), ``spacing_mm`` / ``origin_mm`` (x, y, z,
        LPS), ``direction`` (3×3, columns = axes), ``orientation`` (ITK code such as ``"LPS"``:
        the anatomical direction each array axis x, y, z points to), ``extent_mm``, ``hu`` (min,
        max, mean, std and percentiles ``p1``..``p99``), ``format``, ``modality`` and
        ``series_description`` (``None`` where unknown).
    """
    hu = volume.hu
    finite = hu[np.isfinite(hu)]
    stats: dict[str, float | None]
    if finite.size:
        values = np.percentile(finite, PERCENTILES)
        stats = {
            "min": float(finite.min()),
            "max": float(finite.max()),
            "mean": float(finite.mean(dtype=np.float64)),
            "std": float(finite.std(dtype=np.float64)),
        }
        stats.update({f"p{q}": float(v) for q, v in zip(PERCENTILES, values)})
    else:
        stats = {"min": None, "max": None, "mean": None, "std": None}
    header = volume.dicom
    return {
        "shape": list(volume.shape),
        "spacing_mm": list(volume.spacing),
        "origin_mm": list(volume.origin),
        "direction": volume.direction.tolist(),
        "orientation": sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            tuple(volume.direction.flatten())
        ),
        "extent_mm": [float(n * s) for n, s in zip(volume.shape[::-1], volume.spacing)],
        "voxels": int(hu.size),
        "non_finite_voxels": int(hu.size - finite.size),
        "hu": stats,
        "format": _source_format(volume),
        "modality": _header_text(header, "Modality"),
        "series_description": _header_text(header, "SeriesDescription"),
    }
