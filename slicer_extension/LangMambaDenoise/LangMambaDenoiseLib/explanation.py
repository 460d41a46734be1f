"""The explanation document of a LangMamba denoising, for browsing in Slicer (numpy only).

The document (``langmamba-explanations`` 1.0, written by ``langmamba.explain`` on the server) lists per
slice ``z``, pyramid level and region its voxel box ``bbox_voxel`` (half-open ``x0 <= column < x1``,
``y0 <= row < y1`` on slice ``z``), its corners in LPS/RAS mm, the top-k words with scores the model reads
in the denoised output and in the low-dose input, and whether the top-1 word changed. This module
flattens it into table rows, filters them, paints a level's top-1 words into a label volume with the
same colours as ``langmamba.explain.word_color`` and writes CSV/JSON exports atomically.
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
from typing import List, Tuple

import numpy as np

SCHEMA_NAME = "langmamba-explanations"
ColorTable = List[Tuple[int, str, Tuple[int, int, int]]]


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

    @property
    def center_ijk(self) -> tuple[float, float, float]:
        """Continuous voxel index (i = column, j = row, k = slice) of the box's centre."""
        return ((self.x0 + self.x1 - 1) / 2.0, (self.y0 + self.y1 - 1) / 2.0, float(self.z))

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        """Box size in voxels (columns, rows, 1 slice)."""
        return (self.x1 - self.x0, self.y1 - self.y0, 1)

    def words_text(self, which: str) -> str:
        """``"lung 0.41, air 0.20"``: the top-k words with scores of ``"output"`` or ``"input"``."""
        words, scores = (self.output_words, self.output_scores) if which == "output" else (self.input_words, self.input_scores)
        return ", ".join(f"{w} {s:.2f}" for w, s in zip(words, scores))

    def matches(self, word: str) -> bool:
        """Whether ``word`` (case-insensitive substring) is among the output or input words."""
        needle = word.strip().lower()
        return not needle or any(needle in w.lower() for w in self.output_words + self.input_words)


def check_document(document: object) -> dict:
    """``document`` if it is a LangMamba explanation document, else :class:`ExplanationError`."""
    if not isinstance(document, dict) or document.get("schema") != SCHEMA_NAME:
        raise ExplanationError("the server's answer holds no LangMamba explanation document")
    for key in ("volume", "levels", "slices"):
        if key not in document:
            raise ExplanationError(f"the explanation document has no {key!r}")
    return document


def levels(document: dict) -> list[int]:
    """The pyramid levels the document explains, in its order."""
    return [int(entry["level"]) for entry in check_document(document)["levels"]]


def regions(document: dict) -> list[Region]:
    """Every region of the document, slice by slice, level by level, row-major within a level."""
    rows = []
    for entry in check_document(document)["slices"]:
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
                    )
                )
    return rows


def filter_regions(
    rows: Iterable[Region], word: str = "", changed_only: bool = False, level: int | None = None
) -> list[Region]:
    """Rows whose output or input words contain ``word``, optionally only changed ones or one level."""
    return [
        r for r in rows if (not changed_only or r.changed) and (level is None or r.level == level) and r.matches(word)
    ]


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
        ids, names = (region.output_ids, region.output_words) if which == "output" else (region.input_ids, region.input_words)
        value = ids[0] + 1
        labels[region.z, region.y0 : region.y1, region.x0 : region.x1] = value
        words[value] = names[0]
    return labels, [(value, words[value], word_color(words[value])) for value in sorted(words)]


CSV_COLUMNS = (
    "slice", "level", "row", "col", "x0", "y0", "x1", "y1",
    "output_words", "output_scores", "input_words", "input_scores", "changed", "change_score",
)


def csv_text(rows: Iterable[Region]) -> str:
    """CSV of ``rows`` (:data:`CSV_COLUMNS`; word and score lists joined with ``;``)."""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow(
            [r.z, r.level, r.row, r.col, r.x0, r.y0, r.x1, r.y1,
             ";".join(r.output_words), ";".join(f"{s:.4f}" for s in r.output_scores),
             ";".join(r.input_words), ";".join(f"{s:.4f}" for s in r.input_scores),
             int(r.changed), f"{r.change_score:.4f}"]
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
