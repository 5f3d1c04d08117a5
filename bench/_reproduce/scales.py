"""The protocol: CIFAR-10's task / prior class split, the rows, the published numbers and the scale presets
(sizes, budgets, victims) whose settings key the cache."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _reproduce.cache import _digest

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PRIOR_CLASSES = (0, 1, 2, 3, 4)
TASK_CLASSES = (5, 6, 7, 8, 9)
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
AKAMASTER = Path("weights") / "cifar10_resnet_akamaster" / "resnet20-12fca82f.th"
#: The held-out task set: CIFAR-100's 20-class training cut (one fine class per superclass, 500 images each,
#: ``cifar100/train-20class.npz``) and the official test file's images of those classes (100 each).
CIFAR100_TASK = Path("cifar100") / "train-20class.npz"
CIFAR100_TEST = Path("cifar100") / "cifar-100-python" / "test"
CIFAR100_CLASSES = {0: "apple", 1: "aquarium_fish", 2: "baby", 3: "bear", 4: "beaver", 5: "bed", 6: "bee",
                    8: "bicycle", 9: "bottle", 12: "bridge", 15: "camel", 22: "clock", 23: "cloud", 26: "crab",
                    27: "crocodile", 34: "fox", 36: "hamster", 41: "lawn_mower", 47: "maple_tree", 54: "orchid"}
METHODS = ("emn", "rem", "tap", "lsp", "ops", "ar", "bait", "ssc", "pil", "dune")
ROWS = ("clean",) + METHODS

#: Published CIFAR-10 test accuracy %, ResNet-18 from scratch, 60 epochs (ISS README; docs/results.md).
#: Keyed (row, defense) for the scratch paradigm; EM is the sample-wise error-minimising noise.
PUBLISHED = {
    ("clean", "none"): 94.68, ("clean", "gray"): 92.41, ("clean", "jpeg"): 85.38,
    ("emn", "none"): 21.05, ("emn", "gray"): 93.01, ("emn", "jpeg"): 81.50,
    ("rem", "none"): 25.44, ("rem", "gray"): 92.84, ("rem", "jpeg"): 81.50,
    ("tap", "none"): 8.17, ("tap", "gray"): 9.11, ("tap", "jpeg"): 83.87,
    ("lsp", "none"): 19.07, ("lsp", "gray"): 82.47, ("lsp", "jpeg"): 83.01,
    ("ar", "none"): 13.28, ("ar", "gray"): 34.04, ("ar", "jpeg"): 85.15,
    ("ops", "none"): 36.55, ("ops", "gray"): 42.44, ("ops", "jpeg"): 82.53,
}


@dataclass(frozen=True)
class Scale:
    """Sizes and budgets of one run. ``method_options`` are per-method constants on top of the budget
    preset (``-o key=value``), as sorted ``(method, ((key, value), ...))`` pairs."""

    name: str
    train_per_class: int          # task training images per class (5 classes)
    test_per_class: int           # task test images per class
    prior_per_class: int          # prior training images per class (the other 5 classes)
    prior_epochs: int
    epochs: int                   # victim epochs (every paradigm and defense)
    budget: str                   # ueguard budget for protect and verify (method and defense presets)
    scratch_arch: str             # victim from scratch, and surrogate of the surrogate-training methods
    prior_arch: str = "resnet20_cifar"  # the disjoint prior's architecture (= the akamaster one)
    batch_size: int = 128         # victim minibatch (smaller at small scales: enough optimiser steps)
    prior_lr: float | None = None  # the victims' lr in the prior's paradigms (None: each paradigm's default;
                                   # verify's finetune 1e-3 is meant for 60 epochs and underfits short runs)
    method_options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    paradigms: tuple[str, ...] = ("scratch", "finetune", "frozen", "linear")
    defenses: tuple[str, ...] = ("none", "staged", "gray", "jpeg", "at")
    defended: tuple[str, ...] = ("clean", "emn", "ssc")
    # Added later: left out of the cache keys at their defaults, so the earlier scales' keys are unchanged.
    task_classes: tuple[int, ...] = TASK_CLASSES    # the task's CIFAR-10 classes (the victims' and protections')
    prior_classes: tuple[int, ...] = PRIOR_CLASSES  # the disjoint prior's classes
    recipe: str | None = None     # verify recipe of every victim (None: the architecture's default)
    prior_recipe: str | None = None  # recipe the disjoint prior is trained with (None: ueguard's plain FitConfig)
    precision: str | None = None  # protect's and verify's --precision (None: their auto)
    surrogate_arch: str | None = None  # surrogate of the surrogate-training methods (None: scratch_arch)
    task_data: str = "cifar10"    # where the task's images come from: CIFAR-10, or "cifar100" (CIFAR100_CLASSES)

    def options_for(self, method: str) -> dict[str, Any]:
        return dict(dict(self.method_options).get(method, ()))

    def class_names(self, task: bool) -> list[str]:
        """The names of the task's (or the prior's, always CIFAR-10) classes."""
        if task and self.task_data == "cifar100":
            return [CIFAR100_CLASSES[c] for c in self.task_classes]
        return [CIFAR10_CLASSES[c] for c in (self.task_classes if task else self.prior_classes)]

    def tag(self) -> str:
        """Cache key of the verify cells: the scale's name and a hash of every setting that changes a result."""
        return self._tag(("paradigms", "defenses", "defended"))  # selections, not settings

    def protect_tag(self) -> str:
        """Cache key of the protected folders: only what changes a protection (not the victims' settings)."""
        return self._tag(("paradigms", "defenses", "defended", "epochs", "batch_size", "test_per_class"))

    def _tag(self, leave_out: tuple[str, ...]) -> str:
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in LATER_FIELDS}
        record = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in leave_out and not (k in defaults and v == defaults[k])}
        return f"{self.name}-{_digest(record, 8)}"


#: Scale fields added after results were committed: at their defaults they are not part of a cache key.
LATER_FIELDS = ("task_classes", "prior_classes", "recipe", "prior_recipe", "precision", "surrogate_arch", "task_data")

#: Per-method constants of the ``cpu-full`` scales on top of the ``quick`` budget's presets, chosen so each
#: method generates for all 50,000 images on a 2-core CPU. The surrogate of EMN, REM, TAP and DUNE is the
#: CIFAR ResNet-20 (0.04 GFLOP a forward pass, a sixth of fastvgg_cifar's: their sample-wise PGD touches
#: every image every round, so its cost decides whether 50k fit in two hours); SSC and BAIT use the prior.
#: EMN checks its stop on 2,000 images; REM takes 1,200 outer steps (three passes over 50k at batch 128, where
#: the preset's 150 would touch 19k images once); SSC and BAIT optimise their class rows on 500 images per
#: class (``fit_per_class``) and apply them to all. TAP, LSP, OPS and AR run at the quick presets.
#: Measured wall_s: bench/README.md (generation, reproduce).
CPU_FULL_METHOD_OPTIONS = (("bait", (("fit_per_class", 500),)),
                           ("emn", (("eval_limit", 2000),)),
                           ("rem", (("train_steps", 1200),)),
                           ("ssc", (("fit_per_class", 500),)))

CPU_CIFAR100_METHOD_OPTIONS = tuple((m, (("fit_per_class", 125),)) if m in ("bait", "ssc") else (m, o)
                                    for m, o in CPU_FULL_METHOD_OPTIONS)


def cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX): there bf16 autocast made the fast victim
    2.65x faster than fp32; on an AVX2-only EPYC it made it 7-10x slower (docs/bench/victim.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


#: What the two ``cpu-full`` tasks share: all images of their classes, the fast victim and prior; bf16 where
#: the CPU has it natively, else fp32 (the precision is part of the cache key: the numerics differ).
CPU_FULL: dict[str, Any] = dict(method_options=CPU_FULL_METHOD_OPTIONS,
    train_per_class=5000, test_per_class=1000, prior_per_class=5000, prior_epochs=10, epochs=10, budget="quick",
    scratch_arch="fastvgg_cifar", prior_arch="fastvgg_cifar", batch_size=1024, recipe="fast", prior_recipe="fast",
    precision="bf16" if cpu_bf16() else "fp32", defenses=("none", "staged", "gray", "jpeg", "at"), defended=ROWS,
    surrogate_arch="resnet20_cifar")

SCALES = {
    # Minutes on an idle 2-core CPU: 60 training images per class, small budgets, 4 victim epochs.
    "quick": Scale("quick", train_per_class=60, test_per_class=60, prior_per_class=200, prior_epochs=6, epochs=4,
                   budget="quick", scratch_arch="resnet18_cifar_slim", batch_size=32,
                   method_options=(("bait", (("iterations", 6), ("outer_batches", 2))),
                                   ("emn", (("max_rounds", 4),)),
                                   ("rem", (("train_steps", 40),)),
                                   ("ssc", (("max_rounds", 3), ("pca_images", 128))),
                                   ("tap", (("steps", 10), ("train_epochs", 4)))),
                   paradigms=("scratch", "finetune"), defenses=("none", "staged"), defended=("clean", "emn")),
    # Enough data and epochs on a 2-core CPU for the clean victim to learn (the quick scale's 28.7 % is
    # barely above chance, so no protection can show there): 500 training images per class, 15 epochs;
    # scratch and finetune; about an hour idle for the default rows.
    "cpu": Scale("cpu", train_per_class=500, test_per_class=100, prior_per_class=1000, prior_epochs=10, epochs=15,
                 budget="quick", scratch_arch="resnet18_cifar_slim", batch_size=64, prior_lr=0.01,
                 method_options=(("bait", (("iterations", 15),)),
                                 ("rem", (("train_steps", 150),))),
                 paradigms=("scratch", "finetune"), defenses=("none", "staged", "gray", "jpeg"),
                 defended=("clean", "emn")),
    # The papers' protocol on this 2-core CPU, task 1: from scratch on all of CIFAR-10 (10 classes, 50,000 /
    # 10,000 images) with the fast victim (fastvgg_cifar, verify's ``fast`` recipe, 10 epochs, bf16 where native),
    # beside the published numbers. Methods generate for all 50,000 images at the ``quick`` budget with a
    # ResNet-20 surrogate (CPU_FULL_METHOD_OPTIONS); SSC and BAIT protect against the prior below.
    "cpu-full": Scale("cpu-full", **CPU_FULL, task_classes=tuple(range(10)), paradigms=("scratch",)),
    # Task 2: the prior paradigms on the 5 + 5 split — all 25,000 task images; the disjoint prior is
    # fastvgg_cifar trained with the fast recipe on all 25,000 images of the other five classes.
    "cpu-full-prior": Scale("cpu-full-prior", **CPU_FULL, prior_lr=0.15, paradigms=("finetune", "frozen", "linear")),
    # The held-out check (a data set ueguard was never tuned on): the prior paradigms on CIFAR-100's 20-class
    # cut (10,000 training / 2,000 test images, chance 5 %) from the same disjoint CIFAR-10 prior as
    # cpu-full-prior; SSC and BAIT fit their rows on 125 images per class (2,500, as cpu-full-prior does).
    "cpu-cifar100-prior": Scale("cpu-cifar100-prior", **{
        **CPU_FULL, "train_per_class": 500, "test_per_class": 100, "batch_size": 512, "defenses": ("none", "classmean"),
        "method_options": CPU_CIFAR100_METHOD_OPTIONS}, task_data="cifar100", task_classes=tuple(CIFAR100_CLASSES),
        prior_lr=0.15, paradigms=("finetune", "frozen", "linear")),
    # The authors' protocol on the task's five classes: all 25,000 training images, 60 epochs; for a GPU.
    "full": Scale("full", train_per_class=5000, test_per_class=1000, prior_per_class=5000, prior_epochs=60,
                  epochs=60, budget="thorough", scratch_arch="resnet18_cifar", defended=ROWS),
}
