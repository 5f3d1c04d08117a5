"""Progressive Staged Training with Activation Cluster Measurement — ueguard's reconstruction.

Dang et al., *Unlearnable Examples Give a False Sense of Data Privacy: Understanding and Relearning*
(arXiv 2306.02064) observe that on unlearnable data the **shallow** layers latch onto the class-aligned
perturbation first and pass it deeper; slowing or freezing those layers when that happens lets the
network learn the semantics instead. They publish neither the ACM formula nor the schedule constants,
so what follows is **ueguard's own reconstruction**, not the paper's exact algorithm:

* **ACM** at stage l, on a fixed probe set of training images: global-average-pool the activations,
  take class means μ_c, and form the within/between ratio

      ACM_l = mean_c mean_{x∈c} ‖a_l(x) − μ_c‖  /  mean_{c≠c′} ‖μ_c − μ_c′‖.

  Natural images barely cluster by label in shallow features (a large ratio); a sharp *fall* of a
  shallow stage's ACM means that stage keys on something class-aligned that is easy to see early — the
  perturbation.
* **Trigger**: ACM_l(t) < ``tau`` · ACM_l(t₀), t₀ the model before training, checked
  ``checks_per_epoch`` times per epoch, on the ``monitor`` shallowest stages.
* **Stages**: on a trigger at stage l (the deepest triggered stage), every parameter group at or
  shallower than l that was not cut yet has its learning-rate schedule multiplied by ``gamma`` (0
  freezes). Later triggers can only cut deeper stages: the schedule advances shallow → deep. The
  head and the deepest body stage always keep the base schedule.

The constants (``tau``, ``gamma``, ``probe_size``, ``checks_per_epoch``, ``monitor``) are options
(``--defense-option staged.tau=0.5``). Defaults: ``tau`` 1, ``gamma`` 0, ``checks_per_epoch`` 4,
``monitor`` 3 (stem, layer1, layer2) — freeze the shallow stages at the first fall of their ACM, a quarter
of an epoch in, which recovered EMN- and REM-protected data best of the settings ``bench/staged.py``
tried on CIFAR-10. The trigger fires on clean data too (ACM falls as any model learns), so ``staged`` is
a defense an adversary applies to data it suspects, not a detector; ``tau`` < 1 trades recovery for a
later, rarer cut. Measurements and the search: docs/verify.md (section "staged") and
docs/results/2026-11-25-staged.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ueguard.defenses.base import DEFENSES, Defense, DefenseConfig, FitState
from ueguard.engine.loops import batch_ranges
from ueguard.engine.runtime import Runtime


def acm(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Within/between cluster ratio of ``N×D`` features grouped by ``labels`` (see the module docstring).
    NaN when fewer than two classes are present or all class means coincide."""
    features = features.double()
    classes = labels.unique()
    if len(classes) < 2:
        return float("nan")
    means = torch.stack([features[labels == c].mean(0) for c in classes])
    within = torch.stack([(features[labels == c] - means[i]).norm(dim=1).mean() for i, c in enumerate(classes)]).mean()
    k = len(classes)
    pair = torch.cdist(means, means)
    between = pair.sum() / (k * (k - 1))  # mean over ordered pairs c ≠ c′ (the diagonal is 0)
    return float(within / between) if between > 0 else float("nan")


@torch.no_grad()
def stage_acm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, runtime: Runtime, stages: list[str],
              batch_size: int = 256) -> dict[str, float]:
    """ACM of each named stage's globally average-pooled activations on uint8 probe ``images`` (eval mode)."""
    was_training = [(m, m.training) for m in model.modules()]
    model.eval()
    pooled: dict[str, list[torch.Tensor]] = {name: [] for name in stages}
    try:
        for s in batch_ranges(len(images), batch_size):
            with runtime.autocast():
                acts = model.forward_stages(runtime.to_float(images[s]), stages)
            for name in stages:
                pooled[name].append(acts[name].float().mean(dim=(2, 3)))
    finally:
        for module, training in was_training:
            module.training = training
    return {name: acm(torch.cat(pooled[name]).cpu(), labels.cpu()) for name in stages}


class StagedSchedule:
    """The trigger logic, separate from any model so it can be tested on a constructed ACM sequence.

    ``layers``: monitored stages, shallow → deep. The first :meth:`observe` sets the reference ACM(t₀);
    each later one returns the stage at which to cut (the deepest triggered stage deeper than every
    earlier cut), or ``None``."""

    def __init__(self, layers: list[str], tau: float) -> None:
        self.layers = list(layers)
        self.tau = tau
        self.reference: dict[str, float] | None = None
        self.cut_index = -1  # deepest monitored stage already cut

    def observe(self, values: dict[str, float]) -> str | None:
        if self.reference is None:
            self.reference = dict(values)
            return None
        fired = [i for i, name in enumerate(self.layers)
                 if i > self.cut_index and values[name] < self.tau * self.reference[name]]  # NaN never fires
        if not fired:
            return None
        self.cut_index = max(fired)
        return self.layers[self.cut_index]


def scale_group_lr(optimizer: torch.optim.Optimizer, names: set[str], factor: float) -> list[str]:
    """Multiply the learning-rate schedule of the named parameter groups by ``factor``: the current lr and
    the OneCycle anchors (``initial_lr``, ``max_lr``, ``min_lr``) the scheduler recomputes it from."""
    done = []
    for group in optimizer.param_groups:
        if group.get("name") in names:
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if key in group:
                    group[key] = group[key] * factor
            done.append(group["name"])
    return done


@dataclass(frozen=True)
class StagedConfig(DefenseConfig):
    tau: float = 1.0            # trigger when ACM falls below tau × its value before training (bench/staged.py)
    gamma: float = 0.0          # learning-rate factor for cut stages (0 = freeze; 0.1 recovered far less)
    probe_size: int = 1000      # training images ACM is measured on
    checks_per_epoch: int = 4
    monitor: int = 3            # shallowest stages watched (stem, layer1, layer2); 0 = every body stage but the deepest
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.tau <= 1 or not 0 <= self.gamma <= 1:
            raise ValueError("staged needs 0 < tau <= 1 and 0 <= gamma <= 1")
        if self.probe_size < 2 or self.checks_per_epoch < 1 or self.monitor < 0:
            raise ValueError("staged needs probe_size >= 2, checks_per_epoch >= 1 and monitor >= 0")


@DEFENSES.register("staged", "st")
class Staged(Defense):
    description = ("Progressive Staged Training with ACM (ueguard's reconstruction): cut the learning rate of "
                   "shallow stages, shallow → deep, when their activations start clustering by label")
    config_class = StagedConfig
    presets = {"quick": {"probe_size": 500}, "thorough": {"probe_size": 2000}}

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.curve: dict[str, list[float]] = {}
        self.positions: list[float] = []
        self.cuts: list[dict[str, Any]] = []
        self._cut: set[str] = set()

    def start(self, state: FitState) -> dict[str, Any]:
        try:
            stages = [name for name, _ in state.model.stages()]
        except (NotImplementedError, AttributeError) as error:
            raise ValueError(f"defense 'staged' needs a model with a known stage layout: {error}") from None
        self.order = stages
        self.body = stages[:-1]  # everything but the head
        count = self.config.monitor or max(1, len(self.body) - 1)
        monitored = self.body[:min(count, len(self.body) - 1) or 1]
        self.schedule = StagedSchedule(monitored, self.config.tau)
        gen = torch.Generator().manual_seed(self.config.seed)
        n = len(state.images)
        pick = torch.randperm(n, generator=gen)[:min(self.config.probe_size, n)].sort().values.to(state.images.device)
        self.probe = (state.images[pick], state.labels[pick])
        spe, per = state.steps_per_epoch, self.config.checks_per_epoch
        self.check_points = {max(1, round(spe * (i + 1) / per)) for i in range(per)}  # within-epoch steps; the
        self.steps_per_epoch = spe                                                     # last is the epoch's end
        values = self._check(state, 0.0)
        return {"acm": values}

    def _check(self, state: FitState, position: float) -> dict[str, float]:
        values = stage_acm(state.model, *self.probe, state.runtime, self.body)
        self.positions.append(round(position, 4))
        for name, value in values.items():
            self.curve.setdefault(name, []).append(round(value, 6))
        boundary = self.schedule.observe(values)
        if boundary is not None:
            upto = set(self.order[:self.order.index(boundary) + 1]) - self._cut
            scaled = scale_group_lr(state.trainer.optimizer, upto, self.config.gamma)
            self._cut |= upto
            self.cuts.append({"epoch": round(position, 4), "stage": boundary, "groups": scaled,
                              "acm": round(values[boundary], 6),
                              "reference": round(self.schedule.reference[boundary], 6)})
        return {name: round(v, 6) for name, v in values.items()}

    def after_step(self, state: FitState, step: int) -> None:
        if (step - 1) % self.steps_per_epoch + 1 in self.check_points:
            self._check(state, step / self.steps_per_epoch)

    def end_epoch(self, state: FitState, epoch: int) -> dict[str, Any]:
        latest = {name: values[-1] for name, values in self.curve.items()}
        lrs = {}
        for i, (g, lr) in enumerate(zip(state.trainer.optimizer.param_groups, state.trainer.step_lrs)):
            lrs.setdefault(g.get("name", str(i)), lr)  # a stage's first group (a recipe may split off its BN shifts)
        return {"acm": latest, "group_lr": lrs}

    def summary(self) -> dict[str, Any]:
        return {"acm_curve": {"epoch": self.positions, "stages": self.curve,
                              "monitored": list(self.schedule.layers) if hasattr(self, "schedule") else []},
                "stage_cuts": self.cuts}
