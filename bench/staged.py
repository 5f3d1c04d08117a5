"""Choose and check the staged-training (ST/ACM) constants on EMN-protected CIFAR-10.

Needs ../shared/data/cifar10 (CIFAR-10 python batches; see /work/shared/data/SOURCES.md).

What it does, all in one run so every number is comparable:
1. a class-balanced CIFAR-10 subset (train and test), protected with ueguard's EMN (sample-wise, 8/255,
   the ``quick`` preset), the perturbed images rounded to 8 bits as saved files would be;
2. **measurement runs**: the victim trains on clean and on EMN data with the staged defense watching
   but never cutting (tau → 0), which records each shallow stage's ACM curve untouched;
3. **tau**: for every watched stage, the lowest ACM(t)/ACM(t0) reached on clean data and on EMN data;
   tau is set halfway (geometric mean) between the two at the stage that separates them best — so the
   trigger fires on EMN data and not on clean data, on this measurement (only when EMN's ratio is at
   least 10 % below clean's; otherwise the run says the stages are not separable and keeps the default);
4. **check runs**: standard training and staged training with that tau on EMN data, and staged training
   on clean data (a defense must not hurt clean learning), each with its final and peak test accuracy.
   The ratio printed is staged / standard test accuracy on EMN data, both measured in this run.

REM is not in ueguard yet, so only EMN is measured; see bench/README.md.

    python bench/staged.py --quick --json bench/results/staged_quick.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ueguard import models
from ueguard.data.working_set import WorkingSet
from ueguard.defenses import create_defense, create_paradigm
from ueguard.engine.fit import FitConfig, fit
from ueguard.engine.runtime import Runtime, seed_everything
from ueguard.sdk import protect

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
if not CIFAR.exists():
    CIFAR = Path("/work/shared/data/cifar10")


def cifar_subset(train: bool, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(str(CIFAR), train=train, download=False)
    targets = np.asarray(ds.targets)
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(targets == c), per_class, replace=False)
                                   for c in range(10)]))
    return ds.data[keep], targets[keep]  # uint8 N×32×32×3


def working(images: np.ndarray, labels: np.ndarray) -> WorkingSet:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return WorkingSet(x, torch.from_numpy(labels).long(), torch.zeros(len(x), dtype=torch.bool),
                      tuple(str(c) for c in range(10)), [str(i) for i in range(len(x))])


def train_run(train: WorkingSet, test: WorkingSet, defense: str, args, runtime: Runtime, **options) -> dict:
    generator = seed_everything(args.seed)
    model = models.create_model(args.arch, 10)
    d = create_defense(defense, **options)
    started = time.perf_counter()
    history = fit(model, train, test, FitConfig(epochs=args.epochs, batch_size=128, lr=0.1), defense=d,
                  paradigm=create_paradigm("scratch"), runtime=runtime, generator=generator)
    trained = [h for h in history if h["epoch"] >= 1]
    return {"defense": defense, "options": options, "final": trained[-1]["test_accuracy"],
            "peak": max(h["test_accuracy"] for h in trained), "seconds": round(time.perf_counter() - started, 1),
            "test_curve": [h["test_accuracy"] for h in trained], **d.summary()}


def min_ratio(curve: dict) -> dict[str, float]:
    """Per watched stage: min over checks t > 0 of ACM(t) / ACM(t0)."""
    return {name: min(v / values[0] for v in values[1:]) for name, values in curve["stages"].items()
            if name in curve["monitored"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 train / 50 test images per class, 8 epochs")
    parser.add_argument("--json", type=Path, help="append the results to this JSON file")
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--arch", default="resnet20_cifar")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, help="keep the EMN-protected subset here (npz) and reuse it")
    args = parser.parse_args()
    if args.quick:
        args.per_class, args.epochs = 100, 8
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runtime = Runtime.create("cpu", "fp32")
    started = time.perf_counter()

    x_train, y_train = cifar_subset(True, args.per_class, args.seed)
    x_test, y_test = cifar_subset(False, max(20, args.per_class // 2), args.seed + 1)
    t0 = time.perf_counter()
    cache = args.cache / f"emn_{args.arch}_{args.per_class}pc_seed{args.seed}.npz" if args.cache else None
    if cache is not None and cache.exists():
        stored = np.load(cache)
        x_emn, rounds = stored["x_emn"], int(stored["rounds"])
    else:
        result = protect(x_train, labels=y_train, method="emn", eps="8/255", budget="quick", device="cpu",
                         surrogate=args.arch, seed=args.seed)
        x_emn, rounds = np.asarray(result.data), int(result.info.get("rounds") or 0)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(cache, x_emn=x_emn, rounds=rounds)
    emn_seconds = time.perf_counter() - t0
    clean, emn, test = working(x_train, y_train), working(x_emn, y_train), working(x_test, y_test)
    print(f"EMN: {rounds} rounds, {emn_seconds:.0f} s; "
          f"L∞ {np.abs(x_emn.astype(int) - x_train.astype(int)).max()}/255", flush=True)

    watch = dict(tau=1e-9, probe_size=min(1000, len(clean)), checks_per_epoch=2)
    runs = {}
    for name, data in (("clean", clean), ("emn", emn)):
        runs[f"{name}/watch"] = train_run(data, test, "staged", args, runtime, **watch)
        print(name, "watch", runs[f"{name}/watch"]["final"], min_ratio(runs[f"{name}/watch"]["acm_curve"]), flush=True)
    r_clean = min_ratio(runs["clean/watch"]["acm_curve"])
    r_emn = min_ratio(runs["emn/watch"]["acm_curve"])
    stage = max(r_clean, key=lambda s: r_clean[s] / max(r_emn[s], 1e-12))
    separable = r_emn[stage] < 0.9 * r_clean[stage]  # a clear gap, not noise between two equal curves
    tau = round(math.sqrt(r_clean[stage] * r_emn[stage]), 3) if separable else None
    print(f"ACM min ratio clean {r_clean}  emn {r_emn}; best stage {stage}; tau {tau}", flush=True)

    staged_opts = dict(tau=tau or 0.6, probe_size=watch["probe_size"], checks_per_epoch=2)
    runs["emn/none"] = train_run(emn, test, "none", args, runtime)
    runs["emn/staged"] = train_run(emn, test, "staged", args, runtime, **staged_opts)
    runs["clean/staged"] = train_run(clean, test, "staged", args, runtime, **staged_opts)
    runs["clean/none"] = {"final": runs["clean/watch"]["final"], "peak": runs["clean/watch"]["peak"],
                          "note": "the clean watch run (a staged run that never cuts is standard training)"}
    ratio = runs["emn/staged"]["final"] / max(runs["emn/none"]["final"], 1e-9)

    print("\n| data | defense | final test acc % | peak % | cuts |")
    print("|---|---|---:|---:|---|")
    for key in ("clean/none", "clean/staged", "emn/none", "emn/staged"):
        r = runs[key]
        cuts = ", ".join(f"≤{c['stage']}@{c['epoch']}" for c in r.get("stage_cuts", [])) or "—"
        print(f"| {key.split('/')[0]} | {key.split('/')[1]} | {100 * r['final']:.1f} | {100 * r['peak']:.1f} | {cuts} |")
    print(f"\nstaged / standard on EMN (final accuracy): {ratio:.2f}x   (tau {staged_opts['tau']}, "
          f"{'measured' if separable else 'NOT separable on this measurement; default used'})")

    out = {"bench": "staged", "quick": args.quick, "per_class": args.per_class, "test_per_class": max(20, args.per_class // 2),
           "epochs": args.epochs, "arch": args.arch, "seed": args.seed, "emn_rounds": rounds,
           "emn_seconds": round(emn_seconds, 1), "acm_min_ratio": {"clean": r_clean, "emn": r_emn},
           "tau_stage": stage, "tau": tau, "separable": separable, "staged_options": staged_opts,
           "ratio_staged_over_standard_emn": round(ratio, 3), "runs": runs,
           "seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__,
           "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
           "date": time.strftime("%Y-%m-%d")}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(previous + [out], indent=1) + "\n")


if __name__ == "__main__":
    main()
