"""Shared timing helpers for ueguard's benchmarks: warm-up excluded, median and spread, one tidy
record format, and the environment every number is reported with."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 3, repeat: int = 10) -> dict:
    """Time ``fn`` ``repeat`` times after ``warmup`` untimed calls; seconds per call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    q1, q3 = times[len(times) // 4], times[(3 * len(times)) // 4]
    return {"median_s": statistics.median(times), "min_s": times[0], "max_s": times[-1], "iqr_s": q3 - q1,
            "repeat": repeat, "warmup": warmup}


def interleaved_times(fns: dict[str, Callable[[], object]], *, device: str = "cpu", warmup: int = 1,
                      repeat: int = 5) -> dict[str, list[float]]:
    """Time several callables round-robin (``warmup`` untimed calls of each first), so a load change on a
    shared machine hits all of them alike; the raw seconds of every timed call, per name, in call order."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def environment() -> dict:
    env = {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "python": platform.python_version(), "load_average_1min": round(os.getloadavg()[0], 2)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return env


def command_line(script: str, argv: list[str] | None = None, prefix: str = "") -> str:
    """The command that reproduces this run, as recorded in the JSON: ``[prefix]python bench/NAME.py
    ARGS`` with ``argv`` (default: this process's arguments) shell-quoted."""
    args = " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    return f"{prefix}python bench/{Path(script).name} {args}".strip()


def write_json(path: str | Path, records: list[dict], command: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": command, "environment": environment(), "records": records}, indent=2) + "\n")


def write_report(path: str | Path | None, results: dict, script: str, started: float) -> None:
    """Stamp a whole-run result with its command, wall time and environment, and write it to ``path``."""
    results.update(command=command_line(script), wall_seconds=round(time.perf_counter() - started, 1),
                   environment=environment())
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
