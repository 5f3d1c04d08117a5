"""Reproduce the papers on real CIFAR-10: protections × paradigms × defenses, beside the published numbers.

Needs CIFAR-10's python batches and the akamaster CIFAR ResNet weights (``/work/shared/data``, or
``--data DIR`` / ``UEGUARD_SHARED_DATA``); a benchmark, not a test.

The benchmark runs ueguard the way a user does: CIFAR-10 is written once as PNG image folders
(``<split>/<class>/<index>.png``) into the cache, every protection is ``ueguard.sdk.protect(folder, out)``
and every victim is ``ueguard.sdk.verify(protected_folder, test_folder, ...)``.

Protocol (the scale presets below fix the sizes):

* task: CIFAR-10 classes dog, frog, horse, ship, truck (5 classes), a class-balanced subset of the
  training set; test on the same classes of the test set;
* rows: ``clean`` (the unprotected task folder) and each protection, all at ueguard's defaults for the
  scale's budget (ε 8/255 for L∞ methods; LSP and AR at their own L2 budgets; OPS one pixel);
* paradigms: ``scratch`` (CIFAR-style ResNet-18, random init) and, per prior, ``finetune`` / ``frozen`` /
  ``linear`` from that prior's weights through ``verify(weights=...)``;
* priors: ``disjoint`` — a ResNet pretrained here on the *other* five classes (airplane, automobile,
  bird, cat, deer), which stands in for ImageNet → CIFAR (cached, its accuracy reported); ``akamaster`` —
  the published CIFAR-10 ResNet-20 trained on all ten classes (a strong same-class prior); ``user`` —
  ``--weights FILE`` (``--weights-arch``) for any other prior. Methods that need a pretrained surrogate
  (ssc, bait) are protected once per prior with that prior as surrogate (the protector uses the same
  public model the victim starts from); their scratch column uses the ``disjoint`` one;
* defenses: ``none`` on every row; the other selected defenses on the ``--defended`` rows.

Scales: ``quick`` (minutes), ``cpu`` (2,500 images, about an hour), ``full`` (the authors' ResNet-18
protocol on the five task classes; for a GPU), and the papers' protocol on a 2-core CPU in two tasks —
``cpu-full``: from scratch on all of CIFAR-10 (10 classes, 50,000 / 10,000 images; the fast victim
``fastvgg_cifar`` under verify's ``fast`` recipe, bf16), and ``cpu-full-prior``: finetune / frozen /
linear on the 5 + 5 split with all 25,000 task images, the disjoint prior a ``fastvgg_cifar`` trained
with the fast recipe on all 25,000 images of the other five classes. ``cpu-cifar100-prior`` is the held-out
check: the same prior paradigms on CIFAR-100's 20-class cut (``cifar100/`` under ``--data``: 10,000 training
/ 2,000 test images, one class per superclass) from the same disjoint CIFAR-10 prior.

Everything is cached per cell under ``--cache`` (converted folders, prior checkpoints, protected folders,
verify reports), keyed by a hash of the scale's settings, so an interrupted run continues where it
stopped and a re-run only renders. Work is ordered to inform first (clean, emn, ssc, bait under none and
staged, every seed; then the rest), and the results file is rewritten as each row lands. Output:
``--json`` (default ``bench/results/reproduce-<scale>.json``), a Markdown table beside it (``.md``) and PNG
plots (``-accuracy.png``, ``-curves.png``).

``--merge A.json,B.json,...`` trains nothing: it puts several results files of one scale into one table
(``--json``, default ``bench/results/reproduce-merged.json``), each cell from the last listed file that
measured it and marked with that file (¹ ² …), rows protected under a method's former defaults left out
(named in the output), and beneath it the range of every distinct victim run of each cell in the files —
how far a number moves between seeds, re-trained priors and machines.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
for _path in (ROOT, ROOT / "bench"):  # ueguard itself, and the shared bench helpers (_priors, _reproduce)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# The pieces, re-exported for bench/staged.py, bench/defenses.py and the tests.
from _reproduce import cache, cells, cli, data, grid, merge, render, scales  # noqa: E402,F401
from _reproduce.cache import _digest, _json_dump, exclusive  # noqa: E402,F401
from _reproduce.cells import (  # noqa: E402,F401
    Variant, cached_protection, cached_runs, cell_path, defense_constants, parse_variant, protected_folder,
    verify_cell)
from _reproduce.data import (  # noqa: E402,F401
    Folders, Prior, akamaster_prior, balanced_indices, convert, pretrain_disjoint_prior, read_cifar, read_cifar_batch,
    write_image_folder)
from _reproduce.grid import Grid, run_grid  # noqa: E402
from _reproduce.merge import merge_main, merge_records, render_spread, row_revision  # noqa: E402,F401
from _reproduce.render import (  # noqa: E402,F401
    _environment, cells_from_reports, column_key, header, render_table, results_record, table_columns)
from _reproduce.scales import (  # noqa: E402,F401
    AKAMASTER, CIFAR10_CLASSES, METHODS, PRIOR_CLASSES, PUBLISHED, ROWS, SCALES, TASK_CLASSES, Scale)


class Clock:
    """The run's wall clock and its log lines (seconds since the start)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def log(self, message: str) -> None:
        print(f"[{self.seconds():7.0f} s] {message}", flush=True)


def write_results(sel: cli.Selection, measured: Grid, environment: dict, clock: Clock, final: bool,
                  kept: dict | None = None) -> None:
    """The results file (JSON and Markdown) of what has landed, with the ``kept`` cells of the file it
    rewrites that this run has not reached yet; at the end (``final``) the plots too."""
    measured = measured.with_cells(kept or {})
    table = render_table(measured.results, columns := table_columns(measured.results, sel.paradigms, sel.priors,
                                                                     sel.defenses))
    environment["load_average_end"] = os.getloadavg()
    record = results_record(sel, measured, table, environment, clock.seconds())
    _json_dump(sel.json_path, record)
    priors_text = "".join(f"- prior `{k}`: {v['note']}\n" for k, v in record["priors"].items())
    text = header(sel, record, environment, clock.seconds()) + table + "\n" + priors_text
    sel.json_path.with_suffix(".md").write_text(text)
    if final:
        plots = render.plot(measured.results, columns, sel.json_path.with_suffix("")) if columns else []  # --protect-only
        print(text)
        clock.log(f"wrote {sel.json_path}, {sel.json_path.with_suffix('.md')}, {', '.join(str(p) for p in plots)}")


def check_results_file(sel: cli.Selection) -> dict:
    """Refuse, before anything runs, a ``--json`` this run would rewrite without cells it holds (another scale's,
    or a wider selection's): a narrower run must not erase a table that took hours. ``--replace`` overrides.
    Returns the file's cells (``render.recorded_cells``), all of them within this run's selection."""
    path = sel.json_path
    if sel.replace or not path.exists():
        return {}
    advice = f"write this run to another --json and join the files with --merge, or pass --replace to overwrite {path}"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"--json {path}: exists and is not a results file ({error}); {advice}") from None
    if record.get("bench") != "reproduce" or record.get("scale_tag") != sel.scale.tag():
        raise SystemExit(f"--json {path}: holds {record.get('bench')} results of scale {record.get('scale_tag')}, "
                         f"this run is {sel.scale.tag()}; {advice}")
    recorded = render.recorded_cells(record)
    lost = sorted(recorded.keys() - grid.planned_cells(sel))
    if lost:
        named = ", ".join(f"{row} {column} (seed {s}, victim seed {v})" for row, (s, v), column in lost[:4])
        raise SystemExit(f"--json {path}: holds {len(lost)} cell(s) this run would not write again ({named}"
                         f"{', …' if len(lost) > 4 else ''}); {advice}")
    return recorded


def main(argv: list[str] | None = None) -> None:
    """parse → (merge, or) select → convert the folders → run the grid, writing each row as it lands → render."""
    args = cli.parser().parse_args(argv)
    if args.merge is not None:
        return merge_main([Path(f) for f in cli.split(args.merge, (), None, "merge")],
                          tuple(cli.split(args.methods, ROWS, ROWS, "methods")),
                          args.json or RESULTS / "reproduce-merged.json", argv)
    sel = cli.select(args, RESULTS, argv)
    kept = check_results_file(sel)
    cells.CACHED_ONLY = sel.cached_only
    clock, environment = Clock(), _environment()
    clock.log(f"scale {sel.scale.tag()}; rows {', '.join(sel.rows)}; paradigms {', '.join(sel.paradigms)}; defenses "
              f"{', '.join(sel.defenses)} (beyond none on {', '.join(sel.defended)}); seeds {sel.seeds}; victim seeds "
              f"{sel.victim_seeds or 'as the seeds'}; cache {sel.cache}")
    folders = convert(sel.data, sel.cache, sel.scale)
    clock.log(f"folders: {folders.task_train} …")
    measured = run_grid(sel, folders, clock.log,
                        on_row=lambda partial: write_results(sel, partial, environment, clock, False, kept))
    write_results(sel, measured, environment, clock, final=True, kept=kept)


if __name__ == "__main__":
    main()
