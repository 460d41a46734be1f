"""The explainer's encoder: checked inputs, region boxes per level, and the words of every region, batch by batch.

:class:`Explainer` runs the frozen LangAE encoder and pyramid quantizer of a LangMamba (or a LangAE) on slices of
the denoised output and of the low-dose input in one encoder batch, and scores every region of the chosen levels
against the vocabulary (:func:`langmamba.explain.rules.word_probabilities`). It yields each batch's words as an
:class:`~langmamba.explain.types.ExplainedBatch`: plain arrays that the document formatter, the summary, the label
painter and the report read without torch. Region boxes follow the document's conventions (see
:mod:`langmamba.explain`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from langmamba.errors import InputError, NonFiniteVoxelsError
from langmamba.explain.rules import (
    DEFAULT_CHANGE_RULE,
    ChangeRule,
    resolve_word_classes,
    rule_flags,
    word_probabilities,
)
from langmamba.explain.types import SCALE, ExplainedBatch, IntArray, LevelWords
from langmamba.infer import prepare_model
from langmamba.io.volume import CTVolume
from langmamba.models.quantizer import cell_index
from langmamba.normalization import hu_to_model
from langmamba.runtime import resolve_device

logger = logging.getLogger(__name__)

HUArray = npt.NDArray[Any]


# --- model access ---------------------------------------------------------------------------------


def _langae(model: nn.Module) -> Any:
    """The LangAE of a LangMamba (``model.langae``) or ``model`` itself when it is a LangAE: anything with
    ``encode``, ``quantize`` and a ``quantizer`` (duck-typed, so typed ``Any``)."""
    langae = getattr(model, "langae", model)
    if not all(callable(getattr(langae, name, None)) for name in ("encode", "quantize")) or not hasattr(
        langae, "quantizer"
    ):
        raise InputError(
            f"{type(model).__name__} has no LangAE encoder and word quantizer; explanations need a LangMamba or LangAE"
        )
    return langae


def _vocabulary(langae: Any) -> list[str]:
    size = int(langae.quantizer.codebook_size)
    words = getattr(langae, "vocabulary", None)
    if words is None:
        logger.warning("the model carries no vocabulary; words are named token_<id>")
        return [f"token_{i}" for i in range(size)]
    if len(words) != size:
        raise InputError(f"the model's vocabulary has {len(words)} words but its codebook has {size} rows")
    return [str(w) for w in words]


# --- geometry -------------------------------------------------------------------------------------


def _axis_cells(size: int, latent: int, cells: int, factor: int) -> tuple[IntArray, IntArray]:
    """Voxel start/end (half-open) of each of ``cells`` cells along an axis of ``size`` voxels."""
    owner = cell_index(latent, cells).numpy()
    ids = np.arange(cells)
    starts = np.searchsorted(owner, ids, side="left") * factor
    ends = np.minimum(np.searchsorted(owner, ids, side="right") * factor, size)
    return starts, ends


def _affine(volume: CTVolume | None) -> npt.NDArray[np.float64]:
    """3×4 voxel (x, y, z) -> LPS mm matrix."""
    affine = np.eye(4) if volume is None else np.asarray(volume.affine_lps(), dtype=np.float64)
    return affine[:3]


# --- inputs ---------------------------------------------------------------------------------------


def _as_hu(array: Any, name: str) -> HUArray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if isinstance(array, CTVolume):
        array = array.hu
    array = np.asarray(array)
    if array.ndim != 3:
        raise InputError(f"{name} must be a (Z, Y, X) volume in HU, got shape {array.shape}")
    if 0 in array.shape:
        raise InputError(f"{name} is empty (shape {array.shape})")
    if not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{name} must hold numbers (HU), got dtype {array.dtype}")
    checked: HUArray = array
    return checked


def _pad(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Reflect-pad ``(B, 1, H, W)`` on the bottom/right to multiples of ``factor``, as LangMamba.forward does."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % factor, -width % factor
    if not (pad_h or pad_w):
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def _check_levels(levels: Sequence[int], available: int) -> list[int]:
    chosen = [int(level) for level in levels]
    if not chosen:
        raise InputError("levels must name at least one pyramid level")
    bad = [level for level in chosen if not 0 <= level < available]
    if bad:
        raise InputError(f"pyramid levels {bad} do not exist; the quantizer has levels 0..{available - 1}")
    if len(set(chosen)) != len(chosen):
        raise InputError(f"levels {chosen} repeat a level")
    return chosen


# --- scores ---------------------------------------------------------------------------------------


def _to_units(values: torch.Tensor) -> IntArray:
    """Scores in [0, 1] as int32 units of ``1 / SCALE`` (``np.round(values, DECIMALS) * SCALE``)."""
    units: IntArray = np.rint(values.double().cpu().numpy() * SCALE).astype(np.int32)
    return units


def _level_scores(
    region_out: torch.Tensor,
    region_in: torch.Tensor,
    quantizer: nn.Module,
    codebook: torch.Tensor,
    top_k: int,
    rule: ChangeRule,
    level: int,
) -> tuple[npt.NDArray[Any], ...]:
    """Top-k ids and scores (units) of output and input region latents ``(N, E)``, the change score ``(N,)``
    (units) and the :class:`ChangeRule` flags ``(N,)``."""
    p = word_probabilities(quantizer, region_out, codebook, level)
    q = word_probabilities(quantizer, region_in, codebook, level)
    p_top, p_ids = p.topk(top_k, dim=-1)
    q_top, q_ids = q.topk(top_k, dim=-1)
    union = torch.zeros_like(p, dtype=torch.bool)
    union.scatter_(1, p_ids, True)
    union.scatter_(1, q_ids, True)
    p_u = torch.where(union, p, 0.0)
    q_u = torch.where(union, q, 0.0)
    p_u = p_u / p_u.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    q_u = q_u / q_u.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    tvd = 0.5 * (p_u - q_u).abs().sum(dim=-1)
    flags = rule_flags(p, q, p_ids[:, :1], q_ids[:, :1], rule)
    return (
        p_ids.cpu().numpy(),
        _to_units(p_top),
        q_ids.cpu().numpy(),
        _to_units(q_top),
        _to_units(tvd.clamp(0.0, 1.0)),
        flags.cpu().numpy(),
    )


# --- the encoder ----------------------------------------------------------------------------------


class Explainer:
    """One explanation run: checked inputs, the region boxes of every level, and the words of every batch.

    Args:
        model: a LangMamba (its frozen ``langae`` is used) or a LangAE; its LangAE is moved to ``device`` in
            float32 and eval mode.
        input_hu: the low-dose volume ``(Z, Y, X)`` in HU (numpy, torch or a CTVolume).
        output_hu: the denoised volume, same shape, in HU.
        volume: geometry of both (its voxels are not read); ``None`` gives the identity geometry.
        levels: quantizer pyramid levels to explain, 0 = coarsest.
        top_k: words listed per region (clamped to the vocabulary size).
        batch_size: slices per encoder batch (each batch encodes ``2 * batch_size`` images).
        device: torch device or ``"auto"``.
        change_rule: when a region counts as changed (default :data:`DEFAULT_CHANGE_RULE`).
        word_classes: each word's tissue class (word -> class, or a list in vocabulary order); default: what
            the model holds, else none.

    Raises:
        InputError: shapes that differ or are not 3-D, a ``volume`` of another shape, unknown levels,
            ``top_k`` or ``batch_size`` below 1, or a model without a LangAE quantizer.
    """

    def __init__(
        self,
        model: nn.Module,
        input_hu: Any,
        output_hu: Any,
        volume: CTVolume | None = None,
        levels: Sequence[int] = (0, 1, 2),
        top_k: int = 3,
        batch_size: int = 4,
        device: str | torch.device = "cpu",
        change_rule: ChangeRule | None = None,
        word_classes: Mapping[str, str] | Sequence[str] | None = None,
    ) -> None:
        self.model = model
        self.volume = volume
        self.input_hu = _as_hu(input_hu, "input_hu")
        self.output_hu = _as_hu(output_hu, "output_hu")
        shape = self.input_hu.shape
        if shape != self.output_hu.shape:
            raise InputError(f"input_hu {shape} and output_hu {self.output_hu.shape} have different shapes")
        if volume is not None and tuple(volume.shape) != shape:
            raise InputError(f"the volume geometry is for shape {tuple(volume.shape)} but the voxels have {shape}")
        if top_k < 1 or batch_size < 1:
            raise InputError(f"top_k and batch_size must be at least 1, got {top_k} and {batch_size}")
        langae = _langae(model)
        self.vocabulary = _vocabulary(langae)
        rule = DEFAULT_CHANGE_RULE if change_rule is None else change_rule
        if not isinstance(rule, ChangeRule):
            raise InputError(f"change_rule must be a langmamba.explain.ChangeRule, got {type(rule).__name__}")
        self.rule: ChangeRule = rule
        self.word_classes = resolve_word_classes(model, langae, self.vocabulary, word_classes)
        self.quantizer: Any = langae.quantizer
        self.levels = _check_levels(levels, self.quantizer.num_levels)
        self.top_k = min(int(top_k), int(self.quantizer.codebook_size))
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        self.langae: Any = cast(Any, prepare_model(langae, self.device))
        self.codebook: torch.Tensor = self.quantizer.codebook.float()
        self.affine = _affine(volume)

        _, height, width = shape
        self.factor = int(self.langae.downsample_factor)
        self.latent = (math.ceil(height / self.factor), math.ceil(width / self.factor))
        grids = self.quantizer.level_grids(self.latent)
        self.grids: dict[int, tuple[int, int]] = {
            level: (int(grids[level][0]), int(grids[level][1])) for level in self.levels
        }
        self.boxes: dict[int, IntArray] = {}
        for level in self.levels:
            gh, gw = self.grids[level]
            y0, y1 = _axis_cells(height, self.latent[0], gh, self.factor)
            x0, x1 = _axis_cells(width, self.latent[1], gw, self.factor)
            yy0, xx0 = np.meshgrid(y0, x0, indexing="ij")
            yy1, xx1 = np.meshgrid(y1, x1, indexing="ij")
            self.boxes[level] = np.stack([xx0, yy0, xx1, yy1], axis=-1).reshape(-1, 4)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Z, Y, X)`` of the explained volume."""
        depth, height, width = self.input_hu.shape
        return int(depth), int(height), int(width)

    def batches(self, progress: bool = False) -> Iterator[ExplainedBatch]:
        """The :class:`ExplainedBatch` es in order. On a GPU the next batch is encoded in a background thread
        while the caller formats this one (on the CPU, torch's threads already use every core)."""
        starts = range(0, self.input_hu.shape[0], self.batch_size)
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="langmamba-explain") as pool,
            tqdm(total=self.input_hu.shape[0], desc="explain", unit="slice", disable=not progress) as bar,
        ):
            ahead = self.device.type == "cuda"
            pending: Future[ExplainedBatch] | None = pool.submit(self.encode_batch, starts[0]) if ahead else None
            for i, start in enumerate(starts):
                batch = pending.result() if pending is not None else self.encode_batch(start)
                if ahead and i + 1 < len(starts):
                    pending = pool.submit(self.encode_batch, starts[i + 1])
                yield batch
                bar.update(batch.count)

    @torch.no_grad()
    def encode_batch(self, start: int) -> ExplainedBatch:
        """Encode and score slices ``start .. start + batch_size - 1`` (output and input in one encoder batch)."""
        stop = min(start + self.batch_size, self.input_hu.shape[0])
        chunk = torch.cat(
            [
                torch.from_numpy(np.ascontiguousarray(hu[start:stop])).to(self.device).float()
                for hu in (self.output_hu, self.input_hu)
            ]
        )
        if not torch.isfinite(chunk).all():
            raise NonFiniteVoxelsError(f"slices {start}..{stop - 1} of the input or output contain NaN or infinite HU")
        x = _pad(hu_to_model(chunk)[:, None], self.factor)
        quantized = self.langae.quantize(self.langae.encode(x), details=False)  # words only
        count = stop - start
        levels = []
        for level in self.levels:
            regions = quantized.region_latents[level]
            flat = regions.reshape(regions.shape[0], -1, regions.shape[-1])
            cells, dim = flat.shape[1:]
            scores = _level_scores(
                flat[:count].reshape(-1, dim),
                flat[count:].reshape(-1, dim),
                self.quantizer,
                self.codebook,
                self.top_k,
                self.rule,
                level,
            )
            shapes = [(count, cells, self.top_k)] * 4 + [(count, cells)] * 2
            levels.append(LevelWords(level, *(s.reshape(shape) for s, shape in zip(scores, shapes))))
        return ExplainedBatch(start, count, levels, self.grids, self.boxes, self.vocabulary)
