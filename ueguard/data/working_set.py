"""The working set: every image of a run at the working resolution, as one uint8 tensor.

Optimisation happens here, not on the native files: a folder of mixed-size photos becomes
``N×3×S×S`` uint8 (grayscale images replicated to three channels and flagged, so their perturbation
can be kept gray), labels as int64, and the sample ids (relative paths) that key sample-wise
perturbations. Native images are decoded again at save time, so memory is bounded by the working set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ueguard.data.folder import FolderEntry, FolderListing
from ueguard.data.images import DEFAULT_MAX_PIXELS, DecodedImage, ImageReadError, load_image, open_quietly

#: Working resolutions the automatic choice snaps to (square): CIFAR-like up to ImageNet-like.
SIZE_STEPS = (32, 64, 96, 128, 160, 192, 224)


@dataclass
class WorkingSet:
    """Images in [0, 255] as uint8 ``N×3×H×W``; ``grayscale[i]`` marks images whose three channels are
    equal copies of one plane; ``ids[i]`` is the sample id (relative path, or the array index).

    ``backing``: the ``.npy`` file the images are memory-mapped from when the set was spilled to disk
    (it did not fit in memory; see :func:`ueguard.data.loaders.load_working_set`), else None. A spilled
    set stays on the host: :meth:`to` moves labels and flags, and the loops gather each batch of images
    with :meth:`images_at` and move it."""

    images: torch.Tensor
    labels: torch.Tensor
    grayscale: torch.Tensor
    classes: tuple[str, ...]
    ids: list[str]
    backing: Path | None = None

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"working images must be uint8 N×3×H×W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (n,) or self.grayscale.shape != (n,) or len(self.ids) != n:
            raise ValueError("labels, grayscale flags and ids must have one entry per image")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def images_at(self, index: torch.Tensor) -> torch.Tensor:
        """The uint8 images of samples ``index``, gathered where the images live (a spilled set's stay on
        the host; the caller moves the batch to its device)."""
        return self.images[index.to(self.images.device)]

    def to(self, device: torch.device | str) -> "WorkingSet":
        if self.backing is not None:  # spilled: the images stay in their file
            return WorkingSet(self.images, self.labels.to(device), self.grayscale.to(device), self.classes, self.ids,
                              backing=self.backing)
        return WorkingSet(self.images.to(device), self.labels.to(device), self.grayscale.to(device),
                          self.classes, self.ids)

    def subset(self, index: torch.Tensor | Sequence[int]) -> "WorkingSet":
        index = torch.as_tensor(index, dtype=torch.long)
        dev = index.to(self.images.device)
        return WorkingSet(self.images[dev], self.labels[dev], self.grayscale[dev], self.classes,
                          [self.ids[i] for i in index.tolist()])


def suggest_size(sides: Sequence[int], cap: int = SIZE_STEPS[-1]) -> int:
    """A working resolution suited to the data: the median short side, snapped up to the next step of
    :data:`SIZE_STEPS` (so 32-px CIFAR stays 32, a 500-px photo folder becomes 224), capped at ``cap``."""
    median = float(np.median(np.asarray(sides))) if len(sides) else SIZE_STEPS[0]
    for step in SIZE_STEPS:
        if median <= step:
            return min(step, cap)
    return min(SIZE_STEPS[-1], cap)


def resize_float(planes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a float ``C×H×W`` or ``N×C×H×W`` tensor with bilinear (antialiased when shrinking)
    interpolation. Every output value is a convex combination of input values, so a tensor bounded by
    ±ε stays bounded by ±ε — the property the budget on saved files relies on."""
    batched = planes if planes.dim() == 4 else planes[None]
    if tuple(batched.shape[-2:]) == tuple(size):
        return planes
    out = F.interpolate(batched, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out if planes.dim() == 4 else out[0]


def to_working(image: DecodedImage, size: int) -> torch.Tensor:
    """The decoded image at ``size×size`` as uint8 ``3×S×S`` (grayscale replicated)."""
    planes = torch.from_numpy(image.to_float()).permute(2, 0, 1)
    planes = resize_float(planes, (size, size)).clamp_(0, 1)
    u8 = torch.round(planes * 255).to(torch.uint8)
    return u8.expand(3, -1, -1).clone() if u8.shape[0] == 1 else u8


def decode_working(path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, bool]:
    """One file at the working resolution (see :func:`to_working`) and whether it is grayscale. Every
    failure, running out of memory included, is an :class:`ImageReadError` naming the file, so one file
    too large for the memory left fails alone."""
    image = load_image(path, max_pixels=max_pixels)
    try:
        return to_working(image, size), image.grayscale
    except MemoryError as error:
        raise ImageReadError(path, f"not enough memory to resize {image.width}x{image.height} pixels to the "
                                   f"working size") from error


def load_folder_working_set(
    listing: FolderListing,
    entries: Sequence[FolderEntry],
    size: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 4,
    on_error: Callable[[FolderEntry, ImageReadError], None] | None = None,
    on_progress: Callable[[], None] | None = None,
) -> tuple[WorkingSet, list[FolderEntry]]:
    """Decode ``entries`` at the working resolution. Files that cannot be read are reported through
    ``on_error`` and left out; ``on_progress`` is called once per file. Returns the working set and the
    entries it holds, in order."""

    def decode(entry: FolderEntry):
        try:
            return entry, decode_working(listing.root / entry.relpath, size, max_pixels)
        except ImageReadError as error:
            return entry, error

    # Filled in place (not a list stacked at the end, which would hold every image twice at the peak).
    images = torch.empty(len(entries), 3, size, size, dtype=torch.uint8)
    labels, gray, kept = [], [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for entry, result in pool.map(decode, entries):
            if on_progress is not None:
                on_progress()
            if isinstance(result, ImageReadError):
                if on_error is not None:
                    on_error(entry, result)
                continue
            images[len(kept)] = result[0]
            gray.append(result[1])
            labels.append(-1 if entry.label is None else entry.label)
            kept.append(entry)
    images = images[:len(kept)]
    working = WorkingSet(images, torch.tensor(labels, dtype=torch.long), torch.tensor(gray, dtype=torch.bool),
                         listing.classes, [str(e.relpath) for e in kept])
    return working, kept


def image_sides(listing: FolderListing, entries: Sequence[FolderEntry], limit: int = 512) -> list[int]:
    """Short sides of up to ``limit`` evenly spaced images, read from headers only (cheap)."""
    step = max(1, len(entries) // limit)
    sides = []
    for entry in entries[::step]:
        try:
            with open_quietly(listing.root / entry.relpath, formats=None) as im:
                sides.append(min(im.size))
        except Exception:  # unreadable files are reported when they are decoded
            continue
    return sides
