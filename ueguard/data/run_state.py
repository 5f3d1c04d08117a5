"""Where an unfinished ``protect`` run keeps what ``--resume`` needs: outside DST, private to the user.

The resume state is the perturbation itself (``perturbation.pt`` or the on-disk store), a bi-level
method's round checkpoint (surrogate, δ so far) and, with a streaming loader, the decoded originals at
the working size. Any of these undoes the protection — subtract δ from a published file and the
original is back — so none of it may ever sit in the folder a user publishes, not even for the
moment between the last output and the end of the run, when a kill would leave it there.

It lives in ``<cache>/protect-state/<key>/`` instead (``--cache-dir``, default ``$UEGUARD_CACHE`` or
``~/.cache/ueguard``), made with mode 0700. The key is a digest of DST's real path and its inode, so
it follows the folder, not a name: a DST deleted and made again gets a fresh state. A cache inside
DST or SRC is refused (it would publish the state, or write into the originals). The folder is
deleted once the manifest says the run is finished, and states whose DST no longer exists are pruned
when another is made.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from ueguard.data.loaders import default_cache_dir
from ueguard.errors import UsageError

STATE_ROOT = "protect-state"
OWNER_FILE = "output-folder.txt"


def state_folder(dst: Path, cache_dir: str | os.PathLike | None = None, *, src: Path | None = None) -> Path:
    """The private resume-state folder of output folder ``dst`` (which must exist), made when missing."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    real_dst, real_cache = Path(os.path.realpath(dst)), Path(os.path.realpath(cache))
    for owner, what in ((real_dst, "output"), (Path(os.path.realpath(src)) if src else None, "source")):
        if owner is not None and (real_cache == owner or owner in real_cache.parents):
            raise UsageError(f"the cache folder {cache} is inside the {what} folder {owner}: ueguard keeps the "
                             "resume state (the perturbation) there, which must never be published nor written "
                             "into the originals; pass --cache-dir outside it")
    folder = state_path(dst, cache)
    info = os.stat(real_dst)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(folder, 0o700)
        (folder / OWNER_FILE).write_text(f"{info.st_dev} {info.st_ino} {real_dst}\n", encoding="utf-8",
                                         errors="surrogateescape")
    except OSError as error:
        raise UsageError(f"cannot make the resume-state folder {folder} ({error.strerror or error}); pass "
                         "--cache-dir to a writable folder") from None
    _prune(folder.parent, keep=folder)
    return folder


def state_path(dst: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`state_folder` keeps ``dst``'s resume state (nothing is made or checked)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    real_dst = os.path.realpath(dst)
    info = os.stat(real_dst)
    key = hashlib.sha256(f"{real_dst}\0{info.st_dev}\0{info.st_ino}".encode("utf-8", "surrogateescape")).hexdigest()
    return Path(os.path.realpath(cache)) / STATE_ROOT / key[:32]


def remove_state(folder: Path) -> None:
    """Delete a run's state folder (the run finished, or it belongs to a DST that is gone)."""
    shutil.rmtree(folder, ignore_errors=True)


def _prune(root: Path, keep: Path) -> None:
    """Remove the states of output folders that no longer exist (deleted after a killed run, or deleted and
    made again: another inode)."""
    try:
        siblings = list(root.iterdir())
    except OSError:
        return
    for other in siblings:
        if other == keep or not other.is_dir() or other.is_symlink():
            continue
        try:
            dev, ino, owner = (other / OWNER_FILE).read_text(encoding="utf-8", errors="surrogateescape").strip().split(" ", 2)
        except (OSError, ValueError):  # being made by another run, or not ours: left alone
            continue
        try:
            info = os.stat(owner)
        except FileNotFoundError:
            remove_state(other)
            continue
        except OSError:
            continue
        if (str(info.st_dev), str(info.st_ino)) != (dev, ino):
            remove_state(other)
