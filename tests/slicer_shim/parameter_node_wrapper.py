"""``slicer.parameterNodeWrapper`` stand-in (PyPI ``slicer-core`` lacks it): the part of its API the
LangMamba module uses, for the tests only.

``@parameterNodeWrapper`` turns a class of annotated attributes into a typed view of a
``vtkMRMLScriptedModuleNode``: ``Wrapper(node)`` writes each attribute's default where the node has no
value yet, ``wrapper.parameterNode`` is the node, and attribute reads and writes go to the node, so a saved
scene keeps them. ``int``, ``float``, ``str`` and ``bool`` are node parameters (text); MRML node types
(``Optional`` or not: as in Slicer's module template, a node attribute is ``None`` until set) are node
references named like the attribute. ``Annotated`` extras:
:class:`Default` and :class:`WithinRange`.
"""

from __future__ import annotations

import typing

__all__ = ["Default", "WithinRange", "parameterNodeWrapper"]


class Default:
    """The value an attribute takes where the parameter node has none."""

    def __init__(self, value) -> None:
        self.value = value


class WithinRange:
    """Validator: the value must lie in ``[minimum, maximum]``."""

    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"value {value} is not within [{self.minimum}, {self.maximum}]")


_SIMPLE_DEFAULTS = {int: 0, float: 0.0, str: "", bool: False}


def _is_node_type(kind) -> bool:
    import slicer

    return isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)


class _Parameter:
    def __init__(self, name: str, annotation, class_default) -> None:
        self.name = name
        extras = ()
        if typing.get_origin(annotation) is typing.Annotated:
            annotation, *extras = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Union:
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                raise TypeError(f"{name}: unions other than Optional are not supported")
            annotation = args[0]
        self.kind = annotation
        self.node = _is_node_type(annotation)
        if not self.node and annotation not in _SIMPLE_DEFAULTS:
            raise TypeError(f"{name}: unsupported parameter type {annotation!r}")
        self.validators = [e for e in extras if hasattr(e, "validate")]
        defaults = [e.value for e in extras if isinstance(e, Default)]
        if defaults:
            self.default = defaults[-1]
        elif class_default is not _MISSING:
            self.default = class_default
        else:
            self.default = None if self.node else _SIMPLE_DEFAULTS[annotation]

    def present(self, node) -> bool:
        return node.GetNodeReferenceID(self.name) is not None if self.node else node.HasParameter(self.name)

    def read(self, node):
        if self.node:
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        if self.kind is bool:
            return text == "True"
        return self.kind(text)

    def write(self, node, value) -> None:
        if self.node:
            if value is not None and not value.IsA(self.kind.__name__):
                raise TypeError(f"{self.name} must be a {self.kind.__name__}, got {value.GetClassName()}")
            node.SetNodeReferenceID(self.name, None if value is None else value.GetID())
            return
        if not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            else:
                raise TypeError(f"{self.name} must be a {self.kind.__name__}, got {value!r}")
        for validator in self.validators:
            validator.validate(value)
        node.SetParameter(self.name, repr(value) if self.kind is float else str(value))


_MISSING = object()


def parameterNodeWrapper(cls):
    """Class decorator: a typed view of a parameter node (see the module's docstring)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    parameters = {name: _Parameter(name, hint, cls.__dict__.get(name, _MISSING)) for name, hint in hints.items()}

    def __init__(self, parameterNode) -> None:
        if parameterNode is None:
            raise ValueError(f"{cls.__name__} needs a parameter node")
        object.__setattr__(self, "parameterNode", parameterNode)
        for parameter in parameters.values():
            if not parameter.present(parameterNode) and not (parameter.node and parameter.default is None):
                parameter.write(parameterNode, parameter.default)

    def make_property(parameter: _Parameter) -> property:
        return property(
            lambda self: parameter.read(self.parameterNode),
            lambda self, value: parameter.write(self.parameterNode, value),
        )

    cls.__init__ = __init__
    for name, parameter in parameters.items():
        setattr(cls, name, make_property(parameter))
    cls.allParameters = dict(parameters)
    return cls
