"""The two halves of every bi-level protection loop, shared by all model-based methods and by verify.

* :class:`Trainer` — SGD on a classifier (the surrogate's outer step, a victim's training run).
* :func:`input_gradient` + :func:`ueguard.kernels.project_step` — one PGD step on perturbations.

Both take float images in [0, 1] and leave data movement to the caller, who keeps the whole working
set on the device as uint8 and converts one batch at a time. Both call the model through
:func:`ueguard.engine.compiled.model_call`, so with ``Runtime.compile == "on"`` every step of a run reuses
one compiled graph per model, mode and batch shape. Neither reads a value back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ueguard.engine.compiled import frozen_parameters, model_call
from ueguard.engine.runtime import Runtime
from ueguard.kernels import project_step


@dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum, weight decay and gradient-norm clipping (the field's standard surrogate)."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    grad_clip: float | None = 5.0
    warmup: float = 0.15    # one-cycle schedule: share of steps to the peak, start and end as fractions of it
    lr_start: float = 0.1
    lr_end: float = 0.001
    cycle_momentum: bool = True  # one-cycle's momentum cycle (0.95 → 0.85 at the peak → 0.95) instead of ``momentum``


class Trainer:
    """Owns a model, its SGD optimiser and (optionally) a per-step learning-rate schedule (linear one-cycle;
    a group with its own ``lr`` peaks there). ``loss(logits, y)``: the training loss (cross-entropy)."""

    def __init__(self, model: nn.Module, runtime: Runtime, optim: OptimConfig = OptimConfig(),
                 total_steps: int | None = None, params=None, loss=None) -> None:
        self.model = model
        self.runtime = runtime
        self.optim = optim
        self.loss = loss if loss is not None else _cross_entropy
        groups = _param_groups(params if params is not None else model.parameters())
        if not groups:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum,
                                         weight_decay=optim.weight_decay, nesterov=optim.nesterov)
        self.scheduler = (torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=[g.get("lr", optim.lr) for g in groups], total_steps=total_steps,
            pct_start=optim.warmup, anneal_strategy="linear", div_factor=1 / optim.lr_start,
            final_div_factor=optim.lr_start / optim.lr_end, cycle_momentum=optim.cycle_momentum)
            if total_steps else None)
        #: The learning rate of every group in the last step taken (the schedule's value after the run's
        #: final step lies past its end, extrapolated below zero: never used, so never reported).
        self.step_lrs = [g["lr"] for g in self.optimizer.param_groups]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step on a batch; returns (loss, number correct) as device tensors, so the loop never
        waits on the host unless the caller reads them."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.runtime.autocast():
            logits = model_call(self.model, self.runtime)(x)
            loss = self.loss(logits, y)
        loss.backward()
        if self.optim.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        self.optimizer.step()
        self.step_lrs = [g["lr"] for g in self.optimizer.param_groups]
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.detach(), (logits.argmax(1) == y).sum()


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y)


def _param_groups(params) -> list[dict]:
    """Parameters or parameter-group dicts (``{"params": [...], "name": "layer1"}``: per-stage learning
    rates) → SGD groups holding only parameters that require gradients; empty groups are dropped."""
    items = list(params)
    if items and not isinstance(items[0], dict):
        items = [{"params": items}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in items]
    return [g for g in groups if g["params"]]


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, runtime: Runtime,
                   transform=None) -> tuple[torch.Tensor, torch.Tensor]:
    """∇ₓ CE(f(T(x)), y) for a batch (model mode is the caller's choice), and the per-sample correctness.

    ``transform`` T (default identity) is a differentiable augmentation drawn fresh by the caller, so the
    gradient is the expectation-over-transformations sample that reaches x through T's adjoint. Only
    the input gradient is computed: the parameters are frozen for the step (see
    :func:`ueguard.engine.compiled.frozen_parameters`)."""
    x = x.detach().requires_grad_(True)
    forward = model_call(model, runtime)
    with frozen_parameters(model):
        with runtime.autocast():
            logits = forward(x if transform is None else transform(x))
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.argmax(1) == y


def pgd_step(model: nn.Module, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor, runtime: Runtime, *,
             step_size: float, eps: float, direction: float = 1.0, norm: str = "linf", transform=None) -> torch.Tensor:
    """One PGD step on a batch of perturbations: ∇ through the model at x + δ, then the fused signed (L∞)
    or normalised (L2) step and projection onto the ε-ball and the image range
    (:func:`ueguard.kernels.project_step`). ``direction`` +1 descends the loss (error-minimising), −1
    ascends it. Returns the new δ (float32, contiguous); the caller applies any further constraint."""
    grad, _ = input_gradient(model, x + delta, y, runtime, transform=transform)
    return project_step(delta, grad, x, step_size, eps, direction, norm=norm)


@torch.no_grad()
def predict(model: nn.Module, batches, runtime: Runtime, logits=None) -> torch.Tensor:
    """Argmax predictions over an iterable of float batches, in eval mode, concatenated. ``logits(forward,
    x)`` replaces the plain forward pass (test-time augmentation, :mod:`ueguard.engine.recipes`)."""
    was_training = model.training
    model.eval()
    forward = model_call(model, runtime)
    out = []
    for x in batches:
        with runtime.autocast():
            out.append((forward(x) if logits is None else logits(forward, x)).argmax(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=runtime.device)


def fit_linear_head(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, *, l2: float = 1e-3,
                    max_iter: int = 200) -> nn.Linear:
    """Fit ``head`` in place, from its current weights, as an L2-regularised multinomial logistic
    regression on fixed N×D ``features``: full-batch L-BFGS (strong-Wolfe line search) on cross-entropy +
    ``l2``·‖W‖². A linear probe of a frozen body, on the device the features are on."""
    head.requires_grad_(True)
    optimizer = torch.optim.LBFGS(list(head.parameters()), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels) + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def batch_ranges(n: int, batch_size: int):
    """Consecutive index ranges covering ``0..n-1``."""
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


class BatchSampler:
    """Endless shuffled minibatches of sample indices, one fresh permutation per pass (epoch), drawn from
    the caller's generator so runs are reproducible."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True) -> None:
        if n <= 0:
            raise ValueError("cannot sample batches from an empty set")
        self.n, self.batch_size, self.generator = n, min(batch_size, n), generator
        self.drop_last = drop_last
        self._order = torch.empty(0, dtype=torch.long)
        self._pos = 0

    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def epoch(self):
        """One pass over a fresh permutation."""
        order = torch.randperm(self.n, generator=self.generator)
        for i in range(self.steps_per_epoch()):
            yield order[i * self.batch_size:(i + 1) * self.batch_size]

    def state_dict(self) -> dict:
        """The current permutation and the position in it (the generator's state is its owner's)."""
        return {"order": self._order.clone(), "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        self._order, self._pos = state["order"].clone(), int(state["pos"])

    def next(self) -> torch.Tensor:
        if self._pos + self.batch_size > self._order.numel():
            self._order = torch.randperm(self.n, generator=self.generator)
            self._pos = 0
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx
