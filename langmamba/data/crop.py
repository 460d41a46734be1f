"""Body crops: the part of a slice that holds the patient, so stored training sets carry little air."""

from __future__ import annotations

import numpy as np

from ..metrics import body_mask


def body_box(hu: np.ndarray, margin_px: int = 16, min_size: int = 256) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the body's bounding box in a slice, grown by ``margin_px`` on each side
    and to at least ``min_size`` pixels (or the whole slice) per side, kept inside the slice.

    Args:
        hu: one slice (H, W) in HU; the body is :func:`langmamba.metrics.body_mask` (largest region above
            -500 HU, holes filled). A slice without a body gives the whole slice.
    """
    height, width = hu.shape
    rows, cols = np.nonzero(body_mask(hu))
    if rows.size == 0:
        return 0, 0, height, width
    box = []
    for low, high, size in ((rows.min(), rows.max() + 1, height), (cols.min(), cols.max() + 1, width)):
        low, high = max(0, int(low) - margin_px), min(size, int(high) + margin_px)
        missing = min(size, min_size) - (high - low)
        if missing > 0:  # grow around the centre, then shift back inside the slice
            low = max(0, low - missing // 2)
            high = min(size, low + min(size, min_size))
            low = max(0, high - min(size, min_size))
        box.append((low, high - low))
    (top, crop_height), (left, crop_width) = box
    return top, left, crop_height, crop_width
