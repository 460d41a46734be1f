"""Slice-by-slice denoising of HU volumes with a trained model (LangMamba or a baseline), in memory.

:func:`denoise_hu_array` denoises a ``(Z, H, W)`` HU array; :func:`denoise_ct_volume` does it for a
:class:`~langmamba.io.CTVolume` and keeps its geometry and DICOM header. Reading and writing files, explaining
and the outputs of a run are :class:`langmamba.job.DenoiseJob`'s.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import CancelledError, ConfigError
from .io.volume import CTVolume
from .normalization import HU_MAX, HU_MIN, hu_to_model, model_to_hu
from .runtime import resolve_device


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Inference copy on ``device``: eval mode, float32 weights (bf16 comes from autocast on GPU)."""
    return model.to(device=device, dtype=torch.float32).eval()


def dihedral_average(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean of ``model`` over the 8 flips/rotations by 90° of ``x (B, C, H, W)``, each output mapped back."""
    total = None
    for flip in (False, True):
        flipped = torch.flip(x, dims=(-1,)) if flip else x
        for k in range(4):
            y = torch.rot90(model(torch.rot90(flipped, k, dims=(-2, -1))), -k, dims=(-2, -1)).float()
            y = torch.flip(y, dims=(-1,)) if flip else y
            total = y if total is None else total + y
    return total / 8


@torch.no_grad()
def denoise_hu_array(
    model: nn.Module,
    hu: np.ndarray,
    *,
    batch_size: int = 4,
    device: str | torch.device = "auto",
    progress: bool = False,
    blend: float = 1.0,
    out: np.ndarray | None = None,
    should_stop: Callable[[], bool] | None = None,
    tta: bool = False,
) -> np.ndarray:
    """Denoise ``hu`` (Z, H, W) slice by slice in batches; returns float32 HU of the same shape.

    The model sees the paper's normalisation ([-1000, 2000] HU -> [0, 1]); voxels outside that range (metal,
    dense bone above 2000 HU) keep their input values, since the model cannot represent them.

    Memory stays at ``out`` plus one batch: the outside-range mask and the blend are applied batch by batch.

    Args:
        model: a slice denoiser ``(B, 1, H, W) -> (B, 1, H, W)`` in the model range.
        hu: the volume ``(Z, H, W)`` in HU, any real dtype (e.g. int16 as stored).
        batch_size: slices per forward pass.
        device: torch device or ``"auto"`` (CUDA when available; bf16 autocast there).
        progress: show a tqdm bar over the slices.
        blend: ``blend * denoised + (1 - blend) * hu``; 1 = denoised only.
        out: float32 ``(Z, H, W)`` array to fill (it may be ``hu`` itself); a new one when ``None``.
        should_stop: called before every batch; when it returns True, :class:`CancelledError` is raised.
        tta: test-time augmentation: average the model's outputs over the 8 flips/rotations of each slice
            (8× the compute).
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if not 0.0 <= blend <= 1.0:
        raise ConfigError(f"blend must be between 0 and 1, got {blend}")
    if out is None:
        out = np.empty(hu.shape, dtype=np.float32)
    elif out.shape != hu.shape or out.dtype != np.float32:
        raise ConfigError(f"out must be float32 of shape {hu.shape}, got {out.dtype} {out.shape}")
    device = resolve_device(device)
    model = prepare_model(model, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    target = torch.from_numpy(out)
    with tqdm(total=hu.shape[0], desc="denoise", unit="slice", disable=not progress) as bar:
        for start in range(0, hu.shape[0], batch_size):
            if should_stop is not None and should_stop():
                raise CancelledError(f"denoising stopped on request after {start} of {hu.shape[0]} slices")
            # The HU arithmetic runs where the model does: on a GPU the host only copies voxels in and out.
            chunk = torch.from_numpy(np.ascontiguousarray(hu[start : start + batch_size])).to(device).float()
            with autocast:
                x = hu_to_model(chunk)[:, None]
                y = dihedral_average(model, x) if tta else model(x)
            result = model_to_hu(y[:, 0].float())
            result = torch.where((chunk < HU_MIN) | (chunk > HU_MAX), chunk, result)
            if blend != 1.0:
                result = blend * result + (1.0 - blend) * chunk
            target[start : start + len(chunk)].copy_(result)  # straight into the output, no host temporary
            bar.update(len(chunk))
    return out


def denoise_ct_volume(
    model: nn.Module,
    volume: CTVolume,
    *,
    blend: float = 1.0,
    batch_size: int = 4,
    device: str | torch.device = "auto",
    progress: bool = False,
    out: np.ndarray | None = None,
    should_stop: Callable[[], bool] | None = None,
    tta: bool = False,
) -> CTVolume:
    """The denoised ``volume`` (same geometry and DICOM header); ``blend`` mixes output (1) and input (0).

    ``out``: an optional float32 ``(Z, Y, X)`` array to denoise into; ``should_stop``: checked between batches
    (:class:`CancelledError`); the rest as :func:`denoise_hu_array`.
    """
    output = denoise_hu_array(
        model,
        volume.hu,
        batch_size=batch_size,
        device=device,
        progress=progress,
        blend=blend,
        out=out,
        should_stop=should_stop,
        tta=tta,
    )
    return volume.with_hu(output)
