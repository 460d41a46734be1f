"""LangMamba Denoise: low-dose CT denoising through a LangMamba MONAI Label server, with an explanation
browser that shows, region by region, which words the model reads before and after denoising.

The module talks to the server's REST API itself (``LangMambaDenoiseLib.client``): it uploads the input
volume as NRRD, receives the denoised scalar volume (float32 or int16 HU, the input's geometry) and the
explanation document, and needs neither the ``langmamba`` package nor the MONAI Label Slicer plugin.
"""

from __future__ import annotations

import json
import logging
import os
import threading

import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from LangMambaDenoiseLib import client as lmclient
from LangMambaDenoiseLib import explanation as lmexplanation
from LangMambaDenoiseLib import nrrd as lmnrrd

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
MODEL_NAME = "langmamba_denoise"
SETTINGS_PREFIX = "LangMambaDenoise/"
OUTPUT_SUFFIX = " (LangMamba)"
CT_WINDOW_LEVEL = (400.0, 40.0)
"""Soft-tissue CT window (width, level) in HU for the denoised volume when the input uses auto W/L."""
MAX_TABLE_ROWS = 2000
"""Rows shown in the region table; the filter narrows larger explanations (exports are not capped)."""
TABLE_COLUMNS = (
    # (header, sort key of LangMambaDenoiseLib.explanation.SORT_KEYS, first click sorts descending)
    ("Slice", "slice", False),
    ("Level", "level", False),
    ("Confidence", "confidence", True),
    ("Class", "class", False),
    ("Output words", "output word", False),
    ("Changed", "changed", True),
    ("Input conf.", "input confidence", True),
    ("Input words", "input word", False),
    ("Change score", "change score", True),
)
"""The region table's columns; a header click sorts by the column, a second click reverses."""
MAX_WORDS_COLUMN_WIDTH = 240
"""Pixels; longer word lists are elided in the table (the full list is the cell's tooltip)."""
BAND_COLORS = {"near uniform": "#757575", "low": "#e65100", "confident": ""}
"""Text colour of a confidence cell by band (near uniform: grey, low: orange)."""


def _get(widget, name: str):
    """A Qt property's value: PythonQt (Slicer) exposes properties as attributes (``edit.text``), other
    Qt bindings as getters (``edit.text()``, ``box.isChecked()``)."""
    value = getattr(widget, name, None)
    if callable(value):
        return value()
    if value is not None:
        return value
    return getattr(widget, "is" + name[0].upper() + name[1:])()


#
# Module
#


class LangMambaDenoise(ScriptedLoadableModule):
    """Module description for Slicer's module panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "LangMamba Denoise"
        self.parent.categories = ["Filtering"]
        self.parent.dependencies = []
        self.parent.contributors = ["LangMamba for MONAI Label and 3D Slicer developers"]
        self.parent.helpText = (
            "Denoise a low-dose CT volume with LangMamba running on a MONAI Label server and browse, region by "
            "region, the words the model reads in the input and in the denoised output. Regions where the top "
            "word changed are flagged: check them before trusting the result. See "
            "<a href='https://arxiv.org/abs/2507.06140'>LangMamba (arXiv 2507.06140)</a>."
        )
        self.parent.acknowledgementText = (
            "LangMamba: Zhang et al., arXiv 2507.06140. Research use only; not for diagnosis."
        )


#
# Logic
#


class LangMambaDenoiseLogic(ScriptedLoadableModuleLogic):
    """Everything but the GUI: server requests, volume transfer, explanation browsing.

    Network calls (:meth:`fetchInfo`, :meth:`requestDenoise`) touch no MRML node and may run in a worker
    thread; the other methods change the scene and run on the main thread. :meth:`denoise` does a whole
    run synchronously (scripts, self-test).
    """

    def __init__(self, serverUrl: str = DEFAULT_SERVER_URL, timeout: float = 600.0) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.timeout = float(timeout)
        self.client = None
        self.serverUrl = ""
        self.setServerUrl(serverUrl)
        self.explanation = None
        self.regions = []
        self.inputVolumeNode = None
        self.outputVolumeNode = None
        self.labelMapNode = None
        self.colorNode = None
        self.highlightNode = None

    # --- server ---------------------------------------------------------------------------------

    def setServerUrl(self, url: str) -> None:
        """Use the server at ``url``; :class:`~LangMambaDenoiseLib.client.ClientError` if malformed."""
        self.client = lmclient.LangMambaClient(url, timeout=self.timeout)
        self.serverUrl = self.client.base_url

    def fetchInfo(self, cancel=None) -> dict:
        """``/info/`` of the server; ClientError if it has no ``langmamba_denoise`` model."""
        info = self.client.info(cancel=cancel)
        models = info.get("models") or {}
        if MODEL_NAME not in models:
            names = ", ".join(sorted(models)) or "none"
            raise lmclient.ProtocolError(f"the server offers no {MODEL_NAME} model (models: {names})")
        return info

    @staticmethod
    def describeInfo(info: dict) -> str:
        """One line for the status label: app name, models, LangMamba's settings and vocabulary size."""
        models = info.get("models") or {}
        model = models.get(MODEL_NAME) or {}
        config = model.get("config") or {}
        vocabulary = model.get("vocabulary") or config.get("vocabulary") or []
        parts = [f"Connected to {info.get('name') or 'MONAI Label'}", "models: " + ", ".join(sorted(models))]
        settings = ", ".join(
            f"{k}={'/'.join(map(str, config[k])) if isinstance(config[k], list) else config[k]}"
            for k in ("blend", "level", "device", "explain", "top_k") if k in config
        )
        if settings:
            parts.append(f"{MODEL_NAME} defaults: {settings}")
        if vocabulary:
            parts.append(f"vocabulary: {len(vocabulary)} words")
        return "; ".join(parts)

    @staticmethod
    def requestParameters(blend: float = 1.0, level: int = 2, device: str = "auto", explain: bool = True,
                          topK: int = 3) -> dict:
        """The ``params`` JSON of an inference request (``top_k``: words listed per region)."""
        if not 0.0 <= float(blend) <= 1.0:
            raise ValueError(f"blend must be in [0, 1], got {blend}")
        return {"blend": float(blend), "level": int(level), "device": str(device), "explain": bool(explain),
                "top_k": int(topK)}

    # --- volumes --------------------------------------------------------------------------------

    @staticmethod
    def ijkToRasArray(volumeNode) -> np.ndarray:
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix)

    def encodeVolume(self, volumeNode, compress: bool = True) -> bytes:
        """The volume's voxels and geometry as NRRD bytes (int16 if its values fit, else float32)."""
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise ValueError("select an input volume with voxel data")
        if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
            raise ValueError(f"{volumeNode.GetName()} is not a scalar volume")
        array = slicer.util.arrayFromVolume(volumeNode)
        if array.dtype in (np.int16, np.float32):
            voxels = array
        elif np.issubdtype(array.dtype, np.integer) and array.size and -32768 <= array.min() and array.max() <= 32767:
            voxels = array.astype(np.int16)
        else:
            voxels = array.astype(np.float32)
        return lmnrrd.encode(voxels, lmnrrd.lps_from_ras(self.ijkToRasArray(volumeNode)), compress=compress)

    def requestDenoise(self, fileBytes: bytes, parameters: dict, progress=None, cancel=None):
        """Upload ``fileBytes`` (NRRD) and run the model; thread-safe (no MRML). Returns the client's
        :class:`~LangMambaDenoiseLib.client.InferenceResult`."""
        return self.client.infer(MODEL_NAME, parameters, file_bytes=fileBytes, file_name="input.nrrd",
                                 output="all", progress=progress, cancel=cancel)

    def requestDenoiseById(self, imageId: str, parameters: dict, progress=None, cancel=None):
        """Run the model on an image of the server's datastore (no upload). The server keeps the result as
        ``<imageId>_langmamba``; running again replaces that earlier result (``overwrite``), never another image."""
        return self.client.infer(MODEL_NAME, {**parameters, "overwrite": True}, image_id=imageId, output="all",
                                 progress=progress, cancel=cancel)

    def applyResult(self, inputVolumeNode, result, name: str | None = None):
        """Load a server result: a new scalar volume ``"<input> (LangMamba)"`` with the input's geometry
        and a CT window, shown side by side (linked) with the input; the explanation, if any, is kept for
        browsing. Returns the new volume node."""
        if not result.image:
            raise lmclient.ProtocolError("the server sent no denoised image")
        volume = lmnrrd.decode(result.image)
        expected = slicer.util.arrayFromVolume(inputVolumeNode).shape
        if volume.array.shape != expected:
            raise lmclient.ProtocolError(f"the server's image has shape {volume.array.shape}, the input {expected}")
        inputLps = lmnrrd.lps_from_ras(self.ijkToRasArray(inputVolumeNode))
        if not np.allclose(volume.ijk_to_lps, inputLps, atol=1e-3):
            raise lmclient.ProtocolError("the server's image does not have the input's geometry")
        document = result.explanation
        if document is not None:
            lmexplanation.check_document(document)
            shape = tuple(document["volume"]["shape"])
            if shape != expected:
                raise lmexplanation.ExplanationError(f"the explanation is of a volume of shape {shape}, not {expected}")

        outputNode = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLScalarVolumeNode", name or inputVolumeNode.GetName() + OUTPUT_SUFFIX
        )
        outputNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(self.ijkToRasArray(inputVolumeNode)))
        slicer.util.updateVolumeFromArray(outputNode, volume.array)
        outputNode.SetAndObserveTransformNodeID(inputVolumeNode.GetTransformNodeID())
        outputNode.CreateDefaultDisplayNodes()
        self._applyWindow(inputVolumeNode, outputNode)
        self.inputVolumeNode, self.outputVolumeNode = inputVolumeNode, outputNode
        self.setExplanation(document)
        self.showSideBySide(inputVolumeNode, outputNode)
        return outputNode

    def denoise(self, inputVolumeNode, blend: float = 1.0, level: int = 2, device: str = "auto",
                explain: bool = True, topK: int = 3, progress=None, cancel=None):
        """Encode, upload, denoise and load in one call (blocks until the server answers)."""
        parameters = self.requestParameters(blend, level, device, explain, topK)
        result = self.requestDenoise(self.encodeVolume(inputVolumeNode), parameters, progress, cancel)
        return self.applyResult(inputVolumeNode, result)

    @staticmethod
    def _applyWindow(inputNode, outputNode) -> None:
        display = outputNode.GetDisplayNode()
        if display is None:
            return
        source = inputNode.GetDisplayNode()
        if source is not None and not source.GetAutoWindowLevel():
            window, level = source.GetWindow(), source.GetLevel()
        else:
            window, level = CT_WINDOW_LEVEL
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(window, level)
        if source is not None and source.GetColorNodeID():
            display.SetAndObserveColorNodeID(source.GetColorNodeID())

    # --- views ----------------------------------------------------------------------------------

    @staticmethod
    def sliceCompositeNode(layoutName: str):
        for node in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            if node.GetLayoutName() == layoutName:
                return node
        return None

    @staticmethod
    def sliceNode(layoutName: str):
        for node in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            if node.GetLayoutName() == layoutName:
                return node
        return None

    def showSideBySide(self, inputVolumeNode, outputVolumeNode) -> None:
        """Side-by-side layout: input in Red, denoised in Yellow, both axial, linked and fitted."""
        layoutNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLLayoutNode")
        if layoutNode is not None:
            layoutNode.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        red, yellow = self.sliceNode("Red"), self.sliceNode("Yellow")
        if red is not None and yellow is not None:
            orientation = red.GetOrientationString()
            yellow.SetOrientation(orientation if orientation in ("Axial", "Sagittal", "Coronal") else "Axial")
        for layoutName, volumeNode in (("Red", inputVolumeNode), ("Yellow", outputVolumeNode)):
            composite = self.sliceCompositeNode(layoutName)
            if composite is None:
                continue
            composite.SetBackgroundVolumeID(volumeNode.GetID())
            composite.SetForegroundVolumeID(None)
            composite.SetLinkedControl(True)
            composite.SetHotLinkedControl(False)
        applicationLogic = slicer.app.applicationLogic() if hasattr(slicer, "app") else None
        if applicationLogic is not None:
            applicationLogic.FitSliceToAll(False, False)  # keep the orientations set above

    # --- explanation ----------------------------------------------------------------------------

    def setExplanation(self, document) -> None:
        """Keep ``document`` (or ``None``) for browsing; removes the previous overlay."""
        self.explanation = None if document is None else lmexplanation.check_document(document)
        self.regions = [] if document is None else lmexplanation.regions(document)
        self.showLabelMap(False)

    def loadExplanation(self, path: str, volumeNode=None) -> dict:
        """Open an explanation JSON file (version 1.0 or 2.0) for browsing, e.g. one exported earlier.
        ``volumeNode`` (default: the denoised output, if any) is the volume its regions lie on; its shape
        must be the document's."""
        try:
            with open(path, encoding="utf-8") as stream:
                document = json.load(stream)
        except (OSError, ValueError) as error:
            raise lmexplanation.ExplanationError(f"cannot read the explanation {path}: {error}") from None
        lmexplanation.check_document(document)
        volumeNode = volumeNode or self.outputVolumeNode
        if volumeNode is not None:
            shape = tuple(int(s) for s in document["volume"]["shape"])
            expected = slicer.util.arrayFromVolume(volumeNode).shape
            if shape != expected:
                raise lmexplanation.ExplanationError(
                    f"the explanation is of a volume of shape {shape}, not {expected} ('{volumeNode.GetName()}')")
            self.outputVolumeNode = volumeNode
        self.setExplanation(document)
        return document

    def filteredRegions(self, word: str = "", changedOnly: bool = False, minConfidence: float = 0.0,
                        sortKey: str = "document", descending: bool = False):
        """Regions matching ``word``, flagged ones only if asked, output top-word probability at least
        ``minConfidence`` (0-1), sorted by ``sortKey`` (see ``LangMambaDenoiseLib.explanation.SORT_KEYS``)."""
        rows = lmexplanation.filter_regions(self.regions, word, changedOnly, min_confidence=minConfidence)
        return lmexplanation.sort_regions(rows, sortKey, descending)

    def explanationSummary(self) -> str:
        if self.explanation is None:
            return "No explanation loaded"
        changed = sum(r.changed for r in self.regions)
        differs = sum(r.top_differs for r in self.regions)
        levels = lmexplanation.levels(self.explanation)
        thresholds = lmexplanation.confidence_thresholds(self.explanation)
        mean = float(np.mean([r.confidence for r in self.regions])) if self.regions else 0.0
        band = lmexplanation.confidence_band(mean, thresholds)
        return (f"{len(self.regions)} regions on {len(self.explanation['slices'])} slices, level(s) "
                f"{', '.join(map(str, levels))}; {changed} flagged (confident change), top word differs in "
                f"{differs}; mean top-word probability {lmexplanation.format_percent(mean)} "
                f"(uniform {lmexplanation.format_percent(thresholds['uniform'])}: {band})")

    def languageSpaceSummary(self) -> str:
        """Which language space produced the words, how their probabilities were calibrated, what a flag means."""
        if self.explanation is None:
            return ""
        info = lmexplanation.describe(self.explanation)
        return (f"Words from: {info['language_space']}. Probabilities: {info['calibration']}; uniform over "
                f"{self.explanation.get('vocabulary_size', '?')} words = {lmexplanation.format_percent(info['uniform'])}. "
                f"Changes: {info['change_rule']}. Document version {info['version']}.")

    def overlayLevel(self, preferred: int) -> int:
        """``preferred`` if the explanation has it, else its finest level."""
        levels = lmexplanation.levels(self.explanation)
        return preferred if preferred in levels else levels[-1]

    def regionCenterRAS(self, region, volumeNode=None):
        """World (RAS mm) position of the region's centre on its slice."""
        volumeNode = volumeNode or self.outputVolumeNode or self.inputVolumeNode
        point = self.ijkToRasArray(volumeNode) @ np.array([*region.center_ijk, 1.0])
        transform = volumeNode.GetParentTransformNode()
        if transform is not None:
            toWorld = vtk.vtkGeneralTransform()
            transform.GetTransformToWorld(toWorld)
            return tuple(toWorld.TransformPoint(point[:3].tolist()))
        return tuple(float(v) for v in point[:3])

    def jumpToRegion(self, region) -> tuple:
        """Centre every slice view on the region and outline it with a markups ROI; returns the centre."""
        center = self.regionCenterRAS(region)
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *center, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        self._highlight(region)
        return center

    def _highlight(self, region) -> None:
        volumeNode = self.outputVolumeNode or self.inputVolumeNode
        matrix = self.ijkToRasArray(volumeNode)
        corners = [
            matrix @ np.array([i, j, k, 1.0])
            for i in (region.x0 - 0.5, region.x1 - 0.5)
            for j in (region.y0 - 0.5, region.y1 - 0.5)
            for k in (region.z - 0.5, region.z + 0.5)
        ]
        corners = np.array(corners)[:, :3]
        low, high = corners.min(axis=0), corners.max(axis=0)
        if self.highlightNode is None or self.highlightNode.GetScene() is None:
            self.highlightNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "LangMamba region")
            self.highlightNode.CreateDefaultDisplayNodes()
        self.highlightNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        self.highlightNode.SetXYZ(*((low + high) / 2).tolist())
        self.highlightNode.SetRadiusXYZ(*((high - low) / 2).tolist())
        self.highlightNode.SetDescription(
            f"slice {region.z}, level {region.level}: output {region.words_text('output')}; "
            f"input {region.words_text('input')}"
        )

    def updateLabelMap(self, level: int, which: str = "output"):
        """Label volume of ``level``'s top-1 words (vocabulary id + 1) with a colour table named by the
        words; returns the label map node."""
        if self.explanation is None or self.outputVolumeNode is None:
            raise ValueError("denoise a volume with explanations first")
        shape = slicer.util.arrayFromVolume(self.outputVolumeNode).shape
        labels, table = lmexplanation.label_map(self.explanation, level, shape, which)
        if self.colorNode is None or self.colorNode.GetScene() is None:
            self.colorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", "LangMamba words")
        self.colorNode.SetTypeToUser()
        self.colorNode.SetNumberOfColors(int(labels.max()) + 1)
        self.colorNode.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
        for value in range(1, int(labels.max()) + 1):
            self.colorNode.SetColor(value, "", 0.0, 0.0, 0.0, 0.0)
        for value, word, (r, g, b) in table:
            self.colorNode.SetColor(value, word, r / 255.0, g / 255.0, b / 255.0, 1.0)
        if self.labelMapNode is None or self.labelMapNode.GetScene() is None:
            self.labelMapNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLLabelMapVolumeNode", self.outputVolumeNode.GetName() + " words"
            )
        self.labelMapNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(self.ijkToRasArray(self.outputVolumeNode)))
        self.labelMapNode.SetAndObserveTransformNodeID(self.outputVolumeNode.GetTransformNodeID())
        slicer.util.updateVolumeFromArray(self.labelMapNode, labels)
        self.labelMapNode.CreateDefaultDisplayNodes()
        self.labelMapNode.GetDisplayNode().SetAndObserveColorNodeID(self.colorNode.GetID())
        return self.labelMapNode

    def showLabelMap(self, visible: bool, level: int = 2, which: str = "output", opacity: float = 0.4) -> None:
        """Show (building it) or hide the word overlay in the Red and Yellow views."""
        labelNode = self.updateLabelMap(self.overlayLevel(level), which) if visible else None
        for layoutName in ("Red", "Yellow"):
            composite = self.sliceCompositeNode(layoutName)
            if composite is None:
                continue
            if labelNode is not None:
                composite.SetLabelVolumeID(labelNode.GetID())
                composite.SetLabelOpacity(opacity)
            elif self.labelMapNode is not None and composite.GetLabelVolumeID() == self.labelMapNode.GetID():
                composite.SetLabelVolumeID(None)

    def exportCSV(self, path: str, rows=None) -> int:
        """Write ``rows`` (default: all regions) as CSV; returns the number of rows."""
        rows = self.regions if rows is None else list(rows)
        if self.explanation is None:
            raise ValueError("no explanation to export")
        lmexplanation.export_csv(rows, path)
        return len(rows)

    def exportJSON(self, path: str) -> None:
        if self.explanation is None:
            raise ValueError("no explanation to export")
        lmexplanation.export_json(self.explanation, path)

    @staticmethod
    def defaultInputVolume():
        """The active volume (selection node), else the Red view's background, else the first scalar volume."""
        selection = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSelectionNode")
        candidates = []
        if selection is not None:
            candidates.append(selection.GetActiveVolumeID())
        red = LangMambaDenoiseLogic.sliceCompositeNode("Red")
        if red is not None:
            candidates.append(red.GetBackgroundVolumeID())
        for nodeID in candidates:
            node = slicer.mrmlScene.GetNodeByID(nodeID) if nodeID else None
            if node is not None and node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode"):
                return node
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if not node.IsA("vtkMRMLLabelMapVolumeNode"):
                return node
        return None


#
# Widget
#


class _Job:
    """A call run in a worker thread; the GUI polls it with a timer so the event loop keeps running."""

    def __init__(self, function, onDone, onError=None) -> None:
        self.cancel = lmclient.CancelToken()
        self.onDone, self.onError = onDone, onError
        self.result = None
        self.error = None
        self.progress = (None, 0.0)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)

    def _run(self, function) -> None:
        try:
            self.result = function(self.report, self.cancel)
        except BaseException as error:  # handed to the GUI thread, which turns it into a message
            self.error = error

    def report(self, phase: str, fraction) -> None:
        with self._lock:
            self.progress = (phase, fraction)

    def start(self) -> None:
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()


class LangMambaDenoiseWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: server, denoise and explanation browser sections."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.job = None
        self.shownRegions = []
        self.sortColumn = None
        self.sortDescending = False
        self._pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LangMambaDenoise.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        settings = qt.QSettings()
        url = str(settings.value(SETTINGS_PREFIX + "ServerUrl", DEFAULT_SERVER_URL) or DEFAULT_SERVER_URL)
        self.ui.serverUrlEdit.setText(url)
        self.ui.blendSlider.setValue(float(settings.value(SETTINGS_PREFIX + "Blend", 1.0)))
        self.ui.levelSpinBox.setValue(int(settings.value(SETTINGS_PREFIX + "Level", 2)))
        self.ui.topKSpinBox.setValue(int(settings.value(SETTINGS_PREFIX + "TopK", 3)))
        device = self.ui.deviceComboBox.findText(str(settings.value(SETTINGS_PREFIX + "Device", "auto")))
        self.ui.deviceComboBox.setCurrentIndex(max(device, 0))
        try:
            self.logic = LangMambaDenoiseLogic(url)
        except lmclient.ClientError as error:
            self.logic = LangMambaDenoiseLogic()
            self.setStatus(str(error), error=True)

        table = self.ui.regionTable
        table.setColumnCount(len(TABLE_COLUMNS))
        table.setHorizontalHeaderLabels([header for header, _, _ in TABLE_COLUMNS])
        table.horizontalHeader().setStretchLastSection(True)
        table.horizontalHeader().setSortIndicatorShown(False)
        table.horizontalHeader().setSectionsClickable(True)
        table.verticalHeader().setVisible(False)

        self.ui.connectButton.clicked.connect(self.onConnect)
        self.ui.serverUrlEdit.editingFinished.connect(self.saveSettings)
        self.ui.denoiseButton.clicked.connect(self.onDenoise)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.inputSelector.currentNodeChanged.connect(self.updateButtons)
        self.ui.wordFilterEdit.textChanged.connect(self.updateTable)
        self.ui.changedOnlyCheckBox.toggled.connect(self.updateTable)
        self.ui.minConfidenceSpinBox.valueChanged.connect(self.updateTable)
        self.ui.regionTable.horizontalHeader().sectionClicked.connect(self.onSortColumn)
        self.ui.regionTable.cellClicked.connect(self.onRegionClicked)
        self.ui.showOverlayCheckBox.toggled.connect(self.onOverlayChanged)
        self.ui.overlayWordsComboBox.currentIndexChanged.connect(self.onOverlayChanged)
        self.ui.exportCsvButton.clicked.connect(self.onExportCsv)
        self.ui.exportJsonButton.clicked.connect(self.onExportJson)
        self.ui.openJsonButton.clicked.connect(self.onOpenJson)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(50)
        self._pollTimer.timeout.connect(self.pollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.selectDefaultInput()
        self.updateTable()
        self.updateButtons()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.job is not None:
            self.job.cancel.cancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()

    def enter(self) -> None:
        self.selectDefaultInput()

    # --- state ----------------------------------------------------------------------------------

    def saveSettings(self) -> None:
        settings = qt.QSettings()
        settings.setValue(SETTINGS_PREFIX + "ServerUrl", _get(self.ui.serverUrlEdit, "text").strip())
        settings.setValue(SETTINGS_PREFIX + "Blend", float(_get(self.ui.blendSlider, "value")))
        settings.setValue(SETTINGS_PREFIX + "Level", int(_get(self.ui.levelSpinBox, "value")))
        settings.setValue(SETTINGS_PREFIX + "Device", _get(self.ui.deviceComboBox, "currentText"))
        settings.setValue(SETTINGS_PREFIX + "TopK", int(_get(self.ui.topKSpinBox, "value")))
        settings.sync()

    def setStatus(self, message: str, error: bool = False) -> None:
        self.ui.statusLabel.setText(message)
        self.ui.statusLabel.setStyleSheet("color: #c62828;" if error else "")

    def selectDefaultInput(self) -> None:
        if self.ui.inputSelector.currentNode() is None:
            node = LangMambaDenoiseLogic.defaultInputVolume()
            if node is not None:
                self.ui.inputSelector.setCurrentNode(node)

    def updateButtons(self, *unused) -> None:
        busy = self.job is not None
        self.ui.denoiseButton.setEnabled(not busy and self.ui.inputSelector.currentNode() is not None)
        self.ui.connectButton.setEnabled(not busy)
        self.ui.cancelButton.setEnabled(busy)
        hasExplanation = self.logic is not None and self.logic.explanation is not None
        for widget in (self.ui.exportCsvButton, self.ui.exportJsonButton, self.ui.showOverlayCheckBox):
            widget.setEnabled(hasExplanation)

    def onSceneEndClose(self, caller, event) -> None:
        if self.logic is not None:
            self.logic.setExplanation(None)
            self.logic.inputVolumeNode = self.logic.outputVolumeNode = None
        self.updateTable()
        self.updateButtons()

    def onNodeAdded(self, caller, event) -> None:
        qt.QTimer.singleShot(0, self.selectDefaultInput)

    def _useServerUrl(self) -> bool:
        url = _get(self.ui.serverUrlEdit, "text").strip()
        try:
            self.logic.setServerUrl(url)
        except lmclient.ClientError as error:
            self.ui.serverStatusLabel.setText(str(error))
            return False
        self.saveSettings()
        return True

    # --- background requests --------------------------------------------------------------------

    def startJob(self, function, onDone, message: str, onError=None) -> None:
        self.job = _Job(function, onDone, onError)
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.setValue(0)
        self.setStatus(message)
        self.updateButtons()
        self.job.start()
        self._pollTimer.start()

    def pollJob(self) -> None:
        job = self.job
        if job is None:
            self._pollTimer.stop()
            return
        phase, fraction = job.progress
        if phase == "upload":
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.setValue(int(30 * (fraction or 0.0)))
            self.setStatus("Uploading the input volume...")
        elif phase == "server" or (phase == "download" and fraction is None):
            self.ui.progressBar.setRange(0, 0)
            self.setStatus("The server is denoising..." if phase == "server" else "Receiving the result...")
        elif phase == "download":
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.setValue(70 + int(30 * fraction))
            self.setStatus("Receiving the result...")
        if not job.done():
            return
        self._pollTimer.stop()
        self.job = None
        self.ui.progressBar.setRange(0, 100)
        try:
            if job.error is not None:
                raise job.error
            job.onDone(job.result)
            self.ui.progressBar.setValue(100)
        except lmclient.RequestCancelled:
            self.ui.progressBar.setValue(0)
            self.setStatus("Cancelled.")
            if job.onError is not None:
                job.onError("Cancelled.")
        except Exception as error:
            self.ui.progressBar.setValue(0)
            message = self.errorMessage(error)
            self.setStatus(message, error=True)
            if job.onError is not None:
                job.onError(message)
        finally:
            self.updateButtons()

    @staticmethod
    def errorMessage(error: Exception) -> str:
        """One line for the panel; unexpected errors also go to the log with their traceback."""
        if isinstance(error, lmclient.ClientError):
            return str(error)
        if isinstance(error, (lmnrrd.NrrdError, lmexplanation.ExplanationError, ValueError)):
            return f"Cannot use the server's answer: {error}"
        logging.error("LangMamba Denoise failed", exc_info=error)
        return f"Unexpected error ({type(error).__name__}): {error}"

    def onCancel(self) -> None:
        if self.job is not None:
            self.job.cancel.cancel()
            self.setStatus("Cancelling...")

    def onConnect(self) -> None:
        if self.job is not None or not self._useServerUrl():
            return
        self.ui.serverStatusLabel.setText("Connecting...")
        logic = self.logic

        def done(info):
            self.ui.serverStatusLabel.setText(logic.describeInfo(info))
            self.setStatus("")

        self.startJob(lambda progress, cancel: logic.fetchInfo(cancel=cancel), done, "Connecting...",
                      onError=lambda message: self.ui.serverStatusLabel.setText("Not connected: " + message))

    def onDenoise(self) -> None:
        inputNode = self.ui.inputSelector.currentNode()
        if self.job is not None or inputNode is None or not self._useServerUrl():
            return
        try:
            parameters = self.logic.requestParameters(
                _get(self.ui.blendSlider, "value"), _get(self.ui.levelSpinBox, "value"),
                _get(self.ui.deviceComboBox, "currentText"), _get(self.ui.explainCheckBox, "checked"),
                _get(self.ui.topKSpinBox, "value"),
            )
            fileBytes = self.logic.encodeVolume(inputNode)
        except (ValueError, lmnrrd.NrrdError) as error:
            self.setStatus(str(error), error=True)
            return
        logic = self.logic
        self.ui.showOverlayCheckBox.setChecked(False)

        def done(result):
            outputNode = logic.applyResult(inputNode, result)
            self.updateTable()
            explained = "" if logic.explanation is not None else " (no explanation)"
            self.setStatus(f"Denoised into '{outputNode.GetName()}'{explained}.")

        self.startJob(lambda progress, cancel: logic.requestDenoise(fileBytes, parameters, progress, cancel),
                      done, "Sending the input volume...")

    # --- explanation browser --------------------------------------------------------------------

    def updateTable(self, *unused) -> None:
        table = self.ui.regionTable
        rows = self.filteredRegions()
        self.shownRegions = rows[:MAX_TABLE_ROWS]
        thresholds = (lmexplanation.confidence_thresholds(self.logic.explanation)
                      if self.logic.explanation is not None else None)
        table.setRowCount(0)
        table.setRowCount(len(self.shownRegions))
        for i, region in enumerate(self.shownRegions):
            for column, (text, colour) in enumerate(self._cells(region, thresholds)):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(text)
                colour = "#c62828" if region.changed else colour
                if colour:
                    item.setForeground(qt.QBrush(qt.QColor(colour)))
                table.setItem(i, column, item)
        table.resizeColumnsToContents()
        for column, (header, _, _) in enumerate(TABLE_COLUMNS):
            if header.endswith("words") and table.columnWidth(column) > MAX_WORDS_COLUMN_WIDTH:
                table.setColumnWidth(column, MAX_WORDS_COLUMN_WIDTH)
        header = table.horizontalHeader()
        header.setSortIndicatorShown(self.sortColumn is not None)
        if self.sortColumn is not None:
            header.setSortIndicator(self.sortColumn, qt.Qt.DescendingOrder if self.sortDescending else qt.Qt.AscendingOrder)
        summary = self.logic.explanationSummary()
        if self.logic.explanation is not None:
            shown = f"; showing {len(self.shownRegions)} of {len(rows)} matching"
            summary += shown + (" (narrow the filter to see all)" if len(rows) > MAX_TABLE_ROWS else "")
        self.ui.explanationSummaryLabel.setText(summary)
        self.ui.languageSpaceLabel.setText(self.logic.languageSpaceSummary())
        self.updateButtons()

    @staticmethod
    def _cells(region, thresholds):
        """``(text, colour)`` of each of :data:`TABLE_COLUMNS` for one region."""
        cells = []
        for probability in (region.confidence, region.input_confidence):
            band = lmexplanation.confidence_band(probability, thresholds)
            mark = {"near uniform": " (\u2248 uniform)", "low": " (low)"}.get(band, "")
            cells.append((lmexplanation.format_percent(probability) + mark, BAND_COLORS[band]))
        changed = "yes" if region.changed else ("differs" if region.top_differs else "")
        return [(str(region.z), ""), (str(region.level), ""), cells[0], (region.output_class or "", ""),
                (region.words_text("output"), ""), (changed, ""), cells[1], (region.words_text("input"), ""),
                (f"{region.change_score:.3f}", "")]

    def filteredRegions(self):
        key = "document" if self.sortColumn is None else TABLE_COLUMNS[self.sortColumn][1]
        return self.logic.filteredRegions(_get(self.ui.wordFilterEdit, "text"), _get(self.ui.changedOnlyCheckBox, "checked"),
                                          float(_get(self.ui.minConfidenceSpinBox, "value")) / 100.0, key,
                                          self.sortDescending)

    def onSortColumn(self, column: int) -> None:
        """Sort by ``column`` (descending first for probabilities and scores); a second click reverses."""
        if column == self.sortColumn:
            self.sortDescending = not self.sortDescending
        else:
            self.sortColumn, self.sortDescending = column, TABLE_COLUMNS[column][2]
        self.updateTable()

    def onRegionClicked(self, row: int, column: int = 0) -> None:
        if 0 <= row < len(self.shownRegions):
            region = self.shownRegions[row]
            self.logic.jumpToRegion(region)
            self.setStatus(f"Slice {region.z}, level {region.level}: output {region.words_text('output')}; "
                           f"input {region.words_text('input')}")

    def onOverlayChanged(self, *unused) -> None:
        if self.logic.explanation is None:
            return
        try:
            self.logic.showLabelMap(_get(self.ui.showOverlayCheckBox, "checked"), _get(self.ui.levelSpinBox, "value"),
                                    _get(self.ui.overlayWordsComboBox, "currentText"))
        except Exception as error:
            self.setStatus(self.errorMessage(error), error=True)

    def _savePath(self, caption: str, suffix: str, fileFilter: str) -> str:
        base = self.logic.outputVolumeNode.GetName() if self.logic.outputVolumeNode is not None else "langmamba"
        start = os.path.join(os.path.expanduser("~"), f"{base} explanation{suffix}")
        return qt.QFileDialog.getSaveFileName(self.parent, caption, start, fileFilter) or ""

    def onExportCsv(self) -> None:
        path = self._savePath("Export regions as CSV", ".csv", "CSV files (*.csv)")
        if not path:
            return
        try:
            count = self.logic.exportCSV(path, self.filteredRegions())
            self.setStatus(f"Saved {count} regions to {path}")
        except Exception as error:
            self.setStatus(f"Export failed: {error}", error=True)

    def onOpenJson(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, "Open an explanation JSON", os.path.expanduser("~"),
                                              "JSON files (*.json)") or ""
        if not path:
            return
        try:
            self.logic.loadExplanation(path, self.logic.outputVolumeNode or self.ui.inputSelector.currentNode())
            self.setStatus(f"Opened the explanation {path}")
        except Exception as error:
            self.setStatus(f"Cannot open the explanation: {error}", error=True)
        self.updateTable()

    def onExportJson(self) -> None:
        path = self._savePath("Export explanation as JSON", ".json", "JSON files (*.json)")
        if not path:
            return
        try:
            self.logic.exportJSON(path)
            self.setStatus(f"Saved the explanation to {path}")
        except Exception as error:
            self.setStatus(f"Export failed: {error}", error=True)


#
# Test (runs inside 3D Slicer: Reload and Test, or Slicer --testing)
#


class LangMambaDenoiseTest(ScriptedLoadableModuleTest):
    """Denoises a small synthetic CT through the server named by ``LANGMAMBA_SERVER_URL`` (or the module's
    saved server URL) and checks the result's geometry, the explanation and the region jump."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear(0)

    def runTest(self) -> None:
        self.setUp()
        self.test_DenoiseSyntheticVolume()

    def serverUrl(self) -> str:
        return os.environ.get("LANGMAMBA_SERVER_URL") or str(
            qt.QSettings().value(SETTINGS_PREFIX + "ServerUrl", DEFAULT_SERVER_URL)
        )

    def test_DenoiseSyntheticVolume(self) -> None:
        self.delayDisplay("Starting the LangMamba Denoise test")
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[:48, :40]
        body = ((yy - 23.5) / 20) ** 2 + ((xx - 19.5) / 17) ** 2 <= 1
        hu = np.where(body, 40.0, -1000.0)[None] + rng.normal(0, 30, (3, 48, 40))
        ijkToRas = np.array([[-0.8, 0, 0, 10.0], [0, -0.7, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
        inputNode = slicer.util.addVolumeFromArray(np.rint(hu).astype(np.int16), ijkToRas, name="synthetic CT")

        logic = LangMambaDenoiseLogic(self.serverUrl(), timeout=300)
        info = logic.fetchInfo()
        self.assertIn(MODEL_NAME, info["models"])
        outputNode = logic.denoise(inputNode, blend=1.0, level=2, device="auto", explain=True)
        self.assertEqual(outputNode.GetName(), "synthetic CT" + OUTPUT_SUFFIX)
        output = slicer.util.arrayFromVolume(outputNode)
        self.assertEqual(output.shape, hu.shape)
        self.assertTrue(np.isfinite(output).all())
        np.testing.assert_allclose(logic.ijkToRasArray(outputNode), ijkToRas, atol=1e-6)
        self.assertIsNotNone(logic.explanation)
        self.assertGreater(len(logic.regions), 0)
        region = logic.regions[-1]
        center = logic.jumpToRegion(region)
        redOffset = slicer.util.arrayFromVTKMatrix(logic.sliceNode("Red").GetSliceToRAS())[2, 3]
        self.assertAlmostEqual(redOffset, center[2], places=3)
        labelNode = logic.updateLabelMap(logic.overlayLevel(2))
        self.assertEqual(slicer.util.arrayFromVolume(labelNode).shape, hu.shape)
        self.delayDisplay("Test passed")
