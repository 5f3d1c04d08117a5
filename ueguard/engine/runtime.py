"""Where and how the engine runs: device, precision, memory format, seeding.

Resolved once per run (``Runtime.create``) and passed down, so no function below guesses its device.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILES = ("auto", "on", "off")


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no CUDA GPU is visible to PyTorch; use --device cpu")
    return torch.device(name)


def compile_by_default(device: torch.device) -> bool:
    """The ``compile=auto`` rule: compile on CUDA, run eagerly on CPU.

    Measured (``bench/engine.py``, forward + input-gradient backward of a PGD step): on this CPU
    ``torch.compile`` gained little or lost against eager channels-last (see
    docs/results/2026-12-01-engine.md), and its compile time (tens of seconds per graph on two cores) outweighs what it could
    save in a CPU-sized run; on GPUs compilation is the standard way to remove per-op launch overhead.
    ``--compile on`` forces it anywhere.
    """
    return device.type == "cuda"


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch, and return a dedicated CPU generator for ueguard's own draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Runtime:
    """Device and numeric settings shared by every loop of a run.

    ``precision``: ``fp32`` or ``bf16`` (autocast for forward/backward; perturbations, optimiser state
    and saved images stay fp32/uint8). ``auto`` picks bf16 on CUDA GPUs with bf16 support and fp32
    elsewhere; on CPU bf16 is opt-in until the engine benchmark shows it leaves protection intact.

    ``compile``: ``on`` runs the surrogate's forward (and, through AOTAutograd, its backward) as a
    ``torch.compile``d graph built once per model and reused (:mod:`ueguard.engine.compiled`); ``off``
    runs it eagerly. ``auto`` follows :func:`compile_by_default`. ``cuda_graphs`` (CUDA with
    ``compile`` on only) replays the compiled graphs as CUDA graphs (``mode="reduce-overhead"``).
    ``channels_last``: models and batches in channels-last memory format (faster convolutions on
    CPU and GPU; ``bench/engine.py`` measures it).
    """

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = True
    compile: str = "off"
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS[1:]:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS[1:])}")
        if self.compile not in COMPILES[1:]:
            raise ValueError(f"unknown compile setting {self.compile!r}; choose one of {', '.join(COMPILES[1:])}")
        if self.cuda_graphs and (self.device.type != "cuda" or self.compile != "on"):
            raise ValueError("cuda_graphs needs a CUDA device and compile='on' "
                             f"(got device {self.device}, compile {self.compile!r})")

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto", compile: str = "auto", *,
               channels_last: bool = True, cuda_graphs: bool = False) -> "Runtime":
        dev = resolve_device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if compile not in COMPILES:
            raise ValueError(f"unknown compile setting {compile!r}; choose one of {', '.join(COMPILES)}")
        if precision == "auto":
            precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if compile == "auto":
            compile = "on" if compile_by_default(dev) else "off"
        return cls(dev, precision, channels_last, compile, cuda_graphs)

    def describe(self) -> dict:
        """The resolved settings, as a run's manifest records them."""
        return {"device": str(self.device), "precision": self.precision, "channels_last": self.channels_last,
                "compile": self.compile, "cuda_graphs": self.cuda_graphs}

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def to_float(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 ``N×C×H×W`` → float32 in [0, 1] on the run's device and memory format."""
        x = images_u8.to(self.device, non_blocking=True).float().div_(255)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
