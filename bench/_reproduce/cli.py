"""The command line: the parser, and a validated :class:`Selection` of what one run measures."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _reproduce.cells import Variant, parse_variant
from _reproduce.scales import ROWS, SCALES, Scale

PARADIGMS = ("scratch", "finetune", "frozen", "linear")
PRIORS = ("disjoint", "akamaster", "user")


@dataclass
class Selection:
    """What one run measures: the scale, rows (base rows and ``--variant`` rows), columns, seeds, priors,
    and where its data, cache and results file are."""

    scale: Scale
    rows: list[str]
    variants: dict[str, Variant]    # every row but clean → the method and constants it protects with
    extra: list[Variant]            # the ``--variant`` rows, as given
    paradigms: list[str]
    defenses: list[str]
    defended: list[str]
    seeds: list[int]
    victim_seeds: list[int] | None
    priors: list[str]
    weights: Path | None
    weights_arch: str
    data: Path
    cache: Path
    json_path: Path
    defense_options: dict[str, Any] = field(default_factory=dict)  # DEFENSE.KEY → value, verify's -d
    cached_only: bool = False
    replace: bool = False           # --json may be rewritten without cells it holds
    protect_only: bool = False      # make the protections (timing their generation), train no victim
    argv: list[str] | None = field(default=None, repr=False)

    @property
    def prior_paradigms(self) -> list[str]:
        return [p for p in self.paradigms if p != "scratch"]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Reproduce the papers on real CIFAR-10: protections × paradigms × "
                                                 "defenses, beside the published numbers.")
    size = parser.add_mutually_exclusive_group()
    for name in SCALES:
        size.add_argument(f"--{name}", dest="scale", action="store_const", const=name,
                          help=f"scale preset {name!r} (default: quick)")
    parser.add_argument("--methods", help=f"comma list of rows (default: all of {', '.join(ROWS)})")
    parser.add_argument("--paradigms", help="comma list of scratch, finetune, frozen, linear (default: the scale's)")
    parser.add_argument("--defenses", help="comma list of ueguard defenses (default: the scale's)")
    parser.add_argument("--defense-option", action="append", default=[], metavar="DEFENSE.KEY=VALUE",
                        help="a defense constant for this run, as verify's -d (repeatable; e.g. classmean.sigma=0); "
                             "its batteries are cached apart from the defaults' and the results file records it")
    parser.add_argument("--defended", help="rows that get the defenses beyond none (default: the scale's)")
    parser.add_argument("--priors", help="comma list of disjoint, akamaster, user (default: disjoint, akamaster, "
                                         "and user with --weights)")
    parser.add_argument("--weights", type=Path, help="a user prior (any weights file ueguard reads)")
    parser.add_argument("--weights-arch", default="resnet20_cifar", help="architecture of --weights")
    parser.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="NAME=METHOD:K=V,...",
                        help="an extra row: METHOD with these constants on top of the scale's (repeatable; "
                             "e.g. ssc-fresh=ssc:deep_init=fresh); cached under NAME")
    parser.add_argument("--seeds", default="0", help="comma list of seeds (default 0): each seed re-trains the prior "
                                                      "and every protection, and trains the victims with that seed")
    parser.add_argument("--victim-seeds", help="comma list of victim seeds trained on each seed's protections "
                                               "(default: the seed itself): separates the victims' run-to-run "
                                               "noise from the prior's and the protection's")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("UEGUARD_SHARED_DATA", "/work/shared/data")),
                        help="folder with cifar10/cifar-10-batches-py and weights/ (default /work/shared/data)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                        / "ueguard-reproduce", help="cache of converted folders, priors and cells")
    parser.add_argument("--json", type=Path, help="results JSON (default bench/results/reproduce-<scale>.json); "
                                                  "rewritten as every row lands; refused where it holds cells "
                                                  "this run would not write again (another scale's, a wider run's)")
    parser.add_argument("--replace", action="store_true",
                        help="rewrite --json even where it holds cells this run will not measure again")
    parser.add_argument("--cached-only", action="store_true",
                        help="only render what the cache holds: a missing run, or a row whose protection is not "
                             "cached, is left empty (—); nothing is protected or trained")
    parser.add_argument("--protect-only", action="store_true",
                        help="make the rows' protections and record their wall_s, train no victim (the results "
                             "file lists the protections; the table stays empty)")
    parser.add_argument("--train-per-class", type=int, metavar="N",
                        help="the scale with N task training images per class instead of its own (a timing probe "
                             "on a subset, or a smaller run; cached under its own key)")
    parser.add_argument("--merge", metavar="FILE,FILE,...",
                        help="render one table from these results files of one scale instead of running: each "
                             "cell from the last file that measured it, marked with its source (--json: where "
                             "to write; default bench/results/reproduce-merged.json); trains nothing")
    return parser


def split(text: str | None, default: tuple[str, ...], valid: tuple[str, ...] | None, what: str) -> list[str]:
    """A comma list option (``default`` when not given), each name checked against ``valid``."""
    names = list(default) if text is None else [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if valid is not None and n not in valid]
    if bad:
        raise SystemExit(f"--{what}: unknown {', '.join(bad)}; choose from {', '.join(valid)}")
    return names


def seeds(text: str, what: str) -> list[int]:
    try:
        values = [int(t) for t in split(text, (), None, what)]
    except ValueError:
        raise SystemExit(f"--{what} {text!r}: write a comma list of integers, e.g. 0,1,2") from None
    if not values or len(set(values)) != len(values):
        raise SystemExit(f"--{what} {text!r}: give at least one seed, each once")
    return values


def defense_option_map(pairs: list[str], defenses: list[str], budget: str) -> dict[str, Any]:
    """``--defense-option`` pairs as ``{"DEFENSE.KEY": value}``, each naming a selected defense and one of its
    constants (checked now, not an hour into the run)."""
    from _reproduce.cells import defense_constants
    from ueguard.errors import UsageError
    from ueguard.sdk.options import parse_method_options

    try:
        parsed = dict(parse_method_options(tuple(pairs)))
        for key in parsed:
            if "." not in key:
                raise UsageError(f"--defense-option {key}: name the defense, e.g. classmean.sigma=0")
        named = {key.rpartition(".")[0] for key in parsed}
        for defense in named:
            if defense not in defenses:
                raise UsageError(f"--defense-option {defense}.…: defense {defense!r} is not in --defenses "
                                 f"{','.join(defenses)}")
            defense_constants(defense, budget, parsed)
    except (UsageError, ValueError) as error:
        raise SystemExit(str(error)) from None
    return parsed


def select(args: argparse.Namespace, results: Path, argv: list[str] | None = None) -> Selection:
    """The run's :class:`Selection` from parsed ``args`` (``results``: the folder of the default ``--json``);
    a bad name or a missing file is a clear error."""
    scale = SCALES[args.scale or "quick"]
    if args.train_per_class is not None:
        if args.train_per_class < 1:
            raise SystemExit(f"--train-per-class {args.train_per_class}: give at least 1")
        scale = dataclasses.replace(scale, train_per_class=args.train_per_class)
    rows = split(args.methods, ROWS, ROWS, "methods")
    if "clean" not in rows:
        rows.insert(0, "clean")
    variants = {row: Variant(row, row) for row in rows if row != "clean"}
    variants.update({v.name: v for v in args.variant})
    rows += [v.name for v in args.variant if v.name not in rows]
    paradigms = split(args.paradigms, scale.paradigms, PARADIGMS, "paradigms")
    defenses = split(args.defenses, scale.defenses, None, "defenses")
    if "none" not in defenses:
        defenses.insert(0, "none")
    defended = split(args.defended, scale.defended, ROWS + tuple(v.name for v in args.variant), "defended")
    defense_options = defense_option_map(args.defense_option, defenses, scale.budget)
    seed_list = seeds(args.seeds, "seeds")
    victim_seeds = seeds(args.victim_seeds, "victim-seeds") if args.victim_seeds is not None else None
    prior_names = split(args.priors, ("disjoint", "akamaster") + (("user",) if args.weights else ()), PRIORS, "priors")
    if "user" in prior_names and args.weights is None:
        raise SystemExit("--priors user needs --weights FILE")
    if args.weights is not None and not args.weights.is_file():
        raise SystemExit(f"--weights {args.weights}: no such file")
    return Selection(
        scale=scale, rows=rows, variants=variants, extra=list(args.variant),
        paradigms=paradigms, defenses=defenses, defended=defended, seeds=seed_list, victim_seeds=victim_seeds,
        priors=prior_names, weights=args.weights, weights_arch=args.weights_arch, data=args.data, cache=args.cache,
        json_path=args.json or results / f"reproduce-{scale.name}.json", defense_options=defense_options,
        cached_only=args.cached_only, replace=args.replace,
        protect_only=args.protect_only, argv=argv)
