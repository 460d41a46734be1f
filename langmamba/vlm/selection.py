"""Per-slice candidate words for the language-guided quantiser, cached on disk.

For every training slice and every pyramid level (coarse -> fine), the candidate words are those
whose normalised image<->word similarity reaches the level's threshold. Because similarities are
min-max normalised per slice, the best word always scores 1 and every level holds at least one
word; with decreasing thresholds the sets are nested (coarse within fine).

The result is cached as ``.npz`` keyed by a SHA-256 of the slice contents, the label masks, the
pixel size, the language space's :meth:`~langmamba.vlm.base.LanguageSpace.describe` and the
thresholds, so an unchanged training set reloads instantly and any change recomputes.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from langmamba.errors import ConfigError, InputError
from langmamba.io.volume import CTVolume
from langmamba.vlm.base import LanguageSpace, SpacingLike
from langmamba.vlm.cache import content_key, default_cache_dir, load_npz, save_npz_atomic

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = (0.95, 0.90, 0.80)
_FORMAT = 1

SlicesLike = np.ndarray | Sequence[np.ndarray] | CTVolume


def _as_slice_list(data: SlicesLike | None, what: str) -> list[np.ndarray] | None:
    """A volume, a stack ``(N, H, W)``, one slice ``(H, W)`` or a list of slices -> list of 2-D arrays."""
    if data is None:
        return None
    if isinstance(data, CTVolume):
        data = data.hu
    if isinstance(data, np.ndarray):
        if data.ndim == 2:
            return [data]
        if data.ndim == 3:
            return list(data)
        raise InputError(f"{what}: expected (H, W), (N, H, W) or a list of slices, got shape {data.shape}")
    items = [np.asarray(s) for s in data]
    for i, item in enumerate(items):
        if item.ndim != 2:
            raise InputError(f"{what}: entry {i} has shape {item.shape}, expected a 2-D slice (H, W)")
    return items


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"thresholds must be numbers in (0, 1], got {thresholds!r}") from exc
    if not values or not all(math.isfinite(t) and 0.0 < t <= 1.0 for t in values):
        raise ConfigError(f"thresholds must be one or more numbers in (0, 1], got {thresholds!r}")
    return values


def _digest(slices: list[np.ndarray], labels: list[np.ndarray] | None) -> str:
    """SHA-256 of slice values (as float32) and label masks (as bool), with shapes."""
    digest = hashlib.sha256()
    for i, item in enumerate(slices):
        data = np.ascontiguousarray(item, dtype=np.float32)
        digest.update(repr(data.shape).encode())
        digest.update(data.tobytes())
        if labels is not None:
            digest.update(np.ascontiguousarray(labels[i] != 0).tobytes())
    digest.update(b"labels" if labels is not None else b"nolabels")
    return digest.hexdigest()


def candidates_from_scores(scores: np.ndarray, thresholds: Sequence[float]) -> list[np.ndarray]:
    """Word ids with ``score >= t`` for each threshold: ``(V,)`` -> list of int64 arrays, best first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    ranked = np.asarray(scores)[order]
    return [order[ranked >= t].astype(np.int64) for t in thresholds]


def _compute(
    space: LanguageSpace,
    slices: list[np.ndarray],
    labels: list[np.ndarray] | None,
    thresholds: tuple[float, ...],
    spacing_mm: SpacingLike,
    batch_size: int,
    progress: bool,
) -> list[list[np.ndarray]]:
    same_shape = len({s.shape for s in slices}) == 1
    step = max(1, int(batch_size)) if same_shape else 1
    out: list[list[np.ndarray]] = []
    starts = range(0, len(slices), step)
    for start in tqdm(starts, desc="word selection", unit="batch", disable=not progress):
        chunk = np.stack(slices[start : start + step])
        chunk_labels = None if labels is None else np.stack(labels[start : start + step])
        scores = space.similarity_batch(chunk, labels=chunk_labels, spacing_mm=spacing_mm)
        out.extend(candidates_from_scores(row, thresholds) for row in scores)
    return out


def _save(path: Path, key: str, result: list[list[np.ndarray]], thresholds: tuple[float, ...], vocab: int) -> None:
    counts = np.array([[len(ids) for ids in levels] for levels in result], dtype=np.int64)
    flat = [ids for levels in result for ids in levels]
    ids = np.concatenate(flat).astype(np.int32) if flat else np.zeros(0, dtype=np.int32)
    save_npz_atomic(
        path,
        key=np.array(key),
        thresholds=np.array(thresholds),
        vocabulary_size=np.array(vocab),
        counts=counts.reshape(len(result), len(thresholds)),
        ids=ids,
    )


def _load(path: Path, key: str, n_slices: int) -> list[list[np.ndarray]] | None:
    data = load_npz(path)
    if data is None or "key" not in data or str(data["key"]) != key:
        return None
    counts, ids = data["counts"], data["ids"].astype(np.int64)
    if counts.shape[0] != n_slices or counts.sum() != ids.size:
        return None
    bounds = np.concatenate([[0], np.cumsum(counts.ravel())])
    pieces = [ids[bounds[i] : bounds[i + 1]] for i in range(counts.size)]
    levels = counts.shape[1]
    return [pieces[i * levels : (i + 1) * levels] for i in range(n_slices)]


def select_words(
    space: LanguageSpace,
    slices: SlicesLike,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    cache_path: str | Path | None = None,
    labels: SlicesLike | None = None,
    progress: bool = False,
    *,
    spacing_mm: SpacingLike = None,
    batch_size: int = 16,
    use_cache: bool = True,
) -> list[list[np.ndarray]]:
    """Candidate word ids per slice and pyramid level.

    Args:
        space: the language space whose vocabulary the ids index.
        slices: a :class:`CTVolume`, a stack ``(N, H, W)`` in HU, one slice, or a list of slices.
        thresholds: one normalised-similarity threshold per pyramid level, coarse -> fine.
        cache_path: ``.npz`` file to reuse / write; ``None`` -> ``<cache dir>/selection/<key>.npz``.
        labels: optional lesion masks matching ``slices`` (non-zero = lesion).
        progress: show a progress bar.
        spacing_mm: pixel size in mm (scalar or ``(x, y)``); taken from ``slices`` when it is a volume.
        batch_size: slices scored per call of ``space.similarity_batch``.
        use_cache: reuse and write the cache file.

    Returns:
        ``result[i][level]``: int64 word ids (rows of ``space.codebook()``) of slice ``i`` whose
        similarity is ``>= thresholds[level]``, best first; never empty.
    """
    if spacing_mm is None and isinstance(slices, CTVolume):
        spacing_mm = slices.spacing[:2]
    levels = _check_thresholds(thresholds)
    items = _as_slice_list(slices, "slices")
    masks = _as_slice_list(labels, "labels")
    if not items:
        raise InputError("slices: no slices given for word selection")
    if masks is not None and [m.shape for m in masks] != [s.shape for s in items]:
        raise InputError("labels: the label masks do not match the slices in number or shape")
    spacing_key = None if spacing_mm is None else np.atleast_1d(np.asarray(spacing_mm, dtype=float)).tolist()
    key = content_key(
        {
            "format": _FORMAT,
            "data": _digest(items, masks),
            "space": space.describe(),
            "thresholds": levels,
            "spacing_mm": spacing_key,
        }
    )
    path = Path(cache_path) if cache_path is not None else default_cache_dir() / "selection" / f"{key[:32]}.npz"
    if use_cache:
        cached = _load(path, key, len(items))
        if cached is not None:
            logger.info("word selection for %d slices reloaded from %s", len(items), path)
            return cached
    result = _compute(space, items, masks, levels, spacing_mm, batch_size, progress)
    if use_cache:
        _save(path, key, result, levels, len(space))
    mean_sizes = np.mean([[len(ids) for ids in r] for r in result], axis=0)
    logger.info("word selection for %d slices: mean candidates per level %s", len(items), np.round(mean_sizes, 1))
    return result
