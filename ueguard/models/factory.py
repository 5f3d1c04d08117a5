"""``create_model``: one entry point for ueguard's own architectures and for every timm model.

Names registered in :mod:`ueguard.models._registry` are built by their builder; any other name is
handed to ``timm.create_model`` and wrapped in the same :class:`ClassifierModel` interface, with
timm's ``pretrained_cfg`` mean/std as the built-in normalisation.

Weights come from a local file (``weights=``) or, for timm models, from the timm hub
(``pretrained=True``). The hub path is meant to fail fast and clearly when offline:
huggingface_hub otherwise retries network errors with back-off for about 45 s per model before
giving up, so the hub is probed once, with a short timeout, before timm is asked to download.
"""

from __future__ import annotations

import difflib
import os
import urllib.error
import urllib.request
from types import ModuleType
from typing import TYPE_CHECKING

from torch import nn

from ._checkpoint import load_weights
from ._registry import is_model, list_models, model_entrypoint
from .classifier import ClassifierModel, StageLayout
from .resnet_cifar import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from timm.models import PretrainedCfg

_HUB_PROBE_TIMEOUT_S = 5.0

#: The pretrained surrogate a method that needs one uses when none is given: timm's ImageNet-1k
#: ResNet-18 (the papers' architecture, hub weights, a stage layout ueguard knows); ImageNet features
#: transfer to small photos too, and at 32 px it is what a data owner without a CIFAR checkpoint has.
DEFAULT_PRETRAINED = "resnet18.a1_in1k"
#: For ueguard's own architectures (no hub weights): the timm model that has them.
PRETRAINED_EQUIVALENT = {"resnet18_cifar": "resnet18.a1_in1k", "resnet18_cifar_slim": "resnet18.a1_in1k"}

_TIMM_RESNET_STAGES: StageLayout = (
    ("stem", ("conv1", "bn1", "act1", "maxpool")),
    ("layer1", ("layer1",)),
    ("layer2", ("layer2",)),
    ("layer3", ("layer3",)),
    ("layer4", ("layer4",)),
    ("head", ("fc",)),
)


def create_model(
    name: str,
    num_classes: int,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
) -> ClassifierModel:
    """Build model ``name`` with a ``num_classes``-way head, taking [0, 1] images.

    Args:
        name: one of :func:`list_models` (ueguard's architectures) or any ``timm.list_models()``
            name, optionally with a pretrained tag (``resnet18.tv_in1k``).
        num_classes: size of the head.
        weights: a local ``.pth``/``.pt``/``.th``/``.safetensors`` file to load (a ueguard checkpoint
            or the inner network's state dict). A head of another size is left freshly initialised.
        pretrained: download timm's pretrained weights (timm models only; needs network access).

    Raises:
        ValueError: unknown name, bad arguments, or ``pretrained`` for a ueguard architecture.
        RuntimeError: pretrained weights could not be downloaded.
        WeightsFileError: the weights file is unreadable or does not fit the model.
    """
    if weights is not None and pretrained:
        raise ValueError("pass either weights=FILE or pretrained=True, not both")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if is_model(name):
        if pretrained:
            raise ValueError(
                f"{name} is a ueguard architecture and has no hub weights; pass --weights FILE (weights=FILE) "
                f"with a local checkpoint, or use --surrogate {PRETRAINED_EQUIVALENT.get(name, DEFAULT_PRETRAINED)} "
                "--pretrained (a timm model with hub weights)"
            )
        model = model_entrypoint(name)(num_classes)
    else:
        model = _create_timm_model(name, num_classes, pretrained)
    return model if weights is None else load_weights(model, weights)


def _create_timm_model(name: str, num_classes: int, pretrained: bool) -> ClassifierModel:
    try:
        import timm
    except ImportError:
        raise ValueError(
            f"unknown model {name!r}: ueguard's architectures are {', '.join(list_models())}; other names are "
            f"looked up in timm, which is not installed (pip install timm)"
        ) from None
    if not timm.is_model(name):
        raise ValueError(_unknown_model_message(name, timm.list_models()))
    if pretrained:
        net = _download_pretrained(timm, name, num_classes)
    else:
        net = timm.create_model(name, pretrained=False, num_classes=num_classes)
    cfg = net.pretrained_cfg
    return ClassifierModel(
        net,
        arch=name,
        mean=cfg.get("mean", IMAGENET_MEAN),
        std=cfg.get("std", IMAGENET_STD),
        stage_layout=_timm_stage_layout(timm, net),
    )


def _timm_stage_layout(timm: ModuleType, net: nn.Module) -> StageLayout | None:
    """The stage layout of a timm model, where ueguard knows it (ResNets); ``None`` otherwise."""
    return _TIMM_RESNET_STAGES if isinstance(net, timm.models.ResNet) else None


def _download_pretrained(timm: ModuleType, name: str, num_classes: int) -> nn.Module:
    failure = (
        f"could not download pretrained weights for {name} from the timm hub (offline?); "
        f"pass --weights FILE with a local checkpoint (weights=FILE in Python)"
    )
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
        # timm would silently fall back to random initialisation here.
        raise RuntimeError(f"timm has no pretrained weights for {name}; pass --weights FILE with a local checkpoint")
    try:
        _probe(_download_url(cfg))
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except OSError as exc:  # huggingface_hub, urllib and torch.hub report network failures as OSError
        raise RuntimeError(f"{failure} [{type(exc).__name__}: {exc}]") from exc


def _download_url(cfg: PretrainedCfg) -> str | None:
    """The URL timm will download from (its own source order), or ``None`` when nothing is fetched.

    Nothing is fetched for a local source, or from the Hugging Face hub in offline mode
    (``HF_HUB_OFFLINE=1``), which serves weights from the local cache and fails at once when they
    are not there.
    """
    if cfg.state_dict or cfg.file:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import constants
        except ImportError:
            return cfg.url or None
        return None if constants.HF_HUB_OFFLINE else constants.ENDPOINT
    return cfg.url or None


def _probe(url: str | None) -> None:
    """Raise ``OSError`` unless ``url``'s server answers within the probe timeout."""
    if url is None:
        return
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=_HUB_PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass  # an HTTP status, even an error, means the server is reachable


def _unknown_model_message(name: str, timm_names: list[str]) -> str:
    ours = list_models()
    close = difflib.get_close_matches(name, ours + timm_names, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (
        f"unknown model {name!r}. ueguard's architectures: {', '.join(ours)}. Any timm model name is "
        f"accepted too (see timm.list_models()).{hint}"
    )
