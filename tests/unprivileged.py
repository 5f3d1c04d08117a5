"""Run a command that file permissions apply to, even when the tests run as root.

Root ignores permission bits (capabilities ``CAP_DAC_OVERRIDE`` and ``CAP_DAC_READ_SEARCH``), so
``chmod 000`` alone cannot make a file unreadable in a root container. The child drops both
capabilities from its bounding set before ``exec``, so the kernel really refuses it (EACCES) — the same
error a normal user gets. Where that is not possible, :func:`permissions_apply` says why, for a skip.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2
REPO = Path(__file__).resolve().parents[1]


def _drop_permission_override() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _preexec():
    return _drop_permission_override if os.geteuid() == 0 else None


def permissions_apply() -> str | None:
    """None when :func:`run_ueguard` will be subject to permission bits, else the reason it is not."""
    if not sys.platform.startswith("linux"):
        return "permission test needs Linux (prctl)"
    try:
        subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_preexec(), check=True, timeout=60)
    except (subprocess.SubprocessError, OSError) as error:
        return f"running as root and cannot drop CAP_DAC_OVERRIDE ({error}): chmod 000 cannot make a file unreadable"
    return None


def run_ueguard(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m ueguard ARGS`` from this checkout, without root's permission override."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("UEGUARD_TEST_KILL", None)
    return subprocess.run([sys.executable, "-m", "ueguard", *args], env=env, preexec_fn=_preexec(),
                          capture_output=True, text=True, timeout=timeout)
