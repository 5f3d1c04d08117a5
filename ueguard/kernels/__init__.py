"""Fused kernels on perturbations and training batches, each with a PyTorch reference that specifies it.

Every op dispatches per call: Triton on CUDA tensors, the C++ extension (``ueguard._C``) on CPU
tensors, the reference otherwise. ``UEGUARD_FORCE_REFERENCE=1`` or :func:`force_reference` runs
the references everywhere; :func:`use_backend` forces one backend (e.g. Triton on CPU tensors
under ``TRITON_INTERPRET=1``) and :func:`backend_for` reports the choice.
"""

from ueguard.kernels._ext import cpp_available, force_reference, use_backend
from ueguard.kernels.augmentation import augment, augment_reference
from ueguard.kernels.project import (
    Quantized,
    Stepped,
    apply_quantize,
    apply_quantize_reference,
    backend_for,
    project_step,
    project_step_reference,
)

__all__ = [
    "Quantized",
    "Stepped",
    "apply_quantize",
    "apply_quantize_reference",
    "augment",
    "augment_reference",
    "backend_for",
    "cpp_available",
    "force_reference",
    "project_step",
    "project_step_reference",
    "use_backend",
]
