"""The module's explanation browser: one explanation document, its regions, the filters and summaries the
region table shows, and the exports. No Qt and no MRML (the Logic paints label maps and moves the views)."""

from __future__ import annotations

import json

import numpy as np

from . import explanation as lmexplanation


class ExplanationBrowser:
    """Holds the shown explanation document (``None`` if none) and its :class:`~.explanation.Region` rows."""

    def __init__(self) -> None:
        self.document: dict | None = None
        self.regions: list[lmexplanation.Region] = []

    def setDocument(self, document) -> None:
        """Show ``document`` (checked; ``None`` clears); ExplanationError if it is not an explanation."""
        self.document = None if document is None else lmexplanation.check_document(document)
        self.regions = [] if document is None else lmexplanation.regions(document)

    @staticmethod
    def parse(text: str, source: str = "the explanation") -> dict:
        """A checked document from JSON text; ExplanationError naming ``source`` if unreadable."""
        try:
            document = json.loads(text)
        except ValueError as error:
            raise lmexplanation.ExplanationError(f"cannot read {source}: {error}") from None
        return lmexplanation.check_document(document)

    @classmethod
    def readFile(cls, path: str) -> dict:
        """A checked document from a JSON file (version 1.0 or 2.0)."""
        try:
            with open(path, encoding="utf-8") as stream:
                text = stream.read()
        except OSError as error:
            raise lmexplanation.ExplanationError(f"cannot read the explanation {path}: {error}") from None
        return cls.parse(text, f"the explanation {path}")

    def documentText(self) -> str:
        """The shown document as compact JSON ("" if none), e.g. to keep it in a scene."""
        return "" if self.document is None else json.dumps(self.document, separators=(",", ":"))

    def volumeShape(self) -> tuple[int, ...]:
        """``(z, y, x)`` of the volume the document explains."""
        return tuple(int(s) for s in self.document["volume"]["shape"])

    def levels(self) -> list[int]:
        return lmexplanation.levels(self.document)

    def overlayLevel(self, preferred: int) -> int:
        """``preferred`` if the document has it, else its finest level."""
        levels = self.levels()
        return preferred if preferred in levels else levels[-1]

    def findRegion(self, z: int, level: int, row: int, col: int):
        """The region at slice ``z``, ``level``, grid ``row``/``col``; ``None`` if the document has none there."""
        for region in self.regions:
            if (region.z, region.level, region.row, region.col) == (z, level, row, col):
                return region
        return None

    def filteredRegions(
        self,
        word: str = "",
        changedOnly: bool = False,
        minConfidence: float = 0.0,
        sortKey: str = "document",
        descending: bool = False,
    ):
        """Regions matching ``word``, flagged ones only if asked, output top-word probability at least
        ``minConfidence`` (0-1), sorted by ``sortKey`` (see ``LangMambaDenoiseLib.explanation.SORT_KEYS``)."""
        rows = lmexplanation.filter_regions(self.regions, word, changedOnly, min_confidence=minConfidence)
        return lmexplanation.sort_regions(rows, sortKey, descending)

    def summary(self) -> str:
        if self.document is None:
            return "No explanation loaded"
        changed = sum(r.changed for r in self.regions)
        differs = sum(r.top_differs for r in self.regions)
        thresholds = lmexplanation.confidence_thresholds(self.document)
        mean = float(np.mean([r.confidence for r in self.regions])) if self.regions else 0.0
        band = lmexplanation.confidence_band(mean, thresholds)
        return (
            f"{len(self.regions)} regions on {len(self.document['slices'])} slices, level(s) "
            f"{', '.join(map(str, self.levels()))}; {changed} flagged (confident change), top word differs in "
            f"{differs}; mean top-word probability {lmexplanation.format_percent(mean)} "
            f"(uniform {lmexplanation.format_percent(thresholds['uniform'])}: {band})"
        )

    def languageSpaceSummary(self) -> str:
        """Which language space produced the words, how their probabilities were calibrated, what a flag means."""
        if self.document is None:
            return ""
        info = lmexplanation.describe(self.document)
        return (
            f"Words from: {info['language_space']}. Probabilities: {info['calibration']}; uniform over "
            f"{self.document.get('vocabulary_size', '?')} words = {lmexplanation.format_percent(info['uniform'])}. "
            f"Changes: {info['change_rule']}. Document version {info['version']}."
        )

    def labelMap(self, level: int, shape, which: str = "output"):
        """``(labels, colour table)`` of ``level``'s top-1 words on a volume of ``shape`` (z, y, x)."""
        if self.document is None:
            raise ValueError("denoise a volume with explanations first")
        return lmexplanation.label_map(self.document, level, shape, which)

    def exportCSV(self, path: str, rows=None) -> int:
        """Write ``rows`` (default: all regions) as CSV; returns the number of rows."""
        if self.document is None:
            raise ValueError("no explanation to export")
        rows = self.regions if rows is None else list(rows)
        lmexplanation.export_csv(rows, path)
        return len(rows)

    def exportJSON(self, path: str) -> None:
        if self.document is None:
            raise ValueError("no explanation to export")
        lmexplanation.export_json(self.document, path)
