"""SSC — Shallow Semantic Camouflage: **ueguard's reconstruction** of Wang, Ni, Zhao, Qin, Ren,
*Channel-Level Semantic Perturbations: Unlearnable Examples for Diverse Training Paradigms*, arXiv
2605.05224 (2026). No public code exists; this is not the paper's exact algorithm, and every constant
below is ueguard's choice, exposed in :class:`SSCConfig`.

Threat model: the adversary starts from a pretrained backbone and may freeze its shallow layers.
Frozen shallow layers preserve semantics and filter out non-semantic noise ("semantic filtering"), so
classic error-minimising noise (EMN) is largely ignored under frozen layers. The paper's idea is to
confine the perturbation to a semantically valid subspace at the channel level, so that it passes
through frozen shallow layers.

The reconstruction:

* Surrogate: the pretrained model, split into a shallow part S = stem … ``frozen_stage`` (frozen, eval
  mode) and a deep part D + head (trained). A second, from-scratch copy g of the same architecture
  (re-initialised) stands for the from-scratch paradigm.
* Semantic channel subspace: the pretrained model is run on clean images; at each depth l in
  ``subspace_stages`` (the "hierarchy": stem, layer1, layer2 by default) the per-location channel
  vectors are collected and PCA gives U_l, the top principal directions holding ``energy`` of the
  variance (:func:`channel_pca`).
* Objective, for δ with ‖δ‖∞ ≤ ε (class-wise by default, see ``perturbation``), minimised by signed-gradient PGD:

      w · CE(D(S(x+δ)), y) + (1 − w) · CE(g(x+δ), y) + λ · mean_l ‖P⊥_l Δ_l‖² / ‖Δ_l‖²,

  with Δ_l = F_l(x+δ) − F_l(x) the feature shift the pretrained model's stage l sees, P⊥_l the projector
  onto the complement of span(U_l), w = ``frozen_weight`` and λ = ``camouflage_weight``. The camouflage
  ratio is scale-free: it steers the *direction* of the shift into the semantic subspace and leaves its
  size to the error-minimising terms.
* Two terms for the frozen paradigm, ueguard's and not the paper's — the paper calls SSC a "hierarchical
  deception strategy" but publishes no objective. Deception is **on by default** (ρ = 1, since defaults
  revision 2), the anchor off (κ = 0):

  - class anchor, ``anchor_weight`` κ: − κ · mean over locations of ⟨Δ_S, a_y⟩ / σ_y, with Δ_S the shift of
    the frozen output S(x+δ) − S(x), a_y one channel direction per class inside span(U) at that depth
    (random, orthonormal; :func:`class_anchors`) and σ_y the clean activations' spread along it — a
    channel-level, class-consistent shift of exactly what frozen layers pass on;
  - deception, ``deception_weight`` ρ: + ρ · CE(h(x+δ), (y + ``deception_shift``) mod K), with h the prior
    and a linear head fitted on the clean task images (what a frozen-layers victim starts from): the prior's
    own semantics read the protected images as the wrong class, as TAP's and BAIT's targets do.

* ``perturbation``: ``samplewise`` (one δ per image) or ``classwise`` (one δ_k per class, stepped along
  the sign of the objective's gradient summed over the class's images, as class-wise EMN does). A class-wise
  δ is one pattern repeated across a class, a label signal of its own that a pretrained model can pick up
  as readily as a fresh one — BAIT's released noise is class-wise too.
* ``augment``: ``none`` (default), ``crop`` or ``cropflip`` — both paths train on, and δ is optimised
  through, the victim's random crop (+ flip), an expectation over the augmentation every victim trains
  with (EMN's option of the same name; BAIT's released loop crops and flips during generation).
* ``squeeze``: ``none`` (default) or ``gray``, ``jpeg``, ``bdr`` ``+``-joined — the same expectation over the
  squeezing defenses' differentiable stand-ins (:mod:`ueguard.engine.eot`), one per-image draw per step
  applied to x + δ and to x (so the camouflage compares like with like), before the crop.
* ``patch`` / ``achromatic`` (class-wise): the class rows stay constant over ``patch``-pixel blocks and/or
  equal in R, G, B — each step's gradient is projected (:func:`~ueguard.methods.base.subspace_project`).
* ``shift`` (class-wise; ueguard's, 0 = off): each image carries its class row circularly shifted by its
  own offset in [0, ``shift``) pixels, fixed per image in the release and drawn afresh at every PGD step
  (:func:`~ueguard.methods.base.shift_option`) — aimed at defenses that read a class's pattern off its mean.
* ``deep_init``: the frozen path's D + head start from the prior (``pretrained``, fine-tuned at ``deep_lr``)
  or re-initialised (``fresh``, trained at ``lr``). A pretrained D fits the labels from the prior's
  semantics in the first round, so the error-minimising term through it soon stops asking anything of δ;
  a fresh D must learn from S's features of x + δ, so the min-min builds its shortcut in the feature space
  the frozen layers pass on.
* Min-min as in EMN: rounds of ``train_steps`` SGD steps on D (S frozen) and on g, on x + δ, then a PGD
  pass over the set, until both paths fit the perturbed data (train accuracy ≥ ``stop_accuracy``) or
  ``max_rounds``.

Defaults: ``perturbation`` ``classwise``, ``deep_init`` ``pretrained``, ``frozen_weight`` 0.5,
``camouflage_weight`` 1, ``augment`` ``none``, ``deception_weight`` 1 (revision 2; ``-o deception_weight=0``
is the former plain SSC), ``anchor_weight`` 0; ``energy``, ``subspace_stages``, ``frozen_stage`` and the
PGD and round settings were not searched. How each was chosen, with the measurements, and what SSC does
and does not hold against: docs/methods.md (section ``ssc``); the records are in docs/results/.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ueguard.data.working_set import WorkingSet
from ueguard.engine.augment import crop_flip, roll_rows
from ueguard.engine.eot import SQUEEZE_MODES, apply_squeeze, draw_squeeze, squeeze_kinds
from ueguard.engine.compiled import frozen_parameters, model_call
from ueguard.engine.loops import BatchSampler, OptimConfig, Trainer, batch_ranges, fit_linear_head, predict
from ueguard.kernels import project_step
from ueguard.methods.base import (METHODS, MethodConfig, Perturbation, ProtectionMethod, achromatic_option, apply_delta,
                                  fit_per_class_option, gray_project, option, patch_option, random_offsets,
                                  shift_option, subspace_project)
from ueguard.methods.emn import AUGMENT_MODES, PERTURBATION_KINDS


@dataclass(frozen=True)
class SSCConfig(MethodConfig):
    frozen_stage: str = "layer1"                 # S = stem … this stage, frozen (the frozen paradigm's split)
    subspace_stages: str = "stem,layer1,layer2"  # depths with a semantic channel subspace (comma-separated)
    energy: float = option(0.9, 0, 1, above=True)          # fraction of channel variance the subspace U_l keeps
    camouflage_weight: float = option(1.0, 0, 1000)       # λ on the out-of-subspace ratio
    # κ on the class anchor: the frozen output's shift along its class's direction
    anchor_weight: float = option(0.0, 0, 1000)
    # ρ on the deception term: the prior + a clean linear head read class y + shift (0 until defaults
    # revision 2: plain SSC)
    deception_weight: float = option(1.0, 0, 1000)
    deception_shift: int = option(1, 1, 10**6)  # the deceived class of class y: (y + shift) mod K
    probe_images: int = option(2048, 1, 10**7)  # clean images the deception head is fitted on
    frozen_weight: float = option(0.5, 0, 1)    # w: frozen-shallow path vs from-scratch path (1 − w)
    # D + head of the frozen path: the prior's ("pretrained") or re-initialised ("fresh")
    deep_init: str = option("pretrained", choices=("pretrained", "fresh"))
    # one δ_k per class, or one δ per image ("samplewise"); chosen by measurement
    perturbation: str = option("classwise", choices=PERTURBATION_KINDS)
    # crop / cropflip: both paths train, and δ is optimised, through the victim's random crop (+ flip), as
    # EMN's option and BAIT's released loop do
    augment: str = option("none", choices=AUGMENT_MODES)
    # gray / jpeg / bdr, "+"-joined: every term sees x + δ (and the camouflage x) through a per-image draw of
    # the squeezing defenses' differentiable stand-ins, before the crop (ueguard.engine.eot)
    squeeze: str = option("none", choices=SQUEEZE_MODES)
    patch: int = patch_option()                  # class-wise δ constant over patch × patch blocks (1: per pixel)
    achromatic: bool = achromatic_option()       # class-wise δ equal in R, G, B (kept whole by grayscale)
    shift: int = shift_option()                  # class-wise δ shifted by a per-image offset in [0, shift) px
    # clean images the subspaces are fitted on: their activations are held at once (about 3 MB each at 224 px)
    pca_images: int = option(512, 1, 8192)
    pca_locations: int = option(50_000, 1, 10**6)  # channel vectors sampled per depth for the PCA (float64 C-vectors)
    pgd_steps: int = option(10, 1, 10_000)
    step_fraction: float = option(0.2, 0, 10, above=True)  # PGD step as a fraction of eps
    train_steps: int = option(10, 0, 100_000)    # SGD steps per round on each trainable path
    stop_accuracy: float = option(0.99, 0, 2, above=True)  # above 1 it is never reached: every round runs
    max_rounds: int = option(15, 1, 10_000)
    batch_size: int = option(128, 1, 65536)
    eval_limit: int = option(2_000, 1, 10**9)    # samples used for the stopping check
    lr: float = option(0.1, 0, 10)               # from-scratch path
    deep_lr: float = option(0.01, 0, 10)         # deep part D of the pretrained path (fine-tuning rate)
    momentum: float = option(0.9, 0, 1)
    weight_decay: float = option(5e-4, 0, 1)
    grad_clip: float = option(5.0, 0, 1e6, above=True)
    fit_per_class: int = fit_per_class_option()  # optimise on this many images per class, apply to all (0: all)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.stages:
            raise ValueError("subspace_stages names no stage; give e.g. 'stem,layer1,layer2'")

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.subspace_stages.split(",") if s.strip())

    @property
    def read_stages(self) -> tuple[str, ...]:
        """The depths the prior is read at: the subspace stages, and with the anchor term the frozen
        stage too (whose output the anchors are measured on)."""
        return tuple(dict.fromkeys((*self.stages, self.frozen_stage))) if self.anchor_weight > 0 else self.stages


def channel_pca(features: torch.Tensor, energy: float, max_vectors: int | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The semantic channel subspace of N×C×h×w activations.

    Every spatial location gives one C-vector; PCA (eigendecomposition of their covariance) orders the
    channel directions by variance. Returns ``(U, explained)``: U is C×k with orthonormal columns, the
    fewest top directions whose variance share reaches ``energy``; ``explained`` is the share of each of
    the C directions, descending. ``max_vectors`` subsamples the locations (drawn from ``generator``).
    """
    vectors = features.detach().permute(0, 2, 3, 1).reshape(-1, features.shape[1]).double()
    if max_vectors is not None and vectors.shape[0] > max_vectors:
        vectors = vectors[torch.randperm(vectors.shape[0], generator=generator)[:max_vectors].to(vectors.device)]
    centred = vectors - vectors.mean(0)
    cov = centred.T @ centred / max(1, centred.shape[0] - 1)
    values, vecs = torch.linalg.eigh(cov)                       # ascending
    values, vecs = values.flip(0).clamp(min=0), vecs.flip(1)
    explained = values / values.sum().clamp(min=1e-30)
    k = int(torch.searchsorted(explained.cumsum(0), torch.tensor(energy, dtype=explained.dtype) - 1e-12).item()) + 1
    k = min(k, features.shape[1])
    return vecs[:, :k].float().contiguous(), explained.float()


def out_of_subspace_ratio(shift: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Per sample ‖P⊥ Δ‖² / ‖Δ‖² over all locations, for a shift Δ (N×C×h×w) and an orthonormal C×k
    basis U (P⊥ = I − UUᵀ). 0 when the shift lies inside span(U), 1 when it is orthogonal to it."""
    v = shift.permute(0, 2, 3, 1).flatten(1, 2)                 # N×L×C
    total = v.square().sum((1, 2))
    inside = (v @ basis).square().sum((1, 2))
    return (total - inside).clamp(min=0) / (total + 1e-12)


def class_anchors(features: torch.Tensor, basis: torch.Tensor, num_classes: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One channel direction per class inside span(U), for N×C×h×w activations and a C×k basis U.

    Returns ``(A, sigma)``: A is C×K with unit columns, random combinations of U's columns (orthonormal
    when k ≥ K), and ``sigma`` the activations' standard deviation along each, so a shift can be read in
    units of the natural variation in that direction (:func:`anchor_shift`)."""
    k = basis.shape[1]
    mix = torch.randn(k, num_classes, generator=generator, dtype=torch.float64)
    if k >= num_classes:
        mix = torch.linalg.qr(mix).Q
    anchors = basis.double().cpu() @ mix
    anchors = (anchors / anchors.norm(dim=0, keepdim=True).clamp(min=1e-12)).float().to(basis.device)
    vectors = features.detach().permute(0, 2, 3, 1).reshape(-1, features.shape[1]).float().to(basis.device)
    sigma = (vectors @ anchors).std(0).clamp(min=1e-6)
    return anchors.contiguous(), sigma


def anchor_shift(shift: torch.Tensor, anchors: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean over locations of the shift Δ (N×C×h×w) along its class's anchor, in σ units."""
    along = torch.einsum("nchw,cn->n", shift, anchors[:, labels]) / (shift.shape[2] * shift.shape[3])
    return along / sigma[labels]


def _reset(modules: list[nn.Module], generator_seed: int) -> None:
    """Freshly initialise, in place, every learnable layer (and BatchNorm statistics) under ``modules``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        for root in modules:
            for module in root.modules():
                if hasattr(module, "reset_parameters") and any(True for _ in module.parameters(recurse=False)):
                    module.reset_parameters()
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.reset_running_stats()


def _reinitialise(model: nn.Module, generator_seed: int) -> nn.Module:
    """A copy of ``model`` with every learnable layer freshly initialised."""
    fresh = copy.deepcopy(model)
    _reset([m for m in fresh.children()], generator_seed)
    return fresh


@METHODS.register("ssc")
class SSC(ProtectionMethod):
    description = ("shallow semantic camouflage (ueguard's reconstruction of Wang et al. 2026): class-wise "
                   "error-minimising δ kept in the pretrained shallow layers' semantic channel subspace, "
                   "which also makes the prior read each class as the next one")
    config_class = SSCConfig
    needs_pretrained = True
    checkpoints_rounds = True  # resumable after any finished round, as EMN (see ueguard.methods.emn)
    defaults_revision = 2      # 2 (2026-12-02): deception_weight 0 → 1, chosen on three generation seeds
    former_defaults = {1: {"deception_weight": 0.0}}
    presets = {
        "quick": dict(pgd_steps=5, step_fraction=0.25, max_rounds=6, pca_images=256),
        "standard": dict(pgd_steps=10, step_fraction=0.2, max_rounds=15),
        "thorough": dict(pgd_steps=20, step_fraction=0.1, max_rounds=40, pca_images=2048),
    }

    def __init__(self, config: SSCConfig, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self._split(self.surrogate)  # the stage names against the surrogate's: refused before anything is written

    def generate(self, data: WorkingSet) -> Perturbation:
        cfg, rt = self.config, self.runtime
        started = time.perf_counter()
        data = data.to(rt.device)
        n = len(data)
        frozen = rt.prepare_model(self.surrogate)
        shallow, deep = self._split(frozen)
        prior = copy.deepcopy(frozen).eval().requires_grad_(False)
        scratch = rt.prepare_model(_reinitialise(frozen, cfg.seed))
        if cfg.deep_init == "fresh":
            _reset(deep, cfg.seed + 1)
        for p in shallow.parameters():
            p.requires_grad_(False)
        deep_lr = cfg.lr if cfg.deep_init == "fresh" else cfg.deep_lr
        deep_trainer = Trainer(frozen, rt, OptimConfig(deep_lr, cfg.momentum, cfg.weight_decay, grad_clip=cfg.grad_clip))
        scratch_trainer = Trainer(scratch, rt, OptimConfig(cfg.lr, cfg.momentum, cfg.weight_decay, grad_clip=cfg.grad_clip))
        bases, explained, anchors = self._subspaces(prior, data)
        deceiver = self._deceiver(prior, data) if cfg.deception_weight > 0 else None  # the prior, its head fitted
        classwise = cfg.perturbation == "classwise"
        delta = (torch.zeros(data.num_classes, *data.images.shape[1:], device=rt.device) if classwise
                 else self.new_delta((n, *data.images.shape[1:])))
        perturbation = Perturbation(delta, classwise, cfg.eps, shift=cfg.shift, shift_seed=cfg.seed)
        sampler = BatchSampler(n, cfg.batch_size, self.generator)
        check = self.eval_subset(n, cfg.eval_limit)
        tracked = {"frozen_path": frozen, "scratch_path": scratch, "deep_optimizer": deep_trainer.optimizer,
                   "scratch_optimizer": scratch_trainer.optimizer, "sampler": sampler, "generator": self.generator}

        def fitted(acc: dict) -> bool:  # both paths fit x + δ: the round loop's stop
            return min(acc["frozen_path"], acc["scratch_path"]) >= cfg.stop_accuracy

        def one_round(index: int, bar) -> dict:  # both paths train on x + δ, then a PGD pass over δ
            self._train_mode(frozen, shallow)
            scratch.train()
            for _ in range(cfg.train_steps):
                idx = sampler.next()
                x, y = self._augmented(self.through_squeeze(self._perturbed(data, perturbation, idx))), data.labels[idx.to(rt.device)]
                deep_trainer.step(x, y)
                scratch_trainer.step(x, y)
            frozen.eval()
            scratch.eval()
            camouflage, anchored = [], []
            for span in batch_ranges(n, cfg.batch_size):
                idx = torch.arange(span.start, span.stop)
                if classwise:  # every batch moves the class rows its samples belong to
                    delta[:], ratio, along = self._pgd(frozen, scratch, prior, bases, anchors, data, delta, idx)
                else:
                    delta[span], ratio, along = self._pgd(frozen, scratch, prior, bases, anchors, data,
                                                          delta[span], idx)
                camouflage.append(ratio)
                anchored.append(along)
            accuracy = {"frozen_path": self._accuracy(frozen, data, perturbation, check),
                        "scratch_path": self._accuracy(scratch, data, perturbation, check),
                        "out_of_subspace": round(torch.cat(camouflage).mean().item(), 4)}
            if anchors is not None:  # the frozen output's mean shift along the class anchor, in σ
                accuracy["anchor_shift"] = round(torch.cat(anchored).mean().item(), 4)
            if deceiver is not None:  # share of x + δ the prior + clean head reads as the deceived class
                accuracy["deceived"] = self._accuracy(deceiver, data, perturbation, check, cfg.deception_shift)
            bar.update(1, frozen=f"{accuracy['frozen_path']:.3f}", scratch=f"{accuracy['scratch_path']:.3f}")
            return accuracy

        history = self.run_rounds(cfg.max_rounds, delta, tracked, one_round, converged=fitted)
        perturbation.info = {"rounds": len(history), "history": history,
                             "subspace_dims": {s: [int(b.shape[1]), int(e.numel())] for (s, b), e in zip(bases.items(), explained)},
                             "converged": fitted(history[-1]),
                             "seconds": round(time.perf_counter() - started, 2),
                             **self.resume_record()}
        return perturbation

    # ----------------------------------------------------------------------------------------------

    def _split(self, model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        """``model`` cut after ``frozen_stage``: the frozen shallow part S (its stages up to there) as one
        module, and the stages after it, head included — the frozen path's trained part D."""
        cfg = self.config
        stages = model.stages()
        body = [name for name, _ in stages[:-1]]
        for stage in (cfg.frozen_stage, *cfg.stages):
            if stage not in body:
                raise ValueError(f"ssc: stage {stage!r} is not a body stage of {model.arch}; its stages are {', '.join(body)}")
        cut = body.index(cfg.frozen_stage) + 1
        return nn.ModuleList([module for _, module in stages[:cut]]), [module for _, module in stages[cut:]]

    @staticmethod
    def _train_mode(model: nn.Module, shallow: nn.Module) -> None:
        model.train()
        shallow.eval()  # frozen BatchNorm keeps the prior's statistics

    def _subspaces(self, prior: nn.Module, data: WorkingSet):
        """The semantic channel subspace of every depth in ``subspace_stages``, and with ``anchor_weight``
        the class anchors of the frozen output (:func:`class_anchors`); ``(bases, explained, anchors)``."""
        cfg, rt = self.config, self.runtime
        n = len(data)
        pick = torch.randperm(n, generator=self.generator)[:cfg.pca_images].sort().values.to(rt.device)
        anchored, depths = cfg.anchor_weight > 0, cfg.read_stages
        collected: dict[str, list[torch.Tensor]] = {s: [] for s in depths}
        with torch.no_grad():
            for span in batch_ranges(pick.numel(), cfg.batch_size):
                feats = prior.forward_stages(rt.to_float(data.images_at(pick[span])), depths)
                for s in depths:
                    collected[s].append(feats[s].float())
        bases, explained = {}, []
        for s in cfg.stages:
            basis, share = channel_pca(torch.cat(collected[s]), cfg.energy, cfg.pca_locations, self.generator)
            bases[s] = basis.to(rt.device)
            explained.append(share)
        anchors = None
        if anchored:
            frozen_out = torch.cat(collected[cfg.frozen_stage])
            basis = (bases[cfg.frozen_stage] if cfg.frozen_stage in bases
                     else channel_pca(frozen_out, cfg.energy, cfg.pca_locations, self.generator)[0].to(rt.device))
            anchors = class_anchors(frozen_out, basis, data.num_classes, self.generator)
        return bases, explained, anchors

    def _deceiver(self, prior: nn.Module, data: WorkingSet) -> nn.Module:
        """``prior`` itself, its head (which nothing else reads: the subspaces and the camouflage use only
        body stages) replaced by a linear head fitted (L-BFGS, frozen body) to read the task's labels from
        its pooled features of up to ``probe_images`` clean images: what the frozen paradigm's victim starts
        from. The deception term makes this model read x + δ_y as class (y + ``deception_shift``) mod K."""
        cfg, rt = self.config, self.runtime
        if cfg.deception_shift % data.num_classes == 0:
            raise ValueError(f"deception_shift {cfg.deception_shift} maps every class onto itself with "
                             f"{data.num_classes} classes; give 1 … {data.num_classes - 1}")
        n = len(data)
        pick = torch.randperm(n, generator=self.generator)[:cfg.probe_images].sort().values.to(rt.device)
        prior.reset_head(data.num_classes)
        with torch.no_grad():
            feats = torch.cat([prior.features(rt.to_float(data.images_at(pick[span]))).float()
                               for span in batch_ranges(pick.numel(), cfg.batch_size)])
        labels = data.labels[pick]
        head = prior.head.float()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            head.reset_parameters()
        fit_linear_head(head, feats, labels)
        return prior.eval().requires_grad_(False)

    def _pgd(self, frozen, scratch, prior, bases, anchors, data: WorkingSet, delta: torch.Tensor, idx: torch.Tensor):
        """``pgd_steps`` signed steps descending the SSC objective for one batch; returns the new δ, the
        final per-sample out-of-subspace ratio (mean over depths) and the shift along the class anchor (0
        without anchors). Sample-wise, ``delta`` holds the batch's rows; class-wise, the K class rows, each
        stepped along the sign of its summed gradient over the batch's samples of that class (zero where
        x + δ is clipped)."""
        cfg, rt = self.config, self.runtime
        classwise = cfg.perturbation == "classwise"
        dev_idx = idx.to(rt.device)
        x, y, gray = rt.to_float(data.images_at(idx)), data.labels[dev_idx], data.grayscale[dev_idx]
        stages, depths = cfg.stages, cfg.read_stages
        kinds = squeeze_kinds(cfg.squeeze)
        with torch.no_grad():
            clean = None if kinds else prior.forward_stages(x, depths)
        alpha = cfg.step_fraction * cfg.eps
        ratio = along = torch.zeros(len(idx), device=rt.device)
        frozen_fn, scratch_fn = model_call(frozen, rt), model_call(scratch, rt)
        # with deception the prior's head is the fitted one (_deceiver): one pass gives its activations at
        # every depth and the logits that should read the deceived class
        deceive = cfg.deception_weight > 0
        read_fn, reads = model_call(prior, rt, "forward_stages"), (*depths, "head") if deceive else depths
        deceived = (y + cfg.deception_shift) % data.num_classes
        with frozen_parameters(frozen, scratch):  # ∇ in δ only
            for _ in range(cfg.pgd_steps):
                if classwise:
                    rows = delta.detach().requires_grad_(True)
                    placed = rows[y] if not cfg.shift else \
                        roll_rows(rows[y], random_offsets(len(idx), cfg.shift, self.generator, rt.device))
                    xa = (x + gray_project(placed, gray)).clamp(0, 1)
                else:
                    rows = xa = (x + delta).detach().requires_grad_(True)
                if kinds:  # one squeeze draw for x + δ and x: the camouflage compares them through it
                    draw = draw_squeeze(len(idx), self.generator, kinds)
                    xa = apply_squeeze(xa, draw, kinds)
                    with torch.no_grad():
                        clean = prior.forward_stages(apply_squeeze(x, draw, kinds), depths)
                seen = self._augmented(xa)  # what the paths see; the camouflage compares un-cropped features
                with rt.autocast():
                    loss = cfg.frozen_weight * F.cross_entropy(frozen_fn(seen).float(), y, reduction="none")
                    loss = loss + (1 - cfg.frozen_weight) * F.cross_entropy(scratch_fn(seen).float(), y, reduction="none")
                    feats = read_fn(xa, reads)
                    if deceive:  # the prior, as the frozen victim starts, reads the wrong class
                        loss = loss + cfg.deception_weight * F.cross_entropy(feats["head"].float(), deceived,
                                                                             reduction="none")
                ratio = torch.stack([out_of_subspace_ratio((feats[s] - clean[s]).float(), bases[s]) for s in stages]).mean(0)
                objective = loss + cfg.camouflage_weight * ratio
                if anchors is not None:  # push the frozen output along the class's anchor direction
                    shift = (feats[cfg.frozen_stage] - clean[cfg.frozen_stage]).float()
                    along = anchor_shift(shift, *anchors, y)
                    objective = objective - cfg.anchor_weight * along
                (grad,) = torch.autograd.grad(objective.sum(), rows)
                if classwise:
                    grad = subspace_project(grad, cfg.patch, cfg.achromatic)  # steps stay in the subspace
                    delta = (delta - alpha * grad.sign()).clamp(-cfg.eps, cfg.eps)
                else:
                    delta = gray_project(project_step(delta, grad, x, alpha, cfg.eps, 1.0), gray)
        return delta, ratio.detach(), along.detach()

    def _augmented(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` through a fresh random crop (+ flip) drawn from the method's generator, or as it is."""
        if self.config.augment == "none":
            return x
        return crop_flip(x, self.generator, flip=self.config.augment == "cropflip")


    def _perturbed(self, data: WorkingSet, perturbation: Perturbation, idx: torch.Tensor) -> torch.Tensor:
        dev_idx = idx.to(self.runtime.device)
        x = self.runtime.to_float(data.images_at(idx))
        return apply_delta(x, perturbation.for_samples(dev_idx, data.labels, data.grayscale))

    def _accuracy(self, model, data: WorkingSet, perturbation: Perturbation, index: torch.Tensor,
                  shift: int = 0) -> float:
        """Share of x + δ at ``index`` that ``model`` reads as class (y + ``shift``) mod K: its accuracy at
        0, the deceiver's hit rate at ``deception_shift``."""
        spans = (index[s] for s in batch_ranges(index.numel(), 4 * self.config.batch_size))
        pred = predict(model, (self._perturbed(data, perturbation, idx) for idx in spans), self.runtime)
        target = (data.labels[index.to(self.runtime.device)] + shift) % data.num_classes
        return round((pred == target).float().mean().item(), 4)
