"""The run manifest ``DST/ueguard-manifest.jsonl``: one JSON object per line, appended as work finishes.

Line kinds (field ``kind``):
  * ``run`` — first line of every invocation (a resumed run appends another): the resolved
    configuration, ueguard / torch versions, device, and the SHA-256 of the surrogate's initial weights.
  * ``pseudo_labels`` — with ``--labels auto`` on a flat folder: the surrogate whose features were
    clustered, the number of clusters, how it was chosen (``given`` or ``silhouette``, with the score
    of every k tried) and the cluster sizes.
  * ``generation`` — the method's budget (``norm``: ``linf``/``l2``/``l0``, ``budget``; ``budget_parts``
    when it is the sum of several branches' radii, as DUNE's spatial + colour) and statistics once the
    perturbation is computed.
  * ``file`` — one per input file, written right after its output is in place: ``source``, ``output``,
    ``source_sha256``, ``output_sha256``, ``label`` (a class folder, or ``cluster_k`` with
    ``pseudo_label`` true), ``method``, ``eps``, ``seed``, and measured on the decoded saved file:
    ``linf`` and ``rms`` (1/255 pixel levels), ``psnr``, ``l2`` ([0, 1] units), ``l0`` (changed pixel
    positions), plus the method's ``norm`` and ``budget`` and ``within_budget`` (the change is within
    that budget, allowing 8-bit rounding; see ``ueguard.sdk.protect.within_budget``), ``status``
    (``ok``, ``failed`` — could not be read or written — or ``skipped`` — not an image / not in a class
    folder) and ``error``.
  * ``complete`` — the last line of a finished run: the counts of ``ok``, ``failed`` and ``skipped``
    files. Only a manifest whose last record is ``complete`` describes a finished folder; the resume
    state (the perturbation itself) was deleted before it was written, and it never lived in DST.
The manifest never contains pixel data. Each line is written whole and fsync'ed; a write that fails
part-way is cut back, and a torn last line left by a kill is cut off by the next writer (and ignored by
readers), so the file is valid JSONL after any fault. A file name that is not valid UTF-8 (bytes kept by Python as lone surrogates) is
written with ``\\udcXX`` escapes, which ``json.loads`` turns back into the same name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ueguard.data.safe_fs import open_append
from ueguard.errors import UsageError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent runs on one folder are not detected
    fcntl = None

MANIFEST_NAME = "ueguard-manifest.jsonl"


class ManifestWriter:
    """Appends records to a manifest. Holds an exclusive lock on it while open, so two runs cannot write
    into one output folder at the same time (the second is refused at once).

    The manifest stays valid JSONL after any fault: a record is one ``write`` of its whole line, and a
    write that fails part-way (a full disk) is cut back to the end of the last whole line before the
    error is raised; a torn last line left by a kill is cut off when the file is opened again (it is a
    record of ueguard's own that never finished). The file is opened without following a link and must
    have a single name (:func:`ueguard.data.safe_fs.open_append`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd = open_append(self.path)
        try:
            _lock(self._fd)
        except BlockingIOError:
            os.close(self._fd)
            raise UsageError(busy_message(self.path.parent)) from None
        _cut_torn_tail(self._fd)
        #: Byte offset of this writer's first record (what :class:`ManifestItems` reads from).
        self.start = os.fstat(self._fd).st_size

    def write(self, record: dict[str, Any]) -> None:
        text = json.dumps(record, ensure_ascii=False, allow_nan=False)
        try:
            data = (text + "\n").encode("utf-8")
        except UnicodeEncodeError:  # a non-UTF-8 file name: escape it rather than fail the run
            data = (json.dumps(record, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")
        end = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as error:
            os.ftruncate(self._fd, end)  # never leave half a record behind
            raise ManifestWriteError(self.path, error) from error

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ManifestWriteError(OSError):
    """A record could not be appended (e.g. the disk is full); the manifest was cut back to its last
    whole record, so ``--resume`` continues from there."""

    def __init__(self, path: Path, error: OSError) -> None:
        super().__init__(error.errno, f"cannot append to the manifest {path} ({error.strerror or error}); it "
                                      "still ends with a whole record")
        self.path = path


def busy_message(folder: Path) -> str:
    return (f"another ueguard run is writing to {folder} right now; wait for it to finish (or stop it), then "
            "run the same command with --resume")


def is_busy(path: Path) -> bool:
    """Whether another process holds the lock of the manifest at ``path`` (a run writing there now)."""
    if fcntl is None or not path.is_file() or path.is_symlink():
        return False
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        _lock(fd)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the lock
    return False


def _lock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _cut_torn_tail(fd: int) -> None:
    """Truncate an unfinished last line (no newline after it) back to the end of the last whole line."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    block, end = 1 << 16, size
    while end > 0:
        start = max(0, end - block)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            os.ftruncate(fd, start + newline + 1)
            return
        end = start
    os.ftruncate(fd, 0)


def read_manifest(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The records of a manifest, skipping a torn (incomplete) final line."""
    for _, record in read_manifest_offsets(path):
        yield record


def first_run(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest's first ``run`` record — the invocation that made the folder (a ``--resume`` appends
    later ones) — or None when it has none; reads only up to it."""
    return next((r for r in read_manifest(path) if r.get("kind") == "run"), None)


def read_manifest_offsets(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(byte offset, record)`` for each record of a manifest, one line in memory at a time."""
    offset = 0
    with open(path, "rb") as fh:
        for line in fh:
            start, offset = offset, offset + len(line)
            try:
                yield start, json.loads(line.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue


class ManifestItems(Sequence):
    """The file records of one run, read from its manifest when used rather than kept in memory: those
    this run wrote (from byte offset ``start`` on) and the earlier runs' records at ``earlier`` (the
    finished files a ``--resume`` kept). Iterating streams the file; indexing or ``len`` reads it once
    into a list (then cached)."""

    def __init__(self, path: str | os.PathLike, start: int, earlier: Iterable[int] = ()) -> None:
        self.path = Path(path)
        self.start = start
        self.earlier = frozenset(earlier)
        self._list: list[dict[str, Any]] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._list is not None:
            yield from self._list
            return
        for offset, record in read_manifest_offsets(self.path):
            if record.get("kind") == "file" and (offset >= self.start or offset in self.earlier):
                yield record

    def _materialise(self) -> list[dict[str, Any]]:
        if self._list is None:
            self._list = list(iter(self))
        return self._list

    def __len__(self) -> int:
        return len(self._materialise())

    def __getitem__(self, index):
        return self._materialise()[index]

    def __eq__(self, other) -> bool:
        return list(self) == list(other) if isinstance(other, (list, ManifestItems)) else NotImplemented

    def __repr__(self) -> str:
        return f"ManifestItems({str(self.path)!r}, start={self.start}, earlier={len(self.earlier)})"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
