"""How much of a protection passes a pretrained prior's frozen shallow layers ("semantic filtering").

The reproduce benchmark finds that no protection here holds under the ``frozen`` paradigm (stem + layer1
of the prior frozen, the rest fine-tuned): SSC and EMN land 7–9 points below clean, where the paper
claims SSC holds. This script measures why, on the images bench/reproduce.py wrote: it needs that
benchmark's cache (``--cache``, default ``~/.cache/ueguard-reproduce``; run ``bench/reproduce.py --cpu``
first, which needs ``../shared/data``). A benchmark, not a test.

Two measurements, at each frozen depth (``--stages``; default layer1, the frozen paradigm's cut, and
layer2):

* **reach** — an upper bound on a class-wise shortcut there: for one fixed channel direction per class
  (random orthonormal combinations of the top, all, or bottom principal directions of the clean
  activations), signed-gradient ascent on a class-wise δ (L∞ ``--eps``) pushes every image's *pooled*
  activation along its class's direction. Reported: the mean shift reached, in units of the pooled
  activations' natural standard deviation along that direction (``reach_sigma``). A linear reader after
  global pooling separates classes well only when this is several σ.
* **per protected folder** (every ``protected/<tag>/<row>-s<seed>`` whose images mirror ``--train``) —
  ``shift_rel``: ‖F(x+δ) − F(x)‖ over the clean activations' spread ‖F(x) − mean‖; ``class_share``:
  the share of that shift's energy its class means hold (1 for a shift that is the same for every image
  of a class); ``probe_self``: a linear probe on pooled F(x+δ), trained on half the protected images and
  read on the other half, against ``probe_clean`` on clean images — how readily a linear reader takes
  the class from what passes the frozen layers.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=. python bench/filtering.py [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import torch

DEFAULT_CACHE = Path.home() / ".cache" / "ueguard-reproduce"
DIRECTIONS = ("top", "all", "bottom")


def load_folder(root: Path, classes: tuple[str, ...] | None = None):
    """Images (N×3×32×32 in [0, 1]), labels and relative paths of an image folder, through ueguard's loader."""
    from ueguard.data.folder import scan_folder
    from ueguard.data.loaders import load_working_set

    listing = scan_folder(root, classes=classes)
    data, kept = load_working_set(listing, listing.images, 32)
    return data.images.float() / 255, data.labels, [str(e.relpath) for e in kept], listing.classes


def stage_features(model, x: torch.Tensor, stages: list[str], batch: int = 500) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        parts = [model.forward_stages(x[i:i + batch], stages) for i in range(0, len(x), batch)]
    return {s: torch.cat([p[s] for p in parts]) for s in stages}


def class_share(shift: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Share of the shift's energy held by its per-class means."""
    flat = shift.flatten(1)
    means = torch.stack([flat[labels == k].mean(0) for k in range(num_classes)])
    return (means[labels].square().sum() / flat.square().sum().clamp(min=1e-30)).item()


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int) -> float:
    """Accuracy of an L2-regularised multinomial logistic regression (L-BFGS, from zero weights) on
    standardised features — the fit of SSC's deceiver head (:func:`ueguard.engine.loops.fit_linear_head`)."""
    from ueguard.engine.loops import fit_linear_head

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    head = torch.nn.Linear(a.shape[1], num_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    fit_linear_head(head, a, train_y, max_iter=300)
    with torch.no_grad():
        return (head(b).argmax(1) == test_y).float().mean().item()


def reach(model, x, y, stage: str, num_classes: int, eps: float, steps: int, seed: int) -> dict[str, float]:
    """Mean pooled shift along each class's direction that a class-wise δ reaches, in pooled σ."""
    from ueguard.methods.ssc import channel_pca, class_anchors

    clean = stage_features(model, x, [stage])[stage]
    full, _ = channel_pca(clean, 1.0)
    top = int((channel_pca(clean, 0.9)[0]).shape[1])
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for kind in DIRECTIONS:
        basis = {"top": full[:, :max(top, num_classes)], "all": full, "bottom": full[:, -max(num_classes, full.shape[1] - top):]}[kind]
        directions, _ = class_anchors(clean, basis, num_classes, generator)  # SSC's anchors, σ of the pooled output
        sigma = (clean.mean((2, 3)) @ directions).std(0)
        delta = torch.zeros(num_classes, *x.shape[1:])
        along = torch.zeros(len(y))
        for _ in range(steps):
            rows = delta.clone().requires_grad_(True)
            shifted = model.forward_stages((x + rows[y]).clamp(0, 1), [stage])[stage]
            along = ((shifted - clean).mean((2, 3)) @ directions)[torch.arange(len(y)), y] / sigma[y]
            (grad,) = torch.autograd.grad(-along.sum(), rows)
            delta = (delta - 0.25 * eps * grad.sign()).clamp(-eps, eps)
        out[kind] = round(along.mean().item(), 3)
    return out


def protected_folders(cache: Path, train: Path) -> list[tuple[str, int, Path]]:
    """``(row, seed, folder)`` of every cached protected folder made from ``train``."""
    from ueguard.data.manifest import MANIFEST_NAME, first_run

    found = []
    for manifest in sorted(cache.glob(f"protected/*/*/{MANIFEST_NAME}")):
        head = first_run(manifest) or {}
        match = re.fullmatch(r"(.+)-s(\d+)", manifest.parent.name)
        if match and Path(head.get("source", "")) == train:
            found.append((match.group(1), int(match.group(2)), manifest.parent))
    return found


def prior_for(cache: Path, seed: int) -> Path | None:
    hits = sorted(cache.glob(f"priors/disjoint-*-s{seed}.pth"))
    return hits[-1] if hits else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and steps for the reach (minutes)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="bench/reproduce.py's cache")
    parser.add_argument("--train", type=Path, default=None,
                        help="the clean task folder (default: the cache's data/task-train-*-s0)")
    parser.add_argument("--stages", default="layer1,layer2", help="frozen depths to measure (comma list)")
    parser.add_argument("--rows", default=None,
                        help="only these protected rows (comma list, e.g. emn,ssc: ssc matches ssc@disjoint; default all)")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--arch", default="resnet20_cifar", help="the priors' architecture")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from ueguard.models import create_model

    started = time.perf_counter()
    torch.manual_seed(0)
    train = args.train or next(iter(sorted(args.cache.glob("data/task-train-*-s0"))), None)
    if train is None or not train.is_dir():
        raise SystemExit(f"{args.cache}: no task folder; run bench/reproduce.py --cpu first (or give --train)")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    x, y, paths, classes = load_folder(train)
    k = len(classes)
    n_reach, steps = (128, 10) if args.quick else (300, 20)
    pick = torch.randperm(len(x))[:n_reach]
    results: dict = {"train": str(train), "stages": stages, "eps_255": round(args.eps * 255, 2),
                     "reach_images": n_reach, "reach_steps": steps, "reach_sigma": {}, "folders": [],
                     "environment": {"torch": torch.__version__, "python": platform.python_version(),
                                     "machine": platform.processor() or platform.machine(),
                                     "threads": torch.get_num_threads()}}
    models = {}

    def prior(seed: int):
        if seed not in models:
            path = prior_for(args.cache, seed)
            models[seed] = None if path is None else create_model(args.arch, k, weights=path).eval().requires_grad_(False)
        return models[seed]

    if prior(0) is None:
        raise SystemExit(f"{args.cache}: no disjoint prior of seed 0; run bench/reproduce.py --cpu first")
    for stage in stages:
        results["reach_sigma"][stage] = reach(prior(0), x[pick], y[pick], stage, k, args.eps, steps, 0)
        print(f"reach {stage}: {results['reach_sigma'][stage]} (pooled σ)", flush=True)
    wanted = None if args.rows is None else {r.strip() for r in args.rows.split(",")}
    half = torch.arange(len(x)) % 2 == 0
    for row, seed, folder in [("clean", 0, train)] + protected_folders(args.cache, train):
        if wanted is not None and row.split("@")[0] not in wanted | {"clean"}:  # ssc@disjoint is row ssc
            continue
        model = prior(seed)
        if model is None:
            print(f"{folder.name}: no prior of seed {seed} in the cache; skipped", flush=True)
            continue
        px, py, ppaths, _ = (x, y, paths, classes) if row == "clean" else load_folder(folder, classes)
        if ppaths != paths:
            print(f"{folder}: its images do not mirror {train}; skipped", flush=True)
            continue
        clean_f, prot_f = stage_features(model, x, stages), stage_features(model, px, stages)
        record = {"row": row, "seed": seed, "folder": str(folder), "stages": {}}
        for stage in stages:
            shift = prot_f[stage] - clean_f[stage]
            spread = (clean_f[stage] - clean_f[stage].mean(0)).flatten(1).norm(dim=1).mean()
            pooled = prot_f[stage].mean((2, 3))
            entry = {"probe_self": round(linear_probe(pooled[half], y[half], pooled[~half], y[~half], k), 3)}
            if row != "clean":
                entry.update(shift_rel=round((shift.flatten(1).norm(dim=1).mean() / spread).item(), 3),
                             class_share=round(class_share(shift, y, k), 3))
            record["stages"][stage] = entry
        results["folders"].append(record)
        print(f"{row} (seed {seed}): {json.dumps(record['stages'])}", flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    lines = ["| row | seed | " + " | ".join(f"{s} shift_rel | {s} class_share | {s} probe_self" for s in stages) + " |",
             "|---|---:|" + "---:|" * (3 * len(stages))]
    for record in results["folders"]:
        cells = []
        for s in stages:
            e = record["stages"][s]
            cells += [f"{e.get('shift_rel', 0):.3f}", f"{e['class_share']:.3f}" if "class_share" in e else "—",
                      f"{100 * e['probe_self']:.1f}"]
        lines.append(f"| {record['row']} | {record['seed']} | " + " | ".join(cells) + " |")
    results["table"] = "\n".join(lines)
    print(results["table"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
