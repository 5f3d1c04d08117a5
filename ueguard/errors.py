"""Errors that carry their exit status: the CLI maps them, the SDK raises them as they are.

* :class:`UsageError` (exit 2) — the request itself is wrong: a malformed ε, an unknown method, a
  destination inside the source, a non-empty destination without ``--resume``.
* Anything else that stops a run is fatal (exit 1). Files that fail one by one do not raise: they are
  recorded in the manifest and the run exits 3 at the end (``EXIT_SOME_FAILED``).
"""

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3


class UsageError(ValueError):
    """A bad option or a refused request; the message says how to proceed."""
