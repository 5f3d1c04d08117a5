"""bench/reproduce.py's scales and its run order, on small shapes and fake CIFAR-10 batches (no shared data):
the earlier scales keep their cache keys, the ``cpu-full`` tasks are the papers' protocol (all of CIFAR-10
from scratch; the 5 + 5 split for the prior paradigms), a task of other classes gets folders of its own,
the recipe and precision reach verify and key its cache, and a run writes each row as it lands."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("reproduce")


def fake_cifar(root: Path, per_class_per_batch: int = 2) -> Path:
    """``root/cifar10/cifar-10-batches-py``: five training batches and a test batch of random images."""
    rng = np.random.default_rng(0)
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [c for c in range(10) for _ in range(per_class_per_batch)]
        images = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"labels": labels, b"data": images}, f, protocol=2)
    return root


def test_the_earlier_scales_keep_their_cache_keys(bench):
    """Fields added to Scale are left out of the keys at their defaults: a cache (and the committed results
    files, which --merge matches by tag) made before they existed is still found."""
    tags = {name: (bench.SCALES[name].tag(), bench.SCALES[name].protect_tag()) for name in ("quick", "cpu", "full")}
    assert tags == {"quick": ("quick-e20fb32a", "quick-b8a6064d"), "cpu": ("cpu-a68e896e", "cpu-99dc0e8c"),
                    "full": ("full-e612e20d", "full-af803dff")}
    import dataclasses

    moved = dataclasses.replace(bench.SCALES["quick"], task_classes=tuple(range(10)))
    assert moved.tag() != tags["quick"][0] and moved.protect_tag() != tags["quick"][1]
    assert dataclasses.replace(bench.SCALES["quick"], recipe="fast").tag() != tags["quick"][0]


def test_cpu_full_is_the_papers_protocol_in_two_tasks(bench):
    scratch, prior = bench.SCALES["cpu-full"], bench.SCALES["cpu-full-prior"]
    assert scratch.task_classes == tuple(range(10)) and scratch.paradigms == ("scratch",)
    assert len(scratch.task_classes) * scratch.train_per_class == 50_000  # all of CIFAR-10's training set
    assert len(scratch.task_classes) * scratch.test_per_class == 10_000   # and its test set
    assert prior.task_classes == bench.TASK_CLASSES and prior.prior_classes == bench.PRIOR_CLASSES
    assert len(prior.task_classes) * prior.train_per_class == 25_000 == len(prior.prior_classes) * prior.prior_per_class
    assert set(prior.paradigms) == {"finetune", "frozen", "linear"}
    for scale in (scratch, prior):
        assert (scale.scratch_arch, scale.prior_arch, scale.recipe, scale.prior_recipe) == \
            ("fastvgg_cifar", "fastvgg_cifar", "fast", "fast")
        assert scale.defenses == ("none", "staged", "gray", "jpeg", "at") and set(scale.defended) == set(bench.ROWS)
        assert scale.surrogate_arch == "resnet20_cifar"  # the sample-wise methods' PGD over 50k must fit the CPU
        assert scale.options_for("ssc")["fit_per_class"] == scale.options_for("bait")["fit_per_class"] == 500
    assert scratch.protect_tag() != prior.protect_tag()  # their task folders differ, so do their protections


def test_cpu_full_rows_are_registered_methods_and_their_constants_resolve(bench):
    """Every row is a registered method, and each constant the scale sets is one of that method's options,
    in range (a typo would otherwise surface an hour into a run)."""
    from ueguard.methods import METHODS
    from ueguard.sdk.options import ProtectOptions

    scale = bench.SCALES["cpu-full"]
    assert set(bench.METHODS) <= set(METHODS.names())
    for method, options in scale.method_options:
        config = ProtectOptions.resolve(method=method, budget=scale.budget, method_options=dict(options)).method_config()
        for key, value in options:
            assert getattr(config, key) == value, (method, key)


def test_a_task_of_other_classes_gets_folders_of_its_own(bench, tmp_path):
    """All ten classes as the task: ten class folders under a name that says which classes, beside the
    usual split's folders (whose names, and so cache, are unchanged)."""
    import dataclasses

    root = fake_cifar(tmp_path / "data")
    usual = bench.Scale("t", train_per_class=3, test_per_class=1, prior_per_class=2, prior_epochs=1, epochs=1,
                        budget="quick", scratch_arch="resnet18_cifar_slim")
    everything = dataclasses.replace(usual, task_classes=tuple(range(10)))
    a = bench.convert(root, tmp_path / "cache", usual)
    b = bench.convert(root, tmp_path / "cache", everything)
    assert a.task_train.name == "task-train-3pc-s0" and b.task_train.name == "task-c0123456789-train-3pc-s0"
    assert a.prior_train == b.prior_train  # the prior's classes did not change
    assert sorted(p.name for p in b.task_train.iterdir()) == sorted(bench.CIFAR10_CLASSES)
    assert sum(1 for _ in b.task_train.rglob("*.png")) == 30 and sum(1 for _ in b.task_test.rglob("*.png")) == 10
    assert sorted(p.name for p in a.task_train.iterdir()) == sorted(bench.CIFAR10_CLASSES[c] for c in bench.TASK_CLASSES)


def test_the_scales_recipe_and_precision_reach_verify_and_key_its_cache(bench, tmp_path, monkeypatch):
    import dataclasses

    import ueguard.sdk

    calls = []

    def fake_verify(train, test, *, json_path, resume=False, **options):
        calls.append(options)
        runs = [{"paradigm": p, "defense": options["defense"], "test_accuracy": 0.5,
                 "defense_config": bench.defense_constants(options["defense"], "quick", {})}
                for p in options["paradigm"].split(",")]
        config = {k: v for k, v in options.items() if k not in ("paradigm", "defense", "defense_options")}
        report = {"data": {"protected": str(train), "test": str(test)}, "config": config, "runs": runs}
        json_path.write_text(json.dumps(report))
        return report

    monkeypatch.setattr(ueguard.sdk, "verify", fake_verify)
    folders = bench.Folders(tmp_path / "train", tmp_path / "test", tmp_path / "pt", tmp_path / "pe")
    cells = tmp_path / "cells"
    cells.mkdir()
    scale = bench.Scale("t", train_per_class=4, test_per_class=1, prior_per_class=3, prior_epochs=1, epochs=3,
                        budget="quick", scratch_arch="fastvgg_cifar", batch_size=1024, recipe="fast", precision="bf16")
    cell = lambda s: bench.verify_cell("clean", "scratch", folders.task_train, folders, None, ["scratch"],  # noqa: E731
                                       ["none"], cells, s, 0, lambda m: None)
    cell(scale)
    assert calls[0]["recipe"] == "fast" and calls[0]["precision"] == "bf16" and calls[0]["batch_size"] == 1024
    cell(scale)
    assert len(calls) == 1  # found again by its recipe
    cell(dataclasses.replace(scale, precision="fp32"))
    assert len(calls) == 2 and calls[1]["precision"] == "fp32"  # another precision is another run


def test_the_scales_surrogate_reaches_protect_and_keys_its_folder(bench, tmp_path, monkeypatch):
    import dataclasses

    calls = []

    def fake_protect(row, prior, train, out, options, log):
        calls.append(options)
        return {"method": row.method, "ok": 1}

    monkeypatch.setattr(bench.cells, "_protect", fake_protect)
    folders = bench.Folders(tmp_path / "train", tmp_path / "test", tmp_path / "pt", tmp_path / "pe")
    scale = bench.Scale("t", train_per_class=4, test_per_class=1, prior_per_class=3, prior_epochs=1, epochs=3,
                        budget="quick", scratch_arch="fastvgg_cifar")
    make = lambda s, method: bench.cells.protected_folder(bench.Variant(method, method, ()), None, folders,  # noqa: E731
                                                          tmp_path / "cache", s, 0, lambda m: None)
    make(scale, "emn")
    make(dataclasses.replace(scale, surrogate_arch="resnet20_cifar"), "emn")
    make(dataclasses.replace(scale, surrogate_arch="resnet20_cifar"), "lsp")
    assert [c.get("surrogate") for c in calls] == ["fastvgg_cifar", "resnet20_cifar", None]
    assert dataclasses.replace(scale, surrogate_arch="resnet20_cifar").protect_tag() != scale.protect_tag()


def test_informative_cells_come_first_then_everything(bench, tmp_path):
    from _reproduce.cli import select
    from _reproduce.grid import passes

    args = bench.cli.parser().parse_args(["--cpu-full", "--methods", "clean,emn,ops,ssc", "--defenses",
                                          "none,gray,staged", "--defended", "clean,ops,ssc"])
    first, everything = passes(select(args, tmp_path))
    assert first == [("clean", ["none", "staged"]), ("emn", ["none"]), ("ssc", ["none", "staged"])]
    assert everything == [("clean", ["none", "gray", "staged"]), ("emn", ["none"]), ("ops", ["none", "gray", "staged"]),
                          ("ssc", ["none", "gray", "staged"])]
    args = bench.cli.parser().parse_args(["--cpu-full", "--methods", "clean", "--defenses", "none"])
    assert passes(select(args, tmp_path)) == [[("clean", ["none"])]]  # nothing to put first: one pass


def test_each_row_is_in_the_results_file_as_soon_as_it_lands(bench, tmp_path, monkeypatch):
    """A run that dies on its second row leaves the first row's cells (and the protections made) in the
    results file; --protect-only makes the protections and trains nothing."""
    import ueguard.sdk

    root = fake_cifar(tmp_path / "data")
    tiny = bench.Scale("quick", train_per_class=2, test_per_class=1, prior_per_class=2, prior_epochs=1, epochs=1,
                       budget="quick", scratch_arch="resnet18_cifar_slim", batch_size=8, task_classes=tuple(range(10)),
                       paradigms=("scratch",))
    monkeypatch.setitem(bench.SCALES, "quick", tiny)

    def fake_protected(row, prior, folders, cache, scale, seed, log):
        return tmp_path / row.name, {"prior": None, "wall_s": 2.0}

    monkeypatch.setattr(bench.cells, "protected_folder", fake_protected)
    monkeypatch.setattr(bench.render, "plot", lambda results, columns, stem: [] if columns else pytest.fail("no columns"))

    def fake_verify(train, test, *, json_path, resume=False, **options):
        if Path(train).name == "ops":
            raise RuntimeError("the machine went away")
        run = {"paradigm": "scratch", "defense": options["defense"], "test_accuracy": 0.5, "peak_test_accuracy": 0.5,
               "history": [{"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.9, "test_accuracy": 0.5}], "chance": 0.1, "seconds": 1.0,
               "defense_config": bench.defense_constants(options["defense"], "quick", {})}
        config = {k: v for k, v in options.items() if k not in ("paradigm", "defense", "defense_options")}
        report = {"data": {"protected": str(train), "test": str(test)}, "config": config, "runs": [run]}
        json_path.write_text(json.dumps(report))
        return report

    monkeypatch.setattr(ueguard.sdk, "verify", fake_verify)
    out = tmp_path / "r.json"
    common = ["--quick", "--defenses", "none", "--data", str(root), "--cache", str(tmp_path / "cache"), "--json", str(out)]
    with pytest.raises(RuntimeError, match="went away"):
        bench.main(common + ["--methods", "clean,ops"])
    record = json.loads(out.read_text())
    assert record["results"]["clean"][0]["scratch/none"]["accuracy"] == 50.0 and record["results"]["ops"] == []
    assert record["task_classes"] == list(bench.CIFAR10_CLASSES) and "| clean | 50.0 [94.7] |" in record["table"]
    monkeypatch.setattr(ueguard.sdk, "verify", lambda *a, **k: pytest.fail("--protect-only trained a victim"))
    bench.main(common + ["--methods", "ops,lsp", "--protect-only", "--json", str(tmp_path / "p.json")])
    record = json.loads((tmp_path / "p.json").read_text())
    assert record["protections"] == {"ops-s0": {"prior": None, "wall_s": 2.0}, "lsp-s0": {"prior": None, "wall_s": 2.0}}
