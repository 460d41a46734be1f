"""The explanation document of a LangMamba denoising, for browsing in Slicer (numpy only).

The document (``langmamba-explanations``, written by ``langmamba.explain`` on the server) lists per
slice ``z``, pyramid level and region its voxel box ``bbox_voxel`` (half-open ``x0 <= column < x1``,
``y0 <= row < y1`` on slice ``z``), its corners in LPS/RAS mm, the top-k words with their probabilities the
model reads in the denoised output and in the low-dose input, and whether denoising changed the top word.
Version 2.0 also names the language space that produced the words, the score calibration, the uniform
probability ``1 / V`` with confidence bands, the change rule (a flag means a *confident* change) and, when the
vocabulary has them, each word's tissue class; version 1.0 documents (any change of the top word flagged) are
read too. This module flattens a document into table rows, filters and sorts them (by word, flag, level,
confidence), describes the document in words (:func:`describe`), formats probabilities as percentages
(``"0.43 %"``, never ``"0.00"``), paints a level's top-1 words into a label volume with the same colours as
``langmamba.explain.word_color`` and writes CSV/JSON exports atomically. The percentage format, the bands and
the language-space wording are those of ``langmamba.explain`` (the tests hold them equal).
"""

from __future__ import annotations

import colorsys
import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

SCHEMA_NAME = "langmamba-explanations"
SUPPORTED_MAJOR_VERSIONS = ("1", "2")
BANDS = ("near uniform", "low", "confident")
CONFIDENT_PROBABILITY = 0.5
NEAR_UNIFORM_FACTOR = 10.0
"""Defaults of ``langmamba.explain`` for documents that do not carry their ``confidence`` bands (1.0)."""
ColorTable = list[tuple[int, str, tuple[int, int, int]]]


class ExplanationError(ValueError):
    """The explanation document cannot be used (wrong schema, other volume, unknown level)."""


@dataclass(frozen=True)
class Region:
    """One region of one slice and level (a table row)."""

    index: int
    z: int
    level: int
    row: int
    col: int
    x0: int
    y0: int
    x1: int
    y1: int
    output_words: tuple
    output_scores: tuple
    output_ids: tuple
    input_words: tuple
    input_scores: tuple
    input_ids: tuple
    changed: bool
    change_score: float
    output_class: str | None = None
    input_class: str | None = None

    @property
    def confidence(self) -> float:
        """Probability of the output's top word."""
        return self.output_scores[0]

    @property
    def input_confidence(self) -> float:
        """Probability of the input's top word."""
        return self.input_scores[0]

    @property
    def top_differs(self) -> bool:
        """The top words of output and input differ (confidently or not)."""
        return self.output_ids[0] != self.input_ids[0]

    @property
    def center_ijk(self) -> tuple[float, float, float]:
        """Continuous voxel index (i = column, j = row, k = slice) of the box's centre."""
        return ((self.x0 + self.x1 - 1) / 2.0, (self.y0 + self.y1 - 1) / 2.0, float(self.z))

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        """Box size in voxels (columns, rows, 1 slice)."""
        return (self.x1 - self.x0, self.y1 - self.y0, 1)

    def words_text(self, which: str) -> str:
        """``"lung 87.3 %, air 0.43 %"``: the top-k words with probabilities of ``"output"`` or ``"input"``."""
        words, scores = (
            (self.output_words, self.output_scores) if which == "output" else (self.input_words, self.input_scores)
        )
        return ", ".join(f"{w} {format_percent(s)}" for w, s in zip(words, scores))

    def matches(self, word: str) -> bool:
        """Whether ``word`` (case-insensitive substring) is among the output or input words."""
        needle = word.strip().lower()
        return not needle or any(needle in w.lower() for w in self.output_words + self.input_words)


def format_percent(probability: float) -> str:
    """A probability as a percentage that never hides a small one: ``"87.3 %"``, ``"0.43 %"``, ``"< 0.01 %"``
    (``langmamba.explain.format_percent``)."""
    percent = 100.0 * float(probability)
    if percent <= 0.0:
        return "< 0.01 %"
    if percent < 1.0:
        return f"{percent:.2f} %"
    text = f"{percent:.1f}"
    return "> 99.9 %" if text == "100.0" and percent < 100.0 else f"{text} %"


def check_document(document: object) -> dict:
    """``document`` if it is a LangMamba explanation document of a version this module reads (1.x or 2.x),
    else :class:`ExplanationError`."""
    if not isinstance(document, dict) or document.get("schema") != SCHEMA_NAME:
        raise ExplanationError("the server's answer holds no LangMamba explanation document")
    version = str(document.get("version", ""))
    if version.split(".")[0] not in SUPPORTED_MAJOR_VERSIONS:
        raise ExplanationError(
            f"explanation documents of version {version or '(none)'} are not supported; this "
            f"module reads versions {', '.join(v + '.x' for v in SUPPORTED_MAJOR_VERSIONS)}"
        )
    for key in ("volume", "levels", "slices"):
        if key not in document:
            raise ExplanationError(f"the explanation document has no {key!r}")
    return document


def confidence_thresholds(document: dict) -> dict:
    """The document's ``uniform`` probability and band bounds; for 1.0 documents, langmamba's defaults."""
    recorded = document.get("confidence")
    if isinstance(recorded, dict):
        return recorded
    size = int(document.get("vocabulary_size") or 1)
    uniform = 1.0 / size
    return {
        "uniform": uniform,
        "near_uniform_below": min(NEAR_UNIFORM_FACTOR * uniform, CONFIDENT_PROBABILITY / 2),
        "confident_from": CONFIDENT_PROBABILITY,
    }


def confidence_band(probability: float, thresholds: dict) -> str:
    """``"near uniform"``, ``"low"`` or ``"confident"`` (``langmamba.explain.confidence_band``)."""
    if probability < thresholds["near_uniform_below"]:
        return "near uniform"
    return "confident" if probability >= thresholds["confident_from"] else "low"


def language_space_text(document: dict) -> str:
    """The language space that produced the words, in words (recorded in 2.0, derived from the backend in 1.0)."""
    model = document.get("model") or {}
    space = model.get("language_space")
    if isinstance(space, dict) and space.get("description"):
        return str(space["description"])
    backend, model_id = model.get("vlm_backend"), model.get("vlm_id")
    if backend == "offline":
        text = "MiniLM" if model_id is None or "minilm" in str(model_id).lower() else model_id
        return f"offline {text} text codebook ({model_id or 'all-MiniLM-L6-v2'}) with tissue-class supervision"
    if backend == "clip":
        return f"CLIP model {model_id}" if model_id else "a CLIP model (name not recorded)"
    if backend is None:
        return "not recorded by the model"
    return f"{backend} ({model_id})" if model_id else str(backend)


def describe(document: dict) -> dict:
    """What a reader needs besides the rows: ``version``, ``language_space``, ``calibration``, ``uniform``,
    ``thresholds`` and ``change_rule`` as sentences, and ``legacy`` (a 1.0 document)."""
    check_document(document)
    thresholds = confidence_thresholds(document)
    scores = document.get("scores") or {}
    calibration = {
        "none": "uncalibrated (softmax at temperature 1)",
        "logit_scale": f"softmax with logit scale {scores.get('logit_scale')}",
        "model": "calibrated by the model",
    }.get(scores.get("calibration"), "uncalibrated (softmax at temperature 1; not recorded)")
    rule = document.get("change_rule")
    if isinstance(rule, dict):
        change = (
            f"flagged when the top word changes with both top-word probabilities "
            f"\u2265 {format_percent(rule['min_probability'])} and a lead \u2265 "
            f"{format_percent(rule['min_margin'])}"
        )
    else:
        change = "flagged on any change of the top word (schema 1.0: no confidence rule)"
    return {
        "version": str(document.get("version")),
        "language_space": language_space_text(document),
        "calibration": calibration,
        "uniform": thresholds["uniform"],
        "thresholds": thresholds,
        "change_rule": change,
        "legacy": not isinstance(rule, dict),
    }


def levels(document: dict) -> list[int]:
    """The pyramid levels the document explains, in its order."""
    return [int(entry["level"]) for entry in check_document(document)["levels"]]


def regions(document: dict) -> list[Region]:
    """Every region of the document, slice by slice, level by level, row-major within a level."""
    rows = []
    classes = check_document(document).get("word_classes") or {}
    for entry in document["slices"]:
        for level_entry in entry["levels"]:
            for region in level_entry["regions"]:
                box, out, inp = region["bbox_voxel"], region["output"], region["input"]
                rows.append(
                    Region(
                        index=len(rows),
                        z=int(box["z"]),
                        level=int(level_entry["level"]),
                        row=int(region["row"]),
                        col=int(region["col"]),
                        x0=int(box["x0"]),
                        y0=int(box["y0"]),
                        x1=int(box["x1"]),
                        y1=int(box["y1"]),
                        output_words=tuple(out["words"]),
                        output_scores=tuple(float(s) for s in out["scores"]),
                        output_ids=tuple(int(i) for i in out["ids"]),
                        input_words=tuple(inp["words"]),
                        input_scores=tuple(float(s) for s in inp["scores"]),
                        input_ids=tuple(int(i) for i in inp["ids"]),
                        changed=bool(region["changed"]),
                        change_score=float(region["change_score"]),
                        output_class=classes.get(out["words"][0]),
                        input_class=classes.get(inp["words"][0]),
                    )
                )
    return rows


def filter_regions(
    rows: Iterable[Region],
    word: str = "",
    changed_only: bool = False,
    level: int | None = None,
    min_confidence: float = 0.0,
) -> list[Region]:
    """Rows whose output or input words contain ``word``, optionally only flagged ones, one level, or those
    whose output top-word probability is at least ``min_confidence`` (0-1)."""
    return [
        r
        for r in rows
        if (not changed_only or r.changed)
        and (level is None or r.level == level)
        and r.confidence >= min_confidence
        and r.matches(word)
    ]


SORT_KEYS = {
    "document": lambda r: r.index,
    "slice": lambda r: (r.z, r.level, r.row, r.col),
    "level": lambda r: (r.level, r.index),
    "output word": lambda r: (r.output_words[0].lower(), r.index),
    "class": lambda r: (r.output_class or "~", r.index),
    "confidence": lambda r: r.confidence,
    "input word": lambda r: (r.input_words[0].lower(), r.index),
    "input confidence": lambda r: r.input_confidence,
    "changed": lambda r: (r.changed, r.top_differs),
    "change score": lambda r: r.change_score,
}
"""Sort keys of :func:`sort_regions` by name."""


def sort_regions(rows: Iterable[Region], key: str = "document", descending: bool = False) -> list[Region]:
    """``rows`` sorted by one of :data:`SORT_KEYS`; ties keep document order."""
    if key not in SORT_KEYS:
        raise ExplanationError(f"unknown sort key {key!r}; use one of {sorted(SORT_KEYS)}")
    return sorted(sorted(rows, key=lambda r: r.index), key=SORT_KEYS[key], reverse=descending)


def word_color(word: str) -> tuple[int, int, int]:
    """RGB 0-255 of ``word``: the same MD5-derived colour as ``langmamba.explain.word_color``, so label
    maps made here and by ``langmamba denoise --labels`` look alike."""
    digest = hashlib.md5(word.encode("utf-8")).digest()
    hue = int.from_bytes(digest[:4], "big") / 2**32
    saturation = 0.55 + 0.4 * digest[4] / 255
    value = 0.75 + 0.2 * digest[5] / 255
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value))


def label_map(document: dict, level: int, shape: Sequence[int], which: str = "output") -> tuple[np.ndarray, ColorTable]:
    """Paint ``level``'s regions with their top-1 word.

    Args:
        document: the explanation document.
        level: a pyramid level present in the document.
        shape: ``(Z, Y, X)`` of the denoised volume; must equal the document's volume shape.
        which: ``"output"`` (denoised) or ``"input"`` words.

    Returns:
        ``labels`` int32 ``(Z, Y, X)`` = vocabulary id + 1 of the region's top-1 word (0 where nothing was
        explained) and the colour table ``[(label, word, (r, g, b)), ...]`` of the labels used, sorted.
    """
    if which not in ("output", "input"):
        raise ExplanationError(f"which must be 'output' or 'input', got {which!r}")
    shape = tuple(int(s) for s in shape)
    recorded = tuple(int(s) for s in check_document(document)["volume"].get("shape", ()))
    if recorded != shape:
        raise ExplanationError(f"the explanation is of a volume of shape {recorded}, not {shape}")
    available = levels(document)
    if level not in available:
        raise ExplanationError(f"pyramid level {level} is not in the explanation (levels {available})")
    labels = np.zeros(shape, dtype=np.int32)
    words: dict[int, str] = {}
    for region in regions(document):
        if region.level != level:
            continue
        ids, names = (
            (region.output_ids, region.output_words) if which == "output" else (region.input_ids, region.input_words)
        )
        value = ids[0] + 1
        labels[region.z, region.y0 : region.y1, region.x0 : region.x1] = value
        words[value] = names[0]
    return labels, [(value, words[value], word_color(words[value])) for value in sorted(words)]


CSV_COLUMNS = (
    "slice",
    "level",
    "row",
    "col",
    "x0",
    "y0",
    "x1",
    "y1",
    "output_words",
    "output_scores",
    "input_words",
    "input_scores",
    "changed",
    "change_score",
    "output_class",
    "input_class",
    "top_word_differs",
)


def csv_text(rows: Iterable[Region]) -> str:
    """CSV of ``rows`` (:data:`CSV_COLUMNS`; word and score lists joined with ``;``, scores as probabilities
    0-1 with 4 decimals, classes empty when the vocabulary has none)."""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow(
            [
                r.z,
                r.level,
                r.row,
                r.col,
                r.x0,
                r.y0,
                r.x1,
                r.y1,
                ";".join(r.output_words),
                ";".join(f"{s:.4f}" for s in r.output_scores),
                ";".join(r.input_words),
                ";".join(f"{s:.4f}" for s in r.input_scores),
                int(r.changed),
                f"{r.change_score:.4f}",
                r.output_class or "",
                r.input_class or "",
                int(r.top_differs),
            ]
        )
    return stream.getvalue()


def write_text_atomic(path: str, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, staging = tempfile.mkstemp(dir=folder, prefix=".langmamba-", suffix=".part")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise
    return path


def export_csv(rows: Iterable[Region], path: str) -> str:
    """Write the rows as CSV to ``path`` (atomic)."""
    return write_text_atomic(path, csv_text(rows))


def export_json(document: dict, path: str) -> str:
    """Write the whole explanation document as JSON to ``path`` (atomic)."""
    return write_text_atomic(path, json.dumps(check_document(document)) + "\n")
