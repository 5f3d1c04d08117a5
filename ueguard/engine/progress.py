"""Progress reporting: a tqdm bar with ETA on a terminal, silence otherwise.

Loops report through a :class:`Progress` object so they never decide themselves whether output is
wanted (the CLI shows bars on a TTY unless ``--quiet``; the SDK defaults to quiet).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class Progress:
    """A factory of progress bars; ``enabled=False`` makes every bar a no-op."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    @contextmanager
    def bar(self, total: int | None, desc: str, unit: str = "it") -> Iterator["_Bar"]:
        if not self.enabled:
            yield _Bar(None)
            return
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, file=sys.stderr) as bar:
            yield _Bar(bar)

    def log(self, message: str) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)


class _Bar:
    def __init__(self, bar) -> None:
        self._bar = bar

    def update(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)


SILENT = Progress(False)
