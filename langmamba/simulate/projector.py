"""Ray-driven fan-beam forward projector (line integrals of attenuation)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from langmamba.errors import ConfigError
from langmamba.simulate._tensor import as_image_batch, spacing_pair
from langmamba.simulate.geometry import FanBeamGeometry

# Grid points handed to one grid_sample call: bounds memory (~12 bytes a point) whatever the image size.
_CHUNK_SAMPLES = 1 << 22


def fan_beam_project(
    mu_image: torch.Tensor,
    pixel_spacing_mm: float | Sequence[float],
    geometry: FanBeamGeometry | None = None,
) -> torch.Tensor:
    """Line integrals of ``mu_image`` along every ray of a fan-beam scan (Joseph's method).

    A ray that runs closer to the ``y`` axis than to the ``x`` axis is sampled once per image row,
    at its crossing with the row's centre line, by linear interpolation between the two nearest
    pixels of that row (zero outside the image); the sum is weighted by the path length between
    rows, ``dy / |sin ψ|``. Other rays are sampled once per column in the same way. All rays are
    computed in large vectorised ``grid_sample`` calls, chunked to bound memory.

    Args:
        mu_image: attenuation, ``(H, W)`` or ``(N, H, W)``, 1/mm. The image centre is the
            isocentre; rows run along ``y`` and columns along ``x``.
        pixel_spacing_mm: a number or ``(dy, dx)`` = (row, column) spacing in mm.
        geometry: the scanner; the default :class:`FanBeamGeometry` when ``None``.

    Returns:
        float32 sinogram ``(n_views, n_channels)`` or ``(N, n_views, n_channels)`` (unitless line
        integrals), on the device of ``mu_image``.
    """
    geometry = geometry or FanBeamGeometry()
    images, squeeze = as_image_batch(mu_image, "mu_image")
    n, height, width = images.shape
    dy, dx = spacing_pair(pixel_spacing_mm)
    device = images.device

    beta = geometry.view_angles(device)[:, None]
    psi = (beta + math.pi + geometry.channel_angles(device)[None, :]).flatten()  # ray direction angle
    src_x = (geometry.source_to_isocenter_mm * beta.cos()).expand(-1, geometry.n_channels).flatten()
    src_y = (geometry.source_to_isocenter_mm * beta.sin()).expand(-1, geometry.n_channels).flatten()
    cos_psi, sin_psi = psi.cos(), psi.sin()
    along_y = sin_psi.abs() >= cos_psi.abs()

    sino = torch.empty(n, psi.numel(), dtype=torch.float32, device=device)
    # Rays closer to y step through rows: each row is a 1-pixel-high image, x is interpolated.
    rays = torch.nonzero(along_y).flatten()
    slope = cos_psi[rays] / sin_psi[rays]
    sino[:, rays] = _sample_lines(
        images.permute(1, 0, 2)[:, :, None, :], dy, dx, src_y[rays], src_x[rays], slope, dy / sin_psi[rays].abs()
    )
    rays = torch.nonzero(~along_y).flatten()
    slope = sin_psi[rays] / cos_psi[rays]
    sino[:, rays] = _sample_lines(
        images.permute(2, 0, 1)[:, :, None, :], dx, dy, src_x[rays], src_y[rays], slope, dx / cos_psi[rays].abs()
    )
    sino = sino.view(n, geometry.n_views, geometry.n_channels)
    return sino[0] if squeeze else sino


def _sample_lines(
    lines: torch.Tensor,
    line_spacing: float,
    sample_spacing: float,
    src_major: torch.Tensor,
    src_minor: torch.Tensor,
    slope: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """Sum of ``lines`` (L, N, 1, P) interpolated where each ray crosses each line, times ``weight``.

    Line ``l`` sits at major coordinate ``u_l`` (mm, centred); a ray through the source
    ``(src_major, src_minor)`` crosses it at minor coordinate ``src_minor + (u_l - src_major) · slope``.
    Returns float32 ``(N, rays)``.
    """
    n_lines, n, _, n_points = lines.shape
    device = lines.device
    u = ((torch.arange(n_lines, dtype=torch.float64, device=device) - 0.5 * (n_lines - 1)) * line_spacing)[:, None]
    # grid_sample (align_corners=False) wants the minor coordinate divided by half the line length.
    half_len = 0.5 * n_points * sample_spacing
    offset = ((src_minor - src_major * slope) / half_len).float()
    gain = (slope / half_len).float()
    u = u.float()
    out = torch.empty(n, slope.numel(), dtype=torch.float32, device=device)
    per_chunk = max(1, _CHUNK_SAMPLES // n_lines)
    grid = torch.zeros(n_lines, min(per_chunk, slope.numel()), 1, 2, dtype=torch.float32, device=device)
    for start in range(0, slope.numel(), per_chunk):
        stop = min(start + per_chunk, slope.numel())
        g = grid[:, : stop - start]
        torch.addcmul(offset[None, start:stop], u, gain[None, start:stop], out=g[..., 0, 0])
        samples = F.grid_sample(lines, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[:, start:stop] = samples.sum(0)[..., 0] * weight[start:stop].float()
    return out
