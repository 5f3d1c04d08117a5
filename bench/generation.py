"""How long does generating the protection of all 50,000 CIFAR-10 training images take: PIL against EMN.

PIL's claim is speed — its only model is a bias-free linear classifier, so CIFAR-10 takes about a
GPU-minute where REM takes 15+ GPU-hours. This script measures it on this machine, with EMN (the bi-level
baseline every later method builds on) at the same budget in the same run:

* **data**: the real CIFAR-10 training set, the five python batches under ``--data`` (default
  ``$UEGUARD_SHARED_DATA/cifar10`` or ``/work/shared/data/cifar10``); 32×32, sample-wise, L∞ ε = 8/255;
* **pil**: the method's ``generate`` on all 50,000 images (its linear surrogate's training included),
  at the run's budget preset (``quick`` with ``--quick``, else ``standard``) and, unless ``--quick``,
  also at ``thorough`` (the authors' constants);
* **emn**: the same budget preset and ε, with protect's default surrogate for 32 px at that budget
  (``resnet18_cifar_slim`` for quick, ``resnet18_cifar`` otherwise) and ``stop_accuracy`` above 1, so
  every round of the preset runs (the preset's full cost; a run that converges stops earlier). EMN on
  50,000 images would take hours here, so it is timed on two subsets (the first n₁ and n₂ images) and
  the time is fitted as a + b·n (a: the per-round surrogate steps, independent of n; b: the PGD pass
  and stopping check per image) and **projected** to 50,000 images: a + b·50,000. That projection is
  stated as such in the JSON and the table; it assumes the same number of rounds at 50,000 images and
  slightly overstates the stopping check, which EMN caps at 10,000 images;
* both run through ``ProtectionMethod.generate`` on the same CPU runtime (fp32, no compile), one after
  the other; file writing (protect's PNG output) is not timed for either. Each record holds wall seconds
  and the process's CPU seconds (all its threads): on a shared machine the CPU seconds are the steadier
  measure, and the ratio is given in both.

    PYTHONPATH=. python bench/generation.py --quick --json bench/results/generation-cifar10-cpu-quick.json

**Per method** (``--methods LIST``): each listed method protects all 50,000 images through the SDK's
in-memory path (``ueguard.sdk.protect(array, labels=…)``: what a data-publishing pipeline calls; no file
writing), at ``--budget`` (default ``quick``) with its options from ``--set METHOD:KEY=VALUE``
(e.g. ``ssc:fit_per_class=500``: optimise on 500 images per class, apply to all). Methods that train a
surrogate use ``--surrogate`` (default ``fastvgg_cifar``); those that need a pretrained one (SSC, BAIT)
use ``--weights`` (default: the akamaster CIFAR-10 ResNet-20 under the shared data). PIL at the same
budget is measured first in the same run as the baseline, and each record (``wall_s``, CPU seconds,
what was set) is written to ``--json`` as it lands, so a long run keeps what finished:

    PYTHONPATH=. python bench/generation.py --methods lsp,ops,ar,ssc,bait --set ssc:fit_per_class=500 \
        --json bench/results/generation-cifar10-cpu-methods.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from _reproduce.scales import AKAMASTER  # noqa: E402
from _timing import environment, write_report  # noqa: E402
from ueguard.budgets import default_arch  # noqa: E402
from ueguard.engine.runtime import Runtime  # noqa: E402
from ueguard.methods import create_method  # noqa: E402
from ueguard.models import create_model  # noqa: E402
from victim import load_cifar, take  # noqa: E402

FULL = 50_000
EPS = 8 / 255


def default_data() -> Path:
    return Path(os.environ.get("UEGUARD_SHARED_DATA", "/work/shared/data")) / "cifar10"


def time_pil(data, budget: str, runtime: Runtime, seed: int) -> dict:
    method = create_method("pil", budget=budget, runtime=runtime, seed=seed, eps=EPS)
    started, cpu = time.perf_counter(), time.process_time()
    p = method(data)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"method": "pil", "budget": budget, "images": len(data), "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu, 2),
            "ms_per_image": round(1000 * seconds / len(data), 4), "max_linf_255": round(float(p.delta.abs().max()) * 255, 3),
            "config": vars(method.config), "info": p.info}


def time_emn(data, n: int, budget: str, runtime: Runtime, seed: int) -> dict:
    subset = take(data, n)
    arch = default_arch(32, budget)
    torch.manual_seed(seed)
    surrogate = create_model(arch, data.num_classes)
    method = create_method("emn", budget=budget, runtime=runtime, surrogate=surrogate, seed=seed, eps=EPS,
                           stop_accuracy=2.0)
    started, cpu = time.perf_counter(), time.process_time()
    p = method(subset)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"method": "emn", "budget": budget, "surrogate": arch, "images": n, "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu, 2),
            "ms_per_image": round(1000 * seconds / n, 2), "rounds": p.info["rounds"],
            "config": vars(method.config)}


def method_settings(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``["ssc:fit_per_class=500", …]`` → ``{"ssc": {"fit_per_class": 500}}`` (values typed as ``-o`` types them)."""
    from ueguard.sdk.options import parse_method_options

    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        name, sep, rest = pair.partition(":")
        key, eq, _ = rest.partition("=")
        if not (sep and eq and name and key):
            raise SystemExit(f"--set {pair!r}: expected METHOD:KEY=VALUE, e.g. ssc:fit_per_class=500")
        out.setdefault(name.strip(), {}).update(parse_method_options((rest,)))
    return out


def time_method(name: str, data, budget: str, options: dict[str, Any], surrogate: str, weights: Path,
                seed: int) -> dict:
    """One method on every image of ``data`` through the SDK's in-memory path: wall and CPU seconds."""
    from ueguard.methods import METHODS
    from ueguard.sdk import protect

    cls = METHODS.get(name)
    kwargs = dict(surrogate=surrogate if cls.needs_surrogate else None,
                  weights=str(weights) if cls.needs_pretrained else None)
    if cls.needs_pretrained:
        kwargs["surrogate"] = "resnet20_cifar"
    started, cpu = time.perf_counter(), time.process_time()
    result = protect(data.images, method=name, labels=data.labels, budget=budget, seed=seed, size=32,
                     device="cpu", precision="fp32", compile="off", method_options=options, **kwargs)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"method": name, "budget": budget, "images": len(data), "options": options,
            "surrogate": kwargs["surrogate"], "weights": kwargs["weights"], "wall_s": round(seconds, 1),
            "cpu_s": round(cpu, 1), "ms_per_image": round(1000 * seconds / len(data), 3),
            "threads": torch.get_num_threads(), "info": result.info}


def time_methods(args, train, started: float) -> dict:
    settings = method_settings(args.set)
    names = ["pil"] + [m for m in args.methods.split(",") if m and m != "pil"]
    results: dict = {"data": f"CIFAR-10 train, {len(train)} images, from {args.data}", "eps_255": 8,
                     "budget": args.budget, "baseline": "pil", "records": [],
                     "load_before": environment()["load_average_1min"]}
    for name in names:
        record = time_method(name, train, args.budget, settings.get(name, {}), args.surrogate, args.weights,
                             args.seed)
        base = results["records"][0] if results["records"] else record
        record["ratio_vs_pil"] = round(record["wall_s"] / base["wall_s"], 2)
        results["records"].append(record)
        write_report(args.json, results, __file__, started)
        print(f"{name} {args.budget} {record['options'] or ''}: {record['wall_s']:.1f} s wall "
              f"({record['cpu_s']:.1f} s CPU) for {len(train)} images = {record['ratio_vs_pil']}x PIL", flush=True)
    results["load_after"] = environment()["load_average_1min"]
    write_report(args.json, results, __file__, started)
    return results


def projection(small: dict, large: dict, key: str = "seconds") -> dict:
    """EMN's time as a + b·n through the two subset runs, evaluated at :data:`FULL` images. Should noise
    make the fitted b non-positive, the larger subset's mean rate × :data:`FULL` is used instead (an upper
    bound: it charges the per-round fixed cost to every image), and the record says so."""
    b = (large[key] - small[key]) / (large["images"] - small["images"])
    a = small[key] - b * small["images"]
    fitted = b > 0
    seconds = a + b * FULL if fitted else large[key] / large["images"] * FULL
    how = "linear fit a + b·n" if fitted else "mean rate of the larger subset (the fit was not positive)"
    return {"fixed_seconds": round(a, 1), "seconds_per_image": round(b, 4), "projected_seconds": round(seconds),
            "projected_hours": round(seconds / 3600, 2),
            "note": f"projected by {how} from {small['images']} and {large['images']} images, not measured at {FULL}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick presets, smaller EMN subsets, no thorough PIL")
    parser.add_argument("--data", type=Path, default=default_data(), help="folder holding cifar-10-batches-py/")
    parser.add_argument("--emn-sizes", help="two EMN subset sizes n1,n2 (default 128,256; --quick 64,128)")
    parser.add_argument("--threads", type=int, help="torch's CPU threads for both methods (default: torch's own); "
                        "on a machine shared beyond its cores, 1 avoids two threads spin-waiting on each other")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--methods", help="time these methods on all 50,000 images (PIL first, as the baseline)")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="a method's option for --methods (repeatable)")
    parser.add_argument("--budget", default="quick", help="--methods: the budget preset")
    parser.add_argument("--surrogate", default="fastvgg_cifar", help="--methods: the surrogate a method trains")
    parser.add_argument("--weights", type=Path, help="--methods: the pretrained surrogate of SSC and BAIT "
                        "(default: the akamaster CIFAR-10 ResNet-20 beside --data)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    budget = "quick" if args.quick else "standard"
    sizes = [int(s) for s in (args.emn_sizes or ("64,128" if args.quick else "128,256")).split(",")]
    if len(sizes) != 2 or not 0 < sizes[0] < sizes[1] <= FULL:
        parser.error("--emn-sizes: two sizes n1 < n2 ≤ 50000, e.g. 64,128")
    started = time.perf_counter()
    train, _ = load_cifar(args.data)
    if len(train) != FULL:
        raise SystemExit(f"{args.data}: expected the {FULL} CIFAR-10 training images, found {len(train)}")
    if args.methods:
        args.weights = args.weights or args.data.parent / AKAMASTER
        time_methods(args, train, started)
        return 0
    runtime = Runtime.create("cpu", "fp32", "off")
    results: dict = {"data": f"CIFAR-10 train, {len(train)} images, from {args.data}", "eps_255": 8,
                     "budget": budget, "load_before": environment()["load_average_1min"], "pil": [], "emn": []}
    for pil_budget in ([budget] if args.quick else [budget, "thorough"]):
        record = time_pil(train, pil_budget, runtime, args.seed)
        results["pil"].append(record)
        print(f"pil {pil_budget}: {record['seconds']:.1f} s ({record['cpu_seconds']:.1f} s CPU) for {FULL} images "
              f"(linear surrogate {record['info']['surrogate_seconds']:.1f} s)", flush=True)
    for n in sizes:
        record = time_emn(train, n, budget, runtime, args.seed)
        results["emn"].append(record)
        print(f"emn {budget}: {record['seconds']:.1f} s ({record['cpu_seconds']:.1f} s CPU) for {n} images "
              f"({record['rounds']} rounds)", flush=True)
    results["emn_projection"] = projection(*results["emn"])
    results["emn_projection_cpu"] = projection(*results["emn"], key="cpu_seconds")
    pil_same = results["pil"][0]
    results["ratio_emn_projected_over_pil"] = round(results["emn_projection"]["projected_seconds"] / pil_same["seconds"])
    results["ratio_emn_projected_over_pil_cpu"] = round(results["emn_projection_cpu"]["projected_seconds"]
                                                        / pil_same["cpu_seconds"])
    results["load_after"] = environment()["load_average_1min"]
    write_report(args.json, results, __file__, started)
    print(f"EMN {budget} projected to {FULL} images: {results['emn_projection']['projected_hours']} h wall, "
          f"{results['emn_projection_cpu']['projected_hours']} h CPU ({results['emn_projection']['note']}); "
          f"PIL {budget} measured: {pil_same['seconds']:.1f} s wall, {pil_same['cpu_seconds']:.1f} s CPU; ratio "
          f"{results['ratio_emn_projected_over_pil']}× wall, {results['ratio_emn_projected_over_pil_cpu']}× CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
