"""The explanation document in its two forms: streamed to a file as JSON text, or held as a dict.

Both run an :class:`~langmamba.explain.encode.Explainer` batch by batch, format every batch's slices with the one
formatter (:func:`~langmamba.explain.document.slice_texts`) and tally the summary
(:class:`~langmamba.explain.summary.SummaryTally`). :func:`write_explanation` writes the text as it comes;
:func:`explain_volume` parses it into the dict, so the two are equal by construction.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from itertools import chain
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from langmamba import __version__, workers
from langmamba.explain.confidence import confidence_thresholds
from langmamba.explain.document import TextFormat, rounded, slice_texts
from langmamba.explain.encode import Explainer
from langmamba.explain.rules import ChangeRule, language_space_record, score_record
from langmamba.explain.schema import SCHEMA_NAME, SCHEMA_VERSION
from langmamba.explain.summary import SummaryTally
from langmamba.explain.types import ExplainedBatch
from langmamba.io.volume import CTVolume

CHANGE_SCORE_METHOD = "tvd_topk_union"
"""Name recorded in the document for the change score defined in :mod:`langmamba.explain`."""


def _scalars(mapping: Any) -> dict[str, Any]:
    """The entries of ``mapping`` whose values are JSON scalars (training step, run name ...)."""
    if not isinstance(mapping, dict):
        return {}
    return {str(k): v for k, v in mapping.items() if isinstance(v, (str, int, float, bool)) or v is None}


def _model_info(model: nn.Module, langae: nn.Module) -> dict[str, Any]:
    info: dict[str, Any] = {
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


def _geometry(volume: CTVolume | None, shape: tuple[int, int, int]) -> dict[str, Any]:
    spacing: Any
    origin: Any
    direction: Any
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


def document_header(explainer: Explainer) -> dict[str, Any]:
    """The document's entries before ``"slices"``: what was explained, with which model, rules and geometry."""
    return {
        "schema": SCHEMA_NAME,
        "version": SCHEMA_VERSION,
        "model": _model_info(explainer.model, explainer.langae),
        "vocabulary_size": len(explainer.vocabulary),
        "top_k": explainer.top_k,
        "scores": score_record(explainer.quantizer),
        "confidence": confidence_thresholds(len(explainer.vocabulary)),
        "change_rule": explainer.rule.record(),
        "change_score_method": CHANGE_SCORE_METHOD,
        "word_classes": explainer.word_classes,
        "volume": _geometry(explainer.volume, explainer.shape),
        "levels": [
            {"level": level, "grid": list(explainer.grids[level]), "latent": [int(s) for s in explainer.latent]}
            for level in explainer.levels
        ],
    }


def explain_volume(
    model: nn.Module,
    input_hu: npt.NDArray[Any] | torch.Tensor,
    output_hu: npt.NDArray[Any] | torch.Tensor,
    volume: CTVolume | None = None,
    *,
    levels: Sequence[int] = (0, 1, 2),
    top_k: int = 3,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = False,
    change_rule: ChangeRule | None = None,
    word_classes: Mapping[str, str] | Sequence[str] | None = None,
) -> dict[str, Any]:
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
    explainer = Explainer(
        model, input_hu, output_hu, volume, levels, top_k, batch_size, device, change_rule, word_classes
    )
    header = document_header(explainer)
    summary = SummaryTally(explainer.levels, explainer.grids, explainer.vocabulary, header["confidence"])
    slices = [json.loads(text) for text in _slice_texts(explainer, summary, progress, None, parallel=False)]
    return {**header, "slices": slices, "summary": summary.record()}


def write_explanation(
    destination: str | Path | TextIO,
    model: nn.Module,
    input_hu: npt.NDArray[Any] | torch.Tensor,
    output_hu: npt.NDArray[Any] | torch.Tensor,
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
) -> dict[str, Any]:
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
    explainer = Explainer(
        model, input_hu, output_hu, volume, levels, top_k, batch_size, device, change_rule, word_classes
    )
    if isinstance(destination, (str, Path)):
        with open(destination, "w", encoding="utf-8") as stream:
            return _stream(explainer, stream, progress, on_batch)
    return _stream(explainer, destination, progress, on_batch)


def _stream(
    explainer: Explainer, stream: TextIO, progress: bool, on_batch: Callable[[ExplainedBatch], None] | None
) -> dict[str, Any]:
    """Write the document with ``"slices"`` filled one batch at a time; returns it without the slices."""
    header = document_header(explainer)
    summary = SummaryTally(explainer.levels, explainer.grids, explainer.vocabulary, header["confidence"])
    stream.write(json.dumps(header)[:-1] + ', "slices": [')
    separator = "\n"
    for text in _slice_texts(explainer, summary, progress, on_batch, parallel=True):
        stream.write(separator + text)
        separator = ",\n"
    record = summary.record()
    stream.write('\n], "summary": ' + json.dumps(record) + "}\n")
    return {**header, "summary": record}


def _slice_texts(
    explainer: Explainer,
    summary: SummaryTally,
    progress: bool,
    on_batch: Callable[[ExplainedBatch], None] | None,
    parallel: bool,
) -> Iterator[str]:
    """The JSON text of every slice entry in order, each batch added to ``summary`` and handed to ``on_batch``.

    With ``parallel``, the text of a few batches is formatted by :mod:`langmamba.workers` processes while the
    next ones are encoded."""
    text_format = TextFormat.build(
        explainer.boxes, explainer.grids, explainer.affine, explainer.vocabulary, explainer.top_k
    )
    pending: deque[Future[list[str]]] = deque()
    limit = 2 * workers.worker_count() if parallel else 0
    for batch in chain(explainer.batches(progress), [None]):
        if batch is not None:
            summary.add(batch)
            if parallel:
                pending.append(workers.submit(slice_texts, text_format, batch.start, batch.levels))
            else:
                yield from slice_texts(text_format, batch.start, batch.levels)
            if on_batch is not None:
                on_batch(batch)
        while pending and (batch is None or len(pending) > limit):
            yield from pending.popleft().result()
