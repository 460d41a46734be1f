"""Native-noise-aware dose: measure a scan's own noise and set the photons so that dose ``d`` means variance / ``d``.

A simulated fraction ``d`` of the dose should leave the image with ``1 / d`` times the noise variance
the scan already has, whatever the patient's size and whatever tube current the real scanner used.
The scanner's incident photons are unknown, so they are solved for: the noise the simulation adds,
measured in the same flat soft tissue as the native noise, must be ``σ_native² · (1 / d - 1)``.

Noise is measured after the global noise level of Christianson et al. ("Automated technique to measure
noise in clinical CT examinations", AJR 204(6), 2015): the mode of the distribution of local standard
deviations over soft tissue picks out the flat, noise-only windows without any hand-placed ROI, and
both the native and the added noise are measured over those same windows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from langmamba.errors import ConfigError
from langmamba.runtime import resolve_device
from langmamba.simulate._tensor import per_slice, spacing_pair, spacing_pairs
from langmamba.simulate.simulator import (
    FULL_DOSE_PHOTONS,
    MU_WATER_PER_MM,
    derive_slice_seeds,
    simulate_batch,
    z_modulation,
)

# Soft tissue, judged on the 3x3 local mean: water, muscle, organs, blood, brain (Christianson et al. use
# 0-100 HU); fat, contrast-filled vessels and bone are left out because windows mixing them with muscle
# measure anatomy, not noise (with -50-150 HU, chest-wall windows outnumbered the flat ones on lung1).
SOFT_TISSUE_HU = (-20.0, 120.0)
# Local standard deviations are taken over windows about this wide (mm), at least 5 pixels.
WINDOW_MM = 7.0
# Fewer usable window centres than this and a slice's noise is not measured (NaN).
MIN_PIXELS = 300
# Windows whose local SD lies within this factor range of the mode are taken as noise only (flat).
FLAT_BAND = (0.7, 1.4)


@dataclass(frozen=True)
class NoiseEstimate:
    """Noise of each slice of a stack.

    Attributes:
        sigma_hu: ``(N,)`` noise level (HU): root mean local variance over ``mask``; NaN where the slice has
            too little flat soft tissue.
        mask: ``(N, H, W)`` bool, the window centres it was measured over (the noise-dominated windows).
        window_px: the local window side, pixels.
    """

    sigma_hu: torch.Tensor
    mask: torch.Tensor
    window_px: int


def local_std(images: torch.Tensor, window_px: int) -> torch.Tensor:
    """Standard deviation (ddof 1) in the ``window_px``² window around each pixel, ``(N, H, W)`` → same."""
    x = images.double()[:, None]
    pad = window_px // 2
    mean = F.avg_pool2d(x, window_px, stride=1, padding=pad, count_include_pad=False)
    mean_sq = F.avg_pool2d(x * x, window_px, stride=1, padding=pad, count_include_pad=False)
    n = window_px * window_px
    return ((mean_sq - mean * mean).clamp_min(0.0) * (n / (n - 1))).sqrt().float()[:, 0]


def kernel_mode(values: torch.Tensor, bandwidth: float = 0.1, steps: int = 100, start_quantile: float = 0.25) -> float:
    """Lowest main mode of a positive 1-D sample, by mean shift with a Gaussian kernel.

    Starting at the ``start_quantile`` quantile, the estimate moves to the kernel-weighted mean (kernel
    ``bandwidth`` × the start wide) until it settles. Local standard deviations of a scan are bimodal
    where windows straddle structure; starting low finds the noise mode, not the structure one. Unlike
    the peak of a histogram it varies smoothly with the data and scales with them
    (mode(c·x) = c·mode(x)), which the photon search of :func:`native_incident_photons` relies on.
    """
    values = values.double().flatten()
    mode = float(torch.quantile(values, start_quantile)) if values.numel() < 16_000_000 else float(values.median())
    width = bandwidth * mode
    if not width > 0:
        return mode
    for _ in range(steps):
        weight = torch.exp(-0.5 * ((values - mode) / width) ** 2)
        new = float((weight * values).sum() / weight.sum())
        if abs(new - mode) < 1e-6 * width:
            return new
        mode = new
    return mode


def window_pixels(pixel_spacing_mm: float | Sequence[float], window_mm: float = WINDOW_MM) -> int:
    """Odd window side in pixels spanning about ``window_mm`` (at least 5)."""
    dy, dx = spacing_pair(pixel_spacing_mm)
    side = max(5, round(window_mm / math.sqrt(dy * dx)))
    return side if side % 2 else side + 1


def flat_soft_tissue(
    hu: torch.Tensor, window_px: int, soft_tissue_hu: tuple[float, float] = SOFT_TISSUE_HU
) -> torch.Tensor:
    """Pixels whose whole local window is soft tissue, ``(N, H, W)`` HU → bool ``(N, H, W)``."""
    local_mean = F.avg_pool2d(hu.float()[:, None], 3, stride=1, padding=1, count_include_pad=False)
    soft = ((local_mean >= soft_tissue_hu[0]) & (local_mean <= soft_tissue_hu[1])).float()
    eroded = -F.max_pool2d(-soft, window_px, stride=1, padding=window_px // 2)
    return eroded[:, 0] > 0.5


def estimate_noise(
    hu: np.ndarray | torch.Tensor,
    pixel_spacing_mm: float | Sequence[float],
    *,
    mask: torch.Tensor | None = None,
    window_mm: float = WINDOW_MM,
    soft_tissue_hu: tuple[float, float] = SOFT_TISSUE_HU,
) -> NoiseEstimate:
    """Noise level of each slice, measured where the image holds noise only.

    Without ``mask``: the mode of the local standard deviation over soft tissue (Christianson et al.)
    locates the noise level; the windows whose local SD lies within ``FLAT_BAND`` of it are the flat,
    noise-only windows, and the noise is the root mean local variance over them. With ``mask`` (for
    instance the flat windows of the native image, to measure added noise or a simulated image in the
    same place): the root mean local variance over exactly those windows. Unlike a mode, this average is
    additive (native + independent added noise) and varies smoothly with the noise level, which the
    photon search of :func:`native_incident_photons` needs.

    Args:
        hu: ``(H, W)`` or ``(N, H, W)`` HU.
        pixel_spacing_mm: a number or ``(row, column)`` in mm.
        mask: ``(N, H, W)`` bool window centres to measure over; by default found on ``hu`` itself.
        window_mm: local window width, mm.
        soft_tissue_hu: HU range counted as soft tissue.

    Returns:
        :class:`NoiseEstimate` (on the device of ``hu``).
    """
    images = torch.as_tensor(np.asarray(hu, dtype=np.float32)) if not isinstance(hu, torch.Tensor) else hu
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ConfigError(f"hu must be (H, W) or (N, H, W), got shape {tuple(images.shape)}")
    side = window_pixels(pixel_spacing_mm, window_mm)
    sd = local_std(images, side)
    if mask is None:
        tissue = flat_soft_tissue(images, side, soft_tissue_hu)
        mask = torch.zeros_like(tissue)
        for i in range(images.shape[0]):
            values = sd[i][tissue[i]]
            if values.numel() >= MIN_PIXELS:
                mode = kernel_mode(values)
                mask[i] = tissue[i] & (sd[i] >= FLAT_BAND[0] * mode) & (sd[i] <= FLAT_BAND[1] * mode)
    elif tuple(mask.shape) != tuple(images.shape):
        raise ConfigError(f"mask must have the image's shape {tuple(images.shape)}, got {tuple(mask.shape)}")
    mask = mask.to(sd.device)
    sigma = torch.full((images.shape[0],), math.nan, dtype=torch.float64)
    for i in range(images.shape[0]):
        values = sd[i][mask[i]]
        if values.numel() >= MIN_PIXELS:
            sigma[i] = float(values.double().pow(2).mean().sqrt())
    return NoiseEstimate(sigma_hu=sigma, mask=mask, window_px=side)


@dataclass(frozen=True)
class Calibration:
    """Incident photons that make a dose fraction mean the native variance / dose, per slice.

    Attributes:
        incident_photons: ``(N,)`` I0 of the central ray (NaN where the native noise could not be measured).
        native_sigma_hu: ``(N,)`` measured native noise.
        added_sigma_hu: ``(N,)`` noise the simulation adds at those photons, same estimator and mask.
        variance_ratio: ``(N,)`` (native² + added²) / native², to compare with ``1 / dose``.
        dose: ``(N,)`` the dose fractions calibrated for.
    """

    incident_photons: torch.Tensor
    native_sigma_hu: torch.Tensor
    added_sigma_hu: torch.Tensor
    variance_ratio: torch.Tensor
    dose: torch.Tensor


def native_incident_photons(
    hu: np.ndarray | torch.Tensor,
    pixel_spacing_mm: float | Sequence[float] | torch.Tensor,
    dose: float | Sequence[float] | torch.Tensor = 0.25,
    *,
    iterations: int = 6,
    tolerance: float = 0.03,
    draws: int = 2,
    start_photons: float | None = None,
    seed: int = 0,
    window_mm: float = WINDOW_MM,
    **simulate_kwargs,
) -> Calibration:
    """Solve, slice by slice, for the ``incident_photons`` at which ``dose`` gives native variance / ``dose``.

    The added variance of the quantum noise scales as ``1 / I0``; electronic noise and the low-signal
    correction bend that, so the photons are searched by the secant method on log variance against
    log photons (first step: slope -1) until the measured added variance is within ``tolerance`` of
    ``σ_native² (1 / d - 1)`` (or ``iterations`` runs).
    Each iteration simulates ``draws`` noise realisations per slice with fixed seeds (one draw varies by
    several per cent in variance: the noise of a slice comes from a few hundred views).

    Args:
        hu: ``(N, H, W)`` (or ``(H, W)``) full-dose HU.
        pixel_spacing_mm: as for :func:`~langmamba.simulate.simulate_batch`.
        dose: fraction(s) in (0, 1) to calibrate for.
        iterations: most noise simulations.
        tolerance: relative error on the added variance that ends the search.
        draws: noise realisations averaged per measurement.
        start_photons: first guess (default ``FULL_DOSE_PHOTONS``).
        seed: seed of the noise draws used for measuring.
        window_mm: local window of the noise estimator.
        **simulate_kwargs: scanner settings passed to :func:`~langmamba.simulate.simulate_batch`
            (geometry, bowtie, modulation, low_signal, electronic_noise, device, ...).

    Returns:
        :class:`Calibration` (CPU tensors). Slices without measurable soft tissue get NaN photons.
    """
    for key in ("incident_photons", "seed", "input_is_noise_free", "reconstruction"):
        if key in simulate_kwargs:
            raise ConfigError(f"native_incident_photons sets {key} itself; do not pass it")
    if not (isinstance(iterations, int) and iterations >= 1):
        raise ConfigError(f"iterations must be an integer >= 1, got {iterations!r}")
    if not (isinstance(draws, int) and draws >= 1):
        raise ConfigError(f"draws must be an integer >= 1, got {draws!r}")
    images = torch.as_tensor(np.asarray(hu, dtype=np.float32)) if not isinstance(hu, torch.Tensor) else hu.float()
    if images.ndim == 2:
        images = images[None]
    n = images.shape[0]
    doses = per_slice(dose, n, "dose")
    if not bool(((doses > 0) & (doses <= 1)).all()):
        raise ConfigError(f"dose must be a fraction of the full dose in (0, 1], got {dose!r}")
    spacings = spacing_pairs(pixel_spacing_mm, n)
    native = [estimate_noise(images[i : i + 1], spacings[i], window_mm=window_mm) for i in range(n)]
    sigma_native = torch.cat([e.sigma_hu for e in native])
    wanted = sigma_native**2 * (1.0 / doses - 1.0)
    photons = torch.full((n,), float(start_photons or FULL_DOSE_PHOTONS), dtype=torch.float64)
    added = torch.zeros(n, dtype=torch.float64)
    active = torch.isfinite(sigma_native) & (wanted > 0)
    previous: list[tuple[float, float] | None] = [None] * n
    draw_seeds = derive_slice_seeds(seed, n * draws)
    spacing_arg = pixel_spacing_mm if isinstance(pixel_spacing_mm, torch.Tensor) else spacings[0]
    for iteration in range(iterations):
        todo = torch.nonzero(active).flatten()
        if todo.numel() == 0:
            break
        index = todo.tolist()
        group = todo.repeat(draws)  # every slice `draws` times, each draw with its own fixed seed
        group_spacing = spacing_arg[group] if isinstance(spacing_arg, torch.Tensor) else spacing_arg
        noise = simulate_batch(
            images[group],
            group_spacing,
            doses[group],
            incident_photons=photons[group],
            seed=[draw_seeds[d * n + i] for d in range(draws) for i in index],
            **simulate_kwargs,
        ) - images[group].to(_device_of(simulate_kwargs, images))
        for k, i in enumerate(index):
            mask = native[i].mask.to(noise.device)
            variances = [
                estimate_noise(noise[d * len(index) + k][None], spacings[i], mask=mask, window_mm=window_mm).sigma_hu[0]
                ** 2
                for d in range(draws)
            ]
            measured = math.sqrt(sum(variances) / draws)
            added[i] = measured
            ratio = float(measured**2 / wanted[i])
            if abs(ratio - 1.0) <= tolerance or not math.isfinite(ratio) or ratio <= 0:
                active[i] = False
            elif iteration < iterations - 1:  # the last photons stay the ones measured
                slope = -1.0
                if previous[i] is not None:  # secant on log variance against log photons
                    (log_i0, log_var) = previous[i]
                    step = math.log(photons[i]) - log_i0
                    if abs(step) > 1e-6:
                        slope = min(-0.3, max(-2.0, (math.log(measured**2) - log_var) / step))
                previous[i] = (math.log(photons[i]), math.log(measured**2))
                photons[i] *= ratio ** (-1.0 / slope)
    photons[~torch.isfinite(sigma_native)] = math.nan
    no_noise = torch.isfinite(sigma_native) & (wanted <= 0)  # dose 1: nothing to add
    added[no_noise] = 0.0
    ratio = (sigma_native**2 + added**2) / sigma_native**2
    return Calibration(photons, sigma_native, added, ratio, doses)


def _device_of(simulate_kwargs: dict, images: torch.Tensor) -> torch.device:
    device = simulate_kwargs.get("device", "auto")
    return images.device if device in (None, "auto") else resolve_device(device)


@dataclass(frozen=True)
class VolumeCalibration:
    """Photons of every slice of a volume, solved from its native noise.

    Attributes:
        incident_photons: ``(Z,)`` I0 of each slice: the z modulation times the photons solved on the
            calibrated slices (divided by their z modulation), interpolated along ``z``.
        reference_photons: median solved I0 at the volume's mean tube current (NaN: not measurable,
            default used).
        slices: the slices calibrated on.
        native_sigma_hu: native noise of those slices (HU).
        variance_ratio: (native² + added²) / native² on those slices at their own solved photons.
        dose: the dose fraction.
    """

    incident_photons: np.ndarray
    reference_photons: float
    slices: list[int]
    native_sigma_hu: np.ndarray
    variance_ratio: np.ndarray
    dose: float

    def line(self) -> str:
        """One log line (no patient data)."""
        if not self.slices:
            return f"native noise not measurable (no flat soft tissue); I0 = {self.incident_photons.mean():.3g} used"
        return (
            f"native noise {np.median(self.native_sigma_hu):.1f} HU (median of {len(self.slices)} slices); "
            f"I0 {self.reference_photons:.3g} at mean current; variance ratio at dose {self.dose:g}: "
            f"{np.median(self.variance_ratio):.2f} (target {1.0 / self.dose:.2f})"
        )


def calibrate_volume(
    volume,
    dose: float = 0.25,
    *,
    n_slices: int = 5,
    seed: int = 0,
    **simulate_kwargs,
) -> VolumeCalibration:
    """Photons for every slice of ``volume`` so that ``dose`` multiplies its native noise variance by ``1 / dose``.

    The native noise is measured on up to 40 slices spread along ``z``; ``n_slices`` of those with
    measurable soft tissue, spread evenly, are calibrated with :func:`native_incident_photons`. Each
    slice gets the z modulation (:class:`~langmamba.simulate.exposure.TubeCurrentModulation`, from its
    water-equivalent diameter) times the calibrated photons / z modulation interpolated along ``z``
    (constant beyond the first and last calibrated slice), so the real scanner's own z modulation is
    followed where the attenuation rule misses it.
    Without measurable soft tissue anywhere, ``FULL_DOSE_PHOTONS`` is used (and a warning logged).

    Args:
        volume: a :class:`~langmamba.io.volume.CTVolume` at normal dose.
        dose: the dose fraction, in (0, 1].
        n_slices: slices to calibrate on.
        seed: seed of the measuring noise draws.
        **simulate_kwargs: scanner settings (modulation, geometry, bowtie, low_signal, device, ...).
    """
    import logging

    from langmamba.simulate.exposure import TubeCurrentModulation

    if simulate_kwargs.get("input_is_noise_free"):
        raise ConfigError("a noise-free input has no native noise: pass incident_photons explicitly")
    kwargs = {k: v for k, v in simulate_kwargs.items() if k not in ("reconstruction", "input_is_noise_free")}
    modulation = kwargs.get("modulation", TubeCurrentModulation())
    kwargs["modulation"] = modulation
    factors = z_modulation(volume, modulation, kwargs.get("mu_water_per_mm", MU_WATER_PER_MM))
    spacing = (volume.spacing[1], volume.spacing[0])
    total = volume.hu.shape[0]
    candidates = np.unique(np.linspace(0, total - 1, min(total, 40)).round().astype(int))
    sigma = np.concatenate(
        [
            estimate_noise(np.asarray(volume.hu[candidates[i : i + 8]], dtype=np.float32), spacing).sigma_hu.numpy()
            for i in range(0, len(candidates), 8)
        ]
    )
    valid = candidates[np.isfinite(sigma)]
    if valid.size == 0 or dose >= 1.0:
        if valid.size == 0:
            logging.getLogger(__name__).warning(
                "no flat soft tissue found to measure the native noise; using %g incident photons", FULL_DOSE_PHOTONS
            )
        return VolumeCalibration(FULL_DOSE_PHOTONS * factors, math.nan, [], np.zeros(0), np.zeros(0), float(dose))
    chosen = valid[np.unique(np.linspace(0, valid.size - 1, min(n_slices, valid.size)).round().astype(int))]
    calibration = native_incident_photons(
        np.asarray(volume.hu[chosen], dtype=np.float32), spacing, dose, seed=seed, **kwargs
    )
    # What the attenuation rule misses of the real scanner's z modulation, measured on the calibrated
    # slices and interpolated (log-linearly) between them.
    solved = calibration.incident_photons.numpy() / factors[chosen]
    ok = np.isfinite(solved)
    if not ok.any():
        return VolumeCalibration(FULL_DOSE_PHOTONS * factors, math.nan, [], np.zeros(0), np.zeros(0), float(dose))
    correction = np.exp(np.interp(np.arange(total), chosen[ok], np.log(solved[ok])))
    return VolumeCalibration(
        incident_photons=correction * factors,
        reference_photons=float(np.exp(np.median(np.log(solved[ok])))),
        slices=[int(z) for z in chosen],
        native_sigma_hu=calibration.native_sigma_hu.numpy(),
        variance_ratio=calibration.variance_ratio.numpy(),
        dose=float(dose),
    )
