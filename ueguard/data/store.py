"""The on-disk perturbation store: sample-wise δ that does not fit in memory, memory-mapped and indexed
by sample id, and the checkpoints that make generation resumable.

A store is a folder of three files:

* ``store.json`` — the sidecar: format version, row shape, value encoding, the SHA-256 of the sample
  ids (row i belongs to ``ids[i]``), the run fingerprint that must match to reuse it (method, ε,
  seed, … — what ``--resume`` compares), and, once generation has finished, the perturbation's own
  record (``eps``, ``norm``, ``info``, ``resample``) with ``complete: true`` and the name of the data
  file (``data``).
* ``delta.i16`` (or ``.f16`` / ``.f32``) — the rows, ``N×3×H×W`` C-order, mapped with ``mmap``.
* ``done.u8`` — one byte per row: 1 once the row is final. Methods that compute every row once and mark
  it (AR) skip final rows when resumed.

Bi-level methods (EMN) rewrite every row each round instead, and checkpoint whole rounds: the store
writes a round to a second file, ``delta.next.i16``, and :meth:`PerturbationStore.commit` msyncs it and
makes it the current one (the two files swap roles each round; reads within a round see the rows it
wrote). A kill in the middle of a round therefore leaves the last committed round's rows intact, which
is what the method's :class:`RoundCheckpoint` (surrogate, optimiser, generators, history, and the name
of the committed file) describes; ``protect --resume`` continues with the next round, and the result
equals an uninterrupted run's. This costs a second file of the store's size while generating; it is
deleted when generation completes.

Encoding: ``float32`` by default — the values bit-exactly as the in-memory path computes them, so
``--store disk`` and ``--store memory`` give the same bytes for the same seed (and ``--store auto``,
which picks by the machine's memory, cannot make one command give two results). ``int16`` in units of
1/(255·128) halves the file — every multiple of 1/255 (what an 8-bit file can hold) and of
1/(255·2^k), k ≤ 7, is stored exactly, any other value is off by at most 1/(255·256) over
[−1.004, 1.004] — but a bi-level method reads its rounded rows back every round, so its trajectory
drifts from the memory path's by about one 8-bit level in a few files; it is kept for stores made
explicitly with it (its measurement: ``docs/results/2026-12-01-memory.md``). ``float16`` is as small, with an error that grows with |δ|.

Memory: the rows live in the page cache, not in the process. Reads copy the rows asked for; writes go
straight to the mapping. Mapped pages count towards the resident set while they stay mapped, so
after each checkpoint (every :data:`CHECKPOINT_BYTES` written, or an eighth of the rows) the store
``msync``\\ s and drops its pages (``MADV_DONTNEED``; for a shared file mapping the data stays in the
file and page cache). Crash safety: ``done`` flags are written only after the rows they mark were
``msync``\\ ed, so a flag never claims a row that did not reach the file (SIGKILL or power cut); a kill
loses at most the rows since the last checkpoint, which a resumed run recomputes.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ueguard._crash import kill_point

FORMAT = 1
SIDECAR = "store.json"
DONE = "done.u8"
#: value encodings: numpy dtype, file suffix, value of one stored unit (None: stored as is)
ENCODINGS: dict[str, tuple[str, str, float | None]] = {
    "int16": ("<i2", "i16", 1.0 / (255 * 128)),
    "float16": ("<f2", "f16", None),
    "float32": ("<f4", "f32", None),
}
DEFAULT_ENCODING = "float32"
#: bytes written between checkpoints (msync + done flags + dropping the mapped pages)
CHECKPOINT_BYTES = 64 << 20


class StoreError(ValueError):
    """A store folder that cannot be used: the message names the file and the problem."""


def ids_sha256(ids: Sequence[str]) -> str:
    """A digest of the sample ids in order (row i ↔ ids[i])."""
    digest = hashlib.sha256()
    for sample_id in ids:
        digest.update(sample_id.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def quantize(values: torch.Tensor, encoding: str) -> np.ndarray:
    """Float δ → the stored representation (``int16``: round to the nearest unit, saturating)."""
    dtype, _, unit = ENCODINGS[encoding]
    array = values.detach().to("cpu", torch.float32).numpy()
    if unit is None:
        return array.astype(dtype)
    return np.clip(np.rint(array / unit), -32767, 32767).astype(dtype)


def dequantize(stored: np.ndarray, encoding: str) -> torch.Tensor:
    """The stored representation → float32 δ."""
    unit = ENCODINGS[encoding][2]
    if unit is None:
        return torch.from_numpy(stored.astype(np.float32))
    # units / (255·128) in float64, then one rounding to float32: k/255 comes back as the same float32
    # as ``torch.tensor(k / 255)`` (both are the correctly rounded value of the same rational number)
    return torch.from_numpy((stored.astype(np.float64) / (255 * 128)).astype(np.float32))


class PerturbationStore:
    """Sample-wise δ rows on disk, indexed like a tensor: ``store[idx]`` returns float32 rows on
    ``device``; ``store[idx] = rows`` writes them. ``idx`` is a slice, an int, or an index tensor."""

    def __init__(self, folder: Path, meta: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.folder = Path(folder)
        self.meta = meta
        self.encoding = meta["encoding"]
        self.shape = tuple(meta["shape"])
        self.device = torch.device(device)
        self._numpy_dtype = np.dtype(ENCODINGS[self.encoding][0])
        self._row_values = int(np.prod(self.shape[1:]))
        self._front = _Mapping(self.data_path, self.shape, self._numpy_dtype)
        self._back: _Mapping | None = None  # the rows being written, while rounds are committed (see commit)
        self._fresh: np.ndarray | None = None  # per row: written since the last commit
        self._done = np.fromfile(self.done_path, dtype=np.uint8)
        self._pending: list[tuple[int, int]] = []  # row ranges written and marked done since the last checkpoint
        self._written = 0
        self._read = 0

    # ---- creating and opening

    @classmethod
    def create(cls, folder: str | os.PathLike, shape: Sequence[int], ids: Sequence[str], *,
               fingerprint: dict[str, Any] | None = None, encoding: str | None = None,
               device: torch.device | str = "cpu") -> "PerturbationStore":
        """A new zero-filled store (replacing one of ueguard's own stores in ``folder``)."""
        encoding = encoding or DEFAULT_ENCODING
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown store encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4 or shape[0] != len(ids):
            raise ValueError(f"a store holds N×C×H×W rows, one per sample id; got shape {shape} for {len(ids)} ids")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "shape": list(shape), "encoding": encoding,
                "unit": ENCODINGS[encoding][2], "ids_sha256": ids_sha256(ids),
                "fingerprint": fingerprint or {}, "id": uuid.uuid4().hex, "complete": False, "perturbation": None}
        for old in folder.glob("delta.*"):
            old.unlink()
        data = folder / _data_names(encoding)[0]
        with open(data, "wb") as fh:
            fh.truncate(int(np.prod(shape)) * np.dtype(ENCODINGS[encoding][0]).itemsize)  # sparse zeros
        _write_atomic(folder / DONE, bytes(shape[0]))
        _write_atomic(folder / SIDECAR, json.dumps(meta, indent=1).encode())
        return cls(folder, meta, device)

    @classmethod
    def open(cls, folder: str | os.PathLike, ids: Sequence[str], *, shape: Sequence[int] | None = None,
             fingerprint: dict[str, Any] | None = None, device: torch.device | str = "cpu") -> "PerturbationStore":
        """An existing store, checked against the run: a missing, unreadable, truncated or mismatched
        store raises :class:`StoreError` naming the file and what differs."""
        folder = Path(folder)
        sidecar = folder / SIDECAR
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"{sidecar}: no perturbation store here (missing {SIDECAR})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise StoreError(f"{sidecar}: unreadable perturbation store sidecar ({error})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise StoreError(f"{sidecar}: not a ueguard perturbation store of format {FORMAT}")
        if meta.get("encoding") not in ENCODINGS or not isinstance(meta.get("shape"), list) or len(meta["shape"]) != 4:
            raise StoreError(f"{sidecar}: bad encoding or shape ({meta.get('encoding')!r}, {meta.get('shape')!r})")
        if shape is not None and tuple(meta["shape"][1:]) != tuple(shape[1:]):
            raise StoreError(f"{sidecar}: rows of shape {tuple(meta['shape'][1:])}, this run needs {tuple(shape[1:])}")
        if meta["shape"][0] != len(ids) or meta.get("ids_sha256") != ids_sha256(ids):
            raise StoreError(f"{sidecar}: made for other samples ({meta['shape'][0]} rows; the sample ids differ "
                             f"from this run's {len(ids)})")
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise StoreError(f"{sidecar}: made with different settings ({changed_keys(meta.get('fingerprint'), fingerprint)})")
        names = _data_names(meta["encoding"])
        if meta.setdefault("data", names[0]) not in names:
            raise StoreError(f"{sidecar}: its rows are in {meta['data']!r}, which is not one of {', '.join(names)}")
        expected = int(np.prod(meta["shape"])) * np.dtype(ENCODINGS[meta["encoding"]][0]).itemsize
        data = folder / meta["data"]
        for path, size in ((data, expected), (folder / DONE, meta["shape"][0])):
            try:
                actual = path.stat().st_size
            except OSError:
                raise StoreError(f"{path}: missing from the perturbation store") from None
            if actual != size:
                raise StoreError(f"{path}: {actual} bytes, expected {size} (truncated or foreign file)")
        return cls(folder, meta, device)

    @classmethod
    def open_or_create(cls, folder: str | os.PathLike, shape: Sequence[int], ids: Sequence[str], *,
                       fingerprint: dict[str, Any] | None = None, encoding: str | None = None,
                       device: torch.device | str = "cpu") -> "PerturbationStore":
        """Resume the store in ``folder`` when it belongs to this run; otherwise start a new one (a
        store of ueguard's own state folder that does not match is replaced, never half-used)."""
        if (Path(folder) / SIDECAR).exists():
            try:
                store = cls.open(folder, ids, shape=shape, fingerprint=fingerprint, device=device)
                if store.encoding == (encoding or DEFAULT_ENCODING):
                    return store
                store.close()
            except StoreError:
                pass
        return cls.create(folder, shape, ids, fingerprint=fingerprint, encoding=encoding, device=device)

    @property
    def data_path(self) -> Path:
        """The file that holds the rows (the last committed ones while rounds are committed)."""
        return self.folder / self.meta.get("data", _data_names(self.encoding)[0])

    @property
    def done_path(self) -> Path:
        return self.folder / DONE

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    # ---- tensor-like access

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self._row_values * self._numpy_dtype.itemsize

    def _rows_of(self, index) -> Any:
        if isinstance(index, torch.Tensor):
            index = index.detach().cpu()
            return index.numpy() if index.dim() else int(index)
        return index

    def __getitem__(self, index) -> torch.Tensor:
        rows = self._rows_of(index)
        stored = np.array(self._front.rows[rows])
        if self._fresh is not None:  # rows written since the last commit are read from the rows being written
            fresh = self._fresh[rows]
            if fresh.any():
                stored = np.where(fresh.reshape(fresh.shape + (1,) * 3), self._back.rows[rows], stored)
        self._touched(stored.nbytes)
        return dequantize(stored, self.encoding).to(self.device)

    def __setitem__(self, index, values: torch.Tensor) -> None:
        rows = self._rows_of(index)
        stored = quantize(torch.as_tensor(values), self.encoding)
        if self._fresh is None:
            self._front.rows[rows] = stored
        else:
            self._back.rows[rows] = stored
            self._fresh[rows] = True
        self._written += stored.nbytes
        if self._written >= 2 * CHECKPOINT_BYTES:  # a method that never marks rows done (bi-level ones)
            self.release()

    def _touched(self, nbytes: int) -> None:
        """Reads map pages in as well: drop them once enough were read (they are clean; nothing is lost)."""
        self._read += nbytes
        if self._read >= CHECKPOINT_BYTES:
            self.release()

    def to_tensor(self) -> torch.Tensor:
        """All rows as one float32 tensor (only for stores that fit in memory)."""
        return self[:]

    # ---- progress and checkpoints

    def done(self, start: int, stop: int) -> bool:
        """Whether rows ``start..stop-1`` are all final (a resumed run skips them)."""
        return bool(self._done[start:stop].all())

    @property
    def done_rows(self) -> int:
        return int(self._done.sum())

    def mark_done(self, start: int, stop: int) -> None:
        """Rows ``start..stop-1`` are final. Persisted at the next checkpoint (after their data)."""
        self._pending.append((start, stop))
        if self._written >= CHECKPOINT_BYTES or sum(b - a for a, b in self._pending) * 8 >= max(1, len(self)):
            self.checkpoint()

    def checkpoint(self) -> None:
        """Rows to the file (msync), then their done flags, then drop the mapped pages from memory."""
        self._front.flush()
        if self._pending:
            for start, stop in self._pending:
                self._done[start:stop] = 1
            _write_atomic(self.done_path, self._done.tobytes())
            self._pending.clear()
        self.release()
        kill_point("store_checkpoint")

    def release(self) -> None:
        """Drop the mapped pages from this process (they stay in the file and the page cache)."""
        for mapping in (self._front, self._back):
            if mapping is not None:
                mapping.release(flush=bool(self._written))
        self._written = self._read = 0

    # ---- rounds: every row rewritten per round, committed as a whole (bi-level methods)

    def start_rounds(self, data: str | None = None) -> None:
        """From now on writes go to a second file until :meth:`commit` makes them the store's rows at once,
        so a kill in the middle of a round leaves the rows of the last committed round intact (a bi-level
        method rewrites every row each round; in place, a killed round would leave a mix of two rounds
        that no checkpoint describes). ``data``: the file name a :meth:`commit` of an interrupted run
        returned — its rows become the current ones. Costs a second file of the store's size."""
        if self._fresh is not None:
            raise RuntimeError("start_rounds() was called twice")
        names = _data_names(self.encoding)
        data = data or self._front.path.name
        if data not in names or not (self.folder / data).exists():
            raise StoreError(f"{self.folder / data}: not a data file of this store")
        if data != self._front.path.name:
            self._front.close()
            self._front = _Mapping(self.folder / data, self.shape, self._numpy_dtype)
            self.meta["data"] = data
        other = self.folder / names[1 - names.index(data)]
        with open(other, "wb") as fh:
            fh.truncate(self.nbytes)
        self._back = _Mapping(other, self.shape, self._numpy_dtype)
        self._fresh = np.zeros(len(self), dtype=bool)

    def commit(self) -> str:
        """End a round: rows not written since the last commit are carried over, the written file is
        msync'ed and becomes the current one. Returns its name, which a round checkpoint records (the
        sidecar names it only once generation is complete)."""
        if self._fresh is None:
            raise RuntimeError("commit() without start_rounds()")
        stale = np.flatnonzero(~self._fresh)
        per_chunk = max(1, CHECKPOINT_BYTES // max(1, self._row_values * self._numpy_dtype.itemsize))
        for start in range(0, stale.size, per_chunk):
            chunk = stale[start:start + per_chunk]
            self._back.rows[chunk] = self._front.rows[chunk]
        self._back.flush()
        self._front, self._back = self._back, self._front
        self._fresh[:] = False
        self.meta["data"] = self._front.path.name
        self.release()
        return self.meta["data"]

    def finish(self, record: dict[str, Any]) -> None:
        """Generation is over: every row is final; ``record`` (eps, norm, info, resample) goes to the
        sidecar with ``complete: true`` (naming the data file that holds the rows)."""
        if self._fresh is not None and self._fresh.any():
            self.commit()
        self._pending.append((0, len(self)))
        self.checkpoint()
        self.meta.update(complete=True, perturbation=record, data=self._front.path.name)
        _write_atomic(self.folder / SIDECAR, json.dumps(self.meta, indent=1).encode())
        if self._back is not None:  # the other round file is stale now
            self._back.close()
            self._back.path.unlink(missing_ok=True)
            self._back, self._fresh = None, None

    def close(self) -> None:
        for mapping in (self._front, self._back):
            if mapping is not None:
                mapping.close()

    def __repr__(self) -> str:
        return f"PerturbationStore({str(self.folder)!r}, shape={self.shape}, encoding={self.encoding!r})"


class RoundCheckpoint:
    """A bi-level method's state after its last finished round, so that ``protect --resume`` continues
    with the next round instead of generating again from the first.

    One file (``torch.save``; written to a temporary file, fsynced, renamed, and the folder fsynced), next
    to the store: the rounds finished, the history so far, the state of everything the method draws from
    or trains (surrogate ``state_dict``, optimiser state with its momentum buffers, ``torch.Generator``
    states, the batch sampler's permutation and position, the global torch RNG) and δ — in the file for
    a tensor δ (memory store, class-wise δ); for a :class:`PerturbationStore` the name of the data file
    that :meth:`PerturbationStore.commit` msync'ed before this file claims the round. The file is tied to
    the run's fingerprint (the settings ``--resume`` compares) and the sample ids: a checkpoint of other
    settings is not used, and :meth:`load` says why. Generation that completes supersedes it (the store's
    ``complete`` record or the cached perturbation), and ``protect`` removes it.
    """

    FORMAT = 1

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any], ids: Sequence[str],
                 log: Callable[[str], None] = lambda message: None) -> None:
        self.path = Path(path)
        # JSON form, as a store's sidecar holds it (tuples become lists), and tied to the samples
        self.fingerprint = json.loads(json.dumps({**fingerprint, "ids_sha256": ids_sha256(ids)}))
        self.log = log

    def load(self) -> dict[str, Any] | None:
        """The checkpoint of an interrupted run with this fingerprint, or None (logging why one that is
        there is not used)."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged or foreign file: generate from the first round
            self.log(f"{self.path}: unreadable round checkpoint ({error}); generating from the first round")
            return None
        if not isinstance(state, dict) or state.get("format") != self.FORMAT:
            self.log(f"{self.path}: not a ueguard round checkpoint of format {self.FORMAT}; generating from the first round")
            return None
        theirs = json.loads(state["fingerprint"])
        if theirs != self.fingerprint:
            self.log(f"{self.path}: round checkpoint made with different settings ({changed_keys(theirs, self.fingerprint)}); "
                     "not resuming from it, generating from the first round")
            return None
        return state

    def save(self, state: dict[str, Any], delta: "torch.Tensor | PerturbationStore") -> None:
        """Checkpoint a finished round: δ first (a store commits its rows), then this file claims it."""
        if isinstance(delta, PerturbationStore):
            where = {"store": delta.commit(), "store_id": delta.meta.get("id")}
        else:
            where = {"tensor": delta.detach().to("cpu", copy=True)}
        state = {**state, "format": self.FORMAT, "fingerprint": json.dumps(self.fingerprint), "delta": where}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, buffer.getbuffer())
        kill_point("round_checkpoint")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class _Mapping:
    """One data file of a store, mapped read-write as an ``N×C×H×W`` array."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR)
        length = int(np.prod(shape)) * dtype.itemsize
        self._map = mmap.mmap(self._fd, length) if length else None
        self.rows = np.frombuffer(self._map, dtype).reshape(shape) if self._map is not None else np.zeros(shape, dtype)

    def flush(self) -> None:
        if self._map is not None:
            self._map.flush()

    def release(self, flush: bool) -> None:
        if self._map is not None and hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            if flush:
                self._map.flush()  # not needed for the data (page cache keeps it) but keeps writeback orderly
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        if self._map is not None:
            self.rows = None
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _data_names(encoding: str) -> tuple[str, str]:
    """The store's data file and the second one rounds are written to (see ``start_rounds``)."""
    suffix = ENCODINGS[encoding][1]
    return f"delta.{suffix}", f"delta.next.{suffix}"


def changed_keys(theirs: dict[str, Any] | None, ours: dict[str, Any]) -> str:
    """The settings that differ between two fingerprints, for an error message."""
    theirs = theirs or {}
    return ", ".join(sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)))


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file, fsync it, rename it over ``path``, then fsync the folder (so the
    rename itself survives a power cut)."""
    tmp = path.with_name(f".ueguard-{path.name}.{os.getpid()}.tmp")  # a name protect's resume clean-up knows
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders (Windows): the rename is as durable as it gets
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
