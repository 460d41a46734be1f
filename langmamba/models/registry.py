"""The model registry: the classes a checkpoint may name, by registered name.

A model class takes part by being decorated with :func:`register_model`; :mod:`langmamba.checkpoint` then
saves its name and rebuilds it from that name. The registry lives apart from the serialiser so that model
modules depend on it alone, never on the checkpoint code that depends on them.
"""

from __future__ import annotations

from typing import Any, TypeVar

from torch import nn

from langmamba.errors import ConfigError

MODEL_REGISTRY: dict[str, type[nn.Module]] = {}
"""Model classes that checkpoints can name, by registered name."""

ModelClass = TypeVar("ModelClass", bound=type)


def register_model(cls: ModelClass | None = None, *, name: str | None = None) -> Any:
    """Class decorator adding a model class to :data:`MODEL_REGISTRY` (``@register_model`` or
    ``@register_model(name="...")``; the default name is the class name).

    Raises:
        ConfigError: the name is already registered by a different class.
    """

    def decorate(model_cls: ModelClass) -> ModelClass:
        key = name or model_cls.__name__
        existing = MODEL_REGISTRY.get(key)
        if existing is not None and (existing.__module__, existing.__qualname__) != (
            model_cls.__module__,
            model_cls.__qualname__,
        ):
            raise ConfigError(
                f"model name {key!r} is already registered by {existing.__module__}.{existing.__qualname__}"
            )
        MODEL_REGISTRY[key] = model_cls
        return model_cls

    return decorate(cls) if cls is not None else decorate


def registered_name(model: nn.Module) -> str | None:
    """The name ``type(model)`` is registered under, or ``None`` when it is not registered."""
    return next((key for key, cls in MODEL_REGISTRY.items() if type(model) is cls), None)
