"""``slicer.ScriptedLoadableModule`` stand-in: the four base classes of a scripted module with the
members the LangMamba module uses (``parent``, ``layout``, ``resourcePath``, ``getParameterNode``,
``delayDisplay``)."""

from __future__ import annotations

import logging
import os
import sys
import types
import unittest

import qt


class ScriptedLoadableModule:
    def __init__(self, parent=None) -> None:
        self.parent = parent if parent is not None else types.SimpleNamespace()
        self.moduleName = self.__class__.__name__
        self.parent.title = self.moduleName
        self.parent.categories = []
        self.parent.dependencies = []
        self.parent.contributors = []
        self.parent.helpText = ""
        self.parent.acknowledgementText = ""

    def resourcePath(self, filename: str) -> str:
        return _resource_path(self, filename)


def _resource_path(instance, filename: str) -> str:
    module = sys.modules[type(instance).__module__]
    return os.path.join(os.path.dirname(os.path.abspath(module.__file__)), "Resources", filename)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        if parent is None:
            parent = qt.QWidget()
            parent.setLayout(qt.QVBoxLayout())
        self.parent = parent
        self.layout = parent.layout()
        self.moduleName = self.__class__.__name__[: -len("Widget")]

    def resourcePath(self, filename: str) -> str:
        return _resource_path(self, filename)

    def setup(self) -> None:
        """Slicer adds its developer section (Reload / Reload and Test) here in developer mode."""

    def cleanup(self) -> None:
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        self.moduleName = self.__class__.__name__[: -len("Logic")]

    def getParameterNode(self):
        """The module's singleton ``vtkMRMLScriptedModuleNode`` of the current scene, added if missing."""
        import slicer

        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is not None:
            return node
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetSingletonTag(self.moduleName)
        return slicer.mrmlScene.AddNode(node)


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, msec: int = 0) -> None:
        logging.info(message)
