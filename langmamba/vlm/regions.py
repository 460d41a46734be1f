"""Region-level ground truth from a CT slice's own HU values and lesion mask, in torch.

Used twice: as the word targets of LangAE training (on the training device, batch by batch) and as the
ground truth the explanations are evaluated against (:mod:`langmamba.evaluate_explanations`). Only torch
is needed, so both run on a GPU host without scipy.

Per pixel (``hu`` ``(B, H, W)`` in HU):

- *Body.* Pixels that are not air (smoothed HU < -500, as :data:`langmamba.vlm.tissue.BODY_THRESHOLD_HU`)
  connected to the image border: a flood fill from the border through air (4-connected), so the lungs
  and airways, enclosed by the body, are inside. On a patch cut from a slice, air connected to the patch
  border counts as outside: exact on whole slices, an approximation on patches.
- *Class.* One of :data:`REGION_CLASSES` by the smoothed HU (Gaussian sigma 1 px), with the cut points
  of :mod:`langmamba.vlm.tissue`: air (outside the body), lung (< -190 HU inside), fat [-190, -30),
  fluid [-30, 30), soft tissue [30, 100), enhanced vessel [100, 200), bone [200, 2500), metal >= 2500.

Per region (``size × size`` pixel cells, the last ones cropped by the image edge): the fraction of every
class (:func:`region_fractions`), the dominant class (largest fraction, ties to the lower index), and
the lesion fraction. Candidate words of a region (:func:`candidate_words`): the words of its dominant
class; where a lesion mask was given, the lesion words too when the lesion covers part of the region,
and only the lesion words when it covers at least half.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from langmamba.errors import InputError

BODY_THRESHOLD_HU = -500.0
"""Air below this (smoothed) HU; the value of :mod:`langmamba.vlm.tissue`, which needs scipy."""

REGION_CLASSES = ("air", "lung", "fat", "fluid", "soft tissue", "enhanced vessel", "bone", "metal")
"""HU classes of a region, in :func:`classify_hu`'s index order."""

# Upper cut points (HU) of lung, fat, fluid, soft tissue, enhanced vessel, bone (langmamba.vlm.tissue).
_INSIDE_EDGES = (-190.0, -30.0, 30.0, 100.0, 200.0, 2500.0)
LESION_MAJORITY = 0.5
"""A region is a lesion region when the lesion mask covers at least this fraction of it."""


def _smooth(hu: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (replicate padding) of ``(B, H, W)``."""
    if sigma <= 0:
        return hu
    radius = max(1, int(4 * sigma + 0.5))  # scipy.ndimage.gaussian_filter's truncation
    x = torch.arange(-radius, radius + 1, device=hu.device, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(hu.dtype)
    out = F.pad(hu[:, None], (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))[:, 0]


def body_mask(hu: torch.Tensor, smoothing_px: float = 1.0, check_every: int = 32) -> torch.Tensor:
    """Inside-body pixels of slices ``(B, H, W)`` in HU -> bool ``(B, H, W)`` (see the module docstring)."""
    if hu.ndim != 3:
        raise InputError(f"body_mask expects slices (B, H, W), got shape {tuple(hu.shape)}")
    # HU thresholds need float32 even inside a bf16 training step.
    with torch.autocast(hu.device.type, enabled=False):
        return _body_mask(hu, smoothing_px, check_every)


def _body_mask(hu: torch.Tensor, smoothing_px: float, check_every: int) -> torch.Tensor:
    air = _smooth(hu.float(), smoothing_px) < BODY_THRESHOLD_HU
    border = torch.zeros_like(air)
    border[:, 0, :] = border[:, -1, :] = True
    border[:, :, 0] = border[:, :, -1] = True
    outside = (air & border).float()
    passable = air.float()
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], device=hu.device).view(1, 1, 3, 3)
    # Geodesic dilation through air; stops when a round of ``check_every`` steps adds nothing.
    for _ in range(hu.shape[-1] * hu.shape[-2]):
        before = outside.sum()
        for _ in range(check_every):
            outside = (F.conv2d(outside[:, None], cross, padding=1)[:, 0] > 0).float() * passable
        if outside.sum() == before:
            break
    return outside < 0.5


def classify_hu(hu: torch.Tensor, body: torch.Tensor | None = None, smoothing_px: float = 1.0) -> torch.Tensor:
    """Class index (row of :data:`REGION_CLASSES`) of every pixel of ``(B, H, W)`` HU -> long ``(B, H, W)``."""
    if body is None:
        body = body_mask(hu, smoothing_px)
    with torch.autocast(hu.device.type, enabled=False):
        smooth = _smooth(hu.float(), smoothing_px)
        edges = torch.tensor(_INSIDE_EDGES, device=hu.device, dtype=smooth.dtype)
        classes = torch.bucketize(smooth, edges, right=True) + 1
    return torch.where(body, classes, torch.zeros_like(classes))


def region_fractions(values: torch.Tensor, size: int, classes: int | None = None) -> torch.Tensor:
    """Mean over ``size × size`` cells (edge cells cropped, never padded).

    ``values`` is a long class map ``(B, H, W)`` (give ``classes``: returns per-class fractions
    ``(B, g_h, g_w, classes)``) or a float/bool map ``(B, H, W)`` (returns ``(B, g_h, g_w)``).
    ``g = ceil(H / size)``.
    """
    if classes is not None:
        x = F.one_hot(values.long(), classes).permute(0, 3, 1, 2).float()
    else:
        x = values.float()[:, None]
    pooled = F.avg_pool2d(x, size, stride=size, ceil_mode=True, count_include_pad=False)
    return pooled.permute(0, 2, 3, 1) if classes is not None else pooled[:, 0]


def class_word_masks(
    word_classes: Sequence[str], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per_class (K, V) bool, lesion (V,) bool)``: the words of each :data:`REGION_CLASSES` entry, lesion words."""
    per_class = torch.tensor([[c == name for c in word_classes] for name in REGION_CLASSES], device=device)
    lesion = torch.tensor([c == "lesion" for c in word_classes], device=device)
    return per_class, lesion


def candidate_words(
    fractions: torch.Tensor, lesion_fraction: torch.Tensor | None, per_class: torch.Tensor, lesion_words: torch.Tensor
) -> torch.Tensor:
    """Candidate word mask per region: ``(B, g_h, g_w, K)`` fractions -> bool ``(B, g_h, g_w, V)``.

    ``lesion_fraction`` ``(B, g_h, g_w)`` (``None`` where no lesion mask exists) adds the lesion words
    where it is positive and leaves only them where it is at least :data:`LESION_MAJORITY`.
    """
    dominant = fractions.argmax(dim=-1)
    mask = per_class[dominant]
    if lesion_fraction is not None:
        lesion = lesion_words.view(1, 1, 1, -1)
        some = (lesion_fraction > 0)[..., None]
        most = (lesion_fraction >= LESION_MAJORITY)[..., None]
        mask = torch.where(most, lesion.expand_as(mask), mask | (some & lesion))
    return mask
