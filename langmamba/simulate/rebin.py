"""Fan-beam to parallel-beam rebinning."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from langmamba.errors import ConfigError
from langmamba.simulate.geometry import FanBeamGeometry


def parallel_ray_to_fan(
    geometry: FanBeamGeometry, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each ray of the rebinned parallel grid lies in the fan sinogram.

    The fan ray ``(β, γ)`` is the parallel ray ``θ = β + γ - π/2``, ``s = R sin γ`` (line
    ``x cos θ + y sin θ = s``). Inverting this for the parallel grid over a full turn gives, for
    every ``(θ_k, s_j)``, a fractional view index and a fractional channel index.

    Returns:
        ``(view_index, channel_index)``, each float64 of shape ``(n_views, n_parallel_rays)``;
        view indices are wrapped into ``[0, n_views)``.
    """
    theta = torch.arange(geometry.n_views, dtype=torch.float64, device=device) * geometry.view_step_rad
    gamma = torch.asin(geometry.parallel_positions(device) / geometry.source_to_isocenter_mm)
    beta = theta[:, None] - gamma[None, :] + 0.5 * math.pi
    view_index = torch.remainder(beta / geometry.view_step_rad, geometry.n_views)
    channel_index = gamma / geometry.channel_step_rad + 0.5 * (geometry.n_channels - 1)
    return view_index, channel_index.expand_as(view_index)


def _rebin_grid(geometry: FanBeamGeometry, device: torch.device) -> torch.Tensor:
    view_index, channel_index = parallel_ray_to_fan(geometry, device)
    # One wrapped view is padded on each side of the sinogram, hence +1 and n_views + 2 rows.
    gy = (view_index + 1.0) / (geometry.n_views + 1) * 2.0 - 1.0
    gx = channel_index / (geometry.n_channels - 1) * 2.0 - 1.0
    return torch.stack((gx, gy), dim=-1).float()[None]


_GRID_CACHE: dict[tuple[FanBeamGeometry, str], torch.Tensor] = {}


def rebin_fan_to_parallel(fan_sinogram: torch.Tensor, geometry: FanBeamGeometry | None = None) -> torch.Tensor:
    """Resample a full-rotation fan-beam sinogram onto a parallel-beam grid over [0, π).

    Bilinear interpolation in (view, channel), periodic in the view angle, to the parallel grid
    of ``geometry`` (angles :meth:`FanBeamGeometry.parallel_angles` over a full turn, ray
    positions :meth:`FanBeamGeometry.parallel_positions`). Each line is then measured twice, at
    ``(θ, s)`` and ``(θ + π, -s)``; the two are averaged, which is what a full-scan FBP does.

    Args:
        fan_sinogram: ``(n_views, n_channels)`` or ``(N, n_views, n_channels)`` line integrals.
        geometry: the scan geometry (default :class:`FanBeamGeometry`).

    Returns:
        float32 ``(n_views // 2, n_parallel_rays)`` or ``(N, n_views // 2, n_parallel_rays)``.
    """
    geometry = geometry or FanBeamGeometry()
    squeeze = fan_sinogram.ndim == 2
    sino = fan_sinogram[None] if squeeze else fan_sinogram
    if sino.ndim != 3 or tuple(sino.shape[1:]) != (geometry.n_views, geometry.n_channels):
        raise ConfigError(
            f"fan_sinogram must have shape (N, {geometry.n_views}, {geometry.n_channels}) for this geometry, "
            f"got {tuple(fan_sinogram.shape)}"
        )
    key = (geometry, str(sino.device))
    if key not in _GRID_CACHE:
        _GRID_CACHE.clear()  # geometries change rarely; keep only the latest grid
        _GRID_CACHE[key] = _rebin_grid(geometry, sino.device)
    grid = _GRID_CACHE[key]
    padded = torch.cat((sino[:, -1:], sino, sino[:, :1]), dim=1).float()[None]  # (1, N, V + 2, C)
    full_turn = F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    half = geometry.n_views // 2
    parallel = 0.5 * (full_turn[:, :half] + full_turn[:, half:].flip(-1))
    return parallel[0] if squeeze else parallel
