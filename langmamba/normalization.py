"""Mapping between Hounsfield units and the range the networks work in.

The paper windows CT to [-1000, 2000] HU and scales it linearly to [0, 1]; values outside the window
are clipped. The constants live here only, and :func:`normalization_config` is what checkpoints record
so a model is never run with a different mapping than it was trained with.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

HU_MIN: float = -1000.0
"""Lower end of the window in HU (air); maps to 0."""

HU_MAX: float = 2000.0
"""Upper end of the window in HU (dense bone); maps to 1."""

NORMALIZATION_KIND: str = "linear_window"

ArrayLike = TypeVar("ArrayLike", np.ndarray, torch.Tensor)


def normalization_config() -> dict:
    """The mapping as a JSON-serialisable dict (written into every checkpoint's ``config.json``)."""
    return {"kind": NORMALIZATION_KIND, "hu_min": HU_MIN, "hu_max": HU_MAX, "clip": True}


def _as_float(x: ArrayLike | float) -> ArrayLike:
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() else x.to(torch.float32)
    array = np.asarray(x)
    return array if array.dtype in (np.float32, np.float64) else array.astype(np.float32)


def hu_to_model(x: ArrayLike, *, clip: bool = True) -> ArrayLike:
    """HU → model range: ``(x - HU_MIN) / (HU_MAX - HU_MIN)``, clipped to [0, 1] by default.

    Accepts a numpy array or a torch tensor of any shape and returns the same kind (float32 for
    integer input, otherwise the input's float dtype, same device).
    """
    x = _as_float(x)
    y = (x - HU_MIN) / (HU_MAX - HU_MIN)
    if clip:
        y = y.clamp(0.0, 1.0) if isinstance(y, torch.Tensor) else np.clip(y, 0.0, 1.0)
    return y


def model_to_hu(x: ArrayLike, *, clip: bool = True) -> ArrayLike:
    """Model range → HU: ``x * (HU_MAX - HU_MIN) + HU_MIN``.

    With ``clip=True`` (default) the input is first clipped to [0, 1], so outputs stay inside
    [HU_MIN, HU_MAX] (a network may overshoot its training range slightly). Same kinds as
    :func:`hu_to_model`.
    """
    x = _as_float(x)
    if clip:
        x = x.clamp(0.0, 1.0) if isinstance(x, torch.Tensor) else np.clip(x, 0.0, 1.0)
    return x * (HU_MAX - HU_MIN) + HU_MIN
