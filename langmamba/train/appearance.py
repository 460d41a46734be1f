"""Scanner-appearance augmentation of normal-dose training slices, applied before the low dose is simulated.

The training patients are a few chest scans at 0.6-1.0 mm pixels, reconstructed with sharp kernels. Scans the
product meets differ in both: heads at 0.45 mm, zoomed spine reconstructions at 0.3 mm, smooth brain and soft
tissue kernels. A denoiser trained only on the first learns to keep the sharp kernels' native noise texture and
leaves much of the noise of a smooth head scan in place (v0.2: BM3D beat it by 2-4 dB on the validation heads).

Two changes of the *normal-dose* slice give it other scanners to learn from, while the simulator then adds the
noise that the changed slice would get (so image and noise stay physically consistent):

- **zoom**: resample by a factor ``z`` (log-uniform in a range) and divide the pixel spacing by ``z``: the same
  anatomy at another pixel size, the noise simulated at that pixel size;
- **soften**: a Gaussian blur of ``sigma`` mm, as a smoother reconstruction kernel would give; a smoother
  reference teaches the model that flat tissue is flat.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AIR_HU = -1000.0


def zoom_slice(hu: torch.Tensor, factor: float) -> torch.Tensor:
    """``hu (H, W)`` resampled by ``factor`` (``> 1`` enlarges), bicubic, antialiased when shrinking.

    Returns ``(round(H * factor), round(W * factor))`` HU; overshoot below air is clipped to air.
    """
    if factor == 1.0:
        return hu
    size = (max(1, round(hu.shape[0] * factor)), max(1, round(hu.shape[1] * factor)))
    resized = F.interpolate(hu[None, None], size=size, mode="bicubic", antialias=factor < 1.0, align_corners=False)
    return resized[0, 0].clamp_min(AIR_HU)


def gaussian_blur(hu: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """``hu (H, W)`` blurred by a separable Gaussian of ``sigma_px`` pixels (edges replicated)."""
    if sigma_px <= 0:
        return hu
    radius = max(1, math.ceil(3 * sigma_px))
    offsets = torch.arange(-radius, radius + 1, device=hu.device, dtype=hu.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma_px) ** 2)
    kernel = kernel / kernel.sum()
    image = F.pad(hu[None, None], (radius, radius, radius, radius), mode="replicate")
    image = F.conv2d(image, kernel.view(1, 1, 1, -1))
    image = F.conv2d(image, kernel.view(1, 1, -1, 1))
    return image[0, 0]


def draw_zoom(zoom_range: tuple[float, float] | None, generator: torch.Generator) -> float:
    """A zoom factor log-uniform in ``zoom_range`` (``1.0`` when it is ``None``)."""
    if zoom_range is None:
        return 1.0
    low, high = math.log(zoom_range[0]), math.log(zoom_range[1])
    return math.exp(low + (high - low) * torch.rand((), generator=generator).item())


def draw_soften_mm(probability: float, sigma_range_mm: tuple[float, float], generator: torch.Generator) -> float:
    """A blur in mm: uniform in ``sigma_range_mm`` with ``probability``, else ``0.0`` (the slice as scanned)."""
    if probability <= 0 or torch.rand((), generator=generator).item() >= probability:
        return 0.0
    low, high = sigma_range_mm
    return low + (high - low) * torch.rand((), generator=generator).item()
