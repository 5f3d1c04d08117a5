"""DUNE's generation cost on a CIFAR-size subset, by phase, projected to CIFAR-10's 50,000 images, with TAP
(one clean-trained surrogate, targeted PGD: DUNE's spatial branch with a single model) timed on the same
images in the same run as the baseline.

Data: the real CIFAR-10 slice in the checkout (``bench/data/cifar10-slice.npz``), the first ``--images``
training images at 32 px, ten classes; the surrogate is the budget's default architecture
(``resnet18_cifar_slim`` for ``quick``, ``resnet18_cifar`` for ``standard``), as ``protect`` picks it.

Projection to N = 50,000 (stated in the output): the surrogate training and the spatial PGD pass visit every
image a fixed number of times, so they scale with N; the colour branch scores at most ``colour_batch``
images of each class per PSO evaluation, so it grows with N only until a class has ``colour_batch`` images
(it is scaled by min(50,000/10, colour_batch) / min(class size here, colour_batch)). TAP's time scales
with N as a whole.

    python bench/dune.py --budget quick --images 1000 --json bench/results/dune-cpu-quick.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _timing import write_report  # noqa: E402
from cifar10_slice import CLASSES, load  # noqa: E402

FULL = 50_000


def working_set(images: int):
    from ueguard.data.working_set import WorkingSet

    arrays = load()
    x = torch.from_numpy(np.ascontiguousarray(arrays["train_x"][:images].transpose(0, 3, 1, 2)))
    y = torch.from_numpy(arrays["train_y"][:images]).long()
    return WorkingSet(x, y, torch.zeros(len(y), dtype=torch.bool), CLASSES, [str(i) for i in range(len(y))])


def generate(method: str, data, budget: str, seed: int) -> tuple[float, dict, object]:
    from ueguard.budgets import default_arch
    from ueguard.engine.runtime import Runtime
    from ueguard.methods import create_method
    from ueguard.models import create_model

    torch.manual_seed(seed)
    surrogate = create_model(default_arch(32, budget), data.num_classes)
    m = create_method(method, budget=budget, runtime=Runtime.create("cpu", "fp32"), surrogate=surrogate, seed=seed)
    started = time.perf_counter()
    p = m(data)
    return time.perf_counter() - started, p.info, m.config


def project(seconds: float, info: dict, config, n: int) -> dict:
    """Seconds for CIFAR-10's 50,000 images, from this run's phases (see the module docstring)."""
    phases = info["seconds_by_phase"]
    here_per_class = n / 10
    colour_scale = min(FULL / 10, config.colour_batch) / min(here_per_class, config.colour_batch)
    scaled = {"ensemble": phases["ensemble"] * FULL / n, "colour": phases["colour"] * colour_scale,
              "spatial": phases["spatial"] * FULL / n}
    return {"phases_50k_s": {k: round(v, 1) for k, v in scaled.items()}, "total_50k_s": round(sum(scaled.values()), 1),
            "total_50k_h": round(sum(scaled.values()) / 3600, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="quick", choices=("quick", "standard", "thorough"))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    data = working_set(args.images)
    results: dict = {"budget": args.budget, "images": len(data), "size": 32}
    for method in ("tap", "dune"):
        seconds, info, config = generate(method, data, args.budget, args.seed)
        record = {"seconds": round(seconds, 1), "images_per_s": round(len(data) / seconds, 2)}
        if method == "dune":
            record.update(seconds_by_phase=info["seconds_by_phase"], target_success=info["target_success"],
                          ensemble_epochs=info["ensemble_epochs"], **project(seconds, info, config, len(data)))
        else:
            record.update(total_50k_s=round(seconds * FULL / len(data), 1))
        results[method] = record
        print(f"{method}: {seconds:.1f} s for {len(data)} images; projected to 50k: {record['total_50k_s'] / 3600:.2f} h",
              flush=True)
    results["dune_over_tap"] = round(results["dune"]["seconds"] / results["tap"]["seconds"], 2)
    print(f"dune / tap on the same images: {results['dune_over_tap']}×")
    write_report(args.json, results, __file__, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
