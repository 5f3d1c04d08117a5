"""The table (Markdown, the published number beside each cell), the plots and the run's environment."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from _reproduce.scales import PUBLISHED

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # a results file's ``time``


def column_key(paradigm: str, prior: str | None, defense: str) -> str:
    return f"{paradigm}·{prior}/{defense}" if prior else f"{paradigm}/{defense}"


def cells_from_reports(row: str, reports: list[tuple[str | None, dict]]) -> dict[str, dict]:
    """``{column: {"accuracy", "peak", "history", "seconds", "stalled"}}`` of one row's verify reports
    (accuracy %; ``stalled``: verify's rule, applied here too to reports cached before it had one)."""
    from ueguard.sdk.verify import stalled

    out = {}
    for prior, report in reports:
        for run in report["runs"]:
            out[column_key(run["paradigm"], prior, run["defense"])] = {
                "accuracy": round(100 * run["test_accuracy"], 2), "peak": round(100 * run["peak_test_accuracy"], 2),
                "history": [round(100 * h["test_accuracy"], 2) for h in run["history"] if h["epoch"] >= 1],
                "seconds": run["seconds"], "stalled": stalled(run["history"], run["chance"])}
    return out


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def render_table(results: dict[str, list[dict[str, dict]]], columns: list[str],
                 published: dict[tuple[str, str], float] = PUBLISHED, notes: dict[tuple[str, str], str] | None = None,
                 transpose: bool = False) -> str:
    """Markdown: rows = protections (``results[row]`` one cell dict per seed × victim seed), columns =
    paradigm × defense; test accuracy % (mean ± sd over those), the published number in brackets where
    there is one, and ``stalled`` where a seed's run never left the constant predictor (verify gives it no
    verdict: its accuracy is the recipe failing, not the protection holding). ``notes[(row, column)]`` is
    written right after a measured number (a merged table's source mark); ``transpose``: one line per
    column, one table column per protection (a wide merged table reads better that way)."""
    grid: dict[tuple[str, str], str] = {}
    for row, per_seed in results.items():
        for column in columns:
            found = [seed_cells[column] for seed_cells in per_seed if column in seed_cells]
            text = _mean_sd([cell["accuracy"] for cell in found])
            if found and notes and (row, column) in notes:
                text += notes[(row, column)]
            if any(cell.get("stalled") for cell in found):
                text += " stalled"
            paradigm, _, defense = column.partition("/")
            if paradigm == "scratch" and (row, defense) in published:
                text += f" [{published[(row, defense)]:.1f}]"
            grid[row, column] = text
    if transpose:
        lines = ["| paradigm / defense | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
        lines += [f"| {column} | " + " | ".join(grid[row, column] for row in results) + " |" for column in columns]
    else:
        lines = ["| protection | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        lines += [f"| {row} | " + " | ".join(grid[row, column] for column in columns) + " |" for row in results]
    return "\n".join(lines) + "\n"


def _command(argv: list[str] | None) -> str:
    """The command line a results file records (``argv`` as :func:`main` was given it)."""
    return " ".join(["python", "bench/reproduce.py"] + (sys.argv[1:] if argv is None else argv))


def plot(results: dict[str, list[dict[str, dict]]], columns: list[str], stem: Path) -> list[Path]:
    """``<stem>-accuracy.png`` (grouped bars: one group per column, one bar per row) and ``<stem>-curves.png``
    (test accuracy per epoch of every row, one panel per column; first seed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = list(results)
    palette = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")  # one distinct colour per row
    colour = {row: palette(i % palette.N) for i, row in enumerate(rows)}
    written = []
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(columns)) + 1.8, 4))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        heights = [np.mean([s[c]["accuracy"] for s in results[row] if c in s]) if any(c in s for s in results[row])
                   else np.nan for c in columns]
        bars = ax.bar(np.arange(len(columns)) + i * width, heights, width, label=row, color=colour[row])
        for bar, c in zip(bars, columns):  # a stalled run's accuracy is the recipe failing: hatched, labelled
            if any(s[c].get("stalled") for s in results[row] if c in s):
                bar.set_hatch("//")
                ax.annotate("stalled", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", rotation=90, fontsize=6)
    ax.set_xticks(np.arange(len(columns)) + 0.4 - width / 2, columns, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy %")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not over them
    fig.tight_layout()
    written.append(stem.with_name(stem.name + "-accuracy.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    n = len(columns)
    ncols = min(4, n)
    fig, axes = plt.subplots((n + ncols - 1) // ncols, ncols, figsize=(3.2 * ncols, 2.6 * ((n + ncols - 1) // ncols)),
                             squeeze=False)
    for ax, column in zip(axes.flat, columns):
        for row in rows:
            if results[row] and column in results[row][0]:
                history = results[row][0][column]["history"]
                ax.plot(range(1, len(history) + 1), history, label=row, marker=".", color=colour[row])
        ax.set_title(column, fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_xlabel("epoch", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].set_ylabel("test accuracy %")
    fig.tight_layout()
    fig.legend(*axes.flat[0].get_legend_handles_labels(), fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 0.98))
    written.append(stem.with_name(stem.name + "-curves.png"))
    fig.savefig(written[-1], dpi=110, bbox_inches="tight")  # the legend sits beside the panels
    plt.close(fig)
    return written


def _environment() -> dict[str, Any]:
    import torch

    import ueguard

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "load_average_start": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
            "ueguard": ueguard.__version__}



# --------------------------------------------------------------------------------------------------
# the results of one run: its columns, record, Markdown header


def table_columns(results: dict[str, list[dict[str, dict]]], paradigms: list[str], priors: list[str],
                  defenses: list[str]) -> list[str]:
    """The table's columns in protocol order (:func:`protocol_columns`), those that hold a cell."""
    return [c for c in protocol_columns(paradigms, priors, defenses)
            if any(c in s for per_seed in results.values() for s in per_seed)]


def protocol_columns(paradigms: list[str], priors: list[str], defenses: list[str]) -> list[str]:
    """Every column these paradigms, priors and defenses make, in protocol order: scratch, then per prior and
    paradigm; defenses within."""
    columns = [column_key("scratch", None, d) for d in defenses if "scratch" in paradigms]
    return columns + [column_key(p, prior, d) for prior in priors for p in paradigms if p != "scratch"
                      for d in defenses]


def results_record(sel, grid, table: str, environment: dict[str, Any], wall: float) -> dict[str, Any]:
    """The results file's record of a run (``sel``: its Selection, ``grid``: what it measured)."""
    import dataclasses
    import time

    scale = sel.scale
    return {"bench": "reproduce", "scale": dataclasses.asdict(scale), "scale_tag": scale.tag(),
            "selection": {"rows": sel.rows, "paradigms": sel.paradigms, "defenses": sel.defenses,
                          "defended": sel.defended, "priors": sel.priors,
                          "defense_options": sel.defense_options},
            "variants": {v.name: {"method": v.method, "options": dict(v.options)} for v in sel.extra},
            "seeds": sel.seeds, "victim_seeds": sel.victim_seeds, "entry_seeds": grid.entry_seeds,
            "task_classes": scale.class_names(task=True), "prior_classes": scale.class_names(task=False),
            "priors": grid.priors,
            "protections": grid.protections, "results": grid.results,
            "published": {f"{r}/{d}": v for (r, d), v in PUBLISHED.items()},
            "table": table, "environment": environment, "wall_seconds": round(wall, 1),
            "command": _command(sel.argv), "time": time.strftime(TIME_FORMAT)}


def recorded_cells(record: dict[str, Any]) -> dict[tuple[str, tuple[int, int], str], dict]:
    """Every cell a results record holds, keyed ``(row, (seed, victim seed), column)`` (files written before
    they listed ``entry_seeds`` pair their entries with the seeds × victim seeds, as the run made them)."""
    default = [(s, v) for s in record.get("seeds", [0]) for v in record.get("victim_seeds") or [s]]
    out = {}
    for row, entries in record.get("results", {}).items():
        seeds = [tuple(pair) for pair in record.get("entry_seeds", {}).get(row, default)]
        out |= {(row, pair, column): cell for pair, cells in zip(seeds, entries) for column, cell in cells.items()}
    return out


def options_note(defense_options: dict[str, Any]) -> str:
    """The header's word on defense constants away from their defaults (a column keeps its defense's name)."""
    if not defense_options:
        return ""
    return " Defense constants changed: " + ", ".join(f"`{k}={v}`" for k, v in defense_options.items()) + "."


def header(sel, record: dict[str, Any], environment: dict[str, Any], wall: float) -> str:
    """The Markdown table's header: the protocol, the hardware and load, the wall time."""
    scale = sel.scale
    prior_archs = ", ".join(f"{k} {a}" for k, a in {v["name"]: v["arch"] for v in record["priors"].values()}.items())
    return (f"Scale `{scale.name}` ({scale.tag()}): {scale.train_per_class} training / {scale.test_per_class} "
            f"test images per class of {', '.join(record['task_classes'])}; victims {scale.epochs} epochs "
            f"(scratch: {scale.scratch_arch}; priors: {prior_archs}); "
            f"budget `{scale.budget}`; seeds {sel.seeds}; victim seeds {sel.victim_seeds or 'as the seeds'} "
            f"(a cell is the mean ± sd over every seed × victim seed)."
            f"{options_note(sel.defense_options)}\n"
            f"Hardware: {environment['cpu']}, {environment['cores']} cores, GPU {environment['gpu'] or 'none'}; "
            f"load average {environment['load_average_start'][0]:.1f} → {environment['load_average_end'][0]:.1f}; "
            f"torch {environment['torch']}. Wall time {wall / 60:.1f} min (cached cells included as loaded).\n"
            f"Test accuracy %; [brackets]: published, ResNet-18 from scratch on all of CIFAR-10, 60 epochs.\n\n")
