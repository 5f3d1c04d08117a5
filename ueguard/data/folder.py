"""Walking an image folder in ImageFolder layout: which files, which labels, in a stable order.

``SRC/<class>/.../<file>``: the first-level subfolder names are the class names (sorted, so label
indices are reproducible); files directly under SRC have no class. The walk never follows symbolic
links to directories (they could loop or leave SRC) and skips hidden files and folders (``.DS_Store``,
ueguard's own temporary files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ueguard.data.images import SUPPORTED_SUFFIXES


@dataclass(frozen=True)
class FolderEntry:
    """One file found under the source folder.

    ``relpath`` is relative to the source root (POSIX separators, also used as the sample id in the
    manifest); ``label`` is the class index or ``None``; ``skip_reason`` is set for files that are not
    processed at all (unsupported type, not in a class folder).
    """

    relpath: PurePosixPath
    label: int | None
    skip_reason: str | None = None


@dataclass(frozen=True)
class FolderListing:
    root: Path
    classes: tuple[str, ...]
    entries: tuple[FolderEntry, ...]

    @property
    def images(self) -> list[FolderEntry]:
        """The entries that are to be protected (supported suffix, labelled when classes exist)."""
        return [e for e in self.entries if e.skip_reason is None]

    @property
    def skipped(self) -> list[FolderEntry]:
        return [e for e in self.entries if e.skip_reason is not None]


def _walk_files(root: Path) -> list[PurePosixPath]:
    found: list[PurePosixPath] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        for name in sorted(filenames):
            if not name.startswith("."):
                found.append(rel_dir / name)
    return found


def scan_folder(root: str | os.PathLike, *, classes: tuple[str, ...] | None = None) -> FolderListing:
    """List the files under ``root`` with their labels.

    ``classes`` fixes the class list (e.g. a test folder must use the training folder's classes); by
    default it is the sorted first-level subfolder names. Raises ``FileNotFoundError`` /
    ``NotADirectoryError`` / ``ValueError`` with actionable messages when the folder is missing, not a
    folder, contains no images, or (with ``classes`` given) has a class the reference does not have.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder (give the folder that holds the images)")
    files = _walk_files(root)
    present = tuple(sorted({f.parts[0] for f in files if len(f.parts) > 1}))
    if classes is None:
        classes = present
    else:
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise ValueError(
                f"{root}: class folders {unknown} are not among the reference classes {list(classes)}"
            )
    index = {name: i for i, name in enumerate(classes)}
    entries = []
    for rel in files:
        suffix = rel.suffix.lower()
        label = index.get(rel.parts[0]) if len(rel.parts) > 1 else None
        if suffix not in SUPPORTED_SUFFIXES:
            reason = f"unsupported file type {suffix or '(no suffix)'!r}; supported: {sorted(SUPPORTED_SUFFIXES)}"
        elif classes and label is None:
            reason = "not inside a class subfolder (labels come from the first-level subfolder names)"
        else:
            reason = None
        entries.append(FolderEntry(rel, label, reason))
    listing = FolderListing(root, tuple(classes), tuple(entries))
    if not listing.images:
        raise ValueError(
            f"{root}: no images found (looked for {', '.join(sorted(SUPPORTED_SUFFIXES))} in class subfolders)"
        )
    return listing
