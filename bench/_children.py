"""What the memory benchmarks (bench/walk.py, bench/memory.py) share: synthetic image trees, children
whose peak RSS is their own, and the environment record. Imports no torch, so a parent that uses it
stays small and its size does not leak into its children's ``ru_maxrss`` at fork."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = 10


def make_tree(root: Path, n: int, side: int, **png_options) -> None:
    """``n`` random ``side``×``side`` RGB PNGs in :data:`CLASSES` class folders, reused when a complete
    tree of ``n`` files is already there."""
    import numpy as np
    from PIL import Image

    marker = root / ".complete"
    if marker.exists() and marker.read_text() == str(n):
        return
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class_{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"img_{i:06d}.png",
                                                                                   **png_options)
    marker.write_text(str(n))


def run_child(args: list[str], threads: int) -> tuple[dict | None, float, float]:
    """Run a child to completion with this checkout on its path and ``OMP_NUM_THREADS=threads``; return
    (its last stdout line parsed as JSON, or None; its peak RSS in MiB; wall seconds). A failing child
    raises with the tail of its stderr."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout = proc.stdout.read()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # not proc.wait(): wait4 returns the child's own rusage
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(args[:6])}... exited {code}: {stderr[-2000:]}")
    line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    payload = json.loads(line) if line.startswith("{") else None
    return payload, usage.ru_maxrss / 1024, time.perf_counter() - started  # ru_maxrss is KiB on Linux


def environment() -> dict:
    import PIL
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "pillow": PIL.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2)}
