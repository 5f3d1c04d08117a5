"""``--loader``: the memory, torch and FFCV paths give the same working set, the FFCV cache is keyed by
the folder listing and reused, and ``verify`` trains end to end through every loader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import resume_state
from trees import write_class_tree, write_mixed_tree
from ueguard.cli import main
from ueguard.data import loaders
from ueguard.data.folder import scan_folder
from ueguard.data.loaders import StreamedSet, cache_key, load_working_set, resolve_loader
from ueguard.errors import UsageError
from ueguard.sdk import verify

needs_ffcv = pytest.mark.skipif(not loaders.ffcv_available(), reason="ffcv extra not installed (.ci/install)")
TINY = dict(budget="quick", epochs=2, device="cpu", size=16, batch_size=16)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("loaders") / "mixed"
    write_mixed_tree(root)  # every format and mode, one corrupt file
    return scan_folder(root)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("loader-verify")
    write_class_tree(base / "train", n_per_class=12, classes=3, size=20, seed=0)
    write_class_tree(base / "test", n_per_class=4, classes=3, size=20, seed=1)
    return base


def _load(listing, loader, cache_dir=None):
    errors = []
    working, kept = load_working_set(listing, listing.images, 16, loader, cache_dir=cache_dir, workers=1,
                                     on_error=lambda entry, error: errors.append((str(entry.relpath), error.reason)))
    return working, kept, errors


@pytest.mark.parametrize("loader", ["torch", pytest.param("ffcv", marks=needs_ffcv)])
def test_streaming_loaders_yield_the_memory_working_set(mixed, loader, tmp_path):
    """Same decoder and resize on every path, and FFCV stores raw pixels: equal bit for bit."""
    expected, kept, errors = _load(mixed, "memory")
    got, got_kept, got_errors = _load(mixed, loader, tmp_path)
    assert errors and got_errors == errors  # the corrupt file, with the same reason
    assert got_kept == kept and got.ids == expected.ids and got.classes == expected.classes
    assert torch.equal(got.images, expected.images)
    assert torch.equal(got.labels, expected.labels) and torch.equal(got.grayscale, expected.grayscale)
    assert expected.grayscale.any()


def test_cache_key_follows_the_listing_and_options(tmp_path):
    root = tmp_path / "data"
    write_class_tree(root, n_per_class=2, classes=2, size=12)
    listing = scan_folder(root)
    key = cache_key(listing, listing.images, 16)
    assert cache_key(scan_folder(root), scan_folder(root).images, 16) == key  # unchanged folder: same key
    assert cache_key(listing, listing.images, 32) != key  # another working size
    assert cache_key(listing, listing.images, 16, max_pixels=1000) != key
    first = root / listing.images[0].relpath
    stat = first.stat()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched
    assert cache_key(listing, listing.images, 16) != key
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache_key(listing, listing.images, 16) == key
    (root / listing.classes[0] / "extra.png").write_bytes(first.read_bytes())  # a new file
    grown = scan_folder(root)
    assert cache_key(grown, grown.images, 16) != key


@needs_ffcv
def test_ffcv_cache_is_reused_until_the_folder_changes(tmp_path):
    root, cache_dir = tmp_path / "data", tmp_path / "cache"
    write_class_tree(root, n_per_class=3, classes=2, size=12)
    listing = scan_folder(root)
    first = loaders.ffcv_cache(listing, listing.images, 16, cache_dir=cache_dir, workers=1)
    assert not first.reused and first.path.exists() and first.path.parent == cache_dir / "ffcv"
    written = first.path.stat().st_mtime_ns
    again = loaders.ffcv_cache(scan_folder(root), listing.images, 16, cache_dir=cache_dir, workers=1)
    assert again.reused and again.path == first.path and again.path.stat().st_mtime_ns == written
    target = root / listing.images[0].relpath
    target.write_bytes((root / listing.images[1].relpath).read_bytes())  # content (and size/mtime) changed
    changed = loaders.ffcv_cache(scan_folder(root), scan_folder(root).images, 16, cache_dir=cache_dir, workers=1)
    assert not changed.reused and changed.path != first.path
    assert not list((cache_dir / "ffcv").glob(".*.tmp"))  # no leftovers of the conversions


def test_auto_picks_memory_when_the_set_fits_and_streams_otherwise(monkeypatch):
    assert resolve_loader("auto", 100, 32, limit=100 * 3 * 32 * 32) == "memory"
    monkeypatch.setattr(loaders, "ffcv_available", lambda: False)
    assert resolve_loader("auto", 101, 32, limit=100 * 3 * 32 * 32) == "torch"
    monkeypatch.setattr(loaders, "ffcv_available", lambda: True)
    assert resolve_loader("auto", 101, 32, limit=100 * 3 * 32 * 32) == "ffcv"
    with pytest.raises(UsageError, match="choose one of auto, memory, ffcv, torch"):
        resolve_loader("dali", 1, 32)


def test_missing_ffcv_is_a_usage_error_that_says_what_to_install(monkeypatch, folders):
    monkeypatch.setattr(loaders, "ffcv_available", lambda: False)
    for call in (lambda: verify(folders / "train", folders / "test", loader="ffcv", **TINY),
                 lambda: resolve_loader("ffcv", 1, 32)):
        with pytest.raises(UsageError, match="libopencv-dev libturbojpeg0-dev pkg-config.*ueguard\\[ffcv\\]"):
            call()
    result = CliRunner().invoke(main, ["protect", str(folders / "train"), "--out", str(folders / "never"),
                                       "--loader", "ffcv", "--device", "cpu"])
    assert result.exit_code == 2 and "apt-get install" in result.output
    assert not (folders / "never").exists()


def test_verify_through_the_torch_loader_matches_the_memory_loop(folders):
    """The torch loader streams in the memory loop's batch order: the same training run, exactly."""
    runs = {loader: verify(folders / "train", folders / "test", loader=loader, **TINY)
            for loader in ("memory", "torch")}
    assert runs["torch"]["config"]["resolved_loader"] == "torch"
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(runs["torch"]["runs"][0]["history"]) == strip(runs["memory"]["runs"][0]["history"])
    assert runs["torch"]["runs"][0]["test_accuracy"] == runs["memory"]["runs"][0]["test_accuracy"]


@needs_ffcv
def test_verify_runs_end_to_end_through_ffcv(folders, tmp_path):
    """Streamed from the FFCV cache (also a defense that needs the whole set, which is then loaded from
    the same cache), through the CLI."""
    cache = tmp_path / "cache"
    result = CliRunner().invoke(main, ["verify", str(folders / "train"), "--test", str(folders / "test"),
                                       "--loader", "ffcv", "--cache-dir", str(cache),
                                       "--defense", "none,gray", "--budget", "quick", "--epochs", "2", "--size", "16",
                                       "--batch-size", "16", "--device", "cpu", "--json", str(tmp_path / "r.json"), "-q"])
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["resolved_loader"] == "ffcv"
    assert {r["defense"] for r in report["runs"]} == {"none", "gray"}
    history = report["runs"][0]["history"]
    assert len([h for h in history if h["epoch"] >= 1]) == 2 and all(0 <= h["test_accuracy"] <= 1 for h in history)
    assert len(list((cache / "ffcv").glob("*.beton"))) == 2  # train and test folders, converted once each


def test_streamed_training_skips_a_corrupt_file_and_reports_it(tmp_path):
    root = tmp_path / "data"
    write_class_tree(root, n_per_class=4, classes=2, size=12)
    listing = scan_folder(root)
    (root / listing.images[0].relpath).write_bytes(b"not an image")
    data = StreamedSet(listing, listing.images, 16, "torch", workers=0)
    from ueguard.engine.loops import BatchSampler

    sampler = BatchSampler(len(data), 4, torch.Generator().manual_seed(0))
    seen = sum(len(y) for _, y in next(data.epochs(sampler, torch.Generator().manual_seed(0), "cpu")))
    assert seen == len(listing.images) - 1
    assert len(data.problems) == 1 and str(listing.images[0].relpath) in data.problems[0]


@needs_ffcv
def test_ffcv_leaves_torch_threads_alone(mixed, tmp_path):
    """Importing ffcv, building a Loader and starting a pass each call torch.set_num_threads (1 at
    import); ueguard undoes it, or every later step of the run would go single-threaded."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(2); from ueguard.data import loaders; "
            "assert loaders.ffcv_available(); print(torch.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _load(mixed, "ffcv", tmp_path)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("loader", ["torch", pytest.param("ffcv", marks=needs_ffcv)])
def test_a_spilled_working_set_is_the_memory_one_read_from_its_file(mixed, loader, tmp_path):
    """``spill``: the images are decoded into a memory-mapped .npy (the corrupt file's row compacted
    away in place) and read from it — equal to the memory loader's, held by the file, not by RAM."""
    import numpy as np

    expected, kept, errors = _load(mixed, "memory")
    spill = tmp_path / "working.npy"
    got, got_kept = load_working_set(mixed, mixed.images, 16, loader, cache_dir=tmp_path, workers=1, spill=spill)
    assert got_kept == kept and got.ids == expected.ids and got.backing == spill
    assert torch.equal(got.images, expected.images)
    assert torch.equal(got.labels, expected.labels) and torch.equal(got.grayscale, expected.grayscale)
    on_disk = np.load(spill, mmap_mode="r")
    assert on_disk.shape[0] == len(mixed.images) > len(kept)  # a row per listed image; the tail is unused
    np.testing.assert_array_equal(on_disk[:len(kept)], expected.images.numpy())
    got.images[0, 0, 0, 0] = 255 - int(got.images[0, 0, 0, 0])  # a write through the tensor reaches the file:
    assert int(np.load(spill, mmap_mode="r")[0, 0, 0, 0]) == int(got.images[0, 0, 0, 0])  # it is the mapping
    moved = got.to("cpu")
    assert moved.backing == spill and moved.images.data_ptr() == got.images.data_ptr()


@pytest.mark.parametrize("keep", [[0, 1, 2, 3, 4, 5, 6], [1, 2, 5, 6], [6], [0, 3, 4], []])
def test_compacting_in_place_equals_gathering(keep):
    images = torch.arange(7 * 3 * 2 * 2, dtype=torch.int32).reshape(7, 3, 2, 2).to(torch.uint8)
    expected = images[torch.tensor(keep, dtype=torch.long)].clone()
    loaders._compact(images, torch.tensor(keep, dtype=torch.long), rows=2)
    assert torch.equal(images[:len(keep)], expected)


def test_protect_through_a_streaming_loader_spills_and_matches_memory(tmp_path, monkeypatch):
    """A folder protected with ``--loader torch`` (what ``auto`` picks when the set does not fit) runs on
    a spilled working set and writes the same files as the memory loader; the spill file goes with the
    state folder at the end."""
    import importlib

    import numpy as np
    from PIL import Image

    from ueguard.sdk import protect

    root = tmp_path / "photos"
    write_class_tree(root, n_per_class=6, classes=2, size=20, seed=3)
    listing = scan_folder(root)
    (root / listing.images[1].relpath).write_bytes(b"not an image")
    seen = []
    real = loaders.load_working_set

    def spying(*args, **kwargs):
        working, kept = real(*args, **kwargs)
        seen.append(working.backing)
        return working, kept

    monkeypatch.setattr(importlib.import_module("ueguard.sdk.protect"), "load_working_set", spying)
    options = dict(budget="quick", device="cpu", size=16, seed=0, surrogate="resnet18_cifar_slim", format="png",
                   method_options={"max_rounds": 2, "pgd_steps": 2, "train_steps": 2})
    results = {name: protect(root, tmp_path / name, "emn", loader=name, **options) for name in ("memory", "torch")}
    assert seen[0] is None and seen[1] is not None and seen[1].name == "working-set.npy"
    assert not resume_state(tmp_path / "torch").exists()
    for result in results.values():
        assert result.failed == 1 and result.ok == len(listing.images) - 1
    files = sorted(p.relative_to(tmp_path / "memory") for p in (tmp_path / "memory").rglob("*.png"))
    assert len(files) == len(listing.images) - 1
    for rel in files:
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "memory" / rel)),
                                      np.asarray(Image.open(tmp_path / "torch" / rel)))


PROTECT_AFTER_FFCV = """
import sys, tempfile
from pathlib import Path
import numpy as np, torch
from PIL import Image
sys.path.insert(0, "tests")
from trees import write_class_tree, write_mixed_tree
from ueguard.data.folder import scan_folder
from ueguard.data.loaders import load_working_set
from ueguard.sdk import protect
torch.set_num_threads(2)
tmp = Path(tempfile.mkdtemp())
write_mixed_tree(tmp / "mixed")
mixed = scan_folder(tmp / "mixed")
load_working_set(mixed, mixed.images, 16, "ffcv", cache_dir=tmp, workers=1, spill=tmp / "w.npy")
write_class_tree(tmp / "photos", n_per_class=6, classes=2, size=20, seed=3)
for loader in ("memory", "torch"):
    protect(tmp / "photos", tmp / loader, "emn", loader=loader, budget="quick", device="cpu", size=16, seed=0,
            surrogate="resnet18_cifar_slim", format="png",
            method_options={"max_rounds": 2, "pgd_steps": 2, "train_steps": 2})
files = sorted(f.relative_to(tmp / "memory") for f in (tmp / "memory").rglob("*.png"))
print(torch.get_num_threads(), max(int(np.abs(np.asarray(Image.open(tmp / "memory" / f), dtype=int)
                                           - np.asarray(Image.open(tmp / "torch" / f), dtype=int)).max()) for f in files))
"""


@pytest.mark.slow  # an FFCV + two protects subprocess
@needs_ffcv
def test_after_an_ffcv_pass_protect_keeps_its_threads_and_pixels(tmp_path):
    """FFCV's epoch thread sets torch's thread count when it starts, after ueguard restored it; then two
    protects of one folder later in the process (memory and torch loaders) ran at different thread
    counts and wrote pixels 8 levels apart (2 of 3 runs before the fix; a race, so this test catches
    a regression most of the time, not every time)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", PROTECT_AFTER_FFCV], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1],
                          env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "2 0"  # threads kept; identical pixels
