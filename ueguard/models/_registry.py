"""Registry of ueguard's own architectures (timm-style).

Each architecture is a tiny builder function ``name(num_classes) -> ClassifierModel`` decorated with
:func:`register_model`; the function's name is the model name. Names that are not registered here
are resolved through timm by :func:`ueguard.models.create_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .classifier import ClassifierModel

ModelBuilder = Callable[[int], "ClassifierModel"]

_model_entrypoints: dict[str, ModelBuilder] = {}


def register_model(fn: ModelBuilder) -> ModelBuilder:
    """Register ``fn`` under its own ``__name__``; a name may be registered only once."""
    name = fn.__name__
    if name in _model_entrypoints:
        raise ValueError(f"model {name!r} is already registered")
    _model_entrypoints[name] = fn
    return fn


def list_models() -> list[str]:
    """ueguard's own architecture names, sorted (timm names are accepted by create_model too)."""
    return sorted(_model_entrypoints)


def is_model(name: str) -> bool:
    """Whether ``name`` is one of ueguard's own architectures."""
    return name in _model_entrypoints


def model_entrypoint(name: str) -> ModelBuilder:
    """The builder registered under ``name``."""
    try:
        return _model_entrypoints[name]
    except KeyError:
        raise ValueError(f"unknown ueguard model {name!r}; registered: {', '.join(list_models())}") from None


def default_recipe(name: str) -> str:
    """The verify recipe (:mod:`ueguard.engine.recipes`) an architecture trains with when none is asked for:
    the builder's ``default_recipe`` attribute, else ``standard`` (timm names included)."""
    return getattr(_model_entrypoints.get(name), "default_recipe", "standard")
