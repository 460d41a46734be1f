"""The interface every language space implements, and the input checks they share.

A *language space* is what LangMamba's LangAE quantises onto: a frozen table of word embeddings
(the vector-quantiser codebook, shape ``(V, E)``) for a vocabulary of ``V`` words, together with an
image<->word similarity used to pick, for every training slice, the candidate words the quantiser
may use (see :mod:`langmamba.vlm.selection`).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from langmamba.errors import InputError, LangMambaError, NonFiniteVoxelsError, UnsupportedImageError

SpacingLike = float | Sequence[float] | None


class LanguageModelUnavailableError(LangMambaError):
    """A text or vision-language model could not be loaded (not cached, hub unreachable, bad folder)."""


def minmax_normalise(scores: np.ndarray) -> np.ndarray:
    """Scale scores to [0, 1] along the last axis (min -> 0, max -> 1).

    A row whose scores are all equal carries no preference between words, so it becomes all ones
    (every word is as good as the best one) rather than all zeros.
    """
    scores = np.asarray(scores, dtype=np.float64)
    low = scores.min(axis=-1, keepdims=True)
    span = scores.max(axis=-1, keepdims=True) - low
    flat = span <= 1e-12 * np.maximum(1.0, np.abs(low))
    out = (scores - low) / np.where(flat, 1.0, span)
    out = np.where(flat, 1.0, out)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def as_hu_batch(hu_slices: np.ndarray | Sequence[np.ndarray], what: str = "hu_slices") -> np.ndarray:
    """Check and stack CT slices: ``(H, W)`` or ``(N, H, W)`` in HU -> float32 ``(N, H, W)``."""
    try:
        arr = np.asarray(hu_slices, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise UnsupportedImageError(f"{what}: cannot read as a numeric array of CT slices ({exc})") from exc
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise UnsupportedImageError(
            f"{what}: expected a 2-D slice (H, W) or a stack (N, H, W) in HU, got shape {arr.shape}"
        )
    if arr.size == 0 or min(arr.shape[1:]) < 2:
        raise InputError(f"{what}: slices must be at least 2x2 pixels, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise NonFiniteVoxelsError(f"{what}: the slice contains NaN or infinite values")
    return arr


def as_label_batch(labels: np.ndarray | Sequence[np.ndarray] | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """Check label masks against slices of ``shape`` ``(N, H, W)``; non-zero = lesion. -> bool or None."""
    if labels is None:
        return None
    arr = np.asarray(labels)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape != tuple(shape):
        raise InputError(f"label mask shape {arr.shape} does not match the slice shape {tuple(shape)}")
    return arr != 0


def pixel_area_mm2(spacing_mm: SpacingLike) -> float | None:
    """Area of one pixel in mm² from a scalar pixel size or ``(x, y[, z])`` spacing (CTVolume order)."""
    if spacing_mm is None:
        return None
    values = [float(spacing_mm)] * 2 if np.isscalar(spacing_mm) else [float(s) for s in spacing_mm][:2]
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"spacing_mm must be a positive pixel size or (x, y) in mm, got {spacing_mm!r}")
    return values[0] * values[1]


def check_grid(grid: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int]:
    """Validate a region grid ``(g_h, g_w)`` for a slice of ``shape`` ``(H, W)``."""
    try:
        g_h, g_w = (int(g) for g in grid)
    except (TypeError, ValueError) as exc:
        raise InputError(f"grid must be two integers (g_h, g_w), got {grid!r}") from exc
    if not (1 <= g_h <= shape[0] and 1 <= g_w <= shape[1]):
        raise InputError(f"grid {grid!r} must be between (1, 1) and the slice size {tuple(shape)}")
    return g_h, g_w


def grid_edges(size: int, cells: int) -> np.ndarray:
    """Integer boundaries of ``cells`` nearly equal cells along an axis of ``size`` pixels."""
    return np.linspace(0, size, cells + 1).round().astype(int)


class LanguageSpace(abc.ABC):
    """A frozen word-embedding table plus image<->word similarity.

    Subclasses set :attr:`backend`, fill ``self._vocabulary`` and implement :meth:`codebook`,
    :meth:`describe`, :meth:`similarity_batch` and :meth:`region_similarity`.
    """

    backend: str = ""

    def __init__(self, vocabulary: list[str]) -> None:
        self._vocabulary = list(vocabulary)

    @property
    def vocabulary(self) -> list[str]:
        """The ``V`` words, in codebook row order."""
        return list(self._vocabulary)

    def __len__(self) -> int:
        return len(self._vocabulary)

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short human-readable identifier, e.g. ``"offline:all-MiniLM-L6-v2"``."""

    @property
    def embedding_dim(self) -> int:
        """``E``, the width of a codebook row."""
        return int(self.codebook().shape[1])

    def token_table(self) -> torch.Tensor:
        """The language model's whole frozen token-embedding table ``(N, E')`` (the residual quantizer's
        detail codes, :mod:`langmamba.vlm.token_codes`)."""
        raise LanguageModelUnavailableError(
            f"the {self.backend or type(self).__name__} language space has no token table"
        )

    @abc.abstractmethod
    def codebook(self) -> torch.Tensor:
        """The frozen embedding table: float32 CPU tensor ``(V, E)`` (a fresh copy on every call)."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-serialisable identity: ``backend``, ``model``, dims, vocabulary hash (stored in checkpoints)."""

    @abc.abstractmethod
    def similarity_batch(
        self,
        hu_slices: np.ndarray | Sequence[np.ndarray],
        *,
        labels: np.ndarray | Sequence[np.ndarray] | None = None,
        spacing_mm: SpacingLike = None,
    ) -> np.ndarray:
        """Image<->word similarity for slices ``(N, H, W)`` in HU -> float32 ``(N, V)``, each row min-max in [0, 1].

        ``labels`` (same shape, non-zero = lesion) and ``spacing_mm`` (pixel size, mm) are used by
        backends that can (the offline scorer); others ignore them.
        """

    @abc.abstractmethod
    def region_similarity(
        self,
        hu_slice: np.ndarray,
        grid: tuple[int, int] = (4, 4),
        *,
        label: np.ndarray | None = None,
        spacing_mm: SpacingLike = None,
    ) -> np.ndarray:
        """Similarity of each cell of a ``grid`` over one slice -> float32 ``(g_h, g_w, V)``, min-max per cell."""

    def similarity(
        self, hu_slice: np.ndarray, *, label: np.ndarray | None = None, spacing_mm: SpacingLike = None
    ) -> np.ndarray:
        """Image<->word similarity of one slice ``(H, W)`` in HU -> float32 ``(V,)`` in [0, 1] (min 0, max 1)."""
        hu = np.asarray(hu_slice)
        if hu.ndim != 2:
            raise UnsupportedImageError(f"similarity() takes one 2-D slice (H, W), got shape {hu.shape}")
        labels = None if label is None else np.asarray(label)[None]
        return self.similarity_batch(hu[None], labels=labels, spacing_mm=spacing_mm)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, V={len(self)})"
