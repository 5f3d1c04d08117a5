"""Reading, writing and fingerprinting model weights files.

Accepted inputs: ``.pth`` / ``.pt`` / ``.th`` (``torch.load(weights_only=True)``: no code runs from
the file) and ``.safetensors``. A file may hold a bare state dict or a training checkpoint that
wraps one (under ``state_dict``, ``model``, ``model_state_dict`` or ``net``); ``module.``
(DataParallel) and ``_orig_mod.`` (torch.compile) prefixes are stripped. Keys may be those of the
inner network (akamaster, torchvision, timm files) or of a whole :class:`ClassifierModel` (``net.*``
and ``normalize.*``, as :func:`save_checkpoint` writes them).

A checkpoint whose head does not fit the model (another number of classes, or no head at all)
loads everything else and leaves the model's fresh head in place: that is transfer learning, the
common case for pretrained priors. Any other mismatch is an error naming the file and the keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .classifier import ClassifierModel

logger = logging.getLogger(__name__)

_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_NET_PREFIX = "net."
_NORMALIZE_PREFIX = "normalize."
_KEYS_SHOWN = 5


class WeightsFileError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    """What a weights file holds, after unwrapping. ``arch``/``num_classes`` only from ueguard's files."""

    path: Path
    state_dict: dict[str, Tensor]
    arch: str | None = None
    num_classes: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _read_torch(path: Path) -> Checkpoint:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    fields = obj if isinstance(obj, Mapping) else {}
    return Checkpoint(
        path=path,
        state_dict=_unwrap_state_dict(obj, path),
        arch=fields.get("arch") if isinstance(fields.get("arch"), str) else None,
        num_classes=fields.get("num_classes") if isinstance(fields.get("num_classes"), int) else None,
        meta=dict(fields.get("meta") or {}),
    )


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    return Checkpoint(
        path=path,
        state_dict=_unwrap_state_dict(load_file(str(path), device="cpu"), path),
        arch=header.get("arch"),
        num_classes=int(header["num_classes"]) if "num_classes" in header else None,
        meta=json.loads(header.get("meta", "{}")),
    )


def _write_torch(path: Path, state_dict: dict[str, Tensor], arch: str, num_classes: int, meta: dict) -> None:
    torch.save({"state_dict": state_dict, "arch": arch, "num_classes": num_classes, "meta": meta}, path)


def _write_safetensors(path: Path, state_dict: dict[str, Tensor], arch: str, num_classes: int, meta: dict) -> None:
    from safetensors.torch import save_file

    header = {"arch": arch, "num_classes": str(num_classes), "meta": json.dumps(meta)}
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path), metadata=header)


_READERS: dict[str, Callable[[Path], Checkpoint]] = {
    ".pth": _read_torch,
    ".pt": _read_torch,
    ".th": _read_torch,
    ".safetensors": _read_safetensors,
}
_WRITERS: dict[str, Callable[[Path, dict[str, Tensor], str, int, dict], None]] = {
    ".pth": _write_torch,
    ".pt": _write_torch,
    ".th": _write_torch,
    ".safetensors": _write_safetensors,
}


def _format_of(path: Path, table: Mapping[str, Any]) -> Any:
    try:
        return table[path.suffix.lower()]
    except KeyError:
        raise WeightsFileError(
            f"{path}: unsupported weights file type {path.suffix!r}; use one of {', '.join(table)}"
        ) from None


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """The tensors of ``obj``, with training containers unwrapped and wrapper prefixes stripped."""
    while isinstance(obj, Mapping):
        container = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if container is None:
            break
        obj = obj[container]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsFileError(
            f"{path}: holds no state dict (expected a mapping of names to tensors, possibly under one of "
            f"{', '.join(_CONTAINER_KEYS)}); found {type(obj).__name__}"
        )
    return {_strip_wrapper_prefixes(key): value for key, value in obj.items()}


def _strip_wrapper_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and unwrap a weights file (see the module docstring for the accepted forms)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    reader = _format_of(path, _READERS)
    try:
        return reader(path)
    except WeightsFileError:
        raise
    except Exception as exc:  # a corrupt or foreign file fails in many ways (pickle, zip, json, header)
        raise WeightsFileError(f"{path}: could not read weights file ({type(exc).__name__}: {exc})") from exc


def save_checkpoint(model: ClassifierModel, path: str | os.PathLike, **meta: Any) -> Path:
    """Write ``model`` so that ``create_model(model.arch, model.num_classes, weights=path)`` restores it.

    The file holds the whole :class:`ClassifierModel` state dict (``net.*`` and ``normalize.*``),
    ``arch``, ``num_classes`` and ``meta``. ``meta`` must be JSON-serialisable (it goes into run
    manifests, and into the safetensors header for ``.safetensors`` paths).
    """
    path = Path(path)
    writer = _format_of(path, _WRITERS)
    try:
        json.dumps(meta)
    except TypeError as exc:
        raise TypeError(f"save_checkpoint meta must be JSON-serialisable: {exc}") from None
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    writer(path, state_dict, model.arch, model.num_classes, meta)
    return path


def load_weights(model: ClassifierModel, path: str | os.PathLike) -> ClassifierModel:
    """Load a weights file into ``model`` in place and return it.

    A head that does not fit is skipped with a warning (see the module docstring); BatchNorm
    ``num_batches_tracked`` counters, absent from older files, may be missing.
    """
    checkpoint = read_checkpoint(path)
    if checkpoint.arch is not None and checkpoint.arch != model.arch:
        raise WeightsFileError(f"{checkpoint.path}: was saved from a {checkpoint.arch!r} model, not {model.arch!r}")
    net_state, normalize_state = _split_wrapper_keys(checkpoint)
    if normalize_state:
        _check_keys(
            checkpoint.path, model.arch, model.normalize.state_dict(), normalize_state, prefix=_NORMALIZE_PREFIX
        )
    _load_net_state(model, net_state, checkpoint.path)
    if normalize_state:
        model.normalize.load_state_dict(normalize_state)
    return model


def _split_wrapper_keys(checkpoint: Checkpoint) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(inner-network state, normalisation state): a ClassifierModel file is split; others are all network."""
    state = checkpoint.state_dict
    if not any(k.startswith((_NET_PREFIX, _NORMALIZE_PREFIX)) for k in state):
        return state, {}
    if foreign := [k for k in state if not k.startswith((_NET_PREFIX, _NORMALIZE_PREFIX))]:
        raise WeightsFileError(
            f"{checkpoint.path}: mixes ueguard model keys (net.*, normalize.*) with others: {_few(foreign)}"
        )
    net_state = {k[len(_NET_PREFIX) :]: v for k, v in state.items() if k.startswith(_NET_PREFIX)}
    normalize_state = {k[len(_NORMALIZE_PREFIX) :]: v for k, v in state.items() if k.startswith(_NORMALIZE_PREFIX)}
    return net_state, normalize_state


def _load_net_state(model: ClassifierModel, state: dict[str, Tensor], path: Path) -> None:
    net = model.net
    expected = net.state_dict()
    head_prefix = _module_name(net, model.head) + "."
    head_expected = {k: v.shape for k, v in expected.items() if k.startswith(head_prefix)}
    head_found = {k: v.shape for k, v in state.items() if k.startswith(head_prefix)}
    head_fits = head_found == head_expected
    if not head_fits:
        state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
        expected = {k: v for k, v in expected.items() if not k.startswith(head_prefix)}
    _check_keys(path, model.arch, expected, state, prefix=_NET_PREFIX)
    if not head_fits:
        logger.warning(
            "%s: head does not fit %s with %d classes (file: %s; model: %s); loading all but the head, "
            "which stays freshly initialised",
            path,
            model.arch,
            model.num_classes,
            _shapes(head_found) or "no head",
            _shapes(head_expected),
        )
    net.load_state_dict(state, strict=False)


def _check_keys(
    path: Path, arch: str, expected: Mapping[str, Tensor], found: Mapping[str, Tensor], prefix: str
) -> None:
    missing = [k for k in expected if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k} {tuple(found[k].shape)} vs {tuple(expected[k].shape)}"
        for k in found
        if k in expected and found[k].shape != expected[k].shape
    ]
    problems = [
        f"{what}: {_few([prefix + k for k in keys])}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", mismatched))
        if keys
    ]
    if problems:
        raise WeightsFileError(f"{path}: does not fit {arch}; " + "; ".join(problems))


def _module_name(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in root.named_modules() if module is target)


def _shapes(shapes: Mapping[str, torch.Size]) -> str:
    return ", ".join(f"{k} {tuple(s)}" for k, s in shapes.items())


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    return f"{shown} (+{len(keys) - _KEYS_SHOWN} more)" if len(keys) > _KEYS_SHOWN else shown


def weights_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, for the run manifest."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(model: nn.Module | Mapping[str, Tensor]) -> str:
    """Hex sha256 over a state dict's names, dtypes, shapes and values, in sorted key order.

    Independent of device and of how the tensors are laid out in memory, so the same weights give
    the same hash on any machine.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
