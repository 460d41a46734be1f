"""Noise power spectrum (NPS): is the added noise textured like the scan's own noise?

The NPS is estimated the usual way (ICRU Report 87; Dolly et al., J Appl Clin Med Phys 2016): square
ROIs that lie wholly in uniform tissue are detrended, Fourier transformed, squared and averaged::

    NPS(fx, fy) = Δx Δy / (Nx Ny) · <|DFT(ROI - fit)|²>     (HU² mm²)

and the 2-D spectrum is averaged over rings of equal radial frequency. Its integral over frequency is
the variance of the (detrended) noise. Native noise is measured on the image itself, whose ROIs still
hold a little anatomy (mostly at the lowest frequencies, which the detrending removes); added noise is
measured on the simulated minus the original image in the same ROIs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from langmamba.errors import ConfigError
from langmamba.simulate._tensor import spacing_pair


@dataclass(frozen=True)
class NoisePowerSpectrum:
    """Radially averaged NPS.

    Attributes:
        frequency: ``(K,)`` ring centres, cycles/mm.
        nps: ``(K,)`` HU² mm².
        n_rois: ROIs averaged.
        variance: variance of the detrended ROIs (HU²), the integral of the 2-D NPS.
    """

    frequency: np.ndarray
    nps: np.ndarray
    n_rois: int
    variance: float

    @property
    def peak_frequency(self) -> float:
        """Frequency of the largest ring value (cycles/mm)."""
        return float(self.frequency[int(np.argmax(self.nps))])

    @property
    def mean_frequency(self) -> float:
        """NPS-weighted mean radial frequency (cycles/mm); weighting by ring circumference (2-D mean)."""
        weight = self.nps * self.frequency
        return float((weight * self.frequency).sum() / weight.sum())

    def normalised(self) -> np.ndarray:
        """The curve divided by its 2-D integral (``Σ nps · 2π f Δf``), to compare shapes, not levels."""
        step = float(self.frequency[1] - self.frequency[0]) if self.frequency.size > 1 else 1.0
        return self.nps / float((self.nps * 2.0 * math.pi * self.frequency * step).sum())


def roi_corners(mask: np.ndarray, roi_px: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Top-left corners ``(row, col)`` of ``roi_px``² squares on a ``stride`` grid wholly inside ``mask`` (H, W)."""
    stride = stride or max(1, roi_px // 2)
    height, width = mask.shape
    inside = np.cumsum(np.cumsum(np.pad(mask.astype(np.int64), ((1, 0), (1, 0))), 0), 1)
    corners = []
    for r in range(0, height - roi_px + 1, stride):
        for c in range(0, width - roi_px + 1, stride):
            total = inside[r + roi_px, c + roi_px] - inside[r, c + roi_px] - inside[r + roi_px, c] + inside[r, c]
            if total == roi_px * roi_px:
                corners.append((r, c))
    return corners


def _detrend(rois: np.ndarray, order: int) -> np.ndarray:
    """Subtract from each ``(M, n, n)`` ROI its least-squares polynomial surface of ``order`` (0: the mean)."""
    n = rois.shape[-1]
    u = np.linspace(-1.0, 1.0, n)
    y, x = np.meshgrid(u, u, indexing="ij")
    terms = [x**i * y**j for i in range(order + 1) for j in range(order + 1 - i)]
    basis = np.stack([t.ravel() for t in terms], axis=1)
    flat = rois.reshape(rois.shape[0], -1).T
    coef, *_ = np.linalg.lstsq(basis, flat, rcond=None)
    return (flat - basis @ coef).T.reshape(rois.shape)


def noise_power_spectrum(
    images: np.ndarray | torch.Tensor,
    pixel_spacing_mm: float | Sequence[float],
    corners: Sequence[Sequence[tuple[int, int]]] | None = None,
    *,
    roi_px: int = 32,
    detrend_order: int = 2,
) -> NoisePowerSpectrum:
    """Radially averaged NPS of ``images`` ``(H, W)`` or ``(N, H, W)`` (HU) over square ROIs.

    Args:
        images: noise images (e.g. simulated minus original) or uniform regions of a scan.
        pixel_spacing_mm: a number or ``(row, column)`` in mm (square pixels expected for rings).
        corners: per image, the ROI corners to use (from :func:`roi_corners`); ``None``: tile each
            whole image.
        roi_px: ROI side, pixels.
        detrend_order: order of the polynomial surface removed from each ROI (2: quadratic).

    Returns:
        :class:`NoisePowerSpectrum` with rings ``1 / (roi_px Δ)`` wide up to the Nyquist frequency.
    """
    stack = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    stack = stack.astype(np.float64)[None] if stack.ndim == 2 else stack.astype(np.float64)
    if stack.ndim != 3:
        raise ConfigError(f"images must be (H, W) or (N, H, W), got shape {tuple(np.shape(images))}")
    dy, dx = spacing_pair(pixel_spacing_mm)
    if corners is None:
        full = np.ones(stack.shape[1:], dtype=bool)
        corners = [roi_corners(full, roi_px, roi_px)] * stack.shape[0]
    if len(corners) != stack.shape[0]:
        raise ConfigError(f"corners holds {len(corners)} lists for {stack.shape[0]} images")
    rois = [img[r : r + roi_px, c : c + roi_px] for img, cs in zip(stack, corners) for r, c in cs]
    if not rois:
        raise ConfigError(f"no {roi_px}x{roi_px} ROI fits in the uniform region; use a smaller roi_px")
    block = _detrend(np.stack(rois), detrend_order)
    power = np.abs(np.fft.fft2(block)) ** 2 * (dx * dy) / (roi_px * roi_px)
    nps_2d = np.fft.fftshift(power.mean(axis=0))
    fy = np.fft.fftshift(np.fft.fftfreq(roi_px, dy))
    fx = np.fft.fftshift(np.fft.fftfreq(roi_px, dx))
    radius = np.hypot(*np.meshgrid(fy, fx, indexing="ij"))
    step = 1.0 / (roi_px * max(dx, dy))
    nyquist = 0.5 / max(dx, dy)
    ring = np.floor(radius / step + 0.5).astype(int)
    n_rings = int(nyquist / step) + 1
    sums = np.bincount(ring.ravel(), weights=nps_2d.ravel(), minlength=n_rings)[:n_rings]
    counts = np.bincount(ring.ravel(), minlength=n_rings)[:n_rings]
    frequency = np.arange(n_rings) * step
    variance = float(nps_2d.sum() / (roi_px * roi_px * dx * dy))  # Σ NPS Δfx Δfy
    return NoisePowerSpectrum(frequency, sums / np.maximum(counts, 1), len(rois), variance)


def compare_nps(added: NoisePowerSpectrum, native: NoisePowerSpectrum) -> dict:
    """Shape and level of two spectra on the same rings.

    Returns:
        ``peak_frequency`` and ``mean_frequency`` (cycles/mm) of each, ``shape_correlation`` (Pearson
        correlation of the normalised curves), ``shape_overlap`` (1 - half the L1 distance of the
        normalised 2-D spectra, 1 = identical shapes) and ``variance_ratio`` (added / native).
    """
    if added.frequency.shape != native.frequency.shape or not np.allclose(added.frequency, native.frequency):
        raise ConfigError("the two spectra must share their frequency rings (same ROI size and spacing)")
    a, b = added.normalised(), native.normalised()
    step = float(added.frequency[1] - added.frequency[0])
    overlap = 1.0 - 0.5 * float((np.abs(a - b) * 2.0 * math.pi * added.frequency * step).sum())
    return {
        "added": {
            "peak_frequency": added.peak_frequency,
            "mean_frequency": added.mean_frequency,
            "variance": added.variance,
            "n_rois": added.n_rois,
        },
        "native": {
            "peak_frequency": native.peak_frequency,
            "mean_frequency": native.mean_frequency,
            "variance": native.variance,
            "n_rois": native.n_rois,
        },
        "shape_correlation": float(np.corrcoef(a, b)[0, 1]),
        "shape_overlap": overlap,
        "variance_ratio": added.variance / native.variance,
    }
