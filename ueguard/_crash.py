"""Test-only fault injection: make the process SIGKILL itself at a named point of the data path.

The crash-safety tests need to kill ``protect`` at exact places (between writing a temporary file and
renaming it, between the rename and the manifest line, in the middle of generation), which a timer
alone cannot hit reliably. ``UEGUARD_TEST_KILL`` arms one point:

* ``"<point>:<n>"`` — SIGKILL at the n-th arrival at ``kill_point("<point>")`` (n ≥ 1);
* ``"<point>:<seconds>s"`` — SIGKILL ``seconds`` after the first arrival (e.g. ``generating:0.3s``, to
  die in the middle of a computation that has no arrival points of its own).

Unset, which it always is outside those tests, ``kill_point`` is one dictionary lookup. SIGKILL is used
because it cannot be caught: nothing of ueguard's own clean-up runs, as after a power cut or the OOM
killer.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "UEGUARD_TEST_KILL"
_arrivals: dict[str, int] = {}


def kill_point(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, when = spec.partition(":")
    if name != point:
        return
    _arrivals[point] = count = _arrivals.get(point, 0) + 1
    if when.endswith("s"):
        if count == 1:
            timer = threading.Timer(float(when[:-1]), _die)
            timer.daemon = True
            timer.start()
    elif count == int(when):
        _die()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
