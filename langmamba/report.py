"""A self-contained HTML report of one denoised, explained CT volume.

The report needs nothing but the file: every picture is a PNG embedded as base64 (matplotlib), the style sheet is
inline, and no script, font or image is fetched from a network. It shows

- the model and run (weights, device, batch size, blend, timings) and the volume (shape, spacing);
- the per-volume summary: regions and flagged (changed top-1 word) regions per pyramid level, and the most
  frequent top-1 words of the output and the input at the chosen level;
- a few representative slices (the middle one and those with the most flagged regions at the chosen level):
  input and output in a CT window with their difference, and the chosen level's word grid drawn over the output
  (cells tinted with the word's colour, the top word written in every cell when the grid has at most
  :data:`MAX_TEXT_COLUMNS` columns, else only in flagged cells; flagged cells outlined in red);
- the flagged regions of all levels, largest change score first (at most :data:`MAX_FLAGGED_ROWS` rows).

:class:`ReportCollector` gathers what the report (and the label map) need while explanations stream (pass it as
``on_batch`` to :func:`langmamba.explain.write_explanation`): a few bytes per region of the chosen level, so it
stays small for thousand-slice volumes. :func:`write_report` writes the file atomically.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .explain import SCALE, ExplainedBatch, word_color
from .io.atomic import atomic_output
from .visualize import CT_WINDOWS

MAX_FLAGGED_ROWS = 200
"""Rows of the flagged-region table; the rest are counted, not listed."""
MAX_TEXT_COLUMNS = 16
"""Word grids with more columns than this name only the flagged cells (the text would not fit otherwise)."""
DIFFERENCE_RANGE_HU = 100.0


class ReportCollector:
    """Per-slice top-1 words, flags and change scores of one pyramid level, filled batch by batch.

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
            rows = slice(batch.start, batch.start + batch.count)
            self.output_ids[rows] = words.output_ids[..., 0]
            self.input_ids[rows] = words.input_ids[..., 0]
            self.changed[rows] = words.changed
            self.scores[rows] = words.change / SCALE
            for i in np.unique(np.concatenate([words.output_ids[..., 0], words.input_ids[..., 0]])).tolist():
                self.words[i] = batch.vocabulary[i]
        self.seen[batch.start:batch.start + batch.count] = True

    def label_map(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, dict[int, str]]:
        """The chosen level's top-1 output words painted as int16 ``vocabulary id + 1`` into a ``shape`` volume
        (what :func:`langmamba.explain.explanation_label_map` gives), and ``label value -> word``."""
        if self.grid is None or not self.seen.all():
            raise InputError("the label map needs the explanations of every slice")
        labels = np.zeros(shape, dtype=np.int16)
        for n, (x0, y0, x1, y1) in enumerate(self.boxes[self.level]):
            labels[:, y0:y1, x0:x1] = (self.output_ids[:, n] + 1)[:, None, None]
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


def _overlay_figure(collector: ReportCollector, z: int, image: np.ndarray, window: tuple[float, float],
                    aspect: float):
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
    font = max(3.0, min(9.0, 110.0 / columns))
    for n, (x0, y0, x1, y1) in enumerate(boxes):
        word = collector.words[int(collector.output_ids[z, n])]
        colour = tuple(c / 255 for c in word_color(word))
        flagged = bool(collector.changed[z, n])
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, facecolor=colour, alpha=0.3,
                               edgecolor="white", linewidth=0.3))
        if flagged:
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red",
                                   linewidth=1.6))
        if label_all or flagged:
            ax.text((x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5, word, ha="center", va="center", fontsize=font,
                    color="white", clip_on=True)
    ax.set_axis_off()
    ax.set_title(f"slice {z}: level {collector.level} words of the output (red: flagged)", fontsize=10)
    fig.tight_layout()
    return fig


def _table(header: list[str], rows: list[list[Any]], row_class: str | None = None) -> str:
    cls = f' class="{row_class}"' if row_class else ""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: left; }
th { background: #eee; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
"""


def _slice_figures(collector: ReportCollector, images: dict[int, tuple[np.ndarray, np.ndarray]],
                   spacing: tuple[float, float, float], window: tuple[float, float]) -> list[str]:
    from .visualize import comparison_figure

    aspect = spacing[1] / spacing[0]  # row / column pixel size
    parts = []
    for z in sorted(images):
        before, after = images[z]
        flagged = int(collector.changed[z].sum())
        fig = comparison_figure([("input", before), ("denoised", after)], window=window, difference=(1, 0),
                                difference_range_hu=DIFFERENCE_RANGE_HU, spacing_mm=(spacing[1], spacing[0]),
                                title=f"slice {z}, window [{window[0]:g}, {window[1]:g}] HU")
        overlay = _overlay_figure(collector, z, after, window, aspect)
        parts.append(
            f'<h3>Slice {z} <span class="note">({flagged} flagged region(s) at level {collector.level})</span></h3>'
            f'<img class="slices" alt="slice {z}: input, denoised, difference" src="{_png(fig)}">'
            f'<img class="overlay" alt="slice {z}: word grid" src="{_png(overlay)}">'
        )
    return parts


def _flagged_rows(collector: ReportCollector, flagged: list[dict]) -> list[list[Any]]:
    rows = []
    for flag in sorted(flagged, key=lambda f: (-f["change_score"], f["z"], f["level"], f["row"], f["col"]))[
        :MAX_FLAGGED_ROWS
    ]:
        boxes = collector.boxes.get(flag["level"])
        box = "" if boxes is None else _box_text(boxes, flag)
        rows.append([flag["z"], flag["level"], flag["row"], flag["col"], box, flag["input_word"],
                     flag["output_word"], f"{flag['change_score']:.3f}"])
    return rows


def _box_text(boxes: np.ndarray, flag: dict) -> str:
    columns = int((boxes[:, 1] == boxes[0, 1]).sum())
    x0, y0, x1, y1 = boxes[flag["row"] * columns + flag["col"]]
    return f"x {x0}–{x1}, y {y0}–{y1}"


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

    run_rows = [["model class", model["class"]], ["language space", f"{model['vlm_backend']} ({model['vlm_id']})"],
                ["langmamba version", model["langmamba_version"]],
                *[[f"checkpoint {k}", v] for k, v in model["checkpoint_extra"].items()],
                *[[k, v] for k, v in (run_info or {}).items()],
                ["volume shape (Z, Y, X)", " × ".join(str(s) for s in volume["shape"])],
                ["spacing (x, y, z) mm", ", ".join(f"{s:g}" for s in spacing)],
                ["vocabulary size", document["vocabulary_size"]], ["top-k words per region", document["top_k"]],
                ["report written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")]]
    level_rows = [[s["level"], s["regions"], s["changed"], f"{100 * s['changed_fraction']:.1f}%",
                   f"{s['mean_change_score']:.3f}"] for s in summary["levels"]]
    chosen = next((s for s in summary["levels"] if s["level"] == collector.level), None)
    word_rows = []
    if chosen is not None:
        out_words = list(chosen["word_frequencies"]["output"].items())[:15]
        in_counts = chosen["word_frequencies"]["input"]
        word_rows = [[word, count, in_counts.get(word, 0)] for word, count in out_words]
    flagged_rows = _flagged_rows(collector, summary["flagged"])
    more = summary["flagged_count"] - len(flagged_rows)

    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Model and run</h2>", _table(["", ""], run_rows),
        "<h2>Summary</h2>",
        f"<p>{summary['regions']} regions explained, <b>{summary['flagged_count']} flagged</b> (the denoised "
        "image's top word differs from the input's).</p>",
        _table(["level", "regions", "flagged", "flagged share", "mean change score"], level_rows),
        f"<h3>Most frequent top-1 words, level {collector.level}</h3>",
        _table(["word", "output regions", "input regions"], word_rows),
        "<h2>Representative slices</h2>",
        f'<p class="note">Input and denoised in the window [{window[0]:g}, {window[1]:g}] HU; difference '
        f"denoised − input in ±{DIFFERENCE_RANGE_HU:g} HU. Word grid: cells tinted by their top word; "
        f"{'every' if collector.grid[1] <= MAX_TEXT_COLUMNS else 'flagged'} cells named; flagged cells "
        "outlined in red.</p>",
        *_slice_figures(collector, images, spacing, window),
        "<h2>Flagged regions</h2>",
        '<p class="note">Largest change score first; voxel boxes are half-open column (x) and row (y) ranges.'
        + (f" {more} more not listed." if more > 0 else "") + "</p>",
        _table(["z", "level", "row", "col", "voxel box", "input word", "output word", "change score"],
               flagged_rows, row_class="flagged"),
        "</body></html>",
    ]
    with atomic_output(path, as_folder=False, overwrite=overwrite) as staging:
        (staging / path.name).write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
