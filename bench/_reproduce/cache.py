"""The cache's primitives: short content digests (its names and locks), cross-process locks on one cell,
atomic JSON writes."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def exclusive(cache: Path, name: str, log=None):
    """Hold ``cache/locks/<name>.lock`` exclusively while the body runs: a second reproduce process that
    needs the same cell (the prior, a protected folder, a verify battery) waits here, then finds the first
    one's result in the cache instead of making it again beside it — or racing it on one resume state.
    The lock is the kernel's (``flock``): a process that dies holds nothing, and no stale lock is left to clear."""
    path = cache / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                log(f"waiting for another reproduce process that holds {path}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _digest(obj: Any, length: int = 12) -> str:
    """A short sha256 of ``obj`` as sorted JSON (non-JSON values by ``str``): the cache's names and locks."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def _json_dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)

