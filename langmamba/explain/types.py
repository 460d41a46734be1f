"""The numbers of a batch of explained slices: the data model every explanation consumer reads.

The encoder (:mod:`langmamba.explain.encode`) computes every region's words on the model's device and hands them
on as these arrays; the document formatter, the summary, the label painter and the HTML report
(:mod:`langmamba.report`) read them. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

DECIMALS = 4
SCALE = 10**DECIMALS
"""Scores are kept as integers in units of ``1 / SCALE``: exactly the document's numbers rounded to 4 decimals."""

IntArray = npt.NDArray[np.integer[Any]]
BoolArray = npt.NDArray[np.bool_]
ColorTable = list[tuple[int, str, tuple[int, int, int]]]
"""``(label_value, word, (r, g, b))`` rows of a label map's colour table, colours 0-255."""


@dataclass(frozen=True)
class LevelWords:
    """The words of one pyramid level for a batch of ``B`` slices of ``C`` regions (row-major grid order).

    ``output_ids``/``input_ids``: int64 ``(B, C, k)`` vocabulary ids, best first; ``output_scores``/
    ``input_scores``: int32 ``(B, C, k)`` and ``change``: int32 ``(B, C)``, in units of ``1 / SCALE`` (the
    document's rounded numbers times ``SCALE``); ``changed``: bool ``(B, C)``, the change rule's flags
    (:class:`langmamba.explain.ChangeRule`).
    """

    level: int
    output_ids: IntArray
    output_scores: IntArray
    input_ids: IntArray
    input_scores: IntArray
    change: IntArray
    changed: BoolArray

    @property
    def top_differs(self) -> BoolArray:
        """``(B, C)``: the top-1 words of output and input differ (confidently or not)."""
        differs: BoolArray = self.output_ids[..., 0] != self.input_ids[..., 0]
        return differs


@dataclass(frozen=True)
class ExplainedBatch:
    """Slices ``start .. start + count - 1`` explained: their :class:`LevelWords` in the document's level
    order, with each level's ``(g_h, g_w)`` grid and ``(C, 4)`` voxel boxes ``x0, y0, x1, y1`` (half-open)
    and the vocabulary, for consumers such as :class:`langmamba.report.ReportCollector`."""

    start: int
    count: int
    levels: list[LevelWords]
    grids: dict[int, tuple[int, int]]
    boxes: dict[int, IntArray]
    vocabulary: list[str]
