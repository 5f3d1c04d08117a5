"""``ueguard demo``: the whole story on real data in a few minutes on a CPU.

scikit-learn ships 1,797 real 8×8 handwritten digits (UCI optical digits). The demo writes them as
image folders (``train/<digit>/*.png`` 75 %, ``test/<digit>/*.png`` 25 %, stratified; upscaled to
32×32 grayscale PNG so the standard CIFAR-style pipeline applies), protects the training folder with
EMN, and verifies: one model trained on the protected images, one on the originals, both tested on the
clean test images.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from ueguard.engine.progress import Progress

MARKER = ".ueguard-demo"
DEMO_SIZE = 32
#: The demo's L∞ budget. These digits are high-contrast strokes (ink 0 or 255 over most pixels), the
#: regime where robustness work uses ε = 0.3 on MNIST rather than CIFAR's 8/255: measured on this split
#: (bench/digits_probe.py, docs/results.md), sample-wise EMN leaves the victim at 94–98 % at 8/255, 82 % at
#: 32/255 and 28 % at 64/255 (clean 97.6 %).
DEMO_EPS = "64/255"


def build_digits_folders(root: Path, seed: int = 0, size: int = DEMO_SIZE,
                         classes: Sequence[int] | None = None) -> tuple[Path, Path]:
    """Write scikit-learn's digits (all ten, or only ``classes``) as ``root/train`` and ``root/test``
    class folders of grayscale PNGs, a stratified 75/25 split."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 17 ink levels 0..16 → 0..255
    index = np.arange(len(images))
    if classes is not None:
        index = index[np.isin(digits.target, list(classes))]
    train_idx, test_idx = train_test_split(index, test_size=0.25, stratify=digits.target[index], random_state=seed)
    for split, ids in (("train", train_idx), ("test", test_idx)):
        for i in ids:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").resize((size, size), Image.BICUBIC).save(folder / f"digit_{i:04d}.png")
    return root / "train", root / "test"


def _prepare_workdir(workdir: Path) -> None:
    """The demo owns its working folder: rebuilt when it holds the demo marker, refused when it holds
    anything else (never delete what a user put there)."""
    from ueguard.errors import UsageError

    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise UsageError(f"{workdir} exists and was not made by `ueguard demo`; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by `ueguard demo`; safe to delete\n")


def demo_pictures(train: Path, protected: Path, per_class: int = 2) -> tuple[list, list, list[str]]:
    """The first ``per_class`` training images of every class, as (originals, protected copies, titles):
    uint8 arrays read back from the two folders, matched by relative path (protect keeps the names)."""
    from PIL import Image

    originals, copies, titles = [], [], []
    for folder in sorted((d for d in train.iterdir() if d.is_dir()), key=lambda d: d.name):
        for path in sorted(folder.glob("*.png"))[:per_class]:
            originals.append(np.asarray(Image.open(path)))
            copies.append(np.asarray(Image.open(protected / folder.name / path.name)))
            titles.append(f"digit {folder.name}")
    return originals, copies, titles


def demo_intro(ran: dict, pictures: str) -> str:
    """The demo's own part of summary.md: what it ran (``ran``: counts, budget, timings) and the picture."""
    return "\n".join([
        "# ueguard demo report", "",
        f"The demo wrote scikit-learn's handwritten digits as {ran['train']} training and {ran['test']} test "
        f"images ({DEMO_SIZE}×{DEMO_SIZE} grayscale PNG), protected the training images with sample-wise EMN "
        f"(ε = {DEMO_EPS}, budget `quick`, {ran['rounds']} rounds, {ran['protect_seconds']:.0f} s), then trained "
        f"one model on the protected images and one on the originals ({ran['verify_seconds']:.0f} s) and tested "
        "both on the clean test images.", "",
        f"![original, protected and amplified perturbation of a few training digits]({pictures})", "",
        "Each column is one training image: the original, its protected copy, and the perturbation δ between "
        "them amplified to be visible, (δ / ε) · 0.5 + 0.5 (mid-grey: no change; white: +ε; black: −ε).",
    ])


def write_demo_report(report: dict, train: Path, protected: Path, root: Path, ran: dict) -> Path:
    """The demo's report folder: ``digits.png`` (the picture grid), verify's ``accuracy.png`` and
    ``curves.png`` (protected vs clean, test accuracy per epoch), and ``summary.md`` linking them."""
    from ueguard.sdk.report import plot_picture_grid, write_report_dir
    from ueguard.units import parse_eps

    root.mkdir(parents=True, exist_ok=True)
    plot_picture_grid(*demo_pictures(train, protected), parse_eps(DEMO_EPS), root / "digits.png")
    write_report_dir(report, root, intro=demo_intro(ran, "digits.png"))
    return root / "summary.md"


def run_demo(workdir: str | Path = "ueguard-demo", *, seed: int = 0, progress: "Progress | bool" = False,
             echo: Callable[[str], None] = print) -> dict:
    """Build the folders, protect, verify; print the verify report, write the report folder
    (``<workdir>/report``), and return the verify report. ``progress``: the three stages, and inside them
    protect's and verify's steps with their ETA, in the one progress format (:mod:`ueguard.engine.progress`)."""
    from ueguard.display import format_report
    from ueguard.engine.progress import Progress
    from ueguard.sdk import protect, verify

    reporter = progress if isinstance(progress, Progress) else Progress(progress, name="demo")
    workdir = Path(workdir)
    _prepare_workdir(workdir)
    with reporter.step(1, 3, "writing scikit-learn's digits as image folders"):
        train, test = build_digits_folders(workdir, seed=seed)
    echo(f"wrote scikit-learn's digits to {train} and {test}")
    started = time.perf_counter()
    with reporter.step(2, 3, "protecting the training digits with EMN"):
        result = protect(train, workdir / "train_protected", "emn", eps=DEMO_EPS, budget="quick", seed=seed,
                         progress=reporter)
    ran = {"rounds": result.info.get("rounds"), "protect_seconds": time.perf_counter() - started}
    echo(f"protected {result.ok} images with EMN (eps {DEMO_EPS}, {ran['rounds']} rounds) into {result.out}")
    started = time.perf_counter()
    with reporter.step(3, 3, "training on the protected and on the clean digits (the slow part)"):
        report = verify(result.out, test, clean=train, budget="quick", seed=seed, progress=reporter,
                        json_path=workdir / "verify.json")
    ran |= {"verify_seconds": time.perf_counter() - started, "train": report["data"]["train_images"],
            "test": report["data"]["test_images"]}
    summary = write_demo_report(report, train, result.out, workdir / "report", ran)
    echo(format_report(report))
    echo(f"report: {summary} (pictures: {summary.parent / 'digits.png'}, learning curves: "
         f"{summary.parent / 'curves.png'}); JSON: {workdir / 'verify.json'}; manifest: {result.manifest_path}")
    return report
