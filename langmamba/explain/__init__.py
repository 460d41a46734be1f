"""Word explanations of a denoised CT volume: the vocabulary words LangAE's quantizer reads in every region.

The package, one concept per module: :mod:`~langmamba.explain.types` (the batch arrays every consumer reads),
:mod:`~langmamba.explain.encode` (the :class:`Explainer` that computes them), :mod:`~langmamba.explain.rules` and
:mod:`~langmamba.explain.confidence` (how words are scored, flagged and read), :mod:`~langmamba.explain.document`
(the one slice formatter), :mod:`~langmamba.explain.summary` (the per-volume tallies),
:mod:`~langmamba.explain.writer` (the document streamed or in memory), :mod:`~langmamba.explain.labels` (the label
painter and colour tables) and :mod:`~langmamba.explain.schema` (the JSON Schema validator). Their public names
are importable from ``langmamba.explain``.

:func:`explain_volume` runs the frozen LangAE encoder and pyramid quantizer of a LangMamba on every slice
of the denoised output and of the low-dose input, and lists for each pyramid level and region the top-k
words of both, with a flag where they disagree. The result is a JSON-serialisable dict described by the
JSON Schema ``langmamba/resources/explanation.schema.json`` (:func:`validate_explanation` checks it).
:func:`write_explanation` streams the same document to a file; the dict is that text parsed.
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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from langmamba.explain.confidence import (
        BANDS,
        CONFIDENT_PROBABILITY,
        NEAR_UNIFORM_FACTOR,
        confidence_band,
        confidence_thresholds,
        format_percent,
    )
    from langmamba.explain.encode import Explainer
    from langmamba.explain.labels import (
        color_table,
        explanation_label_map,
        paint_regions,
        word_color,
        write_color_table,
    )
    from langmamba.explain.rules import (
        DEFAULT_CHANGE_RULE,
        WORD_CLASS_KEYS,
        ChangeRule,
        change_flags,
        language_space_record,
        resolve_word_classes,
        rule_flags,
        score_record,
        word_probabilities,
    )
    from langmamba.explain.schema import SCHEMA_NAME, SCHEMA_PATH, SCHEMA_VERSION, load_schema, validate_explanation
    from langmamba.explain.summary import SummaryTally
    from langmamba.explain.types import DECIMALS, SCALE, ColorTable, ExplainedBatch, LevelWords
    from langmamba.explain.writer import CHANGE_SCORE_METHOD, document_header, explain_volume, write_explanation

# Public names are loaded on first use: the data types, labels and schema need no torch, and importing the
# package (as `report` and the workers do) must not load the encoder.
_LAZY: dict[str, str] = {
    "BANDS": "langmamba.explain.confidence",
    "CHANGE_SCORE_METHOD": "langmamba.explain.writer",
    "CONFIDENT_PROBABILITY": "langmamba.explain.confidence",
    "ChangeRule": "langmamba.explain.rules",
    "ColorTable": "langmamba.explain.types",
    "DECIMALS": "langmamba.explain.types",
    "DEFAULT_CHANGE_RULE": "langmamba.explain.rules",
    "ExplainedBatch": "langmamba.explain.types",
    "Explainer": "langmamba.explain.encode",
    "LevelWords": "langmamba.explain.types",
    "NEAR_UNIFORM_FACTOR": "langmamba.explain.confidence",
    "SCALE": "langmamba.explain.types",
    "SCHEMA_NAME": "langmamba.explain.schema",
    "SCHEMA_PATH": "langmamba.explain.schema",
    "SCHEMA_VERSION": "langmamba.explain.schema",
    "SummaryTally": "langmamba.explain.summary",
    "WORD_CLASS_KEYS": "langmamba.explain.rules",
    "change_flags": "langmamba.explain.rules",
    "color_table": "langmamba.explain.labels",
    "confidence_band": "langmamba.explain.confidence",
    "confidence_thresholds": "langmamba.explain.confidence",
    "document_header": "langmamba.explain.writer",
    "explain_volume": "langmamba.explain.writer",
    "explanation_label_map": "langmamba.explain.labels",
    "format_percent": "langmamba.explain.confidence",
    "language_space_record": "langmamba.explain.rules",
    "load_schema": "langmamba.explain.schema",
    "paint_regions": "langmamba.explain.labels",
    "resolve_word_classes": "langmamba.explain.rules",
    "rule_flags": "langmamba.explain.rules",
    "score_record": "langmamba.explain.rules",
    "validate_explanation": "langmamba.explain.schema",
    "word_color": "langmamba.explain.labels",
    "word_probabilities": "langmamba.explain.rules",
    "write_color_table": "langmamba.explain.labels",
    "write_explanation": "langmamba.explain.writer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BANDS",
    "CHANGE_SCORE_METHOD",
    "CONFIDENT_PROBABILITY",
    "DECIMALS",
    "DEFAULT_CHANGE_RULE",
    "NEAR_UNIFORM_FACTOR",
    "SCALE",
    "SCHEMA_NAME",
    "SCHEMA_PATH",
    "SCHEMA_VERSION",
    "WORD_CLASS_KEYS",
    "ChangeRule",
    "ColorTable",
    "ExplainedBatch",
    "Explainer",
    "LevelWords",
    "SummaryTally",
    "change_flags",
    "color_table",
    "confidence_band",
    "confidence_thresholds",
    "document_header",
    "explain_volume",
    "explanation_label_map",
    "format_percent",
    "language_space_record",
    "load_schema",
    "paint_regions",
    "resolve_word_classes",
    "rule_flags",
    "score_record",
    "validate_explanation",
    "word_color",
    "word_probabilities",
    "write_color_table",
    "write_explanation",
]
