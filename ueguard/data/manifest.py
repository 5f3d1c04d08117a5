"""The run manifest ``DST/ueguard-manifest.jsonl``: one JSON object per line, appended as work finishes.

Line kinds (field ``kind``):
  * ``run`` — first line of every invocation (a resumed run appends another): the resolved
    configuration, ueguard / torch versions, device, and the SHA-256 of the surrogate's initial weights.
  * ``pseudo_labels`` — with ``--labels auto`` on a flat folder: the surrogate whose features were
    clustered, the number of clusters, how it was chosen (``given`` or ``silhouette``, with the score
    of every k tried) and the cluster sizes.
  * ``generation`` — the method's budget (``norm``: ``linf``/``l2``/``l0``, ``budget``) and statistics
    once the perturbation is computed.
  * ``file`` — one per input file, written right after its output is in place: ``source``, ``output``,
    ``source_sha256``, ``output_sha256``, ``label`` (a class folder, or ``cluster_k`` with
    ``pseudo_label`` true), ``method``, ``eps``, ``seed``, and measured on the decoded saved file:
    ``linf`` and ``rms`` (1/255 pixel levels), ``psnr``, ``l2`` ([0, 1] units), ``l0`` (changed pixel
    positions), plus the method's ``norm`` and ``budget`` and ``within_budget`` (the change is within
    that budget, allowing 8-bit rounding; see ``ueguard.sdk.protect.within_budget``), ``status``
    (``ok``, ``failed`` — could not be read or written — or ``skipped`` — not an image / not in a class
    folder) and ``error``.
The manifest never contains pixel data. Each line is flushed and fsync'ed, so a crash loses at most the
line being written; a torn last line is ignored when reading, and a writer reopening the file starts a
new line after it. A file name that is not valid UTF-8 (bytes kept by Python as lone surrogates) is
written with ``\\udcXX`` escapes, which ``json.loads`` turns back into the same name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ueguard.errors import UsageError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent runs on one folder are not detected
    fcntl = None

MANIFEST_NAME = "ueguard-manifest.jsonl"


class ManifestWriter:
    """Appends records to a manifest. Holds an exclusive lock on it while open, so two runs cannot write
    into one output folder at the same time (the second is refused at once)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        try:
            _lock(self._fh)
        except BlockingIOError:
            self._fh.close()
            raise UsageError(f"another ueguard run is writing to {self.path.parent}; wait for it to finish "
                             "(or stop it), then run again with --resume") from None
        if self._fh.tell() > 0 and not _ends_with_newline(self.path):
            self._fh.write("\n")  # a crash mid-line: end that line, so the next record is not glued onto it
        self._fh.flush()
        #: Byte offset of this writer's first record (what :class:`ManifestItems` reads from).
        self.start = os.fstat(self._fh.fileno()).st_size

    def write(self, record: dict[str, Any]) -> None:
        text = json.dumps(record, ensure_ascii=False, allow_nan=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a non-UTF-8 file name: escape it rather than fail the run
            text = json.dumps(record, ensure_ascii=True, allow_nan=False)
        self._fh.write(text + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lock(fh) -> None:
    if fcntl is not None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


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
