"""``verify --report DIR``: the battery at a glance — a Markdown summary and PNG plots.

* ``accuracy.png``: test accuracy of every (defense, paradigm) run, grouped by paradigm, against that
  paradigm's clean baseline (dashed) and chance (dotted).
* ``curves.png``: learning curves per run, test accuracy per epoch trained on protected vs clean data.
* ``acm.png``: for ``staged`` runs, ACM per stage over training, with the learning-rate cuts marked.
* ``summary.md``: the verdict, the table, skipped runs, and links to the plots.

:func:`plot_picture_grid` draws originals, protected copies and their amplified difference side by side
(``ueguard demo`` puts it in its report folder as ``digits.png``).

Matplotlib with the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(report: dict, path: Path) -> None:
    plt = _plt()
    runs = report["runs"]
    paradigms = list(dict.fromkeys(r["paradigm"] for r in runs))
    defenses = list(dict.fromkeys(r["defense"] for r in runs))
    width = 0.8 / max(1, len(defenses))
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 1.5 + 0.3 * len(runs))), 4.6))
    cmap = plt.get_cmap("tab10")
    for j, defense in enumerate(defenses):
        xs, ys = [], []
        for i, paradigm in enumerate(paradigms):
            run = next((r for r in runs if r["paradigm"] == paradigm and r["defense"] == defense), None)
            if run is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(100 * run["test_accuracy"])
        bars = ax.bar(xs, ys, width * 0.92, label=defense, color=cmap(j % 10))
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    for i, paradigm in enumerate(paradigms):
        base = report.get("baselines", {}).get(paradigm)
        if base is not None:
            ax.hlines(100 * base["test_accuracy"], i - 0.45, i + 0.45, colors="black", linestyles="--", linewidth=1.2,
                      label="clean baseline" if i == 0 else None)
    ax.axhline(100 * report["chance"], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(range(len(paradigms)), paradigms)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    verdict = {True: "protected", False: "NOT protected", None: "no verdict"}[report["protected"]]
    ax.set_title(f"Accuracy of models trained on the protected data — verdict: {verdict}", fontsize=10)
    ax.legend(fontsize=7, ncol=min(5, len(defenses) + 2), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(report: dict, path: Path) -> None:
    plt = _plt()
    runs = report["runs"]
    cols = min(4, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), squeeze=False)
    for ax, run in zip(axes.flat, runs):
        hist = [h for h in run["history"] if h["epoch"] >= 1]
        ax.plot([h["epoch"] for h in hist], [100 * h["test_accuracy"] for h in hist], "o-", color="tab:red",
                markersize=3, label="protected → test")
        ax.plot([h["epoch"] for h in hist], [100 * h["train_accuracy"] for h in hist], "-", color="tab:red",
                alpha=0.35, label="protected → train batches")
        if "val_accuracy" in hist[0]:
            ax.plot([h["epoch"] for h in hist], [100 * h["val_accuracy"] for h in hist], "s--", color="tab:purple",
                    markersize=3, label="clean validation")
        if run.get("clean_history"):
            clean = [h for h in run["clean_history"] if h["epoch"] >= 1]
            ax.plot([h["epoch"] for h in clean], [100 * h["test_accuracy"] for h in clean], "o-", color="tab:blue",
                    markersize=3, label="clean → test")
        if run.get("selected_epoch") != run["epochs"]:
            ax.axvline(run["selected_epoch"], color="tab:purple", linestyle=":", linewidth=1)
        ax.axhline(100 * run["chance"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{run['defense']} / {run['paradigm']}", fontsize=9)
        ax.set_ylim(0, 105)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("accuracy (%)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    ncol = min(4, 2 * cols)  # one panel is too narrow for four entries side by side: two rows of two
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    legend_rows = math.ceil(len(legend) / ncol)
    fig.tight_layout(rect=(0, (0.06 if rows == 1 else 0.03) * legend_rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_acm(report: dict, path: Path) -> bool:
    """ACM curves of the staged runs; ``False`` (and no file) when there are none."""
    staged = [r for r in report["runs"] if r.get("acm_curve")]
    if not staged:
        return False
    plt = _plt()
    cols = min(2, len(staged))
    rows = math.ceil(len(staged) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 3.6 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, run in zip(axes.flat, staged):
        curve = run["acm_curve"]
        names = list(curve["stages"])
        for i, name in enumerate(names):
            style = "-" if name in curve["monitored"] else ":"
            ax.plot(curve["epoch"], curve["stages"][name], style, marker="o", markersize=3,
                    color=cmap(i % 10), label=name + ("" if name in curve["monitored"] else " (not watched)"))
        for cut in run.get("stage_cuts", []):
            ax.axvline(cut["epoch"], color="black", linestyle="--", linewidth=1)
            ax.text(cut["epoch"], 0.03, f" lr × gamma up to {cut['stage']}", transform=ax.get_xaxis_transform(),
                    fontsize=7, color="black", va="bottom", ha="left")
        tau = run["defense_config"]["tau"]
        ax.set_title(f"staged / {run['paradigm']}: ACM per stage (trigger < {tau} × start)", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("ACM (within / between)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(staged):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary_markdown(report: dict, plots: list[str], intro: str = "") -> str:
    """The Markdown summary; ``intro`` (Markdown, e.g. the demo's account of what it ran) goes first,
    and the verify report then follows as its own section."""
    from ueguard.display import STALLED_MEANING, recipe_lines

    verdict = {True: "**PROTECTED** — every run stayed far below its clean baseline",
               False: "**NOT PROTECTED** — at least one run came close to its clean baseline",
               None: "**no verdict** — no clean baseline (pass --clean), the clean model did not learn, or a run "
                     "stalled"}
    worst = report["worst"]
    lines = [
        *([intro.rstrip("\n"), "", "## What verify found"] if intro else ["# ueguard verify report"]), "",
        f"Verdict: {verdict[report['protected']]}.", "",
        f"Worst case: `{worst['defense']}` / `{worst['paradigm']}` reaches {_pct(worst['test_accuracy'])} % test "
        f"accuracy (clean baseline {_pct(worst['clean_accuracy'])} %, chance {_pct(report['chance'])} %).", "",
        f"Rule: {report['rule']}.", "",
        "| defense | paradigm | test acc % | peak % | clean % | protected | epoch reported | time s |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for run in report["runs"]:
        mark = {True: "yes", False: "**no**", None: "—"}[run["protected"]] + (" (stalled)" if run.get("stalled") else "")
        lines.append(f"| {run['defense']} | {run['paradigm']} | {_pct(run['test_accuracy'])} | "
                     f"{_pct(run['peak_test_accuracy'])} | {_pct(run['clean_accuracy'])} | {mark} | "
                     f"{run['selected_epoch']}/{run['epochs']} | {run['seconds']:.0f} |")
    if report.get("stalled"):
        lines += ["", "Stalled: " + ", ".join(f"`{r['defense']}` / `{r['paradigm']}`" for r in report["stalled"])
                  + f" {STALLED_MEANING}."]
    if recipe_lines(report):
        lines += ["", "Clean recipe (verify chooses it when the default does not learn):", ""]
        lines += [f"- {line.strip()}" for line in recipe_lines(report)]
    if report.get("skipped"):
        lines += ["", "Skipped:", ""] + [f"- `{s['defense']}` / `{s['paradigm']}`: {s['reason']}" for s in report["skipped"]]
    cuts = [(r, c) for r in report["runs"] for c in r.get("stage_cuts", [])]
    if any(r.get("acm_curve") for r in report["runs"]):
        lines += ["", "Staged training (ueguard's reconstruction of ST/ACM): "
                  + ("; ".join(f"{r['paradigm']}: cut ≤{c['stage']} at epoch {c['epoch']} (ACM {c['acm']:.3f} vs "
                               f"{c['reference']:.3f} at start)" for r, c in cuts) if cuts else "no stage was cut.")]
    cfg = report["config"]
    lines += ["", f"Setup: {report['data']['train_images']} protected training images, {report['data']['test_images']} "
              f"test images, {len(report['classes'])} classes; {cfg['arch']} at {cfg['size']} px, {cfg['epochs']} epochs, "
              f"seed {cfg['seed']}; device {report['device']}, ueguard {report['ueguard_version']}, "
              f"torch {report['torch_version']}.", ""]
    lines += _holdout_lines(report)
    lines += [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _holdout_lines(report: dict) -> list[str]:
    """The held-out test set, said in words and listed file by file (folded), when there is one."""
    from ueguard.display import holdout_line

    line = holdout_line(report)
    if line is None:
        return []
    files = report["data"]["holdout"]["files"]
    return [line[0].upper() + line[1:] + ".", "", f"<details><summary>the {len(files)} held-out files</summary>", "",
            *(f"- `{name}`" for name in files), "", "</details>", ""]


def write_report_dir(report: dict, root: Path, intro: str = "") -> list[Path]:
    """Write ``summary.md`` and the plots into ``root``; returns the files written. ``intro``: Markdown
    put before the verify summary (see :func:`summary_markdown`)."""
    root.mkdir(parents=True, exist_ok=True)
    plot_accuracy(report, root / "accuracy.png")
    plot_curves(report, root / "curves.png")
    plots = ["accuracy.png", "curves.png"]
    if plot_acm(report, root / "acm.png"):
        plots.append("acm.png")
    (root / "summary.md").write_text(summary_markdown(report, plots, intro))
    return [root / "summary.md", *(root / p for p in plots)]


def plot_picture_grid(originals: list, protected: list, titles: list[str], eps: float, path: Path) -> None:
    """What protection does to the pictures: one column per image, three rows — the original, the
    protected copy, and δ = protected − original made visible as (δ / ε) · 0.5 + 0.5 (mid-grey is no
    change, white +ε, black −ε). Images are uint8 arrays, H×W (grayscale) or H×W×3; ``eps`` is the
    budget as a fraction of 255, so a perturbation within budget never clips in the third row."""
    import numpy as np

    plt = _plt()
    cols = len(originals)
    fig, axes = plt.subplots(3, cols, figsize=(0.75 * cols + 1.4, 3.0), squeeze=False)
    row_names = ["original", "protected", f"δ amplified\nwhite +ε, black −ε\n(ε = {round(255 * eps)}/255)"]
    for j, (orig, prot) in enumerate(zip(originals, protected)):
        orig, prot = np.asarray(orig, dtype=np.float64), np.asarray(prot, dtype=np.float64)
        delta = np.clip((prot - orig) / (255 * eps) * 0.5 + 0.5, 0, 1)
        for i, image in enumerate((orig / 255, prot / 255, delta)):
            ax = axes[i][j]
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][j].set_title(titles[j], fontsize=8)
    for i, name in enumerate(row_names):
        axes[i][0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.3, w_pad=0.1, h_pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)
