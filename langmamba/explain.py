"""Word explanations of a denoised CT volume: the vocabulary words LangAE's quantizer reads in every region.

:func:`explain_volume` runs the frozen LangAE encoder and pyramid quantizer of a LangMamba on every slice
of the denoised output and of the low-dose input, and lists for each pyramid level and region the top-k
words of both, with a flag where they disagree. The result is a JSON-serialisable dict described by the
JSON Schema ``langmamba/resources/explanation.schema.json`` (:func:`validate_explanation` checks it).
:func:`write_explanation` streams the same document to a file.
:func:`explanation_label_map` paints one level's top-1 words into a label volume with a colour table for
viewers; :func:`write_color_table` writes that table in 3D Slicer's text format.

Conventions of the document:

- Regions. Level ``l`` splits the ``h × w`` latent of a slice (``h = ceil(H / 16)``) into the quantizer's
  ``g_h × g_w`` grid, latent row ``i`` falling in cell ``floor(i * g_h / h)``; a cell's voxel box is the
  16-voxel blocks of its latent rows and columns, clipped to the slice (the slice is reflect-padded on the
  bottom/right to a multiple of 16 before encoding). ``bbox_voxel`` is ``x0 <= column < x1``,
  ``y0 <= row < y1`` on slice ``z``; the boxes of a level tile the slice exactly.
- Patient coordinates. ``bbox_mm`` holds two opposite corners of the box's footprint on the slice plane:
  the outer voxel edges at continuous indices ``(x0 - 0.5, y0 - 0.5, z)`` and ``(x1 - 0.5, y1 - 0.5, z)``,
  mapped to LPS and RAS mm with the volume's geometry (identity geometry when none is given).
- Scores. A word's score is its probability under the model's language space: the softmax over the whole
  vocabulary of negative squared codebook distances (:func:`word_probabilities`; times the quantizer's
  ``logit_scale`` when it has one), so the top-k scores need not sum to 1. ``scores`` in the header says which
  calibration was used and ``confidence`` gives the uniform probability ``1 / V`` beside the bands
  :func:`confidence_band` sorts a top-word probability into (a score near ``1 / V`` says nothing).
- Language space. ``model.language_space`` names the space that produced the words (the offline MiniLM codebook
  with tissue supervision, or a CLIP model by name), from the model's stored description
  (:func:`language_space_record`); ``word_classes`` maps words to their tissue class when the vocabulary has one.
- Change. ``changed`` is true where the top-1 word changed *confidently*: :class:`ChangeRule` (recorded under
  ``change_rule``, applied by :func:`change_flags`) asks both images to be confident in their own top word and
  to prefer it to the other's by a margin, so a 1e-4 reshuffle of near-uniform scores flags nothing.
  ``change_score`` is the total variation distance ``0.5 * sum_v |p_v - q_v|`` between the output's and
  the input's score distributions restricted to the union ``U`` of both top-k sets and renormalised
  over ``U``: 0 when both weigh their candidate words alike, 1 when they share no mass. The restriction
  keeps the long tail of the vocabulary, hundreds of words with similar small scores, from diluting it.

Schema 2.0 added ``model.language_space``, ``scores``, ``confidence``, ``change_rule``, ``word_classes``, the
confidence tallies of the summary and the confident-change meaning of ``changed`` (1.0 flagged any change of
the top word).

Numbers are rounded to 4 decimals. The model runs on batches of slices. The document grows with the
number of regions (a 512² slice has 4 + 64 + 1024 regions at the default levels, about 0.5 MB of JSON),
so for long volumes :func:`write_explanation` streams it to a file slice by slice instead of holding it.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import logging
import math
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from langmamba import workers
from langmamba.errors import ConfigError, InputError, NonFiniteVoxelsError
from langmamba.explanation_rules import (
    BANDS,
    CONFIDENT_PROBABILITY,
    DEFAULT_CHANGE_RULE,
    NEAR_UNIFORM_FACTOR,
    WORD_CLASS_KEYS,
    ChangeRule,
    change_flags,
    confidence_band,
    confidence_thresholds,
    format_percent,
    language_space_record,
    resolve_word_classes,
    rule_flags,
    score_record,
    word_probabilities,
)
from langmamba.explanation_text import (
    DECIMALS,
    SCALE,
    ExplainedBatch,
    LevelWords,
    TextFormat,
    corner_mm,
    level_layout,
    rounded,
    slice_texts,
)
from langmamba.infer import prepare_model, resolve_device
from langmamba.io.volume import CTVolume
from langmamba.models.quantizer import cell_index
from langmamba.normalization import hu_to_model

logger = logging.getLogger(__name__)

SCHEMA_NAME = "langmamba-explanations"
SCHEMA_VERSION = "2.0"
SCHEMA_PATH = Path(__file__).resolve().parent / "resources" / "explanation.schema.json"
CHANGE_SCORE_METHOD = "tvd_topk_union"
"""Name recorded in the document for the change score defined in the module docstring."""
ColorTable = list[tuple[int, str, tuple[int, int, int]]]

__all__ = [  # the reading rules of langmamba.explanation_rules are part of this module's interface
    "BANDS", "CHANGE_SCORE_METHOD", "CONFIDENT_PROBABILITY", "DEFAULT_CHANGE_RULE", "NEAR_UNIFORM_FACTOR",
    "SCHEMA_NAME", "SCHEMA_PATH", "SCHEMA_VERSION", "WORD_CLASS_KEYS", "ChangeRule", "ColorTable",
    "ExplainedBatch", "LevelWords", "change_flags", "color_table", "confidence_band", "confidence_thresholds",
    "explain_volume", "explanation_label_map", "format_percent", "language_space_record", "load_schema",
    "paint_label_slice", "resolve_word_classes", "rule_flags", "score_record", "validate_explanation",
    "word_color", "word_probabilities", "write_color_table", "write_explanation",
]


# --- model access ---------------------------------------------------------------------------------


def _langae(model: nn.Module) -> nn.Module:
    """The LangAE of a LangMamba (``model.langae``) or ``model`` itself when it is a LangAE."""
    langae = getattr(model, "langae", model)
    if not all(callable(getattr(langae, name, None)) for name in ("encode", "quantize")) or not hasattr(
        langae, "quantizer"
    ):
        raise InputError(
            f"{type(model).__name__} has no LangAE encoder and word quantizer; explanations need a LangMamba or LangAE"
        )
    return langae


def _vocabulary(langae: nn.Module) -> list[str]:
    size = langae.quantizer.codebook_size
    words = getattr(langae, "vocabulary", None)
    if words is None:
        logger.warning("the model carries no vocabulary; words are named token_<id>")
        return [f"token_{i}" for i in range(size)]
    if len(words) != size:
        raise InputError(f"the model's vocabulary has {len(words)} words but its codebook has {size} rows")
    return [str(w) for w in words]


def _scalars(mapping: Any) -> dict:
    """The entries of ``mapping`` whose values are JSON scalars (training step, run name ...)."""
    if not isinstance(mapping, dict):
        return {}
    return {str(k): v for k, v in mapping.items() if isinstance(v, (str, int, float, bool)) or v is None}


def _model_info(model: nn.Module, langae: nn.Module) -> dict:
    from langmamba import __version__

    info = {
        "class": type(model).__name__,
        "vlm_backend": getattr(langae, "vlm_backend", None),
        "vlm_id": getattr(langae, "vlm_id", None),
        "langmamba_version": __version__,
        "from_checkpoint": False,
        "checkpoint_extra": {},
    }
    config = getattr(model, "checkpoint_config", None)
    if isinstance(config, dict):
        info["from_checkpoint"] = True
        info["class"] = str(config.get("model_class", info["class"]))
        info["langmamba_version"] = str(config.get("langmamba_version", __version__))
        for key in ("vlm_backend", "vlm_id"):
            if config.get(key) is not None:
                info[key] = str(config[key])
        info["checkpoint_extra"] = _scalars(config.get("extra"))
    for key in ("vlm_backend", "vlm_id"):
        info[key] = None if info[key] is None else str(info[key])
    info["language_space"] = language_space_record(model)
    return info


# --- geometry -------------------------------------------------------------------------------------


def _axis_cells(size: int, latent: int, cells: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Voxel start/end (half-open) of each of ``cells`` cells along an axis of ``size`` voxels."""
    owner = cell_index(latent, cells).numpy()
    ids = np.arange(cells)
    starts = np.searchsorted(owner, ids, side="left") * factor
    ends = np.minimum(np.searchsorted(owner, ids, side="right") * factor, size)
    return starts, ends


def _affine(volume: CTVolume | None) -> np.ndarray:
    """3×4 voxel (x, y, z) -> LPS mm matrix."""
    return np.eye(4)[:3] if volume is None else volume.affine_lps()[:3]


def _geometry(volume: CTVolume | None, shape: tuple[int, int, int]) -> dict:
    if volume is None:
        spacing, origin, direction = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)
    else:
        spacing, origin, direction = volume.spacing, volume.origin, volume.direction
    return {
        "shape": [int(s) for s in shape],
        "geometry": "identity" if volume is None else "volume",
        "spacing": _round(spacing),
        "origin": _round(origin),
        "direction": _round(direction),
    }


def _round(values: Any) -> Any:
    """Nested lists of floats rounded to :data:`DECIMALS` (``-0.0`` written as ``0.0``)."""
    return rounded(np.asarray(values, dtype=np.float64)).tolist()


# --- inputs ---------------------------------------------------------------------------------------


def _as_hu(array: Any, name: str) -> np.ndarray:
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
    return array


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

def _to_units(values: torch.Tensor) -> np.ndarray:
    """Scores in [0, 1] as int32 units of ``1 / SCALE`` (``np.round(values, DECIMALS) * SCALE``)."""
    return np.rint(values.double().cpu().numpy() * SCALE).astype(np.int32)


def _level_scores(region_out: torch.Tensor, region_in: torch.Tensor, quantizer: nn.Module, codebook: torch.Tensor,
                  top_k: int, rule: ChangeRule, level: int) -> tuple[np.ndarray, ...]:
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
    return (p_ids.cpu().numpy(), _to_units(p_top), q_ids.cpu().numpy(), _to_units(q_top),
            _to_units(tvd.clamp(0.0, 1.0)), flags.cpu().numpy())


# --- explanation ----------------------------------------------------------------------------------

class _Explainer:
    """One explanation run: checked inputs, region boxes per level, and the running summary tallies."""

    def __init__(
        self,
        model: nn.Module,
        input_hu: Any,
        output_hu: Any,
        volume: CTVolume | None,
        levels: Sequence[int],
        top_k: int,
        batch_size: int,
        device: str | torch.device,
        change_rule: ChangeRule | None = None,
        word_classes: Mapping[str, str] | Sequence[str] | None = None,
    ) -> None:
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
        self.rule = DEFAULT_CHANGE_RULE if change_rule is None else change_rule
        if not isinstance(self.rule, ChangeRule):
            raise InputError(f"change_rule must be a langmamba.explain.ChangeRule, got {type(self.rule).__name__}")
        classes = resolve_word_classes(model, langae, self.vocabulary, word_classes)
        quantizer = langae.quantizer
        self.levels = _check_levels(levels, quantizer.num_levels)
        self.top_k = min(int(top_k), quantizer.codebook_size)
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        self.langae = prepare_model(langae, self.device)
        self.codebook = quantizer.codebook.float()
        self.affine = _affine(volume)

        _, height, width = shape
        self.factor = self.langae.downsample_factor
        self.latent = (math.ceil(height / self.factor), math.ceil(width / self.factor))
        self.grids = {level: tuple(int(g) for g in quantizer.level_grids(self.latent)[level]) for level in self.levels}
        self.boxes = {}
        self.layouts = {}
        for level in self.levels:
            gh, gw = self.grids[level]
            y0, y1 = _axis_cells(height, self.latent[0], gh, self.factor)
            x0, x1 = _axis_cells(width, self.latent[1], gw, self.factor)
            yy0, xx0 = np.meshgrid(y0, x0, indexing="ij")
            yy1, xx1 = np.meshgrid(y1, x1, indexing="ij")
            self.boxes[level] = np.stack([xx0, yy0, xx1, yy1], axis=-1).reshape(-1, 4)
            self.layouts[level] = level_layout(self.boxes[level], gw)
        self.words = np.array(self.vocabulary, dtype=object)
        self.text_format = TextFormat.build(self.layouts, self.affine, self.vocabulary, self.top_k)

        self.header = {
            "schema": SCHEMA_NAME,
            "version": SCHEMA_VERSION,
            "model": _model_info(model, langae),
            "vocabulary_size": len(self.vocabulary),
            "top_k": self.top_k,
            "scores": score_record(quantizer),
            "confidence": confidence_thresholds(len(self.vocabulary)),
            "change_rule": self.rule.record(),
            "change_score_method": CHANGE_SCORE_METHOD,
            "word_classes": classes,
            "volume": _geometry(volume, shape),
            "levels": [
                {"level": level, "grid": list(self.grids[level]), "latent": [int(s) for s in self.latent]}
                for level in self.levels
            ],
        }
        size = len(self.vocabulary)
        self.top1_counts = {level: {"output": np.zeros(size, np.int64), "input": np.zeros(size, np.int64)}
                            for level in self.levels}
        self.counts = {level: {"regions": 0, "changed": 0, "differs": 0, "score_units": 0, "output_top_units": 0,
                               "input_top_units": 0, "bands": np.zeros(len(BANDS), np.int64)} for level in self.levels}
        thresholds = self.header["confidence"]
        # the band of every top-word score in units, so a region's band is the one its rounded score gives
        self.band_of_units = np.array([BANDS.index(confidence_band(k / SCALE, thresholds)) for k in range(SCALE + 1)])
        self.flagged: list[dict] = []

    # --- computing ---

    def batches(self, progress: bool = False) -> Iterator[ExplainedBatch]:
        """The :class:`ExplainedBatch` es in order; updates the summary tallies. On a GPU the next batch is
        encoded in a background thread while the caller formats this one (on the CPU, torch's threads already
        use every core)."""
        starts = range(0, self.input_hu.shape[0], self.batch_size)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="langmamba-explain") as pool, \
                tqdm(total=self.input_hu.shape[0], desc="explain", unit="slice", disable=not progress) as bar:
            ahead = self.device.type == "cuda"
            pending = pool.submit(self._batch, starts[0]) if ahead else None
            for i, start in enumerate(starts):
                batch = pending.result() if ahead else self._batch(start)
                if ahead and i + 1 < len(starts):
                    pending = pool.submit(self._batch, starts[i + 1])
                self._tally(batch)
                yield batch
                bar.update(batch.count)

    @torch.no_grad()
    def _batch(self, start: int) -> ExplainedBatch:
        """Encode and score slices ``start .. start + batch_size - 1`` (output and input in one encoder batch)."""
        stop = min(start + self.batch_size, self.input_hu.shape[0])
        chunk = torch.cat([torch.from_numpy(np.ascontiguousarray(hu[start:stop])).to(self.device).float()
                           for hu in (self.output_hu, self.input_hu)])
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
            scores = _level_scores(flat[:count].reshape(-1, dim), flat[count:].reshape(-1, dim), self.langae.quantizer,
                                   self.codebook, self.top_k, self.rule, level)
            shapes = [(count, cells, self.top_k)] * 4 + [(count, cells)] * 2
            levels.append(LevelWords(level, *(s.reshape(shape) for s, shape in zip(scores, shapes))))
        return ExplainedBatch(start, count, levels, self.grids, self.boxes, self.vocabulary)

    def _tally(self, batch: ExplainedBatch) -> None:
        """Add a batch to the summary: region counts, changed regions, top-1 word counts, flagged regions."""
        for words in batch.levels:
            counts = self.counts[words.level]
            counts["regions"] += words.change.size
            counts["changed"] += int(words.changed.sum())
            counts["differs"] += int(words.top_differs.sum())
            counts["score_units"] += int(words.change.sum(dtype=np.int64))
            counts["output_top_units"] += int(words.output_scores[..., 0].sum(dtype=np.int64))
            counts["input_top_units"] += int(words.input_scores[..., 0].sum(dtype=np.int64))
            counts["bands"] += np.bincount(self.band_of_units[words.output_scores[..., 0].ravel()], minlength=len(BANDS))
            for which, ids in (("output", words.output_ids), ("input", words.input_ids)):
                self.top1_counts[words.level][which] += np.bincount(ids[..., 0].ravel(), minlength=len(self.words))
        columns = self.grids
        for b in range(batch.count):
            for words in batch.levels:
                for n in np.flatnonzero(words.changed[b]).tolist():
                    row, col = divmod(n, columns[words.level][1])
                    self.flagged.append({
                        "z": batch.start + b, "level": words.level, "row": row, "col": col,
                        "output_word": self.vocabulary[words.output_ids[b, n, 0]],
                        "input_word": self.vocabulary[words.input_ids[b, n, 0]],
                        "output_score": int(words.output_scores[b, n, 0]) / SCALE,
                        "input_score": int(words.input_scores[b, n, 0]) / SCALE,
                        "change_score": int(words.change[b, n]) / SCALE,
                    })

    # --- the entries as Python objects (the streamed text is langmamba.explanation_text's) ---

    def entries(self, batch: ExplainedBatch) -> Iterator[dict]:
        """The slice entries ``{"z", "levels": [{"level", "regions"}]}`` of a batch as Python objects."""
        for b in range(batch.count):
            z = batch.start + b
            yield {"z": z, "levels": [self._regions(z, words, b) for words in batch.levels]}

    def _regions(self, z: int, words: LevelWords, b: int) -> dict:
        layout = self.layouts[words.level]
        lps, ras = (points.tolist() for points in corner_mm(layout, self.affine, z))
        first, second = (corner.tolist() for corner in layout.corners)
        columns = self.grids[words.level][1]
        changed = words.changed[b].tolist()
        change = (words.change[b] / SCALE).tolist()
        sides = {}
        for which, ids, scores in (("output", words.output_ids, words.output_scores),
                                   ("input", words.input_ids, words.input_scores)):
            sides[which] = (ids[b].tolist(), self.words[ids[b]].tolist(), (scores[b] / SCALE).tolist())
        regions = []
        for n, (x0, y0, x1, y1) in enumerate(self.boxes[words.level].tolist()):
            a, c = first[n], second[n]
            regions.append({
                "row": n // columns,
                "col": n % columns,
                "bbox_voxel": {"x0": x0, "y0": y0, "x1": x1, "y1": y1, "z": z},
                "bbox_mm": {"lps": [lps[a], lps[c]], "ras": [ras[a], ras[c]]},
                **{which: {"ids": ids[n], "words": names[n], "scores": scores[n]}
                   for which, (ids, names, scores) in sides.items()},
                "changed": changed[n],
                "change_score": change[n],
            })
        return {"level": words.level, "regions": regions}

    def summary(self) -> dict:
        """Per-volume summary of the slices produced so far."""
        per_level = []
        for level in self.levels:
            c = self.counts[level]
            mean = (lambda units: round(units / SCALE / c["regions"], DECIMALS) if c["regions"] else 0.0)  # noqa: E731
            per_level.append({
                "level": level,
                "regions": c["regions"],
                "changed": c["changed"],
                "changed_fraction": round(c["changed"] / c["regions"], DECIMALS) if c["regions"] else 0.0,
                "top_word_differs": c["differs"],
                "mean_change_score": mean(c["score_units"]),
                "mean_top_score": {"output": mean(c["output_top_units"]), "input": mean(c["input_top_units"])},
                "output_confidence": {band: int(n) for band, n in zip(BANDS, c["bands"])},
                "word_frequencies": {
                    which: self._frequencies(self.top1_counts[level][which]) for which in ("output", "input")
                },
            })
        return {
            "regions": sum(self.counts[level]["regions"] for level in self.levels),
            "flagged_count": len(self.flagged),
            "flagged": list(self.flagged),
            "levels": per_level,
        }

    def _frequencies(self, counts: np.ndarray) -> dict[str, int]:
        """Top-1 counts by word, most frequent first, ties by word."""
        by_word: Counter = Counter()
        for i in np.flatnonzero(counts).tolist():
            by_word[self.vocabulary[i]] += int(counts[i])
        return {word: n for word, n in sorted(by_word.items(), key=lambda item: (-item[1], item[0]))}


def explain_volume(
    model: nn.Module,
    input_hu: np.ndarray | torch.Tensor,
    output_hu: np.ndarray | torch.Tensor,
    volume: CTVolume | None = None,
    *,
    levels: Sequence[int] = (0, 1, 2),
    top_k: int = 3,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = False,
    change_rule: ChangeRule | None = None,
    word_classes: Mapping[str, str] | Sequence[str] | None = None,
) -> dict:
    """Per-slice, per-level, per-region word explanations of ``output_hu`` against ``input_hu``.

    The whole document is held in memory (about 3 MB of Python objects per 512² slice at the default
    levels); :func:`write_explanation` streams it to a file instead.

    Args:
        model: a LangMamba (its frozen ``langae`` is used) or a LangAE. Its LangAE is moved to ``device``
            in float32 and eval mode.
        input_hu: the low-dose volume ``(Z, Y, X)`` in HU.
        output_hu: the denoised volume, same shape, in HU.
        volume: geometry of both (spacing, origin, direction; its voxels are not read); ``None`` gives
            the identity geometry (1 mm voxels, origin 0, axes along LPS).
        levels: quantizer pyramid levels to explain, 0 = coarsest (2×2 grid by default).
        top_k: words listed per region (at most the vocabulary size).
        batch_size: slices per encoder batch (each batch encodes ``2 * batch_size`` images).
        device: torch device or ``"auto"``.
        progress: show a tqdm bar over the batches.
        change_rule: when a region counts as changed (default :data:`DEFAULT_CHANGE_RULE`).
        word_classes: each word's tissue class (word -> class, or a list in vocabulary order); default: what
            the model holds (see :data:`WORD_CLASS_KEYS`), else none.

    Returns:
        A JSON-serialisable dict following ``explanation.schema.json`` (see the module docstring for the
        region, coordinate, score and change conventions): ``schema``, ``version``, ``model``,
        ``vocabulary_size``, ``top_k``, ``scores``, ``confidence``, ``change_rule``, ``change_score_method``,
        ``word_classes``, ``volume``, ``levels``, ``slices`` and ``summary``.

    Raises:
        InputError: shapes that differ or are not 3-D, a ``volume`` of another shape, unknown levels,
            ``top_k`` or ``batch_size`` below 1, or a model without a LangAE quantizer.
        NonFiniteVoxelsError: NaN or infinite HU values.
    """
    explainer = _Explainer(model, input_hu, output_hu, volume, levels, top_k, batch_size, device, change_rule,
                           word_classes)
    slices = [entry for batch in explainer.batches(progress) for entry in explainer.entries(batch)]
    return {**explainer.header, "slices": slices, "summary": explainer.summary()}


def write_explanation(
    destination: str | Path | TextIO,
    model: nn.Module,
    input_hu: np.ndarray | torch.Tensor,
    output_hu: np.ndarray | torch.Tensor,
    volume: CTVolume | None = None,
    *,
    levels: Sequence[int] = (0, 1, 2),
    top_k: int = 3,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = False,
    on_batch: Callable[[ExplainedBatch], None] | None = None,
    change_rule: ChangeRule | None = None,
    word_classes: Mapping[str, str] | Sequence[str] | None = None,
) -> dict:
    """Stream the document of :func:`explain_volume` as JSON to ``destination`` (a path or a text stream).

    Memory stays bounded by one encoder batch and the summary, whatever the number of slices: each
    slice's regions are written as soon as they are computed, formatted straight from the batch's arrays.
    Reading the file back with :func:`json.load` gives exactly the dict :func:`explain_volume` returns. A
    path is written in place (no temporary file); callers that need all-or-nothing output pass a stream
    opened in a staging folder (see :mod:`langmamba.io.atomic`). ``on_batch``, when given, is called with
    every :class:`ExplainedBatch` right after its slices are written (e.g. to collect a label map and a
    report with :class:`langmamba.report.ReportCollector`). The other arguments and the errors are those
    of :func:`explain_volume`.

    Returns:
        The document without ``"slices"`` (header and summary), e.g. for a report.
    """
    explainer = _Explainer(model, input_hu, output_hu, volume, levels, top_k, batch_size, device, change_rule,
                           word_classes)
    if isinstance(destination, (str, Path)):
        with open(destination, "w", encoding="utf-8") as stream:
            return _stream(explainer, stream, progress, on_batch)
    return _stream(explainer, destination, progress, on_batch)


def _stream(explainer: _Explainer, stream: TextIO, progress: bool,
            on_batch: Callable[[ExplainedBatch], None] | None = None) -> dict:
    """Write the document with ``"slices"`` filled one batch at a time; returns it without the slices."""
    stream.write(json.dumps(explainer.header)[:-1] + ', "slices": [')
    # Text of a few batches is formatted by worker processes while the next ones are encoded.
    pending: deque = deque()
    limit = 2 * workers.worker_count()
    separator = "\n"
    for batch in chain(explainer.batches(progress), [None]):
        if batch is not None:
            pending.append(workers.submit(slice_texts, explainer.text_format, batch.start, batch.levels))
            if on_batch is not None:
                on_batch(batch)
        while pending and (batch is None or len(pending) > limit):
            for text in pending.popleft().result():
                stream.write(separator + text)
                separator = ",\n"
    summary = explainer.summary()
    stream.write('\n], "summary": ' + json.dumps(summary) + "}\n")
    return {**explainer.header, "summary": summary}


# --- label maps and colour tables ---------------------------------------------------------------


def word_color(word: str) -> tuple[int, int, int]:
    """A deterministic RGB colour (0-255) for ``word``: hue, saturation and value from its MD5 digest.

    Saturation and value stay in [0.55, 0.95] so every word is clearly visible on a grey CT.
    """
    digest = hashlib.md5(word.encode("utf-8")).digest()
    hue = int.from_bytes(digest[:4], "big") / 2**32
    saturation = 0.55 + 0.4 * digest[4] / 255
    value = 0.75 + 0.2 * digest[5] / 255
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value))


def explanation_label_map(
    explanation: dict, level: int, shape: Sequence[int], which: str = "output"
) -> tuple[np.ndarray, ColorTable]:
    """Paint one level's regions with their top-1 word: a label volume and its colour table.

    Args:
        explanation: a document from :func:`explain_volume` (or read back from JSON).
        level: a pyramid level present in the document.
        shape: ``(Z, Y, X)`` of the label volume (the explained volume's shape).
        which: ``"output"`` (denoised) or ``"input"`` words.

    Returns:
        ``labels``: int32 ``(Z, Y, X)``, ``vocabulary id + 1`` of the region's top-1 word, 0 where no
        region was explained; ``table``: ``(label_value, word, (r, g, b))`` for every label value used,
        sorted by value, colours from :func:`word_color`.
    """
    if which not in ("output", "input"):
        raise InputError(f"which must be 'output' or 'input', got {which!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"shape must be a positive (Z, Y, X), got {shape}")
    recorded = tuple(explanation.get("volume", {}).get("shape", shape))
    if recorded != shape:
        raise InputError(f"the explanation is of a volume of shape {recorded}, not {shape}")
    available = [entry["level"] for entry in explanation.get("levels", [])]
    if level not in available:
        raise InputError(f"pyramid level {level} is not in the explanation (levels {available})")

    labels = np.zeros(shape, dtype=np.int32)
    words: dict[int, str] = {}
    for entry in explanation.get("slices", []):
        paint_label_slice(labels, entry, level, words, which)
    return labels, color_table(words)


def paint_label_slice(
    labels: np.ndarray, entry: dict, level: int, words: dict[int, str], which: str = "output"
) -> None:
    """Paint one slice entry's regions at ``level`` into ``labels`` (Z, Y, X) in place, as
    :func:`explanation_label_map` does, and record ``label value -> word`` in ``words``."""
    for level_entry in entry["levels"]:
        if level_entry["level"] != level:
            continue
        for region in level_entry["regions"]:
            box = region["bbox_voxel"]
            value = int(region[which]["ids"][0]) + 1
            labels[box["z"], box["y0"]:box["y1"], box["x0"]:box["x1"]] = value
            words[value] = region[which]["words"][0]


def color_table(words: dict[int, str]) -> ColorTable:
    """``(label_value, word, (r, g, b))`` sorted by value, colours from :func:`word_color`."""
    return [(value, words[value], word_color(words[value])) for value in sorted(words)]


def write_color_table(table: ColorTable, path: str | Path) -> Path:
    """Write ``table`` as a 3D Slicer colour table (``.ctbl`` / ``.txt``): ``# ...`` header lines, then
    ``value name r g b a`` per line. Label 0 is written as a transparent ``none`` unless the table has it;
    spaces in names become ``_``."""
    rows = sorted((int(value), str(name), tuple(int(c) for c in rgb)) for value, name, rgb in table)
    values = [value for value, _, _ in rows]
    if len(set(values)) != len(values) or (values and values[0] < 0):
        raise InputError("colour table values must be distinct and non-negative")
    lines = [f"{value} {'_'.join(name.split()) or 'unnamed'} {r} {g} {b} 255" for value, name, (r, g, b) in rows]
    if 0 not in values:
        lines.insert(0, "0 none 0 0 0 0")
    path = Path(path)
    header = [f"# Color table file {path.name}", f"# {len(lines)} values", "# langmamba word explanation labels"]
    path.write_text("\n".join(header + lines) + "\n", encoding="utf-8")
    return path


# --- schema validation ----------------------------------------------------------------------------

_ANNOTATIONS = {"$schema", "$id", "$defs", "$comment", "title", "description", "default", "examples"}
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
}


def load_schema() -> dict:
    """The explanation document's JSON Schema (draft 2020-12) shipped with langmamba."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


class _Validator:
    """The subset of JSON Schema 2020-12 the explanation schema uses: ``$ref`` to ``#/$defs/...``,
    ``type``, ``enum``, ``const``, ``properties``, ``required``, ``additionalProperties``, ``items``,
    ``minItems``, ``maxItems``, ``minimum``, ``maximum``, ``minLength``. Other keywords raise
    :class:`ConfigError`, so a schema edit cannot silently go unchecked."""

    keywords = {"$ref", "type", "enum", "const", "properties", "required", "additionalProperties", "items",
                "minItems", "maxItems", "minimum", "maximum", "minLength"}

    def __init__(self, schema: dict, limit: int = 20) -> None:
        self.root = schema
        self.limit = limit
        self.errors: list[str] = []

    def check(self, value: Any, schema: dict | bool, where: str) -> None:
        if len(self.errors) >= self.limit:
            return
        if schema is True:
            return
        if schema is False:
            self._fail(where, "no value is allowed here")
            return
        unknown = set(schema) - self.keywords - _ANNOTATIONS
        if unknown:
            raise ConfigError(f"the explanation schema uses keywords the validator does not support: {sorted(unknown)}")
        if "$ref" in schema:
            self.check(value, self._resolve(schema["$ref"]), where)
        if "type" in schema:
            types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
            if not any(_TYPES[t](value) for t in types):
                self._fail(where, f"expected {' or '.join(types)}, got {type(value).__name__}")
                return
        if isinstance(value, float) and not math.isfinite(value):
            self._fail(where, f"{value} is not a finite number")
        if "enum" in schema and value not in schema["enum"]:
            self._fail(where, f"{value!r} is not one of {schema['enum']}")
        if "const" in schema and value != schema["const"]:
            self._fail(where, f"expected {schema['const']!r}, got {value!r}")
        if _TYPES["number"](value):
            if "minimum" in schema and value < schema["minimum"]:
                self._fail(where, f"{value} is below the minimum {schema['minimum']}")
            if "maximum" in schema and value > schema["maximum"]:
                self._fail(where, f"{value} is above the maximum {schema['maximum']}")
        if isinstance(value, str) and len(value) < schema.get("minLength", 0):
            self._fail(where, f"string shorter than {schema['minLength']}")
        if isinstance(value, dict):
            self._object(value, schema, where)
        if isinstance(value, list):
            if len(value) < schema.get("minItems", 0):
                self._fail(where, f"{len(value)} items, fewer than {schema['minItems']}")
            if "maxItems" in schema and len(value) > schema["maxItems"]:
                self._fail(where, f"{len(value)} items, more than {schema['maxItems']}")
            if "items" in schema:
                for i, item in enumerate(value):
                    self.check(item, schema["items"], f"{where}/{i}")

    def _fail(self, where: str, message: str) -> None:
        self.errors.append(f"{where or '(document)'}: {message}")

    def _object(self, value: dict, schema: dict, where: str) -> None:
        for key in schema.get("required", []):
            if key not in value:
                self._fail(where, f"missing required key {key!r}")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                self.check(item, properties[key], f"{where}/{key}")
            elif extra is False:
                self._fail(where, f"unexpected key {key!r}")
            else:
                self.check(item, extra, f"{where}/{key}")

    def _resolve(self, ref: str) -> dict:
        if not ref.startswith("#/"):
            raise ConfigError(f"the explanation schema refers outside itself ({ref}); only '#/...' is supported")
        node: Any = self.root
        for part in ref[2:].split("/"):
            node = node[part]
        return node


def validate_explanation(document: dict, schema: dict | None = None) -> None:
    """Check ``document`` against the explanation schema (default: the shipped one).

    Uses langmamba's own validator for the schema's keyword subset (see :class:`_Validator`), so no
    ``jsonschema`` dependency is needed. Also checks what the schema cannot say: every slice lists the
    document's levels in order, and each region list has the level's ``g_h × g_w`` entries.

    Raises:
        InputError: the document does not match; the message lists up to 5 problems with their JSON paths.
    """
    schema = load_schema() if schema is None else schema
    validator = _Validator(schema)
    validator.check(document, schema, "")
    errors = validator.errors
    if not errors:
        grids = {entry["level"]: entry["grid"] for entry in document["levels"]}
        order = [entry["level"] for entry in document["levels"]]
        for i, entry in enumerate(document["slices"]):
            present = [level_entry["level"] for level_entry in entry["levels"]]
            if present != order:
                errors.append(f"/slices/{i}: levels {present} differ from the document's {order}")
                continue
            for j, level_entry in enumerate(entry["levels"]):
                grid = grids[level_entry["level"]]
                if len(level_entry["regions"]) != grid[0] * grid[1]:
                    errors.append(f"/slices/{i}/levels/{j}: {len(level_entry['regions'])} regions for a grid {grid}")
    if errors:
        shown = "; ".join(errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise InputError(f"the explanation document does not match {SCHEMA_NAME} {SCHEMA_VERSION}: {shown}{more}")
