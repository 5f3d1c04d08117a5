"""Which defenses recover the digits from EMN (and REM)? (issue 4's evidence; no shared data needed)

The data are scikit-learn's real digits, written as the demo writes them (32×32 grayscale PNG class
folders, ``ueguard.demo.build_digits_folders``), protected through the public SDK at the demo's budget
(``ueguard.demo.DEMO_EPS`` = 64/255; at 8/255 nothing protects these digits, see docs/results.md), then
``ueguard.sdk.verify(protected, test, clean=train, defense=...)`` runs the battery: one real training run
per defense, each tested on the clean test digits, next to the clean baseline (standard training on the
originals) measured in the same run.

It also measures the ``staged`` trigger (ueguard's reconstruction of ST/ACM; its constants are ours):
for every ``--taus`` value, staged training on the protected *and* on the clean digits, so the table
shows whether a threshold fires on protected data (recovering accuracy) without hurting clean learning.
The printed ratio is staged ÷ standard test accuracy on the protected data, both from this run.

With ``--cifar`` the battery runs on real CIFAR-10 instead (needs ``../shared/data`` or ``--data DIR``):
bench/reproduce.py's folders, protections and cached verify cells at its ``cpu`` scale (``--quick``: its
``quick`` scale) — the five task classes, EMN at 8/255, the slim ResNet-18 from scratch — so every run
here is a cell of reproduce's table too, and the clean baseline is reproduce's clean row.

    python bench/defenses.py --quick --json bench/results/defenses-digits-quick.json
    python bench/defenses.py --cifar --json bench/results/defenses-cifar-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _timing import write_report  # noqa: E402

ARCH = "resnet18_cifar_slim"


def summarise(run: dict) -> dict:
    """The fields of one verify run record the table needs (and the staged trigger, where recorded)."""
    out = {k: run.get(k) for k in ("defense", "test_accuracy", "final_test_accuracy", "peak_test_accuracy",
                                   "selected_epoch", "seconds")}
    out["curve"] = [h["test_accuracy"] for h in run["history"]]
    if "stage_cuts" in run:  # staged: when and where it cut the learning rate, and the ACM it watched
        out["stage_cuts"] = run["stage_cuts"]
        out["acm_curve"] = run.get("acm_curve")
    return out


def battery(train: Path, test: Path, protected: Path, defenses: str, budget: str, seed: int,
            state: Path) -> dict:
    from ueguard.sdk import verify

    # one resumable battery per defense selection: a later run of other defenses does not clash with it
    path = state / f"battery-{protected.name}-{defenses.replace(',', '+')}.json"
    report = verify(protected, test, clean=train, defense=defenses, paradigm="scratch", arch=ARCH, budget=budget,
                    seed=seed, size=32, json_path=path, resume=(Path(f"{path}.state") / "config.json").is_file())
    return {"clean_accuracy": report["runs"][0]["clean_accuracy"],
            "runs": {r["defense"]: summarise(r) for r in report["runs"]},
            "worst": report["worst"], "protected": report["protected"]}


def staged_sweep(train: Path, test: Path, protected: Path, taus: list[float], budget: str, seed: int,
                 battery_staged: dict | None = None) -> list[dict]:
    """Staged training at each tau on the protected and on the clean images. The battery's own ``staged``
    run (``battery_staged``, at the default tau, same seed and recipe) stands for that cell instead of
    being trained again."""
    from ueguard.defenses.staged import StagedConfig
    from ueguard.sdk import verify

    rows = []
    for tau in taus:
        row = {"tau": tau}
        for name, folder in (("protected", protected), ("clean", train)):
            if name == "protected" and battery_staged is not None and tau == StagedConfig.tau:
                row[name] = battery_staged
                continue
            report = verify(folder, test, defense="staged", defense_options=(("tau", tau),), paradigm="scratch",
                            arch=ARCH, budget=budget, seed=seed, size=32)
            row[name] = summarise(report["runs"][0])
        rows.append(row)
        print(f"staged tau={tau}: protected {100 * row['protected']['test_accuracy']:.1f} %, "
              f"clean {100 * row['clean']['test_accuracy']:.1f} %", flush=True)
    return rows


def cifar_batteries(args, methods: list[str], log) -> dict:
    """The battery on CIFAR-10 through bench/reproduce.py (its folders, protections and cached cells)."""
    import reproduce
    from ueguard.sdk.verify import VerifyOptions, combine_verdicts, verdict

    scale = reproduce.SCALES["quick" if args.quick else "cpu"]
    defenses = VerifyOptions.resolve(defense=args.defenses).defenses
    defenses = ["none"] + sorted((d for d in defenses if d != "none"), key=lambda d: d.startswith("at"))  # AT last:
    folders = reproduce.convert(args.data, args.cache, scale, args.seed)                                   # ~11× dearer
    cells = args.cache / "cells" / scale.tag()
    clean = reproduce.verify_cell("clean", "scratch", folders.task_train, folders, None, ["scratch"], ["none"], cells,
                                  scale, args.seed, log)["runs"][0]
    out = {"scale": scale.name, "scale_tag": scale.tag(), "train_images": clean["train_images"],
           "epochs": scale.epochs, "arch": scale.scratch_arch, "methods": {}}
    for method in methods:
        folder, record = reproduce.protected_folder(reproduce.Variant(method, method), None, folders, args.cache,
                                                    scale, args.seed, log)
        report = reproduce.verify_cell(method, "scratch", folder, folders, None, ["scratch"], defenses, cells, scale,
                                       args.seed, log)
        runs = {r["defense"]: summarise(r) for r in report["runs"]}
        verdicts = [verdict(r["test_accuracy"], clean["test_accuracy"], 1 / len(reproduce.TASK_CLASSES),
                            VerifyOptions.threshold) for r in report["runs"]]  # verify's rule at its default τ
        worst = max(report["runs"], key=lambda r: r["test_accuracy"])
        prot = {"method": method, "eps": f"{record['max_linf_255']:.0f}/255 (measured max)",
                "images": record["ok"], "seconds": record["seconds"]}
        out["methods"][method] = {"protect": prot, "battery": {
            "clean_accuracy": clean["test_accuracy"], "runs": runs, "protected": combine_verdicts(verdicts),
            "worst": {"defense": worst["defense"], "test_accuracy": worst["test_accuracy"]}}}
        log(f"{method}: " + ", ".join(f"{n} {100 * r['test_accuracy']:.1f} %" for n, r in runs.items()))
    return out


def _cuts(run: dict) -> str:
    cuts = run.get("stage_cuts") or []
    return ", ".join(f"{c['stage']} @ epoch {c['epoch']:.1f}" for c in cuts) or "none"


def table(results: dict) -> str:
    lines = []
    for method, block in results["methods"].items():
        standard = block["battery"]["runs"].get("none", {}).get("test_accuracy")  # (a battery without none: no ratio)
        lines += [f"**{method}** ({block['protect']['eps']}; clean baseline "
                  f"{100 * block['battery']['clean_accuracy']:.1f} %)", "",
                  "| defense | protected-trained accuracy % | peak % | ÷ standard | s |", "|---|---:|---:|---:|---:|"]
        for name, run in block["battery"]["runs"].items():
            ratio = f"{run['test_accuracy'] / standard:.2f}" if standard else "—"
            lines.append(f"| {name} | {100 * run['test_accuracy']:.1f} | {100 * run['peak_test_accuracy']:.1f} | "
                         f"{ratio} | {run['seconds']:.0f} |")
        if block.get("staged_sweep"):
            lines += ["", "| staged tau | on protected % (cuts) | on clean % (cuts) |", "|---|---:|---:|"]
            for row in block["staged_sweep"]:
                lines.append(f"| {row['tau']} | {100 * row['protected']['test_accuracy']:.1f} "
                             f"({_cuts(row['protected'])}) | {100 * row['clean']['test_accuracy']:.1f} "
                             f"({_cuts(row['clean'])}) |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ueguard.demo import DEMO_EPS, build_digits_folders
    from ueguard.sdk import protect

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="quick presets for protect and verify")
    parser.add_argument("--methods", default="emn", help="comma list of methods to protect with (emn, rem, ...)")
    parser.add_argument("--defenses", default="all", help="verify's --defense (default: all)")
    parser.add_argument("--taus", default="0.4,0.6,0.8", help="staged thresholds to sweep ('' skips the sweep)")
    parser.add_argument("--eps", default=DEMO_EPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="keep folders and resumable state here (default: temporary)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cifar", action="store_true",
                        help="run on CIFAR-10 through bench/reproduce.py's cpu scale (quick scale with --quick)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("UEGUARD_SHARED_DATA", "/work/shared/data")),
                        help="--cifar: the shared data folder (holds cifar10/cifar-10-batches-py)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                        / "ueguard-reproduce", help="--cifar: reproduce.py's cache (folders, protections, cells)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.cifar:
        if args.taus != parser.get_default("taus") and args.taus:
            parser.error("--taus is the digits sweep; on CIFAR-10 the staged constants are bench/staged.py's")
        results = cifar_batteries(args, args.methods.split(","),
                                  lambda m: print(f"[{time.perf_counter() - started:6.0f} s] {m}", flush=True))
        write_report(args.json, results, __file__, started)
        print(table(results))
        return 0
    budget = "quick" if args.quick else "standard"
    taus = [float(t) for t in args.taus.split(",") if t.strip()]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ueguard-defenses-"))
    results: dict = {"methods": {}}
    try:
        train, test = build_digits_folders(work / "digits", seed=args.seed)
        for method in args.methods.split(","):
            out = work / "protected" / method
            t0 = time.perf_counter()
            result = protect(train, out, method, eps=args.eps, budget=budget, seed=args.seed, size=32,
                             surrogate=ARCH, resume=out.exists())
            prot = {"method": method, "eps": args.eps, "images": result.ok, "failed": result.failed,
                    "seconds": round(time.perf_counter() - t0, 1), "rounds": result.info.get("rounds")}
            print(f"protected with {method}: {json.dumps(prot)}", flush=True)
            block = {"protect": prot, "battery": battery(train, test, out, args.defenses, budget, args.seed, work)}
            runs = block["battery"]["runs"]
            print(", ".join(f"{n} {100 * r['test_accuracy']:.1f} %" for n, r in runs.items()), flush=True)
            if taus:
                block["staged_sweep"] = staged_sweep(train, test, out, taus, budget, args.seed, runs.get("staged"))
            if "staged" in runs and "none" in runs:
                block["staged_over_standard"] = round(runs["staged"]["test_accuracy"] / runs["none"]["test_accuracy"], 3)
                print(f"{method}: staged / standard = {block['staged_over_standard']:.2f}", flush=True)
            results["methods"][method] = block
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    results.update(budget=budget, seed=args.seed, arch=ARCH)
    write_report(args.json, results, __file__, started)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
