"""ueguard's model zoo: CIFAR ResNets and a fast VGG of its own plus every timm model, behind one factory.

Every model is a :class:`ClassifierModel` taking float images in [0, 1] (N×3×H×W) and normalising
internally, so no caller ever normalises. ``create_model(name, num_classes, weights=..., pretrained=...)``
builds one; ``list_models()`` names ueguard's own architectures (timm names are accepted too).
"""

from . import fastvgg, resnet_cifar  # registers ueguard's architectures
from ._checkpoint import (
    Checkpoint,
    WeightsFileError,
    load_weights,
    read_checkpoint,
    save_checkpoint,
    state_dict_sha256,
    weights_sha256,
)
from ._registry import default_recipe, is_model, list_models, register_model
from .classifier import ClassifierModel, Normalize, StageLayout
from .factory import DEFAULT_PRETRAINED, create_model

__all__ = [
    "DEFAULT_PRETRAINED",
    "Checkpoint",
    "ClassifierModel",
    "Normalize",
    "StageLayout",
    "WeightsFileError",
    "create_model",
    "default_recipe",
    "fastvgg",
    "is_model",
    "list_models",
    "load_weights",
    "read_checkpoint",
    "register_model",
    "resnet_cifar",
    "save_checkpoint",
    "state_dict_sha256",
    "weights_sha256",
]
