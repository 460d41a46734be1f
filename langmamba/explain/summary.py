"""The document's per-volume ``summary``, tallied batch by batch so that streaming keeps memory bounded.

Per level: regions, flagged (confidently changed) regions, regions whose top word differs, mean change score, mean
top-word probability of output and input, output regions per confidence band and top-1 word frequencies; and the
list of flagged regions. Means are of the rounded scores (integers in units of ``1 / SCALE``), so the summary
agrees with the slice entries to the last digit. Nothing here imports torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from langmamba.explain.confidence import BANDS, confidence_band
from langmamba.explain.types import DECIMALS, SCALE, ExplainedBatch

Counts = npt.NDArray[np.int64]


class SummaryTally:
    """Running tallies of an explanation of ``levels`` over a ``vocabulary``.

    Args:
        levels: the explained pyramid levels, in the document's order.
        grids: each level's ``(g_h, g_w)`` region grid.
        vocabulary: the words, by vocabulary id.
        thresholds: the document's ``confidence`` entry (:func:`langmamba.explain.confidence_thresholds`).
    """

    def __init__(
        self,
        levels: Sequence[int],
        grids: Mapping[int, tuple[int, int]],
        vocabulary: Sequence[str],
        thresholds: Mapping[str, float],
    ) -> None:
        self.levels = list(levels)
        self.columns = {level: int(grids[level][1]) for level in self.levels}
        self.vocabulary = list(vocabulary)
        size = len(self.vocabulary)
        self.top1_counts: dict[int, dict[str, Counts]] = {
            level: {"output": np.zeros(size, np.int64), "input": np.zeros(size, np.int64)} for level in self.levels
        }
        self.counts: dict[int, dict[str, int]] = {
            level: {
                "regions": 0,
                "changed": 0,
                "differs": 0,
                "score_units": 0,
                "output_top_units": 0,
                "input_top_units": 0,
            }
            for level in self.levels
        }
        self.bands: dict[int, Counts] = {level: np.zeros(len(BANDS), np.int64) for level in self.levels}
        # the band of every top-word score in units, so a region's band is the one its rounded score gives
        self.band_of_units = np.array([BANDS.index(confidence_band(k / SCALE, thresholds)) for k in range(SCALE + 1)])
        self.flagged: list[dict[str, Any]] = []

    def add(self, batch: ExplainedBatch) -> None:
        """Add a batch: region counts, changed regions, top-1 word counts, flagged regions."""
        for words in batch.levels:
            counts = self.counts[words.level]
            counts["regions"] += words.change.size
            counts["changed"] += int(words.changed.sum())
            counts["differs"] += int(words.top_differs.sum())
            counts["score_units"] += int(words.change.sum(dtype=np.int64))
            counts["output_top_units"] += int(words.output_scores[..., 0].sum(dtype=np.int64))
            counts["input_top_units"] += int(words.input_scores[..., 0].sum(dtype=np.int64))
            self.bands[words.level] += np.bincount(
                self.band_of_units[words.output_scores[..., 0].ravel()], minlength=len(BANDS)
            )
            for which, ids in (("output", words.output_ids), ("input", words.input_ids)):
                self.top1_counts[words.level][which] += np.bincount(ids[..., 0].ravel(), minlength=len(self.vocabulary))
        for b in range(batch.count):
            for words in batch.levels:
                for n in np.flatnonzero(words.changed[b]).tolist():
                    row, col = divmod(n, self.columns[words.level])
                    self.flagged.append(
                        {
                            "z": batch.start + b,
                            "level": words.level,
                            "row": row,
                            "col": col,
                            "output_word": self.vocabulary[words.output_ids[b, n, 0]],
                            "input_word": self.vocabulary[words.input_ids[b, n, 0]],
                            "output_score": int(words.output_scores[b, n, 0]) / SCALE,
                            "input_score": int(words.input_scores[b, n, 0]) / SCALE,
                            "change_score": int(words.change[b, n]) / SCALE,
                        }
                    )

    def record(self) -> dict[str, Any]:
        """The document's ``summary`` of the batches added so far."""
        per_level = []
        for level in self.levels:
            c = self.counts[level]

            def mean(units: int, regions: int = c["regions"]) -> float:
                return round(units / SCALE / regions, DECIMALS) if regions else 0.0

            per_level.append(
                {
                    "level": level,
                    "regions": c["regions"],
                    "changed": c["changed"],
                    "changed_fraction": round(c["changed"] / c["regions"], DECIMALS) if c["regions"] else 0.0,
                    "top_word_differs": c["differs"],
                    "mean_change_score": mean(c["score_units"]),
                    "mean_top_score": {"output": mean(c["output_top_units"]), "input": mean(c["input_top_units"])},
                    "output_confidence": {band: int(n) for band, n in zip(BANDS, self.bands[level])},
                    "word_frequencies": {
                        which: self._frequencies(self.top1_counts[level][which]) for which in ("output", "input")
                    },
                }
            )
        return {
            "regions": sum(self.counts[level]["regions"] for level in self.levels),
            "flagged_count": len(self.flagged),
            "flagged": list(self.flagged),
            "levels": per_level,
        }

    def _frequencies(self, counts: Counts) -> dict[str, int]:
        """Top-1 counts by word, most frequent first, ties by word."""
        by_word: Counter[str] = Counter()
        for i in np.flatnonzero(counts).tolist():
            by_word[self.vocabulary[i]] += int(counts[i])
        return dict(sorted(by_word.items(), key=lambda item: (-item[1], item[0])))
