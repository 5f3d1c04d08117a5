"""The compute budgets, in one place: their names and what each one sizes across ueguard.

``quick`` is CPU-friendly (the demo, the tests, the ``--cpu`` benchmarks); ``standard`` is the default;
``thorough`` is the papers' scale (a method's ``thorough`` preset holds the authors' constants) and
ImageNet-scale working resolutions. A method's or a defense's own constants per budget are its
``presets``; what the commands share is here: the cap on the working resolution when ``--size`` is not
given, verify's epochs when ``--epochs`` is not given, and the default architecture.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """What one budget sets when the user does not: ``size_cap`` (px, the working resolution's cap),
    ``verify_epochs`` (the victims' epochs) and ``slim`` (the default small-image architecture is the
    slim ResNet-18)."""

    name: str
    size_cap: int
    verify_epochs: int
    slim: bool


BUDGET = {b.name: b for b in (Budget("quick", 64, 10, True), Budget("standard", 128, 30, False),
                              Budget("thorough", 224, 60, False))}
BUDGETS = tuple(BUDGET)
#: Default working-size cap per budget: quick stays CPU-friendly, thorough goes to ImageNet scale.
SIZE_CAP = {name: b.size_cap for name, b in BUDGET.items()}
#: verify's epochs per budget when ``--epochs`` is not given.
VERIFY_EPOCHS = {name: b.verify_epochs for name, b in BUDGET.items()}


def default_arch(size: int, budget: str) -> str:
    """The default surrogate (``protect``) and victim (``verify``) architecture.

    CIFAR-style ResNet-18 (3×3 stem, no max-pool) for small working sizes — an ImageNet-style stem at
    32 px weakens EMN (~50 % instead of ~20 %, a pitfall of the authors' code; docs/methods.md) — slimmed
    for the quick budget; timm's ImageNet-style ``resnet18`` above 64 px."""
    if size <= 64:
        return "resnet18_cifar_slim" if BUDGET[budget].slim else "resnet18_cifar"
    return "resnet18"
