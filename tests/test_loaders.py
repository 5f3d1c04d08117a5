"""``--loader``: the memory, torch and FFCV paths give the same working set, the FFCV cache is keyed by
the folder listing and reused, and ``verify`` trains end to end through every loader."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner

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
