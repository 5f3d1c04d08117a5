"""Splits of the originals that ``verify`` keeps out of training.

A data owner often has only two folders, the originals and their protected copy. ``verify PROTECTED
--clean ORIGINALS`` without ``--test`` then holds out a stratified, seeded share of the originals
(``--holdout``, default 20 %, at least one image per class) as the clean test set. The held-out images
are left out of *both* training sets: out of the clean one, and their protected copies out of the
protected one, matched by relative path without the extension (protect keeps the names and may change
the format). Otherwise the protected-trained model would be tested on images it trained on (in their
protected form) and the verdict would be too kind to the attacker — or too harsh.

The same stratified draw picks the clean validation split of ``earlystop``.
"""

from __future__ import annotations

import dataclasses
from pathlib import PurePosixPath

import torch

from ueguard.data.folder import FolderListing
from ueguard.errors import UsageError

#: Share of the originals held out as the test set when ``verify`` has ``--clean`` and no ``--test``.
DEFAULT_HOLDOUT = 0.2


def sample_stem(sample_id: str | PurePosixPath) -> str:
    """A sample's relative path without its extension: how a protected copy finds its original."""
    return str(PurePosixPath(sample_id).with_suffix(""))


def stratified_indices(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded ``fraction`` of every class in ``labels`` (at least one per class with
    two or more members; classes with one member give none)."""
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        if len(members) < 2:
            continue
        k = max(1, round(fraction * len(members)))
        picked.append(members[torch.randperm(len(members), generator=gen)[:k]])
    return torch.cat(picked).sort().values if picked else torch.empty(0, dtype=torch.long)


def holdout_share(test, clean, holdout: float | None) -> float | None:
    """The share of ``clean`` to hold out as the test set: ``None`` when ``test`` is given (the test
    folder is used as it is), else ``holdout`` or :data:`DEFAULT_HOLDOUT`. A usage error when there is
    neither a test folder nor originals to hold out from, or both a test folder and ``holdout``."""
    if test is None and clean is None:
        raise UsageError("verify needs clean test images: pass --test TEST, or --clean ORIGINALS and a share of "
                         f"the originals is held out as the test set (--holdout, default {DEFAULT_HOLDOUT:g})")
    if test is not None:
        if holdout is not None:
            raise UsageError("--holdout holds out a test set from --clean, but --test gives one: pass one of them")
        return None
    return DEFAULT_HOLDOUT if holdout is None else holdout


def hold_out_test(clean: FolderListing, fraction: float, seed: int) -> tuple[FolderListing, FolderListing]:
    """Split the originals' listing into (training listing, test listing): a stratified, seeded
    ``fraction`` of every class's images, at least one each, never all of a class."""
    images = clean.images
    labels = torch.tensor([e.label for e in images], dtype=torch.long)
    counts = torch.bincount(labels, minlength=len(clean.classes))
    if (counts < 2).any():
        few = [clean.classes[i] for i in torch.nonzero(counts < 2).flatten().tolist()]
        raise UsageError(f"--clean {clean.root}: class(es) {', '.join(few)} have fewer than two images, too few to "
                         "hold one out for testing and train on the rest; pass --test TEST")
    held = {images[i].relpath for i in stratified_indices(labels, fraction, seed).tolist()}
    test = [e for e in images if e.relpath in held]
    return leave_out(clean, {sample_stem(e.relpath) for e in test}), dataclasses.replace(clean, entries=tuple(test))


def leave_out(listing: FolderListing, stems: set[str]) -> FolderListing:
    """``listing`` without the images whose relative path, extension aside, is in ``stems`` (entries that
    are skipped or failed stay, so the report still names them)."""
    keep = [e for e in listing.entries
            if not (e.skip_reason is None and e.error is None and sample_stem(e.relpath) in stems)]
    return dataclasses.replace(listing, entries=tuple(keep))


def holdout_record(test: FolderListing, originals: int, protected_left_out: int, fraction: float, seed: int) -> dict:
    """What the report records of a held-out test set: the share and seed, how many originals it was drawn
    from, how many protected copies were left out with them (fewer than the held-out files when some
    copies were renamed: those stay in training), and every held-out file (relative to the originals)."""
    return {"fraction": fraction, "seed": seed, "originals": originals, "protected_left_out": protected_left_out,
            "files": [str(e.relpath) for e in test.images]}
