"""A pretrained prior for the benchmarks, trained here with ueguard's own loop on classes the protected
task does not contain (so neither the protector's surrogate nor the victim's starting point has seen the
protected classes). Shared by bench/reproduce.py (CIFAR-10) and bench/efficacy.py (digits)."""

from __future__ import annotations

import json
import time
from pathlib import Path


def train_prior(train_folder: Path, test_folder: Path, arch: str, epochs: int, seed: int, path: Path,
                size: int = 32, recipe: str | None = None, precision: str = "auto") -> tuple[float, str]:
    """Train ``arch`` on ``train_folder``'s classes and save it to ``path`` (cached with a ``.json`` record
    beside it). Returns its test accuracy on ``test_folder`` and a one-line note saying what it is.
    ``recipe``: a verify recipe by name (its init, optimiser groups, loss, augmentation and test views, as
    verify trains with it); None: ueguard's plain :class:`FitConfig` for ``epochs``."""
    from ueguard.data.folder import scan_folder
    from ueguard.data.working_set import load_folder_working_set
    from ueguard.defenses import create_defense, create_paradigm
    from ueguard.engine.fit import FitConfig, fit
    from ueguard.engine.recipes import create_recipe
    from ueguard.engine.runtime import Runtime, seed_everything
    from ueguard.models import create_model, save_checkpoint

    record = path.with_suffix(".json")
    if path.is_file() and record.is_file():
        info = json.loads(record.read_text())
        return info["test_accuracy"], info["note"]
    listing = scan_folder(train_folder)
    test_listing = scan_folder(test_folder, classes=listing.classes)
    train, _ = load_folder_working_set(listing, listing.images, size)
    test, _ = load_folder_working_set(test_listing, test_listing.images, size)
    runtime = Runtime.create("auto", precision)
    generator = seed_everything(seed)
    model = create_model(arch, len(listing.classes))
    started = time.perf_counter()
    made = create_recipe(recipe) if recipe else None
    cfg = made.fit_config(epochs) if made else FitConfig(epochs=epochs)
    history = fit(model, train, test, cfg, defense=create_defense("none"),
                  paradigm=create_paradigm("scratch"), runtime=runtime, generator=generator, recipe=made)
    accuracy = history[-1]["test_accuracy"]
    note = (f"{arch} trained {epochs} epochs{f' (recipe {recipe})' if recipe else ''} on {len(train)} images of "
            f"{', '.join(listing.classes)}; {100 * accuracy:.1f} % on {len(test)} test images of those classes")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model.cpu(), path, classes=list(listing.classes), test_accuracy=accuracy)
    record.write_text(json.dumps({"test_accuracy": accuracy, "note": note, "history": history,
                                  "seconds": round(time.perf_counter() - started, 1)}, indent=2) + "\n")
    return accuracy, note
