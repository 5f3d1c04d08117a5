"""UC — unlearnable clusters (Zhang, Ma, Yi, Sang, Jiang, Wang, Xu, *Unlearnable Clusters: Towards
Label-agnostic Unlearnable Examples*, CVPR 2023). Code: github.com/jiamingzhang94/Unlearnable-Clusters.

Threat model: the protector has *no labels* (or the adversary may relabel the data however it likes),
and the adversary trains a classifier on the released images with any labelling. UC therefore makes
the noise agree with a partition the protector can compute itself, and disagree with semantics:

1. k-means the pretrained surrogate's penultimate features of the clean images into p clusters
   (``clusters``, authors p = 10) — the clusters stand in for the unknown classes;
2. per cluster i a small generator G_i maps a fixed uniform noise input z_i to one perturbation
   δ_i = ε·tanh(g·G_i(z_i)) (cluster-wise noise; ``gain`` g), trained with Adam so that the surrogate's features of
   x + δ_i for the images x of cluster i move to the centre of cluster j = (i + ``target_offset``) mod p:
   min KL(softmax(c_j) ‖ softmax(f(clip(t(x) + δ_i, 0, 1)))), t = crop + flip.

Every image of cluster i gets δ_i, so images that look alike share a shortcut that points elsewhere in
feature space — whatever labels the adversary uses, the noise is a simpler feature than the content.
Released as class-wise noise keyed by cluster (``Perturbation.assignment``); labels are never read.

Authors' settings: L∞ ε = 16/255 (ueguard's default is the CLI's 8/255 — pass ``--eps 16/255`` for
theirs), p = 10, Adam lr 1e-4 (wd 5e-4), 50 epochs (``thorough``). Differences, stated: the authors'
generator is a ResNet generator (64 base channels) whose raw output is clipped to ±ε, and their loop
draws batches from the whole training set for every cluster's generator; ueguard's default generator
is a 4-layer conv net (``generator_width`` channels) with a tanh bound (gradients survive at the
bound; ``gain`` = 4 makes a freshly initialised generator's δ use a good part of ε, as the clipped raw
output of theirs does from the start) and trains each δ_i on its own cluster's images (``fit_all=True`` uses every image, as the
authors' loader does). Needs a pretrained surrogate (``--weights``/``--pretrained``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ueguard.data.working_set import WorkingSet
from ueguard.engine.augment import crop_flip
from ueguard.engine.clusters import pseudo_labels
from ueguard.methods.base import METHODS, MethodConfig, Perturbation, ProtectionMethod, option


@dataclass(frozen=True)
class UCConfig(MethodConfig):
    clusters: int = option(10, 1, 100_000)  # p, the number of k-means clusters (capped at the number of images)
    epochs: int = option(50, 1, 100_000)    # passes over each cluster's images per generator
    lr: float = option(1e-4, 0, 10)         # Adam
    weight_decay: float = option(5e-4, 0, 1)
    batch_size: int = option(128, 1, 65536)
    generator_width: int = option(32, 1, 512)  # generator channels; its parameters grow with the square
    target_offset: int = option(1, 1, 10**6)  # cluster i is pushed to the centre of cluster (i + offset) mod p
    fit_all: bool = False         # train every generator on all images (the authors' loader), not its cluster's
    # δ = ε·tanh(gain·G(z)): starts near the budget, as the authors' clipped output does
    gain: float = option(4.0, 0, 1000, above=True)


class NoiseGenerator(nn.Module):
    """A fixed noise image → one perturbation direction in [−1, 1] (conv net, tanh output)."""

    def __init__(self, width: int, gain: float = 1.0) -> None:
        super().__init__()
        self.gain = gain
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.gain * self.net(z))


def feature_kl(features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """KL(softmax(anchor) ‖ softmax(feature)), averaged over the batch (the authors' KLDivLoss)."""
    return F.kl_div(features.log_softmax(-1), anchors.softmax(-1), reduction="batchmean")


@METHODS.register("uc")
class UC(ProtectionMethod):
    description = ("unlearnable clusters (Zhang et al. CVPR 2023): label-free, k-means of pretrained features, "
                   "one generated δ per cluster pushing it to another cluster's centre")
    config_class = UCConfig
    needs_labels = False
    needs_pretrained = True
    presets = {
        "quick": dict(epochs=5, lr=3e-3),
        "standard": dict(epochs=20, lr=5e-4),
        "thorough": dict(epochs=50, lr=1e-4),
    }

    def generate(self, data: WorkingSet) -> Perturbation:
        started = time.perf_counter()
        model = self.runtime.prepare_model(self.surrogate).eval()
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:  # the surrogate is frozen here: only the generators learn
            p.requires_grad_(False)
        try:
            return self._generate(data, model, started)
        finally:
            for p in trainable:
                p.requires_grad_(True)

    def _generate(self, data: WorkingSet, model, started: float) -> Perturbation:
        cfg, rt = self.config, self.runtime
        clustering = pseudo_labels(model, data.images, rt, min(cfg.clusters, len(data)), seed=cfg.seed,
                                   normalize=False)
        k = clustering.k
        centres = clustering.centres.to(rt.device)
        assignment = clustering.labels
        h, w = data.images.shape[-2:]
        delta = torch.zeros(k, 3, h, w, device=rt.device)
        kl = []
        with self.progress.bar(k, "uc", unit="cluster") as bar:
            for cluster in range(k):
                members = torch.arange(len(data)) if cfg.fit_all else torch.nonzero(assignment == cluster).flatten()
                target = (cluster + cfg.target_offset) % k
                delta[cluster], before, after = self._fit_cluster(model, data, members, centres[target])
                kl.append({"cluster": cluster, "target": target, "kl_clean": round(before, 4), "kl_protected": round(after, 4)})
                bar.update(1)
        info = {**clustering.record(), "kl": kl, "seconds": round(time.perf_counter() - started, 2)}
        return Perturbation(delta, True, cfg.eps, info, assignment=assignment)

    def _fit_cluster(self, model, data: WorkingSet, members: torch.Tensor, anchor: torch.Tensor):
        """Train one generator; returns (δ_i, KL on clean images, KL with δ_i) over the members."""
        cfg, rt = self.config, self.runtime
        generator = NoiseGenerator(cfg.generator_width, cfg.gain).to(rt.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
            for module in generator.modules():
                if isinstance(module, nn.Conv2d):
                    module.reset_parameters()
        z = torch.rand(1, 3, *data.images.shape[-2:], generator=self.generator).to(rt.device)
        optimizer = torch.optim.Adam(generator.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        for _ in range(cfg.epochs):
            order = members[torch.randperm(members.numel(), generator=self.generator)]
            for start in range(0, order.numel(), cfg.batch_size):
                x = rt.to_float(data.images_at(order[start:start + cfg.batch_size]))
                x = crop_flip(x, self.generator)
                delta = cfg.eps * generator(z)
                with rt.autocast():
                    feats = model.features((x + delta).clamp(0, 1)).float()
                loss = feature_kl(feats, anchor.expand_as(feats))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            delta = (cfg.eps * generator(z))[0]
            x = rt.to_float(data.images_at(members))
            anchors = anchor.expand(x.shape[0], -1)
            before = feature_kl(model.features(x).float(), anchors).item()
            after = feature_kl(model.features((x + delta).clamp(0, 1)).float(), anchors).item()
        return delta, before, after
