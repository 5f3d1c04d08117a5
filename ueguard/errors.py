"""Errors that carry their exit status: the CLI maps them, the SDK raises them as they are.

* :class:`UsageError` (exit 2) — the request itself is wrong: a malformed ε, an unknown method, a
  destination inside the source, a non-empty destination without ``--resume``.
* :class:`FatalError` (exit 1) — the run cannot go on (the output disk is full or read-only); the
  message says what to do. Anything else that stops a run is fatal too. Files that fail one by one do not raise: they are
  recorded in the manifest and the run exits 3 at the end (``EXIT_SOME_FAILED``).
"""

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3


class UsageError(ValueError):
    """A bad option or a refused request; the message says how to proceed."""


class OptionTypeError(UsageError, TypeError):
    """An SDK keyword given a value of the wrong type (e.g. ``seed="7"``): a ``TypeError`` for Python
    callers, a usage error (exit 2) for the CLI."""


class PeerStopped(RuntimeError):
    """Under torchrun, on a rank other than 0: rank 0 stopped before generation. ``kind`` (``usage``,
    ``fatal``, ``interrupted``) says how, so the CLI exits with rank 0's status without repeating the
    message rank 0 already printed."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class FatalError(RuntimeError):
    """A problem that stops the whole run (e.g. the output disk is full); the message says how to proceed.
    Finished outputs stay in place and ``--resume`` continues after the problem is fixed."""
