"""Small argument helpers shared by the simulation modules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from langmamba.errors import ConfigError


def spacing_pair(pixel_spacing_mm: float | Sequence[float]) -> tuple[float, float]:
    """Pixel spacing as ``(dy, dx)`` = (row spacing, column spacing) in mm.

    A single number means square pixels; a pair is read in array-axis order ``(H, W)``, the same
    order as the DICOM PixelSpacing attribute (row spacing first).
    """
    if isinstance(pixel_spacing_mm, (int, float)):
        pair = (float(pixel_spacing_mm), float(pixel_spacing_mm))
    else:
        values = [float(v) for v in pixel_spacing_mm]
        if len(values) != 2:
            raise ConfigError(
                f"pixel_spacing_mm must be a number or a (row, column) pair in mm, got {pixel_spacing_mm!r}"
            )
        pair = (values[0], values[1])
    if not all(math.isfinite(v) and v > 0 for v in pair):
        raise ConfigError(f"pixel_spacing_mm must be positive and finite, got {pixel_spacing_mm!r}")
    return pair


def as_image_batch(image: torch.Tensor, name: str = "image") -> tuple[torch.Tensor, bool]:
    """``(H, W)`` or ``(N, H, W)`` → float32 ``(N, H, W)`` and whether a batch axis was added."""
    if image.ndim == 2:
        return image[None].float(), True
    if image.ndim == 3:
        return image.float(), False
    raise ConfigError(f"{name} must have shape (H, W) or (N, H, W), got {tuple(image.shape)}")
