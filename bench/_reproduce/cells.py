"""Cells: one protected folder per (method, prior), one verify report per (row, column group) — each made
through ``ueguard.sdk`` and found again in the cache by what it was made with (constants, recipe, data)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from _reproduce.cache import _digest, _json_dump, exclusive
from _reproduce.data import Folders, Prior
from _reproduce.scales import METHODS, ROWS, Scale


@dataclass(frozen=True)
class Variant:
    """A row that runs ``method`` with ``options`` on top of the scale's (``--variant NAME=METHOD:k=v,...``):
    how a constant search puts each setting it tries into the same table, cached under its own name."""

    name: str
    method: str
    options: tuple[tuple[str, Any], ...] = ()

    def split(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(protect's options, the method's options)``: ``precision`` (fp32, bf16, …) is protect's — how
        the efficacy of reduced precision is compared — the rest are the method's constants."""
        options = dict(self.options)
        return {k: options.pop(k) for k in PROTECT_OPTIONS if k in options}, options


PROTECT_OPTIONS = ("precision",)  # variant keys that go to protect() itself, not to the method


def parse_variant(text: str) -> Variant:
    from ueguard.sdk.options import parse_method_options

    name, sep, rest = text.partition("=")
    method, _, pairs = rest.partition(":")
    if not sep or not name or name in ROWS or method not in METHODS or any(c in name for c in "/,·@"):
        raise SystemExit(f"--variant {text!r}: write NAME=METHOD:key=value,key=value with a new row NAME "
                         f"(no / , · @) and METHOD one of {', '.join(METHODS)}")
    return Variant(name, method, parse_method_options(tuple(p for p in pairs.split(",") if p)))


def cached_protection(cells: Path, preferred: Path, method: str, options: dict[str, Any], config) -> Path | None:
    """A finished protected folder in ``cells`` made with ``options`` (protect's options as the benchmark
    records them) whose run resolved to ``config``'s constants — ``preferred`` (the row's own name) first,
    then any other row's: a default that changed is re-made, and a variant whose constants the defaults have
    since become is reused. Folders made before protect recorded ``method_config`` are resolved under their
    defaults revision (see :func:`ueguard.sdk.protect.recorded_constants`)."""
    from ueguard.data.manifest import MANIFEST_NAME, first_run
    from ueguard.methods import METHODS as REGISTRY
    from ueguard.sdk.protect import changed_constants, recorded_constants

    def settings(o: dict[str, Any]) -> dict[str, Any]:  # all but the method constants, which are compared resolved
        return json.loads(json.dumps({k: v for k, v in o.items() if k not in ("method_options", "resume")}, default=str))

    wanted, first = settings(options), preferred.with_name(preferred.name + ".json")
    for done in [first] + [p for p in sorted(cells.glob("*.json")) if p != first]:
        folder = done.with_name(done.name[:-len(".json")])
        try:
            record = json.loads(done.read_text())
            if record.get("method") != method or settings(record.get("options", {})) != wanted:
                continue  # only a folder of the same method and settings has its manifest read
            header = first_run(folder / MANIFEST_NAME)
            if header is not None and not changed_constants(recorded_constants(header, REGISTRY.get(method)), config):
                return folder
        except (OSError, ValueError, KeyError):  # unreadable, or a manifest this code cannot resolve
            continue
    return None


class NotCached(Exception):
    """Under ``--cached-only``: a row's protection is not in the cache (its cells are left empty)."""


def protected_folder(row: Variant, prior: Prior | None, folders: Folders, cache: Path, scale: Scale, seed: int,
                     log) -> tuple[Path, dict]:
    """``protect(task_train, out)`` with the row's method at the scale's budget (resumed when interrupted)."""
    from ueguard.methods import METHODS as REGISTRY

    method = row.method
    needs_prior = REGISTRY.get(method).needs_pretrained
    key = f"{row.name}@{prior.name}" if needs_prior else row.name
    cells = cache / "protected" / scale.protect_tag()
    out = cells / f"{key}-s{seed}"
    protect_options, method_options = row.split()
    options: dict[str, Any] = {"budget": scale.budget, "seed": seed, "size": 32, "format": "png",
                               **({"precision": scale.precision} if scale.precision else {}), **protect_options,
                               "method_options": {**scale.options_for(method), **method_options}}
    if REGISTRY.get(method).needs_surrogate:
        options.update(surrogate=prior.arch if needs_prior else scale.surrogate_arch or scale.scratch_arch,
                       weights=str(prior.weights) if needs_prior else None)
    from ueguard.sdk.options import ProtectOptions

    config = ProtectOptions.resolve(method=method, **{k: v for k, v in options.items() if v is not None}).method_config()
    lock = contextlib.nullcontext() if CACHED_ONLY else \
        exclusive(cells, f"protect-{method}-{_digest([options, dataclasses.asdict(config)])}", log)
    # the folder's constants are this code's (found by them, or made now): results files record their
    # defaults revision, so a merge of several files (--merge) can tell a row made under former defaults
    revision = {"defaults_revision": REGISTRY.get(method).defaults_revision}
    with lock:  # another process making the same folder is waited for, and its folder found
        if (found := cached_protection(cells, out, method, options, config)) is not None:
            return found, {**json.loads(found.with_name(found.name + ".json").read_text()), "folder": str(found),
                           **revision}
        if out.with_name(out.name + ".json").is_file():  # the row's name holds a folder made with other constants
            out = cells / f"{key}-{_digest(dataclasses.asdict(config), 8)}-s{seed}"
        if CACHED_ONLY:
            raise NotCached(f"--cached-only: {key} is not protected yet with this code's constants (in {cells})")
        return out, {**_protect(row, prior if needs_prior else None, folders.task_train, out, options, log),
                     **revision}


def _protect(row: Variant, prior: Prior | None, train: Path, out: Path, options: dict[str, Any],
             log) -> dict:
    """``protect(train, out)`` (resumed when ``out`` exists), its record written beside ``out``."""
    from ueguard.sdk import protect

    key, method = out.name, row.method
    options["resume"] = out.exists()
    log(f"protect {key}: {json.dumps({k: v for k, v in options.items() if v is not None}, default=str)}")
    started, load = time.perf_counter(), os.getloadavg()[0]
    result = protect(train, out, method, **options)
    linf = [item.get("linf") for item in result.items if item.get("linf") is not None]
    wall = round(time.perf_counter() - started, 1)  # the whole protect: read, generate, write (resumed: this part)
    record = {"method": method, "row": row.name, "prior": prior.name if prior else None, "ok": result.ok,
              "failed": result.failed, "seconds": wall, "wall_s": wall, "images": len(result.items),
              "load_average": [round(load, 2), round(os.getloadavg()[0], 2)], "resumed": options["resume"],
              "max_linf_255": max(linf) if linf else None, "mean_linf_255": float(np.mean(linf)) if linf else None,
              "within_budget": all(item.get("within_budget", True) for item in result.items),
              "options": {k: v for k, v in options.items() if k != "resume"}}
    if result.failed:
        raise SystemExit(f"protect {key}: {result.failed} image(s) failed; see {result.manifest_path}")
    _json_dump(out.with_name(out.name + ".json"), record)
    return record


CACHED_ONLY = False  # --cached-only: render from the cache, never train or protect (a missing run is left empty)
RECIPE_KEYS = ("arch", "epochs", "budget", "seed", "weights", "size", "batch_size", "lr")  # what a run's result depends on
# besides its data and defense; plus ``recipe`` and ``precision`` where a scale sets them (verify_cell)


def options_for(defense: str, defense_options: dict[str, Any]) -> dict[str, Any]:
    """The ``DEFENSE.KEY`` entries of ``defense_options`` that are ``defense``'s (a battery of one defense
    must not be handed another's options: verify refuses an option of a defense it does not run)."""
    from ueguard.defenses import DEFENSES

    name = DEFENSES.get(defense).name
    return {k: v for k, v in defense_options.items() if DEFENSES.get(k.rpartition(".")[0]).name == name}


def defense_constants(defense: str, budget: str, defense_options: dict[str, Any]) -> dict[str, Any]:
    """The constants ``defense`` runs with now — its defaults at ``budget`` under its entries of
    ``defense_options`` — as a verify run records them (``defense_config``)."""
    from ueguard.sdk.verify import VerifyOptions

    opts = VerifyOptions.resolve(defense=defense, defense_options=options_for(defense, defense_options), budget=budget)
    return json.loads(json.dumps(dataclasses.asdict(opts.defense_config(defense))))


@functools.lru_cache(maxsize=2048)
def _read_report(path: str, mtime_ns: int, size: int) -> dict:
    """A verify report, parsed once per version of the file (the key's mtime and size): a render asks
    every cell's reports of every file, and a large cache held hundreds of them, each with its histories.
    Bounded: a long run rewrites each battery's report after every cell, and the versions it left behind
    would otherwise stay parsed in memory until the process ends."""
    return json.loads(Path(path).read_text())


def cached_runs(cells: Path, row: str, seed: int, recipe: dict[str, Any], data: tuple[str, str],
                constants: dict[str, dict[str, Any]]) -> dict[tuple[str, str], dict]:
    """Every finished run in the cached reports that was trained on ``data`` (train, test folders) with
    ``recipe`` and with the defense constants that are current now, keyed by ``(paradigm, defense)``; this
    row's own reports first.

    A run is found wherever it was made (another column group's battery, bench/staged.py's settings, another
    row's report on the same protected folder — a variant the defaults have become), and a run made under a
    defense's *former* defaults is not found, so a changed default re-runs only what it changes."""
    found: dict[tuple[str, str], dict] = {}
    own = sorted(cells.glob(f"verify-{glob.escape(row)}-*-s{seed}.json"))
    for path in own + sorted(set(cells.glob(f"verify-*-s{seed}.json")) - set(own)):
        try:
            stat = path.stat()
            report = _read_report(str(path), stat.st_mtime_ns, stat.st_size)
        except (OSError, ValueError):
            continue
        if (report.get("data", {}).get("protected"), report.get("data", {}).get("test")) != data or \
                {k: report.get("config", {}).get(k) for k in recipe} != recipe:
            continue
        for run in report.get("runs", []):
            if run.get("defense") in constants and run.get("defense_config") == constants[run["defense"]]:
                found.setdefault((run["paradigm"], run["defense"]), run)
    return found


def cell_path(cells: Path, row: str, group: str, defense: str, paradigms: list[str], train_folder: Path,
              weights: str | None, seed: int, options: dict[str, Any] | None = None) -> Path:
    """Where one verify battery's report goes. The name carries a digest of the data and the prior it trains
    on: with ``--victim-seeds`` a victim seed is also another seed's own seed, and the two batteries (seed 1's
    victim on seed 0's protection and prior, and seed 1's own) must not overwrite each other's report. The
    defense's non-default ``options`` join the digest, so a battery at other constants keeps its own report."""
    digest = _digest([str(train_folder), weights] + ([sorted(options.items())] if options else []), 8)
    return cells / f"verify-{row}-{group}-{defense}-{'+'.join(paradigms)}-{digest}-s{seed}.json"


def verify_cell(row: str, group: str, train_folder: Path, folders: Folders, prior: Prior | None,
                paradigms: list[str], defenses: list[str], cells: Path, scale: Scale, seed: int, log,
                defense_options: dict[str, Any] | None = None) -> dict:
    """``verify`` of one row under one column group (scratch, or the paradigms of one prior), cached run by
    run: each (paradigm, defense) run already made with the same data, recipe and defense constants is
    reused (``cached_runs``); the missing ones are trained, one verify battery per defense, and resume
    when interrupted. ``defense_options``: ``{"DEFENSE.KEY": value}`` (``{"staged.tau": 0.3}``), each handed
    only to its defense's battery and part of that battery's report name. A defense that validates on clean
    images (earlystop) holds out the task's original training images, as an adversary with a few clean
    labelled images would. Returns ``{"runs": [...]}`` in
    paradigm × defense order."""
    from ueguard.defenses import DEFENSES

    defense_options = defense_options or {}
    defenses = [DEFENSES.get(d).name for d in defenses]  # as runs record them
    recipe = {"budget": scale.budget, "epochs": scale.epochs, "seed": seed, "size": 32,
              "batch_size": scale.batch_size, "lr": scale.prior_lr if prior else None,
              "arch": prior.arch if prior else scale.scratch_arch,
              "weights": str(prior.weights) if prior else None}
    recipe.update({k: v for k, v in (("recipe", scale.recipe), ("precision", scale.precision)) if v is not None})
    constants = {d: defense_constants(d, scale.budget, defense_options) for d in defenses}
    data = (str(train_folder), str(folders.task_test))
    found: dict[tuple[str, str], dict] = {}
    for defense in defenses:
        if all((p, defense) in found for p in paradigms):
            continue
        lock = contextlib.nullcontext() if CACHED_ONLY else \
            exclusive(cells, f"verify-{_digest([data, recipe, defense, constants[defense]])}", log)
        with lock:  # read the cache under the lock: another process may have made the runs while this one waited
            found.update(cached_runs(cells, row, seed, recipe, data, constants))
            if not (missing := [p for p in paradigms if (p, defense) not in found]):
                continue
            if CACHED_ONLY:
                log(f"--cached-only: no cached run of {row} × {group}: {defense} / {', '.join(missing)}; left empty")
                continue
            own = options_for(defense, defense_options)
            path = cell_path(cells, row, group, defense, missing, train_folder, recipe["weights"], seed, own)
            options = recipe | {"paradigm": ",".join(missing), "defense": defense, "defense_options": own}
            if DEFENSES.get(defense).needs_validation:  # earlystop: the adversary's clean images are the originals
                options["clean"] = folders.task_train
            log(f"verify {row} × {group}: paradigms {', '.join(missing)}; defense {defense}")
            report = _verify_resumed(train_folder, folders.task_test, path, options)
            for run in report["runs"]:
                found[(run["paradigm"], run["defense"])] = run
            for skipped in report.get("skipped", []):
                log(f"verify {row} × {group}: skipped {skipped}")
    return {"runs": [found[(p, d)] for p in paradigms for d in defenses if (p, d) in found]}


def _verify_resumed(train: Path, test: Path, path: Path, options: dict[str, Any]) -> dict:
    """``verify`` writing ``path``, resuming its battery; a battery whose settings changed starts over."""
    from ueguard.errors import UsageError
    from ueguard.sdk import verify

    try:
        return verify(train, test, json_path=path, resume=(Path(str(path) + ".state") / "config.json").is_file(),
                      **options)
    except UsageError as error:
        if "--resume" not in str(error):
            raise
        return verify(train, test, json_path=path, **options)
