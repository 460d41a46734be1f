"""Slice-by-slice denoising of HU volumes with a trained model (LangMamba or a baseline)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .normalization import HU_MAX, HU_MIN, hu_to_model, model_to_hu
from .simulate._tensor import resolve_device


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Inference copy on ``device``: eval mode, float32 weights (bf16 comes from autocast on GPU)."""
    return model.to(device=device, dtype=torch.float32).eval()


@torch.no_grad()
def denoise_slices(model: nn.Module, hu: np.ndarray, *, batch_size: int = 4, device: str | torch.device = "auto",
                   progress: bool = False) -> np.ndarray:
    """Denoise ``hu`` (Z, H, W) slice by slice in batches; returns float32 HU of the same shape.

    The model sees the paper's normalisation ([-1000, 2000] HU -> [0, 1]); voxels outside that range (metal,
    dense bone above 2000 HU) keep their input values, since the model cannot represent them.
    """
    device = resolve_device(device)
    model = prepare_model(model, device)
    out = np.empty(hu.shape, dtype=np.float32)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for start in tqdm(range(0, hu.shape[0], batch_size), desc="denoise", unit="batch", disable=not progress):
        chunk = np.asarray(hu[start:start + batch_size], dtype=np.float32)
        x = torch.from_numpy(hu_to_model(chunk))[:, None].to(device)
        with autocast:
            y = model(x)
        out[start:start + len(chunk)] = model_to_hu(y[:, 0].float().cpu().numpy())
    outside = (hu < HU_MIN) | (hu > HU_MAX)
    out[outside] = hu[outside]
    return out
