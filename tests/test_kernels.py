"""Every kernel backend against the PyTorch reference that specifies it (ueguard.kernels.project,
ueguard.kernels.augmentation).

Backends under test: "cpp" (the ueguard._C operators), "triton" (on CPU tensors through the
interpreter, TRITON_INTERPRET=1 from conftest; on CUDA tensors when a GPU job sets it to 0) and
"dispatch" (the public function with no backend forced). All backends perform the reference's
float32 operations in the same order, so outputs are compared for exact equality, NaN positions
included; apply_quantize's sq_err is an exact integer sum divided once by 255², so it is exact too.
Stated tolerances where the order of a reduction differs: the L2 step's per-sample norms
(rtol 1e-5, atol 1e-6) and augment's reflect-padding adjoint (sums of ≤ 9 terms: rtol 1e-5, atol 1e-5).
bf16 next-input outputs of the Triton kernel are compared on a GPU only: the interpreter converts
float32 → bfloat16 by truncation, the compiled kernel (and PyTorch) round to nearest even.
"""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import installed_from_this_checkout
from ueguard.kernels import (
    _ext,
    augment,
    augment_reference,
    apply_quantize,
    apply_quantize_reference,
    backend_for,
    force_reference,
    project,
    project_step,
    project_step_reference,
    use_backend,
)
from ueguard.kernels import augmentation as augment_module

EPS = 8 / 255
STEP = 0.8 / 255
SHAPES = [(1, 3, 33, 31), (7, 3, 32, 32), (2, 1, 5, 7), (1151,)]
LARGE_SHAPE = (1, 3, 224, 224)  # C++ and dispatch only: the Triton interpreter is slow

CPP_SKIP_REASON = f"C++ extension not built: {_ext.cpp_unavailable_reason()}"
if project.triton is None:
    TRITON_SKIP_REASON = "triton is not installed"
elif not project._TRITON_INTERPRETED and not torch.cuda.is_available():
    TRITON_SKIP_REASON = "compiled Triton kernels need a CUDA device (or TRITON_INTERPRET=1)"
else:
    TRITON_SKIP_REASON = None


def _device(backend: str) -> str:
    """CUDA for compiled Triton kernels; CPU for everything else (and interpreted Triton)."""
    return "cuda" if backend == "triton" and not project._TRITON_INTERPRETED else "cpu"


def _require(backend: str) -> None:
    if backend in ("cpp", "dispatch") and not _ext.cpp_available():
        if installed_from_this_checkout():
            pytest.fail(f"ueguard is installed from this checkout, so its C++ extension must load: {CPP_SKIP_REASON}")
        pytest.skip(CPP_SKIP_REASON)
    if backend == "triton" and TRITON_SKIP_REASON is not None:
        pytest.skip(TRITON_SKIP_REASON)


def _run(backend: str, op, *args, **kwargs):
    """Call a public kernel op on ``backend`` ("dispatch": whatever it picks by itself)."""
    if backend == "dispatch":
        return op(*args, **kwargs)
    with use_backend(backend):
        return op(*args, **kwargs)


def _poison_allocator(like: torch.Tensor) -> None:
    """Fill a block the size of ``like`` with NaN (or 0xFF) and free it at once.

    The next allocation of that size usually reuses the block (always with the CUDA caching
    allocator, often with malloc), so an output element a kernel forgot to write reads as NaN or
    garbage instead of a plausible 0. Best effort: exact comparison catches the rest.
    """
    fill = float("nan") if like.is_floating_point() else 255
    torch.full((like.numel(),), fill, dtype=like.dtype, device=like.device)


def _project_inputs(shape, seed: int, device: str = "cpu"):
    """delta in the ε-ball, grad ~ N(0, 1), x in [0, 1], with the edge cases planted:
    zero gradients (sign 0), pixels on the image box (0 and 1), perturbations on the ε-box."""
    gen = torch.Generator().manual_seed(seed)

    def where(p: float) -> torch.Tensor:
        return torch.rand(shape, generator=gen) < p

    x = torch.rand(shape, generator=gen)
    delta = (2 * torch.rand(shape, generator=gen) - 1) * EPS
    grad = torch.randn(shape, generator=gen)
    grad[where(0.1)] = 0.0
    x[where(0.05)] = 0.0
    x[where(0.05)] = 1.0
    delta[where(0.05)] = EPS
    delta[where(0.05)] = -EPS
    return delta.to(device), grad.to(device), x.to(device)


def _check_project(backend: str, delta, grad, x, step_size=STEP, eps=EPS, direction=1.0) -> torch.Tensor:
    """Run ``backend`` and the reference on the same inputs; assert exact equality, the output
    contract (fresh contiguous float32 of the input's shape) and untouched inputs."""
    originals = [t.clone() for t in (delta, grad, x)]
    expected = project_step_reference(delta, grad, x, step_size, eps, direction)
    _poison_allocator(delta)
    out = _run(backend, project_step, delta, grad, x, step_size, eps, direction)
    assert out.dtype == torch.float32 and out.shape == delta.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    for before, after in zip(originals, (delta, grad, x), strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True, msg="an input was modified")
    return out


# ---------------------------------------------------------------------------------- project_step


@pytest.mark.parametrize("backend", ["cpp", "triton", "dispatch"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_project_step_matches_reference(backend, shape, direction):
    _require(backend)
    _check_project(backend, *_project_inputs(shape, seed=len(shape), device=_device(backend)), direction=direction)


@pytest.mark.parametrize("backend", ["cpp", "dispatch"])
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_project_step_matches_reference_large(backend, direction):
    _require(backend)
    _check_project(backend, *_project_inputs(LARGE_SHAPE, seed=5), direction=direction)


# Dyadic values, so every intermediate is exact and the expected outputs can be written by hand.
# Columns: x, delta, grad, out for direction +1, out for direction −1 (step 1/8, eps 1/4).
_HAND_CASES = [
    (0.5, 0.0, 1.0, -0.125, 0.125),  # a plain step either way
    (0.5, 0.0, -1.0, 0.125, -0.125),
    (0.5, 0.125, 0.0, 0.125, 0.125),  # sign(0) = 0: no step
    (0.0, 0.0, -0.0, 0.0, 0.0),  # sign(-0) = 0
    (0.5, 0.25, -1.0, 0.25, 0.125),  # the ε-box clips the step from above
    (0.5, -0.25, 1.0, -0.25, -0.125),  # ... and from below
    (1.0, 0.25, -1.0, 0.0, 0.0),  # the image box clips x + δ at 1
    (0.0, -0.25, 1.0, 0.0, 0.0),  # ... and at 0
    (0.875, 0.125, -1.0, 0.125, 0.0),  # image box tighter than the ε-box
    (1.0, -0.125, 1e-30, -0.25, 0.0),  # a tiny gradient still takes a full step
]


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton", "dispatch"])
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_project_step_hand_computed(backend, direction):
    if backend != "reference":
        _require(backend)
    columns = zip(*_HAND_CASES, strict=True)
    x, delta, grad, out_plus, out_minus = (torch.tensor(col, device=_device(backend)) for col in columns)
    expected = out_plus if direction > 0 else out_minus
    out = _run(backend, project_step, delta, grad, x, 0.125, 0.25, direction)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpp", "triton", "dispatch"])
def test_project_step_zero_gradient_is_projection_only(backend):
    _require(backend)
    delta, _, x = _project_inputs((2, 3, 9, 11), seed=11, device=_device(backend))
    delta = delta * 2  # half of it outside the ε-ball, so the projection has work to do
    out = _check_project(backend, delta, torch.zeros_like(delta), x)
    no_step = project_step_reference(delta, torch.randn_like(delta), x, 0.0, EPS)
    torch.testing.assert_close(out, no_step, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpp", "triton", "dispatch"])
def test_project_step_noncontiguous_inputs(backend):
    _require(backend)
    delta, grad, x = _project_inputs((2, 3, 33, 31), seed=3, device=_device(backend))
    transposed = [t.transpose(-1, -2) for t in (delta, grad, x)]
    assert not transposed[0].is_contiguous()
    _check_project(backend, *transposed)
    strided = [t[:, :, ::2, 1::3] for t in (delta, grad, x)]
    _check_project(backend, *strided, direction=-1.0)


@pytest.mark.parametrize("backend", ["cpp", "triton", "dispatch"])
def test_project_step_nan_semantics(backend):
    """NaN in delta or x propagates (torch.clamp); NaN in grad counts as sign 0 (torch.sign)."""
    _require(backend)
    delta, grad, x = _project_inputs((1151,), seed=7, device=_device(backend))
    delta[::7] = float("nan")
    x[3::11] = float("nan")
    grad[5::13] = float("nan")
    out = _check_project(backend, delta, grad, x)
    assert out.isnan().any() and not out.isnan().all()


@pytest.mark.parametrize("backend", ["cpp", "triton", "dispatch"])
def test_project_step_empty(backend):
    _require(backend)
    empty = torch.empty(0, 3, 4, 4, device=_device(backend))
    assert _run(backend, project_step, empty, empty, empty, STEP, EPS).shape == empty.shape


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    size=st.integers(1, 300),
    step_size=st.floats(0.0, 1.0, width=32),
    eps=st.floats(0.0, 1.0, width=32),
    direction=st.sampled_from([1.0, -1.0]),
)
def test_project_step_cpp_property(data, size, step_size, eps, direction):
    """Arbitrary float32 values (±0, subnormals, far outside both boxes) agree bit for bit."""
    _require("cpp")
    values = st.lists(st.floats(-4.0, 4.0, width=32), min_size=size, max_size=size)
    delta, grad, x = (torch.tensor(data.draw(values), dtype=torch.float32) for _ in range(3))
    _check_project("cpp", delta, grad, x, step_size, eps, direction)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton", "dispatch"])
def test_project_step_rejects_bad_arguments(backend):
    """The public function validates before dispatch, so every backend fails the same way."""
    if backend != "reference":
        _require(backend)
    delta, grad, x = _project_inputs((2, 3, 4, 4), seed=0, device=_device(backend))
    with pytest.raises(TypeError, match="delta must be float32, got torch.float64"):
        _run(backend, project_step, delta.double(), grad, x, STEP, EPS)
    with pytest.raises(TypeError, match="grad must be float32, got torch.bfloat16"):
        _run(backend, project_step, delta, grad.bfloat16(), x, STEP, EPS)
    with pytest.raises(ValueError, match=r"x has shape \(2, 3, 4, 3\) but delta has \(2, 3, 4, 4\)"):
        _run(backend, project_step, delta, grad, x[..., :3], STEP, EPS)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        _run(backend, project_step, delta, grad, x, STEP, -EPS)
    with pytest.raises(ValueError, match="step_size must be finite and >= 0"):
        _run(backend, project_step, delta, grad, x, float("nan"), EPS)


def test_cpp_ops_reject_bad_arguments():
    """The C++ operators validate on their own, for callers that reach torch.ops directly."""
    _require("cpp")
    ops = _ext.cpp_ops()
    delta, grad, x = _project_inputs((2, 3, 4, 4), seed=0)
    with pytest.raises(RuntimeError, match="project_step_linf: delta must be Float, got Double"):
        ops.project_step_linf(delta.double(), grad, x, STEP, EPS, 1.0)
    with pytest.raises(RuntimeError, match=r"project_step_linf: grad has shape \[2, 3, 4, 3\] but delta"):
        ops.project_step_linf(delta, grad[..., :3], x, STEP, EPS, 1.0)
    with pytest.raises(RuntimeError, match="project_step_linf: eps must be finite and >= 0"):
        ops.project_step_linf(delta, grad, x, STEP, -1.0, 1.0)
    image = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="apply_quantize_u8: image_u8 must be Byte, got Float"):
        ops.apply_quantize_u8(image.float(), delta)
    with pytest.raises(RuntimeError, match="apply_quantize_u8: image_u8 must be NxCxHxW or CxHxW"):
        ops.apply_quantize_u8(image[0, 0], delta[0, 0])
    with pytest.raises(RuntimeError, match="apply_quantize_u8: delta has shape"):
        ops.apply_quantize_u8(image, delta[:1])


# -------------------------------------------------------------------------------- apply_quantize


def _quantize_inputs(shape, seed: int):
    """Random images with saturated pixels, perturbations in the ε-ball, plus exact .5 ties
    (255 · 0.5 = 127.5 in float32) and perturbations that push far past 0 and 255."""
    gen = torch.Generator().manual_seed(seed)

    def where(p: float) -> torch.Tensor:
        return torch.rand(shape, generator=gen) < p

    image = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    image[where(0.05)] = 0
    image[where(0.05)] = 255
    delta = (2 * torch.rand(shape, generator=gen) - 1) * EPS
    delta[where(0.05)] = 0.5
    delta[where(0.05)] = -0.5
    delta[where(0.02)] = 2.0
    delta[where(0.02)] = -2.0
    # Ties on both parities, so half-to-even is tested whatever the draw: 137.5, 138.5, 72.5, 73.5.
    image.view(-1)[:4] = torch.tensor([10, 11, 200, 201], dtype=torch.uint8)
    delta.view(-1)[:4] = torch.tensor([0.5, 0.5, -0.5, -0.5])
    return image, delta


def _check_quantize(backend: str, image, delta):
    image, delta = image.to(_device(backend)), delta.to(_device(backend))
    expected = apply_quantize_reference(image, delta)
    _poison_allocator(image)
    out_u8, linf, sq_err = _run(backend, apply_quantize, image, delta)
    n = image.shape[0] if image.dim() == 4 else 1
    assert out_u8.dtype == torch.uint8 and out_u8.shape == image.shape
    assert linf.dtype == torch.float32 and linf.shape == (n,)
    assert sq_err.dtype == torch.float64 and sq_err.shape == (n,)
    assert torch.equal(out_u8, expected.out_u8)
    assert torch.equal(linf, expected.linf)
    assert torch.equal(sq_err, expected.sq_err)


@pytest.mark.parametrize("backend", ["cpp", "triton", "dispatch"])
@pytest.mark.parametrize("shape", [*SHAPES[:3], (3, 33, 31), LARGE_SHAPE], ids=str)
def test_apply_quantize_matches_reference(backend, shape):
    _require(backend)
    if backend == "triton" and shape == LARGE_SHAPE and project._TRITON_INTERPRETED:
        pytest.skip("large shapes only for compiled kernels: the Triton interpreter is slow")
    _check_quantize(backend, *_quantize_inputs(shape, seed=len(shape) + shape[0]))


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton", "dispatch"])
def test_apply_quantize_hand_computed(backend):
    if backend != "reference":
        _require(backend)
    image = torch.tensor([[10, 11, 0, 255, 100, 7]], dtype=torch.uint8).reshape(1, 1, 2, 3)
    delta = torch.tensor([[0.5, 0.5, -0.5, 0.5, 0.0, -1.0]]).reshape(1, 1, 2, 3)
    image, delta = image.to(_device(backend)), delta.to(_device(backend))
    out_u8, linf, sq_err = _run(backend, apply_quantize, image, delta)
    # 137.5 → 138 and 138.5 → 138 (half to even); −127.5 and 382.5 saturate; 7 − 255 → 0.
    assert out_u8.flatten().tolist() == [138, 138, 0, 255, 100, 0]
    assert linf.tolist() == [128.0]
    assert sq_err.tolist() == [(128**2 + 127**2 + 7**2) / 255**2]


@pytest.mark.parametrize("backend", ["cpp", "triton", "dispatch"])
def test_apply_quantize_noncontiguous_inputs(backend):
    _require(backend)
    image, delta = _quantize_inputs((3, 3, 17, 19), seed=2)
    _check_quantize(
        backend,
        image.contiguous(memory_format=torch.channels_last),
        delta.transpose(-1, -2).contiguous().transpose(-1, -2),
    )
    _check_quantize(backend, image[:, :, ::2, 1::3], delta[:, :, ::2, 1::3])


@pytest.mark.parametrize("backend", ["cpp", "dispatch"])
def test_apply_quantize_empty_batch(backend):
    _require(backend)
    _check_quantize(backend, torch.zeros(0, 3, 4, 4, dtype=torch.uint8), torch.zeros(0, 3, 4, 4))


@pytest.mark.parametrize("backend", ["reference", "cpp", "dispatch"])
def test_apply_quantize_rejects_bad_arguments(backend):
    if backend != "reference":
        _require(backend)
    image, delta = _quantize_inputs((2, 3, 4, 4), seed=0)
    with pytest.raises(TypeError, match="image_u8 must be uint8, got torch.float32"):
        _run(backend, apply_quantize, image.float(), delta)
    with pytest.raises(TypeError, match="delta must be float32, got torch.float64"):
        _run(backend, apply_quantize, image, delta.double())
    with pytest.raises(ValueError, match="must be a non-empty"):
        _run(backend, apply_quantize, image[0, 0], delta[0, 0])
    with pytest.raises(ValueError, match=r"delta has shape \(1, 3, 4, 4\)"):
        _run(backend, apply_quantize, image, delta[:1])


# ------------------------------------------------------------------------------ backend switches


def test_backend_for_automatic_choice():
    _require("cpp")
    cpu = torch.zeros(1)
    assert backend_for(cpu) == "cpp"
    assert backend_for(cpu, "apply_quantize") == "cpp"


@pytest.mark.skipif(not torch.cuda.is_available() or project.triton is None, reason="needs CUDA and triton")
def test_cuda_tensors_dispatch_to_triton_and_match_reference():
    """The automatic choice on a GPU (the "dispatch" cases above use CPU tensors): a CUDA tensor runs the
    Triton kernels unasked, and what they return is the reference's."""
    delta, grad, x = _project_inputs((7, 3, 32, 32), seed=4, device="cuda")
    for op in ("project_step", "apply_quantize", "augment"):
        assert backend_for(delta, op) == "triton", op
    _check_project("dispatch", delta, grad, x)
    image, qdelta = (t.cuda() for t in _quantize_inputs((7, 3, 32, 32), seed=4))
    expected, got = apply_quantize_reference(image, qdelta), apply_quantize(image, qdelta)
    for name in ("out_u8", "linf", "sq_err"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    xa, offsets, flips, kwargs = _augment_case((7, 3, 32, 32), torch.uint8, "reflect", True, seed=4, device="cuda")
    torch.testing.assert_close(augment(xa, offsets, flips, **kwargs), augment_reference(xa, offsets, flips, **kwargs),
                               rtol=0, atol=0)


def test_force_reference_switches(monkeypatch):
    cpu = torch.zeros(1)
    with force_reference():
        assert backend_for(cpu) == "reference"
        assert backend_for(cpu, "apply_quantize") == "reference"
    monkeypatch.setenv(_ext.FORCE_REFERENCE_ENV, "1")
    assert backend_for(cpu) == "reference"
    if _ext.cpp_available():
        with use_backend("cpp"):  # an explicit context outranks the environment
            assert backend_for(cpu) == "cpp"
    monkeypatch.setenv(_ext.FORCE_REFERENCE_ENV, "0")
    assert backend_for(cpu) == ("cpp" if _ext.cpp_available() else "reference")


def test_switches_reject_unknown_names():
    with pytest.raises(ValueError, match="valid backends: triton, cpp, reference"):
        with use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match="valid ops: project_step, apply_quantize, augment"):
        backend_for(torch.zeros(1), "project")


def test_forcing_a_missing_implementation_raises(monkeypatch):
    image, delta = _quantize_inputs((1, 3, 4, 4), seed=0)
    monkeypatch.delitem(project._APPLY_QUANTIZE_IMPLS, "triton", raising=False)
    with use_backend("triton"), pytest.raises(RuntimeError, match="apply_quantize has no triton implementation"):
        apply_quantize(image, delta)


# ------------------------------------------------------------- project_step: next input and L2

L2_EPS = 0.5
L2_STEP = 0.1
L2_TOL = dict(rtol=1e-5, atol=1e-6)
BF16_TRITON_SKIP = "bf16 Triton outputs only on a GPU: the interpreter truncates float32 → bfloat16"


def _next_input_case(backend: str, dtype) -> None:
    _require(backend)
    if backend == "triton" and dtype == torch.bfloat16 and project._TRITON_INTERPRETED:
        pytest.skip(BF16_TRITON_SKIP)


@pytest.mark.parametrize("backend", ["cpp", "triton", "dispatch"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 33, 31), (7, 3, 8, 9), (2, 1, 5, 7)], ids=str)
def test_project_step_next_input_matches_reference(backend, norm, dtype, channels_last, shape):
    """The fused second output x + δ' in the requested dtype and layout equals the reference's
    conversion of its own x + δ' exactly; δ' itself matches as in the single-output tests."""
    _next_input_case(backend, dtype)
    delta, grad, x = _project_inputs(shape, seed=shape[0] + 10, device=_device(backend))
    eps, step = (EPS, STEP) if norm == "linf" else (L2_EPS, L2_STEP)
    kwargs = dict(norm=norm, input_dtype=dtype, input_channels_last=channels_last)
    expected = project_step_reference(delta, grad, x, step, eps, -1.0, **kwargs)
    _poison_allocator(delta)
    _poison_allocator(delta.to(dtype))
    out = _run(backend, project_step, delta, grad, x, step, eps, -1.0, **kwargs)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert out.next_input.dtype == dtype and out.next_input.shape == delta.shape
    assert out.next_input.is_contiguous(memory_format=memory_format)
    tol = dict(rtol=0, atol=0) if norm == "linf" else L2_TOL
    torch.testing.assert_close(out.delta, expected.delta, **tol)
    # x + δ' from a δ' that differs by rounding may round to a neighbouring bf16/fp16 value.
    next_tol = dict(rtol=0, atol=0) if norm == "linf" else dict(rtol=0, atol=float(torch.finfo(dtype).eps))
    torch.testing.assert_close(out.next_input, expected.next_input, **next_tol)


@pytest.mark.parametrize("backend", ["cpp", "triton", "dispatch"])
@pytest.mark.parametrize("shape", [(1, 3, 33, 31), (7, 3, 32, 32), (2, 1, 5, 7), (1, 1151)], ids=str)
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_project_step_l2_matches_reference(backend, shape, direction):
    _require(backend)
    delta, grad, x = _project_inputs(shape, seed=len(shape) + 20, device=_device(backend))
    delta = delta * 40  # outside the ball of radius L2_EPS for most samples, so the projection acts
    grad[0] = 0.0  # a sample with no gradient takes no step
    expected = project_step_reference(delta, grad, x, L2_STEP, L2_EPS, direction, norm="l2")
    _poison_allocator(delta)
    out = _run(backend, project_step, delta, grad, x, L2_STEP, L2_EPS, direction, norm="l2")
    assert out.dtype == torch.float32 and out.shape == delta.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, **L2_TOL)


@pytest.mark.parametrize("backend", ["cpp", "dispatch"])
def test_project_step_l2_matches_reference_large(backend):
    _require(backend)
    delta, grad, x = _project_inputs(LARGE_SHAPE, seed=21)
    expected = project_step_reference(delta, grad, x, L2_STEP, L2_EPS, 1.0, norm="l2")
    _poison_allocator(delta)
    torch.testing.assert_close(_run(backend, project_step, delta, grad, x, L2_STEP, L2_EPS, norm="l2"), expected,
                               **L2_TOL)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_project_step_l2_geometry(backend):
    """Away from the image box: the step has length α along −ĝ, the result lies in the L2 ball, and
    a step that stays inside the ball is not rescaled."""
    if backend != "reference":
        _require(backend)
    dev = _device(backend)
    x = torch.full((3, 2, 4, 4), 0.5, device=dev)
    grad = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)).to(dev)
    delta = torch.zeros_like(x)
    delta[2] = 0.3 * grad[2] / grad[2].norm()  # sample 2 starts on the ray, so the step is along it
    with use_backend(backend):
        small = project_step(delta, grad, x, 0.01, 1.0, norm="l2")
        big = project_step(delta, grad, x, 0.8, 0.1, norm="l2")
    unit = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(small, delta - 0.01 * unit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(big.flatten(1).norm(dim=1), torch.full((3,), 0.1, device=dev), rtol=1e-5, atol=1e-6)


def test_project_step_rejects_bad_new_arguments():
    delta, grad, x = _project_inputs((2, 3, 4, 4), seed=0)
    with pytest.raises(ValueError, match="valid norms: linf, l2"):
        project_step(delta, grad, x, STEP, EPS, norm="l1")
    with pytest.raises(ValueError, match="norm='l2' needs a batch dimension"):
        project_step(delta[0, 0, 0], grad[0, 0, 0], x[0, 0, 0], STEP, EPS, norm="l2")
    with pytest.raises(TypeError, match="input_dtype must be one of"):
        project_step(delta, grad, x, STEP, EPS, input_dtype=torch.float64)
    with pytest.raises(ValueError, match="input_channels_last needs input_dtype and 4-D"):
        project_step(delta, grad, x, STEP, EPS, input_channels_last=True)


# ------------------------------------------------------------------------------------- augment

AUG_SHAPES = [(1, 3, 33, 31), (7, 3, 8, 9), (2, 1, 5, 7)]
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
REFLECT_ADJOINT_TOL = dict(rtol=1e-5, atol=1e-5)


def _augment_case(shape, dtype, padding: str, normalise: bool, seed: int, device: str = "cpu"):
    """An input batch, a parameter draw that reaches every border (offsets 0 and 2·pad, both
    flips), and the keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    pad = max(1, min(h, w) // 3) if padding == "reflect" else max(1, h // 4)
    pad = min(pad, min(h, w) - 1) if padding == "reflect" else pad
    if dtype == torch.uint8:
        x = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    else:
        x = torch.rand(shape, generator=gen)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    offsets[0] = torch.tensor([0, 2 * pad])
    flips = torch.rand(n, generator=gen) < 0.5
    flips[0] = True
    if n > 1:
        offsets[1] = torch.tensor([2 * pad, 0])
        flips[1] = False
    kwargs = dict(pad=pad, padding=padding)
    if normalise:
        kwargs.update(mean=torch.tensor(MEAN[:c]), std=torch.tensor(STD[:c]))
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return x.to(device), offsets.to(device), flips.to(device), kwargs


@pytest.mark.parametrize("backend", ["cpp", "triton", "dispatch"])
@pytest.mark.parametrize("shape", AUG_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
@pytest.mark.parametrize("padding", ["zero", "reflect"])
@pytest.mark.parametrize("normalise", [False, True])
def test_augment_forward_matches_reference(backend, shape, dtype, padding, normalise):
    _require(backend)
    x, offsets, flips, kwargs = _augment_case(shape, dtype, padding, normalise, seed=shape[0], device=_device(backend))
    expected = augment_reference(x, offsets, flips, **kwargs)
    _poison_allocator(expected)
    out = _run(backend, augment, x, offsets, flips, **kwargs)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
@pytest.mark.parametrize("padding", ["zero", "reflect"])
def test_augment_forward_matches_reference_large(dtype, padding):
    _require("cpp")
    x, offsets, flips, kwargs = _augment_case(LARGE_SHAPE, dtype, padding, True, seed=3)
    expected = augment_reference(x, offsets, flips, **kwargs)
    _poison_allocator(expected)
    torch.testing.assert_close(_run("cpp", augment, x, offsets, flips, **kwargs), expected, rtol=0, atol=0)


def _reference_backward(x, offsets, flips, grad_out, kwargs) -> torch.Tensor:
    leaf = x.detach().clone().requires_grad_(True)
    augment_reference(leaf, offsets, flips, **kwargs).backward(grad_out)
    return leaf.grad


@pytest.mark.parametrize("backend", ["cpp", "triton", "dispatch"])
@pytest.mark.parametrize("shape", AUG_SHAPES, ids=str)
@pytest.mark.parametrize("padding", ["zero", "reflect"])
@pytest.mark.parametrize("normalise", [False, True])
def test_augment_backward_matches_reference(backend, shape, padding, normalise):
    """The kernels' backward equals autograd through the reference: exactly with zero padding
    (one reader per pixel), to the order of ≤ 9 additions with reflect padding."""
    _require(backend)
    dev = _device(backend)
    x, offsets, flips, kwargs = _augment_case(shape, torch.float32, padding, normalise, seed=7, device=dev)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dev)
    expected = _reference_backward(x, offsets, flips, grad_out, kwargs)
    leaf = x.clone().requires_grad_(True)
    out = _run(backend, augment, leaf, offsets, flips, **kwargs)
    _poison_allocator(expected)
    out.backward(grad_out)
    tol = REFLECT_ADJOINT_TOL if padding == "reflect" else dict(rtol=0, atol=0)
    torch.testing.assert_close(leaf.grad, expected, **tol)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("padding", ["zero", "reflect"])
def test_augment_adjoint_identity(backend, padding):
    """<A x, y> = <x, Aᵀ y> for the linear part A (no mean; the std scaling is linear)."""
    if backend != "reference":
        _require(backend)
    dev = _device(backend)
    x, offsets, flips, kwargs = _augment_case((7, 3, 33, 31), torch.float32, padding, True, seed=5, device=dev)
    kwargs["mean"] = torch.zeros_like(kwargs["mean"])
    y = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dev)
    leaf = x.clone().requires_grad_(True)
    ax = _run(backend, augment, leaf, offsets, flips, **kwargs)
    (aty,) = torch.autograd.grad(ax, leaf, y)
    lhs = (ax.double() * y.double()).sum()
    rhs = (x.double() * aty.double()).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_augment_channels_last_in_and_out(backend):
    """A channels-last input is read in place and the output (and gradient) keep its layout."""
    _require(backend)
    x, offsets, flips, kwargs = _augment_case((2, 3, 9, 11), torch.float32, "zero", True, seed=9,
                                              device=_device(backend))
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out = _run(backend, augment, x_cl, offsets, flips, **kwargs)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, augment_reference(x, offsets, flips, **kwargs), rtol=0, atol=0)
    grad_out = torch.randn_like(x)
    out.backward(grad_out)
    torch.testing.assert_close(x_cl.grad, _reference_backward(x, offsets, flips, grad_out, kwargs), rtol=0, atol=0)


def test_augment_hand_computed():
    """A 1×1×2×3 image, pad 1: offsets (0, 0) shift the window up-left into the zero border;
    offsets (2, 2) with a flip read the mirrored window shifted down-right."""
    x = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]]).repeat(2, 1, 1, 1)
    offsets = torch.tensor([[0, 0], [2, 2]])
    flips = torch.tensor([False, True])
    for backend in ("reference", "cpp"):
        if backend == "cpp":
            _require("cpp")
        out = _run(backend, augment, x, offsets, flips, pad=1)
        assert out[0, 0].tolist() == [[0.0, 0.0, 0.0], [0.0, 1.0, 2.0]]
        assert out[1, 0].tolist() == [[0.0, 6.0, 5.0], [0.0, 0.0, 0.0]]
        reflect = _run(backend, augment, x, offsets, flips, pad=1, padding="reflect")
        assert reflect[0, 0].tolist() == [[5.0, 4.0, 5.0], [2.0, 1.0, 2.0]]


def test_augment_rejects_bad_arguments():
    x = torch.rand(2, 3, 8, 8)
    offsets, flips = torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, 2·pad\] = \[0, 2\]"):
        augment(x, offsets + 3, flips, pad=1)
    with pytest.raises(ValueError, match="reflect padding needs pad < H"):
        augment(x, offsets, flips, pad=8, padding="reflect")
    with pytest.raises(ValueError, match="valid paddings: zero, reflect"):
        augment(x, offsets, flips, pad=1, padding="wrap")
    with pytest.raises(ValueError, match="pass both mean and std"):
        augment(x, offsets, flips, pad=1, mean=[0.5] * 3)
    with pytest.raises(TypeError, match="x must be uint8 or float32"):
        augment(x.double(), offsets, flips, pad=1)
    with pytest.raises(ValueError, match="flips must be bool of shape"):
        augment(x, offsets, flips[:1], pad=1)


def test_crop_flip_draws_then_replays_through_the_op():
    """crop_flip = draw_crop_flip + augment (zero padding, pad H//8): the same seed gives the same
    batch on every backend, and the gradient reaches the input."""
    from ueguard.engine.augment import crop_flip, draw_crop_flip

    x = torch.rand(7, 3, 32, 32, requires_grad=True)
    offsets, flips = draw_crop_flip(7, torch.Generator().manual_seed(4), pad=4)
    expected = augment_reference(x.detach(), offsets, flips, pad=4)
    with force_reference():
        reference = crop_flip(x.detach(), torch.Generator().manual_seed(4))
    torch.testing.assert_close(reference, expected, rtol=0, atol=0)
    out = crop_flip(x, torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert x.grad is not None and x.grad.sum() > 0
    # each pixel is read at most once, so its gradient is 0 or 1
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0}


def test_augment_backend_switch():
    assert augment_module._AUGMENT_IMPLS.keys() >= {"reference", "cpp"}
    with force_reference():
        assert backend_for(torch.zeros(1), "augment") == "reference"


# --------------------------------------------------------------------------------- end to end


def test_emn_with_kernels_matches_reference():
    """A few EMN outer steps on a tiny random working set: the fused kernels and the forced
    references produce the same δ (bit-for-bit here, since the L∞ step is exact)."""
    _require("cpp")
    from ueguard.data.working_set import WorkingSet
    from ueguard.engine.runtime import Runtime
    from ueguard.methods import create_method
    from ueguard.models import create_model

    gen = torch.Generator().manual_seed(0)
    n = 16
    data = WorkingSet(torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8),
                      torch.arange(n) % 3, torch.zeros(n, dtype=torch.bool), ("a", "b", "c"),
                      [str(i) for i in range(n)])

    def run():
        torch.manual_seed(0)
        surrogate = create_model("resnet20_cifar", 3)
        method = create_method("emn", budget="quick", runtime=Runtime.create("cpu", "fp32"), surrogate=surrogate,
                               seed=0, pgd_steps=2, train_steps=1, max_rounds=2, batch_size=16, stop_accuracy=1.0)
        return method(data).delta

    with use_backend("cpp"):
        fused = run()
    with force_reference():
        reference = run()
    assert fused.abs().max() > 0
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-6)


# ------------------------------------------------------ C++ kernels on every instruction set
# The C++ loops are compiled for the baseline ISA, AVX2 and AVX-512 and chosen at run time
# (csrc/kernels.h). Each ISA the machine can run is checked against the reference as above, and the
# ISAs against each other: element-wise outputs and the L2 step's lane-wise norms are bitwise equal
# across ISAs by construction.

CPP_ISAS = _ext.cpu_isas() if _ext.cpp_available() else []
ISA_SHAPES = [(1, 3, 33, 31), (7, 3, 8, 9), (2, 4, 17, 19), (2, 1, 5, 7), LARGE_SHAPE]


@pytest.mark.skipif(not CPP_ISAS, reason=CPP_SKIP_REASON)
@pytest.mark.parametrize("isa", CPP_ISAS)
def test_every_cpu_isa_matches_reference(isa):
    with _ext.use_cpu_isa(isa):
        assert _ext.cpu_isa() == isa
        for shape in ISA_SHAPES:
            for direction in (1.0, -1.0):
                _check_project("cpp", *_project_inputs(shape, seed=shape[1] + shape[2]), direction=direction)
            _check_quantize("cpp", *_quantize_inputs(shape, seed=shape[2]))
            delta, grad, x = _project_inputs(shape, seed=shape[3])
            for norm, eps, step in (("linf", EPS, STEP), ("l2", L2_EPS, L2_STEP)):
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    for channels_last in (False, True):
                        kwargs = dict(norm=norm, input_dtype=dtype, input_channels_last=channels_last)
                        expected = project_step_reference(delta, grad, x, step, eps, -1.0, **kwargs)
                        _poison_allocator(delta.to(dtype))
                        with use_backend("cpp"):
                            out = project_step(delta, grad, x, step, eps, -1.0, **kwargs)
                        tol = dict(rtol=0, atol=0) if norm == "linf" else L2_TOL
                        next_tol = tol if norm == "linf" else dict(rtol=0, atol=float(torch.finfo(dtype).eps))
                        torch.testing.assert_close(out.delta, expected.delta, **tol)
                        torch.testing.assert_close(out.next_input, expected.next_input, **next_tol)


@pytest.mark.skipif(len(CPP_ISAS) < 2, reason="only one instruction set available on this machine")
def test_cpu_isas_agree_bitwise():
    delta, grad, x = _project_inputs((5, 3, 41, 37), seed=99)
    delta = delta * 40  # the L2 projection acts
    image, qdelta = _quantize_inputs((5, 3, 41, 37), seed=98)
    outputs = {}
    for isa in CPP_ISAS:
        with _ext.use_cpu_isa(isa), use_backend("cpp"):
            outputs[isa] = (
                project_step(delta, grad, x, STEP, EPS),
                *project_step(delta, grad, x, L2_STEP, L2_EPS, norm="l2", input_dtype=torch.bfloat16,
                              input_channels_last=True),
                *apply_quantize(image, qdelta),
            )
    first, *rest = CPP_ISAS
    for isa in rest:
        for a, b in zip(outputs[first], outputs[isa], strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=f"{isa} differs from {first}")


@pytest.mark.skipif(not CPP_ISAS, reason=CPP_SKIP_REASON)
def test_cpu_isa_switch_rejects_unknown_and_restores():
    before = _ext.cpu_isa()
    with pytest.raises(ValueError, match=r"unknown or uncompiled CPU ISA 'sse9'; this build and CPU can run: "):
        with _ext.use_cpu_isa("sse9"):
            pass
    assert _ext.cpu_isa() == before
    with _ext.use_cpu_isa("default"):
        assert _ext.cpu_isa() == "default"
    assert _ext.cpu_isa() == before


@pytest.mark.skipif(not CPP_ISAS, reason=CPP_SKIP_REASON)
def test_cpu_isa_environment_variable():
    """UEGUARD_CPU_ISA picks the ISA when the extension loads; a bad value fails the kernel call
    with a message that names the variable and the valid choices."""
    code = ("import torch; from ueguard.kernels import _ext, project_step; x = torch.rand(8); "
            "project_step(x, x, x, 0.1, 0.1); print(_ext.cpu_isa())")
    env = {**os.environ, _ext.CPU_ISA_ENV: "default"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "default"
    env[_ext.CPU_ISA_ENV] = "bogus"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "UEGUARD_CPU_ISA: unknown or uncompiled CPU ISA 'bogus'" in done.stderr
