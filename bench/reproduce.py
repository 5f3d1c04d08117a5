"""Reproduce the papers on real CIFAR-10: protections × paradigms × defenses, beside the published numbers.

Needs CIFAR-10's python batches and the akamaster CIFAR ResNet weights (``/work/shared/data``, or
``--data DIR`` / ``UEGUARD_SHARED_DATA``); a benchmark, not a test.

The benchmark runs ueguard the way a user does: CIFAR-10 is written once as PNG image folders
(``<split>/<class>/<index>.png``) into the cache, every protection is ``ueguard.sdk.protect(folder, out)``
and every victim is ``ueguard.sdk.verify(protected_folder, test_folder, ...)``.

Protocol (the scale presets below fix the sizes):

* task: CIFAR-10 classes dog, frog, horse, ship, truck (5 classes), a class-balanced subset of the
  training set; test on the same classes of the test set;
* rows: ``clean`` (the unprotected task folder) and each protection, all at ueguard's defaults for the
  scale's budget (ε 8/255 for L∞ methods; LSP and AR at their own L2 budgets; OPS one pixel);
* paradigms: ``scratch`` (CIFAR-style ResNet-18, random init) and, per prior, ``finetune`` / ``frozen`` /
  ``linear`` from that prior's weights through ``verify(weights=...)``;
* priors: ``disjoint`` — a ResNet pretrained here on the *other* five classes (airplane, automobile,
  bird, cat, deer), which stands in for ImageNet → CIFAR (cached, its accuracy reported); ``akamaster`` —
  the published CIFAR-10 ResNet-20 trained on all ten classes (a strong same-class prior); ``user`` —
  ``--weights FILE`` (``--weights-arch``) for any other prior. Methods that need a pretrained surrogate
  (ssc, bait) are protected once per prior with that prior as surrogate (the protector uses the same
  public model the victim starts from); their scratch column uses the ``disjoint`` one;
* defenses: ``none`` on every row; the other selected defenses on the ``--defended`` rows.

Everything is cached per cell under ``--cache`` (converted folders, prior checkpoints, protected folders,
verify reports), keyed by a hash of the scale's settings, so an interrupted run continues where it
stopped and a re-run only renders. Output: ``--json`` (default ``bench/results/reproduce-<scale>.json``),
a Markdown table beside it (``.md``) and PNG plots (``-accuracy.png``, ``-curves.png``).

``--merge A.json,B.json,...`` trains nothing: it puts several results files of one scale into one table
(``--json``, default ``bench/results/reproduce-merged.json``), each cell from the last listed file that
measured it and marked with that file (¹ ² …), rows protected under a method's former defaults left out
(named in the output), and beneath it the range of every distinct victim run of each cell in the files —
how far a number moves between seeds, re-trained priors and machines.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import glob
import hashlib
import json
import os
import pickle
import platform
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):  # ueguard itself, and the shared bench helpers (_priors)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PRIOR_CLASSES = (0, 1, 2, 3, 4)
TASK_CLASSES = (5, 6, 7, 8, 9)
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
AKAMASTER = Path("weights") / "cifar10_resnet_akamaster" / "resnet20-12fca82f.th"
METHODS = ("emn", "rem", "tap", "lsp", "ops", "ar", "bait", "ssc")
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

    def options_for(self, method: str) -> dict[str, Any]:
        return dict(dict(self.method_options).get(method, ()))

    def tag(self) -> str:
        """Cache key of the verify cells: the scale's name and a hash of every setting that changes a result."""
        return self._tag(("paradigms", "defenses", "defended"))  # selections, not settings

    def protect_tag(self) -> str:
        """Cache key of the protected folders: only what changes a protection (not the victims' settings)."""
        return self._tag(("paradigms", "defenses", "defended", "epochs", "batch_size", "test_per_class"))

    def _tag(self, leave_out: tuple[str, ...]) -> str:
        record = {k: v for k, v in dataclasses.asdict(self).items() if k not in leave_out}
        return f"{self.name}-{_digest(record, 8)}"


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
    # The authors' protocol on the task's five classes: all 25,000 training images, 60 epochs; for a GPU.
    "full": Scale("full", train_per_class=5000, test_per_class=1000, prior_per_class=5000, prior_epochs=60,
                  epochs=60, budget="thorough", scratch_arch="resnet18_cifar", defended=ROWS),
}


# --------------------------------------------------------------------------------------------------
# CIFAR-10 python batches → PNG image folders


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: (N×32×32×3 uint8 images, N int64 labels)."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data, labels = batch[b"data"], batch[b"labels"]
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, EOFError) as error:
        raise SystemExit(f"{path}: not a readable CIFAR-10 python batch ({type(error).__name__}: {error})") from None
    images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


def read_cifar(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """The training (five batches, in order) or test split of ``root/cifar-10-batches-py``."""
    folder = root / "cifar-10-batches-py"
    names = TRAIN_BATCHES if train else (TEST_BATCH,)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise SystemExit(f"{folder}: missing CIFAR-10 batch file(s) {', '.join(missing)}; pass --data DIR with "
                         "cifar10/cifar-10-batches-py/ inside")
    parts = [read_cifar_batch(folder / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def balanced_indices(labels: np.ndarray, classes: tuple[int, ...], per_class: int, seed: int) -> np.ndarray:
    """``per_class`` indices of each class in ``classes`` (a seeded random choice), sorted; too few images
    in a class is an error naming it."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise SystemExit(f"class {c} has {len(members)} images, fewer than the {per_class} per class asked for")
        picked.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)


@contextlib.contextmanager
def exclusive(cache: Path, name: str, log=None):
    """Hold ``cache/locks/<name>.lock`` exclusively while the body runs: a second reproduce process that
    needs the same cell (the prior, a protected folder, a verify battery) waits here, then finds the first
    one's result in the cache instead of making it again beside it — or racing it on one resume state.
    The lock is the kernel's (``flock``): a process that dies holds nothing, and no stale lock is left to clear."""
    path = cache / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                log(f"waiting for another reproduce process that holds {path}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _digest(obj: Any, length: int = 12) -> str:
    """A short sha256 of ``obj`` as sorted JSON (non-JSON values by ``str``): the cache's names and locks."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def write_image_folder(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, root: Path,
                       class_names: tuple[str, ...] = CIFAR10_CLASSES) -> Path:
    """Write ``images[indices]`` as ``root/<class name>/<index:05d>.png`` (ImageFolder layout, lossless).

    Written into a temporary sibling and renamed into place when complete, so ``root`` either does not
    exist or holds the whole folder; an existing ``root`` is reused as it is."""
    from PIL import Image

    if root.exists():
        return root
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)  # our own leftover of an interrupted conversion
    for i in indices.tolist():
        folder = tmp / class_names[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    tmp.rename(root)
    return root


@dataclass(frozen=True)
class Folders:
    task_train: Path
    task_test: Path
    prior_train: Path
    prior_test: Path


def convert(data: Path, cache: Path, scale: Scale, seed: int = 0) -> Folders:
    """The scale's four folders (task and prior, train and test), converted once into ``cache/data``."""
    with exclusive(cache, f"convert-{_digest([str(data), dataclasses.asdict(scale), seed])}"):
        return _convert(data, cache, scale, seed)


def _convert(data: Path, cache: Path, scale: Scale, seed: int) -> Folders:
    out = cache / "data"
    splits = {}
    for train in (True, False):
        wanted = [(name, classes, per_class) for name, classes, per_class in
                  (("task", TASK_CLASSES, scale.train_per_class if train else scale.test_per_class),
                   ("prior", PRIOR_CLASSES, scale.prior_per_class if train else scale.test_per_class))]
        roots = {name: out / f"{name}-{'train' if train else 'test'}-{per_class}pc-s{seed}"
                 for name, _, per_class in wanted}
        if all(r.exists() for r in roots.values()):
            splits.update({(n, train): r for n, r in roots.items()})
            continue
        images, labels = read_cifar(data / "cifar10", train)
        for name, classes, per_class in wanted:
            idx = balanced_indices(labels, classes, per_class, seed)
            splits[(name, train)] = write_image_folder(images, labels, idx, roots[name])
    return Folders(splits[("task", True)], splits[("task", False)], splits[("prior", True)], splits[("prior", False)])


# --------------------------------------------------------------------------------------------------
# priors


@dataclass(frozen=True)
class Prior:
    name: str
    weights: Path
    arch: str
    accuracy: float | None = None  # on its own classes' test images, when measured here
    note: str = ""


def pretrain_disjoint_prior(folders: Folders, cache: Path, scale: Scale, seed: int) -> Prior:
    """Train ``scale.prior_arch`` on the five prior classes with ueguard's own training loop (cached)."""
    from _priors import train_prior

    path = cache / "priors" / (f"disjoint-{scale.prior_arch}-{scale.prior_per_class}pc-{scale.prior_epochs}ep-"
                               f"s{seed}.pth")
    with exclusive(cache, f"prior-{path.stem}"):
        accuracy, note = train_prior(folders.prior_train, folders.prior_test, scale.prior_arch, scale.prior_epochs,
                                     seed, path)
    return Prior("disjoint", path, scale.prior_arch, accuracy, note)


def akamaster_prior(data: Path) -> Prior | None:
    path = data / AKAMASTER
    if not path.is_file():
        return None
    return Prior("akamaster", path, "resnet20_cifar", 0.9178,
                 "akamaster ResNet-20 on all ten CIFAR-10 classes (published best_prec1 91.78 %): same-class prior")


# --------------------------------------------------------------------------------------------------
# cells: one protected folder per (method, prior), one verify report per (row, column group)


def _json_dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Variant:
    """A row that runs ``method`` with ``options`` on top of the scale's (``--variant NAME=METHOD:k=v,...``):
    how a constant search puts each setting it tries into the same table, cached under its own name."""

    name: str
    method: str
    options: tuple[tuple[str, Any], ...] = ()

    def split(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(protect's options, the method's options)``: ``precision`` (fp32, bf16, …) is protect's — how
        the efficacy of reduced precision is compared — the rest are the method's constants."""
        options = dict(self.options)
        return {k: options.pop(k) for k in PROTECT_OPTIONS if k in options}, options


PROTECT_OPTIONS = ("precision",)  # variant keys that go to protect() itself, not to the method


def parse_variant(text: str) -> Variant:
    from ueguard.sdk.options import parse_method_options

    name, sep, rest = text.partition("=")
    method, _, pairs = rest.partition(":")
    if not sep or not name or name in ROWS or method not in METHODS or any(c in name for c in "/,·@"):
        raise SystemExit(f"--variant {text!r}: write NAME=METHOD:key=value,key=value with a new row NAME "
                         f"(no / , · @) and METHOD one of {', '.join(METHODS)}")
    return Variant(name, method, parse_method_options(tuple(p for p in pairs.split(",") if p)))


def cached_protection(cells: Path, preferred: Path, method: str, options: dict[str, Any], config) -> Path | None:
    """A finished protected folder in ``cells`` made with ``options`` (protect's options as the benchmark
    records them) whose run resolved to ``config``'s constants — ``preferred`` (the row's own name) first,
    then any other row's: a default that changed is re-made, and a variant whose constants the defaults have
    since become is reused. Folders made before protect recorded ``method_config`` are resolved under their
    defaults revision (see :func:`ueguard.sdk.protect.recorded_constants`)."""
    from ueguard.data.manifest import MANIFEST_NAME, first_run
    from ueguard.methods import METHODS as REGISTRY
    from ueguard.sdk.protect import changed_constants, recorded_constants

    def settings(o: dict[str, Any]) -> dict[str, Any]:  # all but the method constants, which are compared resolved
        return json.loads(json.dumps({k: v for k, v in o.items() if k not in ("method_options", "resume")}, default=str))

    wanted, first = settings(options), preferred.with_name(preferred.name + ".json")
    for done in [first] + [p for p in sorted(cells.glob("*.json")) if p != first]:
        folder = done.with_name(done.name[:-len(".json")])
        try:
            record = json.loads(done.read_text())
            if record.get("method") != method or settings(record.get("options", {})) != wanted:
                continue  # only a folder of the same method and settings has its manifest read
            header = first_run(folder / MANIFEST_NAME)
            if header is not None and not changed_constants(recorded_constants(header, REGISTRY.get(method)), config):
                return folder
        except (OSError, ValueError, KeyError):  # unreadable, or a manifest this code cannot resolve
            continue
    return None


def protected_folder(row: Variant, prior: Prior | None, folders: Folders, cache: Path, scale: Scale, seed: int,
                     log) -> tuple[Path, dict]:
    """``protect(task_train, out)`` with the row's method at the scale's budget (resumed when interrupted)."""
    from ueguard.methods import METHODS as REGISTRY

    method = row.method
    needs_prior = REGISTRY.get(method).needs_pretrained
    key = f"{row.name}@{prior.name}" if needs_prior else row.name
    cells = cache / "protected" / scale.protect_tag()
    out = cells / f"{key}-s{seed}"
    protect_options, method_options = row.split()
    options: dict[str, Any] = {"budget": scale.budget, "seed": seed, "size": 32, "format": "png", **protect_options,
                               "method_options": {**scale.options_for(method), **method_options}}
    if REGISTRY.get(method).needs_surrogate:
        options.update(surrogate=prior.arch if needs_prior else scale.scratch_arch,
                       weights=str(prior.weights) if needs_prior else None)
    from ueguard.sdk.options import ProtectOptions

    config = ProtectOptions.resolve(method=method, **{k: v for k, v in options.items() if v is not None}).method_config()
    lock = contextlib.nullcontext() if CACHED_ONLY else \
        exclusive(cells, f"protect-{method}-{_digest([options, dataclasses.asdict(config)])}", log)
    # the folder's constants are this code's (found by them, or made now): results files record their
    # defaults revision, so a merge of several files (--merge) can tell a row made under former defaults
    revision = {"defaults_revision": REGISTRY.get(method).defaults_revision}
    with lock:  # another process making the same folder is waited for, and its folder found
        if (found := cached_protection(cells, out, method, options, config)) is not None:
            return found, {**json.loads(found.with_name(found.name + ".json").read_text()), "folder": str(found),
                           **revision}
        if out.with_name(out.name + ".json").is_file():  # the row's name holds a folder made with other constants
            out = cells / f"{key}-{_digest(dataclasses.asdict(config), 8)}-s{seed}"
        if CACHED_ONLY:
            raise SystemExit(f"--cached-only: {key} is not protected yet with this code's constants (in {cells})")
        return out, {**_protect(row, prior if needs_prior else None, folders.task_train, out, options, log),
                     **revision}


def _protect(row: Variant, prior: Prior | None, train: Path, out: Path, options: dict[str, Any],
             log) -> dict:
    """``protect(train, out)`` (resumed when ``out`` exists), its record written beside ``out``."""
    from ueguard.sdk import protect

    key, method = out.name, row.method
    options["resume"] = out.exists()
    log(f"protect {key}: {json.dumps({k: v for k, v in options.items() if v is not None}, default=str)}")
    started = time.perf_counter()
    result = protect(train, out, method, **options)
    linf = [item.get("linf") for item in result.items if item.get("linf") is not None]
    record = {"method": method, "row": row.name, "prior": prior.name if prior else None, "ok": result.ok,
              "failed": result.failed, "seconds": round(time.perf_counter() - started, 1),
              "max_linf_255": max(linf) if linf else None, "mean_linf_255": float(np.mean(linf)) if linf else None,
              "within_budget": all(item.get("within_budget", True) for item in result.items),
              "options": {k: v for k, v in options.items() if k != "resume"}}
    if result.failed:
        raise SystemExit(f"protect {key}: {result.failed} image(s) failed; see {result.manifest_path}")
    _json_dump(out.with_name(out.name + ".json"), record)
    return record


CACHED_ONLY = False  # --cached-only: render from the cache, never train or protect (a missing run is left empty)
RECIPE_KEYS = ("arch", "epochs", "budget", "seed", "weights", "size", "batch_size", "lr")  # what a run's result depends on
                                                                                      # besides its data and defense


def defense_constants(defense: str, budget: str, defense_options: dict[str, Any]) -> dict[str, Any]:
    """The constants ``defense`` runs with now — its defaults at ``budget`` under ``defense_options`` — as a
    verify run records them (``defense_config``)."""
    from ueguard.sdk.verify import VerifyOptions

    opts = VerifyOptions.resolve(defense=defense, defense_options=defense_options, budget=budget)
    return json.loads(json.dumps(dataclasses.asdict(opts.defense_config(defense))))


@functools.lru_cache(maxsize=2048)
def _read_report(path: str, mtime_ns: int, size: int) -> dict:
    """A verify report, parsed once per version of the file (the key's mtime and size): a render asks
    every cell's reports of every file, and a large cache held hundreds of them, each with its histories.
    Bounded: a long run rewrites each battery's report after every cell, and the versions it left behind
    would otherwise stay parsed in memory until the process ends."""
    return json.loads(Path(path).read_text())


def cached_runs(cells: Path, row: str, seed: int, recipe: dict[str, Any], data: tuple[str, str],
                constants: dict[str, dict[str, Any]]) -> dict[tuple[str, str], dict]:
    """Every finished run in the cached reports that was trained on ``data`` (train, test folders) with
    ``recipe`` and with the defense constants that are current now, keyed by ``(paradigm, defense)``; this
    row's own reports first.

    A run is found wherever it was made (another column group's battery, bench/staged.py's settings, another
    row's report on the same protected folder — a variant the defaults have become), and a run made under a
    defense's *former* defaults is not found, so a changed default re-runs only what it changes."""
    found: dict[tuple[str, str], dict] = {}
    own = sorted(cells.glob(f"verify-{glob.escape(row)}-*-s{seed}.json"))
    for path in own + sorted(set(cells.glob(f"verify-*-s{seed}.json")) - set(own)):
        try:
            stat = path.stat()
            report = _read_report(str(path), stat.st_mtime_ns, stat.st_size)
        except (OSError, ValueError):
            continue
        if (report.get("data", {}).get("protected"), report.get("data", {}).get("test")) != data or \
                {k: report.get("config", {}).get(k) for k in RECIPE_KEYS} != recipe:
            continue
        for run in report.get("runs", []):
            if run.get("defense") in constants and run.get("defense_config") == constants[run["defense"]]:
                found.setdefault((run["paradigm"], run["defense"]), run)
    return found


def cell_path(cells: Path, row: str, group: str, defense: str, paradigms: list[str], train_folder: Path,
              weights: str | None, seed: int) -> Path:
    """Where one verify battery's report goes. The name carries a digest of the data and the prior it trains
    on: with ``--victim-seeds`` a victim seed is also another seed's own seed, and the two batteries (seed 1's
    victim on seed 0's protection and prior, and seed 1's own) must not overwrite each other's report."""
    digest = _digest([str(train_folder), weights], 8)
    return cells / f"verify-{row}-{group}-{defense}-{'+'.join(paradigms)}-{digest}-s{seed}.json"


def verify_cell(row: str, group: str, train_folder: Path, folders: Folders, prior: Prior | None,
                paradigms: list[str], defenses: list[str], cells: Path, scale: Scale, seed: int, log,
                defense_options: dict[str, Any] | None = None) -> dict:
    """``verify`` of one row under one column group (scratch, or the paradigms of one prior), cached run by
    run: each (paradigm, defense) run already made with the same data, recipe and defense constants is
    reused (``cached_runs``); the missing ones are trained, one verify battery per defense, and resume
    when interrupted. ``defense_options`` as verify's (``{"staged.tau": 0.3}``), part of ``group`` when
    given. A defense that validates on clean images (earlystop) holds out the task's original training
    images, as an adversary with a few clean labelled images would. Returns ``{"runs": [...]}`` in
    paradigm × defense order."""
    from ueguard.defenses import DEFENSES

    defense_options = defense_options or {}
    defenses = [DEFENSES.get(d).name for d in defenses]  # as runs record them
    recipe = {"budget": scale.budget, "epochs": scale.epochs, "seed": seed, "size": 32,
              "batch_size": scale.batch_size, "lr": scale.prior_lr if prior else None,
              "arch": prior.arch if prior else scale.scratch_arch,
              "weights": str(prior.weights) if prior else None}
    constants = {d: defense_constants(d, scale.budget, defense_options) for d in defenses}
    data = (str(train_folder), str(folders.task_test))
    found: dict[tuple[str, str], dict] = {}
    for defense in defenses:
        if all((p, defense) in found for p in paradigms):
            continue
        lock = contextlib.nullcontext() if CACHED_ONLY else \
            exclusive(cells, f"verify-{_digest([data, recipe, defense, constants[defense]])}", log)
        with lock:  # read the cache under the lock: another process may have made the runs while this one waited
            found.update(cached_runs(cells, row, seed, recipe, data, constants))
            if not (missing := [p for p in paradigms if (p, defense) not in found]):
                continue
            if CACHED_ONLY:
                log(f"--cached-only: no cached run of {row} × {group}: {defense} / {', '.join(missing)}; left empty")
                continue
            path = cell_path(cells, row, group, defense, missing, train_folder, recipe["weights"], seed)
            options = recipe | {"paradigm": ",".join(missing), "defense": defense, "defense_options": defense_options}
            if DEFENSES.get(defense).needs_validation:  # earlystop: the adversary's clean images are the originals
                options["clean"] = folders.task_train
            log(f"verify {row} × {group}: paradigms {', '.join(missing)}; defense {defense}")
            report = _verify_resumed(train_folder, folders.task_test, path, options)
            for run in report["runs"]:
                found[(run["paradigm"], run["defense"])] = run
            for skipped in report.get("skipped", []):
                log(f"verify {row} × {group}: skipped {skipped}")
    return {"runs": [found[(p, d)] for p in paradigms for d in defenses if (p, d) in found]}


def _verify_resumed(train: Path, test: Path, path: Path, options: dict[str, Any]) -> dict:
    """``verify`` writing ``path``, resuming its battery; a battery whose settings changed starts over."""
    from ueguard.errors import UsageError
    from ueguard.sdk import verify

    try:
        return verify(train, test, json_path=path, resume=(Path(str(path) + ".state") / "config.json").is_file(),
                      **options)
    except UsageError as error:
        if "--resume" not in str(error):
            raise
        return verify(train, test, json_path=path, **options)


# --------------------------------------------------------------------------------------------------
# the table


def column_key(paradigm: str, prior: str | None, defense: str) -> str:
    return f"{paradigm}·{prior}/{defense}" if prior else f"{paradigm}/{defense}"


def cells_from_reports(row: str, reports: list[tuple[str | None, dict]]) -> dict[str, dict]:
    """``{column: {"accuracy", "peak", "history", "seconds", "stalled"}}`` of one row's verify reports
    (accuracy %; ``stalled``: verify's rule, applied here too to reports cached before it had one)."""
    from ueguard.sdk.verify import stalled

    out = {}
    for prior, report in reports:
        for run in report["runs"]:
            out[column_key(run["paradigm"], prior, run["defense"])] = {
                "accuracy": round(100 * run["test_accuracy"], 2), "peak": round(100 * run["peak_test_accuracy"], 2),
                "history": [round(100 * h["test_accuracy"], 2) for h in run["history"] if h["epoch"] >= 1],
                "seconds": run["seconds"], "stalled": stalled(run["history"], run["chance"])}
    return out


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def render_table(results: dict[str, list[dict[str, dict]]], columns: list[str],
                 published: dict[tuple[str, str], float] = PUBLISHED, notes: dict[tuple[str, str], str] | None = None,
                 transpose: bool = False) -> str:
    """Markdown: rows = protections (``results[row]`` one cell dict per seed × victim seed), columns =
    paradigm × defense; test accuracy % (mean ± sd over those), the published number in brackets where
    there is one, and ``stalled`` where a seed's run never left the constant predictor (verify gives it no
    verdict: its accuracy is the recipe failing, not the protection holding). ``notes[(row, column)]`` is
    written right after a measured number (a merged table's source mark); ``transpose``: one line per
    column, one table column per protection (a wide merged table reads better that way)."""
    grid: dict[tuple[str, str], str] = {}
    for row, per_seed in results.items():
        for column in columns:
            found = [seed_cells[column] for seed_cells in per_seed if column in seed_cells]
            text = _mean_sd([cell["accuracy"] for cell in found])
            if found and notes and (row, column) in notes:
                text += notes[(row, column)]
            if any(cell.get("stalled") for cell in found):
                text += " stalled"
            paradigm, _, defense = column.partition("/")
            if paradigm == "scratch" and (row, defense) in published:
                text += f" [{published[(row, defense)]:.1f}]"
            grid[row, column] = text
    if transpose:
        lines = ["| paradigm / defense | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
        lines += [f"| {column} | " + " | ".join(grid[row, column] for row in results) + " |" for column in columns]
    else:
        lines = ["| protection | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        lines += [f"| {row} | " + " | ".join(grid[row, column] for column in columns) + " |" for row in results]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# one table from several results files (--merge)

#: When a method's defaults revision landed (the commit that raised it, 3b4bb86 for SSC's deception term).
#: Results files written before protections recorded ``defaults_revision`` are attributed by their
#: ``time``: a row is read as the newest revision landed by then. That is exact for files this script
#: wrote, since a render reuses a protected folder only when it was made with the constants the code of
#: that render resolves (:func:`cached_protection`); a run that straddled a landing would be misread.
REVISION_LANDED = {("ssc", 2): "2026-12-02T05:52:04+0000"}
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # a results file's ``time``
SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def _protection_row(key: str) -> str:
    """The results row a protections entry was made for: its key is ``<row>[@<prior>]-s<seed>`` (the entry's
    own ``row`` names the row that first made the folder, which may be a variant the defaults became)."""
    return re.sub(r"-s\d+$", "", key).partition("@")[0]


def row_revision(record: dict, row: str) -> int:
    """The defaults revision ``record``'s base row ``row`` was protected under: as its protections recorded
    it, else by the record's time (:data:`REVISION_LANDED`)."""
    recorded = {p["defaults_revision"] for key, p in record.get("protections", {}).items()
                if _protection_row(key) == row and "defaults_revision" in p}
    if len(recorded) > 1:
        raise ValueError(f"row {row} has protections of revisions {sorted(recorded)}")
    if recorded:
        return recorded.pop()
    when = datetime.strptime(record["time"], TIME_FORMAT)
    landed = [revision for (method, revision), at in REVISION_LANDED.items()
              if method == row and datetime.strptime(at, TIME_FORMAT) <= when]
    return max(landed, default=1)


def merge_records(records: list[tuple[str, dict]], rows: tuple[str, ...] = ROWS) -> dict[str, Any]:
    """One table from several results files of one scale: for every (row, column) the cells of the *last*
    file in ``records`` that measured it (all of that file's seeds), so a newer run overrides an older one
    and an older file fills what the newer left out. Only base rows at their method's current defaults
    revision are taken (a row made under former defaults is listed in ``dropped``); variants are constant
    searches, not the methods as shipped, and are left out. Returns ``results`` (render form: per row a list
    of cell dicts, ragged), ``columns`` (scratch first, then per prior, paradigm and defense in protocol
    order), ``notes`` (each cell's source mark) and ``sources`` / ``dropped``."""
    from ueguard.methods import METHODS as REGISTRY

    if not records:
        raise SystemExit("--merge: name at least one results file")
    tag = None
    chosen: dict[str, dict[str, tuple[int, list[dict]]]] = {}
    dropped: list[str] = []
    runs: dict[tuple[str, str], list[float]] = {}  # every distinct victim run's accuracy, file by file
    seen: dict[tuple[str, str], set[tuple]] = {}
    for index, (name, record) in enumerate(records):
        if record.get("bench") != "reproduce" or "results" not in record:
            raise SystemExit(f"--merge {name}: not a results file of bench/reproduce.py")
        if tag is None:
            tag = record["scale_tag"]
        elif record["scale_tag"] != tag:
            raise SystemExit(f"--merge {name}: scale {record['scale_tag']}, but {records[0][0]} is {tag}; "
                             f"one table holds one scale's cells")
        for row, per_seed in record["results"].items():
            if row not in rows:
                continue
            if row != "clean":
                revision, current = row_revision(record, row), REGISTRY.get(row).defaults_revision
                if revision != current:
                    dropped.append(f"{name}: {row} (made under defaults revision {revision}; now {current})")
                    continue
            for column in {c for seed_cells in per_seed for c in seed_cells}:
                cells = [s[column] for s in per_seed if column in s]
                chosen.setdefault(row, {})[column] = (index, cells)
                for cell in cells:  # files that re-render one cached run hold the same cell: counted once
                    fingerprint = (cell["accuracy"], cell.get("seconds"), tuple(cell.get("history", ())))
                    if fingerprint not in seen.setdefault((row, column), set()):
                        seen[row, column].add(fingerprint)
                        runs.setdefault((row, column), []).append(float(cell["accuracy"]))
    results: dict[str, list[dict[str, dict]]] = {}
    notes: dict[tuple[str, str], str] = {}
    used: set[int] = set()
    for row in (r for r in rows if r in chosen):
        width = max(len(cells) for _, cells in chosen[row].values())
        results[row] = [{} for _ in range(width)]
        for column, (index, cells) in chosen[row].items():
            for i, cell in enumerate(cells):
                results[row][i][column] = cell
            notes[row, column] = str(index + 1).translate(SUPERSCRIPT)
            used.add(index)
    order = {name: i for i, name in enumerate(("scratch", "finetune", "frozen", "linear", "none", "staged", "gray",
                                               "jpeg", "at", "disjoint", "akamaster", "user"))}

    def column_order(column: str) -> tuple:
        head, _, defense = column.partition("/")
        paradigm, _, prior = head.partition("·")
        return (bool(prior), order.get(prior, len(order)), prior, order.get(paradigm, len(order)), paradigm,
                order.get(defense, len(order)), defense)

    columns = sorted({c for per_seed in results.values() for s in per_seed for c in s}, key=column_order)
    sources = [{"mark": str(i + 1).translate(SUPERSCRIPT), "file": name, "time": record.get("time"),
                "cpu": record.get("environment", {}).get("cpu"), "command": record.get("command"),
                "priors": {k: v.get("note") for k, v in record.get("priors", {}).items()}, "used": i in used}
               for i, (name, record) in enumerate(records)]
    return {"scale_tag": tag, "results": results, "columns": columns, "notes": notes, "sources": sources,
            "dropped": dropped, "runs": runs}


def render_spread(runs: dict[tuple[str, str], list[float]], rows: list[str], columns: list[str]) -> str:
    """Markdown, laid out like the transposed merged table: for each cell with more than one distinct victim
    run in the files (a file that re-renders another's cached run adds none), the range of their accuracies
    and how many — how far a cell moves between seeds, re-trained priors, re-made protections, machines."""
    def text(key: tuple[str, str]) -> str:
        found = runs.get(key, [])
        return f"{min(found):.1f}–{max(found):.1f} ({len(found)})" if len(found) > 1 else "—"

    lines = ["| paradigm / defense | " + " | ".join(rows) + " |", "|---|" + "---:|" * len(rows)]
    lines += [f"| {column} | " + " | ".join(text((row, column)) for row in rows) + " |" for column in columns
              if any(len(runs.get((row, column), [])) > 1 for row in rows)]
    return "\n".join(lines) + "\n"


def _command(argv: list[str] | None) -> str:
    """The command line a results file records (``argv`` as :func:`main` was given it)."""
    return " ".join(["python", "bench/reproduce.py"] + (sys.argv[1:] if argv is None else argv))


def merge_main(files: list[Path], rows: tuple[str, ...], json_path: Path, argv: list[str] | None) -> None:
    """``--merge``: read the results files, write the merged table (``.json``, ``.md``, plots)."""
    records = []
    for path in files:
        try:
            records.append((path.name, json.loads(path.read_text())))
        except (OSError, ValueError) as error:
            raise SystemExit(f"--merge {path}: cannot read it as JSON ({error})") from None
    merged = merge_records(records, rows)
    table = render_table(merged["results"], merged["columns"], notes=merged["notes"], transpose=True)
    legend = "".join(f"- {s['mark']} `{s['file']}` ({s['time']}, {s['cpu']}): `{s['command']}`\n"
                     for s in merged["sources"] if s["used"])
    dropped = "".join(f"- left out: {d}\n" for d in merged["dropped"])
    text = (f"Merged from {len(records)} results files of scale {merged['scale_tag']}: each cell is the last "
            f"listed file's measurement of it (its mark), mean ± sd over that file's seeds. Cells of different "
            f"marks are different runs (machine, re-trained prior, code of the day): compare a protection with "
            f"clean under the same mark. Test accuracy %; "
            f"[brackets]: published, ResNet-18 from scratch on all of CIFAR-10, 60 epochs.\n\n"
            + table + "\n" + legend + dropped
            + "\nEvery distinct victim run of a cell in these files (seeds, victim seeds, re-runs on other machines "
              "and priors): lowest–highest accuracy (runs).\n\n"
            + render_spread(merged["runs"], list(merged["results"]), merged["columns"]))
    record = {"bench": "reproduce-merge", **{k: merged[k] for k in ("scale_tag", "columns", "sources", "dropped")},
              "results": merged["results"], "notes": {f"{r}|{c}": m for (r, c), m in merged["notes"].items()},
              "runs": {f"{r}|{c}": v for (r, c), v in merged["runs"].items()},
              "table": table, "command": _command(argv),
              "time": time.strftime(TIME_FORMAT)}
    _json_dump(json_path, record)
    json_path.with_suffix(".md").write_text(text)
    plots = plot(merged["results"], merged["columns"], json_path.with_suffix(""))
    print(text)
    print(f"wrote {json_path}, {json_path.with_suffix('.md')}, {', '.join(str(p) for p in plots)}")


def plot(results: dict[str, list[dict[str, dict]]], columns: list[str], stem: Path) -> list[Path]:
    """``<stem>-accuracy.png`` (grouped bars: one group per column, one bar per row) and ``<stem>-curves.png``
    (test accuracy per epoch of every row, one panel per column; first seed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = list(results)
    palette = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")  # one distinct colour per row
    colour = {row: palette(i % palette.N) for i, row in enumerate(rows)}
    written = []
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(columns)) + 1.8, 4))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        heights = [np.mean([s[c]["accuracy"] for s in results[row] if c in s]) if any(c in s for s in results[row])
                   else np.nan for c in columns]
        bars = ax.bar(np.arange(len(columns)) + i * width, heights, width, label=row, color=colour[row])
        for bar, c in zip(bars, columns):  # a stalled run's accuracy is the recipe failing: hatched, labelled
            if any(s[c].get("stalled") for s in results[row] if c in s):
                bar.set_hatch("//")
                ax.annotate("stalled", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", rotation=90, fontsize=6)
    ax.set_xticks(np.arange(len(columns)) + 0.4 - width / 2, columns, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy %")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not over them
    fig.tight_layout()
    written.append(stem.with_name(stem.name + "-accuracy.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    n = len(columns)
    ncols = min(4, n)
    fig, axes = plt.subplots((n + ncols - 1) // ncols, ncols, figsize=(3.2 * ncols, 2.6 * ((n + ncols - 1) // ncols)),
                             squeeze=False)
    for ax, column in zip(axes.flat, columns):
        for row in rows:
            if results[row] and column in results[row][0]:
                history = results[row][0][column]["history"]
                ax.plot(range(1, len(history) + 1), history, label=row, marker=".", color=colour[row])
        ax.set_title(column, fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_xlabel("epoch", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].set_ylabel("test accuracy %")
    fig.tight_layout()
    fig.legend(*axes.flat[0].get_legend_handles_labels(), fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 0.98))
    written.append(stem.with_name(stem.name + "-curves.png"))
    fig.savefig(written[-1], dpi=110, bbox_inches="tight")  # the legend sits beside the panels
    plt.close(fig)
    return written


# --------------------------------------------------------------------------------------------------


def _environment() -> dict[str, Any]:
    import torch

    import ueguard

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "load_average_start": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
            "ueguard": ueguard.__version__}


def _split(text: str | None, default: tuple[str, ...], valid: tuple[str, ...] | None, what: str) -> list[str]:
    names = list(default) if text is None else [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if valid is not None and n not in valid]
    if bad:
        raise SystemExit(f"--{what}: unknown {', '.join(bad)}; choose from {', '.join(valid)}")
    return names


def _seeds(text: str, what: str) -> list[int]:
    try:
        seeds = [int(t) for t in _split(text, (), None, what)]
    except ValueError:
        raise SystemExit(f"--{what} {text!r}: write a comma list of integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--{what} {text!r}: give at least one seed, each once")
    return seeds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    for name in SCALES:
        size.add_argument(f"--{name}", dest="scale", action="store_const", const=name,
                          help=f"scale preset {name!r} (default: quick)")
    parser.add_argument("--methods", help=f"comma list of rows (default: all of {', '.join(ROWS)})")
    parser.add_argument("--paradigms", help="comma list of scratch, finetune, frozen, linear (default: the scale's)")
    parser.add_argument("--defenses", help="comma list of ueguard defenses (default: the scale's)")
    parser.add_argument("--defended", help="rows that get the defenses beyond none (default: the scale's)")
    parser.add_argument("--priors", help="comma list of disjoint, akamaster, user (default: disjoint, akamaster, "
                                         "and user with --weights)")
    parser.add_argument("--weights", type=Path, help="a user prior (any weights file ueguard reads)")
    parser.add_argument("--weights-arch", default="resnet20_cifar", help="architecture of --weights")
    parser.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="NAME=METHOD:K=V,...",
                        help="an extra row: METHOD with these constants on top of the scale's (repeatable; "
                             "e.g. ssc-fresh=ssc:deep_init=fresh); cached under NAME")
    parser.add_argument("--seeds", default="0", help="comma list of seeds (default 0): each seed re-trains the prior "
                                                      "and every protection, and trains the victims with that seed")
    parser.add_argument("--victim-seeds", help="comma list of victim seeds trained on each seed's protections "
                                               "(default: the seed itself): separates the victims' run-to-run "
                                               "noise from the prior's and the protection's")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("UEGUARD_SHARED_DATA", "/work/shared/data")),
                        help="folder with cifar10/cifar-10-batches-py and weights/ (default /work/shared/data)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                        / "ueguard-reproduce", help="cache of converted folders, priors and cells")
    parser.add_argument("--json", type=Path, help="results JSON (default bench/results/reproduce-<scale>.json)")
    parser.add_argument("--cached-only", action="store_true",
                        help="only render what the cache holds: a missing run is left empty (—), a missing protection "
                             "is an error; nothing is trained")
    parser.add_argument("--merge", metavar="FILE,FILE,...",
                        help="render one table from these results files of one scale instead of running: each "
                             "cell from the last file that measured it, marked with its source (--json: where "
                             "to write; default bench/results/reproduce-merged.json); trains nothing")
    args = parser.parse_args(argv)
    if args.merge is not None:
        files = [Path(f) for f in _split(args.merge, (), None, "merge")]
        return merge_main(files, tuple(_split(args.methods, ROWS, ROWS, "methods")),
                          args.json or ROOT / "bench" / "results" / "reproduce-merged.json", argv)
    global CACHED_ONLY
    CACHED_ONLY = args.cached_only
    scale = SCALES[args.scale or "quick"]
    rows = _split(args.methods, ROWS, ROWS, "methods")
    if "clean" not in rows:
        rows.insert(0, "clean")
    variants = {row: Variant(row, row) for row in rows if row != "clean"}
    variants.update({v.name: v for v in args.variant})
    rows += [v.name for v in args.variant if v.name not in rows]
    paradigms = _split(args.paradigms, scale.paradigms, ("scratch", "finetune", "frozen", "linear"), "paradigms")
    defenses = _split(args.defenses, scale.defenses, None, "defenses")
    if "none" not in defenses:
        defenses.insert(0, "none")
    defended = _split(args.defended, scale.defended, ROWS + tuple(v.name for v in args.variant), "defended")
    seeds = _seeds(args.seeds, "seeds")
    victim_seeds = _seeds(args.victim_seeds, "victim-seeds") if args.victim_seeds is not None else None
    prior_names = _split(args.priors, ("disjoint", "akamaster") + (("user",) if args.weights else ()),
                         ("disjoint", "akamaster", "user"), "priors")
    if "user" in prior_names and args.weights is None:
        raise SystemExit("--priors user needs --weights FILE")
    if args.weights is not None and not args.weights.is_file():
        raise SystemExit(f"--weights {args.weights}: no such file")
    json_path = args.json or ROOT / "bench" / "results" / f"reproduce-{scale.name}.json"

    started = time.perf_counter()
    environment = _environment()
    cells = args.cache / "cells" / scale.tag()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {message}", flush=True)

    log(f"scale {scale.tag()}; rows {', '.join(rows)}; paradigms {', '.join(paradigms)}; defenses "
        f"{', '.join(defenses)} (beyond none on {', '.join(defended)}); seeds {seeds}; victim seeds "
        f"{victim_seeds or 'as the seeds'}; cache {args.cache}")
    folders = convert(args.data, args.cache, scale)
    log(f"folders: {folders.task_train} …")
    prior_paradigms = [p for p in paradigms if p != "scratch"]
    results: dict[str, list[dict[str, dict]]] = {row: [] for row in rows}  # one entry per (seed, victim seed)
    entry_seeds: dict[str, list[tuple[int, int]]] = {row: [] for row in rows}
    protections: dict[str, dict] = {}
    priors_used: dict[str, dict] = {}
    for seed in seeds:
        priors: list[Prior] = []
        # SSC and BAIT protect the scratch column against the disjoint prior too (they need a pretrained one)
        needs_disjoint = "disjoint" in prior_names or \
            "scratch" in paradigms and any(v.method in ("ssc", "bait") for v in variants.values())
        if needs_disjoint:
            priors.append(pretrain_disjoint_prior(folders, args.cache, scale, seed))
            log(f"prior: {priors[-1].note}")
        if "akamaster" in prior_names:
            if (aka := akamaster_prior(args.data)) is None:
                raise SystemExit(f"{args.data / AKAMASTER}: missing; pass --priors disjoint or --data DIR")
            priors.append(aka)
        if "user" in prior_names:
            priors.append(Prior("user", args.weights, args.weights_arch, None, f"--weights {args.weights}"))
        column_priors = [p for p in priors if p.name in prior_names] if prior_paradigms else []
        for prior in priors:  # the disjoint prior is re-trained per seed: one entry each, not the last seed's
            key = f"{prior.name}, seed {seed}" if prior.name == "disjoint" and len(seeds) > 1 else prior.name
            priors_used[key] = {"name": prior.name, "weights": str(prior.weights), "arch": prior.arch,
                                "accuracy": prior.accuracy, "note": prior.note}
        disjoint = next((p for p in priors if p.name == "disjoint"), None)
        for row in rows:
            row_defenses = defenses if row in defended else ["none"]
            groups = ([(None, ["scratch"])] if "scratch" in paradigms else []) + \
                     [(p, prior_paradigms) for p in column_priors]
            group_folders: list[Path] = []  # the training folder of each group, made once for every victim seed
            for prior, _ in groups:
                if row == "clean":
                    group_folders.append(folders.task_train)
                    continue
                folder, record = protected_folder(variants[row], prior or disjoint, folders, args.cache, scale, seed,
                                                  log)
                group_folders.append(folder)
                protections[f"{row}@{record['prior']}-s{seed}" if record["prior"] else f"{row}-s{seed}"] = record
            for victim_seed in victim_seeds or [seed]:
                reports: list[tuple[str | None, dict]] = []
                for (prior, group_paradigms), folder in zip(groups, group_folders):
                    report = verify_cell(row, prior.name if prior else "scratch", folder, folders, prior,
                                         group_paradigms, row_defenses, cells, scale, victim_seed, log)
                    reports.append((prior.name if prior else None, report))
                results[row].append(cells_from_reports(row, reports))
                entry_seeds[row].append((seed, victim_seed))
                summary = ", ".join(f"{c} {v['accuracy']:.1f}" for c, v in results[row][-1].items())
                log(f"{row} (seed {seed}, victim seed {victim_seed}): {summary}")

    columns = [column_key("scratch", None, d) for d in defenses if "scratch" in paradigms]
    columns += [column_key(p, prior, d) for prior in prior_names for p in prior_paradigms for d in defenses]
    columns = [c for c in columns if any(c in s for per_seed in results.values() for s in per_seed)]
    table = render_table(results, columns)
    wall = time.perf_counter() - started
    environment["load_average_end"] = os.getloadavg()
    record = {"bench": "reproduce", "scale": dataclasses.asdict(scale), "scale_tag": scale.tag(),
              "selection": {"rows": rows, "paradigms": paradigms, "defenses": defenses, "defended": defended,
                            "priors": prior_names},
              "variants": {v.name: {"method": v.method, "options": dict(v.options)} for v in args.variant},
              "seeds": seeds, "victim_seeds": victim_seeds, "entry_seeds": entry_seeds,
              "task_classes": [CIFAR10_CLASSES[c] for c in TASK_CLASSES],
              "prior_classes": [CIFAR10_CLASSES[c] for c in PRIOR_CLASSES], "priors": priors_used,
              "protections": protections, "results": results, "published": {f"{r}/{d}": v for (r, d), v in
                                                                             PUBLISHED.items()},
              "table": table, "environment": environment, "wall_seconds": round(wall, 1),
              "command": _command(argv),
              "time": time.strftime(TIME_FORMAT)}
    _json_dump(json_path, record)
    plots = plot(results, columns, json_path.with_suffix(""))
    prior_archs = ", ".join(f"{k} {a}" for k, a in {v["name"]: v["arch"] for v in priors_used.values()}.items())
    header = (f"Scale `{scale.name}` ({scale.tag()}): {scale.train_per_class} training / {scale.test_per_class} "
              f"test images per class of {', '.join(record['task_classes'])}; victims {scale.epochs} epochs "
              f"(scratch: {scale.scratch_arch}; priors: {prior_archs}); "
              f"budget `{scale.budget}`; seeds {seeds}; victim seeds {victim_seeds or 'as the seeds'} "
              f"(a cell is the mean ± sd over every seed × victim seed).\n"
              f"Hardware: {environment['cpu']}, {environment['cores']} cores, GPU {environment['gpu'] or 'none'}; "
              f"load average {environment['load_average_start'][0]:.1f} → {environment['load_average_end'][0]:.1f}; "
              f"torch {environment['torch']}. Wall time {wall / 60:.1f} min (cached cells included as loaded).\n"
              f"Test accuracy %; [brackets]: published, ResNet-18 from scratch on all of CIFAR-10, 60 epochs.\n\n")
    priors_text = "".join(f"- prior `{k}`: {v['note']}\n" for k, v in priors_used.items())
    json_path.with_suffix(".md").write_text(header + table + "\n" + priors_text)
    print(header + table + "\n" + priors_text)
    log(f"wrote {json_path}, {json_path.with_suffix('.md')}, {', '.join(str(p) for p in plots)}")


if __name__ == "__main__":
    main()
