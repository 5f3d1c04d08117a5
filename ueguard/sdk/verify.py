"""``verify``: does the protection hold? A red team: train real classifiers on the protected images under
every selected defense and training paradigm (and, for the baseline, on the originals under each
paradigm), test them on clean images, and take the worst case.

Verdict rule (``threshold`` τ, default 0.5): with chance level c = 1/K, one run's protection *holds* when
the model trained on protected data recovers at most τ of the clean model's gain over chance:

    protected  ⇔  acc_protected − c ≤ τ · (acc_clean − c)

acc_protected is the run's reported test accuracy (the final epoch; the best-validation epoch for
``earlystop``), acc_clean the final test accuracy of clean data trained under the same paradigm with
standard training. The battery's verdict is the worst case: not protected as soon as one run breaks it.
Without a clean baseline there is no verdict (``protected`` is ``None``); when the clean model itself
does not learn (acc_clean − c < 0.1) there is none either. Before giving up, verify chooses the clean recipe
as a competent adversary would (:mod:`ueguard.sdk.recipe_search`: a small, bounded search of learning rate and
epochs on a held-out split of the clean *training* images) and trains the protected images with the recipe it
chose; when no recipe learns, the report says what to try.
A protected run that *stalled* cannot count as protected either: its last epoch's training accuracy (on
the batches the defense trained on: adversarial ones under ``at``) at or below chance with its training
loss still at least 0.98 · ln K, the constant predictor's. Such a run never learned its own objective —
the defense's recipe failed on this model (adversarial training of a small, non-robust prior can fall to
the uniform predictor, clean data included) — so a low test accuracy is no evidence of protection: the
run has no verdict. A stalled run that reaches the clean model's accuracy all the same still breaks it.
Accuracies are fractions in [0, 1]. ``worst`` names the run with the highest protected-trained test
accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import ueguard
from ueguard.data.folder import FolderListing, scan_folder
from ueguard.data.images import DEFAULT_MAX_PIXELS
from ueguard.data.loaders import LOADERS, StreamedSet, load_working_set, require_ffcv, resolve_loader
from ueguard.data.working_set import WorkingSet, image_sides, suggest_size
from ueguard.defenses import DEFENSES, PARADIGMS, create_paradigm, defense_names, paradigm_names
from ueguard.engine.fit import can_stream, fit
from ueguard.engine.progress import Progress
from ueguard.engine.recipes import RECIPES, create_recipe
from ueguard.engine.runtime import seed_everything
from ueguard.errors import UsageError
from ueguard.budgets import BUDGETS, VERIFY_EPOCHS
from ueguard.sdk.holdout import hold_out_test, holdout_record, holdout_share, leave_out, sample_stem, stratified_indices
from ueguard.engine.runtime import COMPILES, DEVICES, PRECISIONS
from ueguard.budgets import SIZE_CAP, default_arch
from ueguard.sdk.params import call_options, check_values, param, takes_options
from ueguard.sdk.recipe_search import MODES as SEARCH_MODES, SEARCH_FRACTION, Candidate, advice, search
from ueguard.sdk.protect import make_runtime

#: Training epochs per budget (the authors evaluate with 60).
EPOCHS = VERIFY_EPOCHS
#: Minimum clean gain over chance for a verdict to be meaningful.
MIN_CLEAN_GAIN = 0.1
#: A run whose last training loss is still this share of ln K (at no better than chance) has stalled.
STALL_LOSS_SHARE = 0.98


@dataclass(frozen=True)
class VerifyOptions:
    """Resolved settings of a ``verify`` run: the SDK's keywords and the CLI's long options, each declared
    once below with what it means (:mod:`ueguard.sdk.params`).

    ``defense`` and ``paradigm`` are one name, a comma list, or ``all`` (the battery). ``defense_options``
    are defense constants as ``(key, value)`` pairs: ``staged.tau`` for one defense, or a bare ``tau``
    for every selected defense that has it.

    Paradigms that start from pretrained weights (finetune, frozen, linear) need ``weights`` or
    ``pretrained``: named explicitly without them they are a usage error; under ``all`` they are
    skipped, and the report says why. The same holds for ``earlystop`` without ``--clean``.

    ``recipe`` names the training recipe (:mod:`ueguard.engine.recipes`); ``None`` means the architecture's
    default (``fast`` for ``fastvgg_cifar``, ``standard`` otherwise). ``epochs``, ``batch_size`` and ``lr``
    given explicitly override the recipe's. ``recipe_search`` (``auto`` or ``off``): whether a paradigm whose
    clean baseline does not learn under the default recipe gets a recipe search (:mod:`ueguard.sdk.recipe_search`;
    never when ``lr`` or ``epochs`` is given).
    """

    paradigm: str = param("scratch", "scratch | finetune | frozen | linear, a comma list, or all (see `ueguard "
                          "defenses`).")
    defense: str = param("none", "Training-time defense, a comma list, or all: the battery (see `ueguard defenses`).")
    defense_options: tuple[tuple[str, Any], ...] = param(
        (), "Defense constants, e.g. {'staged.tau': 0.5} for one defense or {'quality': 20} for every selected "
        "defense that has it (CLI: -d staged.tau=0.5, repeatable).", pairs=True, flags=("-d", "--defense-option"),
        metavar="[DEFENSE.]KEY=VALUE")
    arch: str | None = param(None, "Victim architecture (default: CIFAR ResNet-18 up to 64 px, timm resnet18 above).")
    epochs: int | None = param(None, "Training epochs (default: the recipe's, else per budget: 10 / 30 / 60).", low=1)
    budget: str = param("standard", "Training-length preset and working-size cap.", choices=BUDGETS)
    seed: int = param(0, "Seeds initialisation, batch order, augmentation and the held-out split.",
                      low=-(2**63), high=2**64 - 1)
    weights: str | None = param(None, "Pretrained checkpoint for finetune/frozen/linear.", path="file")
    pretrained: bool = param(False, "Pretrained weights from the timm hub for finetune/frozen/linear.")
    size: int | None = param(None, "Training resolution in px (default: suited to the images).", low=8, high=1024)
    batch_size: int | None = param(None, "Training batch size (default: the recipe's; 128 standard, 1024 fast).",
                                   low=1)
    lr: float | None = param(None, "Peak learning rate (default: the recipe's; standard: 0.1 scratch, 1e-3 "
                             "finetune).", low=0, open_range=True)
    recipe: str | None = param(None, "Training recipe: standard | fast (default: the architecture's; fast for "
                               "fastvgg_cifar). See docs/victim.md.")
    threshold: float = param(0.5, "Verdict: protected iff acc - chance <= threshold * (clean acc - chance).",
                             low=0, high=1)
    device: str = param("auto", "Where to train (auto: a GPU when there is one).", choices=DEVICES)
    precision: str = param("auto", "Autocast precision (auto: bf16 on GPUs, fp32 on CPU).", choices=PRECISIONS)
    compile: str = param("auto", "torch.compile the training steps (auto: on for CUDA, off on CPU, where it "
                         "measured no faster).", choices=COMPILES)
    max_pixels: int = param(DEFAULT_MAX_PIXELS, "Refuse images above this many pixels (decompression bombs).", low=1)
    resume: bool = param(False, "Continue an interrupted battery at the run it stopped in.")
    loader: str = param("auto", "How training images are read: memory (one tensor on the device), ffcv (streamed "
                        "from a cached FFCV file; optional extra), torch (streamed by a DataLoader); auto: memory "
                        "when it fits.", choices=LOADERS)
    cache_dir: str | None = param(None, "Where the FFCV cache lives (default: $UEGUARD_CACHE or ~/.cache/ueguard).",
                                  path="dir")
    holdout: float | None = param(None, "Without test: hold out this stratified share of clean (default 0.2, at "
                                  "least one per class, seeded by seed) as the test set, left out of both training "
                                  "sets.", low=0, high=1, open_range=True, metavar="FRACTION")
    recipe_search: str = param("auto", "When the clean model does not learn under the default recipe, choose the "
                               "learning rate and epochs on a held-out split of the clean training images and train "
                               "both with them (auto; never with lr or epochs). See docs/verify.md.",
                               choices=SEARCH_MODES)

    @classmethod
    def resolve(cls, **kwargs: Any) -> "VerifyOptions":
        opts = cls(**check_values(cls, kwargs))
        if opts.loader == "ffcv":
            require_ffcv()
        paradigms, defenses = opts.paradigms, opts.defenses  # validates the names
        pretrained = opts.weights is not None or opts.pretrained
        if opts.weights is not None and opts.pretrained:
            raise UsageError("give either --weights FILE or --pretrained, not both")
        if opts.paradigm != "all":
            for name in paradigms:
                if PARADIGMS.get(name).needs_pretrained and not pretrained:
                    raise UsageError(f"paradigm {name!r} starts from pretrained weights: pass --weights FILE or "
                                     "--pretrained (or use --paradigm all, which skips it without weights)")
        if pretrained and not any(PARADIGMS.get(p).needs_pretrained for p in paradigms):
            raise UsageError(f"paradigm {opts.paradigm!r} trains from random initialisation; --weights/--pretrained "
                             "are for --paradigm finetune, frozen, linear or all")
        if opts.recipe is not None and opts.recipe not in RECIPES:
            try:
                RECIPES.get(opts.recipe)
            except ValueError as error:
                raise UsageError(f"--recipe: {error}") from None
        for name in defenses:  # builds every config once, so a bad option fails before any training
            opts.defense_config(name)
        opts._check_option_keys(defenses)
        return opts

    @property
    def paradigms(self) -> list[str]:
        return _names(self.paradigm, PARADIGMS, paradigm_names(), "paradigm")

    @property
    def defenses(self) -> list[str]:
        return _names(self.defense, DEFENSES, defense_names(), "defense")

    def resolved_epochs(self, recipe=None) -> int:
        """--epochs, else the recipe's own, else the budget's."""
        return self.epochs or (recipe.epochs if recipe is not None else None) or EPOCHS[self.budget]

    def defense_overrides(self, name: str) -> dict[str, Any]:
        fields = {f.name for f in dataclasses.fields(DEFENSES.get(name).config_class)}
        out = {}
        for key, value in self.defense_options:
            target, dot, field = key.rpartition(".")
            if (dot and DEFENSES.get(target).name == DEFENSES.get(name).name) or (not dot and field in fields):
                out[field] = value
        return out

    def defense_config(self, name: str):
        try:
            return DEFENSES.get(name).make_config(self.budget, **self.defense_overrides(name))
        except (TypeError, ValueError) as error:
            raise UsageError(f"--defense-option for {name!r}: {error}") from None

    def _check_option_keys(self, defenses: list[str]) -> None:
        for key, _ in self.defense_options:
            target, dot, field = key.rpartition(".")
            if dot:
                try:
                    cls = DEFENSES.get(target)
                except ValueError as error:
                    raise UsageError(f"--defense-option {key}: {error}") from None
                if cls.name not in {DEFENSES.get(d).name for d in defenses}:
                    raise UsageError(f"--defense-option {key}: defense {target!r} is not selected by --defense "
                                     f"{self.defense}")
                if field not in {f.name for f in dataclasses.fields(cls.config_class)}:
                    self.defense_config(target)  # raises, listing the valid options
            elif not any(field in {f.name for f in dataclasses.fields(DEFENSES.get(d).config_class)} for d in defenses):
                raise UsageError(f"--defense-option {key}: none of the selected defenses ({', '.join(defenses)}) has "
                                 f"an option {field!r}; see `ueguard defenses`")


def _names(text: str, registry, all_names: list[str], kind: str) -> list[str]:
    """``all`` → every canonical name; ``a,b`` → those, validated (aliases resolved), duplicates dropped."""
    if text.strip() == "all":
        return list(all_names)
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise UsageError(f"--{kind} {text!r}: empty name in the comma list")
        try:
            name = registry.get(part).name
        except ValueError as error:
            raise UsageError(str(error)) from None
        if name not in out:
            out.append(name)
    return out


def _scan(root, role: str, classes: tuple[str, ...] | None = None) -> FolderListing:
    try:
        listing = scan_folder(root, classes=classes)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise UsageError(f"{role} folder: {error}") from None
    if not listing.classes:
        raise UsageError(f"{role} folder {root} has no class subfolders; verify needs <folder>/<class>/ images")
    return listing


def _load(listing: FolderListing, size: int, max_pixels: int, role: str,
          progress: Progress, loader: str = "memory", cache_dir=None) -> tuple[WorkingSet, list[str]]:
    problems: list[str] = []
    with progress.bar(len(listing.images), f"loading {role}", unit="image") as bar:
        data, _ = load_working_set(listing, listing.images, size, loader, max_pixels=max_pixels, cache_dir=cache_dir,
                                   on_error=lambda entry, error: problems.append(str(error)), on_progress=bar.update)
    if len(data) == 0:
        raise UsageError(f"{role} folder {listing.root}: no readable images")
    return data, problems


def _training_set(listing: FolderListing, size: int, opts: VerifyOptions, loader: str, role: str,
                  progress: Progress) -> tuple[WorkingSet | StreamedSet, list[str]]:
    """A training folder as a working set (``memory``) or a :class:`StreamedSet` (``torch``, ``ffcv``)."""
    if loader == "memory":
        return _load(listing, size, opts.max_pixels, role, progress)
    data = StreamedSet(listing, listing.images, size, loader, max_pixels=opts.max_pixels, cache_dir=opts.cache_dir)
    if len(data) == 0:
        raise UsageError(f"{role} folder {listing.root}: no readable images")
    return data, data.problems  # the torch loader finds unreadable files while training: filled in then


def _in_memory(data: WorkingSet | StreamedSet | None, opts: VerifyOptions, progress: Progress) -> WorkingSet | None:
    """A streamed training set loaded whole, through its own loader (FFCV: from the cache it already has)."""
    if not isinstance(data, StreamedSet):
        return data
    if data.held is None:
        data.held = _load(data.listing, data.size, opts.max_pixels, "training set", progress, data.loader,
                          opts.cache_dir)[0]
    return data.held


def verdict(test_accuracy: float, clean_accuracy: float | None, chance: float, threshold: float,
            stalled: bool = False) -> bool | None:
    """The rule in this module's docstring (``stalled``: the run's, from :func:`stalled`)."""
    if clean_accuracy is None or not learned(clean_accuracy, chance):
        return None
    held = test_accuracy - chance <= threshold * (clean_accuracy - chance)
    return None if held and stalled else held


def learned(accuracy: float, chance: float) -> bool:
    """Whether a clean model learned enough for a verdict: its accuracy at least ``MIN_CLEAN_GAIN`` over chance."""
    return accuracy - chance >= MIN_CLEAN_GAIN


def stalled(history: list[dict], chance: float) -> bool:
    """Whether a run never left the constant predictor: the module docstring's stall rule, on the last epoch."""
    last = [h for h in history if h["epoch"] >= 1][-1]
    return last["train_accuracy"] <= chance and last["train_loss"] >= STALL_LOSS_SHARE * math.log(1 / chance)


def combine_verdicts(verdicts: list[bool | None]) -> bool | None:
    """The battery's verdict is its worst case: not protected if any run broke the protection; otherwise
    no verdict if any run had none; protected only if every run held."""
    if any(v is False for v in verdicts):
        return False
    if not verdicts or any(v is None for v in verdicts):
        return None
    return True


def validation_split(clean: WorkingSet, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a stratified ``fraction`` of ``clean`` (at least one per class with two or more images)."""
    return stratified_indices(clean.labels, fraction, seed)


class RunStore:
    """Per-run checkpoints of a battery: one JSON record per finished run, so an interrupted battery
    resumes at the run it stopped in. The folder is ueguard's (marked); a folder without the marker is
    never written to. A resumed battery must have the same settings (``config.json``)."""

    MARKER = ".ueguard-verify-state"

    def __init__(self, root: Path | None, fingerprint: dict[str, Any], resume: bool) -> None:
        self.root = root
        if root is None:
            if resume:
                raise UsageError("--resume needs a place for per-run checkpoints: pass --json FILE or --report DIR "
                                 "(the same as in the interrupted run)")
            return
        if root.exists() and any(root.iterdir()) and not (root / self.MARKER).exists():
            raise UsageError(f"{root} exists and was not made by `ueguard verify`; remove it or choose another "
                             "--json/--report location")
        config = root / "config.json"
        if resume:
            if not config.exists():
                raise UsageError(f"--resume: no checkpoints at {root}; run without --resume to start")
            before = json.loads(config.read_text())
            changed = sorted(k for k in set(before) | set(fingerprint) if before.get(k) != fingerprint.get(k))
            if changed:
                raise UsageError(f"--resume: the settings differ from the interrupted run ({', '.join(changed)}); "
                                 "rerun with the same options, or without --resume to start over")
        else:
            for old in root.glob("run-*.json") if root.exists() else ():
                old.unlink()  # our own records of an earlier battery (the folder carries our marker)
        root.mkdir(parents=True, exist_ok=True)
        (root / self.MARKER).write_text("per-run checkpoints of `ueguard verify`; safe to delete\n")
        _write_json(config, fingerprint)

    def _path(self, key: str) -> Path:
        return self.root / f"run-{key}.json"

    def load(self, key: str) -> dict | None:
        if self.root is None or not self._path(key).exists():
            return None
        return json.loads(self._path(key).read_text())

    def save(self, key: str, record: dict) -> None:
        if self.root is not None:
            _write_json(self._path(key), record)


def _write_json(path: Path, obj: Any) -> None:
    """Atomic: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


@takes_options(VerifyOptions, own=("protected", "test", "clean", "json_path", "report_dir"))
def verify(protected: str | os.PathLike, test: str | os.PathLike | None = None, clean: str | os.PathLike | None = None,
           *, paradigm: str = "scratch", defense: str = "none",
           defense_options: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), arch: str | None = None,
           epochs: int | None = None, budget: str = "standard", seed: int = 0,
           weights: str | os.PathLike | None = None, pretrained: bool = False, size: int | None = None,
           batch_size: int | None = None, lr: float | None = None, recipe: str | None = None, threshold: float = 0.5,
           device: str = "auto", precision: str = "auto", compile: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS,
           resume: bool = False, loader: str = "auto", cache_dir: str | os.PathLike | None = None,
           holdout: float | None = None, recipe_search: str = "auto", json_path: str | os.PathLike | None = None,
           report_dir: str | os.PathLike | None = None, progress: Progress | bool | None = False,
           on_run_done: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train on ``protected`` (and ``clean``, the originals) under every selected (defense, paradigm), test
    on ``test``, and return the report (also written to ``json_path``; ``report_dir`` gets a Markdown
    summary and plots). ``on_run_done(record)`` is called after every finished (or resumed) run;
    ``progress``: ``True`` shows the stage, run, epoch and ETA on stderr, ``None`` only on a terminal.
    Without ``test``, ``holdout`` (default 0.2) of ``clean`` is held out as the test set and left out of
    both training sets (:mod:`ueguard.sdk.holdout`); the report lists those files under ``data.holdout``.

    Per-run checkpoints go to ``<json_path>.state/`` (or ``<report_dir>/state/``); ``resume=True``
    continues an interrupted battery at the run it stopped in (that run starts over).

    Stages: plan the runs (:func:`_select_runs`) → load the data and resolve the recipe (:func:`_plan`) →
    train each run and judge it (:func:`_run_battery`; per paradigm the clean baseline first, its recipe
    chosen by :func:`_choose_recipe` when the default does not learn) → assemble the report
    (:func:`_assemble_report`)."""
    opts = VerifyOptions.resolve(**call_options(VerifyOptions, locals()))
    reporter = progress if isinstance(progress, Progress) else Progress(progress, name="verify")
    plan = _plan(Path(protected), test, clean, opts, reporter, json_path, report_dir)
    runs, baselines = _run_battery(plan, opts, reporter, on_run_done)
    report = _assemble_report(plan, opts, runs, baselines)
    if json_path is not None:
        _write_json(Path(json_path), report)
    if report_dir is not None:
        from ueguard.sdk.report import write_report_dir

        write_report_dir(report, Path(report_dir))
    return report


@dataclass
class _VerifyPlan:
    """What a verify battery trains on and how: resolved before the first run."""

    runtime: Any
    paradigms: list[str]
    defenses: list[str]
    skipped: list[dict[str, str]]
    classes: tuple[str, ...]
    train_p: Any
    test_set: WorkingSet
    clean_set: Any
    problems: list
    size: int
    arch: str
    recipe: Any
    chance: float
    epochs: int
    data_info: dict[str, Any]
    config: dict[str, Any]
    store: "RunStore"
    #: The recipe each paradigm trains with when the search chose one (absent: the default).
    tuned: dict[str, Candidate] = dataclasses.field(default_factory=dict)


def _select_runs(opts: VerifyOptions, clean) -> tuple[list[str], list[str], list[dict[str, str]]]:
    """The paradigms and defenses that can run, and the (defense, paradigm) pairs skipped with the reason:
    pretrained paradigms without weights, and validation defenses without ``--clean`` (under ``all``)."""
    pretrained = opts.weights is not None or opts.pretrained
    skipped: list[dict[str, str]] = []
    paradigms = []
    for name in opts.paradigms:
        if PARADIGMS.get(name).needs_pretrained and not pretrained:
            skipped.append({"paradigm": name, "defense": "*",
                            "reason": "starts from pretrained weights; pass --weights FILE or --pretrained"})
        else:
            paradigms.append(name)
    defenses = []
    for name in opts.defenses:
        if DEFENSES.get(name).needs_validation and clean is None:
            if opts.defense != "all":
                raise UsageError(f"defense {name!r} holds out a clean validation split of --clean: pass --clean")
            skipped.append({"paradigm": "*", "defense": name,
                            "reason": "needs a clean validation split: pass --clean"})
        else:
            defenses.append(name)
    return paradigms, defenses, skipped


def _plan(protected: Path, test, clean, opts: VerifyOptions, reporter: Progress, json_path, report_dir) -> _VerifyPlan:
    """Scan and load the folders (the test set held out of ``clean`` without ``test``), resolve the size,
    architecture, recipe and epochs, and open the per-run checkpoint store."""
    from ueguard import models

    holdout = holdout_share(test, clean, opts.holdout)
    runtime = make_runtime(opts.device, opts.precision, opts.compile)
    paradigms, defenses, skipped = _select_runs(opts, clean)
    listing = _scan(protected, "protected")
    classes = listing.classes
    clean_listing = _scan(Path(clean), "clean", classes) if clean is not None else None
    listing, clean_listing, test_listing, held_out = _test_split(listing, clean_listing, test, holdout, opts.seed,
                                                                 reporter)
    size = opts.size or suggest_size(image_sides(listing, listing.images), cap=SIZE_CAP[opts.budget])
    loader = resolve_loader(opts.loader, len(listing.images) + (len(clean_listing.images) if clean_listing else 0),
                            size, runtime.device)
    # Training sets stream through a streaming loader; the test set, evaluated every epoch, is held.
    train_p, problems = _training_set(listing, size, opts, loader, "protected", reporter)
    test_set, test_problems = _load(test_listing, size, opts.max_pixels, "test", reporter, loader, opts.cache_dir)
    clean_set = _training_set(clean_listing, size, opts, loader, "clean", reporter)[0] if clean_listing else None
    arch = opts.arch or default_arch(size, opts.budget)
    recipe = create_recipe(opts.recipe or models.default_recipe(arch))
    epochs = opts.resolved_epochs(recipe)
    data_info = {"protected": str(protected), "test": None if test is None else str(test),
                 "clean": None if clean is None else str(clean), "holdout": held_out,
                 "train_images": len(train_p), "test_images": len(test_set)}
    config = dataclasses.asdict(opts) | {"epochs": epochs, "size": size, "arch": arch, "recipe": recipe.name,
                                         "batch_size": opts.batch_size or recipe.batch_size,
                                         "defense_options": dict(opts.defense_options), "resolved_loader": loader}
    fingerprint = {k: v for k, v in config.items()
                   if k not in ("resume", "device", "precision", "compile", "loader", "cache_dir", "resolved_loader")}
    state_root = (Path(str(json_path) + ".state") if json_path is not None
                  else Path(report_dir) / "state" if report_dir is not None else None)
    store = RunStore(state_root, fingerprint | {"data": data_info}, opts.resume)
    return _VerifyPlan(runtime, paradigms, defenses, skipped, classes, train_p, test_set, clean_set,
                       problems + test_problems, size, arch, recipe, 1.0 / len(classes), epochs, data_info, config, store)


def _train(plan: _VerifyPlan, opts: VerifyOptions, reporter: Progress, data, defense_name: str, paradigm_name: str,
           label: str, validation: WorkingSet | None = None, *, candidate: Candidate | None = None,
           test: WorkingSet | None = None) -> dict[str, Any]:
    """One training run (same seed, init and batch order for the clean and the protected data) and its record:
    with the paradigm's chosen recipe (``plan.tuned``) or ``candidate`` when given, tested on ``test`` (a
    recipe search's validation split) instead of the test set when given."""
    from ueguard import models

    paradigm = create_paradigm(paradigm_name)
    defense = DEFENSES.get(defense_name)(opts.defense_config(defense_name))
    chosen_recipe = candidate or plan.tuned.get(paradigm_name)
    fit_cfg = (plan.recipe.fit_config(plan.epochs, opts.batch_size, opts.lr, paradigm_lr=paradigm.default_lr)
               if chosen_recipe is None else plan.recipe.fit_config(chosen_recipe.epochs, opts.batch_size,
                                                                    chosen_recipe.lr))
    generator = seed_everything(opts.seed)
    try:
        model = models.create_model(plan.arch, len(plan.classes),
                                    weights=opts.weights if paradigm.needs_pretrained else None,
                                    pretrained=opts.pretrained and paradigm.needs_pretrained)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    if isinstance(data, StreamedSet) and not can_stream(defense):
        data = _in_memory(data, opts, reporter)  # this defense needs the whole set at once
    started = time.perf_counter()
    try:
        history = fit(model, data, plan.test_set if test is None else test, fit_cfg, defense=defense,
                      paradigm=paradigm, runtime=plan.runtime, generator=generator, validation=validation,
                      progress=reporter, desc="training" if test is None else label, recipe=plan.recipe)
    except ValueError as error:  # a paradigm or defense that does not fit the architecture
        raise UsageError(f"{defense_name}/{paradigm_name} with {plan.arch}: {error}") from None
    trained = [h for h in history if h["epoch"] >= 1]
    chosen = trained[defense.selected_epoch(trained)]
    return {"defense": defense_name, "paradigm": paradigm_name, "arch": plan.arch, "size": plan.size,
            "epochs": fit_cfg.epochs, "lr": fit_cfg.lr, "batch_size": fit_cfg.batch_size, "recipe": plan.recipe.describe(),
            "test_accuracy": chosen["test_accuracy"], "selected_epoch": chosen["epoch"],
            "final_test_accuracy": trained[-1]["test_accuracy"],
            "peak_test_accuracy": max(h["test_accuracy"] for h in trained),
            "train_images": len(data), "defense_config": dataclasses.asdict(defense.config),
            "history": history, **defense.summary(), "seconds": round(time.perf_counter() - started, 2)}


def _run_battery(plan: _VerifyPlan, opts: VerifyOptions, reporter: Progress,
                 on_run_done: Callable[[dict], None] | None) -> tuple[list[dict], dict[str, dict]]:
    """Every run of the plan — per paradigm the clean baseline first, then each defense on the protected
    data — trained or resumed from its checkpoint, each protected run judged against its baseline."""
    steps = [step for p in plan.paradigms
             for step in ([("clean", "none", p)] if plan.clean_set is not None else [])
             + [("protected", d, p) for d in plan.defenses]]
    baselines: dict[str, dict] = {}
    runs: list[dict] = []
    for number, (kind, defense_name, paradigm_name) in enumerate(steps, 1):
        key = f"{kind}-{defense_name}-{paradigm_name}"
        record = plan.store.load(key)
        if record is not None:
            with reporter.step(number, len(steps), f"{kind} {defense_name}/{paradigm_name}: resumed from checkpoint"):
                record["resumed"] = True
        else:
            with reporter.step(number, len(steps), f"{kind} {defense_name}/{paradigm_name}", show_eta=True):
                data, validation = (plan.clean_set if kind == "clean" else plan.train_p), None
                if kind == "protected" and DEFENSES.get(defense_name).needs_validation:
                    held = [_in_memory(d, opts, reporter) for d in (plan.train_p, plan.clean_set)]  # by sample id
                    data, validation = _hold_out(*held, opts.defense_config(defense_name).val_fraction, opts.seed)
                record = _train(plan, opts, reporter, data, defense_name, paradigm_name, kind, validation)
            record["kind"] = kind
            plan.store.save(key, record)
            record["resumed"] = False
        if kind == "clean":
            record = _choose_recipe(plan, opts, reporter, record, paradigm_name)
            baselines[paradigm_name] = record
        else:
            runs.append(_judge(record, baselines.get(paradigm_name), plan.chance, opts.threshold))
        if on_run_done is not None:
            on_run_done(record)
    return runs, baselines


def _choose_recipe(plan: _VerifyPlan, opts: VerifyOptions, reporter: Progress, record: dict,
                   paradigm_name: str) -> dict:
    """The paradigm's clean baseline once its recipe is chosen (:mod:`ueguard.sdk.recipe_search`): ``record``,
    the default recipe's run, when it learned or no search applies; otherwise the search (checkpointed as one
    step) and, when it chose a recipe, the clean run with it, which the protected runs then share. The
    baseline carries ``recipe_search``: what was done and why, and what to try when the clean model did not
    learn."""
    default = {"lr": record["lr"], "epochs": record["epochs"], "test_accuracy": record["test_accuracy"]}
    status = ("default" if learned(record["test_accuracy"], plan.chance) else "off" if opts.recipe_search == "off"
              else "given" if opts.lr is not None or opts.epochs is not None else None)
    info: dict[str, Any] = {"status": status, "default": default}
    if status is None:
        key = f"search-{paradigm_name}"
        saved = plan.store.load(key)
        if saved is None:
            saved = _search_recipe(plan, opts, reporter, paradigm_name, default)
            plan.store.save(key, saved)
        elif saved["baseline"] is not None:
            saved["baseline"]["resumed"] = True
        info = saved["search"] | {"default": default}
        if info["chosen"] is not None:
            plan.tuned[paradigm_name] = Candidate(**info["chosen"])
            record = saved["baseline"]
    if not learned(record["test_accuracy"], plan.chance):
        info["advice"] = advice(record["train_images"], len(plan.classes), plan.size,
                                PARADIGMS.get(paradigm_name).needs_pretrained, opts.budget)
    record["recipe_search"] = info
    return record


def _search_recipe(plan: _VerifyPlan, opts: VerifyOptions, reporter: Progress, paradigm_name: str,
                   default: dict) -> dict[str, Any]:
    """The search on a seeded, stratified split of the clean training images (never the test set), and the
    clean run with the recipe it chose on the full clean training set (``None`` when none learned)."""
    clean = _in_memory(plan.clean_set, opts, reporter)
    val_idx = validation_split(clean, SEARCH_FRACTION, opts.seed)
    split = {"fraction": SEARCH_FRACTION, "seed": opts.seed, "val_images": len(val_idx),
             "train_images": len(clean) - len(val_idx)}
    if len(val_idx) == 0 or len(val_idx) == len(clean):
        return {"search": {"status": "too few images", "split": split, "tried": [], "chosen": None}, "baseline": None}
    held = set(val_idx.tolist())
    train, val = clean.subset([i for i in range(len(clean)) if i not in held]), clean.subset(val_idx)
    reporter.log(f"recipe search ({paradigm_name}): the default recipe (lr {default['lr']:g}, {default['epochs']} "
                 f"epochs) did not learn; trying others on {len(train)} clean training images, scored on "
                 f"{len(val)} held out of them")

    def trial(candidate: Candidate) -> float:
        run = _train(plan, opts, reporter, train, "none", paradigm_name, "recipe search", candidate=candidate,
                     test=val)
        return run["test_accuracy"]

    def said(t: dict) -> None:
        reporter.log(f"  lr {t['lr']:g}, {t['epochs']} epochs: {100 * t['val_accuracy']:.1f} % held out"
                     + (" (learned)" if t["learned"] else ""))

    ceiling = plan.recipe.lr  # the recipe's from-scratch rate
    found = search(trial, default["lr"], default["epochs"], ceiling, lambda a: learned(a, plan.chance), said)
    found |= {"status": "searched" if found["chosen"] else "none learned", "split": split}
    if found["chosen"] is None:
        return {"search": found, "baseline": None}
    reporter.log(f"recipe search ({paradigm_name}): chose lr {found['chosen']['lr']:g}, "
                 f"{found['chosen']['epochs']} epochs; training the clean baseline with it")
    baseline = _train(plan, opts, reporter, plan.clean_set, "none", paradigm_name, "clean",
                      candidate=Candidate(**found["chosen"]))
    return {"search": found, "baseline": baseline | {"kind": "clean", "resumed": False}}


def _judge(record: dict, base: dict | None, chance: float, threshold: float) -> dict:
    """A protected run's record with its clean baseline beside it, whether it stalled, and its verdict."""
    record.update(clean_accuracy=base["test_accuracy"] if base else None,
                  clean_peak_accuracy=base["peak_test_accuracy"] if base else None,
                  clean_history=base["history"] if base else None,
                  clean_seconds=base["seconds"] if base else 0.0, chance=chance)
    record["stalled"] = stalled(record["history"], chance)
    record["protected"] = verdict(record["test_accuracy"], record["clean_accuracy"], chance, threshold,
                                  record["stalled"])
    return record


def _assemble_report(plan: _VerifyPlan, opts: VerifyOptions, runs: list[dict], baselines: dict[str, dict]) -> dict:
    """The report: the worst run's numbers on top, the combined verdict and its rule, every run, what was
    skipped, the baselines, the data and the resolved configuration."""
    if not runs:
        raise UsageError("nothing to run: every selected (defense, paradigm) pair was skipped: "
                         + "; ".join(f"{s['defense']}/{s['paradigm']}: {s['reason']}" for s in plan.skipped))
    worst = max(runs, key=lambda r: r["test_accuracy"])
    runtime = plan.runtime
    return {**{k: worst[k] for k in ("defense", "paradigm", "arch", "test_accuracy", "clean_accuracy", "chance",
                                     "history")},
            "protected": combine_verdicts([r["protected"] for r in runs]),
            "rule": f"a run is protected iff test_accuracy - chance <= {opts.threshold} * (clean_accuracy - chance), "
                    "clean_accuracy from clean data trained under the same paradigm without defense; the verdict is "
                    "the worst case over all runs (null without a clean baseline, when the clean model does not "
                    "learn under the default recipe nor one chosen on a held-out split of the clean training data; "
                    f"a run that stalled, final train accuracy <= chance at a train loss >= "
                    f"{STALL_LOSS_SHARE} * ln K, is never counted as protected)",
            "runs": runs,
            "worst": {k: worst[k] for k in ("defense", "paradigm", "test_accuracy", "clean_accuracy", "protected")},
            "stalled": [{"defense": r["defense"], "paradigm": r["paradigm"]} for r in runs if r["stalled"]],
            "skipped": plan.skipped,
            "baselines": {p: {k: b[k] for k in ("test_accuracy", "peak_test_accuracy", "lr", "epochs", "history",
                                                "seconds")}
                          for p, b in baselines.items()},
            "recipe_search": {p: b["recipe_search"] for p, b in baselines.items()},
            "classes": list(plan.classes),
            "data": plan.data_info | {"unreadable": plan.problems},
            "config": plan.config,
            "ueguard_version": ueguard.__version__, "torch_version": torch.__version__,
            "device": str(runtime.device), "precision": runtime.precision,
            "compile": runtime.compile}


def _test_split(listing: FolderListing, clean: FolderListing | None, test, holdout: float | None, seed: int,
                reporter: Progress) -> tuple[FolderListing, FolderListing | None, FolderListing, dict | None]:
    """(protected, clean, test listings, the holdout record): the ``test`` folder as given when ``holdout``
    is ``None``; otherwise a held-out share of the originals, left out of both training listings."""
    if holdout is None:
        return listing, clean, _scan(Path(test), "test", listing.classes), None
    clean_train, held = hold_out_test(clean, holdout, seed)
    protected_train = leave_out(listing, {sample_stem(e.relpath) for e in held.images})
    record = holdout_record(held, len(clean.images), len(listing.images) - len(protected_train.images), holdout, seed)
    reporter.log(f"holding out {len(held.images)} of the {len(clean.images)} originals as the test set "
                 f"(left out of both training sets: {record['protected_left_out']} protected copies matched)")
    return protected_train, clean_train, held, record


def _hold_out(protected: WorkingSet, clean: WorkingSet, fraction: float, seed: int) -> tuple[WorkingSet, WorkingSet]:
    """The clean validation split for early stopping, and the protected training set without the protected
    versions of those images (matched by relative path, extension aside)."""
    val_idx = validation_split(clean, fraction, seed)
    held = {sample_stem(clean.ids[i]) for i in val_idx.tolist()}
    keep = [i for i, sample in enumerate(protected.ids) if sample_stem(sample) not in held]
    return protected.subset(keep), clean.subset(val_idx)
