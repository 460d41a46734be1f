"""Label maps of explanations: one level's top-1 words painted into a volume, with a colour table for viewers.

:func:`paint_regions` is the one painter: every region's box filled with its label value on every slice given.
:func:`explanation_label_map` paints from a document (or one read back from JSON), and
:class:`langmamba.report.ReportCollector` from the arrays of the streamed batches, both through it.
:func:`word_color` gives each word a fixed colour (the Slicer browser computes the same one);
:func:`write_color_table` writes a table in 3D Slicer's text format. Nothing here imports torch.
"""

from __future__ import annotations

import colorsys
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from langmamba.errors import InputError
from langmamba.explain.types import ColorTable, IntArray


def word_color(word: str) -> tuple[int, int, int]:
    """A deterministic RGB colour (0-255) for ``word``: hue, saturation and value from its MD5 digest.

    Saturation and value stay in [0.55, 0.95] so every word is clearly visible on a grey CT.
    """
    digest = hashlib.md5(word.encode("utf-8")).digest()
    hue = int.from_bytes(digest[:4], "big") / 2**32
    saturation = 0.55 + 0.4 * digest[4] / 255
    value = 0.75 + 0.2 * digest[5] / 255
    red, green, blue = (int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value))
    return red, green, blue


def paint_regions(
    labels: npt.NDArray[np.integer[Any]], boxes: IntArray | Sequence[Sequence[int]], values: IntArray
) -> None:
    """Fill every region's box with its label value, in place.

    Args:
        labels: ``(Z, Y, X)`` label volume (or a run of its slices) to paint.
        boxes: ``(C, 4)`` voxel boxes ``x0, y0, x1, y1`` (half-open columns and rows), the same on every slice.
        values: ``(Z, C)`` the label value of region ``c`` on slice ``z`` of ``labels``.
    """
    for n, (x0, y0, x1, y1) in enumerate(np.asarray(boxes).tolist()):
        labels[:, y0:y1, x0:x1] = values[:, n, None, None]


def explanation_label_map(
    explanation: dict[str, Any], level: int, shape: Sequence[int], which: str = "output"
) -> tuple[npt.NDArray[np.int32], ColorTable]:
    """Paint one level's regions with their top-1 word: a label volume and its colour table.

    Args:
        explanation: a document from :func:`langmamba.explain.explain_volume` (or read back from JSON).
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
    size = tuple(int(s) for s in shape)
    if len(size) != 3 or min(size) < 1:
        raise InputError(f"shape must be a positive (Z, Y, X), got {size}")
    recorded = tuple(explanation.get("volume", {}).get("shape", size))
    if recorded != size:
        raise InputError(f"the explanation is of a volume of shape {recorded}, not {size}")
    available = [entry["level"] for entry in explanation.get("levels", [])]
    if level not in available:
        raise InputError(f"pyramid level {level} is not in the explanation (levels {available})")

    labels = np.zeros(size, dtype=np.int32)
    words: dict[int, str] = {}
    for entry in explanation.get("slices", []):
        for level_entry in entry["levels"]:
            if level_entry["level"] != level:
                continue
            regions = level_entry["regions"]
            boxes = [[r["bbox_voxel"][key] for key in ("x0", "y0", "x1", "y1")] for r in regions]
            values = np.array([[int(r[which]["ids"][0]) + 1 for r in regions]], dtype=np.int64)
            for region in regions:
                words[int(region[which]["ids"][0]) + 1] = region[which]["words"][0]
            z = regions[0]["bbox_voxel"]["z"] if regions else entry["z"]
            paint_regions(labels[z : z + 1], boxes, values)
    return labels, color_table(words)


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
