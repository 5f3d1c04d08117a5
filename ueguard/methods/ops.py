"""OPS — one-pixel shortcut (Wu, Chen, Xu, Wang, *One-Pixel Shortcut: on the Learning Preference of Deep
Neural Networks*, ICLR 2023). Code: github.com/cychomatica/One-Pixel-Shotcut.

Threat model: the adversary trains a classifier from scratch (OPS is notably robust to adversarial
training and to augmentations that leave pixel positions mostly in place). Model-free, class-wise,
L0 = 1: every image of class k gets one pixel, at a position p_k, set to a corner colour
c_k ∈ {0, 1}³. The pair is found by search over every position and all eight colours, maximising

    score_k(p, c) = mean_{x ∈ class k} D(x, p, c) / std_{x ∈ class k} D(x, p, c),
    D(x, p, c) = mean over channels of |c − x_p|,

i.e. a change that is large *and* consistent across the class — the easiest possible feature for a
network to key on. (p, c) pairs are handed out to classes in order and never shared, so two classes
cannot carry the same shortcut.

Representation: δ_k is +1 / −1 per channel at p_k (0 elsewhere), so x̃ = clip(x + δ_k, 0, 1) sets that
pixel exactly to c_k. The budget is L0 = 1 pixel position at the working resolution; the CLI's L∞
``--eps`` does not apply. At a file's native size the pixel becomes the block of native pixels the
working pixel covers (nearest-neighbour resize), and the manifest records the changed positions.
A grayscale image gets the channel mean of δ_k (a shift of ±1/3 or ±1 at p_k), which keeps it gray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ueguard.data.working_set import WorkingSet
from ueguard.methods.base import METHODS, MethodConfig, Perturbation, ProtectionMethod, fit_per_class_option, option

#: The eight corner colours of the RGB cube, ``8×3``.
CORNERS = torch.tensor([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)], dtype=torch.float32)


@dataclass(frozen=True)
class OPSConfig(MethodConfig):
    batch_size: int = option(512, 1, 65536)   # images per pass when accumulating the per-class statistics
    fit_per_class: int = fit_per_class_option()  # optimise on this many images per class, apply to all (0: all)


def class_scores(data: WorkingSet, batch_size: int, device: torch.device) -> torch.Tensor:
    """``score[k, c, i, j]`` = mean/std over class-k images of D(x, (i, j), corner c): ``K×8×H×W``.

    One pass over the data accumulates per-class sums of D and D² (float64), so memory is
    ``K×8×H×W`` whatever the number of images."""
    k = data.num_classes
    h, w = data.images.shape[-2:]
    corners = CORNERS.to(device)[None, :, :, None, None]                  # 1×8×3×1×1
    total = torch.zeros(k, 8, h, w, dtype=torch.float64, device=device)
    squares = torch.zeros_like(total)
    for start in range(0, len(data), batch_size):
        x = data.images[start:start + batch_size].to(device).float().div_(255)
        y = data.labels[start:start + batch_size].to(device)
        d = (corners - x[:, None]).abs().mean(2).double()                # N×8×H×W
        total.index_add_(0, y, d)
        squares.index_add_(0, y, d * d)
    count = torch.bincount(data.labels.to(device), minlength=k).double().clamp_min(1).view(-1, 1, 1, 1)
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return (mean / std.clamp_min(1e-6)).float()


@METHODS.register("ops")
class OPS(ProtectionMethod):
    description = "one-pixel shortcut (Wu et al. ICLR 2023): model-free, one searched pixel and colour per class, L0 = 1"
    config_class = OPSConfig
    needs_surrogate = False
    norm = "l0"

    def generate(self, data: WorkingSet) -> Perturbation:
        device = self.runtime.device
        scores = class_scores(data, self.config.batch_size, device)          # K×8×H×W
        k, _, h, w = scores.shape
        taken = torch.zeros(8, h, w, dtype=torch.bool, device=device)
        delta = torch.zeros(k, 3, h, w, device=device)
        picks = []
        for cls in range(k):
            flat = scores[cls].masked_fill(taken, float("-inf")).flatten()
            best = int(flat.argmax())
            colour, pos = divmod(best, h * w)
            i, j = divmod(pos, w)
            taken[colour, i, j] = True
            delta[cls, :, i, j] = CORNERS[colour].to(device) * 2 - 1
            picks.append({"class": cls, "row": i, "col": j, "colour": CORNERS[colour].int().tolist(),
                          "score": round(float(flat[best]), 4)})
        return Perturbation(delta, True, 1.0, {"pixels": picks}, norm="l0", resample="nearest")
