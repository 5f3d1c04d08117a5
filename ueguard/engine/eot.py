"""Differentiable stand-ins for the squeezing defenses, drawn per image: an expectation over the
transforms an adversary applies before training (Athalye et al., *Synthesizing Robust Adversarial
Examples*, ICML 2018), so that generation can optimise δ through them.

The squeezing defenses (``ueguard.defenses.squeeze``: ISS's grayscale, JPEG at quality 10 and bit-depth
reduction) act on 8-bit images and have no gradient. Here each has a float stand-in on ``[0, 1]``:

* ``gray``: the same ITU-R 601 luma replicated to three channels, without the 8-bit rounding (linear,
  exact up to half a grey level);
* ``jpeg``: kornia's differentiable JPEG codec at the defense's quality (Reich et al. 2024; DCT, 4:2:0
  chroma, quantisation with a differentiable rounding) — close to Pillow's codec, not equal to it;
* ``bdr``: rounding to ``2**bits`` levels with a straight-through gradient (BPDA: the forward pass is the
  defense's, the backward pass the identity).

A *draw* picks, per image, the identity or one of the chosen squeezes with equal probability, from a
caller-owned generator in a fixed order, so a seed replays it. The same draw can be applied to two tensors
(the clean and the perturbed batch) when an objective compares them through one transform.
"""

from __future__ import annotations

import itertools

import torch

SQUEEZES = ("gray", "jpeg", "bdr")
#: The ``squeeze`` option's values: ``none`` or ``+``-joined squeezes in ``SQUEEZES`` order.
SQUEEZE_MODES = ("none",) + tuple("+".join(c) for r in range(1, len(SQUEEZES) + 1)
                                  for c in itertools.combinations(SQUEEZES, r))
JPEG_QUALITY = 10  # the jpeg defense's default (ISS)
BDR_BITS = 2       # the bdr defense's default (ISS)
LUMA = (0.299, 0.587, 0.114)


def squeeze_kinds(mode: str) -> tuple[str, ...]:
    """The squeezes a ``squeeze`` option value names (``"gray+jpeg"`` → ``("gray", "jpeg")``; ``"none"`` → ())."""
    if mode not in SQUEEZE_MODES:
        raise ValueError(f"unknown squeeze {mode!r}; use one of {', '.join(SQUEEZE_MODES)}")
    return () if mode == "none" else tuple(mode.split("+"))


def soft_gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of a float ``N×3×H×W`` batch, replicated to three channels; differentiable (linear)."""
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True).expand_as(x)


def soft_jpeg(x: torch.Tensor, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """JPEG encode + decode of a float ``N×3×H×W`` batch in [0, 1] at ``quality``, differentiable (kornia)."""
    from kornia.enhance import jpeg_codec_differentiable  # imported here: kornia takes seconds to import

    q = torch.tensor([float(quality)], device=x.device)
    return jpeg_codec_differentiable(x.clamp(0, 1), q).to(x.dtype)


def soft_bdr(x: torch.Tensor, bits: int = BDR_BITS) -> torch.Tensor:
    """``round(x·L)/L`` with L = 2**bits − 1 in the forward pass, the identity in the backward pass."""
    levels = 2 ** bits - 1
    return x + (torch.round(x.clamp(0, 1) * levels) / levels - x).detach()


STAND_INS = {"gray": soft_gray, "jpeg": soft_jpeg, "bdr": soft_bdr}


def draw_squeeze(n: int, generator: torch.Generator, kinds: tuple[str, ...]) -> torch.Tensor:
    """Per-image choice in 0..len(kinds): 0 the identity, i the squeeze ``kinds[i − 1]``; uniform, drawn
    on the CPU from ``generator`` (nothing is drawn when ``kinds`` is empty, so the stream is untouched)."""
    if not kinds:
        return torch.zeros(n, dtype=torch.long)
    return torch.randint(0, len(kinds) + 1, (n,), generator=generator)


def apply_squeeze(x: torch.Tensor, choice: torch.Tensor, kinds: tuple[str, ...]) -> torch.Tensor:
    """``x`` with image i through the squeeze ``choice[i]`` names (0: unchanged); differentiable in ``x``."""
    if not kinds or not bool((choice > 0).any()):
        return x
    out = x.clone()
    choice = choice.to(x.device)
    for i, kind in enumerate(kinds, start=1):
        at = (choice == i).nonzero().flatten()
        if at.numel():
            out = out.index_copy(0, at, STAND_INS[kind](x.index_select(0, at)))
    return out


def squeezed(x: torch.Tensor, generator: torch.Generator, kinds: tuple[str, ...]) -> torch.Tensor:
    """``x`` through a fresh per-image draw of ``kinds`` (or as it is when ``kinds`` is empty)."""
    return apply_squeeze(x, draw_squeeze(x.shape[0], generator, kinds), kinds)
