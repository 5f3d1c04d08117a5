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


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no CUDA GPU is visible to PyTorch; use --device cpu")
    return torch.device(name)


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
    """

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = True

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto") -> "Runtime":
        dev = resolve_device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if precision == "auto":
            precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        return cls(dev, precision)

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
