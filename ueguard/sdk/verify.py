"""``verify``: does the protection hold? Train real classifiers on the protected images (and, for the
baseline, on the originals), test them on clean images, and compare.

Verdict rule (``threshold`` τ, default 0.5): with chance level c = 1/K, the protection *holds* when the
model trained on protected data recovers at most τ of the clean model's gain over chance:

    protected  ⇔  acc_protected − c ≤ τ · (acc_clean − c)

measured on the final epoch. Without a clean baseline there is no verdict (``protected`` is ``None``);
when the clean model itself does not learn (acc_clean − c < 0.1) there is none either, and the report
says to train longer. Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import ueguard
from ueguard.data.folder import FolderListing, scan_folder
from ueguard.data.images import DEFAULT_MAX_PIXELS
from ueguard.data.working_set import WorkingSet, image_sides, load_folder_working_set, suggest_size
from ueguard.defenses import DEFENSES, PARADIGMS, create_defense, create_paradigm
from ueguard.engine.fit import FitConfig, fit
from ueguard.engine.progress import Progress
from ueguard.engine.runtime import seed_everything
from ueguard.errors import UsageError
from ueguard.methods import BUDGETS
from ueguard.sdk.options import SIZE_CAP, default_arch, given_options
from ueguard.sdk.protect import make_runtime

#: Training epochs per budget (the authors evaluate with 60).
EPOCHS = {"quick": 10, "standard": 30, "thorough": 60}
#: Minimum clean gain over chance for a verdict to be meaningful.
MIN_CLEAN_GAIN = 0.1


@dataclass(frozen=True)
class VerifyOptions:
    paradigm: str = "scratch"
    defense: str = "none"
    arch: str | None = None
    epochs: int | None = None
    budget: str = "standard"
    seed: int = 0
    weights: str | None = None
    pretrained: bool = False
    size: int | None = None
    batch_size: int = 128
    lr: float | None = None
    threshold: float = 0.5
    device: str = "auto"
    precision: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def resolve(cls, **kwargs: Any) -> "VerifyOptions":
        opts = cls(**given_options(cls, kwargs))
        try:
            paradigm = PARADIGMS.get(opts.paradigm)
            DEFENSES.get(opts.defense)
        except ValueError as error:
            raise UsageError(str(error)) from None
        if opts.budget not in BUDGETS:
            raise UsageError(f"invalid budget {opts.budget!r}; choose one of {', '.join(BUDGETS)}")
        if paradigm.needs_pretrained and not (opts.weights or opts.pretrained):
            raise UsageError(f"paradigm {opts.paradigm!r} starts from pretrained weights: pass --weights FILE or --pretrained")
        if not paradigm.needs_pretrained and (opts.weights or opts.pretrained):
            raise UsageError(f"paradigm {opts.paradigm!r} trains from random initialisation; --weights/--pretrained "
                             "are for --paradigm finetune")
        if opts.epochs is not None and opts.epochs < 1:
            raise UsageError("epochs must be ≥ 1")
        if not 0 <= opts.threshold <= 1:
            raise UsageError("threshold must be in [0, 1]")
        return opts

    @property
    def resolved_epochs(self) -> int:
        return self.epochs or EPOCHS[self.budget]


def _scan(root, role: str, classes: tuple[str, ...] | None = None) -> FolderListing:
    try:
        listing = scan_folder(root, classes=classes)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise UsageError(f"{role} folder: {error}") from None
    if not listing.classes:
        raise UsageError(f"{role} folder {root} has no class subfolders; verify needs <folder>/<class>/ images")
    return listing


def _load(listing: FolderListing, size: int, max_pixels: int, role: str,
          progress: Progress) -> tuple[WorkingSet, list[str]]:
    problems: list[str] = []
    with progress.bar(len(listing.images), f"loading {role}", unit="img") as bar:
        data, _ = load_folder_working_set(listing, listing.images, size, max_pixels=max_pixels,
                                          on_error=lambda entry, error: problems.append(str(error)),
                                          on_progress=bar.update)
    if len(data) == 0:
        raise UsageError(f"{role} folder {listing.root}: no readable images")
    return data, problems


def verdict(test_accuracy: float, clean_accuracy: float | None, chance: float, threshold: float) -> bool | None:
    """The rule in this module's docstring."""
    if clean_accuracy is None or clean_accuracy - chance < MIN_CLEAN_GAIN:
        return None
    return test_accuracy - chance <= threshold * (clean_accuracy - chance)


def verify(protected, test, clean=None, *, json_path=None, progress: Progress | bool | None = False,
           **options: Any) -> dict[str, Any]:
    """Train on ``protected`` (and ``clean``), test on ``test``; return the report (also written to
    ``json_path``). ``options``: the CLI's long options (``paradigm``, ``defense``, ``arch``, ``epochs``,
    ``budget``, ``seed``, ``weights``, ``pretrained``, ``size``, ``batch_size``, ``lr``, ``threshold``,
    ``device``, ``precision``)."""
    from ueguard import models

    opts = VerifyOptions.resolve(**options)
    reporter = progress if isinstance(progress, Progress) else Progress(progress)
    runtime = make_runtime(opts.device, opts.precision)
    protected, test = Path(protected), Path(test)

    listing = _scan(protected, "protected")
    classes = listing.classes
    test_listing = _scan(test, "test", classes)
    clean_listing = _scan(Path(clean), "clean", classes) if clean is not None else None
    size = opts.size or suggest_size(image_sides(listing, listing.images), cap=SIZE_CAP[opts.budget])
    train_p, problems = _load(listing, size, opts.max_pixels, "protected", reporter)
    test_set, test_problems = _load(test_listing, size, opts.max_pixels, "test", reporter)
    clean_set = _load(clean_listing, size, opts.max_pixels, "clean", reporter)[0] if clean_listing else None

    arch = opts.arch or default_arch(size, opts.budget)
    paradigm, defense = create_paradigm(opts.paradigm), create_defense(opts.defense)
    fit_cfg = FitConfig(epochs=opts.resolved_epochs, batch_size=opts.batch_size, lr=opts.lr or paradigm.default_lr)
    chance = 1.0 / len(classes)

    def train(data: WorkingSet, label: str) -> tuple[list[dict], float]:
        generator = seed_everything(opts.seed)  # same init and batch order for the clean and protected runs
        try:
            model = models.create_model(arch, len(classes), weights=opts.weights, pretrained=opts.pretrained)
        except (ValueError, FileNotFoundError) as error:
            raise UsageError(str(error)) from None
        started = time.perf_counter()
        history = fit(model, data, test_set, fit_cfg, defense=defense, params=paradigm.trainable(model),
                      runtime=runtime, generator=generator, progress=reporter,
                      desc=f"{label}: {opts.defense}/{opts.paradigm}")
        return history, time.perf_counter() - started

    history, seconds = train(train_p, "protected")
    clean_history, clean_seconds = train(clean_set, "clean") if clean_set is not None else (None, 0.0)
    test_accuracy = history[-1]["test_accuracy"]
    clean_accuracy = clean_history[-1]["test_accuracy"] if clean_history else None
    run = {"defense": opts.defense, "paradigm": opts.paradigm, "arch": arch, "size": size,
           "epochs": fit_cfg.epochs, "lr": fit_cfg.lr,
           "test_accuracy": test_accuracy, "peak_test_accuracy": max(h["test_accuracy"] for h in history),
           "clean_accuracy": clean_accuracy,
           "clean_peak_accuracy": max(h["test_accuracy"] for h in clean_history) if clean_history else None,
           "chance": chance, "protected": verdict(test_accuracy, clean_accuracy, chance, opts.threshold),
           "history": history, "clean_history": clean_history,
           "seconds": round(seconds, 2), "clean_seconds": round(clean_seconds, 2)}
    report = {**{k: run[k] for k in ("defense", "paradigm", "arch", "test_accuracy", "clean_accuracy", "chance",
                                     "protected", "history")},
              "rule": f"protected iff test_accuracy - chance <= {opts.threshold} * (clean_accuracy - chance); "
                      "null without a clean baseline or when the clean model does not learn",
              "runs": [run], "worst": {k: run[k] for k in ("defense", "paradigm", "test_accuracy")},
              "classes": list(classes),
              "data": {"protected": str(protected), "test": str(test), "clean": None if clean is None else str(clean),
                       "train_images": len(train_p), "test_images": len(test_set),
                       "unreadable": problems + test_problems},
              "config": dataclasses.asdict(opts) | {"epochs": fit_cfg.epochs, "size": size},
              "ueguard_version": ueguard.__version__, "torch_version": torch.__version__,
              "device": str(runtime.device), "precision": runtime.precision}
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report
