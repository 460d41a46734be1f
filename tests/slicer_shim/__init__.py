"""A thin stand-in for the parts of 3D Slicer's application that a scripted module needs, so the
LangMamba Denoise module's real code runs in tests without Slicer (which cannot be installed here).

- MRML, logic and ``slicer.util`` come from the real Slicer libraries of PyPI's ``slicer-core``.
- ``qt`` and ``ctk`` are PythonQt-like modules over PySide6 (:mod:`slicer_shim.qt`, :mod:`slicer_shim.ctk`).
- ``slicer.ScriptedLoadableModule``, ``slicer.app`` (application logic, slice logics of the Red, Yellow
  and Green views, layout and colour logic, as Slicer's application sets them up), ``qMRMLWidget``, a
  ``qMRMLNodeComboBox`` stand-in and ``slicer.parameterNodeWrapper`` (:mod:`slicer_shim.parameter_node_wrapper`)
  are provided here.

:func:`install` puts them in place; :func:`new_scene` gives a fresh scene set up like Slicer's.
"""

from __future__ import annotations

import os
import sys
import types

from . import ctk as _ctk
from . import qt as _qt

_STATE: dict = {}
_DEFAULT_ORIENTATION = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}


def install(settings_dir: str | None = None) -> types.ModuleType:
    """Register ``qt``, ``ctk`` and the Slicer application stand-ins; return the ``slicer`` module.

    ``settings_dir`` keeps QSettings (INI files) out of the user's home.
    """
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.modules["qt"] = _qt
    sys.modules["ctk"] = _ctk
    import slicer
    import slicer.util

    from . import mrml_widgets, parameter_node_wrapper, scripted_module

    _qt.CUSTOM_WIDGETS[:] = [
        _ctk.ctkCollapsibleButton,
        _ctk.ctkSliderWidget,
        mrml_widgets.qMRMLWidget,
        mrml_widgets.qMRMLNodeComboBox,
    ]
    slicer.qMRMLWidget = mrml_widgets.qMRMLWidget
    slicer.qMRMLNodeComboBox = mrml_widgets.qMRMLNodeComboBox
    slicer.ScriptedLoadableModule = scripted_module
    sys.modules["slicer.ScriptedLoadableModule"] = scripted_module
    if not hasattr(slicer, "parameterNodeWrapper"):
        slicer.parameterNodeWrapper = parameter_node_wrapper
        sys.modules["slicer.parameterNodeWrapper"] = parameter_node_wrapper
    slicer.util.childWidgetVariables = _child_widget_variables

    application = _qt.QApplication.instance() or _qt.QApplication(["slicer-shim"])
    application.setOrganizationName("LangMambaTests")
    application.setApplicationName("SlicerShim")
    if settings_dir is not None:
        _qt.QSettings.setDefaultFormat(_qt.QSettings.IniFormat)
        _qt.QSettings.setPath(_qt.QSettings.IniFormat, _qt.QSettings.UserScope, settings_dir)
    _STATE["application"] = application
    if not hasattr(slicer, "app"):
        slicer.app = SlicerApp(application)
    if not hasattr(slicer, "modules"):
        slicer.modules = types.SimpleNamespace()
    if getattr(slicer, "mrmlScene", None) is None:
        new_scene()
    return slicer


def _child_widget_variables(widget):
    """``slicer.util.childWidgetVariables``: PythonQt reads ``objectName`` as ``name``."""
    ui = types.SimpleNamespace()
    for child in widget.findChildren(_qt.QObject):
        if child.objectName():
            setattr(ui, child.objectName(), child)
    return ui


class SlicerApp:
    """``slicer.app``: the Qt application plus Slicer's application logic of the current scene."""

    def __init__(self, application) -> None:
        self._application = application
        self._logic = None

    def applicationLogic(self):
        return self._logic

    def processEvents(self) -> None:
        _qt.QApplication.processEvents()

    def layoutManager(self):
        return None


def new_scene():
    """A new ``slicer.mrmlScene`` set up like Slicer's application does it: application logic with the
    selection and interaction nodes, default colour tables, a layout node and slice logics (slice and
    slice composite nodes) for the Red, Yellow and Green views, in the conventional layout."""
    import slicer
    import vtk

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    default_slice = slicer.vtkMRMLSliceNode()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    scene.AddDefaultNode(default_slice)
    logic = slicer.vtkSlicerApplicationLogic()
    logic.SetMRMLScene(scene)
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    logic.SetColorLogic(colors)
    layout = slicer.vtkMRMLLayoutLogic()
    layout.SetMRMLScene(scene)
    layout.GetLayoutNode().SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)
    slice_logics = vtk.vtkCollection()
    keep = []
    for name in ("Red", "Yellow", "Green"):
        slice_node = scene.GetSingletonNode(name, "vtkMRMLSliceNode")
        slice_node.SetOrientation(_DEFAULT_ORIENTATION[name])
        slice_node.SetMappedInLayout(1)
        slice_logic = slicer.vtkMRMLSliceLogic()
        slice_logic.SetMRMLApplicationLogic(logic)
        slice_logic.SetMRMLScene(scene)
        slice_logic.SetSliceNode(slice_node)
        if slice_logic.GetSliceCompositeNode() is None:
            composite = slicer.vtkMRMLSliceCompositeNode()
            composite.SetLayoutName(name)
            composite.SetSingletonTag(name)
            slice_logic.SetSliceCompositeNode(scene.AddNode(composite))
        slice_logics.AddItem(slice_logic)
        keep.append(slice_logic)
    logic.SetSliceLogics(slice_logics)
    if hasattr(slicer, "app"):
        slicer.app._logic = logic

    _STATE["scene"] = (scene, logic, colors, layout, slice_logics, keep)
    return scene
