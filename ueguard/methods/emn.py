"""EMN — error-minimising noise (Huang et al., *Unlearnable Examples: Making Personal Data
Unexploitable*, ICLR 2021).

Threat model: the adversary trains a classifier from scratch on the released images. EMN solves the
min-min problem  min_θ E_i min_{‖δ_i‖∞≤ε} CE(f_θ(x_i + δ_i), y_i): it alternates a few SGD steps of a
surrogate on the perturbed data with a pass of PGD steps that *descend* the loss in δ, until the
surrogate fits the perturbed data (train accuracy ≥ ``stop_accuracy``). The resulting δ is an
easy-to-learn shortcut, so a model trained on x + δ learns the noise instead of the images.

Sample-wise δ is keyed by sample index; class-wise δ (one tensor per class) by label. The authors'
settings (``thorough`` budget): ε = 8/255, 20 PGD steps of 0.8/255 per pass, 10 surrogate steps per
round, stop at 99 % (sample-wise) or 90 % (class-wise) train accuracy, SGD 0.1 / wd 5e-4 / clip 5.
Like the authors' generation loop, the surrogate sees no augmentation by default; ``augment=crop`` or
``cropflip`` trains the surrogate and optimises δ through random crops (and flips) — an expectation over
the victim's augmentation, which pixel-aligned noise otherwise has to survive by luck. ``squeeze``
(``gray``, ``jpeg``, ``bdr`` or a ``+``-joined set) does the same for the squeezing defenses, through their
differentiable stand-ins (:mod:`ueguard.engine.eot`), drawn per image before the crop. A class-wise δ
may be kept in a subspace (``patch``: constant over pixel blocks; ``achromatic``: equal in R, G, B) by
projecting each step's gradient (:func:`~ueguard.methods.base.subspace_project`).

Resuming: after every round (surrogate steps, PGD pass, stopping check) the method checkpoints its state
when it has a :attr:`~ueguard.methods.base.ProtectionMethod.round_checkpoint` (``protect`` gives it one
in ``rounds.pt`` of the private resume state): the surrogate's ``state_dict``, the SGD momentum buffers, the generator
the batches and crops are drawn from with the sampler's permutation and position, the global torch RNG,
the accuracy history, and δ (in the file for class-wise δ and the memory store; the on-disk store
commits its rows first, see :mod:`ueguard.data.store`). ``protect --resume`` continues with the next
round — ``info["resumed_after_round"]`` says after which — and on the same device the final δ and files
are bit-identical to an uninterrupted run's. Under torchrun as well: every rank takes part, and each
rank's own augmentation generator and RNG are saved beside the shared state (see
:mod:`ueguard.engine.distributed`); the resumed files equal the uninterrupted torchrun run's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ueguard.data.working_set import WorkingSet
from ueguard.engine import distributed
from ueguard.engine.augment import crop_flip
from ueguard.engine.eot import SQUEEZE_MODES, squeeze_kinds
from ueguard.engine.loops import BatchSampler, OptimConfig, Trainer, batch_ranges, input_gradient, pgd_step, predict
from ueguard.methods.base import (METHODS, MethodConfig, Perturbation, ProtectionMethod, achromatic_option, apply_delta,
                                  fit_per_class_option, gray_project, option, patch_option, subspace_project)

PERTURBATION_KINDS = ("samplewise", "classwise")
AUGMENT_MODES = ("none", "crop", "cropflip")


@dataclass(frozen=True)
class EMNConfig(MethodConfig):
    perturbation: str = option("samplewise", choices=PERTURBATION_KINDS)
    pgd_steps: int = option(20, 1, 10_000)          # PGD steps per batch in each perturbation pass
    step_fraction: float = option(0.1, 0, 10, above=True)  # PGD step size as a fraction of eps (0.8/255 at 8/255)
    train_steps: int = option(10, 0, 100_000)       # surrogate SGD steps per round
    # default: 0.99 sample-wise, 0.90 class-wise (the authors'); above 1 it is never reached: every round runs
    stop_accuracy: float | None = option(None, 0, 2, above=True)
    max_rounds: int = option(40, 1, 10_000)
    batch_size: int = option(128, 1, 65536)
    eval_limit: int = option(10_000, 1, 10**9)      # samples used for the stopping check (a fixed random subset beyond this)
    lr: float = option(0.1, 0, 10)
    momentum: float = option(0.9, 0, 1)
    weight_decay: float = option(5e-4, 0, 1)
    grad_clip: float = option(5.0, 0, 1e6, above=True)
    augment: str = option("none", choices=AUGMENT_MODES)  # crop / cropflip: the surrogate trains, and δ is optimised,
                                 # through the victim's standard augmentation (expectation over transformations)
    # gray / jpeg / bdr, "+"-joined: the surrogate trains, and δ is optimised, through a per-image draw of the
    # squeezing defenses' differentiable stand-ins (or none), applied before the crop (ueguard.engine.eot)
    squeeze: str = option("none", choices=SQUEEZE_MODES)
    fit_per_class: int = fit_per_class_option()  # optimise on this many images per class, apply to all (0: all)
    patch: int = patch_option()                  # class-wise δ constant over patch × patch blocks (1: per pixel)
    achromatic: bool = achromatic_option()       # class-wise δ equal in R, G, B (kept whole by grayscale)

    @property
    def target_accuracy(self) -> float:
        if self.stop_accuracy is not None:
            return self.stop_accuracy
        return 0.99 if self.perturbation == "samplewise" else 0.90


@METHODS.register("emn")
class EMN(ProtectionMethod):
    description = "error-minimising noise (Huang et al. ICLR 2021): min-min shortcut against from-scratch training; sample- or class-wise"
    config_class = EMNConfig
    presets = {
        "quick": dict(pgd_steps=5, step_fraction=0.25, max_rounds=8),
        "standard": dict(pgd_steps=10, step_fraction=0.2, max_rounds=15),
        "thorough": dict(pgd_steps=20, step_fraction=0.1, max_rounds=40),
    }
    supports_distributed = True  # splits its steps over torchrun's processes (ueguard.engine.distributed)
    checkpoints_rounds = True
    _dist = distributed.SINGLE   # this run's rank layout, set by generate()

    def generate(self, data: WorkingSet) -> Perturbation:
        """Under torchrun every rank calls this with the same data; see :mod:`ueguard.engine.distributed`
        for how the steps split (outer steps: DDP over parts of each global batch; sample-wise PGD: each
        rank its block of ids; class-wise PGD: all-reduced class gradients)."""
        cfg, rt = self.config, self.runtime
        started = time.perf_counter()
        data = data.to(rt.device)
        n = len(data)
        classwise = cfg.perturbation == "classwise"
        self._dist = layout = distributed.current()
        if n < layout.world_size:
            raise ValueError(f"{n} image(s) cannot be split over {layout.world_size} processes")
        self._aug_generator = layout.generator_for_rank(self.generator, cfg.seed)
        model = rt.prepare_model(self.surrogate)
        parallel = layout.data_parallel(model, rt.device)
        model = parallel.model
        trainer = Trainer(parallel.module, rt, OptimConfig(cfg.lr, cfg.momentum, cfg.weight_decay, grad_clip=cfg.grad_clip))
        rows = data.num_classes if classwise else n
        delta = (torch.zeros(rows, *data.images.shape[1:], device=rt.device) if classwise
                 else self.new_delta((rows, *data.images.shape[1:])))
        perturbation = Perturbation(delta, classwise, cfg.eps)
        sampler = BatchSampler(n, cfg.batch_size, self.generator)
        check = self.eval_subset(n, cfg.eval_limit)
        augment = self._augmentation()
        shard = layout.shard(n)
        tracked = {"surrogate": parallel.model, "optimizer": trainer.optimizer, "sampler": sampler,
                   "generator": self.generator, **({} if self._aug_generator is self.generator
                                                   else {"augment_generator": self._aug_generator})}

        def one_round(index: int, bar) -> float:  # surrogate steps on x + δ, a PGD pass over δ, the check
            model.train()
            for _ in range(cfg.train_steps):
                idx = parallel.part(sampler.next())
                x = self._perturbed(data, perturbation, idx)
                trainer.step(x if augment is None else augment(x), data.labels[idx.to(rt.device)])
            parallel.sync_buffers()
            model.eval()
            if classwise:
                for span in batch_ranges(n, cfg.batch_size):
                    self._classwise_step(model, data, delta, layout.part(torch.arange(span.start, span.stop)))
            else:
                for span in batch_ranges(shard.stop - shard.start, cfg.batch_size):
                    span = slice(shard.start + span.start, shard.start + span.stop)
                    delta[span] = self._samplewise_pgd(model, data, delta[span], torch.arange(span.start, span.stop))
                layout.all_gather_shards(delta)
            accuracy = self._accuracy(model, data, perturbation, check)
            bar.update(1, train_acc=f"{accuracy:.3f}")
            return accuracy

        history = self.run_rounds(cfg.max_rounds, delta, tracked, one_round,
                                  converged=lambda accuracy: accuracy >= cfg.target_accuracy)
        perturbation.info = {"rounds": len(history), "surrogate_train_accuracy": history,
                             "converged": history[-1] >= cfg.target_accuracy,
                             "seconds": round(time.perf_counter() - started, 2),
                             **self.resume_record()}
        return perturbation

    def _augmentation(self):
        """A fresh squeeze draw, then a fresh random crop (+ flip), per call — what a victim that squeezes
        its training set and then augments sees — or None when neither is on."""
        kinds, crop = squeeze_kinds(self.config.squeeze), self.config.augment
        if not kinds and crop == "none":
            return None
        generator = getattr(self, "_aug_generator", self.generator)  # per rank under torchrun

        def transform(x: torch.Tensor) -> torch.Tensor:
            x = self.through_squeeze(x, generator)
            return x if crop == "none" else crop_flip(x, generator, flip=crop == "cropflip")
        return transform

    def _perturbed(self, data: WorkingSet, perturbation: Perturbation, idx: torch.Tensor) -> torch.Tensor:
        dev_idx = idx.to(self.runtime.device)
        x = self.runtime.to_float(data.images_at(idx))
        return apply_delta(x, perturbation.for_samples(dev_idx, data.labels, data.grayscale))

    def _batch(self, data: WorkingSet, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clean float images, labels and grayscale flags of samples ``idx`` on the run's device."""
        dev_idx = idx.to(self.runtime.device)
        return self.runtime.to_float(data.images_at(idx)), data.labels[dev_idx], data.grayscale[dev_idx]

    def _samplewise_pgd(self, model, data: WorkingSet, delta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``pgd_steps`` signed-gradient steps that descend CE in δ, each projected onto the ε-ball and
        the valid image range (fused in ``project_step``), then onto the gray subspace where needed."""
        cfg, rt = self.config, self.runtime
        x, y, gray = self._batch(data, idx)
        alpha = cfg.step_fraction * cfg.eps
        for _ in range(cfg.pgd_steps):
            delta = gray_project(pgd_step(model, x, delta, y, rt, step_size=alpha, eps=cfg.eps,
                                          transform=self._augmentation()), gray)
        return delta

    def _classwise_step(self, model, data: WorkingSet, delta: torch.Tensor, idx: torch.Tensor) -> None:
        """Class-wise PGD on one batch: the gradient of δ_k is the sum of the input gradients of the
        batch's class-k samples (zero where x + δ was clipped); signed step, then the ε-ball."""
        cfg, rt = self.config, self.runtime
        x, y, gray = self._batch(data, idx)
        alpha = cfg.step_fraction * cfg.eps
        for _ in range(cfg.pgd_steps):
            raw = x + gray_project(delta[y], gray)
            grad, _ = input_gradient(model, raw.clamp(0, 1), y, rt, transform=self._augmentation())
            grad = grad * ((raw > 0) & (raw < 1))
            class_grad = torch.zeros_like(delta).index_add_(0, y, grad.contiguous())
            self._dist.all_reduce_sum(class_grad)  # this rank's part of the batch → the whole batch's sum
            class_grad = subspace_project(class_grad, cfg.patch, cfg.achromatic)  # steps stay in the subspace
            delta.sub_(alpha * class_grad.sign()).clamp_(-cfg.eps, cfg.eps)

    def _accuracy(self, model, data: WorkingSet, perturbation: Perturbation, index: torch.Tensor) -> float:
        """Accuracy on ``index``; under torchrun each rank predicts its part and the counts are summed."""
        total = index.numel()
        index = self._dist.part(index)
        spans = (index[s] for s in batch_ranges(index.numel(), 4 * self.config.batch_size))
        batches = (self._perturbed(data, perturbation, idx) for idx in spans)
        pred = predict(model, batches, self.runtime)
        correct = (pred == data.labels[index.to(self.runtime.device)]).float().sum()  # exact: counts < 2²⁴
        return (self._dist.all_reduce_sum(correct) / total).item()
