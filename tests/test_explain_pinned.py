"""The explanation outputs pinned byte for byte: the streamed JSON document, the in-memory document, the label
maps, the colour table and the report's HTML of one fixed run.

The files under ``tests/data/explain_pinned/`` were written by the single-module ``langmamba/explain.py`` before
it became the ``langmamba.explain`` package, so this test holds the package to the same output. A deliberate
format change regenerates them with ``python tests/test_explain_pinned.py`` (and bumps the schema version when
the document changes). The report's embedded PNGs and its timestamp are left out of the pin (matplotlib's and
the clock's, not ours); everything else in the page is compared.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

from langmamba.explain import (
    ChangeRule,
    color_table,
    explain_volume,
    explanation_label_map,
    validate_explanation,
    write_color_table,
    write_explanation,
)
from langmamba.io.volume import CTVolume
from langmamba.models.langae import LangAE
from langmamba.report import ReportCollector, write_report

PINNED = Path(__file__).resolve().parent / "data" / "explain_pinned"
WORDS = [
    "lung",
    "soft tissue",
    "bone",
    "air",
    "fat",
    "liver",
    "heart",
    "aorta",
    "vessel",
    "nodule",
    "pleural effusion",
    "rib",
    "spine",
    "muscle",
    "noise",
    "streak artifact",
]
CLASSES = [
    "lung",
    "soft tissue",
    "bone",
    "air",
    "fat",
    "soft tissue",
    "soft tissue",
    "enhanced vessel",
    "enhanced vessel",
    "structure",
    "fluid",
    "bone",
    "bone",
    "soft tissue",
    "structure",
    "structure",
]
SHAPE = (3, 40, 56)  # not multiples of 16: the slices are padded before encoding
# LPS directions of the x, y, z array axes: a flipped, non-axial geometry, so mm corners are not trivial.
DIRECTION = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def pinned_run(folder: Path) -> dict[str, bytes]:
    """Run the explainer, the label painters and the report once on fixed inputs; every output as bytes."""
    torch.manual_seed(0)
    model = LangAE(
        base_channels=8,
        z_channels=8,
        resolution=64,
        codebook=torch.randn(len(WORDS), 16),
        vocabulary=WORDS,
        vlm_backend="offline",
        vlm_id="all-MiniLM-L6-v2",
    ).eval()
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    body = ((yy - 20) / 17.0) ** 2 + ((xx - 28) / 24.0) ** 2 <= 1
    input_hu = (np.where(body, 40.0, -1000.0)[None] + rng.normal(0.0, 80.0, SHAPE)).astype(np.float32)
    output_hu = input_hu.copy()
    output_hu[:, 8:24, 16:40] = np.linspace(-800.0, 1500.0, 24, dtype=np.float32)
    volume = CTVolume(hu=input_hu, spacing=(0.7, 0.8, 2.5), origin=(-120.0, 85.5, 40.0), direction=DIRECTION)
    options = dict(levels=(0, 1, 2), top_k=3, batch_size=2, change_rule=ChangeRule(0.05, 0.0), word_classes=CLASSES)

    collector = ReportCollector(level=2, depth=SHAPE[0])
    head = write_explanation(
        folder / "explanation.json", model, input_hu, output_hu, volume, on_batch=collector, **options
    )
    document = explain_volume(model, input_hu, output_hu, volume, **options)
    labels, table = explanation_label_map(document, 2, SHAPE)
    input_labels, _ = explanation_label_map(document, 1, SHAPE, "input")
    collected, words = collector.label_map(SHAPE)
    write_color_table(table, folder / "words.ctbl")
    write_color_table(color_table(words), folder / "collected.ctbl")
    images = {z: (input_hu[z], output_hu[z]) for z in collector.choose_slices(2)}
    write_report(folder / "report.html", collector, head, images, run_info={"weights": "pinned", "device": "cpu"})
    report = (folder / "report.html").read_text(encoding="utf-8")
    report = re.sub(r'src="data:image/png;base64,[A-Za-z0-9+/=]*"', 'src="data:image/png;base64,PNG"', report)
    report = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "YYYY-MM-DD HH:MM UTC", report)
    arrays = {"labels": labels, "input_labels": input_labels, "collected": collected}
    return {
        "explanation.json": (folder / "explanation.json").read_bytes(),
        "document.json": json.dumps(document).encode("utf-8"),
        "head.json": json.dumps(head).encode("utf-8"),
        "words.ctbl": (folder / "words.ctbl").read_bytes(),
        "collected.ctbl": (folder / "collected.ctbl").read_bytes(),
        "labels.json": json.dumps(
            {
                name: [str(a.dtype), list(a.shape), hashlib.sha256(a.tobytes()).hexdigest()]
                for name, a in arrays.items()
            },
            indent=1,
        ).encode("utf-8"),
        "report.html": report.encode("utf-8"),
    }


def test_outputs_equal_the_pinned_ones(tmp_path):
    outputs = pinned_run(tmp_path)
    validate_explanation(json.loads(outputs["explanation.json"]))
    assert sorted(path.name for path in PINNED.iterdir()) == sorted(outputs)
    for name, data in outputs.items():
        assert data == (PINNED / name).read_bytes(), f"{name} differs from the pinned output"


if __name__ == "__main__":  # regenerate the pinned files after a deliberate format change
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        PINNED.mkdir(parents=True, exist_ok=True)
        for name, data in pinned_run(Path(scratch)).items():
            (PINNED / name).write_bytes(data)
    sys.exit(0)
