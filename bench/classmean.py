"""How much of a protected folder's class signal the ``classmean`` (or ``classalign``) defense removes, and
what it costs the clean images — without training a victim.

Reads a protected folder and the clean folder it was made from (mirrored ``<class>/<file>`` trees). The
change a protection makes is δ_i = protected_i − clean_i; what can carry the label is its class-specific
part, δ_i minus the mean δ over every image (a pattern all classes share teaches nothing). For each
``sigma`` the defense runs on the protected images; reported per sigma:

* ``class_signal_left``: the mean square of the class-specific change left after the defense, as a
  fraction of the protection's own (1: untouched; 0: removed; above 1: the defense adds class-specific
  change of its own, e.g. ``sigma`` 0 taking away the natural class casts);
* ``clean_mae_255``: the mean absolute change the defense makes to the *clean* images (grey levels) — what
  it costs an adversary who cannot tell whether the data were protected;
* the estimated patterns' L∞ and RMS (grey levels).

A victim trained after the defense is the real test (``bench/reproduce.py --defenses classmean``); this is
the cheap evidence beside it. ``--quick``: at most 200 images per class.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from _timing import write_report  # noqa: E402
from ueguard.data.folder import scan_folder  # noqa: E402
from ueguard.data.loaders import load_working_set  # noqa: E402
from ueguard.defenses import create_defense  # noqa: E402


def load_pair(clean_root: Path, protected_root: Path, size: int, per_class: int | None):
    """The two folders' images, aligned by relative path (only files both have), and their labels."""
    clean_listing, protected_listing = scan_folder(clean_root), scan_folder(protected_root)
    if clean_listing.classes != protected_listing.classes:
        raise SystemExit(f"the folders' classes differ: {clean_listing.classes} vs {protected_listing.classes}")
    protected_by_path = {str(e.relpath.with_suffix("")): e for e in protected_listing.images}
    pairs, taken = [], {}
    for entry in clean_listing.images:
        match = protected_by_path.get(str(entry.relpath.with_suffix("")))
        if match is None or (per_class and taken.get(entry.label, 0) >= per_class):
            continue
        taken[entry.label] = taken.get(entry.label, 0) + 1
        pairs.append((entry, match))
    if not pairs:
        raise SystemExit(f"no file of {clean_root} has a counterpart in {protected_root}")
    clean, _ = load_working_set(clean_listing, [c for c, _ in pairs], size)
    protected, _ = load_working_set(protected_listing, [p for _, p in pairs], size)
    return clean.images, protected.images, clean.labels


def class_signal(change: torch.Tensor) -> torch.Tensor:
    """The part of a per-image change that differs between images: the change less its mean over all."""
    return change - change.mean(0)


def measure(clean: torch.Tensor, protected: torch.Tensor, labels: torch.Tensor, sigma: float,
            name: str = "classmean") -> dict:
    defense = create_defense(name, sigma=sigma)
    cleaned = defense.preprocess(protected, labels)
    found = defense.summary()
    base = clean.float() / 255
    before = class_signal(protected.float() / 255 - base).pow(2).mean()
    after = class_signal(cleaned.float() / 255 - base).pow(2).mean()
    collateral = (create_defense(name, sigma=sigma).preprocess(clean, labels).float() - clean.float()).abs().mean()
    return {"sigma": sigma, "class_signal_left": round(float(after / before), 4),
            "clean_mae_255": round(float(collateral), 3), **found}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protected", type=Path, required=True, help="a protected folder (<class>/<file>)")
    parser.add_argument("--clean", type=Path, required=True, help="the folder it was made from")
    parser.add_argument("--defense", choices=("classmean", "classalign"), default="classmean",
                        help="the class-pattern defense measured")
    parser.add_argument("--sigmas", default="0,0.5,1,2", help="the defense's sigma values (px), comma list")
    parser.add_argument("--size", type=int, default=32, help="working size the images are read at")
    parser.add_argument("--quick", action="store_true", help="at most 200 images per class")
    parser.add_argument("--json", type=Path, default=None, help="results file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    clean, protected, labels = load_pair(args.clean, args.protected, args.size, 200 if args.quick else None)
    delta = (protected.float() - clean.float())
    rows = []
    for sigma in (float(s) for s in args.sigmas.split(",")):
        rows.append(measure(clean, protected, labels, sigma, args.defense))
        print(rows[-1], flush=True)
    results = {"defense": args.defense, "protected": str(args.protected), "clean": str(args.clean),
               "images": len(labels),
               "classes": int(labels.max()) + 1, "delta_linf_255": float(delta.abs().max()),
               "delta_rms_255": round(float(delta.pow(2).mean().sqrt()), 3), "rows": rows}
    write_report(args.json, results, __file__, started)
    return results


if __name__ == "__main__":
    main()
