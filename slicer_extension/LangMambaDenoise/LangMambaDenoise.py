"""LangMamba Denoise: low-dose CT denoising through a LangMamba MONAI Label server, with an explanation
browser that shows, region by region, which words the model reads before and after denoising.

The module talks to the server's REST API itself (``LangMambaDenoiseLib.client``): it uploads the input
volume as NRRD, receives the denoised scalar volume (float32 or int16 HU, the input's geometry) and the
explanation document, and needs neither the ``langmamba`` package nor the MONAI Label Slicer plugin.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Annotated

import numpy as np
import qt
import slicer
import vtk
from LangMambaDenoiseLib import browser as lmbrowser
from LangMambaDenoiseLib import client as lmclient
from LangMambaDenoiseLib import explanation as lmexplanation
from LangMambaDenoiseLib import nrrd as lmnrrd
from LangMambaDenoiseLib import server as lmserver
from slicer import (
    vtkMRMLColorTableNode,
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLTextNode,
)
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DEFAULT_SERVER_URL = lmserver.DEFAULT_SERVER_URL
MODEL_NAME = lmserver.MODEL_NAME
SETTINGS_PREFIX = "LangMambaDenoise/"
USER_DEFAULTS_ATTRIBUTE = "LangMambaDenoise.UserDefaults"
"""Parameter node attribute set once the per-user defaults (QSettings) have been applied to it."""
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
# Parameter node
#


@parameterNodeWrapper
class LangMambaDenoiseParameterNode:
    """The panel's state, kept in the scene's parameter node so that a saved scene restores it.

    serverUrl: the MONAI Label server (its per-user default is in QSettings).
    inputVolume, outputVolume: the low-dose volume and its denoised result.
    blend, level, device, explain, topK: the inference request (``blend`` 0-1; ``level`` 0-2; ``topK`` words
        listed per region).
    explanation: the shown explanation document (JSON text node).
    wordFilter, changedOnly, minConfidence (percent), sortColumn (-1: document order), sortDescending: the
        region table's view of it.
    showOverlay, overlayWords ("output" or "input"): the word overlay.
    shownRegion: ``"z,level,row,col"`` of the region the views were last centred on ("" for none).
    labelMap, wordColors, highlight: the overlay, its colour table and the region outline the Logic made.
    """

    serverUrl: str = DEFAULT_SERVER_URL
    inputVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    blend: Annotated[float, WithinRange(0.0, 1.0)] = 1.0
    level: Annotated[int, WithinRange(0, 2)] = 2
    device: str = "auto"
    explain: bool = True
    topK: Annotated[int, WithinRange(1, 5)] = 3
    explanation: vtkMRMLTextNode
    wordFilter: str = ""
    changedOnly: bool = False
    minConfidence: Annotated[float, WithinRange(0.0, 100.0)] = 0.0
    sortColumn: Annotated[int, WithinRange(-1, len(TABLE_COLUMNS) - 1)] = -1
    sortDescending: bool = False
    showOverlay: bool = False
    overlayWords: str = "output"
    shownRegion: str = ""
    labelMap: vtkMRMLLabelMapVolumeNode
    wordColors: vtkMRMLColorTableNode
    highlight: vtkMRMLMarkupsROINode


def regionKey(region) -> str:
    """``"z,level,row,col"`` of a region, as :attr:`LangMambaDenoiseParameterNode.shownRegion` keeps it."""
    return f"{region.z},{region.level},{region.row},{region.col}"


#
# Logic
#


class LangMambaDenoiseLogic(ScriptedLoadableModuleLogic):
    """The scene side of the module: volume transfer, slice views, the word overlay and region outline.

    It composes the two Qt- and MRML-free logics: :attr:`server` (``LangMambaDenoiseLib.server.ServerLogic``,
    the requests, which may run in a worker thread) and :attr:`browser`
    (``LangMambaDenoiseLib.browser.ExplanationBrowser``, the shown explanation's regions, filters, summaries
    and exports). Methods here change the scene and run on the main thread; :meth:`denoise` does a whole
    run synchronously (scripts, self-test).
    """

    def __init__(self, serverUrl: str = DEFAULT_SERVER_URL, timeout: float = 600.0) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.server = lmserver.ServerLogic(serverUrl, timeout)
        self.browser = lmbrowser.ExplanationBrowser()
        self.inputVolumeNode = None
        self.outputVolumeNode = None
        self.explanationNode = None
        self.labelMapNode = None
        self.colorNode = None
        self.highlightNode = None

    def getParameterNode(self, userDefaults: dict | None = None) -> LangMambaDenoiseParameterNode:
        """The scene's parameter node; ``userDefaults`` (attribute: value) are applied once, to a new node."""
        node = ScriptedLoadableModuleLogic.getParameterNode(self)
        parameters = LangMambaDenoiseParameterNode(node)
        if userDefaults and not node.GetAttribute(USER_DEFAULTS_ATTRIBUTE):
            for name, value in userDefaults.items():
                setattr(parameters, name, value)
        node.SetAttribute(USER_DEFAULTS_ATTRIBUTE, "applied")
        return parameters

    @property
    def explanation(self):
        """The shown explanation document (``None`` if none)."""
        return self.browser.document

    @property
    def regions(self):
        """The shown explanation's regions (table rows)."""
        return self.browser.regions

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
        elif np.issubdtype(array.dtype, np.integer) and array.size and array.min() >= -32768 and array.max() <= 32767:
            voxels = array.astype(np.int16)
        else:
            voxels = array.astype(np.float32)
        return lmnrrd.encode(voxels, lmnrrd.lps_from_ras(self.ijkToRasArray(volumeNode)), compress=compress)

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

    def denoise(
        self,
        inputVolumeNode,
        blend: float = 1.0,
        level: int = 2,
        device: str = "auto",
        explain: bool = True,
        topK: int = 3,
        progress=None,
        cancel=None,
    ):
        """Encode, upload, denoise and load in one call (blocks until the server answers)."""
        parameters = lmserver.request_parameters(blend, level, device, explain, topK)
        result = self.server.requestDenoise(self.encodeVolume(inputVolumeNode), parameters, progress, cancel)
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

    def setExplanation(self, document, textNode=None) -> None:
        """Show ``document`` (or ``None``) in the browser and keep it in a text node of the scene
        (:attr:`explanationNode`; ``textNode`` if given, e.g. one of a loaded scene); removes the old overlay."""
        self.browser.setDocument(document)
        self.showLabelMap(False)
        if document is None:
            self.explanationNode = None
            return
        if textNode is None:
            if self.explanationNode is None or self.explanationNode.GetScene() is None:
                self.explanationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTextNode", "LangMamba explanation")
            self.explanationNode.SetText(self.browser.documentText())
        else:
            self.explanationNode = textNode

    def restoreExplanation(self, textNode, volumeNode) -> None:
        """Show the explanation kept in ``textNode`` (a saved scene's) for ``volumeNode``, reusing the node."""
        document = self.browser.parse(textNode.GetText() or "", f"the explanation '{textNode.GetName()}'")
        if volumeNode is not None:
            self._checkShape(document, volumeNode)
            self.outputVolumeNode = volumeNode
        self.setExplanation(document, textNode)

    def loadExplanation(self, path: str, volumeNode=None) -> dict:
        """Open an explanation JSON file (version 1.0 or 2.0) for browsing, e.g. one exported earlier.
        ``volumeNode`` (default: the denoised output, if any) is the volume its regions lie on; its shape
        must be the document's."""
        document = self.browser.readFile(path)
        volumeNode = volumeNode or self.outputVolumeNode
        if volumeNode is not None:
            self._checkShape(document, volumeNode)
            self.outputVolumeNode = volumeNode
        self.setExplanation(document)
        return document

    @staticmethod
    def _checkShape(document: dict, volumeNode) -> None:
        shape = tuple(int(s) for s in document["volume"]["shape"])
        expected = slicer.util.arrayFromVolume(volumeNode).shape
        if shape != expected:
            raise lmexplanation.ExplanationError(
                f"the explanation is of a volume of shape {shape}, not {expected} ('{volumeNode.GetName()}')"
            )

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
        labels, table = self.browser.labelMap(level, shape, which)
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
        labelNode = self.updateLabelMap(self.browser.overlayLevel(level), which) if visible else None
        for layoutName in ("Red", "Yellow"):
            composite = self.sliceCompositeNode(layoutName)
            if composite is None:
                continue
            if labelNode is not None:
                composite.SetLabelVolumeID(labelNode.GetID())
                composite.SetLabelOpacity(opacity)
            elif self.labelMapNode is not None and composite.GetLabelVolumeID() == self.labelMapNode.GetID():
                composite.SetLabelVolumeID(None)

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
    """The module panel: server, denoise and explanation browser sections. It keeps its state in the
    scene's parameter node (:class:`LangMambaDenoiseParameterNode`) and leaves the work to the Logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.job = None
        self.shownRegions = []
        self._parameterNode = None
        self._updatingGUI = False
        self._shownServerUrl = None
        self._pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LangMambaDenoise.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LangMambaDenoiseLogic()

        table = self.ui.regionTable
        table.setColumnCount(len(TABLE_COLUMNS))
        table.setHorizontalHeaderLabels([header for header, _, _ in TABLE_COLUMNS])
        table.horizontalHeader().setStretchLastSection(True)
        table.horizontalHeader().setSortIndicatorShown(False)
        table.horizontalHeader().setSectionsClickable(True)
        table.verticalHeader().setVisible(False)

        self.ui.connectButton.clicked.connect(self.onConnect)
        self.ui.serverUrlEdit.editingFinished.connect(self.onServerUrlEdited)
        self.ui.denoiseButton.clicked.connect(self.onDenoise)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.inputSelector.currentNodeChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.blendSlider.valueChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.levelSpinBox.valueChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.topKSpinBox.valueChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.explainCheckBox.toggled.connect(self.updateParameterNodeFromGUI)
        self.ui.wordFilterEdit.textChanged.connect(self.onTableViewChanged)
        self.ui.changedOnlyCheckBox.toggled.connect(self.onTableViewChanged)
        self.ui.minConfidenceSpinBox.valueChanged.connect(self.onTableViewChanged)
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

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.job is not None:
            self.job.cancel.cancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    # --- parameter node -------------------------------------------------------------------------

    @staticmethod
    def userDefaults() -> dict:
        """The per-user settings (QSettings) a new scene's parameter node starts from."""
        settings = qt.QSettings()
        defaults = {
            "serverUrl": str(settings.value(SETTINGS_PREFIX + "ServerUrl", DEFAULT_SERVER_URL) or DEFAULT_SERVER_URL),
            "blend": float(settings.value(SETTINGS_PREFIX + "Blend", 1.0)),
            "level": int(settings.value(SETTINGS_PREFIX + "Level", 2)),
            "topK": int(settings.value(SETTINGS_PREFIX + "TopK", 3)),
            "device": str(settings.value(SETTINGS_PREFIX + "Device", "auto")),
        }
        defaults["blend"] = min(max(defaults["blend"], 0.0), 1.0)
        defaults["level"] = min(max(defaults["level"], 0), 2)
        defaults["topK"] = min(max(defaults["topK"], 1), 5)
        return defaults

    def initializeParameterNode(self) -> None:
        """Use the scene's parameter node (new ones start from the user's settings) and show its state."""
        self.setParameterNode(self.logic.getParameterNode(self.userDefaults()))
        if self._parameterNode.inputVolume is None:
            self.selectDefaultInput()

    def setParameterNode(self, parameters) -> None:
        """Observe ``parameters`` (a :class:`LangMambaDenoiseParameterNode` or ``None``) and restore from it
        the server, the volumes, the shown explanation, its table view and overlay."""
        if self._parameterNode is not None:
            self.removeObserver(
                self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode
            )
        self._parameterNode = parameters
        self._shownServerUrl = None
        if parameters is None:
            return
        self.addObserver(parameters.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()
        self._useServerUrl(report=False)
        self.restoreFromParameterNode()

    def restoreFromParameterNode(self) -> None:
        """Make the Logic show what the parameter node keeps (after a scene load or a module switch)."""
        parameters = self._parameterNode
        logic = self.logic
        logic.inputVolumeNode = parameters.inputVolume
        textNode = parameters.explanation
        if textNode is not None and textNode is not logic.explanationNode:
            volumeNode = parameters.outputVolume or parameters.inputVolume
            logic.labelMapNode, logic.colorNode = parameters.labelMap, parameters.wordColors
            logic.highlightNode = parameters.highlight
            try:
                logic.restoreExplanation(textNode, volumeNode)
            except Exception as error:
                logic.setExplanation(None)
                self.setStatus(f"Cannot show the scene's explanation: {self.errorMessage(error)}", error=True)
            else:
                self.showOverlay()
        elif textNode is None and logic.explanationNode is not None:
            logic.setExplanation(None)
        if parameters.outputVolume is not None:
            logic.outputVolumeNode = parameters.outputVolume
        self.updateTable()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        if parameters is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            if parameters.serverUrl != self._shownServerUrl:  # changed in the node, not an edit in progress
                self.ui.serverUrlEdit.setText(parameters.serverUrl)
                self._shownServerUrl = parameters.serverUrl
            self.ui.inputSelector.setCurrentNode(parameters.inputVolume)
            self.ui.blendSlider.setValue(parameters.blend)
            self.ui.levelSpinBox.setValue(parameters.level)
            self.ui.topKSpinBox.setValue(parameters.topK)
            self.ui.deviceComboBox.setCurrentIndex(max(self.ui.deviceComboBox.findText(parameters.device), 0))
            self.ui.explainCheckBox.setChecked(parameters.explain)
            self.ui.wordFilterEdit.setText(parameters.wordFilter)
            self.ui.changedOnlyCheckBox.setChecked(parameters.changedOnly)
            self.ui.minConfidenceSpinBox.setValue(parameters.minConfidence)
            self.ui.showOverlayCheckBox.setChecked(parameters.showOverlay)
            self.ui.overlayWordsComboBox.setCurrentIndex(
                max(self.ui.overlayWordsComboBox.findText(parameters.overlayWords), 0)
            )
        finally:
            self._updatingGUI = False
        self.updateButtons()

    def updateParameterNodeFromGUI(self, *unused) -> None:
        """Store the request's widgets in the parameter node (the server URL is stored when edited)."""
        parameters = self._parameterNode
        if parameters is None or self._updatingGUI:
            return
        node = parameters.parameterNode
        wasModifying = node.StartModify()
        try:
            parameters.inputVolume = self.ui.inputSelector.currentNode()
            parameters.blend = float(_get(self.ui.blendSlider, "value"))
            parameters.level = int(_get(self.ui.levelSpinBox, "value"))
            parameters.topK = int(_get(self.ui.topKSpinBox, "value"))
            parameters.device = _get(self.ui.deviceComboBox, "currentText")
            parameters.explain = bool(_get(self.ui.explainCheckBox, "checked"))
            parameters.wordFilter = _get(self.ui.wordFilterEdit, "text")
            parameters.changedOnly = bool(_get(self.ui.changedOnlyCheckBox, "checked"))
            parameters.minConfidence = float(_get(self.ui.minConfidenceSpinBox, "value"))
            parameters.showOverlay = bool(_get(self.ui.showOverlayCheckBox, "checked"))
            parameters.overlayWords = _get(self.ui.overlayWordsComboBox, "currentText")
        finally:
            node.EndModify(wasModifying)

    def storeLogicNodes(self) -> None:
        """Reference the Logic's volumes, explanation, overlay and outline from the parameter node."""
        parameters, logic = self._parameterNode, self.logic
        if parameters is None:
            return
        node = parameters.parameterNode
        wasModifying = node.StartModify()
        try:
            parameters.outputVolume = logic.outputVolumeNode
            parameters.explanation = logic.explanationNode
            parameters.labelMap = logic.labelMapNode
            parameters.wordColors = logic.colorNode
            parameters.highlight = logic.highlightNode
        finally:
            node.EndModify(wasModifying)

    # --- state ----------------------------------------------------------------------------------

    def saveSettings(self) -> None:
        """Keep the server URL and request settings as the user's defaults for new scenes."""
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

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.logic is not None:
            self.logic.setExplanation(None)
            self.logic.inputVolumeNode = self.logic.outputVolumeNode = None
            self.logic.labelMapNode = self.logic.colorNode = self.logic.highlightNode = None
        if self.isEntered():
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        if self.isEntered():
            self.initializeParameterNode()

    def isEntered(self) -> bool:
        """Whether the panel is shown (Slicer's module widget says; a bare panel always is)."""
        entered = getattr(self.parent, "isEntered", True)
        return bool(entered() if callable(entered) else entered)

    def onNodeAdded(self, caller, event) -> None:
        qt.QTimer.singleShot(0, self.selectDefaultInput)

    def onServerUrlEdited(self) -> None:
        if self._useServerUrl():
            self.saveSettings()

    def _useServerUrl(self, report: bool = True) -> bool:
        """Point the server logic at the edited URL and keep it in the parameter node; False if malformed."""
        url = _get(self.ui.serverUrlEdit, "text").strip()
        try:
            self.logic.server.setServerUrl(url)
        except lmclient.ClientError as error:
            if report:
                self.ui.serverStatusLabel.setText(str(error))
            else:
                self.setStatus(str(error), error=True)
            return False
        self._shownServerUrl = url
        if self._parameterNode is not None and self._parameterNode.serverUrl != url:
            self._parameterNode.serverUrl = url
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
        self.saveSettings()
        self.ui.serverStatusLabel.setText("Connecting...")
        server = self.logic.server

        def done(info):
            self.ui.serverStatusLabel.setText(lmserver.describe_info(info))
            self.setStatus("")

        self.startJob(
            lambda progress, cancel: server.fetchInfo(cancel=cancel),
            done,
            "Connecting...",
            onError=lambda message: self.ui.serverStatusLabel.setText("Not connected: " + message),
        )

    def onDenoise(self) -> None:
        inputNode = self.ui.inputSelector.currentNode()
        if self.job is not None or inputNode is None or not self._useServerUrl():
            return
        self.saveSettings()
        request = self._parameterNode
        try:
            parameters = lmserver.request_parameters(
                request.blend, request.level, request.device, request.explain, request.topK
            )
            fileBytes = self.logic.encodeVolume(inputNode)
        except (ValueError, lmnrrd.NrrdError) as error:
            self.setStatus(str(error), error=True)
            return
        logic, server = self.logic, self.logic.server
        self.ui.showOverlayCheckBox.setChecked(False)

        def done(result):
            outputNode = logic.applyResult(inputNode, result)
            if self._parameterNode is not None:
                self._parameterNode.shownRegion = ""
            self.storeLogicNodes()
            self.updateTable()
            explained = "" if logic.explanation is not None else " (no explanation)"
            self.setStatus(f"Denoised into '{outputNode.GetName()}'{explained}.")

        self.startJob(
            lambda progress, cancel: server.requestDenoise(fileBytes, parameters, progress, cancel),
            done,
            "Sending the input volume...",
        )

    # --- explanation browser --------------------------------------------------------------------

    def updateTable(self, *unused) -> None:
        table = self.ui.regionTable
        rows = self.filteredRegions()
        self.shownRegions = rows[:MAX_TABLE_ROWS]
        thresholds = (
            lmexplanation.confidence_thresholds(self.logic.explanation) if self.logic.explanation is not None else None
        )
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
            header.setSortIndicator(
                self.sortColumn, qt.Qt.DescendingOrder if self.sortDescending else qt.Qt.AscendingOrder
            )
        summary = self.logic.browser.summary()
        if self.logic.explanation is not None:
            shown = f"; showing {len(self.shownRegions)} of {len(rows)} matching"
            summary += shown + (" (narrow the filter to see all)" if len(rows) > MAX_TABLE_ROWS else "")
        self.ui.explanationSummaryLabel.setText(summary)
        self.ui.languageSpaceLabel.setText(self.logic.browser.languageSpaceSummary())
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
        return [
            (str(region.z), ""),
            (str(region.level), ""),
            cells[0],
            (region.output_class or "", ""),
            (region.words_text("output"), ""),
            (changed, ""),
            cells[1],
            (region.words_text("input"), ""),
            (f"{region.change_score:.3f}", ""),
        ]

    @property
    def sortColumn(self):
        """The region table's sort column (``None``: document order), kept in the parameter node."""
        column = self._parameterNode.sortColumn if self._parameterNode is not None else -1
        return None if column < 0 else column

    @property
    def sortDescending(self) -> bool:
        return self._parameterNode is not None and self._parameterNode.sortDescending

    def filteredRegions(self):
        key = "document" if self.sortColumn is None else TABLE_COLUMNS[self.sortColumn][1]
        return self.logic.browser.filteredRegions(
            _get(self.ui.wordFilterEdit, "text"),
            _get(self.ui.changedOnlyCheckBox, "checked"),
            float(_get(self.ui.minConfidenceSpinBox, "value")) / 100.0,
            key,
            self.sortDescending,
        )

    def onTableViewChanged(self, *unused) -> None:
        self.updateParameterNodeFromGUI()
        self.updateTable()

    def onSortColumn(self, column: int) -> None:
        """Sort by ``column`` (descending first for probabilities and scores); a second click reverses."""
        parameters = self._parameterNode
        if parameters is None:
            return
        node = parameters.parameterNode
        wasModifying = node.StartModify()
        if column == self.sortColumn:
            parameters.sortDescending = not parameters.sortDescending
        else:
            parameters.sortColumn, parameters.sortDescending = column, TABLE_COLUMNS[column][2]
        node.EndModify(wasModifying)
        self.updateTable()

    def onRegionClicked(self, row: int, column: int = 0) -> None:
        if 0 <= row < len(self.shownRegions):
            region = self.shownRegions[row]
            self.logic.jumpToRegion(region)
            if self._parameterNode is not None:
                self._parameterNode.shownRegion = regionKey(region)
            self.storeLogicNodes()
            self.setStatus(
                f"Slice {region.z}, level {region.level}: output {region.words_text('output')}; "
                f"input {region.words_text('input')}"
            )

    def shownRegion(self):
        """The region the views were last centred on (kept in the parameter node), or ``None``."""
        key = self._parameterNode.shownRegion if self._parameterNode is not None else ""
        if not key or self.logic.explanation is None:
            return None
        return self.logic.browser.findRegion(*(int(v) for v in key.split(",")))

    def onOverlayChanged(self, *unused) -> None:
        self.updateParameterNodeFromGUI()
        self.showOverlay()

    def showOverlay(self) -> None:
        """Show or hide the word overlay as the parameter node says."""
        parameters = self._parameterNode
        if self.logic.explanation is None or parameters is None:
            return
        try:
            self.logic.showLabelMap(parameters.showOverlay, parameters.level, parameters.overlayWords)
        except Exception as error:
            self.setStatus(self.errorMessage(error), error=True)
        self.storeLogicNodes()

    def _savePath(self, caption: str, suffix: str, fileFilter: str) -> str:
        base = self.logic.outputVolumeNode.GetName() if self.logic.outputVolumeNode is not None else "langmamba"
        start = os.path.join(os.path.expanduser("~"), f"{base} explanation{suffix}")
        return qt.QFileDialog.getSaveFileName(self.parent, caption, start, fileFilter) or ""

    def onExportCsv(self) -> None:
        path = self._savePath("Export regions as CSV", ".csv", "CSV files (*.csv)")
        if not path:
            return
        try:
            count = self.logic.browser.exportCSV(path, self.filteredRegions())
            self.setStatus(f"Saved {count} regions to {path}")
        except Exception as error:
            self.setStatus(f"Export failed: {error}", error=True)

    def onOpenJson(self) -> None:
        path = (
            qt.QFileDialog.getOpenFileName(
                self.parent, "Open an explanation JSON", os.path.expanduser("~"), "JSON files (*.json)"
            )
            or ""
        )
        if not path:
            return
        try:
            self.logic.loadExplanation(path, self.logic.outputVolumeNode or self.ui.inputSelector.currentNode())
            self.setStatus(f"Opened the explanation {path}")
        except Exception as error:
            self.setStatus(f"Cannot open the explanation: {error}", error=True)
        if self._parameterNode is not None:
            self._parameterNode.shownRegion = ""
        self.storeLogicNodes()
        self.updateTable()

    def onExportJson(self) -> None:
        path = self._savePath("Export explanation as JSON", ".json", "JSON files (*.json)")
        if not path:
            return
        try:
            self.logic.browser.exportJSON(path)
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
        info = logic.server.fetchInfo()
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
        labelNode = logic.updateLabelMap(logic.browser.overlayLevel(2))
        self.assertEqual(slicer.util.arrayFromVolume(labelNode).shape, hu.shape)
        self.delayDisplay("Test passed")
