"""Geometry of a DICOM series: its 2-D frames, their order along the slice normal, and the checks.

Slices are ordered by their position along the slice normal (``ImagePositionPatient`` projected on
``row × column`` of ``ImageOrientationPatient``), never by ``InstanceNumber`` or file name, and the
volume's z axis is that normal, as in ITK/GDCM. A series is refused when its slices differ in size,
orientation or pixel size, share a position, leave a gap (missing slices), are unevenly spaced, or
drift sideways (gantry tilt).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from langmamba.errors import CorruptFileError, IrregularSpacingError, MixedSeriesError, UnsupportedImageError

logger = logging.getLogger(__name__)

GAP_FACTOR = 1.5
"""A gap larger than this times the median slice spacing means missing slices."""
SPACING_VARIATION = 0.10
"""Slice spacings may differ by at most this fraction of the median spacing."""
_ORIENTATION_TOLERANCE = 1e-3
_DUPLICATE_MM = 0.01
_MAX_DRIFT_PIXELS = 0.5


@dataclass
class Frame:
    """One 2-D image of a series: a single-frame file or one frame of a multi-frame object."""

    file: Path
    index: int  # frame index inside the file, 0 for single-frame files
    rows: int
    cols: int
    position: NDArray[Any] | None  # ImagePositionPatient, LPS mm
    orientation: NDArray[Any] | None  # ImageOrientationPatient (row cosines, column cosines)
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) in mm
    rescale: tuple[float, float] | None  # (slope, intercept) of a multi-frame object's frame
    sop_uid: str
    multi_frame: bool

    @property
    def label(self) -> str:
        return f"{self.file.name} frame {self.index + 1}" if self.multi_frame else self.file.name


@dataclass
class Geometry:
    """Slice order (frame indices, first to last) and the CTVolume geometry of a series."""

    order: list[int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: NDArray[Any]


def functional(ds: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """A frame's attribute from the per-frame, else the shared functional groups, else top level."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return ds.get(keyword)


def _floats(value: Any, count: int) -> NDArray[Any] | None:
    if value is None:
        return None
    values = np.asarray([float(v) for v in value], dtype=np.float64)
    return values if values.size == count else None


def frames_of(ds: Dataset, path: Path) -> list[Frame]:
    """The 2-D frames of one DICOM image object (header only) with their geometry."""
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or not str(ds.get("PhotometricInterpretation", "MONOCHROME2")).startswith("MONO"):
        raise UnsupportedImageError(
            f"{path}: a colour image ({ds.get('PhotometricInterpretation', '?')}, {samples} samples "
            "per pixel); langmamba needs grey-value CT slices"
        )
    count = int(ds.get("NumberOfFrames", 1) or 1)
    multi = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if count > 1 and not multi:
        raise UnsupportedImageError(
            f"{path}: {count} frames without per-frame geometry (no functional groups), so their positions are unknown"
        )
    frames = []
    for index in range(count):
        if multi:
            position = functional(ds, index, "PlanePositionSequence", "ImagePositionPatient")
            orientation = functional(ds, index, "PlaneOrientationSequence", "ImageOrientationPatient")
            spacing = functional(ds, index, "PixelMeasuresSequence", "PixelSpacing")
            slope = functional(ds, index, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = functional(ds, index, "PixelValueTransformationSequence", "RescaleIntercept")
            rescale = (float(slope if slope is not None else 1.0), float(intercept or 0.0))
        else:
            position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
            spacing, rescale = ds.get("PixelSpacing"), None
        pixel_spacing = _floats(spacing, 2)
        frames.append(
            Frame(
                file=path,
                index=index,
                rows=int(ds.Rows),
                cols=int(ds.Columns),
                position=_floats(position, 3),
                orientation=_floats(orientation, 6),
                pixel_spacing=None if pixel_spacing is None else (pixel_spacing[0], pixel_spacing[1]),
                rescale=rescale,
                sop_uid=str(ds.get("SOPInstanceUID", "")),
                multi_frame=multi,
            )
        )
    return frames


def _check_same(frames: list[Frame], label: str) -> None:
    """Raise :class:`MixedSeriesError` if sizes, orientations or pixel sizes differ."""
    sizes = Counter((f.cols, f.rows) for f in frames)
    if len(sizes) > 1:
        listing = ", ".join(f"{c}x{r} ({n} slices)" for (c, r), n in sizes.most_common())
        raise MixedSeriesError(f"{label}: the slices have different sizes: {listing}")
    known = [(f, f.orientation) for f in frames if f.orientation is not None]
    differ = [f for f, o in known if np.abs(o - known[0][1]).max() > _ORIENTATION_TOLERANCE]
    if differ:
        raise MixedSeriesError(
            f"{label}: the slices have different orientations ({len(differ)} of {len(frames)} differ "
            f"from {known[0][0].label}, e.g. {differ[0].label}); a localizer or a reformat may be mixed "
            "into the series"
        )
    spacings = Counter(f.pixel_spacing for f in frames if f.pixel_spacing is not None)
    if len(spacings) > 1:
        reference = np.asarray(spacings.most_common(1)[0][0])
        if any(np.abs(np.asarray(s) - reference).max() > 1e-4 * reference.max() for s in spacings):
            listing = ", ".join(f"{s[1]:g}x{s[0]:g} mm ({n} slices)" for s, n in spacings.most_common())
            raise MixedSeriesError(f"{label}: the slices have different pixel sizes: {listing}")


def _direction(orientation: NDArray[Any], label: str) -> NDArray[Any]:
    """3×3 direction (columns: row direction, column direction, slice normal) from an IOP."""
    row = orientation[:3] / np.linalg.norm(orientation[:3])
    col = orientation[3:] / np.linalg.norm(orientation[3:])
    if abs(float(row @ col)) > _ORIENTATION_TOLERANCE:
        raise CorruptFileError(
            f"{label}: ImageOrientationPatient gives row and column directions that are not perpendicular"
        )
    return np.column_stack([row, col, np.cross(row, col)])


def _check_spacing(along: NDArray[Any], frames: list[Frame], label: str) -> None:
    """Raise for repeated positions, gaps (missing slices) and uneven spacing; ``along`` is sorted."""
    gaps = np.diff(along)
    if gaps.min() < _DUPLICATE_MM:
        i = int(np.argmin(gaps))
        repeats = int(np.count_nonzero(gaps < _DUPLICATE_MM))
        raise MixedSeriesError(
            f"{label}: {repeats + 1} slices share a position (e.g. {frames[i].label} and "
            f"{frames[i + 1].label} at {along[i]:.2f} mm); several acquisitions or phases are mixed "
            "in one series"
        )
    median = float(np.median(gaps))
    i = int(np.argmax(gaps))
    if gaps[i] > GAP_FACTOR * median:
        missing = max(1, round(gaps[i] / median) - 1)
        raise IrregularSpacingError(
            f"{label}: gap of {gaps[i]:.2f} mm between {frames[i].label} ({along[i]:.2f} mm) and "
            f"{frames[i + 1].label} ({along[i + 1]:.2f} mm along the slice normal) where slices are "
            f"{median:.2f} mm apart elsewhere: about {missing} slice(s) missing"
        )
    if gaps.max() - gaps.min() > SPACING_VARIATION * median:
        j = int(np.argmin(gaps))
        raise IrregularSpacingError(
            f"{label}: slice spacing varies from {gaps.min():.3f} mm (after {frames[j].label}) to "
            f"{gaps.max():.3f} mm (after {frames[i].label}), more than {SPACING_VARIATION:.0%} of the "
            f"median {median:.3f} mm; the series needs resampling to a regular grid"
        )


def _single_frame(frame: Frame, ds: Dataset, label: str) -> Geometry:
    """A one-slice volume: the slice thickness (or spacing between slices) is its z spacing."""
    if frame.orientation is None or frame.position is None:
        logger.warning("%s: no ImageOrientationPatient/ImagePositionPatient; assuming axial at 0", label)
    orientation = frame.orientation if frame.orientation is not None else np.array([1.0, 0, 0, 0, 1, 0])
    thickness = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    if frame.multi_frame:
        thickness = functional(ds, 0, "PixelMeasuresSequence", "SliceThickness") or thickness
    pixel = frame.pixel_spacing or (1.0, 1.0)
    return Geometry(
        order=[0],
        spacing=(pixel[1], pixel[0], abs(float(thickness or 1.0)) or 1.0),
        origin=tuple(frame.position if frame.position is not None else np.zeros(3)),
        direction=_direction(orientation, label),
    )


def series_geometry(frames: list[Frame], first: Dataset, label: str) -> Geometry:
    """Slice order and geometry of the frames of one series.

    Args:
        frames: every frame of the series (any order).
        first: header of the first file, for the slice thickness of a one-slice volume.
        label: the folder or file named in error messages.

    Raises:
        MixedSeriesError, IrregularSpacingError, UnsupportedImageError: see the module docstring.
    """
    _check_same(frames, label)
    if len(frames) == 1:
        return _single_frame(frames[0], first, label)
    orientation = frames[0].orientation
    placed = [f.position for f in frames if f.position is not None]
    if orientation is None or len(placed) < len(frames) or any(f.orientation is None for f in frames):
        raise UnsupportedImageError(
            f"{label}: slices lack ImagePositionPatient/ImageOrientationPatient, so their order and spacing are unknown"
        )
    direction = _direction(orientation, label)
    normal = direction[:, 2]
    positions = np.stack(placed)
    order = np.argsort(positions @ normal, kind="stable")
    along = positions[order] @ normal
    _check_spacing(along, [frames[i] for i in order], label)
    if frames[0].pixel_spacing is None:
        logger.warning("%s: no PixelSpacing; assuming 1 mm pixels", label)
    pixel = frames[0].pixel_spacing or (1.0, 1.0)
    span = float(along[-1] - along[0])
    drift = float(np.linalg.norm(positions[order[-1]] - positions[order[0]] - span * normal))
    if drift > _MAX_DRIFT_PIXELS * min(pixel):
        raise UnsupportedImageError(
            f"{label}: slice positions drift {drift:.2f} mm sideways over the series (gantry tilt of "
            f"about {np.degrees(np.arctan2(drift, span)):.1f}°); resample it onto a non-tilted grid first"
        )
    return Geometry(
        order=[int(i) for i in order],
        spacing=(pixel[1], pixel[0], span / (len(frames) - 1)),
        origin=tuple(positions[order[0]]),
        direction=direction,
    )
