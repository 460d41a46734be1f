"""A self-contained HTML report of one denoised, explained CT volume.

The report needs nothing but the file: every picture is a PNG embedded as base64 (matplotlib), the style sheet is
inline, and no script, font or image is fetched from a network. It shows

- the model and run (weights, device, batch size, blend, timings), the language space that produced the words,
  how their probabilities were calibrated and the uniform probability ``1 / V`` beside them, the change rule,
  and the volume (shape, spacing);
- a warning when the words are close to uniform (mean top-word probability in the "near uniform" band);
- the per-volume summary per pyramid level: regions, regions whose top word differs, flagged regions (confident
  changes, :class:`langmamba.explain.ChangeRule`), mean top-word probability and regions per confidence band;
  the most frequent top-1 words of the output and the input at the chosen level, with their tissue class and
  mean probability;
- a few representative slices (the middle one and those with the most flagged regions at the chosen level):
  input and output in a CT window with their difference, and the chosen level's word grid drawn over the output
  (cells tinted with the word's colour, the top word written in every cell when the grid has at most
  :data:`MAX_TEXT_COLUMNS` columns, else only in flagged cells; flagged cells outlined in red);
- the chosen level's regions sorted by the output's top-word probability, most confident first (at most
  :data:`MAX_CONFIDENCE_ROWS` rows), with their band;
- the flagged regions of all levels, largest change score first (at most :data:`MAX_FLAGGED_ROWS` rows), with
  both top-word probabilities.

Probabilities are shown as percentages (:func:`langmamba.explain.format_percent`: ``"0.43 %"``, never
``"0.00"``).

:class:`ReportCollector` gathers what the report (and the label map) need while explanations stream (pass it as
``on_batch`` to :func:`langmamba.explain.write_explanation`): a few bytes per region of the chosen level, so it
stays small for thousand-slice volumes. :func:`write_report` writes the file atomically.
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .explain.confidence import confidence_band, format_percent
from .explain.labels import paint_regions, word_color
from .explain.types import SCALE, ExplainedBatch
from .io.atomic import atomic_output
from .visualize import CT_WINDOWS

MAX_FLAGGED_ROWS = 200
"""Rows of the flagged-region table; the rest are counted, not listed."""
MAX_CONFIDENCE_ROWS = 100
"""Rows of the regions-by-confidence table."""
MAX_TEXT_COLUMNS = 16
"""Word grids with more columns than this name only the flagged cells (the text would not fit otherwise)."""
DIFFERENCE_RANGE_HU = 100.0


class ReportCollector:
    """Per-slice top-1 words with their probabilities, flags and change scores of one pyramid level, filled
    batch by batch.

    Call it with every :class:`langmamba.explain.ExplainedBatch` of an explanation (``on_batch`` of
    :func:`langmamba.explain.write_explanation`). Arrays are ``(Z, cells)`` with cells in row-major grid order;
    ``boxes[level]`` is ``(cells, 4)`` voxel boxes ``x0, y0, x1, y1`` (half-open) of every explained level.
    """

    def __init__(self, level: int, depth: int) -> None:
        if depth < 1:
            raise InputError(f"a report needs at least one slice, got {depth}")
        self.level = int(level)
        self.depth = int(depth)
        self.grid: tuple[int, int] | None = None
        self.boxes: dict[int, np.ndarray] = {}
        self.words: dict[int, str] = {}
        self.output_ids = self.input_ids = self.changed = self.scores = None
        self.output_top = self.input_top = None
        self.seen = np.zeros(depth, dtype=bool)

    def __call__(self, batch: ExplainedBatch) -> None:
        if not self.boxes:  # every batch of one explanation carries the same boxes
            self.boxes = {level: boxes.astype(np.int32) for level, boxes in batch.boxes.items()}
        for words in batch.levels:
            if words.level != self.level:
                continue
            if self.grid is None:
                self.grid = batch.grids[self.level]
                cells = words.change.shape[1]
                self.output_ids = np.zeros((self.depth, cells), dtype=np.int32)
                self.input_ids = np.zeros((self.depth, cells), dtype=np.int32)
                self.changed = np.zeros((self.depth, cells), dtype=bool)
                self.scores = np.zeros((self.depth, cells), dtype=np.float32)
                self.output_top = np.zeros((self.depth, cells), dtype=np.float32)
                self.input_top = np.zeros((self.depth, cells), dtype=np.float32)
            rows = slice(batch.start, batch.start + batch.count)
            self.output_ids[rows] = words.output_ids[..., 0]
            self.input_ids[rows] = words.input_ids[..., 0]
            self.changed[rows] = words.changed
            self.scores[rows] = words.change / SCALE
            self.output_top[rows] = words.output_scores[..., 0] / SCALE
            self.input_top[rows] = words.input_scores[..., 0] / SCALE
            for i in np.unique(np.concatenate([words.output_ids[..., 0], words.input_ids[..., 0]])).tolist():
                self.words[i] = batch.vocabulary[i]
        self.seen[batch.start : batch.start + batch.count] = True

    def label_map(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, dict[int, str]]:
        """The chosen level's top-1 output words painted as int16 ``vocabulary id + 1`` into a ``shape`` volume
        (what :func:`langmamba.explain.explanation_label_map` gives), and ``label value -> word``."""
        if self.grid is None or not self.seen.all():
            raise InputError("the label map needs the explanations of every slice")
        labels = np.zeros(shape, dtype=np.int16)
        paint_regions(labels, self.boxes[self.level], self.output_ids + 1)
        return labels, {int(i) + 1: self.words[int(i)] for i in np.unique(self.output_ids)}

    def choose_slices(self, count: int = 3) -> list[int]:
        """The middle slice and the slices with the most flagged regions (ties: lower z), sorted, distinct."""
        if self.grid is None:
            raise InputError(f"the explanations held no region of level {self.level}; nothing to report")
        chosen = [self.depth // 2]
        for z in np.argsort(-self.changed.sum(axis=1), kind="stable"):
            if len(chosen) >= min(count, self.depth):
                break
            if int(z) not in chosen:
                chosen.append(int(z))
        return sorted(chosen)


def _png(fig) -> str:
    """The figure as a base64 PNG data URI; closes the figure."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _overlay_figure(collector: ReportCollector, z: int, image: np.ndarray, window: tuple[float, float], aspect: float):
    """The output slice ``image`` (H, W) in HU with the chosen level's word grid of slice ``z`` drawn over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(7.5, 7.5 * aspect * image.shape[0] / image.shape[1]))
    ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
    boxes = collector.boxes[collector.level]
    columns = collector.grid[1]
    label_all = columns <= MAX_TEXT_COLUMNS
    font = max(3.0, min(9.0, 56.0 / columns))
    for n, (x0, y0, x1, y1) in enumerate(boxes):
        word = collector.words[int(collector.output_ids[z, n])]
        colour = tuple(c / 255 for c in word_color(word))
        flagged = bool(collector.changed[z, n])
        ax.add_patch(
            Rectangle(
                (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, facecolor=colour, alpha=0.3, edgecolor="white", linewidth=0.3
            )
        )
        if flagged:
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=1.6))
        if label_all or flagged:
            text = f"{textwrap.fill(word, 14)}\n{format_percent(collector.output_top[z, n])}" if label_all else word
            ax.text(
                (x0 + x1) / 2 - 0.5,
                (y0 + y1) / 2 - 0.5,
                text,
                ha="center",
                va="center",
                fontsize=font,
                color="white",
                clip_on=True,
            )
    ax.set_axis_off()
    ax.set_title(
        f"slice {z}: level {collector.level} words of the output with their probability (red: flagged)", fontsize=10
    )
    fig.tight_layout()
    return fig


class Badge(str):
    """A confidence band, written as a coloured badge in a table cell."""


def _cell(value: Any) -> str:
    if isinstance(value, Badge):
        return f'<td><span class="badge {value.replace(" ", "-")}">{html.escape(value)}</span></td>'
    return f"<td>{html.escape(str(value))}</td>"


def _table(header: list[str], rows: list[list[Any]], row_class: str | None = None) -> str:
    cls = f' class="{row_class}"' if row_class else ""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(f"<tr{cls}>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: left; }
th { background: #eee; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
.warning { background: #fff3e0; border-left: 4px solid #ef6c00; padding: 0.5em 1em; max-width: 60em; }
.badge { border-radius: 0.7em; padding: 0 0.5em; font-size: 0.85em; white-space: nowrap; }
.near-uniform { background: #eeeeee; color: #555; }
.low { background: #fff3e0; color: #e65100; }
.confident { background: #e8f5e9; color: #1b5e20; }
"""


def _slice_figures(
    collector: ReportCollector,
    images: dict[int, tuple[np.ndarray, np.ndarray]],
    spacing: tuple[float, float, float],
    window: tuple[float, float],
) -> list[str]:
    from .visualize import comparison_figure

    aspect = spacing[1] / spacing[0]  # row / column pixel size
    parts = []
    for z in sorted(images):
        before, after = images[z]
        flagged = int(collector.changed[z].sum())
        fig = comparison_figure(
            [("input", before), ("denoised", after)],
            window=window,
            difference=(1, 0),
            difference_range_hu=DIFFERENCE_RANGE_HU,
            spacing_mm=(spacing[1], spacing[0]),
            title=f"slice {z}, window [{window[0]:g}, {window[1]:g}] HU",
        )
        overlay = _overlay_figure(collector, z, after, window, aspect)
        parts.append(
            f'<h3>Slice {z} <span class="note">({flagged} flagged region(s) at level {collector.level})</span></h3>'
            f'<img class="slices" alt="slice {z}: input, denoised, difference" src="{_png(fig)}">'
            f'<img class="overlay" alt="slice {z}: word grid" src="{_png(overlay)}">'
        )
    return parts


def _flagged_rows(collector: ReportCollector, flagged: list[dict], classes: dict[str, str]) -> list[list[Any]]:
    rows = []
    for flag in sorted(flagged, key=lambda f: (-f["change_score"], f["z"], f["level"], f["row"], f["col"]))[
        :MAX_FLAGGED_ROWS
    ]:
        boxes = collector.boxes.get(flag["level"])
        box = "" if boxes is None else _box_text(boxes, flag["row"], flag["col"])
        rows.append(
            [
                flag["z"],
                flag["level"],
                flag["row"],
                flag["col"],
                box,
                _word_text(flag["input_word"], classes),
                format_percent(flag["input_score"]),
                _word_text(flag["output_word"], classes),
                format_percent(flag["output_score"]),
                f"{flag['change_score']:.3f}",
            ]
        )
    return rows


def _box_text(boxes: np.ndarray, row: int, col: int) -> str:
    columns = int((boxes[:, 1] == boxes[0, 1]).sum())
    x0, y0, x1, y1 = boxes[row * columns + col]
    return f"x {x0}–{x1}, y {y0}–{y1}"


def _word_text(word: str, classes: dict[str, str]) -> str:
    """``word``, with its tissue class in brackets when the vocabulary has one."""
    return f"{word} [{classes[word]}]" if word in classes else word


def _confidence_rows(collector: ReportCollector, thresholds: dict, classes: dict[str, str]) -> list[list[Any]]:
    """The chosen level's regions, most probable output top word first (ties: lower z, row-major)."""
    flat = collector.output_top.ravel()
    order = np.lexsort((np.arange(flat.size), -flat))[:MAX_CONFIDENCE_ROWS]
    columns = collector.grid[1]
    rows = []
    for index in order.tolist():
        z, n = divmod(index, flat.size // collector.depth)
        row, col = divmod(n, columns)
        rows.append(
            [
                z,
                row,
                col,
                _box_text(collector.boxes[collector.level], row, col),
                _word_text(collector.words[int(collector.output_ids[z, n])], classes),
                format_percent(collector.output_top[z, n]),
                Badge(confidence_band(float(collector.output_top[z, n]), thresholds)),
                _word_text(collector.words[int(collector.input_ids[z, n])], classes),
                format_percent(collector.input_top[z, n]),
                "yes" if collector.changed[z, n] else "",
            ]
        )
    return rows


def _word_rows(collector: ReportCollector, chosen: dict, classes: dict[str, str]) -> list[list[Any]]:
    """The most frequent top-1 output words of the chosen level with their class and mean probability."""
    ids = {word: i for i, word in collector.words.items()}
    in_counts = chosen["word_frequencies"]["input"]
    rows = []
    for word, count in list(chosen["word_frequencies"]["output"].items())[:15]:
        mask = collector.output_ids == ids.get(word, -1)
        mean = format_percent(float(collector.output_top[mask].mean())) if mask.any() else ""
        rows.append([word, classes.get(word, "–"), count, mean, in_counts.get(word, 0)])
    return rows


def _language_rows(document: dict) -> list[list[Any]]:
    """Rows naming the language space, the score calibration and the change rule."""
    space = document["model"]["language_space"]
    scores, confidence, rule = document["scores"], document["confidence"], document["change_rule"]
    calibration = {
        "none": "uncalibrated softmax of negative squared distances (temperature 1)",
        "logit_scale": f"softmax with logit scale {scores['logit_scale']}",
        "model": "the model's calibrated word probabilities",
    }[scores["calibration"]]
    return [
        ["language space", space["description"]],
        [
            "word probabilities",
            f"{calibration}; uniform over {document['vocabulary_size']} words = "
            f"{format_percent(confidence['uniform'])}",
        ],
        [
            "confidence bands",
            f"near uniform below {format_percent(confidence['near_uniform_below'])}, "
            f"confident from {format_percent(confidence['confident_from'])}",
        ],
        ["change rule", rule["description"]],
    ]


def write_report(
    path: str | Path,
    collector: ReportCollector,
    document: dict,
    images: dict[int, tuple[np.ndarray, np.ndarray]],
    *,
    title: str = "LangMamba denoising report",
    run_info: dict[str, Any] | None = None,
    window: tuple[float, float] = CT_WINDOWS["soft tissue"],
    overwrite: bool = False,
) -> Path:
    """Write the HTML report atomically.

    Args:
        path: the ``.html`` file to write.
        collector: filled by the explanation run (every slice seen).
        document: the explanation document without slices (what :func:`langmamba.explain.write_explanation`
            returns: header and summary).
        images: ``{z: (input, output)}`` slices ``(Y, X)`` in HU to show, e.g. for
            :meth:`ReportCollector.choose_slices`.
        title: heading of the page.
        run_info: extra ``name -> value`` rows for the run table (weights, device, timings ...).
        window: CT display window ``(low, high)`` in HU.
        overwrite: replace an existing report.
    """
    path = Path(path)
    if not collector.seen.all():
        missing = int((~collector.seen).sum())
        raise InputError(f"the report's collector missed {missing} slice(s); run the explanations to the end")
    if not images:
        raise InputError("a report needs at least one slice image")
    summary, volume, model = document["summary"], document["volume"], document["model"]
    spacing = tuple(volume["spacing"])

    thresholds = document["confidence"]
    classes = document.get("word_classes") or {}
    run_rows = [
        ["model class", model["class"]],
        *_language_rows(document),
        ["langmamba version", model["langmamba_version"]],
        *[[f"checkpoint {k}", v] for k, v in model["checkpoint_extra"].items()],
        *[[k, v] for k, v in (run_info or {}).items()],
        ["volume shape (Z, Y, X)", " × ".join(str(s) for s in volume["shape"])],
        ["spacing (x, y, z) mm", ", ".join(f"{s:g}" for s in spacing)],
        ["vocabulary size", document["vocabulary_size"]],
        ["top-k words per region", document["top_k"]],
        ["report written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")],
    ]
    level_rows = [
        [
            s["level"],
            s["regions"],
            s["top_word_differs"],
            s["changed"],
            f"{100 * s['changed_fraction']:.1f}%",
            format_percent(s["mean_top_score"]["output"]),
            format_percent(s["mean_top_score"]["input"]),
            *(s["output_confidence"][band] for band in ("near uniform", "low", "confident")),
            f"{s['mean_change_score']:.3f}",
        ]
        for s in summary["levels"]
    ]
    chosen = next((s for s in summary["levels"] if s["level"] == collector.level), None)
    word_rows = [] if chosen is None else _word_rows(collector, chosen, classes)
    flagged_rows = _flagged_rows(collector, summary["flagged"], classes)
    more = summary["flagged_count"] - len(flagged_rows)
    mean_top = float(collector.output_top.mean())
    warning = ""
    if confidence_band(mean_top, thresholds) == "near uniform":
        warning = (
            f'<p class="warning"><b>The words are close to uniform.</b> At level {collector.level} the '
            f"output's top word has a mean probability of {format_percent(mean_top)}, against "
            f"{format_percent(thresholds['uniform'])} for a uniform guess over "
            f"{document['vocabulary_size']} words: the words carry next to no information about the "
            "regions. Read them as uninformative.</p>"
        )

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        warning,
        "<h2>Model and run</h2>",
        _table(["", ""], run_rows),
        "<h2>Summary</h2>",
        f"<p>{summary['regions']} regions explained, <b>{summary['flagged_count']} flagged</b> (the denoised "
        "image's top word differs from the input's, confidently by the change rule).</p>",
        _table(
            [
                "level",
                "regions",
                "top word differs",
                "flagged",
                "flagged share",
                "mean top-word probability",
                "input mean top-word probability",
                "near uniform",
                "low",
                "confident",
                "mean change score",
            ],
            level_rows,
        ),
        f"<h3>Most frequent top-1 words, level {collector.level}</h3>",
        _table(["word", "tissue class", "output regions", "mean probability", "input regions"], word_rows),
        "<h2>Representative slices</h2>",
        f'<p class="note">Input and denoised in the window [{window[0]:g}, {window[1]:g}] HU; difference '
        f"denoised − input in ±{DIFFERENCE_RANGE_HU:g} HU. Word grid: cells tinted by their top word; "
        f"{'every cell named with its probability' if collector.grid[1] <= MAX_TEXT_COLUMNS else 'flagged cells named'}"
        "; flagged cells outlined in red.</p>",
        *_slice_figures(collector, images, spacing, window),
        f"<h2>Regions by confidence, level {collector.level}</h2>",
        f'<p class="note">The output\'s top-word probability, most confident first; {collector.output_top.size} '
        f"regions, {min(MAX_CONFIDENCE_ROWS, collector.output_top.size)} listed. Uniform = "
        f"{format_percent(thresholds['uniform'])}.</p>",
        _table(
            [
                "z",
                "row",
                "col",
                "voxel box",
                "output word",
                "probability",
                "confidence",
                "input word",
                "input probability",
                "flagged",
            ],
            _confidence_rows(collector, thresholds, classes),
            row_class="confidence",
        ),
        "<h2>Flagged regions</h2>",
        '<p class="note">Largest change score first; voxel boxes are half-open column (x) and row (y) ranges.'
        + (f" {more} more not listed." if more > 0 else "")
        + "</p>",
        _table(
            [
                "z",
                "level",
                "row",
                "col",
                "voxel box",
                "input word",
                "input probability",
                "output word",
                "output probability",
                "change score",
            ],
            flagged_rows,
            row_class="flagged",
        ),
        "</body></html>",
    ]
    with atomic_output(path, as_folder=False, overwrite=overwrite) as staging:
        (staging / path.name).write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
