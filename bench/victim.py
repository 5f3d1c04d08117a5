"""Benchmark of the fast victim: ``fastvgg_cifar`` under the ``fast`` recipe on real CIFAR-10, against the
ResNet-18 victims under the ``standard`` recipe, all measured in the same run. Needs CIFAR-10 (``--data``,
default ``../shared/data/cifar10`` from the repository root, i.e. /work/shared/data/cifar10) or an
``--npz`` file (``train_x`` N×32×32×3 uint8, ``train_y`` int64, ``test_x``, ``test_y``).

    python bench/victim.py [--quick] [--json bench/results/victim-cpu.json] [--device cpu|cuda]
                           [--archs fastvgg_cifar,resnet18_cifar_slim,resnet18_cifar] [--epochs N] [--images N]

1. **Formats**: one fastvgg training step (batch ``--format-batch``) timed in fp32 / bf16 autocast, NCHW /
   channels-last, interleaved; ``--precision auto`` and ``--channels-last auto`` take the fastest, and
   every run records which it used (skipped when both are given).
2. **Fast victim**: ``fastvgg_cifar`` trained from scratch with the ``fast`` recipe through
   :func:`ueguard.engine.fit.fit` (verify's own loop: defense ``none``, paradigm ``scratch``) for
   ``--epochs`` (default: the recipe's) on ``--images`` training images (default all), tested on the
   whole test set after the last epoch with the recipe's final test-time augmentation (``--test-every N``:
   also after every N-th epoch, flip views only; each such pass adds to the wall time).
3. **ResNets**: ``resnet18_cifar_slim`` and ``resnet18_cifar`` under the ``standard`` recipe, trained for
   ``--resnet-epochs-measured`` (1) epoch on ``--resnet-images`` images (5,000; a full ResNet run does not
   fit this benchmark on a CPU); their time for the protocol is **projected**: measured seconds per
   training image × the fast run's training images × ``--resnet-epochs`` (60: the epochs the UE papers
   train their ResNet-18 victims for, ueguard's ``thorough`` budget, where that recipe reaches its best
   accuracy; not measured here). ``ratio`` = that projection ÷ the fast victim's wall time for its recipe's
   epochs (measured when ``--epochs`` is the recipe's, else scaled from the epochs run, and said so).
   Because runs that follow one another on a shared CPU see different load, the per-image cost of one
   training step of every architecture is also timed **interleaved** (``--step-repeat``), and the same
   protocol ratio computed from it (``step_ratios``, training only).

Every run records ``arch``, ``images``, ``epochs``, ``test_accuracy``, ``wall_s``, ``threads``, the epoch
times, ``precision``, ``channels_last``, the CPU model and torch version. The JSON is rewritten after
every run, so a long run can be watched.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import environment, interleaved_times, write_report  # noqa: E402

from ueguard.data.working_set import WorkingSet  # noqa: E402
from ueguard.defenses import create_defense, create_paradigm  # noqa: E402
from ueguard.engine.fit import accuracy, fit  # noqa: E402
from ueguard.engine.recipes import create_recipe  # noqa: E402
from ueguard.engine.runtime import Runtime, seed_everything  # noqa: E402
from ueguard.models import create_model, default_recipe  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FAST = "fastvgg_cifar"
RESNET_PROTOCOL_EPOCHS = 60  # the UE papers' victim protocol (ueguard's thorough budget)


# ------------------------------------------------------------------------------------------------ data

def working_set(x: np.ndarray, y: np.ndarray, prefix: str) -> WorkingSet:
    """N×3×H×W (or N×H×W×3) uint8 + labels → a WorkingSet."""
    images = torch.from_numpy(np.ascontiguousarray(x))
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    classes = tuple(str(c) for c in range(int(labels.max()) + 1))
    return WorkingSet(images, labels, torch.zeros(len(labels), dtype=torch.bool), classes,
                      [f"{prefix}{i}" for i in range(len(labels))])


def load_cifar(root: Path) -> tuple[WorkingSet, WorkingSet]:
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root

    def read(names):
        xs, ys = [], []
        for name in names:
            with open(folder / name, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    train = read([f"data_batch_{i}" for i in range(1, 6)])
    test = read(["test_batch"])
    return working_set(*train, "train/"), working_set(*test, "test/")


def load_npz(path: Path) -> tuple[WorkingSet, WorkingSet]:
    data = np.load(path)
    return (working_set(data["train_x"], data["train_y"], "train/"),
            working_set(data["test_x"], data["test_y"], "test/"))


def take(data: WorkingSet, n: int | None) -> WorkingSet:
    """The first ``n`` images (all when ``n`` is None or larger): a fixed, reproducible subset."""
    return data if n is None or n >= len(data) else data.subset(list(range(n)))


# --------------------------------------------------------------------------------------------- formats

def time_formats(device: str, batch: int, repeat: int) -> dict:
    """Seconds per fastvgg training step (forward, backward, SGD) per (precision, memory format), interleaved."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 32, 32), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    steps = {}
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            rt = Runtime.create(device, precision, "off", channels_last=channels_last)
            model = rt.prepare_model(create_model(FAST, 10)).train()
            recipe = create_recipe("fast")
            from ueguard.engine.loops import Trainer

            cfg = recipe.fit_config(1, batch)
            trainer = Trainer(model, rt, cfg.optim(), params=recipe.param_groups(model, None, cfg), loss=recipe.loss)
            x, y = rt.to_float(images), labels.to(rt.device)
            steps[(precision, channels_last)] = lambda t=trainer, x=x, y=y: t.step(x, y)
    times = interleaved_times(steps, device=device, warmup=1, repeat=repeat)
    rows = [{"precision": p, "channels_last": cl, "median_s": statistics.median(ts), "min_s": min(ts),
             "images_per_s": batch / statistics.median(ts)} for (p, cl), ts in times.items()]
    base = next(r["median_s"] for r in rows if r["precision"] == "fp32" and not r["channels_last"])
    for r in rows:
        r["speedup_vs_fp32_nchw"] = round(base / r["median_s"], 3)
    # The fastest by its best step: on a shared CPU the minimum is the least disturbed by other load.
    return {"batch": batch, "repeat": repeat, "rows": rows, "fastest": min(rows, key=lambda r: r["min_s"])}


def time_archs(archs: list[str], rt: Runtime, repeat: int, batch_cap: int) -> dict:
    """Seconds per training image of each architecture under its own recipe (batch: the recipe's, capped at
    ``batch_cap``), one optimiser step each, interleaved round-robin so load on a shared machine hits all
    alike; best step of ``repeat``. Then each ResNet's protocol (``--resnet-epochs``) against the fast
    victim's recipe epochs, training only."""
    from ueguard.engine.loops import Trainer

    gen = torch.Generator().manual_seed(0)
    steps = {}
    for arch in archs:
        recipe = create_recipe(default_recipe(arch))
        batch = min(recipe.batch_size, batch_cap)
        model = rt.prepare_model(create_model(arch, 10)).train()
        cfg = recipe.fit_config(1, batch)
        trainer = Trainer(model, rt, cfg.optim(), params=recipe.param_groups(model, None, cfg), loss=recipe.loss)
        x = rt.to_float(torch.randint(0, 256, (batch, 3, 32, 32), generator=gen, dtype=torch.uint8))
        y = torch.randint(0, 10, (batch,), generator=gen).to(rt.device)
        steps[arch] = (batch, recipe, lambda t=trainer, x=x, y=y: t.step(x, y))
    times = interleaved_times({arch: fn for arch, (_, _, fn) in steps.items()}, device=rt.device.type, warmup=1,
                              repeat=repeat)
    rows = {arch: {"batch": steps[arch][0], "recipe": steps[arch][1].name, "min_step_s": min(ts),
                   "median_step_s": statistics.median(ts), "s_per_image": min(ts) / steps[arch][0]}
            for arch, ts in times.items()}
    return {"repeat": repeat, "rows": rows}


# ------------------------------------------------------------------------------------------------ runs

def recipe_overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings → recipe overrides, each value parsed as JSON (``5``, ``0.9``, ``false``) or
    kept as text; an unknown key fails in :func:`create_recipe` with the valid ones."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--recipe-set {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def run(arch: str, recipe_name: str, train: WorkingSet, test: WorkingSet, epochs: int | None, rt: Runtime,
        seed: int, overrides: dict[str, Any] | None = None, test_every: int = 1) -> dict:
    recipe = create_recipe(recipe_name, **(overrides or {}))
    cfg = recipe.fit_config(epochs or recipe.epochs or 1)
    generator = seed_everything(seed)
    model = create_model(arch, len(train.classes))
    started = time.perf_counter()
    history = fit(model, train, test, cfg, defense=create_defense("none"), paradigm=create_paradigm("scratch"),
                  runtime=rt, generator=generator, recipe=recipe, test_every=test_every)
    wall = time.perf_counter() - started
    eval_started = time.perf_counter()
    accuracy(model, test.to(rt.device), rt, logits=recipe.final_test_logits)
    eval_s = time.perf_counter() - eval_started
    trained = [h for h in history if h["epoch"] >= 1 and "test_accuracy" in h]
    epoch_s = [h["seconds"] for h in history if h["epoch"] >= 1]
    return {"arch": arch, "recipe": recipe.describe(), "images": len(train), "test_images": len(test),
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "test_accuracy": trained[-1]["test_accuracy"],
            "best_test_accuracy": max(h["test_accuracy"] for h in trained),
            "best_epoch": max(trained, key=lambda h: h["test_accuracy"])["epoch"],
            "wall_s": round(wall, 2), "epoch_s": epoch_s, "eval_s": round(eval_s, 2),
            "train_s_per_epoch_median": round(statistics.median(
                h["seconds"] - (eval_s if "test_accuracy" in h else 0) for h in history if h["epoch"] >= 1), 2),
            "threads": torch.get_num_threads(), "precision": rt.precision, "channels_last": rt.channels_last,
            "device": str(rt.device), "torch": torch.__version__, "cpu": environment()["cpu"],
            "history": history}


def fast_protocol(fast: dict) -> tuple[float, str]:
    """The fast victim's time for its recipe's epochs: measured when the run trained that many, else its
    measured time scaled by epochs (stated as such)."""
    recipe_epochs = fast["recipe"]["epochs"]
    if fast["epochs"] == recipe_epochs:
        return fast["wall_s"], f"measured ({fast['epochs']} epochs)"
    return (fast["wall_s"] * recipe_epochs / fast["epochs"],
            f"projected: measured {fast['epochs']} epoch(s) × {recipe_epochs}/{fast['epochs']}")


def projection(record: dict, fast: dict | None, protocol_epochs: int) -> dict:
    """A ResNet's projected protocol time: measured training seconds per image (epoch time minus its test
    pass) × the fast run's training images × ``protocol_epochs``, plus one final test pass (the fast run's
    wall time holds one too); its ratio to the fast victim's time for its own recipe's epochs
    (:func:`fast_protocol`)."""
    per_image = record["train_s_per_epoch_median"] / record["images"]
    images = fast["images"] if fast else record["images"]
    epoch = per_image * images
    projected = epoch * protocol_epochs + record["eval_s"]
    out = {"projected_epoch_s": round(epoch, 1), "protocol_epochs": protocol_epochs,
           "projected_protocol_s": round(projected, 1),
           "basis": f"measured {record['epochs']} epoch(s) on {record['images']} images × {images} images × "
                    f"{protocol_epochs} epochs (the UE papers' victim protocol; not measured)"}
    if fast:
        fast_s, basis = fast_protocol(fast)
        out.update(fast_protocol_s=round(fast_s, 1), fast_basis=basis, ratio_vs_fast=round(projected / fast_s, 2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test, not a measurement")
    parser.add_argument("--json", default=str(REPO / "bench/results/victim-cpu.json"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data", default="../shared/data/cifar10", help="CIFAR-10 folder (relative: to the repo)")
    parser.add_argument("--npz", help="train_x/train_y/test_x/test_y arrays instead of --data")
    parser.add_argument("--archs", default=f"{FAST},resnet18_cifar_slim,resnet18_cifar")
    parser.add_argument("--epochs", type=int, help="epochs of the fast victim (default: its recipe's)")
    parser.add_argument("--images", type=int, help="training images of the fast victim (default: all)")
    parser.add_argument("--test-images", type=int, help="test images (default: all)")
    parser.add_argument("--resnet-images", type=int, default=5000, help="training images a ResNet's epoch is timed on")
    parser.add_argument("--resnet-epochs-measured", type=int, default=1)
    parser.add_argument("--resnet-epochs", type=int, default=RESNET_PROTOCOL_EPOCHS,
                        help="epochs a ResNet needs for its best accuracy, for the projection (stated, not measured)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: the fastest in the format measurement")
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--format-batch", type=int, default=256)
    parser.add_argument("--step-repeat", type=int, default=5,
                        help="interleaved training steps per architecture for the per-image ratios (0: skip)")
    parser.add_argument("--step-batch", type=int, default=256, help="cap on those steps' batch size")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-every", type=int, default=0,
                        help="test the fast victim after every N epochs (0: only after the last, as the protocol "
                             "needs; a curve costs a test pass per point)")
    parser.add_argument("--recipe-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a constant of the fast victim's recipe (repeatable), e.g. "
                             "cycle_momentum=false or lookahead_every=5; recorded in the results")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.images = min(args.images or 512, 512)
        args.test_images = min(args.test_images or 256, 256)
        args.resnet_images = min(args.resnet_images, 128)
        args.epochs = args.epochs or 1
        args.format_batch = min(args.format_batch, 32)
        args.step_repeat = min(args.step_repeat, 1)
        args.step_batch = min(args.step_batch, 8)

    if args.npz:
        train, test = load_npz(Path(args.npz))
    else:
        root = Path(args.data)
        train, test = load_cifar(root if root.is_absolute() else REPO / root)
    test = take(test, args.test_images)
    measure = "auto" in (args.precision, args.channels_last)  # both given: their timing is not needed
    formats = time_formats(args.device, args.format_batch, 2 if args.quick else 5) if measure else None
    precision = formats["fastest"]["precision"] if args.precision == "auto" else args.precision
    channels_last = formats["fastest"]["channels_last"] if args.channels_last == "auto" else args.channels_last == "on"
    rt = Runtime.create(args.device, precision, "off", channels_last=channels_last)
    print(f"formats (fastvgg step, batch {formats['batch']}):" if formats else "formats: given, not timed")
    for r in formats["rows"] if formats else []:
        print(f"  {r['precision']:>4} channels_last={r['channels_last']!s:<5} "
              f"{r['median_s'] * 1e3:8.1f} ms/step median "
              f"({r['min_s'] * 1e3:.1f} min)  {r['speedup_vs_fp32_nchw']:.2f}x vs fp32 NCHW (medians)")
    print(f"using {precision}, channels_last={channels_last}, {torch.get_num_threads()} threads")

    results = {"settings": vars(args), "formats": formats, "precision": precision, "channels_last": channels_last,
               "records": [], "ratios": []}
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if args.step_repeat and FAST in archs and len(archs) > 1:
        steps = time_archs(archs, rt, args.step_repeat, args.step_batch)
        fast_s = steps["rows"][FAST]["s_per_image"] * create_recipe(default_recipe(FAST)).epochs
        print(f"training step per image, interleaved (best of {steps['repeat']}):")
        for arch, row in steps["rows"].items():
            row["protocol_epochs"] = create_recipe(default_recipe(arch)).epochs if arch == FAST else args.resnet_epochs
            row["ratio_vs_fast"] = round(row["s_per_image"] * row["protocol_epochs"] / fast_s, 2)
            print(f"  {arch:<20} batch {row['batch']:>4}: {row['s_per_image'] * 1e3:7.2f} ms/image; × "
                  f"{row['protocol_epochs']} epochs = {row['ratio_vs_fast']:.1f}x the fast victim's training time "
                  f"({'its recipe' if arch == FAST else 'the UE papers protocol, stated, not measured'})")
        results["step_ratios"] = steps
        write_report(args.json, results, __file__, started)
    fast = None
    for arch in sorted(archs, key=lambda a: a != FAST):  # the fast victim first: the ratios' baseline
        is_fast = arch == FAST
        images = args.images if is_fast else min(args.resnet_images, args.images or len(train))
        epochs = args.epochs if is_fast else args.resnet_epochs_measured
        record = run(arch, default_recipe(arch), take(train, images), test, epochs, rt, args.seed,
                     recipe_overrides(args.recipe_set) if is_fast else None, args.test_every if is_fast else 1)
        print(f"{arch}: {record['images']} images × {record['epochs']} epochs: "
              f"test {100 * record['test_accuracy']:.2f} % "
              f"(best {100 * record['best_test_accuracy']:.2f} % at epoch {record['best_epoch']}) "
              f"in {record['wall_s']:.1f} s "
              f"(epochs {record['epoch_s']} s, test pass {record['eval_s']} s)")
        if is_fast:
            fast = record
        else:
            record["projection"] = projection(record, fast, args.resnet_epochs)
            p = record["projection"]
            results["ratios"].append({"arch": arch, **p})
            ratio = (f" = {p['ratio_vs_fast']:.1f}x the fast victim's {p['fast_protocol_s']:.0f} s ({p['fast_basis']})"
                     if fast else "")
            print(f"  projected protocol time: {p['projected_protocol_s']:.0f} s ({p['basis']}){ratio}")
        results["records"].append(record)
        write_report(args.json, results, __file__, started)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
