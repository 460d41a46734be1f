"""HU tissue composition of a CT slice: the physical signal the offline language space scores.

Every pixel is put in one tissue class by its (lightly smoothed) Hounsfield value and by whether it
lies inside the body. HU ranges are half-open ``[low, high)`` and follow the usual CT values
(water 0 HU, air -1000 HU); neighbouring tissues overlap in reality, so the cut points are
conventions, not truths:

====================  =================  ===================================================
class                 HU range           what falls there
====================  =================  ===================================================
outside_air           (outside body)     air around the patient; the couch counts as body
lung                  < -190             aerated lung, airways and gas inside the body
fat                   [-190, -30)        subcutaneous, visceral and mediastinal fat
fluid_soft_tissue     [-30, 30)          water, effusions, cysts, oedematous soft tissue
muscle                [30, 100)          muscle, solid organs, unenhanced blood (~40 HU)
enhanced_blood        [100, 200)         contrast-enhanced vessels and organs, partial bone
trabecular_bone       [200, 600)         cancellous bone and marrow spaces
cortical_bone         [600, 2500)        compact bone, dense calcification
metal                 >= 2500            implants, wires, clips (beyond bone attenuation)
====================  =================  ===================================================

"Outside the body" is air (HU < -500) connected to the image border; air enclosed by the body
(the lungs) is inside. A slice whose body touches the border all round therefore has no outside.
Label masks add two lesion classes sized by the radiological convention that a lesion up to 30 mm
across is a *nodule* and a larger one a *mass*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from langmamba.vlm.base import grid_edges

BODY_THRESHOLD_HU = -500.0
NODULE_MAX_DIAMETER_MM = 30.0
# A labelled lesion outweighs any tissue (presence of a tissue is at most 1): the annotation is
# the strongest evidence of what the slice shows.
LESION_PRESENCE = 1.0
# Air around the patient is in nearly every slice and says nothing about its content.
OUTSIDE_AIR_WEIGHT = 0.25


@dataclass(frozen=True)
class TissueClass:
    """A scoring class: name, HU range ``[low, high)`` (``None`` for lesions), short descriptions."""

    name: str
    hu_range: tuple[float, float] | None
    descriptions: tuple[str, ...]
    weight: float = 1.0


TISSUE_CLASSES: tuple[TissueClass, ...] = (
    TissueClass(
        "outside_air",
        (-math.inf, math.inf),
        ("air outside the patient's body", "dark empty background around the patient"),
        OUTSIDE_AIR_WEIGHT,
    ),
    TissueClass(
        "lung",
        (-math.inf, -190.0),
        ("aerated lung parenchyma filled with air", "lung tissue", "air in the lungs and airways"),
    ),
    TissueClass("fat", (-190.0, -30.0), ("fat", "subcutaneous and visceral adipose tissue")),
    TissueClass("fluid_soft_tissue", (-30.0, 30.0), ("water-density fluid", "fluid and soft tissue")),
    TissueClass("muscle", (30.0, 100.0), ("skeletal muscle", "muscle and solid organ parenchyma")),
    TissueClass(
        "enhanced_blood",
        (100.0, 200.0),
        ("contrast-enhanced blood in arteries and veins", "iodinated contrast in blood vessels"),
    ),
    TissueClass("trabecular_bone", (200.0, 600.0), ("trabecular bone", "cancellous bone and bone marrow")),
    TissueClass("cortical_bone", (600.0, 2500.0), ("cortical bone", "dense compact bone of the skeleton")),
    TissueClass("metal", (2500.0, math.inf), ("metal implant", "metallic foreign body")),
)

LESION_CLASSES: tuple[TissueClass, ...] = (
    TissueClass("nodule", None, ("a pulmonary nodule", "a small tumour")),
    TissueClass("mass", None, ("a large tumour mass", "cancer")),
)

ALL_CLASSES: tuple[TissueClass, ...] = TISSUE_CLASSES + LESION_CLASSES

# Upper bounds of the inside-body classes lung .. cortical_bone (np.digitize cut points).
_INSIDE_EDGES = np.array([c.hu_range[1] for c in TISSUE_CLASSES[1:-1]], dtype=np.float32)
_TISSUE_WEIGHTS = np.array([c.weight for c in TISSUE_CLASSES], dtype=np.float64)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Pixels of a slice ``(H, W)`` in HU that are not air connected to the border -> bool ``(H, W)``."""
    return ndimage.binary_fill_holes(hu >= BODY_THRESHOLD_HU)


def classify(hu: np.ndarray, smoothing_px: float = 1.0) -> np.ndarray:
    """Tissue class index (row of :data:`TISSUE_CLASSES`) of every pixel: ``(H, W)`` HU -> int8 ``(H, W)``.

    ``smoothing_px`` is the sigma (pixels) of a Gaussian applied first, so that quantum noise of a
    few tens of HU does not scatter homogeneous tissue over neighbouring classes.
    """
    hu = np.asarray(hu, dtype=np.float32)
    if smoothing_px > 0:
        hu = ndimage.gaussian_filter(hu, sigma=float(smoothing_px), mode="nearest")
    classes = (np.digitize(hu, _INSIDE_EDGES) + 1).astype(np.int8)
    classes[~body_mask(hu)] = 0
    return classes


def composition(classes: np.ndarray) -> np.ndarray:
    """Fraction of pixels in each tissue class: int ``(H, W)`` -> float64 ``(K_t,)``, sums to 1."""
    counts = np.bincount(classes.ravel(), minlength=len(TISSUE_CLASSES))
    return counts / max(classes.size, 1)


def grid_composition(classes: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Tissue fractions of each cell of a ``(g_h, g_w)`` grid -> float64 ``(g_h, g_w, K_t)``."""
    k = len(TISSUE_CLASSES)
    rows = np.searchsorted(grid_edges(classes.shape[0], grid[0]), np.arange(classes.shape[0]), side="right") - 1
    cols = np.searchsorted(grid_edges(classes.shape[1], grid[1]), np.arange(classes.shape[1]), side="right") - 1
    cell = rows[:, None] * grid[1] + cols[None, :]
    counts = np.bincount((cell * k + classes).ravel(), minlength=grid[0] * grid[1] * k)
    counts = counts.reshape(grid[0], grid[1], k).astype(np.float64)
    return counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1.0)


def tissue_presence(fractions: np.ndarray) -> np.ndarray:
    """How strongly each tissue is present: ``weight * sqrt(fraction)``, ``(..., K_t)`` -> same shape.

    The square root lets a tissue that fills 5 % of the slice (the spine) still count, instead of
    being drowned by the one that fills half of it.
    """
    return np.sqrt(np.clip(fractions, 0.0, 1.0)) * _TISSUE_WEIGHTS


def lesion_presence(label: np.ndarray | None, pixel_area_mm2: float | None) -> np.ndarray:
    """Presence of the lesion classes ``(nodule, mass)`` from a slice's lesion mask -> float64 ``(2,)``.

    The size of the largest connected lesion decides between nodule (<= 30 mm equivalent diameter)
    and mass; without a pixel size both get half the presence.
    """
    out = np.zeros(len(LESION_CLASSES), dtype=np.float64)
    if label is None or not label.any():
        return out
    if pixel_area_mm2 is None:
        out[:] = LESION_PRESENCE / 2
        return out
    components, n = ndimage.label(label)
    largest_px = np.bincount(components.ravel())[1:].max() if n else 0
    diameter_mm = 2.0 * math.sqrt(largest_px * pixel_area_mm2 / math.pi)
    out[0 if diameter_mm <= NODULE_MAX_DIAMETER_MM else 1] = LESION_PRESENCE
    return out
