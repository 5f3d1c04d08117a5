"""Compiled model calls, built once per model and reused by every step of a run.

The engine's two step kinds — the outer SGD step (:class:`ueguard.engine.loops.Trainer`) and the inner
PGD step (:func:`ueguard.engine.loops.input_gradient` + :func:`ueguard.kernels.project_step`) — call a
model through :func:`model_call`. With ``Runtime.compile == "on"`` that is ``torch.compile`` of the
model (or of one of its methods, e.g. SSC's ``forward_stages``), made on first use and kept in a small
cache stored on the model itself, so it lives and dies with the model and a ``copy.deepcopy`` of the
model starts with an empty cache. Dynamo then keeps one graph per (train/eval mode, which parameters
need gradients, autocast state, batch shape): a run compiles a handful of graphs in its first round and
none after (``tests/test_engine.py`` counts them).

Shapes are static (``dynamic=False``): the last, smaller batch of a pass gets its own graph instead of
turning every graph into a dynamic-shape one. On CUDA, ``cuda_graphs`` selects
``mode="reduce-overhead"`` (CUDA graphs), which needs static shapes — the reason for the choice above.

Gradient-free steps: the PGD step wants ∇ₓ only. Eager autograd skips the weight gradients by itself,
but a compiled backward graph computes the gradient of every graph input that requires one, so
:func:`frozen_parameters` switches ``requires_grad`` off for the step (a guard of the compiled graph,
so the frozen variant is compiled once and then selected, not recompiled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

_CACHE_ATTR = "_ueguard_compiled"


class _CompiledCache(dict):
    """Compiled callables of one model, keyed by (method, mode). Not copied with the model (a compiled
    callable is bound to the original) and not pickled."""

    def __deepcopy__(self, memo) -> "_CompiledCache":
        return _CompiledCache()

    def __copy__(self) -> "_CompiledCache":
        return _CompiledCache()

    def __reduce__(self):
        return (_CompiledCache, ())


def compile_mode(runtime) -> str:
    """The ``torch.compile`` mode for a runtime: CUDA graphs only on CUDA when asked for."""
    return "reduce-overhead" if runtime.cuda_graphs and runtime.device.type == "cuda" else "default"


def model_call(model: nn.Module, runtime, method: str = "forward") -> Callable:
    """``model`` (or ``model.<method>``) as the runtime wants it called: eager, or compiled once and cached
    on the model."""
    if runtime.compile != "on":
        return model if method == "forward" else getattr(model, method)
    cache = model.__dict__.get(_CACHE_ATTR)
    if cache is None:
        cache = _CompiledCache()
        model.__dict__[_CACHE_ATTR] = cache  # a plain attribute: not a submodule, not in the state dict
    mode = compile_mode(runtime)
    key = (method, mode)
    if key not in cache:
        target = model if method == "forward" else getattr(model, method)
        cache[key] = torch.compile(target, mode=mode, dynamic=False)
    return cache[key]


@contextlib.contextmanager
def frozen_parameters(*models: nn.Module):
    """Parameters of ``models`` need no gradient inside the block (restored after, as they were), so a
    backward pass computes input gradients only — in eager mode and in a compiled graph alike."""
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
