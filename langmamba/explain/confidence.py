"""How confident a region's top word is: the uniform probability ``1 / V``, the bands, and percentages for people.

:func:`confidence_thresholds` gives the document's ``confidence`` entry (the uniform probability and the bounds
of the bands ``near uniform``, below ``NEAR_UNIFORM_FACTOR / V``, ``low`` and ``confident``, from
:data:`CONFIDENT_PROBABILITY`); :func:`confidence_band` sorts a top-word probability into them and
:func:`format_percent` writes one so that a small probability never reads "0.00". The explainer, the HTML report
and the Slicer browser all read words this way. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping

CONFIDENT_PROBABILITY = 0.5
"""A top-word probability from which a region's reading counts as confident (band ``"confident"``)."""
NEAR_UNIFORM_FACTOR = 10.0
"""A top-word probability below ``NEAR_UNIFORM_FACTOR / V`` (3.2 % for 314 words; at most half of
:data:`CONFIDENT_PROBABILITY`) is within ten times the uniform ``1 / V``: the words carry next to no information
(band ``"near uniform"``)."""
BANDS = ("near uniform", "low", "confident")
"""The confidence bands of :func:`confidence_band`, least confident first."""


def confidence_thresholds(vocabulary_size: int) -> dict[str, float]:
    """The document's ``confidence`` entry: the uniform probability ``1 / V`` and the bands' bounds."""
    uniform = 1.0 / vocabulary_size
    return {
        "uniform": round(uniform, 8),
        "near_uniform_below": round(min(NEAR_UNIFORM_FACTOR * uniform, CONFIDENT_PROBABILITY / 2), 8),
        "confident_from": CONFIDENT_PROBABILITY,
    }


def confidence_band(probability: float, thresholds: Mapping[str, float]) -> str:
    """``"near uniform"``, ``"low"`` or ``"confident"``: where a top-word ``probability`` lies among the
    ``thresholds`` of :func:`confidence_thresholds`."""
    if probability < thresholds["near_uniform_below"]:
        return "near uniform"
    return "confident" if probability >= thresholds["confident_from"] else "low"


def format_percent(probability: float) -> str:
    """A probability as a percentage that never hides a small one: ``"87.3 %"``, ``"0.43 %"``, ``"< 0.01 %"``
    (the document keeps 4 decimals, so 0.01 % is its resolution)."""
    percent = 100.0 * float(probability)
    if percent <= 0.0:
        return "< 0.01 %"
    if percent < 1.0:
        return f"{percent:.2f} %"
    text = f"{percent:.1f}"
    return "> 99.9 %" if text == "100.0" and percent < 100.0 else f"{text} %"
