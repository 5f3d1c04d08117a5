"""The training augmentation as one op: per-sample random crop with padding + horizontal flip, fused
with the uint8 → float conversion and per-channel mean/std normalisation, and its exact adjoint.

Why an op. Augmentation runs on every batch of every training step of verify's victims, and —
for methods that optimise δ through the transformations a victim will apply (an expectation over
transformations, as REM does) — inside the PGD loop, where the gradient has to flow back through
it to the float input. Eager PyTorch spends a pad, an index gather, a conversion and a
normalisation pass on it; the kernels do one gather.

The draw is explicit. For sample n with offsets ``(oy, ox) ∈ [0, 2·pad]²`` and flip bit ``f``, the
output pixel (c, i, j) reads the source pixel

    r = i + oy − pad,    q = (f ? W−1−j : j) + ox − pad

of the input padded by ``pad`` on every side (zero padding: 0 outside the image; reflect padding:
mirrored across the border, as ``F.pad(mode="reflect")``, needing pad < H, W), converts it (uint8:
v / 255) and normalises it: ``(v − mean[c]) / std[c]``. The caller draws the parameters once
(:func:`ueguard.engine.augment.crop_flip` does), so a draw can be replayed exactly — on another
backend, or for the backward pass.

The crop is injective on the padded image, so the adjoint gathers too: the gradient of source
pixel (r, q) is the sum of ``grad_out / std`` over the (≤ 1 with zero padding, ≤ 3 × 3 with
reflect) output pixels that read it. No atomics; deterministic.

Layers: ``_augment_forward_kernel`` / ``_augment_backward_kernel`` (Triton) → launchers → the
autograd Function ``_AugmentFunction`` (which runs the chosen backend's forward and backward) →
public :func:`augment`. :func:`augment_reference` is the specification (eager PyTorch, its
backward by autograd). Forward outputs of every backend are bitwise equal to the reference; the
backward with zero padding too, with reflect padding equal up to the order of ≤ 9 float additions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ueguard.kernels import _ext, project

triton = project.triton
if triton is not None:
    import triton.language as tl

PADDINGS = ("zero", "reflect")

if triton is not None:

    @triton.jit
    def _reflect(p, size):
        """Mirror a padded coordinate back into [0, size) (one reflection: |pad| < size)."""
        p = tl.where(p < 0, -p, p)
        return tl.where(p >= size, 2 * (size - 1) - p, p)

    @triton.jit
    def _augment_forward_kernel(
        x_ptr, offsets_ptr, flips_ptr, mean_ptr, std_ptr, out_ptr,
        channels, height, width, pad,
        xs_n, xs_c, xs_h, xs_w, os_n, os_c, os_h, os_w,
        IS_UINT8: tl.constexpr, REFLECT: tl.constexpr, NORMALISE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        """One block of output pixels of plane (n, c): gather, convert, normalise."""
        plane = tl.program_id(0)
        n = plane // channels
        c = plane % channels
        hw = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = hw < height * width
        i = hw // width
        j = hw % width
        oy = tl.load(offsets_ptr + 2 * n)
        ox = tl.load(offsets_ptr + 2 * n + 1)
        flip = tl.load(flips_ptr + n).to(tl.int1)
        r = i + oy - pad
        q = tl.where(flip, width - 1 - j, j) + ox - pad
        if REFLECT:
            r = _reflect(r, height)
            q = _reflect(q, width)
            inside = mask
        else:
            inside = mask & (r >= 0) & (r < height) & (q >= 0) & (q < width)
        src = x_ptr + n.to(tl.int64) * xs_n + c * xs_c + r * xs_h + q * xs_w
        v = tl.load(src, mask=inside, other=0).to(tl.float32)
        if IS_UINT8:
            v = v / 255.0
        if NORMALISE:
            v = (v - tl.load(mean_ptr + c)) / tl.load(std_ptr + c)
        dst = out_ptr + n.to(tl.int64) * os_n + c * os_c + i * os_h + j * os_w
        tl.store(dst, v, mask=mask)

    @triton.jit
    def _reader(p, shift, size, flip):
        """The output index along an axis that reads padded coordinate p, and whether it exists."""
        k = p - shift
        k = tl.where(flip, size - 1 - k, k)
        return k, (k >= 0) & (k < size)

    @triton.jit
    def _row_adjoint(row_ptr, mask, j0, vj0, j1, vj1, j2, vj2, gs_w, s, REFLECT: tl.constexpr):
        """Σ grad_out / std over the (one, or with reflect padding up to three) readers in one row."""
        acc = tl.load(row_ptr + j0 * gs_w, mask=mask & vj0, other=0.0) / s
        if REFLECT:
            acc += tl.load(row_ptr + j1 * gs_w, mask=mask & vj1, other=0.0) / s
            acc += tl.load(row_ptr + j2 * gs_w, mask=mask & vj2, other=0.0) / s
        return acc

    @triton.jit
    def _augment_backward_kernel(
        grad_ptr, offsets_ptr, flips_ptr, std_ptr, out_ptr,
        channels, height, width, pad,
        gs_n, gs_c, gs_h, gs_w, os_n, os_c, os_h, os_w,
        REFLECT: tl.constexpr, NORMALISE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        """One block of source pixels of plane (n, c): sum grad_out / std over the output pixels
        that read each (the padded coordinate itself and, with reflect padding, its mirror images
        across 0 and size − 1)."""
        plane = tl.program_id(0)
        n = plane // channels
        c = plane % channels
        hw = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = hw < height * width
        r = hw // width
        q = hw % width
        oy = tl.load(offsets_ptr + 2 * n)
        ox = tl.load(offsets_ptr + 2 * n + 1)
        flip = tl.load(flips_ptr + n).to(tl.int1)
        base = grad_ptr + n.to(tl.int64) * gs_n + c * gs_c
        s = tl.load(std_ptr + c) if NORMALISE else 1.0
        i0, vi0 = _reader(r, oy - pad, height, False)
        j0, vj0 = _reader(q, ox - pad, width, flip)
        j1, vj1 = _reader(-q, ox - pad, width, flip)
        j2, vj2 = _reader(2 * (width - 1) - q, ox - pad, width, flip)
        vj1 = vj1 & (q > 0)
        vj2 = vj2 & (q < width - 1)
        acc = _row_adjoint(base + i0 * gs_h, mask & vi0, j0, vj0, j1, vj1, j2, vj2, gs_w, s, REFLECT)
        if REFLECT:
            i1, vi1 = _reader(-r, oy - pad, height, False)
            i2, vi2 = _reader(2 * (height - 1) - r, oy - pad, height, False)
            acc += _row_adjoint(base + i1 * gs_h, mask & vi1 & (r > 0), j0, vj0, j1, vj1, j2, vj2, gs_w, s, REFLECT)
            acc += _row_adjoint(base + i2 * gs_h, mask & vi2 & (r < height - 1), j0, vj0, j1, vj1, j2, vj2,
                                gs_w, s, REFLECT)
        dst = out_ptr + n.to(tl.int64) * os_n + c * os_c + r * os_h + q * os_w
        tl.store(dst, acc, mask=mask)


_AUGMENT_BLOCK = 1024


def _geometry_args(t: torch.Tensor, out: torch.Tensor, pad: int) -> tuple[int, ...]:
    return (t.shape[1], t.shape[2], t.shape[3], pad, *t.stride(), *out.stride())


def _launch(kernel, t: torch.Tensor, out: torch.Tensor, *args, **flags) -> None:
    n, c, h, w = t.shape
    grid = (n * c, triton.cdiv(h * w, _AUGMENT_BLOCK))
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        kernel[grid](*args, *_geometry_args(t, out, flags.pop("pad")), BLOCK_SIZE=_AUGMENT_BLOCK, **flags,
                     **project._NO_FMA)


def _augment_forward_triton(x, offsets, flips, pad, reflect, mean, std):
    project._check_triton_device(x, "augment")
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=_memory_format(x))
    if out.numel() == 0:
        return out
    normalise = mean is not None
    _launch(_augment_forward_kernel, x, out, x, offsets, flips.to(torch.uint8), mean if normalise else out,
            std if normalise else out, out, pad=pad, IS_UINT8=x.dtype == torch.uint8, REFLECT=reflect,
            NORMALISE=normalise)
    return out


def _augment_backward_triton(grad_out, offsets, flips, pad, reflect, std):
    project._check_triton_device(grad_out, "augment")
    grad_in = torch.empty(grad_out.shape, dtype=torch.float32, device=grad_out.device,
                          memory_format=_memory_format(grad_out))
    if grad_in.numel() == 0:
        return grad_in
    normalise = std is not None
    _launch(_augment_backward_kernel, grad_out, grad_in, grad_out, offsets, flips.to(torch.uint8),
            std if normalise else grad_in, grad_in, pad=pad, REFLECT=reflect, NORMALISE=normalise)
    return grad_in


def _augment_forward_cpp(x, offsets, flips, pad, reflect, mean, std):
    return _ext.cpp_ops().augment_forward(x, offsets, flips, pad, reflect, mean, std)


def _augment_backward_cpp(grad_out, offsets, flips, pad, reflect, std):
    return _ext.cpp_ops().augment_backward(grad_out, offsets, flips, pad, reflect, std)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """Channels-last for a (strictly) channels-last tensor, contiguous otherwise."""
    channels_last = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


class _AugmentFunction(torch.autograd.Function):
    """Forward and backward of one kernel backend; the gradient flows to a float input only."""

    @staticmethod
    def forward(ctx, x, offsets, flips, pad, reflect, mean, std, backend):
        ctx.save_for_backward(offsets, flips, std)
        ctx.pad, ctx.reflect, ctx.backend = pad, reflect, backend
        return _FORWARD[backend](x, offsets, flips, pad, reflect, mean, std)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        offsets, flips, std = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _BACKWARD[ctx.backend](grad_out.float(), offsets, flips, ctx.pad, ctx.reflect, std)
        return grad_x, None, None, None, None, None, None, None


_FORWARD = {"cpp": _augment_forward_cpp}
_BACKWARD = {"cpp": _augment_backward_cpp}
if triton is not None:
    _FORWARD["triton"] = _augment_forward_triton
    _BACKWARD["triton"] = _augment_backward_triton


def augment_reference(
    x: torch.Tensor,
    offsets: torch.Tensor,
    flips: torch.Tensor,
    *,
    pad: int,
    padding: str = "zero",
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> torch.Tensor:
    """The specification of :func:`augment`, in eager PyTorch (differentiable by autograd).

    Convert (uint8: ``x.float() / 255``), pad by ``pad`` (zeros, or ``F.pad(mode="reflect")``),
    gather each sample's window at rows ``oy + i`` and columns ``ox + j`` of the padded image
    (columns reversed where ``flips``), then ``(v − mean[c]) / std[c]``.
    """
    v = x.float() / 255 if x.dtype == torch.uint8 else x
    n, c, h, w = v.shape
    padded = F.pad(v, (pad, pad, pad, pad), mode="reflect" if padding == "reflect" else "constant")
    dev = v.device
    rows = offsets[:, 0, None] + torch.arange(h, device=dev)
    cols = offsets[:, 1, None] + torch.arange(w, device=dev)
    cols = torch.where(flips[:, None], cols.flip(-1), cols)
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chans = torch.arange(c, device=dev)[None, :, None, None]
    out = padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]
    if mean is not None:
        out = (out - mean.view(1, c, 1, 1)) / std.view(1, c, 1, 1)
    return out


_AUGMENT_IMPLS = {"reference": augment_reference, **_FORWARD}  # backends; backward from _BACKWARD
project.register_op("augment", _AUGMENT_IMPLS)


def _as_channel_stat(value, name: str, channels: int, device) -> torch.Tensor:
    stat = torch.as_tensor(value, dtype=torch.float32, device=device).flatten()
    if stat.numel() == 1:
        stat = stat.expand(channels)
    if stat.numel() != channels:
        raise ValueError(f"augment: {name} must have one value per channel ({channels}), got {stat.numel()}")
    return stat.contiguous()


def _check_augment_args(x, offsets, flips, pad: int, padding: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"augment: x must be an N×C×H×W tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in (torch.uint8, torch.float32):
        raise TypeError(f"augment: x must be uint8 or float32, got {x.dtype}")
    n, _, h, w = x.shape
    if padding not in PADDINGS:
        raise ValueError(f"augment: unknown padding {padding!r}; valid paddings: {', '.join(PADDINGS)}")
    if pad < 0:
        raise ValueError(f"augment: pad must be >= 0, got {pad}")
    if padding == "reflect" and not (pad < h and pad < w):
        raise ValueError(f"augment: reflect padding needs pad < H and pad < W, got pad {pad} for {h}×{w}")
    if offsets.shape != (n, 2) or offsets.dtype != torch.int64:
        raise ValueError(f"augment: offsets must be int64 of shape ({n}, 2), got {offsets.dtype} {tuple(offsets.shape)}")
    if flips.shape != (n,) or flips.dtype != torch.bool:
        raise ValueError(f"augment: flips must be bool of shape ({n},), got {flips.dtype} {tuple(flips.shape)}")
    if n and (int(offsets.min()) < 0 or int(offsets.max()) > 2 * pad):
        raise ValueError(f"augment: offsets must lie in [0, 2·pad] = [0, {2 * pad}]")


def augment(
    x: torch.Tensor,
    offsets: torch.Tensor,
    flips: torch.Tensor,
    *,
    pad: int,
    padding: str = "zero",
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop each sample's window out of the padded batch, flip it, convert and normalise it.

    ``x``: uint8 (levels 0–255, converted as /255) or float32 ``N×C×H×W``, any layout.
    ``offsets``: int64 ``N×2`` window corners ``(oy, ox)`` in the padded image, each in [0, 2·pad];
    ``flips``: bool ``N`` (mirror the window left–right). ``padding``: ``"zero"`` or ``"reflect"``.
    ``mean``/``std``: per-channel normalisation (or a scalar), both or neither.

    Returns float32 ``N×C×H×W`` in ``x``'s memory format. Differentiable with respect to a float
    ``x`` (the backward is the exact adjoint, computed by the same backend). Runs on the backend
    :func:`ueguard.kernels.backend_for` reports for ``"augment"``.
    """
    pad = int(pad)
    _check_augment_args(x, offsets, flips, pad, padding)
    if (mean is None) != (std is None):
        raise ValueError("augment: pass both mean and std, or neither")
    if mean is not None:
        mean = _as_channel_stat(mean, "mean", x.shape[1], x.device)
        std = _as_channel_stat(std, "std", x.shape[1], x.device)
    offsets, flips = offsets.to(x.device), flips.to(x.device)
    backend = _ext.select_backend("augment", x, _AUGMENT_IMPLS)
    if backend == "reference":
        return augment_reference(x, offsets, flips, pad=pad, padding=padding, mean=mean, std=std)
    return _AugmentFunction.apply(x, offsets.contiguous(), flips.contiguous(), pad, padding == "reflect", mean, std,
                                  backend)
