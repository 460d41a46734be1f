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
from langmamba.errors import InputError, NonFiniteVoxelsError
from langmamba.explain import (
    explain_volume,
    explanation_label_map,
    load_schema,
    validate_explanation,
    word_color,
    write_color_table,
    write_explanation,
)
from langmamba.io.volume import CTVolume
from langmamba.models.langae import LangAE
from langmamba.models.quantizer import word_scores
from langmamba.models.seed import LangMamba
from langmamba.normalization import hu_to_model

WORDS = [
    "lung", "soft tissue", "bone", "air", "fat", "liver", "heart", "aorta", "vessel", "nodule",
    "pleural effusion", "rib", "spine", "muscle", "noise", "streak artifact", "trachea", "kidney", "edge",
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
    langae = LangAE(base_channels=8, z_channels=8, resolution=64, codebook=torch.randn(len(WORDS), DIM),
                    vocabulary=WORDS, vlm_backend="test-backend", vlm_id="test/vlm")
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
    assert (doc["schema"], doc["version"]) == ("langmamba-explanations", "1.0")
    assert doc["vocabulary_size"] == len(WORDS) and doc["top_k"] == 3
    assert doc["model"]["class"] == "LangMamba" and not doc["model"]["from_checkpoint"]
    assert (doc["model"]["vlm_backend"], doc["model"]["vlm_id"]) == ("test-backend", "test/vlm")
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
                cover[box["z"], box["y0"]:box["y1"], box["x0"]:box["x1"]] += 1
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
    changed_count = unchanged_count = 0
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
            assert region["changed"] == (top_out != top_in)
            if top_out != top_in:
                expected_flags.add((z, level, row, col))
                assert region["change_score"] > 0
            changed_count += top_out != top_in
            unchanged_count += top_out == top_in

            # Change score: TVD of both full-vocabulary softmaxes restricted to the union of the top-3 sets.
            union = sorted(set(region["output"]["ids"]) | set(region["input"]["ids"]))
            p = torch.softmax(-((codebook - q_out.region_latents[level][z, row, col]) ** 2).sum(-1), 0)[union]
            r = torch.softmax(-((codebook - q_in.region_latents[level][z, row, col]) ** 2).sum(-1), 0)[union]
            tvd = 0.5 * (p / p.sum() - r / r.sum()).abs().sum().item()
            assert region["change_score"] == pytest.approx(tvd, abs=2e-4)
    assert changed_count > 0 and unchanged_count > 0  # the case exercises both outcomes

    summary = doc["summary"]
    assert {(f["z"], f["level"], f["row"], f["col"]) for f in summary["flagged"]} == expected_flags
    assert summary["flagged_count"] == len(expected_flags)
    for flag in summary["flagged"]:
        assert flag["output_word"] == WORDS[int(q_out.token_ids[flag["level"]][flag["z"], flag["row"], flag["col"]])]
        assert flag["input_word"] == WORDS[int(q_in.token_ids[flag["level"]][flag["z"], flag["row"], flag["col"]])]
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
    """The fast formatter writes each slice exactly as json.dumps would, on a flipped, offset geometry."""
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


# --- label maps and colour tables ---------------------------------------------------------------


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
        patch = labels[box["z"], box["y0"]:box["y1"], box["x0"]:box["x1"]]
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
        (lambda d: d.update(version="2.0"), "/version"),
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
