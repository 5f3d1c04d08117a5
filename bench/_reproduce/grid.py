"""The grid: every (seed, row) of a selection through the cells — the seed's priors, the row's protected
folder per column group, one verify battery per group and victim seed — in the order that informs first:
the informative rows under the informative defenses (:data:`FIRST_ROWS` × :data:`FIRST_DEFENSES`) for
every seed, then everything else. ``on_row`` is called each time a row's cells land (the script rewrites
the results file there), so a long run leaves a usable table wherever it stops."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _reproduce import cells as cell_ops
from _reproduce import data
from _reproduce.cli import Selection
from _reproduce.data import Folders, Prior
from _reproduce.render import cells_from_reports, protocol_columns

#: Rows and defenses measured first (a pass over every seed before the rest): clean, the papers' baseline
#: and ueguard's own methods, under no defense and under staged training.
FIRST_ROWS = ("clean", "emn", "ssc", "bait")
FIRST_DEFENSES = ("none", "staged")


@dataclass
class Grid:
    """What a run measured so far: per row, the cells of each (seed, victim seed) in the order first made;
    the protections' and the priors' records."""

    rows: list[str]
    entries: dict[str, dict[tuple[int, int], dict[str, dict]]] = field(default_factory=dict)
    protections: dict[str, dict] = field(default_factory=dict)
    priors: dict[str, dict] = field(default_factory=dict)
    folders: dict[tuple[str, str | None, int], Path] = field(default_factory=dict)  # protected, made this run

    @property
    def results(self) -> dict[str, list[dict[str, dict]]]:
        """Per row, one cell dict per (seed, victim seed): the results file's and the table's form."""
        return {row: list(self.entries.get(row, {}).values()) for row in self.rows}

    @property
    def entry_seeds(self) -> dict[str, list[tuple[int, int]]]:
        return {row: list(self.entries.get(row, {})) for row in self.rows}

    def with_cells(self, kept: dict[tuple[str, tuple[int, int], str], dict]) -> Grid:
        """This grid plus the ``kept`` cells (``(row, (seed, victim seed), column)`` → cell) it has not
        measured yet: the cells of the results file a run rewrites, so that a run stopped in its first pass
        leaves the file with every cell it found there (a cell this run measures replaces the kept one)."""
        entries = {row: {pair: dict(cells) for pair, cells in per.items()} for row, per in self.entries.items()}
        for (row, pair, column), cell in kept.items():
            entries.setdefault(row, {}).setdefault(pair, {}).setdefault(column, cell)
        return dataclasses.replace(self, entries=entries)


def seed_priors(sel: Selection, folders: Folders, seed: int, log) -> list[Prior]:
    """The priors ``seed`` needs: the disjoint one where a column starts from it or SSC / BAIT protect the
    scratch column against it (re-trained per seed); the akamaster and the user's where a prior paradigm
    starts from them (a scratch-only run needs neither file)."""
    priors: list[Prior] = []
    needs_disjoint = "disjoint" in sel.priors and sel.prior_paradigms or \
        "scratch" in sel.paradigms and any(v.method in ("ssc", "bait") for v in sel.variants.values())
    if needs_disjoint:
        priors.append(data.pretrain_disjoint_prior(folders, sel.cache, sel.scale, seed))
        log(f"prior: {priors[-1].note}")
    if "akamaster" in sel.priors and sel.prior_paradigms:
        if (aka := data.akamaster_prior(sel.data)) is None:
            raise SystemExit(f"{sel.data / data.AKAMASTER}: missing; pass --priors disjoint or --data DIR")
        priors.append(aka)
    if "user" in sel.priors and sel.prior_paradigms:
        priors.append(Prior("user", sel.weights, sel.weights_arch, None, f"--weights {sel.weights}"))
    return priors


def record_priors(grid: Grid, priors: list[Prior], seed: int, several_seeds: bool) -> None:
    for prior in priors:  # the disjoint prior is re-trained per seed: one entry each, not the last seed's
        key = f"{prior.name}, seed {seed}" if prior.name == "disjoint" and several_seeds else prior.name
        grid.priors[key] = {"name": prior.name, "weights": str(prior.weights), "arch": prior.arch,
                            "accuracy": prior.accuracy, "note": prior.note}


def training_folder(sel: Selection, grid: Grid, row: str, prior: Prior | None, disjoint: Prior | None,
                    folders: Folders, seed: int, log) -> Path:
    """The row's training folder for one column group: the task folder for clean, else its protection
    (made once per run: a second pass finds it here)."""
    if row == "clean":
        return folders.task_train
    key = (row, prior.name if prior else None, seed)
    if key not in grid.folders:
        folder, record = cell_ops.protected_folder(sel.variants[row], prior or disjoint, folders, sel.cache,
                                                   sel.scale, seed, log)
        grid.folders[key] = folder
        grid.protections[f"{row}@{record['prior']}-s{seed}" if record["prior"] else f"{row}-s{seed}"] = record
    return grid.folders[key]


def run_row(sel: Selection, grid: Grid, row: str, seed: int, priors: list[Prior], defenses: list[str],
            folders: Folders, log) -> None:
    """One row at one seed: its protections, then a verify battery per column group and victim seed."""
    cells = sel.cache / "cells" / sel.scale.tag()
    column_priors = [p for p in priors if p.name in sel.priors] if sel.prior_paradigms else []
    disjoint = next((p for p in priors if p.name == "disjoint"), None)
    groups = ([(None, ["scratch"])] if "scratch" in sel.paradigms else []) + \
             [(p, sel.prior_paradigms) for p in column_priors]
    try:
        group_folders = [training_folder(sel, grid, row, prior, disjoint, folders, seed, log) for prior, _ in groups]
    except cell_ops.NotCached as missing:  # a render of what the cache holds: the row stays empty, the rest renders
        log(f"{missing}; {row} (seed {seed}) left empty")
        return
    if sel.protect_only:
        return
    for victim_seed in sel.victim_seeds or [seed]:
        reports: list[tuple[str | None, dict]] = []
        for (prior, group_paradigms), folder in zip(groups, group_folders):
            report = cell_ops.verify_cell(row, prior.name if prior else "scratch", folder, folders, prior,
                                          group_paradigms, defenses, cells, sel.scale, victim_seed, log,
                                          sel.defense_options)
            reports.append((prior.name if prior else None, report))
        entry = grid.entries.setdefault(row, {})[(seed, victim_seed)] = cells_from_reports(row, reports)
        summary = ", ".join(f"{c} {v['accuracy']:.1f}" for c, v in entry.items())
        log(f"{row} (seed {seed}, victim seed {victim_seed}): {summary}")


def passes(sel: Selection) -> list[list[tuple[str, list[str]]]]:
    """The order of work: ``[(row, its defenses), ...]`` per pass — the informative rows under the
    informative defenses first where that is less than everything, then every row under all of its own."""
    every = [(row, sel.defenses if row in sel.defended else ["none"]) for row in sel.rows]
    first = [(row, [d for d in defenses if d in FIRST_DEFENSES]) for row, defenses in every if row in FIRST_ROWS]
    first = [(row, defenses) for row, defenses in first if defenses]
    return [first, every] if first != every else [every]


def planned_cells(sel: Selection) -> set[tuple[str, tuple[int, int], str]]:
    """Every ``(row, (seed, victim seed), column)`` a run of ``sel`` writes to its results file (none with
    ``--protect-only``)."""
    if sel.protect_only:
        return set()
    return {(row, (seed, victim_seed), column) for row, defenses in passes(sel)[-1] for seed in sel.seeds
            for victim_seed in sel.victim_seeds or [seed]
            for column in protocol_columns(sel.paradigms, sel.priors, defenses)}


def run_grid(sel: Selection, folders: Folders, log, on_row: Callable[[Grid], None] | None = None) -> Grid:
    """Every seed × row of ``sel`` (pass by pass, see :func:`passes`); ``on_row(grid)`` after each row lands."""
    grid = Grid(list(sel.rows))
    seed_prior_list: dict[int, list[Prior]] = {}
    for work in passes(sel):
        for seed in sel.seeds:
            if seed not in seed_prior_list:
                seed_prior_list[seed] = seed_priors(sel, folders, seed, log)
                record_priors(grid, seed_prior_list[seed], seed, len(sel.seeds) > 1)
            for row, defenses in work:
                run_row(sel, grid, row, seed, seed_prior_list[seed], defenses, folders, log)
                if on_row is not None:
                    on_row(grid)
    return grid
