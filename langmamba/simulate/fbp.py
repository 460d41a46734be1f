"""Parallel-beam filtered back-projection: ramp filter with an apodising window, then back-projection."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from langmamba.errors import ConfigError
from langmamba.simulate._tensor import spacing_pair

WINDOWS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")

# Grid points handed to one grid_sample call (about 8 bytes each).
_CHUNK_SAMPLES = 1 << 22


def ramp_filter_response(
    n_rays: int,
    spacing_mm: float,
    window: str = "hann",
    cutoff: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Frequency response of the band-limited ramp filter times an apodising window.

    The ramp is the DFT of the sampled spatial ramp kernel of Kak & Slaney (ch. 3, eq. 61), which
    has no DC error, on a zero-padded length of at least ``2 * n_rays``. ``window`` multiplies it as
    a function of ``f / (cutoff · f_Nyquist)`` and frequencies above ``cutoff · f_Nyquist`` are dropped:
    ``ram-lak`` (1), ``shepp-logan`` (sinc), ``cosine``, ``hamming``, ``hann``.

    Returns:
        float32 ``(n_padded // 2 + 1,)`` response for :func:`torch.fft.rfft` of the padded rays, in 1/mm
        (it already includes the ``Δs`` of the discrete convolution).
    """
    if window not in WINDOWS:
        raise ConfigError(f"filter window must be one of {', '.join(WINDOWS)}; got {window!r}")
    if not (0 < cutoff <= 1):
        raise ConfigError(f"filter cutoff must be in (0, 1] (a fraction of Nyquist), got {cutoff}")
    n_pad = 1 << max(6, math.ceil(math.log2(2 * n_rays)))
    offsets = torch.arange(n_pad, dtype=torch.float64, device=device)
    offsets = torch.where(offsets < n_pad // 2, offsets, offsets - n_pad)
    kernel = torch.zeros(n_pad, dtype=torch.float64, device=device)
    kernel[0] = 1.0 / (4.0 * spacing_mm**2)
    odd = offsets.remainder(2) == 1
    kernel[odd] = -1.0 / (math.pi * offsets[odd] * spacing_mm) ** 2
    response = torch.fft.rfft(kernel).real * spacing_mm
    freq = torch.arange(response.numel(), dtype=torch.float64, device=device) / (n_pad // 2) / cutoff
    if window == "shepp-logan":
        apod = torch.sinc(freq / 2.0)
    elif window == "cosine":
        apod = torch.cos(0.5 * math.pi * freq)
    elif window == "hamming":
        apod = 0.54 + 0.46 * torch.cos(math.pi * freq)
    elif window == "hann":
        apod = 0.5 + 0.5 * torch.cos(math.pi * freq)
    else:
        apod = torch.ones_like(freq)
    apod = torch.where(freq <= 1.0, apod, torch.zeros_like(apod))
    return (response * apod).float()


def ramp_filter(sinogram: torch.Tensor, spacing_mm: float, window: str = "hann", cutoff: float = 1.0) -> torch.Tensor:
    """Filter every parallel view ``(..., n_rays)`` along its last axis; same shape out, float32, 1/mm."""
    n_rays = sinogram.shape[-1]
    response = ramp_filter_response(n_rays, spacing_mm, window, cutoff, sinogram.device)
    n_pad = 2 * (response.numel() - 1)
    spectrum = torch.fft.rfft(sinogram.float(), n=n_pad, dim=-1)
    return torch.fft.irfft(spectrum * response, n=n_pad, dim=-1)[..., :n_rays]


def backproject_parallel(
    filtered: torch.Tensor,
    angles_rad: torch.Tensor,
    ray_spacing_mm: float,
    image_shape: tuple[int, int],
    pixel_spacing_mm: float | Sequence[float],
) -> torch.Tensor:
    """Back-project filtered parallel views onto an image centred on the isocentre.

    Pixel ``(r, c)`` at ``(x, y)`` mm receives ``π / V · Σ_k q_k(x cos θ_k + y sin θ_k)`` (linear
    interpolation between rays; rays beyond the detector contribute zero).

    Args:
        filtered: ``(N, V, S)`` filtered views; ray ``j`` lies at ``s = (j - (S - 1) / 2) · ray_spacing_mm``.
        angles_rad: ``(V,)`` view angles spread evenly over [0, π).
        ray_spacing_mm: ``Δs`` in mm.
        image_shape: ``(H, W)`` of the output.
        pixel_spacing_mm: a number or ``(dy, dx)`` in mm.

    Returns:
        float32 ``(N, H, W)``.
    """
    n, n_views, n_rays = filtered.shape
    height, width = image_shape
    dy, dx = spacing_pair(pixel_spacing_mm)
    device = filtered.device
    # Normalised grid_sample coordinate of s (align_corners=True): s / Δs / ((S - 1) / 2).
    to_norm = 2.0 / (ray_spacing_mm * (n_rays - 1))
    x = (torch.arange(width, dtype=torch.float64, device=device) - 0.5 * (width - 1)) * dx * to_norm
    y = (torch.arange(height, dtype=torch.float64, device=device) - 0.5 * (height - 1)) * dy * to_norm
    angles = angles_rad.to(device=device, dtype=torch.float64)
    # Views become the batch axis of grid_sample: input (V, N, 1, S), sampled on row 0.
    views = filtered.float().permute(1, 0, 2)[:, :, None, :]
    image = torch.zeros(n, height, width, dtype=torch.float32, device=device)
    per_chunk = max(1, _CHUNK_SAMPLES // (height * width * n))  # samples are (views, N, H, W)
    grid = torch.zeros(min(per_chunk, n_views), height, width, 2, dtype=torch.float32, device=device)
    for start in range(0, n_views, per_chunk):
        theta = angles[start : start + per_chunk]
        n_v = theta.numel()
        x_part = (theta.cos()[:, None] * x[None, :]).float()[:, None, :]
        y_part = (theta.sin()[:, None] * y[None, :]).float()[:, :, None]
        torch.add(x_part, y_part, out=grid[:n_v, ..., 0])
        samples = F.grid_sample(
            views[start : start + n_v], grid[:n_v], mode="bilinear", padding_mode="zeros", align_corners=True
        )
        image += samples.sum(0)
    return image * (math.pi / n_views)


def fbp_parallel(
    sinogram: torch.Tensor,
    angles_rad: torch.Tensor,
    ray_spacing_mm: float,
    image_shape: tuple[int, int],
    pixel_spacing_mm: float | Sequence[float],
    *,
    window: str = "hann",
    cutoff: float = 1.0,
) -> torch.Tensor:
    """Filtered back-projection of parallel-beam line integrals over [0, π).

    Args:
        sinogram: ``(V, S)`` or ``(N, V, S)`` line integrals (unitless); ray ``j`` at
            ``s = (j - (S - 1) / 2) · ray_spacing_mm``, line ``x cos θ + y sin θ = s``.
        angles_rad: ``(V,)`` angles, evenly spaced over [0, π).
        ray_spacing_mm: ray spacing in mm.
        image_shape: output ``(H, W)``.
        pixel_spacing_mm: a number or ``(dy, dx)`` in mm.
        window, cutoff: ramp apodisation, see :func:`ramp_filter_response`.

    Returns:
        float32 attenuation image ``(H, W)`` or ``(N, H, W)`` in 1/mm.
    """
    squeeze = sinogram.ndim == 2
    sino = sinogram[None] if squeeze else sinogram
    if sino.ndim != 3 or sino.shape[1] != angles_rad.numel():
        raise ConfigError(
            f"sinogram must be (V, S) or (N, V, S) with V = {angles_rad.numel()} angles, got {tuple(sinogram.shape)}"
        )
    filtered = ramp_filter(sino, ray_spacing_mm, window, cutoff)
    image = backproject_parallel(filtered, angles_rad, ray_spacing_mm, image_shape, pixel_spacing_mm)
    return image[0] if squeeze else image
