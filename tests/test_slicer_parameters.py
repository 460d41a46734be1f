"""The Slicer module's parameter node and its two Qt- and MRML-free logics.

The panel's state lives in the scene's parameter node (``LangMambaDenoiseParameterNode``, a
``parameterNodeWrapper``); a scene saved with MRML and loaded again, into a new scene or into the open
panel, brings back the server URL, the volumes, the request settings, the shown explanation with its table
view, the overlay and the region the views were centred on. The server logic and the explanation browser
run in a plain Python process without ``qt``, ``vtk`` or ``slicer``. No MONAI Label server is needed: the
explanation is the shipped 1.0 document, the server errors come from a closed port.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.servers import free_port
from tests.slicer_shim.helpers import MODULE_DIR, REPO

V1_DOCUMENT = Path(__file__).parent / "data" / "explanation_v1.0.json"


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    from tests import slicer_shim

    slicer = slicer_shim.install(str(tmp_path_factory.mktemp("settings")))
    sys.path.insert(0, str(MODULE_DIR))
    import LangMambaDenoise as module

    return slicer_shim, slicer, module


@pytest.fixture
def scene(shim):
    slicer_shim, slicer, _ = shim
    yield slicer_shim.new_scene()
    slicer.mrmlScene.Clear(0)


def _volume(slicer, shape, name, seed=0):
    voxels = np.random.default_rng(seed).integers(-1000, 1000, shape).astype(np.int16)
    ijk_to_ras = np.array([[-0.8, 0, 0, 10.0], [0, -0.7, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    return slicer.util.addVolumeFromArray(voxels, ijk_to_ras, name=name)


def _save_scene(slicer, directory: Path) -> Path:
    """Write every volume as NRRD beside an .mrml file that references them; returns the .mrml path."""
    directory.mkdir(parents=True, exist_ok=True)
    for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
        node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
        storage.SetFileName(str(directory / f"{node.GetID()}.nrrd"))
        assert storage.WriteData(node)
    scene = slicer.mrmlScene
    path = directory / "scene.mrml"
    scene.SetRootDirectory(str(directory))
    scene.SetURL(str(path))
    assert scene.Commit()
    return path


def test_parameter_node_values_survive_saving_and_loading_the_scene(shim, scene, tmp_path):
    _, slicer, module = shim
    document = json.loads(V1_DOCUMENT.read_text(encoding="utf-8"))
    ct = _volume(slicer, document["volume"]["shape"], "CT")
    denoised = _volume(slicer, document["volume"]["shape"], "CT (LangMamba)", seed=1)
    logic = module.LangMambaDenoiseLogic()
    parameters = logic.getParameterNode()
    assert parameters.serverUrl == module.DEFAULT_SERVER_URL and parameters.blend == 1.0 and parameters.level == 2
    assert parameters.inputVolume is None and parameters.explanation is None and parameters.sortColumn == -1

    logic.outputVolumeNode = denoised
    logic.setExplanation(document)
    region = logic.regions[7]
    values = {
        "serverUrl": "http://10.0.0.7:8123",
        "inputVolume": ct,
        "outputVolume": denoised,
        "blend": 0.35,
        "level": 1,
        "device": "cpu",
        "explain": False,
        "topK": 4,
        "explanation": logic.explanationNode,
        "wordFilter": "lung",
        "changedOnly": True,
        "minConfidence": 12.5,
        "sortColumn": 2,
        "sortDescending": True,
        "showOverlay": True,
        "overlayWords": "input",
        "shownRegion": module.regionKey(region),
    }
    for name, value in values.items():
        setattr(parameters, name, value)
    with pytest.raises(ValueError, match="within"):
        parameters.blend = 1.5
    with pytest.raises(ValueError, match="within"):
        parameters.topK = 0
    with pytest.raises(TypeError):
        parameters.level = "1"
    with pytest.raises(TypeError):
        parameters.inputVolume = logic.explanationNode
    assert parameters.blend == 0.35 and parameters.topK == 4 and parameters.level == 1

    path = _save_scene(slicer, tmp_path / "saved")
    loaded = slicer.vtkMRMLScene()
    slicer.mrmlScene = loaded
    loaded.SetURL(str(path))
    assert loaded.Connect()
    restored = module.LangMambaDenoiseLogic().getParameterNode()
    assert restored.parameterNode is not parameters.parameterNode and restored.parameterNode.GetScene() is loaded
    for name, value in values.items():
        got = getattr(restored, name)
        if hasattr(value, "GetID"):
            assert got is not None and got.GetScene() is loaded and got.GetName() == value.GetName(), name
        else:
            assert got == value and type(got) is type(value), name
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(restored.inputVolume), slicer.util.arrayFromVolume(ct))
    assert json.loads(restored.explanation.GetText()) == document


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


def _close(parent, widget):
    widget.cleanup()
    parent.close()
    parent.deleteLater()


def _table_rows(table):
    return [tuple(table.item(i, c).text() for c in range(table.columnCount())) for i in range(table.rowCount())]


def test_panel_shows_a_loaded_scene_as_it_was_saved(shim, scene, tmp_path, monkeypatch):
    _, slicer, module = shim
    import qt
    from PySide6.QtTest import QTest

    document = json.loads(V1_DOCUMENT.read_text(encoding="utf-8"))
    ct = _volume(slicer, document["volume"]["shape"], "CT")
    parent, widget = _panel(module)
    ui, logic = widget.ui, widget.logic
    monkeypatch.setattr(qt.QFileDialog, "getOpenFileName", staticmethod(lambda *args: str(V1_DOCUMENT)))
    try:
        assert ui.inputSelector.currentNode() is ct
        ui.serverUrlEdit.setText("http://127.0.0.1:8321")
        ui.serverUrlEdit.editingFinished.emit()
        ui.blendSlider.setValue(0.4)
        ui.levelSpinBox.setValue(1)
        ui.topKSpinBox.setValue(5)
        QTest.mouseClick(ui.openJsonButton, qt.Qt.LeftButton)
        assert ui.regionTable.rowCount() == len(logic.regions) == 32
        word = logic.regions[0].output_words[0]
        ui.wordFilterEdit.setText(word)
        header = ui.regionTable.horizontalHeader()
        header.sectionClicked.emit(8)  # change score: descending first
        header.sectionClicked.emit(8)  # ascending
        ui.showOverlayCheckBox.setChecked(True)
        ui.overlayWordsComboBox.setCurrentText("input")
        row = len(widget.shownRegions) - 1
        assert row >= 1
        widget.onRegionClicked(row)
        clicked = widget.shownRegions[row]
        parameters = widget._parameterNode
        assert parameters.sortColumn == 8 and parameters.sortDescending is False and parameters.wordFilter == word
        assert parameters.shownRegion == module.regionKey(clicked) and parameters.showOverlay
        assert parameters.serverUrl == "http://127.0.0.1:8321" and parameters.topK == 5
        saved_rows = _table_rows(ui.regionTable)
        saved_labels = slicer.util.arrayFromVolume(logic.labelMapNode).copy()
        assert 0 < len(saved_rows) < 32 and saved_labels.any()
        path = _save_scene(slicer, tmp_path / "saved")

        slicer.mrmlScene.Clear(0)
        assert logic.explanation is None and ui.regionTable.rowCount() == 0
        slicer.mrmlScene.SetURL(str(path))
        assert slicer.mrmlScene.Connect()
        qt.QApplication.processEvents()

        assert ui.serverUrlEdit.text() == "http://127.0.0.1:8321" and logic.server.serverUrl == "http://127.0.0.1:8321"
        assert ui.blendSlider.value() == pytest.approx(0.4) and ui.levelSpinBox.value() == 1
        assert ui.topKSpinBox.value() == 5 and ui.inputSelector.currentNode().GetName() == "CT"
        assert logic.explanation == document and ui.wordFilterEdit.text() == word
        assert _table_rows(ui.regionTable) == saved_rows
        assert ui.showOverlayCheckBox.isChecked() and ui.overlayWordsComboBox.currentText() == "input"
        labels = logic.labelMapNode
        assert labels is not None and labels.GetScene() is slicer.mrmlScene
        assert len(slicer.util.getNodesByClass("vtkMRMLLabelMapVolumeNode")) == 1  # the saved one, reused
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(labels), saved_labels)
        assert logic.sliceCompositeNode("Red").GetLabelVolumeID() == labels.GetID()
        shown = widget.shownRegion()
        assert shown is not None and module.regionKey(shown) == module.regionKey(clicked)
    finally:
        _close(parent, widget)


LOGICS_ALONE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from LangMambaDenoiseLib import browser, client, server

assert not {"qt", "vtk", "slicer", "PySide6"} & set(sys.modules), sorted(sys.modules)
logic = server.ServerLogic(f"http://127.0.0.1:{sys.argv[2]}", timeout=5)
try:
    logic.fetchInfo()
except client.ServerUnreachableError as error:
    unreachable = str(error)
try:
    logic.setServerUrl("ftp://nowhere")
except client.ClientError as error:
    malformed = str(error)
try:
    server.request_parameters(blend=2)
except ValueError as error:
    blend = str(error)
b = browser.ExplanationBrowser()
b.setDocument(b.readFile(sys.argv[3]))
try:
    b.parse("{not json", "the scene's explanation")
except ValueError as error:
    garbage = str(error)
flagged = b.filteredRegions(changedOnly=True, sortKey="change score", descending=True)
first = b.regions[9]
print(json.dumps({"unreachable": unreachable, "malformed": malformed, "url": logic.serverUrl, "blend": blend,
                  "garbage": garbage, "regions": len(b.regions), "flagged": [r.change_score for r in flagged],
                  "found": b.findRegion(first.z, first.level, first.row, first.col).index, "summary": b.summary(),
                  "csv": b.exportCSV(sys.argv[4], flagged),
                  "params": server.request_parameters(0.5, 1, "cpu", True, 2)}))
"""


def test_server_logic_and_browser_run_without_qt_or_mrml(tmp_path):
    document = json.loads(V1_DOCUMENT.read_text(encoding="utf-8"))
    port = free_port()
    answer = subprocess.run(
        [
            sys.executable,
            "-c",
            LOGICS_ALONE,
            str(MODULE_DIR),
            str(port),
            str(V1_DOCUMENT),
            str(tmp_path / "flagged.csv"),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert answer.returncode == 0, answer.stderr
    result = json.loads(answer.stdout)
    assert str(port) in result["unreachable"] and "ftp" in result["malformed"]
    assert result["url"] == f"http://127.0.0.1:{port}"  # a malformed URL keeps the previous server
    assert "blend" in result["blend"] and "the scene's explanation" in result["garbage"]
    assert result["regions"] == 32 and result["found"] == 9
    assert len(result["flagged"]) == document["summary"]["flagged_count"] > 0
    assert result["flagged"] == sorted(result["flagged"], reverse=True)
    assert result["summary"].startswith("32 regions on ")
    assert result["csv"] == len(result["flagged"])
    assert len((tmp_path / "flagged.csv").read_text().splitlines()) == len(result["flagged"]) + 1
    assert result["params"] == {"blend": 0.5, "level": 1, "device": "cpu", "explain": True, "top_k": 2}
