"""The one formatter of the explanation document's slice entries: JSON text from a batch's arrays.

The encoder keeps every region's words as arrays (:class:`~langmamba.explain.types.LevelWords`); this module
turns them into the document's slice entries ``{"z", "levels": [{"level", "regions"}]}`` as JSON text. A 512²
slice has 1,092 regions at the default levels, so the text is built from whole-slice arrays with lookup tables
(scores are integers in units of ``1 / SCALE``, so every score's text is precomputed) and one ``%``-format per
level, instead of region dicts and :func:`json.dumps`, which took ten times longer. The text is what
:func:`json.dumps` writes for the same entry, so the in-memory document is this text parsed
(:func:`langmamba.explain.explain_volume`).

Nothing here imports torch, so :mod:`langmamba.workers` processes format batches in parallel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from langmamba.explain.types import DECIMALS, SCALE, IntArray, LevelWords

FloatArray = npt.NDArray[np.float64]
ObjectArray = npt.NDArray[np.object_]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_SCORE_TEXT = np.array([repr(k / SCALE) for k in range(SCALE + 1)], dtype=object)
_BOOL_TEXT = np.array(["false", "true"], dtype=object)


@dataclass(frozen=True)
class LevelLayout:
    """What every slice of one level shares: the region text up to ``"z": `` (``heads``, ``(C,)``) and the two
    box corners of each region as indices into the level's edge ``lattice`` (``(P, 2)`` voxel x, y, row-major)."""

    heads: ObjectArray
    corners: tuple[IntArray, IntArray]
    lattice: FloatArray


def level_layout(boxes: IntArray, columns: int) -> LevelLayout:
    """The :class:`LevelLayout` of a level's ``(C, 4)`` boxes on a grid of ``columns`` columns."""
    heads = np.array(
        [
            f'{{"row": {n // columns}, "col": {n % columns}, "bbox_voxel": {{"x0": {x0}, "y0": {y0}, "x1": {x1}, '
            f'"y1": {y1}, "z": '
            for n, (x0, y0, x1, y1) in enumerate(boxes.tolist())
        ],
        dtype=object,
    )
    xs, ys = np.unique(boxes[:, [0, 2]]), np.unique(boxes[:, [1, 3]])
    lattice = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1).reshape(-1, 2).astype(np.float64)

    def index(x: IntArray, y: IntArray) -> IntArray:
        return np.searchsorted(ys, y) * len(xs) + np.searchsorted(xs, x)

    return LevelLayout(heads, (index(boxes[:, 0], boxes[:, 1]), index(boxes[:, 2], boxes[:, 3])), lattice)


def rounded(values: FloatArray) -> FloatArray:
    """``values`` rounded to :data:`DECIMALS`, ``-0.0`` as ``0.0``."""
    return np.round(values, DECIMALS) + 0.0


def corner_mm(layout: LevelLayout, affine: FloatArray, z: int) -> tuple[FloatArray, FloatArray]:
    """LPS and RAS mm ``(P, 3)``, rounded, of a level's edge lattice on slice ``z``: the outer voxel edges, at
    continuous indices ``(x - 0.5, y - 0.5, z)``, through the 3×4 voxel -> LPS ``affine``."""
    points = np.empty((len(layout.lattice), 4))
    points[:, :2] = layout.lattice - 0.5
    points[:, 2] = z
    points[:, 3] = 1.0
    lps = points @ affine.T
    return rounded(lps), rounded(lps @ LPS_TO_RAS)


@dataclass(frozen=True)
class TextFormat:
    """Everything the text of a slice entry needs besides its words: per level the :class:`LevelLayout`, the
    voxel -> LPS ``affine`` (3×4), and the JSON text of every vocabulary id and word."""

    layouts: dict[int, LevelLayout]
    affine: FloatArray
    id_text: ObjectArray
    word_text: ObjectArray
    top_k: int

    @classmethod
    def build(
        cls,
        boxes: dict[int, IntArray],
        grids: dict[int, tuple[int, int]],
        affine: FloatArray,
        vocabulary: list[str],
        top_k: int,
    ) -> TextFormat:
        """The format of an explanation of levels with ``(C, 4)`` voxel ``boxes`` on ``(g_h, g_w)`` ``grids``."""
        layouts = {level: level_layout(boxes[level], grids[level][1]) for level in boxes}
        return cls(
            layouts,
            affine,
            np.array([str(i) for i in range(len(vocabulary))], dtype=object),
            np.array([json.dumps(word) for word in vocabulary], dtype=object),
            top_k,
        )


def slice_texts(text_format: TextFormat, start: int, levels: list[LevelWords]) -> list[str]:
    """The JSON text of the slice entries ``{"z", "levels": [{"level", "regions"}]}`` of a batch whose first
    slice is ``start``, one string per slice, each equal to :func:`json.dumps` of the entry."""
    template = _region_template(text_format.top_k)
    texts = []
    for b in range(len(levels[0].change)):
        z = start + b
        parts = ", ".join(
            f'{{"level": {words.level}, "regions": [{_regions(text_format, template, z, words, b)}]}}'
            for words in levels
        )
        texts.append(f'{{"z": {z}, "levels": [{parts}]}}')
    return texts


def _region_template(top_k: int) -> str:
    """``%``-template of one region's JSON after its head: z, two corners × 3 coordinates in LPS then RAS,
    then ids, words and scores of output and input, changed and change score."""
    corner = "[%s, %s, %s]"
    words = ", ".join(["%s"] * top_k)
    side = f'{{"ids": [{words}], "words": [{words}], "scores": [{words}]}}'
    return (
        '%s%s}, "bbox_mm": {"lps": ['
        + corner
        + ", "
        + corner
        + '], "ras": ['
        + corner
        + ", "
        + corner
        + ']}, "output": '
        + side
        + ', "input": '
        + side
        + ', "changed": %s, "change_score": %s}'
    )


def _regions(text_format: TextFormat, template: str, z: int, words: LevelWords, b: int) -> str:
    """The comma-separated region texts of slice ``z`` (batch item ``b``) at one level."""
    layout = text_format.layouts[words.level]
    k = text_format.top_k
    values = np.empty((len(layout.heads), 14 + 6 * k + 2), dtype=object)
    values[:, 0] = layout.heads
    values[:, 1] = str(z)
    for i, points in enumerate(corner_mm(layout, text_format.affine, z)):
        texts = _number_texts(points)
        values[:, 2 + 6 * i : 5 + 6 * i] = texts[layout.corners[0]]
        values[:, 5 + 6 * i : 8 + 6 * i] = texts[layout.corners[1]]
    column = 14
    for ids, scores in ((words.output_ids, words.output_scores), (words.input_ids, words.input_scores)):
        values[:, column : column + k] = text_format.id_text[ids[b]]
        values[:, column + k : column + 2 * k] = text_format.word_text[ids[b]]
        values[:, column + 2 * k : column + 3 * k] = _SCORE_TEXT[scores[b]]
        column += 3 * k
    values[:, column] = _BOOL_TEXT[words.changed[b].astype(np.intp)]
    values[:, column + 1] = _SCORE_TEXT[words.change[b]]
    return ", ".join([template] * len(values)) % tuple(values.ravel().tolist())


def _number_texts(points: FloatArray) -> ObjectArray:
    """``repr`` of every number of ``points (P, 3)`` as an object array; each distinct value formatted once
    (on an axis-aligned volume a coordinate takes one value per lattice row or column)."""
    distinct, inverse = np.unique(points, return_inverse=True)
    texts = np.array([repr(v) for v in distinct.tolist()], dtype=object)
    by_point: ObjectArray = texts[inverse.reshape(points.shape)]
    return by_point
