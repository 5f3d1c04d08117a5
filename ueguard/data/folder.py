"""Walking an image folder in ImageFolder layout: which files, which labels, in a stable order.

``SRC/<class>/.../<file>``: the first-level subfolder names are the class names (sorted, so label
indices are reproducible); files directly under SRC have no class. Hidden files and folders
(``.DS_Store``, ``.thumbs/``) are not protected but listed as skipped, with the reason, so nothing is
left out without a word; a hidden folder is one entry, not walked.

Symbolic links are handled explicitly, because they can loop, dangle, or lead out of SRC:

* a link to a file inside SRC is read like any file;
* a link to a file outside SRC, and any link to a folder, is *skipped* (listed with the reason) unless
  ``follow_symlinks=True`` (``--follow-symlinks``); followed folders are walked once each, so a link back
  to an ancestor cannot loop;
* a broken link or a link loop is *failed* (listed with the reason), as is a subfolder that cannot be
  listed; the rest of the folder is still walked.

Only regular files are ever opened: a FIFO named ``x.png`` would block a reader forever.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ueguard.data.images import SUPPORTED_SUFFIXES


@dataclass(frozen=True)
class FolderEntry:
    """One file found under the source folder.

    ``relpath`` is relative to the source root (POSIX separators, also used as the sample id in the
    manifest); ``label`` is the class index or ``None``; ``skip_reason`` is set for files that are
    deliberately not processed (unsupported type, not in a class folder, a link not followed);
    ``error`` for entries that should have been processed but cannot be (broken link, link loop,
    unlistable folder).
    """

    relpath: PurePosixPath
    label: int | None
    skip_reason: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class FolderListing:
    root: Path
    classes: tuple[str, ...]
    entries: tuple[FolderEntry, ...]

    @property
    def images(self) -> list[FolderEntry]:
        """The entries that are to be protected (supported suffix, labelled when classes exist)."""
        return [e for e in self.entries if e.skip_reason is None and e.error is None]

    @property
    def skipped(self) -> list[FolderEntry]:
        return [e for e in self.entries if e.skip_reason is not None and e.error is None]

    @property
    def failed(self) -> list[FolderEntry]:
        """Entries found by the walk that cannot be read at all (see the module docstring)."""
        return [e for e in self.entries if e.error is not None]


_FOLLOW_HINT = "pass --follow-symlinks to include it"


def _link_problem(path: str) -> str:
    """Why following the link ``path`` fails: broken, a loop, or another OS error."""
    target = os.readlink(path)
    try:
        os.stat(path)
    except FileNotFoundError:
        return f"broken symbolic link: its target {target!r} does not exist"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"symbolic link loop: {target!r} leads back to itself"
        return f"cannot follow symbolic link to {target!r} ({error.strerror or error})"
    return ""


_INTO_OUTPUT = "inside the output folder: never read as a source (its files are protected copies)"


class _Excluded:
    """The output folder, recognised by path and by identity: its real path, and the (device, inode) of
    it and every folder under it, so that another path to any of them (a bind mount, a second link) is
    recognised too."""

    def __init__(self, folder: Path | None) -> None:
        self.real = folder.resolve() if folder is not None else None
        self.inodes: set[tuple[int, int]] = set()
        if folder is not None and folder.is_dir():
            for current, _, _ in os.walk(folder, followlinks=False):
                try:
                    self.inodes.add(_inode(Path(current)))
                except OSError:
                    pass

    def __contains__(self, path: Path) -> bool:
        if self.real is None:
            return False
        resolved = path.resolve()
        if resolved == self.real or self.real in resolved.parents:
            return True
        try:
            return resolved.is_dir() and _inode(resolved) in self.inodes
        except OSError:
            return False


_HIDDEN_FILE = "hidden file (its name starts with '.'): not protected; rename it to include it"
_HIDDEN_FOLDER = "hidden folder (its name starts with '.'): not walked, nothing in it is protected; rename it to include it"


def _walk(root: Path, follow_symlinks: bool,
          exclude: _Excluded = _Excluded(None)) -> list[tuple[PurePosixPath, str | None, str | None]]:
    """``(relpath, skip_reason, error)`` for every file under ``root`` (hidden ones and hidden folders as
    skipped entries), in a stable order: a folder's files (sorted), then its subfolders (sorted), depth
    first — the order of ``os.walk``. ``exclude`` (the output folder) is never walked, whether it is
    reached as a folder of the tree, through a link, or under another path to the same folder."""
    real_root = root.resolve()
    walked = {_inode(real_root)}
    found: list[tuple[PurePosixPath, str | None, str | None]] = []
    stack = [(root, PurePosixPath("."))]
    while stack:
        folder, rel_dir = stack.pop()
        try:
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as error:
            found.append((rel_dir, None, f"cannot list this folder ({error.strerror or error})"))
            continue
        subfolders = []
        for child in children:
            rel = rel_dir / child.name
            if child.name.startswith("."):
                hidden_folder = child.is_dir(follow_symlinks=False)
                found.append((rel, _HIDDEN_FOLDER if hidden_folder else _HIDDEN_FILE, None))
                continue
            if not child.is_symlink():
                if child.is_dir(follow_symlinks=False):
                    if Path(child.path) in exclude:
                        found.append((rel, _INTO_OUTPUT, None))
                        continue
                    walked.add(_inode(Path(child.path)))
                    subfolders.append((Path(child.path), rel))
                elif child.is_file(follow_symlinks=False):
                    found.append((rel, None, None))
                else:
                    found.append((rel, "not a regular file (a FIFO, socket or device), never opened", None))
                continue
            problem = _link_problem(child.path)
            if problem:
                found.append((rel, None, problem))
                continue
            target = Path(child.path).resolve()
            inside = target == real_root or real_root in target.parents
            if target in exclude:
                found.append((rel, f"symbolic link to {target}, {_INTO_OUTPUT}", None))
            elif target.is_dir():
                if not follow_symlinks:
                    found.append((rel, f"symbolic link to a folder ({target}), not followed; {_FOLLOW_HINT}", None))
                elif _inode(target) in walked:
                    found.append((rel, f"symbolic link to {target}, a folder already walked (a loop or a "
                                       "second path to it): not walked again", None))
                else:
                    walked.add(_inode(target))
                    subfolders.append((Path(child.path), rel))
            elif target.is_file():
                if inside or follow_symlinks:
                    found.append((rel, None, None))
                else:
                    found.append((rel, f"symbolic link to {target}, outside the source folder: not followed; "
                                       f"{_FOLLOW_HINT}", None))
            else:
                found.append((rel, f"symbolic link to {target}, not a regular file: never opened", None))
        stack.extend(reversed(subfolders))
    return found


def _inode(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_dev, info.st_ino


def scan_folder(root: str | os.PathLike, *, classes: tuple[str, ...] | None = None,
                follow_symlinks: bool = False, exclude: str | os.PathLike | None = None) -> FolderListing:
    """List the files under ``root`` with their labels.

    ``follow_symlinks`` also follows links to folders and links that lead outside ``root`` (see the
    module docstring). ``exclude`` (protect's output folder) is never walked, however it is reached.
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
    walked = _walk(root, follow_symlinks, _Excluded(None if exclude is None else Path(exclude)))
    present = tuple(sorted({rel.parts[0] for rel, skip, error in walked if len(rel.parts) > 1 and not error}))
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
    for rel, skip, error in walked:
        suffix = rel.suffix.lower()
        label = index.get(rel.parts[0]) if len(rel.parts) > 1 else None
        if skip or error:
            reason = skip
        elif suffix not in SUPPORTED_SUFFIXES:
            reason = f"unsupported file type {suffix or '(no suffix)'!r}; supported: {sorted(SUPPORTED_SUFFIXES)}"
        elif classes and label is None:
            reason = "not inside a class subfolder (labels come from the first-level subfolder names)"
        else:
            reason = None
        entries.append(FolderEntry(rel, label, reason, error))
    listing = FolderListing(root, tuple(classes), tuple(entries))
    if not listing.images:
        raise ValueError(
            f"{root}: no images found (looked for {', '.join(sorted(SUPPORTED_SUFFIXES))} in class subfolders)"
        )
    return listing
