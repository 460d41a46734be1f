"""The ``qt`` module of 3D Slicer's PythonQt, as far as the LangMamba module uses it, over PySide6.

Everything of QtCore, QtGui, QtWidgets and QtNetwork is re-exported. Two PythonQt behaviours are kept:
``QUiLoader`` builds Slicer's custom widgets (``ctk``/``qMRML`` stand-ins) and wires the ``.ui`` file's
``<connections>`` by name (their C++ signatures such as ``vtkMRMLScene*`` mean nothing to PySide), and
``QFileDialog.getSaveFileName`` returns the path alone, as PythonQt does.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree

from PySide6.QtCore import *  # noqa: F403
from PySide6.QtCore import QBuffer, QByteArray, QFile, QIODevice
from PySide6.QtGui import *  # noqa: F403
from PySide6.QtNetwork import *  # noqa: F403
from PySide6.QtUiTools import QUiLoader as _QUiLoader
from PySide6.QtWidgets import *  # noqa: F403
from PySide6.QtWidgets import QFileDialog as _QFileDialog
from PySide6.QtWidgets import QWidget

CUSTOM_WIDGETS: list[type] = []
"""Classes QUiLoader can build by name (filled by :mod:`slicer_shim`)."""


class QUiLoader(_QUiLoader):
    """QUiLoader that knows Slicer's custom widgets and connects ``<connections>`` by signal/slot name."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        for cls in CUSTOM_WIDGETS:
            self.registerCustomWidget(cls)

    def load(self, source, parentWidget=None):
        if isinstance(source, QFile):
            if not source.isOpen():
                source.open(QIODevice.ReadOnly)
            data = bytes(source.readAll())
        else:
            with open(source, "rb") as stream:
                data = stream.read()
        root = ElementTree.fromstring(data)
        connections = []
        block = root.find("connections")
        if block is not None:
            for item in block.findall("connection"):
                connections.append(tuple(item.findtext(key) for key in ("sender", "signal", "receiver", "slot")))
            root.remove(block)
        buffer = QBuffer()
        buffer.setData(QByteArray(ElementTree.tostring(root)))
        buffer.open(QIODevice.ReadOnly)
        widget = super().load(buffer, parentWidget)
        if widget is None:
            return None
        for sender, signal, receiver, slot in connections:
            source_object = widget if widget.objectName() == sender else widget.findChild(QObject, sender)
            target = widget if widget.objectName() == receiver else widget.findChild(QObject, receiver)
            if source_object is None or target is None:
                raise RuntimeError(f"the .ui file connects unknown widgets {sender!r} -> {receiver!r}")
            getattr(source_object, signal.split("(")[0]).connect(getattr(target, slot.split("(")[0]))
        return widget


class QFileDialog(_QFileDialog):
    """PythonQt's static dialogs return the chosen path only (PySide returns ``(path, filter)``)."""

    @staticmethod
    def getSaveFileName(parent=None, caption="", directory="", filter=""):
        return _QFileDialog.getSaveFileName(parent, caption, directory, filter)[0]

    @staticmethod
    def getOpenFileName(parent=None, caption="", directory="", filter=""):
        return _QFileDialog.getOpenFileName(parent, caption, directory, filter)[0]


__all__ = [name for name in dir() if name.startswith("Q") or name == "Qt"] + ["QWidget"]
