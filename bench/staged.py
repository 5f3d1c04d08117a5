"""Choose and check the staged-training (ST/ACM) constants on EMN- and REM-protected CIFAR-10.

Needs what ``bench/reproduce.py`` needs (CIFAR-10 python batches under ``/work/shared/data`` or
``--data``) and shares its cache: the same task folders (CIFAR-10 dog … truck, the scale's subset) and the
same protected folders (``ueguard.sdk.protect`` at the scale's budget), so the constants are chosen on the
data the reproduction table is made of. Every victim is ``ueguard.sdk.verify`` from scratch (the scale's
architecture, epochs and batch), as a user runs it.

One run, so every number is comparable:

1. **watch runs** — clean and every protected row train with ``staged`` watching but never cutting
   (``tau`` → 0): each shallow stage's ACM curve, untouched by the defense;
2. **tau** — per watched stage, the lowest ACM(t)/ACM(t₀) reached on clean data and on each protection;
   the stage that separates clean from the *least* separated protection best is chosen, and tau is put
   halfway (geometric mean) between clean's minimum and that protection's — the trigger then fires on
   every protection and not on clean data, on this measurement. When no stage separates them by 10 %
   the run says so and checks the current default instead;
3. **check runs** — ``staged`` with that tau at the chosen stage (``monitor``) for every ``gamma`` in
   ``--gammas`` (0.1 slows the cut stages, 0 freezes them) on clean and on every protection, beside
   standard training (the watch runs: a staged run that never cuts is standard training).

4. **schedule search** — the trigger aside, which cut recovers most: for every ``--setting`` (default: freeze
   the stages up to stem, layer1, layer2 or layer3 at the first fall of their ACM, ``tau`` 1, checked four
   times per epoch), ``staged`` on clean and every protection. The chosen setting is the one whose *worst*
   protected accuracy is highest (a defense is as good as its result on the protection it handles worst);
   what it costs on clean data is reported beside it.

It prints and writes (``--json``) a table of final and peak test accuracy per (data, setting) and the
ratio staged ÷ standard on each protection. Every run is cached as a verify report beside reproduce's
cells, so a second run only trains what is new.

    PYTHONPATH=. python bench/staged.py --quick --json /tmp/staged-quick.json   # smoke scale, minutes
    PYTHONPATH=. python bench/staged.py --cpu --methods emn,rem --json bench/results/staged-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import reproduce  # noqa: E402  (the shared CIFAR pipeline: folders, protections, cache)

WATCH_TAU = 1e-9  # a trigger that never fires: the run records ACM and is standard training

# step 4's default grid: freeze (gamma 0) the stages up to the named one at the first fall of their ACM
# (tau 1: ACM below its value before training), checked four times per epoch
SEARCH = {f"freeze≤{stage}": {"tau": 1.0, "gamma": 0.0, "monitor": monitor, "checks_per_epoch": 4}
          for monitor, stage in enumerate(("stem", "layer1", "layer2", "layer3"), start=1)}


def min_ratio(curve: dict[str, Any]) -> dict[str, float]:
    """Per watched stage: the lowest ACM(t) / ACM(t₀) over the checks after t₀."""
    return {name: min(v / values[0] for v in values[1:]) for name, values in curve["stages"].items()
            if name in curve["monitored"] and len(values) > 1 and values[0] > 0}


def choose_tau(clean: dict[str, float], protected: dict[str, dict[str, float]], gap: float = 0.9
               ) -> tuple[str | None, float | None, dict[str, float]]:
    """The stage and tau that separate clean data from every protection (see the module docstring).

    ``clean``: stage → clean's lowest ACM ratio; ``protected``: row → stage → that row's. Returns
    ``(stage, tau, separation)``, separation being stage → clean ÷ the highest protected ratio (how far
    the least separated protection falls below clean); stage and tau are None when no stage reaches
    ``1 / gap``."""
    separation = {s: clean[s] / max(max(rows[s] for rows in protected.values()), 1e-12) for s in clean
                  if all(s in rows for rows in protected.values())}
    if not separation:
        return None, None, separation
    stage = max(separation, key=separation.get)
    if separation[stage] < 1 / gap:
        return None, None, separation
    worst = max(rows[stage] for rows in protected.values())
    return stage, round(math.sqrt(clean[stage] * worst), 3), separation


def choose_setting(finals: dict[str, dict[str, float]], methods: list[str]) -> tuple[str, dict[str, float]]:
    """``finals``: data → setting → final accuracy. Returns the setting whose worst accuracy over the
    protections ``methods`` is highest (ties: the first), and that worst accuracy per setting."""
    settings = list(finals[methods[0]])
    worst = {s: min(finals[m][s] for m in methods) for s in settings}
    return max(settings, key=lambda s: worst[s]), worst


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=key=value,key=value`` (``--setting``) → (NAME, options), typed by the CLI's option parser;
    every staged option is a number."""
    from ueguard.sdk.options import parse_method_options

    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"--setting {text!r}: expected NAME=key=value,key=value")
    try:
        options = dict(parse_method_options(tuple(rest.split(","))))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--setting {text!r}: {error}") from None
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise argparse.ArgumentTypeError(f"--setting {text!r}: {key} needs a number, got {value!r}")
    return name, options


def stage_count(curve: dict[str, Any], stage: str) -> int:
    """``monitor`` for a trigger that watches the stages up to and including ``stage``."""
    return curve["monitored"].index(stage) + 1


def run_cell(name: str, folder: Path, folders, cells: Path, scale, seed: int, options: dict[str, Any], log
             ) -> dict[str, Any]:
    """One scratch victim under ``staged`` with ``options``: reproduce's cached verify cell."""
    tag = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    report = reproduce.verify_cell(name, f"scratch-staged-{tag}", folder, folders, None, ["scratch"], ["staged"],
                                   cells, scale, seed, log, {f"staged.{k}": v for k, v in options.items()})
    return report["runs"][0]


def summary(run: dict[str, Any]) -> dict[str, Any]:
    return {"final": round(100 * run["final_test_accuracy"], 2), "peak": round(100 * run["peak_test_accuracy"], 2),
            "cuts": [f"≤{c['stage']}@{c['epoch']}" for c in run.get("stage_cuts", [])],
            "seconds": run["seconds"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    for name in reproduce.SCALES:
        size.add_argument(f"--{name}", dest="scale", action="store_const", const=name,
                          help=f"reproduce.py's scale {name!r} (default: quick)")
    parser.add_argument("--methods", default="emn,rem", help="protections to calibrate on (default emn,rem)")
    parser.add_argument("--gammas", default="0.1,0", help="learning-rate factors of cut stages to check")
    parser.add_argument("--checks-per-epoch", type=int, default=2)
    parser.add_argument("--setting", type=parse_setting, action="append", metavar="NAME=K=V,...",
                        help="a schedule to search in step 4 (repeatable; default: freeze up to stem, layer1, "
                             "layer2 or layer3 at the first ACM fall)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("UEGUARD_SHARED_DATA", "/work/shared/data")))
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                        / "ueguard-reproduce", help="reproduce.py's cache (folders, protections, cells)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    scale = reproduce.SCALES[args.scale or "quick"]
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(reproduce.METHODS):
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(reproduce.METHODS)}")
    gammas = [float(g) for g in args.gammas.split(",") if g]
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {message}", flush=True)

    folders = reproduce.convert(args.data, args.cache, scale, args.seed)
    cells = args.cache / "cells" / scale.tag()
    cells.mkdir(parents=True, exist_ok=True)
    data = {"clean": folders.task_train}
    protections = {}
    for method in methods:
        prior = (reproduce.pretrain_disjoint_prior(folders, args.cache, scale, args.seed)
                 if method in ("ssc", "bait") else None)
        data[method], protections[method] = reproduce.protected_folder(
            reproduce.Variant(method, method), prior, folders, args.cache, scale, args.seed, log)

    # every shallow stage watched (monitor 0); gamma is moot for a trigger that never fires, and pinned (as
    # monitor is) so a watch run does not depend on staged's defaults, which this script chooses
    watch_options = {"tau": WATCH_TAU, "checks_per_epoch": args.checks_per_epoch, "monitor": 0, "gamma": 0.1}
    watch = {name: run_cell(name, folder, folders, cells, scale, args.seed, watch_options, log)
             for name, folder in data.items()}
    ratios = {name: min_ratio(run["acm_curve"]) for name, run in watch.items()}
    stage, tau, separation = choose_tau(ratios["clean"], {m: ratios[m] for m in methods})
    curve = watch["clean"]["acm_curve"]
    if stage is None:
        from ueguard.defenses.staged import StagedConfig

        tau, monitor = StagedConfig.tau, StagedConfig.monitor
        log(f"no stage separates clean from {', '.join(methods)} by 10 %: checking the default tau {tau} "
            f"(monitor {monitor})")
    else:
        monitor = stage_count(curve, stage)
        log(f"tau {tau} at {stage} (monitor {monitor}); separation {separation}")

    search = dict(args.setting) if args.setting else dict(SEARCH)
    runs = {f"staged γ={g:g}": {"tau": tau, "gamma": g, "monitor": monitor, "checks_per_epoch": args.checks_per_epoch}
            for g in gammas} | search  # step 3's check runs, then step 4's search
    checks: dict[str, dict[str, dict[str, Any]]] = {name: {"none": summary(run)} for name, run in watch.items()}
    for setting, options in runs.items():
        for name, folder in data.items():
            checks[name][setting] = summary(run_cell(name, folder, folders, cells, scale, args.seed, options, log))
    chosen, worst = choose_setting({n: {s: checks[n][s]["final"] for s in search} for n in checks}, methods)
    log(f"search: worst protected accuracy per setting {worst}; chosen {chosen} {search[chosen]}")
    settings = list(runs)
    lines = ["| data | standard | " + " | ".join(settings) + " |", "|---|---:|" + "---:|" * len(settings)]
    for name, row in checks.items():
        lines.append(f"| {name} | {row['none']['final']:.1f} (peak {row['none']['peak']:.1f}) | "
                     + " | ".join(f"{row[s]['final']:.1f} (peak {row[s]['peak']:.1f}; {', '.join(row[s]['cuts']) or 'no cut'})"
                                  for s in settings) + " |")
    table = "\n".join(lines)
    ratio = {name: {s: round(checks[name][s]["final"] / max(checks[name]["none"]["final"], 1e-9), 3) for s in settings}
             for name in checks}
    print("\nACM min ratio (lowest ACM(t)/ACM(t0)) per stage:")
    for name, r in ratios.items():
        print(f"  {name}: " + ", ".join(f"{s} {v:.3f}" for s, v in r.items()))
    print(f"\ntau {tau} at {stage or 'default stages'} (monitor {monitor})\n\n{table}\n\nstaged ÷ standard: {ratio}")
    print(f"\nschedule search: chosen {chosen} {search[chosen]} (worst protected accuracy {worst[chosen]:.1f} %)")
    if args.json:
        record = {"bench": "staged", "scale": scale.name, "scale_tag": scale.tag(), "seed": args.seed,
                  "methods": methods, "protections": protections, "acm_min_ratio": ratios,
                  "separation": separation, "stage": stage, "tau": tau, "monitor": monitor,
                  "checks_per_epoch": args.checks_per_epoch, "gammas": gammas, "search": search,
                  "search_worst": worst, "chosen": chosen, "chosen_options": search[chosen], "results": checks,
                  "ratio_staged_over_standard": ratio, "acm_curves": {n: r["acm_curve"] for n, r in watch.items()},
                  "table": table, "environment": reproduce._environment(),
                  "wall_seconds": round(time.perf_counter() - started, 1),
                  "command": " ".join(["python", "bench/staged.py"] + (sys.argv[1:] if argv is None else argv)),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
