"""Choosing the clean recipe when ``verify``'s default one does not learn.

Why: a verdict compares the model trained on the protected images with one trained on the originals.
When the clean model itself does not learn — few images, few optimiser steps, a rate made for another
setting (1e-3 fine-tuning for ten epochs of 400 images moves a prior too little) — there is no verdict,
although a practitioner would have made it learn. An honest red team is a competent adversary: it
chooses the clean recipe first, then trains the protected images with the same one.

Protocol, per training paradigm (their recipes differ):

1. The default recipe trains the clean baseline. If it learns (test accuracy − chance ≥ the verdict's
   ``MIN_CLEAN_GAIN``: the verdict's own condition), it stays and nothing is searched — the default path
   and its numbers are unchanged.
2. Otherwise a seeded, stratified ``SEARCH_FRACTION`` of the *clean training images* is held out as a
   validation split; each candidate trains on the rest and is scored by its final-epoch accuracy there.
   The test set is never read by the search (choosing on it would be tuning on the test set).
3. Candidates, in tiers of growing cost: tier 1 keeps the default epochs and tries the peak rate ×
   ``LR_FACTORS`` (rates above ``ceiling``, the recipe's from-scratch rate, are left out: higher rates make
   SGD diverge on these networks); tier 2 trains ``EPOCH_FACTOR`` × the epochs at the default rate and at
   tier 1's best one. Tier 2 runs only when no tier-1 candidate learned (validation gain ≥ the same
   ``MIN_CLEAN_GAIN``). The best-scoring candidate that learned is chosen.
4. The chosen recipe trains the clean baseline and every protected run on the full training sets.

Cost cap: at most ``len(LR_FACTORS)`` + 2 candidates per paradigm, each on 1 − ``SEARCH_FRACTION`` of the
clean images: at most 3 + 2 · 4 = 11 default runs' worth of epochs, then the chosen recipe's runs at up to
``EPOCH_FACTOR`` × the epochs. An explicit ``--lr`` or ``--epochs`` is the user's recipe: it is trained as
given, not searched; ``--recipe-search off`` turns the search off. When no recipe learns, :func:`advice`
says what to try.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: ``--recipe-search`` values: ``auto`` searches when the default clean baseline does not learn.
MODES = ("auto", "off")
#: Share of the clean training images held out (stratified, seeded) to score the candidates.
SEARCH_FRACTION = 0.2
#: Tier 1: the default peak rate times these, in this order (larger steps first: too little training is
#: the common failure of a small folder).
LR_FACTORS = (10.0, 100.0, 0.1)
#: Tier 2: this many times the default epochs.
EPOCH_FACTOR = 4


@dataclass(frozen=True)
class Candidate:
    """One recipe the search tries: the peak learning rate and the epochs (everything else is the recipe's)."""

    lr: float
    epochs: int

    def describe(self) -> dict[str, Any]:
        return {"lr": self.lr, "epochs": self.epochs}


def first_tier(lr: float, epochs: int, ceiling: float) -> list[Candidate]:
    """The default epochs at the rate × each of :data:`LR_FACTORS`, none above ``ceiling``."""
    rates = [_round(lr * f) for f in LR_FACTORS]
    return [Candidate(r, epochs) for r in dict.fromkeys(rates) if r <= ceiling * (1 + 1e-9) and r != lr]


def second_tier(lr: float, epochs: int, best: Candidate | None) -> list[Candidate]:
    """:data:`EPOCH_FACTOR` × the epochs, at the default rate and at tier 1's best rate."""
    rates = [lr] + ([best.lr] if best is not None else [])
    return [Candidate(r, epochs * EPOCH_FACTOR) for r in dict.fromkeys(rates)]


def _round(value: float) -> float:
    """A rate as a person writes it (0.1 × 10 is 1.0, not 1.0000000000000002)."""
    return float(f"{value:.6g}")


def search(trial: Callable[[Candidate], float], lr: float, epochs: int, ceiling: float,
           learned: Callable[[float], bool], on_trial: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run the tiers (module docstring): ``trial(candidate)`` trains one candidate and returns its accuracy
    on the validation split; ``learned(accuracy)`` is the verdict's condition. Returns ``tried`` (each
    candidate, its tier, validation accuracy and whether it learned) and ``chosen`` (or ``None``)."""
    tried: list[dict[str, Any]] = []

    def run(tier: int, candidates: list[Candidate]) -> None:
        for candidate in candidates:
            accuracy = trial(candidate)
            tried.append({"tier": tier, **candidate.describe(), "val_accuracy": accuracy,
                          "learned": learned(accuracy)})
            if on_trial is not None:
                on_trial(tried[-1])

    run(1, first_tier(lr, epochs, ceiling))
    if not any(t["learned"] for t in tried):
        best = max(tried, key=lambda t: t["val_accuracy"], default=None)
        run(2, second_tier(lr, epochs, Candidate(best["lr"], epochs) if best else None))
    winners = [t for t in tried if t["learned"]]
    chosen = max(winners, key=lambda t: t["val_accuracy"], default=None)  # the first of equals
    return {"tried": tried, "chosen": None if chosen is None else {"lr": chosen["lr"], "epochs": chosen["epochs"]}}


def advice(train_images: int, classes: int, size: int, pretrained_paradigm: bool, budget: str) -> str:
    """What to try when the clean model learned under no recipe verify tried, from what this run had."""
    tips = [f"more images ({train_images} clean training images, about {train_images // max(classes, 1)} per class; "
            "a model trained from scratch usually needs hundreds per class)"]
    if not pretrained_paradigm:
        tips.append("a pretrained paradigm, which needs far fewer images: --paradigm finetune or linear with "
                    "--weights FILE or --pretrained")
    if size < 64:
        tips.append(f"a larger --size (this run trained at {size} px)")
    if budget != "thorough":
        tips.append("a larger --budget (more epochs)")
    return "the clean model did not learn; try " + "; ".join(tips)
