"""Early stopping on clean validation data: report the test accuracy of the epoch with the best
validation accuracy.

Threat model: an adversary who holds a few clean labelled images (here: a stratified split of
``--clean``, held out of training) can watch validation accuracy and keep the best epoch. Poisons that
the network learns slower than the semantics show a *peak* early on before the shortcut takes over
(e.g. EMN sample-wise on CIFAR-10: final 23.6 %, peak 35.2 % in the authors' notebook).
"""

from __future__ import annotations

from dataclasses import dataclass

from ueguard.defenses.base import DEFENSES, Defense, DefenseConfig


@dataclass(frozen=True)
class EarlyStopConfig(DefenseConfig):
    val_fraction: float = 0.1  # of the clean images, per class (at least one each), held out of training

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError("earlystop needs 0 < val_fraction < 1")


@DEFENSES.register("earlystop")
class EarlyStop(Defense):
    description = ("standard training; report the test accuracy at the epoch of peak accuracy on a clean "
                   "validation split of --clean")
    config_class = EarlyStopConfig
    needs_validation = True

    def selected_epoch(self, history: list[dict]) -> int:
        scores = [record["val_accuracy"] for record in history]
        return max(range(len(scores)), key=lambda i: (scores[i], -i))  # earliest of equal peaks
