"""Stand-ins for the CTK widgets of the LangMamba module's ``.ui`` file (PySide6).

Only the properties, methods and signals the ``.ui`` file and the module use are provided, with CTK's
names, so the real ``.ui`` file loads unchanged.
"""

from __future__ import annotations

from PySide6.QtCore import Property, Signal
from PySide6.QtWidgets import QDoubleSpinBox, QGroupBox, QWidget


class ctkCollapsibleButton(QGroupBox):
    """A titled section; ``text`` is the title, ``collapsed`` hides the content."""

    contentsCollapsed = Signal(bool)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._collapsed = False

    def _text(self) -> str:
        return self.title()

    def _setText(self, text: str) -> None:
        self.setTitle(text)

    def _isCollapsed(self) -> bool:
        return self._collapsed

    def _setCollapsed(self, collapsed: bool) -> None:
        self._collapsed = bool(collapsed)
        for child in self.findChildren(QWidget):
            if child.parent() is self:
                child.setVisible(not self._collapsed)
        self.contentsCollapsed.emit(self._collapsed)

    text = Property(str, _text, _setText)
    collapsed = Property(bool, _isCollapsed, _setCollapsed)


class ctkSliderWidget(QDoubleSpinBox):
    """A slider with a spin box in CTK; here the spin box, with CTK's property names and
    ``valueChanged(double)``."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._pageStep = 0.1

    def _getPageStep(self) -> float:
        return self._pageStep

    def _setPageStep(self, step: float) -> None:
        self._pageStep = float(step)

    pageStep = Property(float, _getPageStep, _setPageStep)
