"""CIFAR-10's python batches → PNG image folders (the benchmark runs ueguard on real image files, as a
user does), and the priors the paradigms start from: a disjoint one trained here, the published akamaster one."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from _reproduce.cache import _digest, exclusive
from _reproduce.scales import (AKAMASTER, CIFAR10_CLASSES, CIFAR100_TASK, CIFAR100_TEST, PRIOR_CLASSES, TASK_CLASSES,
                               TEST_BATCH, TRAIN_BATCHES, Scale)


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
    splits, sources = {}, {}
    for train in (True, False):
        for name, classes, per_class in (
                ("task", scale.task_classes, scale.train_per_class if train else scale.test_per_class),
                ("prior", scale.prior_classes, scale.prior_per_class if train else scale.test_per_class)):
            source = scale.task_data if name == "task" else "cifar10"
            split = "train" if train else "test"
            root = out / f"{name}{_folder_suffix(name, classes, source)}-{split}-{per_class}pc-s{seed}"
            if not root.exists():
                if (source, train) not in sources:
                    sources[(source, train)] = read_cifar100(data, train) if source == "cifar100" else (
                        *read_cifar(data / "cifar10", train), CIFAR10_CLASSES)
                images, labels, names = sources[(source, train)]
                write_image_folder(images, labels, balanced_indices(labels, classes, per_class, seed), root, names)
            splits[(name, train)] = root
    return Folders(splits[("task", True)], splits[("task", False)], splits[("prior", True)], splits[("prior", False)])


def read_cifar100(data: Path, train: bool) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The held-out task set: CIFAR-100's 20-class training cut, or the official test file (all 100 classes;
    the caller picks the cut's), as (N×32×32×3 uint8, fine labels, the 100 fine class names)."""
    npz = data / CIFAR100_TASK
    if not npz.is_file():
        raise SystemExit(f"{npz}: missing; pass --data DIR with {CIFAR100_TASK} (and {CIFAR100_TEST}) inside")
    with np.load(npz) as cut:
        names = tuple(str(n) for n in cut["fine_label_names"])
        if train:
            return np.ascontiguousarray(cut["images"]), cut["fine_labels"].astype(np.int64), names
    try:
        with open(data / CIFAR100_TEST, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        rows, labels = np.asarray(batch["data"], dtype=np.uint8), np.asarray(batch["fine_labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, EOFError) as error:
        raise SystemExit(f"{data / CIFAR100_TEST}: not a readable CIFAR-100 python file "
                         f"({type(error).__name__}: {error})") from None
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels, names


def _folder_suffix(name: str, classes: tuple[int, ...], source: str = "cifar10") -> str:
    """``-c<classes>`` in a folder's name when its classes are not the split's usual ones, ``-cifar100`` for
    the held-out task set (the earlier scales' folders keep their names, and so their cache)."""
    if source != "cifar10":
        return f"-{source}"
    usual = TASK_CLASSES if name == "task" else PRIOR_CLASSES
    return "" if tuple(classes) == usual else "-c" + "".join(str(c) for c in classes)


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

    extra = "".join(f"-{v}" for v in (scale.prior_recipe, scale.precision) if v)  # none for the earlier scales
    path = cache / "priors" / (f"disjoint{_folder_suffix('prior', scale.prior_classes)}-{scale.prior_arch}-"
                               f"{scale.prior_per_class}pc-{scale.prior_epochs}ep{extra}-s{seed}.pth")
    with exclusive(cache, f"prior-{path.stem}"):
        accuracy, note = train_prior(folders.prior_train, folders.prior_test, scale.prior_arch, scale.prior_epochs,
                                     seed, path, recipe=scale.prior_recipe, precision=scale.precision or "auto")
    return Prior("disjoint", path, scale.prior_arch, accuracy, note)


def akamaster_prior(data: Path) -> Prior | None:
    path = data / AKAMASTER
    if not path.is_file():
        return None
    return Prior("akamaster", path, "resnet20_cifar", 0.9178,
                 "akamaster ResNet-20 on all ten CIFAR-10 classes (published best_prec1 91.78 %): same-class prior")
