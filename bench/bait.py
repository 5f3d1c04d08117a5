"""BAIT: the direct class-wise parameterisation against the authors' generator — cost and efficacy.

Needs /work/shared/data (CIFAR-10 and the akamaster CIFAR ResNet-20 weights); a benchmark, not a test.

Protocol (one run, both parameterisations under the same seed and settings):

* prior: the akamaster ResNet-20 (trained on all of CIFAR-10: a strong same-class prior), head
  re-initialised for the task's 5 classes; it is the BAIT surrogate and the fine-tuning victim's start;
* task: CIFAR-10 classes 5–9 at 32 px, ``--per-class`` training images per class from the training set
  and ``--test-per-class`` test images per class from the test set;
* protect with ``parameterisation=direct`` and ``parameterisation=generator`` (same iterations, batch,
  look-ahead and target schedule), timing every outer step (median reported);
* victims trained with ueguard.engine.fit on clean, direct- and generator-protected images (saved-and-
  rounded to 1/255): ``finetune`` (from the prior, all layers, lr 0.01) and ``scratch`` (ResNet-20 from
  random init, lr 0.1), crop + flip, one-cycle SGD.

Prints seconds per outer step, total protect seconds and victim test accuracy for each, with the ratios
generator / direct; ``--json FILE`` writes the whole record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ueguard.data.working_set import WorkingSet  # noqa: E402
from ueguard.defenses import create_defense  # noqa: E402
from ueguard.engine.fit import FitConfig, fit  # noqa: E402
from ueguard.engine.runtime import Runtime, seed_everything  # noqa: E402
from ueguard.methods import create_method  # noqa: E402
from ueguard.models import create_model  # noqa: E402

DATA = Path(os.environ.get("UEGUARD_SHARED_DATA", "/work/shared/data"))
WEIGHTS = DATA / "weights" / "cifar10_resnet_akamaster" / "resnet20-12fca82f.th"
CLASSES = (5, 6, 7, 8, 9)
ARCH = "resnet20_cifar"


def cifar_subset(train: bool, per_class: int, seed: int) -> WorkingSet:
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(str(DATA / "cifar10"), train=train, download=False)
    targets = np.asarray(ds.targets)
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.permutation(np.flatnonzero(targets == c))[:per_class] for c in CLASSES])
    images = torch.from_numpy(ds.data[keep]).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(np.searchsorted(CLASSES, targets[keep])).long()
    return WorkingSet(images, labels, torch.zeros(len(keep), dtype=torch.bool),
                      tuple(ds.classes[c] for c in CLASSES), [str(i) for i in keep])


def protected(data: WorkingSet, delta: torch.Tensor) -> WorkingSet:
    """x̃ = round(255 · clip(x + δ_y, 0, 1)): what a released file holds."""
    x = data.images.float() / 255 + delta[data.labels]
    images = torch.round(x.clamp(0, 1) * 255).to(torch.uint8)
    return WorkingSet(images, data.labels, data.grayscale, data.classes, data.ids)


def victim(paradigm: str, train: WorkingSet, test: WorkingSet, epochs: int, seed: int, rt: Runtime) -> dict:
    seed_everything(seed)
    if paradigm == "finetune":
        model, lr = create_model(ARCH, len(CLASSES), weights=WEIGHTS), 0.01
    else:
        model, lr = create_model(ARCH, len(CLASSES)), 0.1
    history = fit(model, train, test, FitConfig(epochs=epochs, lr=lr), defense=create_defense("none"),
                  params=list(model.parameters()), runtime=rt, generator=torch.Generator().manual_seed(seed))
    return {"final": history[-1]["test_accuracy"], "peak": max(h["test_accuracy"] for h in history)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small set, few iterations and epochs (minutes)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--per-class", type=int)
    parser.add_argument("--test-per-class", type=int)
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--gen-width", type=int, default=16)
    parser.add_argument("--gen-blocks", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    per_class = args.per_class or (100 if args.quick else 300)
    test_per_class = args.test_per_class or (100 if args.quick else 200)
    iterations = args.iterations or (9 if args.quick else 30)
    epochs = args.epochs or (8 if args.quick else 15)
    if not WEIGHTS.is_file():
        sys.exit(f"bench/bait.py needs {WEIGHTS} (set UEGUARD_SHARED_DATA to the shared data folder)")

    rt = Runtime.create("cpu", "fp32")
    train = cifar_subset(True, per_class, args.seed)
    test = cifar_subset(False, test_per_class, args.seed)
    settings = dict(iterations=iterations, batch_size=args.batch_size, gen_width=args.gen_width,
                    gen_blocks=args.gen_blocks, seed=args.seed)
    runs: dict[str, dict] = {}
    for parameterisation in ("direct", "generator"):
        seed_everything(args.seed)
        surrogate = create_model(ARCH, len(CLASSES), weights=WEIGHTS)
        method = create_method("bait", budget="standard", runtime=rt, surrogate=surrogate,
                               parameterisation=parameterisation, **settings)
        started = time.perf_counter()
        result = method(train)
        info = result.info
        runs[parameterisation] = {"protect_seconds": round(time.perf_counter() - started, 2),
                                  "seconds_per_outer_step": info["seconds_per_outer_step"],
                                  "outer_steps": info["outer_steps"], "noise_parameters": info["noise_parameters"],
                                  "final_target_accuracy": info["history"][-1]["target_accuracy"],
                                  "delta_linf_255": round(result.delta.abs().max().item() * 255, 3),
                                  "delta": result.delta}
        print(f"{parameterisation:>9}: {info['seconds_per_outer_step']:.3f} s/outer step, "
              f"{runs[parameterisation]['protect_seconds']:.1f} s total, {info['noise_parameters']:,} parameters", flush=True)

    victims: dict[str, dict] = {}
    for paradigm in ("finetune", "scratch"):
        victims[paradigm] = {"clean": victim(paradigm, train, test, epochs, args.seed, rt)}
        for name in ("direct", "generator"):
            victims[paradigm][name] = victim(paradigm, protected(train, runs[name]["delta"]), test, epochs, args.seed, rt)
        row = victims[paradigm]
        print(f"{paradigm:>9}: clean {100 * row['clean']['final']:.1f} %, direct {100 * row['direct']['final']:.1f} %, "
              f"generator {100 * row['generator']['final']:.1f} % (final test accuracy; peaks "
              f"{100 * row['clean']['peak']:.1f} / {100 * row['direct']['peak']:.1f} / {100 * row['generator']['peak']:.1f})",
              flush=True)

    step_ratio = runs["generator"]["seconds_per_outer_step"] / runs["direct"]["seconds_per_outer_step"]
    total_ratio = runs["generator"]["protect_seconds"] / runs["direct"]["protect_seconds"]
    print(f"generator / direct: {step_ratio:.2f}x time per outer step, {total_ratio:.2f}x total protect time")
    for run in runs.values():
        del run["delta"]
    record = {"bench": "bait", "quick": args.quick, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "protocol": {"prior": f"{ARCH} akamaster weights (all CIFAR-10 classes)", "classes": CLASSES,
                           "train_per_class": per_class, "test_per_class": test_per_class, "epochs": epochs,
                           "finetune_lr": 0.01, "scratch_lr": 0.1, **settings},
              "protect": runs, "victims": victims,
              "ratios": {"generator_over_direct_step_time": round(step_ratio, 3),
                         "generator_over_direct_total_time": round(total_ratio, 3)},
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                              "load_average": os.getloadavg()}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
