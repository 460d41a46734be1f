"""Stand-ins for Slicer's qMRMLWidget and qMRMLNodeComboBox (PySide6), with the properties, methods and
signals the LangMamba module's ``.ui`` file and code use."""

from __future__ import annotations

from PySide6.QtCore import Property, Signal
from PySide6.QtWidgets import QComboBox, QWidget


class qMRMLWidget(QWidget):
    """A widget that hands the MRML scene on to its children (``mrmlSceneChanged``)."""

    mrmlSceneChanged = Signal(object)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class qMRMLNodeComboBox(QComboBox):
    """Lists the scene's nodes of ``nodeTypes`` (kept up to date through scene observers)."""

    currentNodeChanged = Signal(object)
    currentNodeIDChanged = Signal(str)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._scene = None
        self._observers: list[int] = []
        self._nodeTypes: list[str] = []
        self._noneEnabled = False
        self._showChildNodeTypes = True
        self._addEnabled = self._removeEnabled = self._renameEnabled = False
        self._ids: list[str | None] = []
        self.currentIndexChanged.connect(self._emitCurrent)

    def _get(name):
        return lambda self: getattr(self, name)

    def _set(name, cast):
        def setter(self, value):
            setattr(self, name, cast(value))
            self._refresh()

        return setter

    nodeTypes = Property("QStringList", _get("_nodeTypes"), _set("_nodeTypes", list))
    noneEnabled = Property(bool, _get("_noneEnabled"), _set("_noneEnabled", bool))
    showChildNodeTypes = Property(bool, _get("_showChildNodeTypes"), _set("_showChildNodeTypes", bool))
    addEnabled = Property(bool, _get("_addEnabled"), _set("_addEnabled", bool))
    removeEnabled = Property(bool, _get("_removeEnabled"), _set("_removeEnabled", bool))
    renameEnabled = Property(bool, _get("_renameEnabled"), _set("_renameEnabled", bool))
    del _get, _set

    def setMRMLScene(self, scene) -> None:
        if self._scene is not None:
            for tag in self._observers:
                self._scene.RemoveObserver(tag)
        self._scene, self._observers = scene, []
        if scene is not None:
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent):
                self._observers.append(scene.AddObserver(event, lambda caller, event: self._refresh()))
        self._refresh()

    def mrmlScene(self):
        return self._scene

    def _accepts(self, node) -> bool:
        if node.GetHideFromEditors():
            return False
        for nodeType in self._nodeTypes:
            if node.GetClassName() == nodeType or (self._showChildNodeTypes and node.IsA(nodeType)):
                return True
        return False

    def _refresh(self) -> None:
        current = self.currentNodeID()
        nodes = []
        if self._scene is not None:
            for i in range(self._scene.GetNumberOfNodes()):
                node = self._scene.GetNthNode(i)
                if self._accepts(node):
                    nodes.append(node)
        self.blockSignals(True)
        self.clear()
        self._ids = ([None] if self._noneEnabled else []) + [node.GetID() for node in nodes]
        if self._noneEnabled:
            self.addItem("None")
        for node in nodes:
            self.addItem(node.GetName())
        index = self._ids.index(current) if current in self._ids else (-1 if not self._ids else 0)
        self.setCurrentIndex(index)
        self.blockSignals(False)
        if self.currentNodeID() != current:
            self._emitCurrent()

    def currentNodeID(self):
        index = self.currentIndex()
        return self._ids[index] if 0 <= index < len(self._ids) else None

    def currentNode(self):
        nodeID = self.currentNodeID()
        return self._scene.GetNodeByID(nodeID) if (self._scene is not None and nodeID) else None

    def setCurrentNode(self, node) -> None:
        nodeID = node.GetID() if node is not None else None
        if nodeID in self._ids:
            self.setCurrentIndex(self._ids.index(nodeID))

    def setCurrentNodeID(self, nodeID) -> None:
        if nodeID in self._ids:
            self.setCurrentIndex(self._ids.index(nodeID))

    def _emitCurrent(self, *unused) -> None:
        self.currentNodeChanged.emit(self.currentNode())
        self.currentNodeIDChanged.emit(self.currentNodeID() or "")
