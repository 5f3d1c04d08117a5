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
            None: "no verdict: no clean baseline (pass --clean ORIGINALS), the clean model did not learn (what to try: "
                  "below), or a run stalled (below)"}
    worst = report["worst"]
    lines = ["", f"{text[verdict]}", *recipe_lines(report)]
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


def recipe_lines(report: dict) -> list[str]:
    """One line per paradigm whose clean recipe was not simply the default that learned: what the recipe
    search (:mod:`ueguard.sdk.recipe_search`) chose or why there was none, then what to try if the clean model
    still did not learn. Empty when every default learned."""
    lines = []
    for paradigm, info in report.get("recipe_search", {}).items():
        if info["status"] == "default":
            continue
        d = info["default"]
        head = (f"recipe ({paradigm}): the default (lr {d['lr']:g}, {d['epochs']} epochs) reached "
                f"{100 * d['test_accuracy']:.1f} % trained on the clean images, too little to count as learned")
        tried = info.get("tried", [])
        best = max((t["val_accuracy"] for t in tried), default=None)
        split = info.get("split")
        where = (f"scored on {split['val_images']} of the clean training images held out for it (never the test set)"
                 if split else "")
        tail = {"searched": lambda: (f"; chose lr {info['chosen']['lr']:g}, {info['chosen']['epochs']} epochs, the "
                                     f"best of {len(tried)} tried ({100 * best:.1f} %), {where}; the clean and "
                                     "protected runs both trained with it"),
                "none learned": lambda: f"; none of the {len(tried)} recipes tried learned (best {100 * best:.1f} %), "
                                        f"{where}",
                "too few images": lambda: "; too few clean training images per class to hold some out for choosing "
                                          "another recipe",
                "off": lambda: "; no other recipe tried (--recipe-search off)",
                "given": lambda: "; no other recipe tried (--lr/--epochs given)"}[info["status"]]()
        lines.append(head + tail)
        if info.get("advice"):
            lines.append(f"  {info['advice']}")
    return lines
