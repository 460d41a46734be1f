"""The self-contained HTML report (langmamba.report) of a denoised, explained volume."""

from __future__ import annotations

import base64
import html
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from langmamba.checkpoint import load_checkpoint
from langmamba.errors import InputError
from langmamba.explain import ChangeRule, confidence_band, format_percent, write_explanation
from langmamba.io.volume import CTVolume
from langmamba.report import MAX_CONFIDENCE_ROWS, MAX_FLAGGED_ROWS, ReportCollector, write_report
from langmamba.runtime import default_weights
from tests.old_checkpoints import old_langmamba


class Page(HTMLParser):
    """Tags of interest: every src/href, the images, and the rows of the flagged-region table."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []
        self.flagged_rows = 0
        self.tags: list[str] = []
        self.confidence_rows: list[list[str]] = []
        self._row: list[str] | None = None
        self._cell: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.links += [attrs[key] for key in ("src", "href") if key in attrs]
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "tr" and attrs.get("class") == "flagged":
            self.flagged_rows += 1
        if tag == "tr" and attrs.get("class") == "confidence":
            self._row = []
        if tag == "td" and self._row is not None:
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td" and self._row is not None:
            self._row.append(self._cell)
            self._cell = None
        if tag == "tr" and self._row is not None:
            self.confidence_rows.append(self._row)
            self._row = None


def phantom_pair():
    """Three 64×80 slices of a body phantom; the "output" has a bright block on slice 2 only."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :80]
    body = ((yy - 32) / 28) ** 2 + ((xx - 40) / 34) ** 2 <= 1
    input_hu = (np.where(body, 40.0, -1000.0)[None] + rng.normal(0, 30, (3, 64, 80))).astype(np.float32)
    output_hu = input_hu.copy()
    output_hu[2, 16:48, 16:48] = 1500.0
    return input_hu, output_hu


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(default_weights())


@pytest.fixture(scope="module")
def explained(model):
    """The phantom pair explained with every change of the top word flagged (the shipped weights' words are
    near uniform, so the default rule flags none; this keeps the flagged-region paths exercised)."""
    input_hu, output_hu = phantom_pair()
    volume = CTVolume(input_hu, spacing=(0.7, 0.8, 2.0))
    collector = ReportCollector(level=2, depth=3)
    document = write_explanation(
        io.StringIO(), model, input_hu, output_hu, volume, on_batch=collector, change_rule=ChangeRule(0.0, 0.0)
    )
    return input_hu, output_hu, collector, document


def test_collector_picks_the_middle_and_the_most_flagged_slices(explained):
    _, _, collector, document = explained
    flagged_per_slice = collector.changed.sum(axis=1)
    assert flagged_per_slice[2] == flagged_per_slice.max() > 0  # the changed slice
    assert collector.changed.sum() == sum(1 for f in document["summary"]["flagged"] if f["level"] == 2)
    assert collector.choose_slices(2) == [1, 2]
    assert collector.choose_slices(5) == [0, 1, 2]
    assert collector.grid == tuple(document["levels"][2]["grid"])


@pytest.mark.slow
def test_report_is_self_contained_html_with_images_and_flagged_rows(explained, tmp_path):
    input_hu, output_hu, collector, document = explained
    images = {z: (input_hu[z], output_hu[z]) for z in collector.choose_slices(2)}
    path = write_report(tmp_path / "report.html", collector, document, images, run_info={"device": "cpu"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # atomic: no staging left
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    page.close()
    assert page.tags[0] == "html" and "body" in page.tags and "table" in page.tags
    assert not [link for link in page.links if link.startswith(("http://", "https://", "//"))]
    assert len(page.images) == 2 * len(images)  # slices + difference, and the word grid, per slice
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    flagged = document["summary"]["flagged_count"]
    assert flagged > 0 and page.flagged_rows == min(flagged, MAX_FLAGGED_ROWS)
    top = max(document["summary"]["flagged"], key=lambda f: f["change_score"])
    assert f"<td>{top['output_word']}</td>" in text and f"{flagged} flagged" in text

    with pytest.raises(Exception, match="exists"):
        write_report(path, collector, document, images)
    write_report(path, collector, document, images, overwrite=True)


def test_report_refuses_an_incomplete_collection(explained, tmp_path):
    input_hu, output_hu, _, document = explained
    partial = ReportCollector(level=2, depth=4)
    with pytest.raises(InputError, match="missed 4 slice"):
        write_report(tmp_path / "r.html", partial, document, {0: (input_hu[0], output_hu[0])})
    with pytest.raises(InputError, match="no region of level 2"):
        partial.choose_slices()


@pytest.fixture(scope="module")
def uniform_model(tmp_path_factory):
    """A LangMamba of the first kind (averaging LangAE, uncalibrated 314-word softmax): its words are near 1 / V,
    as the v0.1 shipped weights' were."""
    return old_langmamba(tmp_path_factory.mktemp("old") / "langmamba")


@pytest.mark.slow
def test_report_names_the_language_space_and_is_honest_about_uniform_words(uniform_model, tmp_path):
    """Words near 1 / V: the default rule flags nothing, the report says the words are close to uniform, shows
    percentages (never 0.00) and lists regions most confident first."""
    model = uniform_model
    input_hu, output_hu = phantom_pair()
    volume = CTVolume(input_hu, spacing=(0.7, 0.8, 2.0))
    collector = ReportCollector(level=1, depth=3)
    vocabulary = model.langae.vocabulary
    classes = {word: "fat" if i % 2 else "soft tissue" for i, word in enumerate(vocabulary[:-1])}  # all but one
    document = write_explanation(
        io.StringIO(), model, input_hu, output_hu, volume, on_batch=collector, word_classes=classes
    )
    assert document["summary"]["flagged_count"] == 0
    assert document["summary"]["levels"][1]["top_word_differs"] > 0  # top words flip, but not confidently
    images = {z: (input_hu[z], output_hu[z]) for z in collector.choose_slices(1)}
    text = write_report(tmp_path / "report.html", collector, document, images).read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    page.close()

    space = document["model"]["language_space"]
    assert space["backend"] == "offline" and space["tissue_supervision"]
    assert f"<td>{space['description']}</td>" in text and "MiniLM" in space["description"]
    uniform = format_percent(1 / document["vocabulary_size"])
    assert "The words are close to uniform" in text and f"= {uniform}" in text
    assert "uncalibrated softmax" in text and html.escape(document["change_rule"]["description"]) in text
    assert not re.search(r">0\.00( %)?<", text)  # no cell rounds a probability to zero

    rows = page.confidence_rows
    assert len(rows) == min(MAX_CONFIDENCE_ROWS, collector.output_top.size)
    shown = [float(row[5].rstrip(" %")) for row in rows]
    assert shown == sorted(shown, reverse=True)
    assert shown[0] == pytest.approx(100 * collector.output_top.max(), abs=0.006)
    assert {row[6] for row in rows} == {"near uniform"} and not any(row[9] for row in rows)
    for row in rows:  # output and input words carry their class where the vocabulary has one
        for cell in (row[4], row[7]):
            word = cell.split(" [")[0]
            assert cell == (f"{word} [{classes[word]}]" if word in classes else word)
    assert f"<td>{vocabulary[-1]} [" not in text


@pytest.mark.slow
def test_report_of_the_shipped_weights_names_their_calibrated_words(model, tmp_path):
    """The shipped residual LangAE has calibrated word probabilities: the report says so, warns of uniform words
    only when they are, and shows each region's confidence band."""
    input_hu, output_hu = phantom_pair()
    collector = ReportCollector(level=1, depth=3)
    volume = CTVolume(input_hu, spacing=(0.7, 0.8, 2.0))
    document = write_explanation(io.StringIO(), model, input_hu, output_hu, volume, on_batch=collector)
    text = write_report(tmp_path / "report.html", collector, document, {1: (input_hu[1], output_hu[1])}).read_text(
        encoding="utf-8"
    )
    page = Page()
    page.feed(text)
    page.close()

    space = document["model"]["language_space"]
    assert f"<td>{space['description']}</td>" in text and space["tissue_supervision"]
    assert model.langae.quantizer.calibrated and document["scores"]["calibration"] == "model"
    assert "uncalibrated softmax" not in text
    thresholds = document["confidence"]
    uniform = confidence_band(float(collector.output_top.mean()), thresholds) == "near uniform"
    assert ("The words are close to uniform" in text) == uniform
    assert not re.search(r">0\.00( %)?<", text)  # no cell rounds a probability to zero
    rows = page.confidence_rows
    assert len(rows) == min(MAX_CONFIDENCE_ROWS, collector.output_top.size)
    for row in rows:
        assert row[6] == confidence_band(float(row[5].rstrip(" %")) / 100, thresholds)
