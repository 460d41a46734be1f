"""Image-quality metrics for CT denoising, computed the way LDCT papers report them.

LangMamba protocol (the paper and RED-CNN lineage): clip HU to a display window, scale the window to [0, 1],
compute PSNR and SSIM with data range 1 per 2-D slice, and average over slices. ``WINDOWS`` names the two
windows reported in the model card. RMSE is given in HU after the same window clipping, so it reads directly.

All functions take HU arrays of shape (H, W) or (Z, H, W) (a 3-D array is treated as Z slices) and an optional
boolean ``mask`` of the same shape restricting the statistic (e.g. :func:`body_mask`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .errors import InputError

WINDOWS: dict[str, tuple[float, float]] = {"-160_240": (-160.0, 240.0), "-1000_1000": (-1000.0, 1000.0)}
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11×11 Gaussian window, as in Wang et al. 2004
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _as_slices(*arrays: np.ndarray | None) -> list[np.ndarray | None]:
    shapes = {np.shape(a) for a in arrays if a is not None}
    if len(shapes) != 1:
        raise InputError(f"metric inputs must have the same shape, got {sorted(shapes)}")
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        a = np.asarray(a)
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3:
            raise InputError(f"metric inputs must be 2-D slices or 3-D volumes, got shape {a.shape}")
        out.append(a)
    return out


def to_window(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip HU to ``window = (low, high)`` and scale it to [0, 1] (float64)."""
    low, high = window
    if not high > low:
        raise InputError(f"window must have high > low, got {window}")
    return (np.clip(np.asarray(hu, dtype=np.float64), low, high) - low) / (high - low)


def rmse(
    prediction: np.ndarray,
    reference: np.ndarray,
    window: tuple[float, float] = WINDOWS["-160_240"],
    mask: np.ndarray | None = None,
) -> float:
    """Root-mean-square error in HU between window-clipped images, averaged over slices."""
    prediction, reference, mask = _as_slices(prediction, reference, mask)
    scale = window[1] - window[0]
    errors = []
    for z in range(prediction.shape[0]):
        diff = (to_window(prediction[z], window) - to_window(reference[z], window)) * scale
        if mask is not None:
            if not mask[z].any():
                continue
            diff = diff[mask[z].astype(bool)]
        errors.append(np.sqrt(np.mean(diff**2)))
    return float(np.mean(errors)) if errors else float("nan")


def psnr(
    prediction: np.ndarray,
    reference: np.ndarray,
    window: tuple[float, float] = WINDOWS["-160_240"],
    mask: np.ndarray | None = None,
) -> float:
    """PSNR in dB of window-scaled images (data range 1), averaged over slices; ``inf`` for identical slices."""
    prediction, reference, mask = _as_slices(prediction, reference, mask)
    values = []
    for z in range(prediction.shape[0]):
        diff = to_window(prediction[z], window) - to_window(reference[z], window)
        if mask is not None:
            if not mask[z].any():
                continue
            diff = diff[mask[z].astype(bool)]
        mse = np.mean(diff**2)
        values.append(np.inf if mse == 0 else 10.0 * np.log10(1.0 / mse))
    return float(np.mean(values)) if values else float("nan")


def _gaussian_valid(image: np.ndarray) -> np.ndarray:
    """Gaussian-weighted local mean over the 11×11 window, valid positions only (no padding effects)."""
    filtered = ndimage.gaussian_filter(image, SSIM_SIGMA, truncate=SSIM_RADIUS / SSIM_SIGMA, mode="constant")
    return filtered[SSIM_RADIUS:-SSIM_RADIUS, SSIM_RADIUS:-SSIM_RADIUS]


def ssim_map(
    prediction: np.ndarray, reference: np.ndarray, window: tuple[float, float] = WINDOWS["-160_240"]
) -> np.ndarray:
    """SSIM map (Wang et al. 2004; 11×11 Gaussian, σ = 1.5, data range 1) of one 2-D slice.

    The map covers valid window positions only, so it is ``2 * 5`` pixels smaller than the input in each axis.
    """
    x = to_window(prediction, window)
    y = to_window(reference, window)
    if min(x.shape) <= 2 * SSIM_RADIUS:
        raise InputError(f"SSIM needs slices larger than {2 * SSIM_RADIUS + 1} pixels, got {x.shape}")
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mu_x, mu_y = _gaussian_valid(x), _gaussian_valid(y)
    var_x = _gaussian_valid(x * x) - mu_x**2
    var_y = _gaussian_valid(y * y) - mu_y**2
    cov = _gaussian_valid(x * y) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim(
    prediction: np.ndarray,
    reference: np.ndarray,
    window: tuple[float, float] = WINDOWS["-160_240"],
    mask: np.ndarray | None = None,
) -> float:
    """Mean SSIM of window-scaled images, averaged over slices; ``mask`` restricts the mean of each map."""
    prediction, reference, mask = _as_slices(prediction, reference, mask)
    values = []
    for z in range(prediction.shape[0]):
        smap = ssim_map(prediction[z], reference[z], window)
        if mask is not None:
            inner = mask[z].astype(bool)[SSIM_RADIUS:-SSIM_RADIUS, SSIM_RADIUS:-SSIM_RADIUS]
            if not inner.any():
                continue
            smap = smap[inner]
        values.append(float(np.mean(smap)))
    return float(np.mean(values)) if values else float("nan")


def noise_sigma(hu: np.ndarray, roi: np.ndarray) -> float:
    """Standard deviation in HU inside a region of interest (a uniform region measures noise)."""
    (hu, roi) = _as_slices(hu, roi)
    values = hu[roi.astype(bool)]
    if values.size < 2:
        raise InputError("the noise ROI holds fewer than 2 voxels")
    return float(np.std(values, ddof=1))


def cnr(hu: np.ndarray, lesion: np.ndarray, background: np.ndarray) -> float:
    """Contrast-to-noise ratio ``|mean(lesion) - mean(background)| / std(background)``."""
    hu, lesion, background = _as_slices(hu, lesion, background)
    lesion_values = hu[lesion.astype(bool)]
    if lesion_values.size == 0:
        raise InputError("the lesion mask is empty")
    sigma = noise_sigma(hu, background)
    contrast = abs(float(np.mean(lesion_values)) - float(np.mean(hu[background.astype(bool)])))
    return contrast / sigma if sigma > 0 else float("inf")


def paired_bootstrap_ci(
    a: np.ndarray, b: np.ndarray, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean of the paired differences ``a - b`` with a percentile bootstrap confidence interval.

    ``a`` and ``b`` hold one score per unit (e.g. per slice, already averaged over noise draws) of two methods
    on the same units; the units are resampled with replacement ``resamples`` times. Adjacent CT slices are
    correlated, so the interval is, if anything, too narrow: read it per patient, not as independent samples.

    Returns ``{"mean", "low", "high", "n"}``.
    """
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise InputError(f"paired scores must have the same non-zero length, got {a.size} and {b.size}")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence}")
    difference = a - b
    if not np.all(np.isfinite(difference)):
        raise InputError("paired differences must be finite (an identical slice gives infinite PSNR)")
    rng = np.random.default_rng(seed)
    means = difference[rng.integers(0, difference.size, (resamples, difference.size))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(difference.mean()), "low": float(low), "high": float(high), "n": int(difference.size)}


def background_ring(
    lesion: np.ndarray,
    inner_mm: float = 2.0,
    outer_mm: float = 8.0,
    spacing_mm: tuple[float, float] = (1.0, 1.0),
    within: np.ndarray | None = None,
) -> np.ndarray:
    """A ring around a lesion (per slice, ``inner_mm`` to ``outer_mm`` from its edge) for lesion CNR."""
    shape = np.shape(lesion)
    (lesion, within) = _as_slices(lesion, within)
    ring = np.zeros(lesion.shape, dtype=bool)
    for z in range(lesion.shape[0]):
        if not lesion[z].any():
            continue
        distance = ndimage.distance_transform_edt(~lesion[z].astype(bool), sampling=spacing_mm)
        ring[z] = (distance > inner_mm) & (distance <= outer_mm)
        if within is not None:
            ring[z] &= within[z].astype(bool)
    return ring.reshape(shape)


def body_mask(hu: np.ndarray, threshold_hu: float = -500.0) -> np.ndarray:
    """Patient body per slice: the largest connected region above ``threshold_hu`` with its holes (lungs) filled."""
    shape = np.shape(hu)
    (hu,) = _as_slices(hu)
    mask = np.zeros(hu.shape, dtype=bool)
    for z in range(hu.shape[0]):
        labels, count = ndimage.label(hu[z] > threshold_hu)
        if count == 0:
            continue
        sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
        largest = labels == (1 + int(np.argmax(sizes)))
        mask[z] = ndimage.binary_fill_holes(largest)
    return mask.reshape(shape)


def soft_tissue_noise(hu: np.ndarray, window_px: int = 7, tissue_hu: tuple[float, float] = (0.0, 100.0)) -> float:
    """Native noise σ in HU of a scan without a noise-free reference: the median, over soft-tissue pixels, of the
    standard deviation in a ``window_px`` square around each pixel.

    Soft tissue = pixels inside :func:`body_mask` (eroded by the window) whose local mean lies in ``tissue_hu``.
    Most such windows are flat (muscle, liver, blood), so the median is the noise there; windows across an edge
    are a minority the median ignores. Correlated CT noise makes a small window read a little low.

    Args:
        hu: one slice (H, W) or a stack (Z, H, W) in HU.

    Raises:
        InputError: no soft-tissue pixel at all.
    """
    (hu,) = _as_slices(hu)
    values = []
    n = window_px * window_px
    for z in range(hu.shape[0]):
        image = hu[z].astype(np.float64)
        mean = ndimage.uniform_filter(image, window_px)
        var = (ndimage.uniform_filter(image * image, window_px) - mean * mean) * n / (n - 1)
        inside = ndimage.binary_erosion(body_mask(hu[z]), iterations=window_px)
        tissue = inside & (mean >= tissue_hu[0]) & (mean <= tissue_hu[1])
        values.append(np.sqrt(np.clip(var[tissue], 0, None)))
    values = np.concatenate(values)
    if values.size == 0:
        raise InputError(
            "no soft-tissue pixels (local mean in "
            f"{tissue_hu[0]:g}..{tissue_hu[1]:g} HU inside the body) to measure noise in"
        )
    return float(np.median(values))
