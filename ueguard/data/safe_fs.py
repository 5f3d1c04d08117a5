"""Writing under an output folder without ever writing through a link.

The promise is that SRC is never written to, whatever DST contains. A symbolic link planted in DST (a
class folder replaced by a link into SRC, a manifest linked to a file elsewhere) would redirect an
ordinary ``open(DST/cat/a.png, "w")`` into the originals, so ueguard refuses a DST whose tree holds a
link (:func:`find_link`, checked before the run writes) and, because the tree can change while a run
is going, every write also walks DST one component at a time from a directory descriptor with
``O_NOFOLLOW`` (:func:`open_directory`): a link met at any depth is an error, never followed. Files are
created with ``O_EXCL | O_NOFOLLOW`` and renamed within the same directory descriptor
(:func:`write_atomically`); a rename replaces a link or a hard link by name and never writes into
its target. The one file ueguard appends to in place, the manifest, is opened with ``O_NOFOLLOW`` and
refused when it is not a regular file with a single name (:func:`open_append`), since a hard link to a
file elsewhere would make the append write there.

On a platform without ``dir_fd`` support (Windows) the same calls fall back to path-based writes.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_DIR_FD = os.open in os.supports_dir_fd and os.rename in os.supports_dir_fd and bool(_NOFOLLOW)  # rename: replace shares it


class LinkError(OSError):
    """A write would have gone through a symbolic link (or into a file with several names)."""

    def __init__(self, path: os.PathLike | str, what: str = "is a symbolic link") -> None:
        super().__init__(errno.ELOOP, f"{path} {what}: ueguard never writes through a link; remove it, "
                                      "or choose a new --out")
        self.path = Path(path)


def find_link(root: Path) -> Path | None:
    """The first symbolic link in ``root``'s tree (``root`` itself included), or None. Not followed."""
    if root.is_symlink():
        return root
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs) + sorted(files):
            path = Path(folder, name)
            if path.is_symlink():
                return path
    return None


def open_directory(root: Path, parts: Sequence[str], *, create: bool = False, follow_root: bool = False) -> int:
    """A descriptor of ``root/parts[0]/…/parts[-1]``, reached one component at a time without following
    a link (``root`` itself included unless ``follow_root``); missing folders are made when ``create``.
    Raises :class:`LinkError` for a link on the way. The caller closes the descriptor."""
    try:
        fd = os.open(root, os.O_RDONLY | _DIRECTORY | (0 if follow_root else _NOFOLLOW))
    except OSError as error:
        raise _link_error(error, root) from None
    try:
        here = root
        for part in parts:
            here = here / part
            if create:
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                child = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW, dir_fd=fd)
            except OSError as error:
                raise _link_error(error, here) from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _link_error(error: OSError, path: Path) -> OSError:
    """ELOOP from ``O_NOFOLLOW`` (and ENOTDIR for a link to a file) means a link stood at ``path``."""
    if error.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK) and os.path.islink(path):
        return LinkError(path)
    return error


def write_atomically(path: Path, write: Callable[[BinaryIO], None], *, root: Path | None = None,
                     before_rename: Callable[[], None] | None = None) -> None:
    """Write ``path`` through ``write(fh)`` into a hidden ``.ueguard-<random>.tmp`` beside it, fsync,
    rename it into place and fsync the folder, so the file appears complete or not at all. With
    ``root``, every folder from ``root`` down to ``path``'s is reached without following a link (see
    :func:`open_directory`) and made when missing. OSError on failure; the temporary file is removed."""
    tmp = f".ueguard-{uuid.uuid4().hex}.tmp"  # a fixed prefix: a long name plus a suffix could exceed NAME_MAX
    if not _DIR_FD:  # pragma: no cover - Windows
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_by_path(path, path.with_name(tmp), write, before_rename)
        return
    base = root if root is not None else path.parent
    parts = path.parent.relative_to(root).parts if root is not None else ()
    if root is None:
        base.mkdir(parents=True, exist_ok=True)
    folder = open_directory(base, parts, create=True, follow_root=root is None)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666, dir_fd=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            if before_rename is not None:
                before_rename()
            os.replace(tmp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=folder)
            except OSError:
                pass
            raise
        os.fsync(folder)
    finally:
        os.close(folder)


def _write_by_path(path: Path, tmp: Path, write, before_rename) -> None:  # pragma: no cover - Windows
    try:
        with open(tmp, "xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_append(path: Path) -> int:
    """A read-write ``O_APPEND`` descriptor of ``path`` (created when missing), refusing a link or a file that has
    other names (a hard link): an append writes into the file itself, wherever else it is visible."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o666)
    except OSError as error:
        raise _link_error(error, path) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        raise LinkError(path, "is not a regular file with a single name (a hard link or a device)")
    return fd
