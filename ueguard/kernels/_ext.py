"""The boundary between ueguard's kernels and their compiled backends.

Two concerns live here, and nothing else:

* loading the C++ extension ``ueguard._C`` (built from csrc/ by setup.py), lazily and at most
  once. Loading it registers the ``torch.ops.ueguard`` CPU operators. A missing or broken build
  is not an error until someone asks for the C++ backend; :func:`cpp_unavailable_reason` keeps
  the import error for messages.
* choosing the backend for one call of a kernel. The policy, in order of precedence:

  1. an explicit :func:`use_backend` (or :func:`force_reference`) context, if one is active;
  2. the environment variable ``UEGUARD_FORCE_REFERENCE=1``, which forces the PyTorch reference;
  3. automatic: Triton for CUDA tensors, C++ for CPU tensors, the reference otherwise (and
     whenever the op has no available implementation for that device).

  An explicit context is honoured strictly: forcing a backend that the op does not have, or that
  failed to load, raises instead of silently running something else.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Collection, Iterator

import torch

BACKENDS = ("triton", "cpp", "reference")
"""Every backend name a kernel may implement, fastest first."""

FORCE_REFERENCE_ENV = "UEGUARD_FORCE_REFERENCE"
"""Set to 1 (or true/yes/on) to run the PyTorch reference of every kernel."""

_TRUTHY = frozenset({"1", "true", "yes", "on"})
_forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("ueguard_forced_backend", default=None)


@functools.cache
def _load_cpp() -> str | None:
    """Import ``ueguard._C`` once; return None on success or the reason it failed."""
    try:
        import ueguard._C  # noqa: F401  (the import registers torch.ops.ueguard.*)
    except (ImportError, OSError) as exc:
        return (
            f"ueguard._C could not be loaded ({type(exc).__name__}: {exc}); build it with "
            "`pip install --no-build-isolation -e .` against the installed torch"
        )
    return None


def cpp_available() -> bool:
    """Whether the C++ extension loads (loading it on first call). Never raises."""
    return _load_cpp() is None


def cpp_unavailable_reason() -> str | None:
    """Why the C++ extension did not load, or None when it did."""
    return _load_cpp()


def cpp_ops():
    """The ``torch.ops.ueguard`` namespace, after loading the extension that populates it."""
    reason = _load_cpp()
    if reason is not None:
        raise RuntimeError(reason)
    return torch.ops.ueguard


CPU_ISA_ENV = "UEGUARD_CPU_ISA"
"""Instruction set of the C++ kernels (``auto``, ``avx512``, ``avx2`` or ``default``), read when
the extension loads; unset or ``auto``: the widest one the CPU supports."""


def cpu_isas() -> list[str]:
    """The instruction sets the C++ kernels can run with on this CPU and build, widest first."""
    return list(cpp_ops().cpu_isas())


def cpu_isa() -> str:
    """The instruction set the C++ kernels run with now."""
    return str(cpp_ops().cpu_isa())


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[None]:
    """Run the C++ kernels with instruction set ``name`` inside the block (tests, benchmarks).

    Process-wide, unlike :func:`use_backend`: the kernels read one switch. An ISA this CPU or build
    cannot run raises, listing the ones it can."""
    ops = cpp_ops()
    try:
        previous = ops.set_cpu_isa(name)
    except RuntimeError as exc:
        raise ValueError(str(exc).splitlines()[0]) from None
    try:
        yield
    finally:
        ops.set_cpu_isa(previous)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every kernel call inside the block on backend ``name`` (``"triton"``, ``"cpp"`` or
    ``"reference"``), overriding the environment and the automatic choice.

    Meant for tests and debugging, e.g. running the Triton kernels on CPU tensors under the
    interpreter (``TRITON_INTERPRET=1`` set before triton is first imported). The setting is
    context-local, so threads and asyncio tasks do not see each other's choice.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    token = _forced_backend.set(name)
    try:
        yield
    finally:
        _forced_backend.reset(token)


def force_reference() -> contextlib.AbstractContextManager[None]:
    """Run every kernel call inside the block on its PyTorch reference (``use_backend("reference")``)."""
    return use_backend("reference")


def reference_forced_by_env() -> bool:
    """Whether ``UEGUARD_FORCE_REFERENCE`` asks for the reference (read on every call)."""
    return os.environ.get(FORCE_REFERENCE_ENV, "").strip().lower() in _TRUTHY


def select_backend(op: str, tensor: torch.Tensor, implemented: Collection[str]) -> str:
    """The backend that runs ``op`` on ``tensor``, given the backends the op has in this process.

    ``implemented`` lists the op's backends that can run at all (e.g. without "triton" when triton
    is not installed); the C++ backend is additionally checked by loading the extension.
    """
    forced = _forced_backend.get()
    if forced is not None:
        if forced not in implemented:
            raise RuntimeError(
                f"backend {forced!r} was forced but {op} has no {forced} implementation in this process "
                f"(available: {', '.join(implemented)})"
            )
        if forced == "cpp" and not cpp_available():
            raise RuntimeError(f"backend 'cpp' was forced for {op}: {cpp_unavailable_reason()}")
        return forced
    if reference_forced_by_env():
        return "reference"
    if tensor.is_cuda and "triton" in implemented:
        return "triton"
    if tensor.device.type == "cpu" and "cpp" in implemented and cpp_available():
        return "cpp"
    return "reference"
