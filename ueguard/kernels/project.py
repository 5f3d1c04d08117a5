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

With ``input_dtype`` set, the step also writes ``x + out`` — the next forward's input — in that
dtype (float32, bfloat16 or float16) and memory format (channels-last or not) in the same pass.

``project_step(..., norm="l2")`` — the L2 variant (per sample n, the first dimension):

    δ'_n = δ_n − direction · α · g_n / ||g_n||₂          (no step where g_n = 0)
    δ'_n = δ'_n · min(1, ε / ||δ'_n||₂)                   (projection onto the L2 ball)
    out  = clamp(x + δ', 0, 1) − x                         (valid image range)

The final clamp keeps the image valid; unlike the L∞ case it is not the exact projection onto the
intersection of the ball and the image box (the standard choice of L2 PGD implementations).

``apply_quantize`` — the saved image and what quantisation did to the perturbation:

    out = clamp(round(image + 255 · δ), 0, 255)   (uint8, round half to even as torch.round)
    linf[n]   = max_i |out − image|               (integer levels, float32)
    sq_err[n] = Σ_i ((out − image) / 255)²        ([0, 1] units, float64)

Backends: the ``*_reference`` functions are the specification (plain PyTorch). ``project_step``
runs Triton kernels on CUDA tensors and the C++ operators ``torch.ops.ueguard.project_step_*``
on CPU; ``apply_quantize`` runs a Triton kernel on CUDA and ``torch.ops.ueguard.apply_quantize_u8``
on CPU. The element-wise kernels compute the same float32 operations in the same order as their
references (Triton launched without FMA contraction), so those results are bitwise equal; the L2
step's per-sample norms are reductions and agree to float32 rounding. See :mod:`ueguard.kernels._ext` for how a backend is chosen and forced.
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

NORMS = ("linf", "l2")
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if triton is not None:

    @triton.jit
    def _finish_step(x, delta, out_ptr, next_ptr, offsets, mask, channels, plane,
                     WRITE_NEXT: tl.constexpr, CHANNELS_LAST: tl.constexpr):
        """out = clamp(x + delta, 0, 1) − x; optionally next = x + out in next_ptr's dtype, at the
        NCHW index ``offsets`` or its channels-last position n·C·HW + hw·C + c."""
        image = tl.clamp(x + delta, 0.0, 1.0, propagate_nan=tl.PropagateNan.ALL)
        out = image - x
        tl.store(out_ptr + offsets, out, mask=mask)
        if WRITE_NEXT:
            if CHANNELS_LAST:
                sample_size = channels * plane
                n = offsets // sample_size
                c = (offsets % sample_size) // plane
                dest = n * sample_size + (offsets % plane) * channels + c
            else:
                dest = offsets
            tl.store(next_ptr + dest, (x + out).to(next_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _project_step_kernel(
        delta_ptr, grad_ptr, x_ptr, out_ptr, next_ptr, n_elements, step, eps, channels, plane,
        WRITE_NEXT: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        """L∞: out = clamp(x + clamp(delta − step·sign(grad), −eps, eps), 0, 1) − x on one block,
        where step = direction·step_size already rounded to float32."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        delta = tl.load(delta_ptr + offsets, mask=mask)
        grad = tl.load(grad_ptr + offsets, mask=mask)
        x = tl.load(x_ptr + offsets, mask=mask)
        sign = tl.where(grad > 0, 1.0, tl.where(grad < 0, -1.0, 0.0))
        delta = tl.clamp(delta - step * sign, -eps, eps, propagate_nan=tl.PropagateNan.ALL)
        _finish_step(x, delta, out_ptr, next_ptr, offsets, mask, channels, plane, WRITE_NEXT, CHANNELS_LAST)

    @triton.jit
    def _sum_sq_kernel(a_ptr, b_ptr, scale_ptr, partial_ptr, per_sample, n_chunks,
                       AFFINE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        """partial[n, chunk] = Σ v² over one block of sample n, v = a (or a − scale[n]·b when AFFINE)."""
        n = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        within = chunk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = within < per_sample
        offsets = n * per_sample + within
        v = tl.load(a_ptr + offsets, mask=mask, other=0.0)
        if AFFINE:
            v = v - tl.load(scale_ptr + n) * tl.load(b_ptr + offsets, mask=mask, other=0.0)
        tl.store(partial_ptr + n * n_chunks + chunk, tl.sum(v * v, axis=0))

    @triton.jit
    def _project_step_l2_kernel(
        delta_ptr, grad_ptr, x_ptr, scale_ptr, factor_ptr, out_ptr, next_ptr, n_elements, per_sample,
        channels, plane, WRITE_NEXT: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        """L2: out = clamp(x + (delta − scale[n]·grad)·factor[n], 0, 1) − x on one block."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        sample = offsets // per_sample
        scale = tl.load(scale_ptr + sample, mask=mask, other=0.0)
        factor = tl.load(factor_ptr + sample, mask=mask, other=1.0)
        delta = tl.load(delta_ptr + offsets, mask=mask)
        grad = tl.load(grad_ptr + offsets, mask=mask)
        x = tl.load(x_ptr + offsets, mask=mask)
        delta = (delta - scale * grad) * factor
        _finish_step(x, delta, out_ptr, next_ptr, offsets, mask, channels, plane, WRITE_NEXT, CHANNELS_LAST)

    # Under TRITON_INTERPRET=1 (read by triton.jit above) kernels run on the CPU through the
    # interpreter and accept CPU tensors; compiled kernels need CUDA tensors.
    _TRITON_INTERPRETED = not isinstance(_project_step_kernel, triton.JITFunction)

# A memory-bound element-wise op: 1024 elements (4 per thread at the default 4 warps) per program.
_PROJECT_STEP_BLOCK = 1024
# Launch option of every kernel here: no a·b + c → FMA contraction, so float32 results round as the
# eager reference's separate multiply and add do.
_NO_FMA = {"enable_fp_fusion": False}


class Stepped(NamedTuple):
    """Result of :func:`project_step` when the next forward's input is requested."""

    delta: torch.Tensor
    """The projected perturbation, float32, contiguous."""
    next_input: torch.Tensor
    """``x + delta`` in the requested dtype and memory format."""


def _check_triton_device(t: torch.Tensor, op: str) -> None:
    if not t.is_cuda and not _TRITON_INTERPRETED:
        raise RuntimeError(
            f"the Triton {op} kernel needs CUDA tensors, or TRITON_INTERPRET=1 set before triton "
            f"is first imported to run on {t.device} tensors"
        )


def _empty_next(like: torch.Tensor, input_dtype, channels_last: bool) -> torch.Tensor:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(like.shape, dtype=input_dtype, device=like.device, memory_format=memory_format)


def _next_geometry(delta: torch.Tensor) -> tuple[int, int]:
    """(C, H·W) for the channels-last index map (1, 1 when unused)."""
    return (delta.shape[1], delta.shape[2] * delta.shape[3]) if delta.dim() == 4 else (1, 1)


def _project_step_triton(delta, grad, x, step_size, eps, direction, norm, input_dtype, input_channels_last):
    """Launch the Triton L∞ kernel, or the two norm reductions and the L2 kernel, over the
    flattened (contiguous) tensors."""
    _check_triton_device(delta, "project_step")
    delta, grad, x = delta.contiguous(), grad.contiguous(), x.contiguous()
    out = torch.empty(delta.shape, dtype=torch.float32, device=delta.device)
    write_next = input_dtype is not None
    next_input = _empty_next(delta, input_dtype, input_channels_last) if write_next else out
    n_elements = out.numel()
    if n_elements == 0:
        return Stepped(out, next_input) if write_next else out
    channels, plane = _next_geometry(delta)
    grid = (triton.cdiv(n_elements, _PROJECT_STEP_BLOCK),)
    flags = dict(WRITE_NEXT=write_next, CHANNELS_LAST=write_next and input_channels_last,
                 BLOCK_SIZE=_PROJECT_STEP_BLOCK, **_NO_FMA)
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        if norm == "linf":
            _project_step_kernel[grid](delta, grad, x, out, next_input, n_elements, direction * step_size, eps,
                                       channels, plane, **flags)
        else:
            n_samples = delta.shape[0]
            per_sample = n_elements // n_samples
            grad_norm = _sample_norms_triton(grad, None, None, n_samples, per_sample)
            scale = torch.where(grad_norm > 0, (direction * step_size) / grad_norm, 0.0)
            step_norm = _sample_norms_triton(delta, grad, scale, n_samples, per_sample)
            factor = torch.where(step_norm > eps, eps / step_norm, 1.0)
            _project_step_l2_kernel[grid](delta, grad, x, scale, factor, out, next_input, n_elements, per_sample,
                                          channels, plane, **flags)
    return Stepped(out, next_input) if write_next else out


def _sample_norms_triton(a, b, scale, n_samples: int, per_sample: int) -> torch.Tensor:
    """Per-sample ||a_n||₂ (or ||a_n − scale_n·b_n||₂), float32: block partial sums of squares in
    Triton, summed per sample in float64."""
    n_chunks = triton.cdiv(per_sample, _PROJECT_STEP_BLOCK)
    partial = torch.empty(n_samples, n_chunks, dtype=torch.float32, device=a.device)
    affine = b is not None
    _sum_sq_kernel[(n_samples, n_chunks)](a, b if affine else a, scale if affine else a, partial, per_sample, n_chunks,
                                          AFFINE=affine, BLOCK_SIZE=_PROJECT_STEP_BLOCK, **_NO_FMA)
    return partial.sum(1, dtype=torch.float64).sqrt().to(torch.float32)


def _project_step_cpp(delta, grad, x, step_size, eps, direction, norm, input_dtype, input_channels_last):
    """Call the C++ operators ``torch.ops.ueguard.project_step_{linf,l2}[_next]`` (CPU tensors)."""
    ops = _ext.cpp_ops()
    if input_dtype is None:
        op = ops.project_step_linf if norm == "linf" else ops.project_step_l2
        return op(delta, grad, x, step_size, eps, direction)
    op = ops.project_step_linf_next if norm == "linf" else ops.project_step_l2_next
    return Stepped(*op(delta, grad, x, step_size, eps, direction, input_dtype, input_channels_last))


def _broadcast_per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def project_step_reference(
    delta: torch.Tensor,
    grad: torch.Tensor,
    x: torch.Tensor,
    step_size: float,
    eps: float,
    direction: float = 1.0,
    *,
    norm: str = "linf",
    input_dtype: torch.dtype | None = None,
    input_channels_last: bool = False,
):
    """The specification of :func:`project_step`, in eager PyTorch.

    L∞: ``clamp(x + clamp(delta − direction·step_size·sign(grad), −eps, eps), 0, 1) − x``: one
    signed gradient step on the perturbation, then the projection onto {||δ||_∞ ≤ eps, 0 ≤ x + δ ≤ 1}.
    The scalar direction·step_size is formed in Python (float64) and rounded to the tensor dtype
    once by PyTorch; the other operations are single float32 operations in the order written.

    L2 (per sample, the first dimension): a step of length step_size along the normalised gradient
    (none where the gradient is zero), scaling back onto the L2 ball of radius eps, then the clamp to
    the valid image range; norms in float32.

    With ``input_dtype``: also ``(x + out)`` converted to that dtype and memory format.
    """
    if norm == "linf":
        stepped = (delta - (direction * step_size) * torch.sign(grad)).clamp_(-eps, eps)
    else:
        grad_norm = grad.flatten(1).norm(dim=1)
        scale = torch.where(grad_norm > 0, (direction * step_size) / grad_norm, 0.0)
        stepped = delta - _broadcast_per_sample(scale, delta) * grad
        step_norm = stepped.flatten(1).norm(dim=1)
        factor = torch.where(step_norm > eps, eps / step_norm, 1.0)
        stepped = stepped * _broadcast_per_sample(factor, delta)
    out = (x + stepped).clamp_(0.0, 1.0) - x
    if input_dtype is None:
        return out.contiguous()
    memory_format = torch.channels_last if input_channels_last else torch.contiguous_format
    return Stepped(out.contiguous(), (x + out).to(input_dtype).contiguous(memory_format=memory_format))


_PROJECT_STEP_IMPLS = {"reference": project_step_reference, "cpp": _project_step_cpp}
if triton is not None:
    _PROJECT_STEP_IMPLS["triton"] = _project_step_triton


def _check_project_step_args(delta, grad, x, step_size, eps, direction, norm, input_dtype, input_channels_last) -> None:
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
    if norm not in NORMS:
        raise ValueError(f"project_step: unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    if norm == "l2" and delta.dim() < 2:
        raise ValueError(f"project_step: norm='l2' needs a batch dimension (N×...), got shape {tuple(delta.shape)}")
    if input_dtype is not None and input_dtype not in INPUT_DTYPES:
        raise TypeError(f"project_step: input_dtype must be one of {', '.join(map(str, INPUT_DTYPES))}, got {input_dtype}")
    if input_channels_last and (input_dtype is None or delta.dim() != 4):
        raise ValueError("project_step: input_channels_last needs input_dtype and 4-D N×C×H×W tensors, "
                         f"got input_dtype={input_dtype} and shape {tuple(delta.shape)}")


def project_step(
    delta: torch.Tensor,
    grad: torch.Tensor,
    x: torch.Tensor,
    step_size: float,
    eps: float,
    direction: float = 1.0,
    *,
    norm: str = "linf",
    input_dtype: torch.dtype | None = None,
    input_channels_last: bool = False,
):
    """One projected gradient step on a bounded perturbation; returns a new tensor.

    ``norm="linf"`` (default): ``clamp(x + clamp(delta − direction·step_size·sign(grad), −eps, eps), 0, 1) − x``.
    ``norm="l2"``: a ``step_size`` step along each sample's normalised gradient, projection onto the
    L2 ball of radius ``eps``, then the clamp to the image range (see the module docstring).
    Images ``x`` and ``eps`` in [0, 1] units. ``direction=+1`` descends the loss (error-minimising
    noise), ``-1`` ascends it. ``delta``, ``grad`` and ``x`` are float32 tensors of one shape on one
    device, of any layout; the result is contiguous. No autograd: pass detached tensors.

    With ``input_dtype`` (float32, bfloat16 or float16) it returns :class:`Stepped` ``(delta,
    next_input)`` where ``next_input = x + delta`` in that dtype — channels-last when
    ``input_channels_last`` — written in the same pass, ready for the next forward.

    Runs on the backend :func:`backend_for` reports (Triton on CUDA, C++ on CPU); the L∞ step is
    bitwise equal to :func:`project_step_reference` on every backend, the L2 step to float32 rounding.
    """
    step_size, eps, direction = float(step_size), float(eps), float(direction)
    args = (delta, grad, x, step_size, eps, direction, norm, input_dtype, bool(input_channels_last))
    _check_project_step_args(*args)
    backend = _ext.select_backend("project_step", delta, _PROJECT_STEP_IMPLS)
    if backend == "reference":
        return project_step_reference(*args[:6], norm=norm, input_dtype=input_dtype,
                                      input_channels_last=bool(input_channels_last))
    return _PROJECT_STEP_IMPLS[backend](*args)

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


if triton is not None:

    @triton.jit
    def _apply_quantize_kernel(image_ptr, delta_ptr, out_ptr, max_ptr, sq_ptr, per_sample, n_chunks,
                               BLOCK_SIZE: tl.constexpr):
        """One block of sample n: out = clamp(round(image + 255·delta), 0, 255) and the block's
        max |out − image| and Σ (out − image)² in integer levels."""
        n = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        within = chunk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = within < per_sample
        offsets = n * per_sample + within
        level = tl.load(image_ptr + offsets, mask=mask, other=0).to(tl.int32)
        delta = tl.load(delta_ptr + offsets, mask=mask, other=0.0)
        # round(clamp(v, 0, 255)) == clamp(round(v), 0, 255) as the bounds are integers; adding and
        # subtracting 1.5·2²³ rounds to the nearest integer, ties to even.
        value = tl.clamp(level.to(tl.float32) + delta * 255.0, 0.0, 255.0)
        rounded = ((value + 12582912.0) - 12582912.0).to(tl.int32)
        tl.store(out_ptr + offsets, rounded.to(tl.uint8), mask=mask)
        diff = rounded - level
        tl.store(max_ptr + n * n_chunks + chunk, tl.max(tl.abs(diff), axis=0))
        tl.store(sq_ptr + n * n_chunks + chunk, tl.sum((diff * diff).to(tl.int64), axis=0))


def _apply_quantize_triton(image_u8: torch.Tensor, delta: torch.Tensor) -> Quantized:
    """Launch :func:`_apply_quantize_kernel` over (sample, block); reduce the integer partials."""
    _check_triton_device(image_u8, "apply_quantize")
    image = image_u8.contiguous()
    delta = delta.contiguous()
    n_samples = image.shape[0] if image.dim() == 4 else 1
    out = torch.empty(image.shape, dtype=torch.uint8, device=image.device)
    if n_samples == 0:
        empty = torch.empty(0, device=image.device)
        return Quantized(out, empty, empty.double())
    per_sample = image.numel() // n_samples
    n_chunks = triton.cdiv(per_sample, _PROJECT_STEP_BLOCK)
    block_max = torch.empty(n_samples, n_chunks, dtype=torch.int32, device=image.device)
    block_sq = torch.empty(n_samples, n_chunks, dtype=torch.int64, device=image.device)
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        _apply_quantize_kernel[(n_samples, n_chunks)](image, delta, out, block_max, block_sq, per_sample, n_chunks,
                                                      BLOCK_SIZE=_PROJECT_STEP_BLOCK, **_NO_FMA)
    linf = block_max.amax(1).to(torch.float32)
    sq_err = block_sq.sum(1).to(torch.float64) / 255.0**2
    return Quantized(out, linf, sq_err)


_APPLY_QUANTIZE_IMPLS = {"reference": apply_quantize_reference, "cpp": _apply_quantize_cpp}
if triton is not None:
    _APPLY_QUANTIZE_IMPLS["triton"] = _apply_quantize_triton


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


def register_op(name: str, impls: dict) -> None:
    """Make ``backend_for(tensor, name)`` know an op defined in another kernel module."""
    _OPS[name] = impls


def backend_for(tensor: torch.Tensor, op: str = "project_step") -> str:
    """The backend (``"triton"``, ``"cpp"`` or ``"reference"``) that ``op`` would run on for
    inputs like ``tensor`` (its device decides), under the current forcing switches."""
    if op not in _OPS:
        raise ValueError(f"unknown kernel op {op!r}; valid ops: {', '.join(_OPS)}")
    return _ext.select_backend(op, tensor, _OPS[op])
