"""Progress display: what a long run is waiting for — the stage, the step k/N and an ETA — in one format for
``protect``, ``verify`` and ``demo``.

Loops report through a :class:`Progress` object so they never decide themselves whether output is wanted
(the CLI shows progress unless ``--quiet``; the SDK is quiet unless ``progress=True``). Every line is made
by :func:`progress_line`: the scope (the command, then each enclosing :meth:`Progress.step`), then the
bar's own description, its step ``unit k/N``, the time elapsed in it and the ETA, e.g.::

    verify › [2/4] protected none/scratch › training: epoch 4/10 · 0:12 elapsed · ETA 0:18 · test_acc=0.412

On a terminal the innermost bar is one line redrawn in place (and left as a record when it ends); anywhere
else (a log file, a pipe, a notebook) each bar prints its first line, then at most one line every
:data:`LINE_INTERVAL` seconds, then its last — so a log shows progress without carriage returns.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

#: Seconds between two lines of one bar when the output is not a terminal.
LINE_INTERVAL = 10.0
#: Seconds between two redraws of the live line on a terminal.
REDRAW_INTERVAL = 0.1
SEPARATOR = " › "


def format_duration(seconds: float) -> str:
    """``7`` → ``0:07``, ``62`` → ``1:02``, ``3723`` → ``1:02:03``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta(done: float, total: float | None, elapsed: float) -> float | None:
    """Seconds left at the rate so far (``None`` before the first step, or without a total)."""
    if total is None or done <= 0:
        return None
    return elapsed / done * max(total - done, 0)


def progress_line(scope: list[str], desc: str = "", done: float | None = None, total: float | None = None,
                  unit: str = "", elapsed: float | None = None, remaining: float | None = None,
                  postfix: dict | None = None, show_eta: bool = True) -> str:
    """The one progress format: ``scope › desc: unit k/N · m:ss elapsed · ETA m:ss · key=value``.

    ``done`` ``None`` leaves the step out (a stage's own line); ``show_eta`` ``False`` leaves the ETA out
    (stages of very different lengths, whose rate says nothing)."""
    head = SEPARATOR.join(part for part in scope if part)
    if done is not None:
        count = f"{done:g}/{total:g}" if total is not None else f"{done:g}"
        step = f"{unit} {count}".strip()
        head += (SEPARATOR if head else "") + (f"{desc}: {step}" if desc else step)
    elif desc:
        head += (SEPARATOR if head else "") + desc
    parts = [head]
    if elapsed is not None:
        parts.append(f"{format_duration(elapsed)} elapsed")
    if show_eta and (done is not None or remaining is not None):
        parts.append(f"ETA {format_duration(remaining)}" if remaining is not None else "ETA ?")
    parts += [f"{key}={value}" for key, value in (postfix or {}).items()]
    return " · ".join(parts)


class Progress:
    """Where a run's progress goes; ``enabled=False`` makes every bar, step and log a no-op.

    ``name``: the command, the first part of every line; ``stream``: where lines go (default: the current
    ``sys.stderr``); a stream that is a terminal gets the live line."""

    def __init__(self, enabled: bool | None = None, *, name: str = "", stream: TextIO | None = None,
                 interval: float = LINE_INTERVAL) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.scope = [name] if name else []
        self.interval = interval
        self.started = time.monotonic()
        self._stream = stream
        self._bars: list[_Bar] = []
        self._shown = False  # a live line is on the terminal
        self._first_step: dict[int, float] = {}  # scope depth → when its step 1 began (the steps' pace)
        self._lock = threading.RLock()

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def live(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    @contextmanager
    def step(self, number: int, total: int, what: str, *, show_eta: bool = False) -> Iterator[None]:
        """Stage ``number`` of ``total``: says so when it starts (with the time since the command began and,
        with ``show_eta``, the ETA at the stages' mean pace), and names it in every line inside it."""
        label, now = f"[{number}/{total}] {what}", time.monotonic()
        if number == 1:
            self._first_step[len(self.scope)] = now
        if self.enabled:
            pace = now - self._first_step.get(len(self.scope), now)
            self._print(progress_line(self.scope + [label], elapsed=now - self.started,
                                      remaining=eta(number - 1, total, pace), show_eta=show_eta and number > 1))
        self.scope.append(label)
        try:
            yield
        finally:
            self.scope.pop()

    @contextmanager
    def bar(self, total: int | None, desc: str, unit: str = "it") -> Iterator["_Bar"]:
        """A counted stage of ``total`` ``unit`` steps; update it with :meth:`_Bar.update`."""
        if not self.enabled:
            yield _Bar(None, total, desc, unit)
            return
        bar = _Bar(self, total, desc, unit)
        with self._lock:
            self._bars.append(bar)
            bar.show(force=True)
        try:
            yield bar
        finally:
            with self._lock:
                self._bars.remove(bar)
                bar.close()

    def log(self, message: str) -> None:
        """A message line (on a terminal: above the live line)."""
        if self.enabled:
            self._print(message)

    def _print(self, line: str) -> None:
        with self._lock:
            stream = self.stream
            if self._shown:
                stream.write("\r\x1b[K")
                self._shown = False
            stream.write(line + "\n")
            if self.live and self._bars:
                self._bars[-1].show(force=True)
            stream.flush()

    def _redraw(self, line: str) -> None:
        with self._lock:
            width = shutil.get_terminal_size((120, 24)).columns
            self.stream.write("\r" + line[: max(width - 1, 10)] + "\x1b[K")
            self.stream.flush()
            self._shown = True


class _Bar:
    """One counted stage of a :class:`Progress` (a no-op when the progress is disabled)."""

    def __init__(self, progress: Progress | None, total: int | None, desc: str, unit: str) -> None:
        self._progress = progress
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self._skipped = 0
        self._postfix: dict = {}
        self._started = time.monotonic()
        self._last = -float("inf")
        self._last_line = ""

    def update(self, n: int = 1, **postfix) -> None:
        """``n`` more steps done; ``postfix``: figures shown after the ETA (e.g. ``test_acc=0.41``)."""
        if self._progress is None:
            return
        with self._progress._lock:
            self.done += n
            self._postfix.update(postfix)
            self.show(force=self.total is not None and self.done >= self.total)

    def skip(self, n: int) -> None:
        """``n`` steps already done before this run (resumed): counted, but left out of the ETA's rate."""
        if self._progress is None:
            return
        self._skipped += n
        self.update(n)

    def line(self) -> str:
        elapsed = time.monotonic() - self._started
        remaining = None
        if self.total is not None:
            remaining = eta(self.done - self._skipped, self.total - self._skipped, elapsed)
        postfix = {key: f"{value:.3f}" if isinstance(value, float) else value for key, value in self._postfix.items()}
        return progress_line(self._progress.scope, self.desc, self.done, self.total, self.unit, elapsed, remaining,
                             postfix)

    def show(self, force: bool = False) -> None:
        progress, now = self._progress, time.monotonic()
        live = progress.live
        if not force and now - self._last < (REDRAW_INTERVAL if live else progress.interval):
            return
        self._last = now
        line = self.line()
        if live:
            progress._redraw(line)
        elif line != self._last_line:
            progress._print(line)
        self._last_line = line

    def close(self) -> None:
        """The bar's last state stays as a line (on a terminal too), unless it was the last line printed;
        on a terminal the enclosing bar's live line comes back."""
        line, progress = self.line(), self._progress
        if progress.live or _counts(line) != _counts(self._last_line):
            progress._print(line)
        elif progress.live and progress._bars:
            progress._bars[-1].show(force=True)


def _counts(line: str) -> str:
    """A line without its times: two lines of the same step differ only in those."""
    return line.split(" · ")[0]


SILENT = Progress(False)
