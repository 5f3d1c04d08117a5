"""The two element-wise ops on perturbations: the projected signed-gradient step and the uint8
quantisation of the save path.

Threat model. A protection perturbs each image x ∈ [0, 1]^D by δ with ||δ||_∞ ≤ ε, so that the
released image x + δ stays a valid image and the change stays imperceptible. Every optimisation
step must land back in that feasible set

    S(x) = { δ : ||δ||_∞ ≤ ε } ∩ { δ : 0 ≤ x + δ ≤ 1 },

and the released file holds x + δ rounded to 8 bits, which is what the data's user trains on.

Ops, each in the layers of ueguard's kernel contract:

``project_step`` — one step of projected gradient descent/ascent (PGD, Madry et al. 2018) on δ:

    δ' = clamp(δ − direction · α · sign(∇_δ L), −ε, ε)
    out = clamp(x + δ', 0, 1) − x

direction = +1 descends the loss (error-minimising noise, Huang et al. 2021, "Unlearnable
Examples"); −1 ascends it (adversarial/error-maximising noise). Clipping to the ε-box and then to
the image box is the exact Euclidean projection onto S(x): both sets are boxes, so their
intersection is the box [max(−ε, −x), min(ε, 1 − x)], which the composition realises
coordinate-wise (in exact arithmetic: in float32 the rounding of x + δ' can move out by about one
ulp of x, so ||out||_∞ ≤ ε holds to that precision). sign(0) = sign(NaN) = 0 (as ``torch.sign``); NaN in δ or x propagates.

``apply_quantize`` — the saved image and what quantisation did to the perturbation:

    out = clamp(round(image + 255 · δ), 0, 255)   (uint8, round half to even as torch.round)
    linf[n]   = max_i |out − image|               (integer levels, float32)
    sq_err[n] = Σ_i ((out − image) / 255)²        ([0, 1] units, float64)

Backends: the ``*_reference`` functions are the specification (plain PyTorch). ``project_step``
runs a Triton kernel on CUDA tensors and the C++ operator ``torch.ops.ueguard.project_step_linf``
on CPU; ``apply_quantize`` runs the C++ operator on CPU and its reference elsewhere. Both compute
the same float32 operations in the same order as their references, so results are bitwise
equal. See :mod:`ueguard.kernels._ext` for how a backend is chosen and forced.
"""

import contextlib
import math
from typing import NamedTuple

import torch

from ueguard.kernels import _ext

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


# ----------------------------------------------------------------------------------- project_step

if triton is not None:

    @triton.jit
    def _project_step_kernel(
        delta_ptr,
        grad_ptr,
        x_ptr,
        out_ptr,
        n_elements,
        step,
        eps,
        BLOCK_SIZE: tl.constexpr,
    ):
        """out = clamp(x + clamp(delta − step·sign(grad), −eps, eps), 0, 1) − x on one block,
        where step = direction·step_size already rounded to float32."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        delta = tl.load(delta_ptr + offsets, mask=mask)
        grad = tl.load(grad_ptr + offsets, mask=mask)
        x = tl.load(x_ptr + offsets, mask=mask)
        sign = tl.where(grad > 0, 1.0, tl.where(grad < 0, -1.0, 0.0))
        delta = tl.clamp(delta - step * sign, -eps, eps, propagate_nan=tl.PropagateNan.ALL)
        image = tl.clamp(x + delta, 0.0, 1.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_ptr + offsets, image - x, mask=mask)

    # Under TRITON_INTERPRET=1 (read by triton.jit above) kernels run on the CPU through the
    # interpreter and accept CPU tensors; compiled kernels need CUDA tensors.
    _TRITON_INTERPRETED = not isinstance(_project_step_kernel, triton.JITFunction)

# A memory-bound element-wise op: 1024 elements (4 per thread at the default 4 warps) per program.
_PROJECT_STEP_BLOCK = 1024


def _project_step_triton(
    delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, step_size: float, eps: float, direction: float
) -> torch.Tensor:
    """Launch :func:`_project_step_kernel` over the flattened (contiguous) tensors."""
    if not delta.is_cuda and not _TRITON_INTERPRETED:
        raise RuntimeError(
            "the Triton project_step kernel needs CUDA tensors, or TRITON_INTERPRET=1 set before triton "
            f"is first imported to run on {delta.device} tensors"
        )
    delta, grad, x = delta.contiguous(), grad.contiguous(), x.contiguous()
    out = torch.empty(delta.shape, dtype=torch.float32, device=delta.device)
    n_elements = out.numel()
    if n_elements == 0:
        return out
    grid = (triton.cdiv(n_elements, _PROJECT_STEP_BLOCK),)
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        _project_step_kernel[grid](
            delta, grad, x, out, n_elements, direction * step_size, eps, BLOCK_SIZE=_PROJECT_STEP_BLOCK
        )
    return out


def _project_step_cpp(
    delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, step_size: float, eps: float, direction: float
) -> torch.Tensor:
    """Call the C++ operator ``torch.ops.ueguard.project_step_linf`` (CPU tensors)."""
    return _ext.cpp_ops().project_step_linf(delta, grad, x, step_size, eps, direction)


def project_step_reference(
    delta: torch.Tensor,
    grad: torch.Tensor,
    x: torch.Tensor,
    step_size: float,
    eps: float,
    direction: float = 1.0,
) -> torch.Tensor:
    """The specification of :func:`project_step`, in eager PyTorch.

    ``clamp(x + clamp(delta − direction·step_size·sign(grad), −eps, eps), 0, 1) − x``: one signed
    gradient step on the perturbation, then the projection onto {||δ||_∞ ≤ eps, 0 ≤ x + δ ≤ 1}.
    The scalar direction·step_size is formed in Python (float64) and rounded to the tensor dtype
    once by PyTorch; the other operations are single float32 operations in the order written.
    """
    stepped = delta - (direction * step_size) * torch.sign(grad)
    return (x + stepped.clamp_(-eps, eps)).clamp_(0.0, 1.0) - x


_PROJECT_STEP_IMPLS = {"reference": project_step_reference, "cpp": _project_step_cpp}
if triton is not None:
    _PROJECT_STEP_IMPLS["triton"] = _project_step_triton


def _check_project_step_args(
    delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, step_size: float, eps: float, direction: float
) -> None:
    """Reject arguments outside the contract, identically for every backend."""
    for name, tensor in (("delta", delta), ("grad", grad), ("x", x)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"project_step: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != torch.float32:
            raise TypeError(f"project_step: {name} must be float32, got {tensor.dtype}")
        if tensor.shape != delta.shape:
            raise ValueError(f"project_step: {name} has shape {tuple(tensor.shape)} but delta has {tuple(delta.shape)}")
        if tensor.device != delta.device:
            raise ValueError(f"project_step: {name} is on {tensor.device} but delta is on {delta.device}")
    if not (math.isfinite(step_size) and step_size >= 0):
        raise ValueError(f"project_step: step_size must be finite and >= 0, got {step_size}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"project_step: eps must be finite and >= 0, got {eps}")
    if not math.isfinite(direction):
        raise ValueError(f"project_step: direction must be finite, got {direction}")


def project_step(
    delta: torch.Tensor,
    grad: torch.Tensor,
    x: torch.Tensor,
    step_size: float,
    eps: float,
    direction: float = 1.0,
) -> torch.Tensor:
    """One projected signed-gradient step on an L∞-bounded perturbation; returns a new tensor.

    ``clamp(x + clamp(delta − direction·step_size·sign(grad), −eps, eps), 0, 1) − x`` with images
    ``x`` and ``eps`` in [0, 1] units. ``direction=+1`` descends the loss (error-minimising noise),
    ``-1`` ascends it. ``delta``, ``grad`` and ``x`` are float32 tensors of one shape on one device,
    of any layout; the result is contiguous. No autograd: pass detached tensors.

    Runs on the backend :func:`backend_for` reports (Triton on CUDA, C++ on CPU); all backends
    are bitwise equal to :func:`project_step_reference`.
    """
    step_size, eps, direction = float(step_size), float(eps), float(direction)
    _check_project_step_args(delta, grad, x, step_size, eps, direction)
    backend = _ext.select_backend("project_step", delta, _PROJECT_STEP_IMPLS)
    return _PROJECT_STEP_IMPLS[backend](delta, grad, x, step_size, eps, direction)


# --------------------------------------------------------------------------------- apply_quantize


class Quantized(NamedTuple):
    """Result of :func:`apply_quantize`."""

    out_u8: torch.Tensor
    """The perturbed image, uint8, same shape as the input image."""
    linf: torch.Tensor
    """Per sample, max |out − image| in integer levels (1/255 units), float32, shape (N,)."""
    sq_err: torch.Tensor
    """Per sample, Σ ((out − image)/255)² in [0, 1] units, float64, shape (N,)."""


def _apply_quantize_cpp(image_u8: torch.Tensor, delta: torch.Tensor) -> Quantized:
    """Call the C++ operator ``torch.ops.ueguard.apply_quantize_u8`` (CPU tensors)."""
    return Quantized(*_ext.cpp_ops().apply_quantize_u8(image_u8, delta))


def apply_quantize_reference(image_u8: torch.Tensor, delta: torch.Tensor) -> Quantized:
    """The specification of :func:`apply_quantize`, in eager PyTorch.

    ``out = clamp(round(image + 255·delta), 0, 255)`` with ``image + 255·delta`` formed as two
    float32 roundings (multiply, then add) and ``round`` half to even. The error statistics are
    exact integer sums over the sample's level differences, converted once: ``linf`` to float32
    levels, ``sq_err`` to float64 and divided by 255².
    """
    out = torch.round(image_u8.to(torch.float32) + delta * 255.0).clamp_(0, 255).to(torch.uint8)
    diff = out.to(torch.int32) - image_u8.to(torch.int32)
    per_sample = (diff if diff.dim() == 4 else diff.unsqueeze(0)).flatten(1)
    linf = per_sample.abs().amax(dim=1).to(torch.float32)
    sq_err = per_sample.square().sum(dim=1, dtype=torch.int64).to(torch.float64) / 255.0**2
    return Quantized(out, linf, sq_err)


# No Triton kernel yet: on CUDA the eager reference runs (saving is not a hot loop).
_APPLY_QUANTIZE_IMPLS = {"reference": apply_quantize_reference, "cpp": _apply_quantize_cpp}


def _check_apply_quantize_args(image_u8: torch.Tensor, delta: torch.Tensor) -> None:
    """Reject arguments outside the contract, identically for every backend."""
    if not isinstance(image_u8, torch.Tensor) or not isinstance(delta, torch.Tensor):
        raise TypeError("apply_quantize: image_u8 and delta must be torch.Tensor")
    if image_u8.dtype != torch.uint8:
        raise TypeError(f"apply_quantize: image_u8 must be uint8, got {image_u8.dtype}")
    if delta.dtype != torch.float32:
        raise TypeError(f"apply_quantize: delta must be float32, got {delta.dtype}")
    if image_u8.dim() not in (3, 4) or 0 in image_u8.shape[-3:]:
        raise ValueError(f"apply_quantize: image_u8 must be a non-empty N×C×H×W or C×H×W, got {tuple(image_u8.shape)}")
    if delta.shape != image_u8.shape:
        raise ValueError(
            f"apply_quantize: delta has shape {tuple(delta.shape)} but image_u8 has {tuple(image_u8.shape)}"
        )
    if delta.device != image_u8.device:
        raise ValueError(f"apply_quantize: delta is on {delta.device} but image_u8 is on {image_u8.device}")


def apply_quantize(image_u8: torch.Tensor, delta: torch.Tensor) -> Quantized:
    """Add a perturbation to 8-bit images and measure what rounding left of it.

    ``image_u8`` is uint8 N×C×H×W (or C×H×W, treated as N = 1); ``delta`` is float32 of the same
    shape in [0, 1] units and must be finite. Returns ``(out_u8, linf, sq_err)``: the uint8 image
    ``clamp(round(image + 255·delta), 0, 255)`` (round half to even), and per sample the L∞ change
    in integer levels (float32) and the squared L2 change in [0, 1] units (float64). All backends
    are bitwise equal to :func:`apply_quantize_reference`.
    """
    _check_apply_quantize_args(image_u8, delta)
    backend = _ext.select_backend("apply_quantize", image_u8, _APPLY_QUANTIZE_IMPLS)
    return _APPLY_QUANTIZE_IMPLS[backend](image_u8, delta)


# ------------------------------------------------------------------------------------- dispatch

_OPS = {"project_step": _PROJECT_STEP_IMPLS, "apply_quantize": _APPLY_QUANTIZE_IMPLS}


def backend_for(tensor: torch.Tensor, op: str = "project_step") -> str:
    """The backend (``"triton"``, ``"cpp"`` or ``"reference"``) that ``op`` would run on for
    inputs like ``tensor`` (its device decides), under the current forcing switches."""
    if op not in _OPS:
        raise ValueError(f"unknown kernel op {op!r}; valid ops: {', '.join(_OPS)}")
    return _ext.select_backend(op, tensor, _OPS[op])
