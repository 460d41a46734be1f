"""Checks that voxel values are finite and look like Hounsfield units.

Files without a DICOM header (NIfTI, NRRD, MetaImage) do not say what they contain, so the value
range is the only evidence that they hold a CT. The heuristic is deliberately conservative: it
rejects only volumes that cannot be a CT in HU:

- every voxel in ``[0, 255]``: an 8-bit picture, a mask or a label map (a CT in HU always contains
  air or fat, i.e. negative values, and bone or contrast well above 255 in any real scan);
- all values within a span of less than 4 units while not all integer: normalised intensities
  (e.g. ``[0, 1]`` or ``[-1, 1]``), not HU;
- values far outside what a scanner produces (below -32768 HU or above 65535 HU).

Volumes that pass but have no voxel below 0 HU (e.g. an MR, or a CT saved without its rescale
intercept) are accepted with a warning in the log, because a tightly cropped CT can look the same.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from numpy.typing import NDArray

from langmamba.errors import NonFiniteVoxelsError, NotCTError

logger = logging.getLogger(__name__)

_MIN_PLAUSIBLE_HU = -32768.0
_MAX_PLAUSIBLE_HU = 65535.0
_NORMALISED_SPAN = 4.0


def check_finite(hu: NDArray[Any], where: str) -> None:
    """Raise :class:`NonFiniteVoxelsError` if ``hu`` holds NaN or ±inf values.

    Args:
        hu: voxel array of any shape.
        where: the file (or "the volume") named in the message.
    """
    finite = np.isfinite(hu)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        nans = int(np.count_nonzero(np.isnan(hu)))
        raise NonFiniteVoxelsError(
            f"{where}: {bad} of {hu.size} voxels are not finite ({nans} NaN, {bad - nans} infinite); "
            "a CT volume must hold a number (HU) in every voxel"
        )


def check_hu_range(hu: NDArray[Any], where: str) -> None:
    """Raise :class:`NotCTError` if the values of ``hu`` cannot be Hounsfield units.

    See the module docstring for the rules. ``hu`` must be finite (call :func:`check_finite` first).

    Args:
        hu: voxel values, any shape.
        where: the file named in the message.
    """
    lo, hi = float(hu.min()), float(hu.max())
    if lo >= 0.0 and hi <= 255.0:
        raise NotCTError(
            f"{where}: all values lie in [{lo:g}, {hi:g}], which looks like an 8-bit picture, a mask "
            "or a label map, not a CT in Hounsfield units (a CT holds air near -1000 HU)"
        )
    if hi - lo < _NORMALISED_SPAN and not np.array_equal(hu, np.round(hu)):
        raise NotCTError(
            f"{where}: values span only [{lo:g}, {hi:g}]; these look like normalised intensities, "
            "not Hounsfield units. Give the CT in HU"
        )
    if lo < _MIN_PLAUSIBLE_HU or hi > _MAX_PLAUSIBLE_HU:
        raise NotCTError(f"{where}: values span [{lo:g}, {hi:g}], far outside any CT scanner's range of HU")
    if lo >= 0.0:
        logger.warning(
            "%s: no value below 0 (range [%g, %g]); if this is a CT, it may be missing its rescale "
            "intercept (HU = stored value - 1024 on most scanners), or it may be an MR",
            where,
            lo,
            hi,
        )
