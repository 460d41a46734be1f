"""Small argument helpers shared by the simulation modules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
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


def per_slice(value: float | Sequence[float] | np.ndarray | torch.Tensor, n: int, name: str) -> torch.Tensor:
    """A number or ``n`` values → float64 ``(n,)`` CPU tensor."""
    if isinstance(value, torch.Tensor):
        values = value.detach().to("cpu", torch.float64).flatten()
    elif isinstance(value, (bool, str)) or value is None:
        raise ConfigError(f"{name} must be a number or one value per slice, got {value!r}")
    else:
        try:
            values = torch.as_tensor(np.asarray(value, dtype=np.float64)).flatten()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name} must be a number or one value per slice, got {value!r}") from exc
    if values.numel() == 1:
        values = values.expand(n)
    if values.numel() != n:
        raise ConfigError(f"{name} holds {values.numel()} values for {n} slices")
    return values


def spacing_pairs(pixel_spacing_mm: float | Sequence[float] | torch.Tensor, n: int) -> list[tuple[float, float]]:
    """Per-slice ``(dy, dx)``: one shared spacing, or a per-slice tensor ``(N,)`` / ``(N, 2)``."""
    if not isinstance(pixel_spacing_mm, torch.Tensor):
        return [spacing_pair(pixel_spacing_mm)] * n
    values = pixel_spacing_mm.detach().to("cpu", torch.float64)
    if values.ndim == 1 and values.numel() == n:
        return [spacing_pair(float(v)) for v in values]
    if values.ndim == 2 and tuple(values.shape) == (n, 2):
        return [spacing_pair((float(a), float(b))) for a, b in values]
    raise ConfigError(
        f"a pixel_spacing_mm tensor must hold one spacing per slice, (N,) or (N, 2) with N = {n}, "
        f"got shape {tuple(values.shape)}"
    )
