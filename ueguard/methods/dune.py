"""DUNE — Dual-branch robust UNlearnable Examples (Wang, Zhang, Pan, Zhou, Jiang, Zeng, Jia, *Dual-branch
Robust Unlearnable Examples*, ICML 2026, arXiv 2605.01718). Code: github.com/wxldragon/DUNE.

Threat model: the adversary trains from scratch on the released images and may first run a defense —
JPEG compression (ISS-J), grayscale, colour jitter or noise, adversarial training, diffusion purification.
A perturbation that lives in one domain (high-frequency L∞ noise) has one kind of structure, which such a
defense removes wholesale. DUNE binds *two* perturbations of different domains to the same wrong label,
so that what survives of either still carries it:

* **shift-induced labels**: every sample of class y is bound to t = (y + ``target_offset``) mod C (the
  authors' ``permutation_offset`` 3), one fixed permutation of the classes without fixed points (an
  offset ≥ C is taken into 1 … C−1, see :func:`shift`);
* **spatial branch** (sample-wise): targeted PGD towards t against an *ensemble* of surrogates,
  δs_i = argmin_{‖δ‖∞ ≤ rs} mean_m CE(f_m(x_i + δ), t_i): ``steps`` signed steps of ``step_fraction``·ε
  on the sign of the ensemble-mean input gradient, from zero;
* **colour branch** (class-wise): one RGB offset c_k ∈ ℝ³ per class, added to every pixel of every
  class-k image, found by particle-swarm optimisation (gradient-free, 3 dimensions) of
  mean_m CE(f_m(clip(x + c_k)), t_k) + mean_x max(0, ``min_psnr`` − PSNR(x, clip(x + c_k))) over a batch
  of up to ``colour_batch`` class-k images; ``particles`` particles, ``pso_iterations`` iterations,
  v ← ``inertia``·v + ``cognitive``·(personal best − p) + ``social``·(global best − p);
* **ensemble**: the authors' "unlearnability-enhancing ensemble" is ``ensemble`` checkpoints of one
  surrogate taken evenly over its clean training (their release picks every (n/5)-th of its saved
  epochs). ueguard trains the given surrogate on the clean working set for ``train_epochs`` (SGD,
  one-cycle, crop + flip) and snapshots it at epochs ⌈E·k/K⌉, k = 1…K; with ``train_epochs=0`` the given
  (``--weights``) surrogate is the one member.

Release: x̃_i = clip(x_i + δs_i + c_{y_i}, 0, 1) (equal to the authors' clip(clip(x + δs) + c), since PGD
keeps x + δs in range), saved as 8-bit images. ``branches`` selects ``both`` (the authors' ``--ours``),
``spatial`` (their ``--adv``: an ensemble TAP towards y + 3) or ``colour`` (their ``--colorshift``).

**Budget.** The authors bound the spatial branch by L∞ ε = 8/255 and the colour branch by nothing but
the PSNR/SSIM/LPIPS hinges (PSO starts in ±0.1 ≈ ±25/255), so the released change exceeds ε. ueguard
bounds the colour shift by an L∞ radius ``colour_eps`` (default 8/255) and declares the sum: the
method's budget is L∞ **ε + colour_eps** (the spatial branch gets the CLI's ``--eps``, the colour
branch ``colour_eps`` on top), recorded in the manifest as ``budget`` with ``budget_parts`` ``{spatial,
colour}``; every saved file's ``within_budget`` is the L∞ check every L∞ method has, against that sum.
With ``colour_inside=true`` the colour branch lives *inside* ``--eps`` instead: the spatial branch gets
ε − colour_eps and the declared budget is ε, the same as every other L∞ method's (for like-for-like
comparisons).

Authors' settings (``thorough``): 5 snapshots, offset 3, 30 PGD steps of 0.5/255 at ε = 8/255, PSO with
10 particles × 10 iterations (w 0.5, c1 = c2 = 0.3, no random factors), one batch of 1000 class images,
PSNR ≥ 20 dB. ``quick`` and ``standard`` cut snapshots, steps, particles and the colour batch.

What ueguard does differently, each deliberate: the colour shift is clipped to its L∞ box after every
PSO move (the authors' is unbounded); the SSIM (≥ 0.8) and LPIPS (≤ 0.03) hinges are left out — LPIPS
needs pretrained AlexNet weights, and a constant offset leaves SSIM's structure and contrast terms
unchanged, moving only its luminance term (by < 1 % for 25/255 on mid-grey); the global best is a copy
(in the released code it aliases a particle's live position, so the returned shift is that particle's
last move, not the best one found); the colour batch is a random draw of the class (theirs: the first
1000 images in file order); the surrogate is trained here (theirs: checkpoints of a separate run, whose
epoch count the release does not give).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ueguard.data.working_set import WorkingSet
from ueguard.engine.loops import batch_ranges, input_gradient
from ueguard.kernels import project_step
from ueguard.methods.base import (GREY_LEVEL, METHODS, MethodConfig, Perturbation, ProtectionMethod, clean_batch,
                                  gray_project, option)

#: Which branches run: the authors' ``--ours``, ``--adv`` and ``--colorshift``.
BRANCHES = ("both", "spatial", "colour")


def shift(offset: int, num_classes: int) -> int:
    """The label shift actually used: ``offset`` taken into 1 … C−1 as ((offset − 1) mod (C − 1)) + 1 — the
    offset itself whenever it is below C (the authors' 3 on CIFAR-10), and never 0 (mod C), so no sample
    is ever bound to its own class, whatever the number of classes (3 on a 3-class set would be)."""
    return (offset - 1) % (num_classes - 1) + 1


def particle_swarm(objective: Callable[[torch.Tensor], float], radius: float, generator: torch.Generator, *,
                   particles: int, iterations: int, inertia: float, cognitive: float, social: float,
                   dim: int = 3) -> tuple[torch.Tensor, float]:
    """Minimise ``objective`` over the box [−radius, radius]^dim by particle-swarm optimisation with the
    authors' deterministic coefficients: positions start uniform in the box, velocities in a tenth of
    it; each iteration scores every particle, updates the personal and global bests (copies), then
    v ← inertia·v + cognitive·(own best − p) + social·(global best − p) and p ← clip(p + v) to the box.
    Returns the best position scored and its value."""
    position = (torch.rand(particles, dim, generator=generator) * 2 - 1) * radius
    velocity = (torch.rand(particles, dim, generator=generator) * 2 - 1) * (radius / 10)
    own_best, own_value = position.clone(), torch.full((particles,), math.inf, dtype=torch.float64)
    best, best_value = position[0].clone(), math.inf
    for _ in range(iterations):
        values = torch.tensor([float(objective(p)) for p in position], dtype=torch.float64)
        better = values < own_value
        own_best[better], own_value[better] = position[better], values[better]
        j = int(values.argmin())
        if values[j] < best_value:
            best, best_value = position[j].clone(), float(values[j])
        velocity = inertia * velocity + cognitive * (own_best - position) + social * (best - position)
        position = (position + velocity).clamp(-radius, radius)
    return best, best_value


@dataclass(frozen=True)
class DUNEConfig(MethodConfig):
    # the spatial branch's L∞ radius (`--eps`); the declared budget is eps + colour_eps (see colour_inside)
    eps: float = option(8 / 255, GREY_LEVEL, 1, why="below 1/255 8-bit output rounds the change away")
    branches: str = option("both", choices=BRANCHES)  # both (DUNE), spatial only, colour only
    # shifted label t = (y + offset) mod C (the authors' 3); taken into 1 … C−1 for fewer classes
    target_offset: int = option(3, 1, 10**6)
    # L∞ radius of the per-class RGB shift, in [0, 1] units; added to --eps unless colour_inside
    colour_eps: float = option(8 / 255, GREY_LEVEL, 1, why="below 1/255 8-bit output rounds the shift away")
    colour_inside: bool = False                    # the colour shift takes colour_eps out of --eps instead of adding it
    ensemble: int = option(5, 1, 100)              # surrogate snapshots taken evenly over clean training
    train_epochs: int = option(40, 0, 10_000)      # clean-training epochs; 0: the given surrogate is the only member
    steps: int = option(30, 1, 100_000)            # spatial PGD steps
    step_fraction: float = option(1 / 16, 0, 10, above=True)  # PGD step as a fraction of eps (0.5/255 at 8/255)
    particles: int = option(10, 1, 10_000)         # PSO particles per class
    pso_iterations: int = option(10, 1, 10_000)    # PSO iterations per class
    inertia: float = option(0.5, 0, 1)             # PSO velocity carried over
    cognitive: float = option(0.3, 0, 10)          # PSO pull towards the particle's own best
    social: float = option(0.3, 0, 10)             # PSO pull towards the swarm's best
    colour_batch: int = option(1000, 1, 10**7)     # class images each PSO evaluation scores
    min_psnr: float = option(20.0, 0, 100)         # dB; the colour objective's hinge max(0, min_psnr − PSNR)
    batch_size: int = option(128, 1, 65536)        # clean training and PGD batch
    lr: float = option(0.1, 0, 10)
    momentum: float = option(0.9, 0, 1)
    weight_decay: float = option(5e-4, 0, 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.colour_inside and self.branches == "both" and not self.colour_eps < self.eps:
            raise ValueError(f"colour_eps must be below eps when the colour shift lives inside it (colour_inside): "
                             f"got colour_eps={self.colour_eps}, eps={self.eps}")

    @property
    def spatial_eps(self) -> float:
        """The spatial branch's L∞ radius (0 when it does not run)."""
        if self.branches == "colour":
            return 0.0
        return self.eps - self.colour_eps if self.colour_inside and self.branches == "both" else self.eps

    @property
    def colour_radius(self) -> float:
        """The colour branch's L∞ radius (0 when it does not run)."""
        if self.branches == "spatial":
            return 0.0
        return min(self.colour_eps, self.eps) if self.colour_inside else self.colour_eps

    @property
    def total_eps(self) -> float:
        """The declared L∞ budget of the released change: the two radii added."""
        return self.spatial_eps + self.colour_radius


@METHODS.register("dune")
class DUNE(ProtectionMethod):
    description = ("dual-branch unlearnable examples (Wang et al. ICML 2026): sample-wise spatial PGD + class-wise "
                   "RGB shift, both bound to class y+3 on a snapshot ensemble")
    config_class = DUNEConfig
    budget_text = "L∞ --eps + -o colour_eps (the colour branch's; -o colour_inside=true: within --eps)"
    #: The snapshot ensemble of the last :meth:`generate` (frozen, eval mode), for inspection.
    members: tuple[nn.Module, ...] = ()
    presets = {
        "quick": dict(ensemble=2, train_epochs=6, steps=10, step_fraction=0.2, particles=6, pso_iterations=5,
                      colour_batch=128),
        "standard": dict(ensemble=3, train_epochs=20, steps=20, step_fraction=0.1, particles=8, pso_iterations=8,
                         colour_batch=500),
        "thorough": dict(ensemble=5, train_epochs=40, steps=30, step_fraction=1 / 16, particles=10, pso_iterations=10,
                         colour_batch=1000),
    }

    def generate(self, data: WorkingSet) -> Perturbation:
        cfg, rt = self.config, self.runtime
        started = time.perf_counter()
        if data.num_classes < 2:
            raise ValueError("dune binds every image to another class: it needs at least 2 classes")
        data = data.to(rt.device)
        members, epochs, accuracy = self._ensemble(data)
        self.members = tuple(members)
        trained = time.perf_counter()
        shifts, colour_loss = self._colour_shifts(members, data)
        coloured = time.perf_counter()
        delta = self.new_delta((len(data), *data.images.shape[1:]))
        hits = 0
        with self.progress.bar(len(data), "dune spatial", unit="img") as bar:
            for span in batch_ranges(len(data), cfg.batch_size):
                idx = torch.arange(span.start, span.stop)
                delta[span], hit = self._spatial(members, data, idx, shifts)
                hits += hit
                bar.update(span.stop - span.start)
        info = {"branches": cfg.branches, "label_shift": shift(cfg.target_offset, data.num_classes),
                "ensemble_epochs": epochs, "ensemble_clean_accuracy": accuracy,
                "colour_shift_255": [[round(v * 255, 3) for v in row] for row in shifts.tolist()],
                "colour_objective": colour_loss, "target_success": round(hits / max(1, len(data)), 4),
                "seconds": round(time.perf_counter() - started, 2),
                "seconds_by_phase": {"ensemble": round(trained - started, 2), "colour": round(coloured - trained, 2),
                                     "spatial": round(time.perf_counter() - coloured, 2)}}
        parts = {"spatial": cfg.spatial_eps, "colour": cfg.colour_radius}
        return Perturbation(delta, False, cfg.total_eps, info, parts=parts)

    def targets(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The shift-induced label of each sample: (y + s) mod C with s = shift(target_offset, C)."""
        return (labels + shift(self.config.target_offset, num_classes)) % num_classes

    # ----------------------------------------------------------------------------------------------
    # the ensemble

    def _ensemble(self, data: WorkingSet) -> tuple[list[nn.Module], list[int], list[float]]:
        """Train the surrogate on the clean images and keep ``ensemble`` snapshots (eval mode, frozen),
        taken after epochs ⌈E·k/K⌉; returns them, their epochs and their clean accuracies."""
        cfg, rt = self.config, self.runtime
        model = rt.prepare_model(self.surrogate)
        keep = sorted({math.ceil(cfg.train_epochs * k / cfg.ensemble) for k in range(1, cfg.ensemble + 1)} - {0})
        members, epochs = ([], []) if keep else ([self._frozen(model)], [0])
        for epoch, bar in self.train_clean(model, data, cfg.train_epochs if keep else 0, "dune surrogate training"):
            if epoch in keep:
                members.append(self._frozen(model))
                epochs.append(epoch)
            bar.update(1)
        return members, epochs, [round(self.clean_accuracy(m, data), 4) for m in members]

    @staticmethod
    def _frozen(model: nn.Module) -> nn.Module:
        member = copy.deepcopy(model).eval()
        member.requires_grad_(False)
        return member

    # ----------------------------------------------------------------------------------------------
    # the colour branch

    def _colour_shifts(self, members: list[nn.Module], data: WorkingSet) -> tuple[torch.Tensor, list[float]]:
        """One RGB shift per class (``C×3``, zeros where the branch is off or a class has no image) and
        each class's best PSO objective."""
        cfg = self.config
        shifts = torch.zeros(data.num_classes, 3)
        objective = [0.0] * data.num_classes
        if cfg.colour_radius == 0:
            return shifts, objective
        labels = data.labels.cpu()
        with self.progress.bar(data.num_classes, "dune colour", unit="class") as bar:
            for k in range(data.num_classes):
                rows = (labels == k).nonzero().flatten()
                if len(rows):
                    pick = rows[torch.randperm(len(rows), generator=self.generator)[:cfg.colour_batch]].sort().values
                    shifts[k], objective[k] = self._swarm(members, data, pick, k)
                bar.update(1)
        return shifts, [round(v, 4) for v in objective]

    def _swarm(self, members: list[nn.Module], data: WorkingSet, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
        """Class k's shift: :func:`particle_swarm` over the colour objective of its images ``idx``."""
        cfg, rt = self.config, self.runtime
        x, _, gray = clean_batch(data, idx, rt)
        target = self.targets(torch.full((len(idx),), k, device=rt.device), data.num_classes)
        return particle_swarm(lambda c: self._colour_objective(members, x, gray, target, c), cfg.colour_radius,
                              self.generator, particles=cfg.particles, iterations=cfg.pso_iterations,
                              inertia=cfg.inertia, cognitive=cfg.cognitive, social=cfg.social)

    @torch.no_grad()
    def _colour_objective(self, members: list[nn.Module], x: torch.Tensor, gray: torch.Tensor, target: torch.Tensor,
                          shift: torch.Tensor) -> float:
        """mean_m CE(f_m(clip(x + c)), t) + mean max(0, min_psnr − PSNR) for one shift c (gray images get
        its channel mean, as they are released)."""
        cfg, rt = self.config, self.runtime
        c = gray_project(shift.to(x.device).view(1, 3, 1, 1).expand(len(x), 3, 1, 1), gray)
        shifted = (x + c).clamp(0, 1)
        ce = 0.0
        for member in members:
            for s in batch_ranges(len(x), 4 * cfg.batch_size):
                with rt.autocast():
                    ce += F.cross_entropy(member(shifted[s]).float(), target[s], reduction="sum").item()
        mse = (shifted - x).square().flatten(1).mean(1).clamp_min(1e-20)
        psnr = 10 * torch.log10(1 / mse)
        return ce / (len(members) * len(x)) + (cfg.min_psnr - psnr).clamp_min(0).mean().item()

    # ----------------------------------------------------------------------------------------------
    # the spatial branch

    def _spatial(self, members: list[nn.Module], data: WorkingSet, idx: torch.Tensor,
                 shifts: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Targeted ensemble PGD on one batch, plus each sample's class shift; returns the released δ and
        how many samples the ensemble (mean logits) classifies as their shifted label after both branches."""
        cfg, rt = self.config, self.runtime
        x, y, gray = clean_batch(data, idx, rt)
        target = self.targets(y, data.num_classes)
        delta = torch.zeros_like(x)
        if cfg.spatial_eps > 0:
            alpha = cfg.step_fraction * cfg.eps
            for _ in range(cfg.steps):
                grad = sum(input_gradient(m, x + delta, target, rt)[0] for m in members)
                delta = gray_project(project_step(delta, grad, x, alpha, cfg.spatial_eps, 1.0), gray)
        delta = gray_project(delta + shifts.to(x.device)[y].view(-1, 3, 1, 1), gray)
        with torch.no_grad(), rt.autocast():
            released = (x + delta).clamp(0, 1)
            logits = sum(m(released).float() for m in members)
        return delta, int((logits.argmax(1) == target).sum())
