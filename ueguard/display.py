"""How a verify report is said in words: the command line's table and verdict lines, and the wording the
Markdown summary (:mod:`ueguard.sdk.report`) shares with them.

Display code lives here, below both the CLI and the SDK, and imports neither: ``ueguard.cli``,
``ueguard.demo`` and ``ueguard.sdk.report`` import it, never the other way round.
"""

from __future__ import annotations

#: What a stalled run means, as the CLI's table and the report summary say it.
STALLED_MEANING = ("ended at or below chance on its own training batches with the constant predictor's loss: the "
                   "recipe failed on this model, so a low accuracy there is no evidence of protection and never "
                   "counts as protected")


def format_report(report: dict) -> str:
    """A small table: one row per run, accuracies in %, then the verdict and its rule."""
    pct = lambda v: "   —" if v is None else f"{100 * v:5.1f}"  # noqa: E731
    rows = [f"{'defense':<10} {'paradigm':<9} {'arch':<20} {'protected-trained':>17} {'peak':>6} {'clean':>6} {'chance':>6}"]
    for run in report["runs"]:
        rows.append(f"{run['defense']:<10} {run['paradigm']:<9} {run['arch']:<20} {pct(run['test_accuracy']):>17} "
                    f"{pct(run['peak_test_accuracy']):>6} {pct(run['clean_accuracy']):>6} {pct(run['chance']):>6}")
    for skip in report.get("skipped", []):
        rows.append(f"{skip['defense']:<10} {skip['paradigm']:<9} skipped: {skip['reason']}")
    verdict = report["protected"]
    text = {True: "PROTECTED: training on the protected images gives a model far below the clean baseline",
            False: "NOT PROTECTED: a model trained on the protected images comes close to the clean baseline",
            None: "no verdict: pass --clean ORIGINALS for a baseline (or train longer if the clean model did not learn), "
                  "or a run stalled (below)"}
    worst = report["worst"]
    lines = ["", f"{text[verdict]}"]
    for run in report.get("stalled", []):
        lines.append(f"stalled: {run['defense']}/{run['paradigm']} {STALLED_MEANING} (for adversarial training: "
                     "a smaller at.eps, a longer run, or --paradigm scratch)")
    if len(report["runs"]) > 1:
        lines.append(f"worst case: {worst['defense']}/{worst['paradigm']} at {pct(worst['test_accuracy']).strip()} %")
    holdout = holdout_line(report)
    return "\n".join(rows + lines + ([holdout] if holdout else []) + [f"rule: {report['rule']}"])


def holdout_line(report: dict) -> str | None:
    """Where the test images came from when ``verify`` held them out of ``--clean`` (``None`` otherwise),
    with a warning when some held-out originals had no protected copy of the same name to leave out."""
    held = report.get("data", {}).get("holdout")
    if not held:
        return None
    n = len(held["files"])
    line = (f"test set: {n} of the {held['originals']} originals held out of --clean ({100 * held['fraction']:g} %, "
            f"stratified, seed {held['seed']}), left out of both training sets; the report lists them (data.holdout)")
    if held["protected_left_out"] < n:
        line += (f". Warning: only {held['protected_left_out']} of them had a protected copy of the same name; the "
                 "others' copies (if renamed) stayed in the protected training set")
    return line
