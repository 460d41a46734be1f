"""Ray-driven fan-beam forward projector (line integrals of attenuation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from langmamba.simulate._tensor import as_image_batch, spacing_pair
from langmamba.simulate.geometry import FanBeamGeometry

# Grid points handed to one grid_sample call: bounds memory (~12 bytes a point) whatever the image size.
_CHUNK_SAMPLES = 1 << 22
# Image lines per band; rays are sampled only in the bands they cross.
_BAND_LINES = 128


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
    row_rays, col_rays = _ray_families(geometry, images.device)

    n_rays = geometry.n_views * geometry.n_channels
    sino = torch.zeros(n, n_rays, dtype=torch.float32, device=images.device)
    # Rays closer to y step through rows: each row becomes a 1-pixel-high image (a batch item) in which
    # x is interpolated; other rays step through columns. Contiguous copies keep the reads sequential.
    rows = images.permute(1, 0, 2).contiguous()[:, :, None, :]
    cols = images.permute(2, 0, 1).contiguous()[:, :, None, :]
    _project_family(sino, rows, dy, dx, row_rays)
    _project_family(sino, cols, dx, dy, col_rays)
    sino = sino.view(n, geometry.n_views, geometry.n_channels)
    return sino[0] if squeeze else sino


@dataclass(frozen=True)
class _Rays:
    """Rays that step along one image axis (the major one), as ``minor = intercept + major · slope``.

    Coordinates are mm from the isocentre, independent of the image; ``secant`` is the path length
    per unit step along the major axis.
    """

    index: torch.Tensor  # (M,) flat (view, channel) index
    intercept: torch.Tensor  # (M,) float64, mm
    slope: torch.Tensor  # (M,) float64
    secant: torch.Tensor  # (M,) float32


_RAY_CACHE: dict[tuple[FanBeamGeometry, str], tuple[_Rays, _Rays]] = {}


def _ray_families(geometry: FanBeamGeometry, device: torch.device) -> tuple[_Rays, _Rays]:
    """(rays stepping through rows, rays stepping through columns); cached for the latest geometry."""
    key = (geometry, str(device))
    if key not in _RAY_CACHE:
        beta = geometry.view_angles(device)[:, None]
        psi = (beta + math.pi + geometry.channel_angles(device)[None, :]).flatten()  # ray direction angle
        src_x = (geometry.source_to_isocenter_mm * beta.cos()).expand(-1, geometry.n_channels).flatten()
        src_y = (geometry.source_to_isocenter_mm * beta.sin()).expand(-1, geometry.n_channels).flatten()
        cos_psi, sin_psi = psi.cos(), psi.sin()
        along_y = sin_psi.abs() >= cos_psi.abs()

        def family(
            mask: torch.Tensor,
            major_src: torch.Tensor,
            minor_src: torch.Tensor,
            major_dir: torch.Tensor,
            minor_dir: torch.Tensor,
        ) -> _Rays:
            index = torch.nonzero(mask).flatten()
            slope = minor_dir[index] / major_dir[index]
            return _Rays(
                index=index,
                intercept=minor_src[index] - major_src[index] * slope,
                slope=slope,
                secant=(1.0 / major_dir[index].abs()).float(),
            )

        _RAY_CACHE.clear()
        _RAY_CACHE[key] = (
            family(along_y, src_y, src_x, sin_psi, cos_psi),
            family(~along_y, src_x, src_y, cos_psi, sin_psi),
        )
    return _RAY_CACHE[key]


def _project_family(
    sino: torch.Tensor, lines: torch.Tensor, line_spacing: float, sample_spacing: float, rays: _Rays
) -> None:
    """Add to ``sino`` (N, V * C) the line integrals of ``rays`` through ``lines`` (L, N, 1, P).

    Line ``l`` sits at major coordinate ``u_l`` (mm, image centre = 0); a ray crosses it at minor
    coordinate ``intercept + u_l · slope``. The lines are split into bands and each band samples only
    the rays that pass through it, which skips most crossings that fall outside the image.
    """
    n_lines, _, _, n_points = lines.shape
    device = lines.device
    u = (torch.arange(n_lines, dtype=torch.float64, device=device) - 0.5 * (n_lines - 1)) * line_spacing
    half_len = 0.5 * n_points * sample_spacing
    reach = half_len + sample_spacing  # interpolation still sees the edge pixel half a pixel outside
    weight = rays.secant * line_spacing
    n_bands = max(1, n_lines // _BAND_LINES)
    edges = [round(k * n_lines / n_bands) for k in range(n_bands + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        first = rays.intercept + u[lo] * rays.slope
        last = rays.intercept + u[hi - 1] * rays.slope
        crosses = (torch.minimum(first, last) < reach) & (torch.maximum(first, last) > -reach)
        hit = torch.nonzero(crosses).flatten()
        if hit.numel() == 0:
            continue
        # grid_sample (align_corners=False) wants the minor coordinate divided by half the line length.
        offset = (rays.intercept[hit] / half_len).float()
        gain = (rays.slope[hit] / half_len).float()
        partial = _sample_lines(lines[lo:hi], u[lo:hi].float()[:, None], offset, gain)
        sino[:, rays.index[hit]] += partial * weight[hit]


def _sample_lines(lines: torch.Tensor, u: torch.Tensor, offset: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``Σ_l lines[l](offset + u_l · gain)`` per ray (normalised coordinates); float32 ``(N, rays)``."""
    n_lines, n = lines.shape[:2]
    n_rays = offset.numel()
    out = torch.empty(n, n_rays, dtype=torch.float32, device=lines.device)
    per_chunk = max(1, _CHUNK_SAMPLES // (n_lines * n))  # the samples, (L, N, rays), bound the memory
    grid = torch.zeros(n_lines, min(per_chunk, n_rays), 1, 2, dtype=torch.float32, device=lines.device)
    for start in range(0, n_rays, per_chunk):
        stop = min(start + per_chunk, n_rays)
        g = grid[:, : stop - start]
        torch.addcmul(offset[None, start:stop], u, gain[None, start:stop], out=g[..., 0, 0])
        samples = F.grid_sample(lines, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[:, start:stop] = samples.sum(0)[..., 0]
    return out
