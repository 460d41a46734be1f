"""The self-contained HTML report (langmamba.report) of a denoised, explained volume."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import numpy as np
import pytest

from langmamba.checkpoint import load_checkpoint
from langmamba.denoise import default_weights
from langmamba.errors import InputError
from langmamba.explain import write_explanation
from langmamba.io.volume import CTVolume
from langmamba.report import MAX_FLAGGED_ROWS, ReportCollector, write_report


class Page(HTMLParser):
    """Tags of interest: every src/href, the images, and the rows of the flagged-region table."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []
        self.flagged_rows = 0
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.links += [attrs[key] for key in ("src", "href") if key in attrs]
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "tr" and attrs.get("class") == "flagged":
            self.flagged_rows += 1


@pytest.fixture(scope="module")
def explained():
    """Three 64×80 slices of a body phantom; the "output" has a bright block on slice 2 only."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :80]
    body = ((yy - 32) / 28) ** 2 + ((xx - 40) / 34) ** 2 <= 1
    input_hu = (np.where(body, 40.0, -1000.0)[None] + rng.normal(0, 30, (3, 64, 80))).astype(np.float32)
    output_hu = input_hu.copy()
    output_hu[2, 16:48, 16:48] = 1500.0
    volume = CTVolume(input_hu, spacing=(0.7, 0.8, 2.0))
    model = load_checkpoint(default_weights())
    collector = ReportCollector(level=2, depth=3)
    document = write_explanation(io.StringIO(), model, input_hu, output_hu, volume, on_batch=collector)
    return input_hu, output_hu, collector, document


def test_collector_picks_the_middle_and_the_most_flagged_slices(explained):
    _, _, collector, document = explained
    flagged_per_slice = collector.changed.sum(axis=1)
    assert flagged_per_slice[2] == flagged_per_slice.max() > 0  # the changed slice
    assert collector.changed.sum() == sum(1 for f in document["summary"]["flagged"] if f["level"] == 2)
    assert collector.choose_slices(2) == [1, 2]
    assert collector.choose_slices(5) == [0, 1, 2]
    assert collector.grid == tuple(document["levels"][2]["grid"])


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
