"""BAIT — Binding Artificial perturbations to Incorrect Targets (Li et al., *When Priors Backfire: On the
Vulnerability of Unlearnable Examples to Pretraining*, ICLR 2026, arXiv 2603.04731; code zhli-cs/BAIT).

Threat model: the adversary does not train from scratch but fine-tunes a *pretrained* backbone on the
released images. The prior supplies semantic features, so error-minimising noise (EMN, REM) no longer
offers the easiest route to low loss and test accuracy recovers. BAIT makes the perturbation carry a
label of its own, strongly enough to override the prior: a bi-level problem whose inner level simulates
normal training on x + δ_y with the true labels, and whose outer level binds each class's δ to an
*incorrect* target class t ≠ y.

One iteration, as the authors' released code runs it (``second_order=False``, the default):

1. Look-ahead: θ′ = θ − η (∇θ CE(f_θ(x_b + δ̄_{y_b}), y_b) + wd·θ + μ·m), one differentiable SGD step on
   one minibatch b with the current class noise δ̄ detached (m: the surrogate's momentum buffer).
2. Outer pass: for every minibatch of the set, one Adam step on the perturbation parameters minimising
   CE(f_θ′(clip(x + δ_t, 0, 1)), t), where t is the designated wrong target of each sample.
3. One real SGD step on θ on batch b with x_b + δ̄_{y_b}.

Targets follow a schedule over the iterations (:func:`target_stage`): the first third the *hardest*
wrong class (argmax of f_θ′(x) with the true class masked), the second third a uniformly *random* wrong
class, the last third the *least likely* class (argmin of f_θ′(x)). The surrogate runs in train mode
throughout (BatchNorm on batch statistics), as in the authors' code; clean images are augmented with
crop + flip before δ is added. ``squeeze`` (ueguard's, off by default) passes every x + δ the surrogate
sees — look-ahead, outer loss, real step — through a per-image draw of the squeezing defenses'
differentiable stand-ins (:mod:`ueguard.engine.eot`), so the binding must survive grayscale, JPEG or
bit-depth reduction. ``patch`` / ``achromatic`` keep δ_k constant over pixel blocks and/or equal in R,
G, B: the rows are projected (:func:`~ueguard.methods.base.subspace_project`) wherever they are used and
at release.

Two parameterisations of the class-wise δ (``parameterisation``):

* ``generator`` — the authors': a conv encoder / residual / transposed-conv decoder G_φ with tanh output
  maps images to [−1, 1]; within a minibatch the noise of class k is ε · the mean of G_φ(x) over the
  batch's class-k images (a target class absent from the batch gets zero noise, as in the authors' code).
  The released δ_k is ε · the mean of G_φ(x) over *all* class-k images, clipped to [−ε, ε]. ueguard's
  generator keeps the authors' layout (three stride-2 stages, InstanceNorm + ReLU, residual blocks at the
  bottleneck, tanh) but is much narrower by default: ``gen_width=16, gen_blocks=2`` is 0.78 M parameters
  against the authors' 41 M (the authors' widths are ``gen_width=64, gen_blocks=8`` in this layout,
  which has three convs fewer in its encoder and decoder).
* ``direct`` — what is released is one 3×H×W tensor per class, so optimise exactly that: δ_k as a tensor,
  same objective, same look-ahead and schedule, Adam with lr ``direct_lr_fraction · ε``, projected onto
  [−ε, ε] after every step. The default, chosen by measurement (``bench/bait.py``): about half the
  generator's cost per outer step for the same victim accuracy within a few points. ``direct_lr_fraction=0.1``
  is provisional (one value measured). Measurements: docs/methods.md (section ``bait``) and
  docs/results/2026-11-24-bait-generator.md.

``second_order=True`` (ueguard's option, not in the released code): the look-ahead uses the live δ and
is built with ``create_graph=True`` for every outer step, so the outer gradient also flows through
θ′(δ) — the true bi-level gradient, at about twice the cost per outer step.

Differences from the released code, each deliberate: the running class noise δ̄ used by steps 1 and 3 is
the batch class mean from the forward pass of the outer step (the authors run the generator once more
after the Adam step); the released δ averages over all class images rather than keeping the last batch's
mean; ``outer_batches`` can cap the outer pass for large sets (default: a full pass, as the authors).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ueguard.data.working_set import WorkingSet
from ueguard.engine.augment import crop_flip
from ueguard.engine.eot import SQUEEZE_MODES
from ueguard.engine.loops import BatchSampler, OptimConfig, Trainer, batch_ranges
from ueguard.methods.base import (METHODS, MethodConfig, Perturbation, ProtectionMethod, achromatic_option,
                                  fit_per_class_option, gray_project, option, patch_option, subspace_project)

PARAMETERISATIONS = ("direct", "generator")
#: Target stages in schedule order: hardest wrong class → random wrong class → least likely class.
TARGET_STAGES = ("hardest", "random", "least")


@dataclass(frozen=True)
class BAITConfig(MethodConfig):
    parameterisation: str = option("direct", choices=PARAMETERISATIONS)
    iterations: int = option(90, 1, 100_000)      # outer iterations (the authors': 90, i.e. 30 per target stage)
    batch_size: int = option(512, 1, 65536)       # minibatch for the look-ahead, the outer pass and the real step
    outer_batches: int | None = option(None, 1, 10**9)  # minibatches per outer pass; None = a full pass over the set
    lr: float = option(0.1, 0, 10)                # surrogate SGD (real and look-ahead step), the authors' settings
    momentum: float = option(0.9, 0, 1)
    weight_decay: float = option(5e-4, 0, 1)
    grad_clip: float = option(5.0, 0, 1e6, above=True)
    generator_lr: float = option(1e-3, 0, 10)     # Adam on φ (the authors')
    direct_lr_fraction: float = option(0.1, 0, 10)  # Adam on δ_k: lr = fraction · ε (provisional; see bench/bait.py)
    # generator base width (the authors' layout at 64 ≈ their 41 M); its parameters grow with the square
    gen_width: int = option(16, 1, 512)
    gen_blocks: int = option(2, 0, 64)            # residual blocks at the generator's bottleneck (the authors': 8)
    augment: bool = True             # crop + flip of the clean images during generation (the authors')
    # gray / jpeg / bdr, "+"-joined: the look-ahead, the outer loss and the surrogate's step see x + δ through a
    # per-image draw of the squeezing defenses' differentiable stand-ins (ueguard.engine.eot); ueguard's option
    squeeze: str = option("none", choices=SQUEEZE_MODES)
    second_order: bool = False       # differentiate through the look-ahead step (ueguard's option)
    release_batch: int = option(256, 1, 65536)    # images per forward pass when averaging G(x) for the release
    fit_per_class: int = fit_per_class_option()  # optimise on this many images per class, apply to all (0: all)
    patch: int = patch_option()                  # δ_k constant over patch × patch blocks (1: per pixel)
    achromatic: bool = achromatic_option()       # δ_k equal in R, G, B (kept whole by grayscale)


def target_stage(iteration: int, iterations: int) -> str:
    """The target rule at ``iteration`` of ``iterations``: equal thirds of hardest → random → least
    (the authors' 0–29 / 30–59 / 60–89 for 90 iterations)."""
    if not 0 <= iteration < iterations:
        raise ValueError(f"iteration {iteration} outside 0..{iterations - 1}")
    return TARGET_STAGES[min(2, 3 * iteration // iterations)]


def choose_targets(stage: str, logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A wrong target class per sample. ``hardest``: argmax of the logits with the true class masked;
    ``random``: uniform over the K − 1 wrong classes; ``least``: argmin of the logits (which for a model
    that has any preference is a wrong class; it is forced off the true class otherwise)."""
    k = logits.shape[1]
    if k < 2:
        raise ValueError("BAIT needs at least two classes")
    if stage == "hardest":
        return logits.detach().scatter(1, labels[:, None], float("-inf")).argmax(1)
    if stage == "random":
        shift = torch.randint(1, k, labels.shape, generator=generator).to(labels.device)
        return (labels + shift) % k
    if stage == "least":
        return logits.detach().scatter(1, labels[:, None], float("inf")).argmin(1)
    raise ValueError(f"unknown target stage {stage!r}; stages are {', '.join(TARGET_STAGES)}")


def class_means(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class mean of ``values`` (N×…) by ``labels``; classes with no sample get zeros. Differentiable."""
    sums = values.new_zeros(num_classes, *values.shape[1:]).index_add(0, labels, values)
    counts = torch.bincount(labels, minlength=num_classes).clamp_(min=1).to(values.dtype)
    return sums / counts.view(-1, *([1] * (values.dim() - 1)))


class NoiseGenerator(nn.Module):
    """G_φ: images in [0, 1] → noise in [−1, 1] of the same size (the authors' layout, narrower).

    conv 3→w, then three stride-2 convs doubling the width (InstanceNorm + ReLU after each), ``blocks``
    residual blocks at 8w channels, three stride-2 transposed convs back, a 3×3 conv to 3 channels, tanh.
    Sizes not divisible by 8 are resized back to the input size at the end.
    """

    def __init__(self, width: int = 16, blocks: int = 2) -> None:
        super().__init__()

        def unit(conv: nn.Module, channels: int) -> list[nn.Module]:
            return [conv, nn.InstanceNorm2d(channels, affine=True), nn.ReLU()]

        widths = [width * 2**i for i in range(4)]
        layers = unit(nn.Conv2d(3, width, 3, padding=1), width)
        for c_in, c_out in zip(widths, widths[1:]):
            layers += unit(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), c_out)
        self.encoder = nn.Sequential(*layers)
        self.bottleneck = nn.Sequential(*(_ResidualBlock(widths[-1]) for _ in range(blocks)))
        layers = []
        for c_in, c_out in zip(widths[::-1], widths[-2::-1]):
            layers += unit(nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1), c_out)
        self.decoder = nn.Sequential(*layers, nn.Conv2d(width, 3, 3, padding=1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.bottleneck(self.encoder(x)))
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels, affine=True), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels, affine=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _DirectNoise(nn.Module):
    """δ_k as tensors: ``rows`` ignores the images and returns all K class rows."""

    def __init__(self, num_classes: int, shape: tuple[int, ...], eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.delta = nn.Parameter(torch.zeros(num_classes, *shape))

    def rows(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.delta

    def after_step(self) -> None:
        with torch.no_grad():
            self.delta.clamp_(-self.eps, self.eps)

    @torch.no_grad()
    def release(self, data: WorkingSet, to_float, batch: int) -> torch.Tensor:
        return self.delta.detach().clamp(-self.eps, self.eps).clone()


class _GeneratedNoise(nn.Module):
    """δ_k = ε · class mean of G_φ(x): per minibatch during optimisation, over all images at release."""

    def __init__(self, num_classes: int, eps: float, width: int, blocks: int) -> None:
        super().__init__()
        self.num_classes, self.eps = num_classes, eps
        self.net = NoiseGenerator(width, blocks)

    def rows(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.eps * class_means(self.net(x), y, self.num_classes)

    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def release(self, data: WorkingSet, to_float, batch: int) -> torch.Tensor:
        # on the labels' device: the images of a spilled set stay on the host
        sums = torch.zeros(self.num_classes, *data.images.shape[1:], device=data.labels.device)
        for span in batch_ranges(len(data), batch):
            y = data.labels[span]
            sums.index_add_(0, y, self.net(to_float(data.images[span])).float())
        counts = torch.bincount(data.labels, minlength=self.num_classes).clamp_(min=1).float()
        return (self.eps * sums / counts.view(-1, 1, 1, 1)).clamp_(-self.eps, self.eps)


@METHODS.register("bait")
class BAIT(ProtectionMethod):
    description = ("binding perturbations to incorrect targets (Li et al. ICLR 2026): class-wise δ that "
                   "survives fine-tuning a pretrained backbone; direct or generator parameterisation")
    config_class = BAITConfig
    needs_pretrained = True
    presets = {
        "quick": dict(iterations=15, batch_size=128, outer_batches=4),
        "standard": dict(iterations=45, batch_size=256),
        "thorough": dict(iterations=90, batch_size=512),
    }

    def generate(self, data: WorkingSet) -> Perturbation:
        cfg, rt = self.config, self.runtime
        started = time.perf_counter()
        data = data.to(rt.device)
        k = data.num_classes
        model = rt.prepare_model(self.surrogate)
        model.train()
        trainer = Trainer(model, rt, OptimConfig(cfg.lr, cfg.momentum, cfg.weight_decay, grad_clip=cfg.grad_clip))
        noise = self._noise(k, tuple(data.images.shape[1:])).to(rt.device)
        optimizer = torch.optim.Adam(noise.parameters(), lr=self._noise_lr())
        running = torch.zeros(k, *data.images.shape[1:], device=rt.device)  # δ̄, the current class noise
        inner = BatchSampler(len(data), cfg.batch_size, self.generator)
        outer = BatchSampler(len(data), cfg.batch_size, self.generator)
        history, step_seconds = [], []
        with self.progress.bar(cfg.iterations, "bait", unit="iteration") as bar:
            for it in range(cfg.iterations):
                stage = target_stage(it, cfg.iterations)
                xb, yb, gb = self._batch(data, inner.next())
                lookahead = None if cfg.second_order else self._lookahead(model, trainer, self.through_squeeze(xb + gray_project(running[yb], gb)), yb, create_graph=False)
                losses, hits, seen = [], 0, 0
                for j, idx in enumerate(outer.epoch()):
                    if cfg.outer_batches is not None and j >= cfg.outer_batches:
                        break
                    tick = time.perf_counter()
                    x, y, gray = self._batch(data, idx)
                    rows = subspace_project(noise.rows(x, y), cfg.patch, cfg.achromatic)
                    if cfg.second_order:
                        live = rows if cfg.parameterisation == "direct" else subspace_project(noise.rows(xb, yb), cfg.patch, cfg.achromatic)
                        params = self._lookahead(model, trainer, self.through_squeeze(xb + gray_project(live[yb], gb)), yb, create_graph=True)
                    else:
                        params = lookahead
                    with torch.no_grad():
                        targets = choose_targets(stage, self._call(model, params, x), y, self.generator)
                    logits = self._call(model, params, self.through_squeeze((x + gray_project(rows[targets], gray)).clamp(0, 1)))
                    loss = F.cross_entropy(logits.float(), targets)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    noise.after_step()
                    present = torch.bincount(y, minlength=k) > 0
                    running[present] = rows.detach()[present].clamp(-cfg.eps, cfg.eps)
                    losses.append(loss.detach())
                    hits += (logits.argmax(1) == targets).sum().item()
                    seen += y.numel()
                    step_seconds.append(time.perf_counter() - tick)  # .item() above has synchronised
                trainer.step(self.through_squeeze(xb + gray_project(running[yb], gb)), yb)
                record = {"stage": stage, "outer_loss": round(torch.stack(losses).mean().item(), 4),
                          "target_accuracy": round(hits / max(seen, 1), 4)}
                history.append(record)
                bar.update(1, stage=stage, loss=f"{record['outer_loss']:.3f}")
        delta = subspace_project(noise.release(data, rt.to_float, cfg.release_batch), cfg.patch, cfg.achromatic)
        info = {"parameterisation": cfg.parameterisation, "iterations": cfg.iterations, "history": history,
                "outer_steps": len(step_seconds),
                "seconds_per_outer_step": round(statistics.median(step_seconds), 5) if step_seconds else None,
                "noise_parameters": sum(p.numel() for p in noise.parameters()),
                "seconds": round(time.perf_counter() - started, 2)}
        return Perturbation(delta, True, cfg.eps, info)

    # ----------------------------------------------------------------------------------------------

    def _noise(self, k: int, shape: tuple[int, ...]) -> nn.Module:
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the generator's initial weights follow the method's seed
            if cfg.parameterisation == "direct":
                return _DirectNoise(k, shape, cfg.eps)
            return _GeneratedNoise(k, cfg.eps, cfg.gen_width, cfg.gen_blocks)

    def _noise_lr(self) -> float:
        cfg = self.config
        return cfg.direct_lr_fraction * cfg.eps if cfg.parameterisation == "direct" else cfg.generator_lr

    def _batch(self, data: WorkingSet, idx: torch.Tensor):
        dev_idx = idx.to(self.runtime.device)
        x = self.runtime.to_float(data.images_at(idx))
        if self.config.augment:
            x = crop_flip(x, self.generator)
        return x, data.labels[dev_idx], data.grayscale[dev_idx]

    def _lookahead(self, model: nn.Module, trainer: Trainer, x: torch.Tensor, y: torch.Tensor,
                   create_graph: bool) -> dict[str, torch.Tensor]:
        """θ′ = θ − lr·(∇θ CE + wd·θ + μ·m): one SGD step of the surrogate on (x, y), as a new parameter
        dict (θ itself is untouched). With ``create_graph`` θ′ stays a function of x (and so of δ). Only
        the trained parameters step: a frozen one (fastvgg_cifar's fixed BatchNorm scales) keeps its value."""
        cfg = self.config
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        loss = F.cross_entropy(self._call(model, params, x.clamp(0, 1)).float(), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        state = trainer.optimizer.state
        out = {}
        for (name, p), g in zip(params.items(), grads):
            p0 = p.detach()
            step = g + cfg.weight_decay * p0
            buf = state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                step = step + cfg.momentum * buf
            out[name] = p0 - cfg.lr * step
        return out

    def _call(self, model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """f(x) with ``params`` substituted; BatchNorm uses batch statistics and updates throwaway copies of
        its running buffers, so a look-ahead never moves the real surrogate."""
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        with self.runtime.autocast():
            return functional_call(model, (params, buffers), (x,))
