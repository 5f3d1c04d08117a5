"""REM — robust error-minimising noise (Fu, He, Liu, Shen, Tao, *Robust Unlearnable Examples: Protecting
Data Against Adversarial Learning*, ICLR 2022). Code: github.com/fshp971/robust-unlearnable-examples.

Threat model: the adversary trains from scratch and may use *adversarial training* with a radius
ρa < ρu, which wipes out plain error-minimising noise (EMN). REM solves

    min_θ E_i min_{‖δu_i‖∞ ≤ ρu} E_{t∼T} max_{‖δa‖∞ ≤ ρa} CE(f_θ(t(x_i + δu_i) + δa), y_i)

with T the training augmentation (random crop with padding + flip): the noise must keep the loss low
even after augmentation and a worst-case ρa-perturbation, and the surrogate is trained adversarially
on the same objective. Each of ``train_steps`` iterations takes one minibatch and

1. updates its sample-wise δu by ``pgd_steps`` signed-gradient *descent* steps (size
   ``step_fraction``·ρu); each step's gradient is the mean over ``samples`` augmentation draws t of
   ∇_{δu} CE(f(t(x+δu) + δa*_t)), where δa*_t is the inner max found by ``adv_steps`` PGD *ascent*
   steps (size ``adv_step_fraction``·ρa, random start) for that same t;
2. takes one SGD step of the surrogate on t(x+δu) + δa* (adversarial training), with learning rate
   ``lr`` × 0.1 every ``lr_decay_every`` steps.

Authors' CIFAR-10 settings (``thorough`` budget): ρu = 8/255 with 10 steps of 1.6/255, ρa = 4/255 with
10 steps of 0.8/255, 5 augmentation samples, 5,000 steps, SGD 0.1 (×0.1 every 2,000), momentum 0.9,
wd 5e-4, batch 128. ``quick`` and ``standard`` cut steps, samples and inner steps for CPU-sized runs.
δu is keyed by sample index; ρa defaults to ρu/2 (``adv_eps``).

Resuming: REM has no rounds of its own; it checkpoints after every pass of its batch sampler (⌊N/batch⌋
steps, which revisit every row but the dropped tail; at least 50 steps, or ``round_steps``) as EMN does
after a round — surrogate, optimiser, learning-rate schedule, generator, sampler position, losses, δ —
so ``protect --resume`` continues with the next pass and releases the δ of an uninterrupted run (see
:mod:`ueguard.methods.emn`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ueguard.data.working_set import WorkingSet
from ueguard.engine.augment import crop_flip
from ueguard.engine.loops import BatchSampler, OptimConfig, Trainer, input_gradient
from ueguard.kernels import project_step
from ueguard.methods.base import (METHODS, MethodConfig, Perturbation, ProtectionMethod, clean_batch, gray_project,
                                  option)


@dataclass(frozen=True)
class REMConfig(MethodConfig):
    adv_eps: float | None = option(None, 0, 1)       # ρa, the adversarial-training radius; default eps/2 (4/255 at 8/255)
    pgd_steps: int = option(10, 1, 10_000)           # δu descent steps per minibatch
    step_fraction: float = option(0.2, 0, 10, above=True)  # δu step as a fraction of eps (1.6/255 at 8/255)
    adv_steps: int = option(10, 0, 10_000)           # inner-max ascent steps
    adv_step_fraction: float = option(0.2, 0, 10, above=True)  # δa step as a fraction of adv_eps (0.8/255 at 4/255)
    samples: int = option(5, 1, 1000)                # augmentation draws per expectation
    train_steps: int = option(5000, 1, 10**7)        # outer iterations (one minibatch each)
    lr_decay_every: int | None = option(None, 1, 10**7)  # default 0.4·train_steps (2,000 of 5,000, the authors')
    batch_size: int = option(128, 1, 65536)
    lr: float = option(0.1, 0, 10)
    momentum: float = option(0.9, 0, 1)
    weight_decay: float = option(5e-4, 0, 1)
    grad_clip: float | None = option(None, 0, 1e6, above=True)
    round_steps: int | None = option(None, 1, 10**7)  # steps between checkpoints; default one sampler pass, at least 50

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adv_eps is not None and not self.adv_eps < self.eps:
            raise ValueError(f"adv_eps (ρa) must be in [0, eps): REM protects against adversarial training with a "
                             f"smaller radius than its own; got adv_eps={self.adv_eps}, eps={self.eps}")

    @property
    def rho_a(self) -> float:
        return self.eps / 2 if self.adv_eps is None else self.adv_eps


@METHODS.register("rem")
class REM(ProtectionMethod):
    checkpoints_rounds = True  # a round: one pass of the batch sampler (see generate)
    description = ("robust error-minimising noise (Fu et al. ICLR 2022): EMN with an inner adversarial max and "
                   "expectation over augmentations, against adversarial training; sample-wise")
    config_class = REMConfig
    presets = {
        "quick": dict(train_steps=150, pgd_steps=3, step_fraction=0.4, samples=1, adv_steps=2, adv_step_fraction=0.6),
        "standard": dict(train_steps=1000, pgd_steps=5, step_fraction=0.3, samples=2, adv_steps=5, adv_step_fraction=0.3),
        "thorough": dict(train_steps=5000, pgd_steps=10, step_fraction=0.2, samples=5, adv_steps=10, adv_step_fraction=0.2),
    }

    def generate(self, data: WorkingSet) -> Perturbation:
        cfg, rt = self.config, self.runtime
        started = time.perf_counter()
        data = data.to(rt.device)
        model = rt.prepare_model(self.surrogate)
        trainer = Trainer(model, rt, OptimConfig(cfg.lr, cfg.momentum, cfg.weight_decay, grad_clip=cfg.grad_clip))
        decay = cfg.lr_decay_every or max(1, int(0.4 * cfg.train_steps))
        scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=decay, gamma=0.1)
        delta = self.new_delta((len(data), *data.images.shape[1:]))
        sampler = BatchSampler(len(data), cfg.batch_size, self.generator)
        # a round (checkpointed) is one pass of the sampler, every row but the dropped tail revisited, and
        # at least 50 steps, so that a small set does not write a checkpoint after every step
        per_round = cfg.round_steps or max(sampler.steps_per_epoch(), 50)
        tracked = {"surrogate": model, "optimizer": trainer.optimizer, "scheduler": scheduler, "sampler": sampler,
                   "generator": self.generator}
        def one_round(index: int, bar) -> list[float]:  # the losses logged in the round
            return self._round(index * per_round, min(cfg.train_steps, (index + 1) * per_round),
                               model, trainer, scheduler, sampler, data, delta, bar)

        history = self.run_rounds(-(-cfg.train_steps // per_round), delta, tracked, one_round, unit="step",
                                  total=cfg.train_steps, done=lambda finished: min(cfg.train_steps, finished * per_round))
        losses = [loss for logged in history for loss in logged]
        info = {"train_steps": cfg.train_steps, "rho_u": cfg.eps, "rho_a": cfg.rho_a, "samples": cfg.samples,
                "surrogate_adv_loss": losses, "rounds": len(history), "seconds": round(time.perf_counter() - started, 2),
                **self.resume_record()}
        return Perturbation(delta, False, cfg.eps, info)

    def _round(self, first: int, stop: int, model, trainer: Trainer, scheduler, sampler: BatchSampler,
               data: WorkingSet, delta, bar) -> list[float]:
        """Steps ``first … stop-1``; returns the surrogate losses logged (every 50th step and the last)."""
        cfg, rt = self.config, self.runtime
        losses = []
        for step in range(first, stop):
            idx = sampler.next()
            x, y, gray = clean_batch(data, idx, rt)
            dev_idx = idx.to(rt.device)
            model.eval()
            delta[dev_idx] = self._robust_descent(model, x, y, gray, delta[dev_idx])
            model.train()
            t = self._draw_transform()
            base = t((x + delta[dev_idx]).clamp(0, 1))
            adv = base + self._inner_max(model, base, y)
            loss, _ = trainer.step(adv, y)
            scheduler.step()
            if step % 50 == 0 or step == cfg.train_steps - 1:
                losses.append(round(float(loss), 4))
                bar.update(0, loss=f"{losses[-1]:.3f}")
            bar.update(1)
        return losses

    def _draw_transform(self):
        """One fixed draw t ∼ T (crop offsets and flips), usable several times on the same batch."""
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        return lambda z: crop_flip(z, torch.Generator().manual_seed(seed))

    def _inner_max(self, model, base: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """δa* ≈ argmax_{‖δa‖∞ ≤ ρa, 0 ≤ base+δa ≤ 1} CE(f(base + δa), y): PGD ascent from a random start."""
        cfg = self.config
        rho = cfg.rho_a
        base = base.detach()
        if cfg.adv_steps == 0 or rho == 0:
            return torch.zeros_like(base)
        start = (torch.rand(base.shape, generator=self.generator).to(base.device) * 2 - 1) * rho
        delta_a = (base + start).clamp(0, 1) - base
        for _ in range(cfg.adv_steps):
            grad, _ = input_gradient(model, base + delta_a, y, self.runtime)
            delta_a = project_step(delta_a, grad, base, cfg.adv_step_fraction * rho, rho, -1.0)
        return delta_a

    def _robust_descent(self, model, x: torch.Tensor, y: torch.Tensor, gray: torch.Tensor,
                        delta: torch.Tensor) -> torch.Tensor:
        """``pgd_steps`` descent steps on δu against E_t max_δa CE(f(t(x+δu)+δa), y)."""
        cfg = self.config
        for _ in range(cfg.pgd_steps):
            grad = torch.zeros_like(delta)
            for _ in range(cfg.samples):
                t = self._draw_transform()
                delta_a = self._inner_max(model, t(x + delta), y)
                g, _ = input_gradient(model, x + delta, y, self.runtime,
                                      transform=lambda z: (t(z) + delta_a).clamp(0, 1))
                grad += g
            delta = gray_project(project_step(delta, grad, x, cfg.step_fraction * cfg.eps, cfg.eps, 1.0), gray)
        return delta

    def robust_loss(self, model, x: torch.Tensor, y: torch.Tensor, draws: int = 4) -> float:
        """E_t max_δa CE(f(t(x) + δa), y) over ``draws`` augmentation draws (the quantity REM minimises),
        as a mean per sample; for tests and diagnostics."""
        model.eval()
        total = 0.0
        for _ in range(draws):
            base = self._draw_transform()(x)
            adv = (base + self._inner_max(model, base, y)).clamp(0, 1)
            with torch.no_grad():
                total += torch.nn.functional.cross_entropy(model(adv), y).item()
        return total / draws
