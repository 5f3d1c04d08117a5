"""The on-disk perturbation store: sample-wise δ that does not fit in memory, memory-mapped and indexed
by sample id, and the checkpoint that makes generation resumable.

A store is a folder of three files:

* ``store.json`` — the sidecar: format version, row shape, value encoding, the SHA-256 of the sample
  ids (row i belongs to ``ids[i]``), the run fingerprint that must match to reuse it (method, ε,
  seed, … — what ``--resume`` compares), and, once generation has finished, the perturbation's own
  record (``eps``, ``norm``, ``info``, ``resample``) with ``complete: true``.
* ``delta.i16`` (or ``.f16`` / ``.f32``) — the rows, ``N×3×H×W`` C-order, mapped with ``mmap``.
* ``done.u8`` — one byte per row: 1 once the row is final. Methods that compute every row once (AR,
  TAP) mark rows as they finish and skip them when resumed; bi-level methods revisit every row each
  round, so their rows become final only at the end.

Encoding (chosen by measurement, see ``bench/README.md`` § memory): ``int16`` in units of
1/(255·128) — 2 bytes a value, half of float32; every multiple of 1/255 (what an 8-bit file can
hold) and of 1/(255·2^k), k ≤ 7, is stored exactly; any other value is off by at most 1/(255·256),
a 256th of one 8-bit level, uniformly over the whole range [−1.004, 1.004] (float16 is as small but
its error grows with |δ|, to 1/(255·8) near ±1, which L2 and L0 methods reach). ``float32`` stores
values bit-exactly (and is what the memory path computes with).

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
import json
import mmap
import os
from pathlib import Path
from typing import Any, Sequence

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
DEFAULT_ENCODING = "int16"
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
        self._data_fd = os.open(self.data_path, os.O_RDWR)
        length = self.shape[0] * self._row_values * self._numpy_dtype.itemsize
        self._map = mmap.mmap(self._data_fd, length) if length else None
        self._rows = (np.frombuffer(self._map, self._numpy_dtype).reshape(self.shape) if self._map is not None
                      else np.zeros(self.shape, self._numpy_dtype))
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
                "fingerprint": fingerprint or {}, "complete": False, "perturbation": None}
        for old in folder.glob("delta.*"):
            old.unlink()
        data = folder / f"delta.{ENCODINGS[encoding][1]}"
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
            theirs = meta.get("fingerprint") or {}
            changed = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
            raise StoreError(f"{sidecar}: made with different settings ({', '.join(changed)})")
        expected = int(np.prod(meta["shape"])) * np.dtype(ENCODINGS[meta["encoding"]][0]).itemsize
        data = folder / f"delta.{ENCODINGS[meta['encoding']][1]}"
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
        return self.folder / f"delta.{ENCODINGS[self.encoding][1]}"

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
        stored = np.array(self._rows[self._rows_of(index)])
        self._touched(stored.nbytes)
        return dequantize(stored, self.encoding).to(self.device)

    def __setitem__(self, index, values: torch.Tensor) -> None:
        rows = self._rows_of(index)
        stored = quantize(torch.as_tensor(values), self.encoding)
        self._rows[rows] = stored
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
        if self._map is not None:
            self._map.flush()
        if self._pending:
            for start, stop in self._pending:
                self._done[start:stop] = 1
            _write_atomic(self.done_path, self._done.tobytes())
            self._pending.clear()
        self.release()
        kill_point("store_checkpoint")

    def release(self) -> None:
        """Drop the mapped pages from this process (they stay in the file and the page cache)."""
        if self._map is not None and hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            if self._written:
                self._map.flush()  # not needed for the data (page cache keeps it) but keeps writeback orderly
            self._map.madvise(mmap.MADV_DONTNEED)
        self._written = self._read = 0

    def finish(self, record: dict[str, Any]) -> None:
        """Generation is over: every row is final; ``record`` (eps, norm, info, resample) goes to the
        sidecar with ``complete: true``."""
        self._pending.append((0, len(self)))
        self.checkpoint()
        self.meta.update(complete=True, perturbation=record)
        _write_atomic(self.folder / SIDECAR, json.dumps(self.meta, indent=1).encode())

    def close(self) -> None:
        if self._map is not None:
            self._rows = None
            self._map.close()
            self._map = None
        os.close(self._data_fd)

    def __repr__(self) -> str:
        return f"PerturbationStore({str(self.folder)!r}, shape={self.shape}, encoding={self.encoding!r})"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".ueguard-{path.name}.{os.getpid()}.tmp")  # a name protect's resume clean-up knows
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
