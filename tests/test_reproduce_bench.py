"""The pure pieces of bench/reproduce.py: CIFAR pickle → image folder, the class split, the table.

Fake CIFAR-10 batch files are written here (the python format: a protocol-2 pickle of a dict with
``b"data"`` N×3072 uint8 rows, channel-major, and ``b"labels"``); no shared data is needed.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import load_bench
from PIL import Image

pytestmark = pytest.mark.slow  # a benchmark script's tests: not in the fast subset (-m "not slow")


@pytest.fixture(scope="module")
def bench():
    return load_bench("reproduce")


def write_batch(path: Path, images_nhwc: np.ndarray, labels: list[int]) -> None:
    rows = images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"fake", b"labels": labels, b"data": rows,
                     b"filenames": [b"x.png"] * len(labels)}, f, protocol=2)


def fake_cifar(root: Path, per_class_per_batch: int = 2, seed: int = 0) -> Path:
    """``root/cifar10/cifar-10-batches-py`` with five training batches and a test batch of random images,
    ``per_class_per_batch`` of each of the ten classes per batch."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [c for c in range(10) for _ in range(per_class_per_batch)]
        rng.shuffle(labels)
        images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
        write_batch(folder / name, images, labels)
    return root


def test_batch_reads_back_pixel_exact_in_hwc_order(bench, tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    images[0, 0, 0] = (255, 0, 0)  # a red top-left pixel: channel order must survive the round trip
    write_batch(tmp_path / "b", images, [4, 0, 9])
    read, labels = bench.read_cifar_batch(tmp_path / "b")
    assert read.shape == (3, 32, 32, 3) and read.dtype == np.uint8
    np.testing.assert_array_equal(read, images)
    assert labels.tolist() == [4, 0, 9]
    assert read[0, 0, 0].tolist() == [255, 0, 0]


def test_unreadable_batch_names_the_file(bench, tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(SystemExit, match="data_batch_1"):
        bench.read_cifar_batch(tmp_path / "data_batch_1")


def test_balanced_indices_take_exactly_per_class_of_the_asked_classes(bench):
    labels = np.repeat(np.arange(10), 7)
    idx = bench.balanced_indices(labels, bench.TASK_CLASSES, 3, seed=0)
    assert sorted(np.bincount(labels[idx], minlength=10).tolist()) == [0] * 5 + [3] * 5
    assert set(labels[idx].tolist()) == set(bench.TASK_CLASSES)
    assert np.array_equal(idx, bench.balanced_indices(labels, bench.TASK_CLASSES, 3, seed=0))
    with pytest.raises(SystemExit, match="fewer than the 8"):
        bench.balanced_indices(labels, bench.TASK_CLASSES, 8, seed=0)


def test_class_split_is_disjoint_and_covers_cifar10(bench):
    prior = {bench.CIFAR10_CLASSES[c] for c in bench.PRIOR_CLASSES}
    task = {bench.CIFAR10_CLASSES[c] for c in bench.TASK_CLASSES}
    assert prior == {"airplane", "automobile", "bird", "cat", "deer"}
    assert task == {"dog", "frog", "horse", "ship", "truck"}
    assert not prior & task and len(prior | task) == 10


def test_convert_writes_imagefolder_pngs_equal_to_the_batches(bench, tmp_path):
    data = fake_cifar(tmp_path / "data")
    scale = bench.Scale("t", train_per_class=4, test_per_class=1, prior_per_class=3, prior_epochs=1, epochs=1,
                        budget="quick", scratch_arch="resnet18_cifar_slim")
    folders = bench.convert(data, tmp_path / "cache", scale)
    images, labels = bench.read_cifar(data / "cifar10", train=True)
    files = sorted(folders.task_train.rglob("*.png"))
    assert len(files) == 5 * 4
    assert {f.parent.name for f in files} == {"dog", "frog", "horse", "ship", "truck"}
    assert {f.parent.name for f in folders.prior_train.rglob("*.png")} == {"airplane", "automobile", "bird", "cat",
                                                                          "deer"}
    assert len(list(folders.prior_train.rglob("*.png"))) == 5 * 3
    assert len(list(folders.task_test.rglob("*.png"))) == 5
    for f in files:  # lossless, and the file name is the index into the concatenated training batches
        index = int(f.stem)
        assert bench.CIFAR10_CLASSES[labels[index]] == f.parent.name
        np.testing.assert_array_equal(np.asarray(Image.open(f).convert("RGB")), images[index])
    stamp = files[0].stat().st_mtime_ns
    again = bench.convert(data, tmp_path / "cache", scale)  # cached: nothing rewritten
    assert again == folders and files[0].stat().st_mtime_ns == stamp
    assert not list((tmp_path / "cache" / "data").glob("*.partial"))


def fake_cifar100(root: Path, fine: tuple[int, ...], per_class: int = 3, seed: int = 0) -> None:
    """``root/cifar100``: the 20-class training cut (an npz of ``fine`` classes) and a test pickle of every
    one of the 100 classes, random images, laid out as the staged files are."""
    rng = np.random.default_rng(seed)
    names = np.array([f"fine{c}" for c in range(100)])
    labels = np.repeat(np.array(fine), per_class)
    (root / "cifar100" / "cifar-100-python").mkdir(parents=True)
    images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    np.savez(root / "cifar100" / "train-20class.npz", images=images, fine_labels=labels, coarse_labels=labels,
             train_index=np.arange(len(labels)), fine_label_names=names,
             coarse_label_names=names[:20])
    test = np.repeat(np.arange(100), 2)
    with open(root / "cifar100" / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (len(test), 3072), dtype=np.uint8), "fine_labels": test.tolist(),
                     "coarse_labels": test.tolist(), "filenames": ["x.png"] * len(test)}, f, protocol=2)


def test_the_heldout_scale_takes_its_task_from_cifar100_and_its_prior_from_cifar10(bench, tmp_path):
    data = fake_cifar(tmp_path / "data")
    fine = tuple(bench.SCALES["cpu-cifar100-prior"].task_classes)
    fake_cifar100(tmp_path / "data", fine)
    scale = dataclasses.replace(bench.SCALES["cpu-cifar100-prior"], train_per_class=3, test_per_class=2,
                                      prior_per_class=2)
    folders = bench.convert(data, tmp_path / "cache", scale)
    with np.load(data / "cifar100" / "train-20class.npz") as cut:
        images = cut["images"]
    files = sorted(folders.task_train.rglob("*.png"))
    assert len(files) == 20 * 3 and {f.parent.name for f in files} == {f"fine{c}" for c in fine}
    for f in files:  # lossless, named by the row of the cut
        np.testing.assert_array_equal(np.asarray(Image.open(f).convert("RGB")), images[int(f.stem)])
    assert {f.parent.name for f in folders.task_test.rglob("*.png")} == {f"fine{c}" for c in fine}
    assert len(list(folders.task_test.rglob("*.png"))) == 20 * 2  # only the cut's classes of the 100
    prior = {f.parent.name for f in folders.prior_train.rglob("*.png")}
    assert prior == {"airplane", "automobile", "bird", "cat", "deer"}
    assert "cifar100" in folders.task_train.name and "cifar100" not in folders.prior_train.name
    assert scale.class_names(task=True)[:2] == ["apple", "aquarium_fish"]
    with pytest.raises(SystemExit, match="train-20class.npz: missing"):
        bench.convert(fake_cifar(tmp_path / "bare"), tmp_path / "cache2", scale)


def test_convert_without_batches_is_a_clear_error(bench, tmp_path):
    scale = bench.SCALES["quick"]
    with pytest.raises(SystemExit, match="missing CIFAR-10 batch"):
        bench.convert(tmp_path, tmp_path / "cache", scale)


def test_table_has_a_column_per_paradigm_defense_and_the_published_number(bench):
    cell = lambda acc: {"accuracy": acc, "peak": acc, "history": [acc], "seconds": 1.0}  # noqa: E731
    results = {"clean": [{"scratch/none": cell(80.0), "finetune·disjoint/none": cell(85.0)}],
               "emn": [{"scratch/none": cell(30.0), "finetune·disjoint/none": cell(60.0)},
                       {"scratch/none": cell(34.0)}],
               "ssc": [{"finetune·disjoint/none": cell(40.0)}],
               "bait": [{"finetune·disjoint/none": {**cell(20.0), "stalled": True}}]}
    columns = ["scratch/none", "finetune·disjoint/none"]
    lines = bench.render_table(results, columns).splitlines()
    assert lines[0] == "| protection | scratch/none | finetune·disjoint/none |"
    assert lines[1] == "|---|---:|---:|"
    assert lines[2] == "| clean | 80.0 [94.7] | 85.0 |"
    assert lines[3] == "| emn | 32.0 ± 2.8 [21.1] | 60.0 |"  # two seeds: mean ± sample sd
    assert lines[4] == "| ssc | — | 40.0 |"  # no scratch cell, and no published number for SSC
    assert lines[5] == "| bait | — | 20.0 stalled |"  # verify's stall rule: no evidence either way


def test_plots_are_written_with_stalled_cells_among_the_bars(bench, tmp_path):
    cell = lambda acc, stalled=False: {"accuracy": acc, "peak": acc, "history": [acc / 2, acc], "seconds": 1.0,  # noqa: E731
                                       "stalled": stalled}
    results = {"clean": [{"scratch/none": cell(80.0), "scratch/at": cell(20.0, True)}],
               "ssc": [{"scratch/none": cell(30.0), "scratch/at": cell(20.0, True)}]}
    written = bench.render.plot(results, ["scratch/none", "scratch/at"], tmp_path / "t")
    assert [p.name for p in written] == ["t-accuracy.png", "t-curves.png"]
    assert all(p.stat().st_size > 5000 for p in written)


def test_scale_tag_changes_with_settings_not_with_selections(bench):
    quick = bench.SCALES["quick"]
    import dataclasses

    assert quick.tag() == dataclasses.replace(quick, defenses=("none",), paradigms=("scratch",)).tag()
    assert quick.tag() != dataclasses.replace(quick, epochs=quick.epochs + 1).tag()
    assert quick.options_for("emn") == {"max_rounds": 4} and quick.options_for("lsp") == {}


def test_variant_parses_typed_constants_and_refuses_bad_rows(bench):
    variant = bench.parse_variant("ssc-fresh=ssc:deep_init=fresh,camouflage_weight=0,max_rounds=4")
    assert variant == bench.Variant("ssc-fresh", "ssc", (("deep_init", "fresh"), ("camouflage_weight", 0),
                                                          ("max_rounds", 4)))
    assert bench.parse_variant("ssc-default=ssc:") == bench.Variant("ssc-default", "ssc", ())
    bf16 = bench.parse_variant("emn-bf16=emn:precision=bf16,max_rounds=4")
    assert bf16.split() == ({"precision": "bf16"}, {"max_rounds": 4})  # protect's option, the method's
    for bad in ("ssc=ssc:lr=1",            # shadows a real row
                "x=nomethod:lr=1",         # unknown method
                "a/b=ssc:lr=1",            # a character the column keys use
                "ssc:lr=1",                # no NAME=
                "x=ssc:lr"):               # no value
        with pytest.raises((SystemExit, Exception)) as caught:
            bench.parse_variant(bad)
        assert bad.split("=")[0] in str(caught.value) or "KEY=VALUE" in str(caught.value)


def _fake_report(folders, defense: str, paradigm: str, config: dict, *, epochs: int = 3,
                 train: Path | None = None) -> dict:
    """A verify report with one run, as verify writes it (only the fields verify_cell reads)."""
    return {"data": {"protected": str(train or folders.task_train), "test": str(folders.task_test), "clean": None},
            "config": {"arch": "resnet18_cifar_slim", "epochs": epochs, "budget": "quick", "seed": 0,
                       "weights": None, "size": 32, "batch_size": 16, "lr": None, "paradigm": paradigm,
                       "defense": defense},
            "runs": [{"paradigm": paradigm, "defense": defense, "defense_config": config,
                      "test_accuracy": 0.5}],
            "skipped": []}


@pytest.fixture
def cell_setup(bench, tmp_path, monkeypatch):
    """A scale, folders, an empty cell cache and a fake ``ueguard.sdk.verify`` that records each call and
    writes its report where the real one would."""
    import json

    import ueguard.sdk

    scale = bench.Scale("t", train_per_class=4, test_per_class=1, prior_per_class=3, prior_epochs=1, epochs=3,
                        budget="quick", scratch_arch="resnet18_cifar_slim", batch_size=16)
    folders = bench.Folders(tmp_path / "train", tmp_path / "test", tmp_path / "ptrain", tmp_path / "ptest")
    cells = tmp_path / "cells"
    cells.mkdir()
    calls = []

    def fake_verify(train, test, *, json_path, resume=False, **options):
        calls.append({"train": train, "json_path": json_path, **options})
        opts = {k: v for k, v in options.items() if k not in ("paradigm", "defense", "defense_options", "clean")}
        runs = []
        for paradigm in options["paradigm"].split(","):
            config = bench.defense_constants(options["defense"], "quick", options["defense_options"])
            runs += _fake_report(folders, options["defense"], paradigm, config, train=train)["runs"]
        report = {"data": {"protected": str(train), "test": str(test)}, "config": opts, "runs": runs, "skipped": []}
        json_path.write_text(json.dumps(report))
        return report

    monkeypatch.setattr(ueguard.sdk, "verify", fake_verify)
    return scale, folders, cells, calls


def test_verify_cell_trains_only_runs_no_cached_report_holds(bench, cell_setup):
    """A run made elsewhere (bench/staged.py's settings cell, another row's report on the same data) under
    the constants that are now the defaults is reused; a run made under a defense's former defaults, another
    recipe or other data is not."""
    import json

    scale, folders, cells, calls = cell_setup
    staged_now = bench.defense_constants("staged", "quick", {})
    staged_before = staged_now | {"tau": 0.6, "gamma": 0.1}
    reports = {"verify-emn-scratch-s0.json": _fake_report(folders, "none", "scratch", {}),  # reused
               "verify-emn-scratch-staged-tau=1-s0.json": _fake_report(folders, "staged", "scratch", staged_now),
               "verify-emn-old-s0.json": _fake_report(folders, "gray", "scratch", {"old": True}),  # former defaults
               "verify-emn-long-s0.json": _fake_report(folders, "jpeg", "scratch",
                                                       bench.defense_constants("jpeg", "quick", {}), epochs=9),
               "verify-emn-other-s0.json": _fake_report(folders, "bdr", "scratch",
                                                        bench.defense_constants("bdr", "quick", {}),
                                                        train=folders.prior_train),
               "verify-clean-scratch-s0.json": _fake_report(folders, "gray", "scratch",  # another row's report on
                                                            bench.defense_constants("gray", "quick", {}))}  # the same data
    reports["verify-emn-scratch-s0.json"]["runs"].append(
        {"paradigm": "scratch", "defense": "staged", "defense_config": staged_before, "test_accuracy": 0.1})
    for name, report in reports.items():
        (cells / name).write_text(json.dumps(report))

    out = bench.verify_cell("emn", "scratch", folders.task_train, folders, None, ["scratch"],
                            ["none", "staged", "gray", "jpeg", "bdr"], cells, scale, 0, lambda m: None)
    assert [c["defense"] for c in calls] == ["jpeg", "bdr"]  # one battery per missing defense; gray is the
                                                             # same run as the other row's: reused
    assert all(c["paradigm"] == "scratch" and c["epochs"] == 3 for c in calls)
    assert [r["defense"] for r in out["runs"]] == ["none", "staged", "gray", "jpeg", "bdr"]
    staged = out["runs"][1]  # the settings cell's run, not the stale one beside "none"
    assert staged["defense_config"] == staged_now and staged["test_accuracy"] == 0.5
    calls.clear()  # everything is cached now, in files a later call finds
    again = bench.verify_cell("emn", "scratch", folders.task_train, folders, None, ["scratch"],
                              ["none", "staged", "gray", "jpeg", "bdr"], cells, scale, 0, lambda m: None)
    assert calls == [] and [r["defense"] for r in again["runs"]] == ["none", "staged", "gray", "jpeg", "bdr"]
    bench.verify_cell("emn", "scratch", folders.task_train, folders, None, ["scratch"], ["staged"], cells, scale, 0,
                      lambda m: None, {"staged.tau": 0.5})  # other constants: a run of its own
    assert [(c["defense"], c["defense_options"]) for c in calls] == [("staged", {"staged.tau": 0.5})]


def test_a_defense_option_reaches_only_its_battery_and_keeps_a_report_of_its_own(bench, cell_setup):
    """``--defense-option classmean.sigma=0`` in a run with none and classmean: the none battery gets no
    option (verify refuses one of a defense it does not run), and the sigma-0 battery writes beside the
    default's report instead of over it — both stay found."""
    scale, folders, cells, calls = cell_setup
    cell = lambda options: bench.verify_cell("ssc", "disjoint", folders.task_train, folders, None,  # noqa: E731
                                             ["finetune"], ["none", "classmean"], cells, scale, 0, lambda m: None,
                                             options)
    cell({"classmean.sigma": 0})
    assert [(c["defense"], c["defense_options"]) for c in calls] == [("none", {}), ("classmean", {"classmean.sigma": 0})]
    calls.clear()
    out = cell({})
    assert [(c["defense"], c["defense_options"]) for c in calls] == [("classmean", {})]  # none: cached
    assert len(list(cells.glob("verify-ssc-disjoint-classmean-*.json"))) == 2
    assert out["runs"][1]["defense_config"]["sigma"] == 1.0
    calls.clear()
    assert cell({"classmean.sigma": 0})["runs"][1]["defense_config"]["sigma"] == 0 and calls == []


def test_defense_options_are_checked_before_anything_runs(bench, tmp_path):
    def select(*extra):
        args = bench.cli.parser().parse_args(["--cpu-full-prior", "--defenses", "none,classmean", *extra])
        return bench.cli.select(args, tmp_path)

    assert select("--defense-option", "classmean.sigma=0").defense_options == {"classmean.sigma": 0}
    for bad, said in (("sigma=0", "name the defense"), ("staged.tau=0.5", "not in --defenses"),
                      ("classmean.sigmax=0", "sigma, strength"), ("classmean.sigma=-1", "sigma must be")):
        with pytest.raises(SystemExit, match=said):
            select("--defense-option", bad)


def test_verify_cell_gives_earlystop_the_original_images_to_validate_on(bench, cell_setup):
    scale, folders, cells, calls = cell_setup
    out = bench.verify_cell("emn", "scratch", folders.prior_train, folders, None, ["scratch"], ["none", "earlystop"],
                            cells, scale, 0, lambda m: None)
    assert [(c["defense"], c.get("clean")) for c in calls] == [("none", None), ("earlystop", folders.task_train)]
    assert [r["defense"] for r in out["runs"]] == ["none", "earlystop"]


def test_cached_only_leaves_a_missing_run_empty_instead_of_training_it(bench, cell_setup, monkeypatch):
    import json

    scale, folders, cells, calls = cell_setup
    (cells / "verify-emn-scratch-s0.json").write_text(json.dumps(_fake_report(folders, "none", "scratch", {})))
    monkeypatch.setattr(bench.cells, "CACHED_ONLY", True)
    said = []
    out = bench.verify_cell("emn", "scratch", folders.task_train, folders, None, ["scratch"], ["none", "gray"], cells,
                            scale, 0, said.append)
    assert calls == [] and [r["defense"] for r in out["runs"]] == ["none"]
    assert any("no cached run of emn × scratch: gray" in m for m in said)


def write_fake_report(bench, train, test, json_path: Path, options: dict, accuracy: float) -> dict:
    """What ``ueguard.sdk.verify`` writes, for a stand-in that trains nothing: one run per paradigm at
    ``accuracy``, under the defense's current constants (so ``cached_runs`` finds it again)."""
    import json

    runs = [{"paradigm": p, "defense": options["defense"], "test_accuracy": accuracy, "peak_test_accuracy": 0.6,
             "history": [{"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.9, "test_accuracy": accuracy}],
             "chance": 0.2, "seconds": 1.0, "defense_config": bench.defense_constants(options["defense"], "quick", {})}
            for p in options["paradigm"].split(",")]
    opts = {k: v for k, v in options.items() if k not in ("paradigm", "defense", "defense_options")}
    report = {"data": {"protected": str(train), "test": str(test)}, "config": opts, "runs": runs}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report))
    return report


def test_victim_seeds_train_each_protection_once_and_average_the_victims(bench, tmp_path, monkeypatch):
    """``--victim-seeds 0,1``: the protection (and prior) of seed 0 is made once, a victim is trained on it per
    victim seed (the verify cell cached under that seed), and the table averages them (mean ± sd)."""
    import json

    import ueguard.sdk

    root = fake_cifar(tmp_path / "data")
    tiny = bench.Scale("quick", train_per_class=4, test_per_class=2, prior_per_class=4, prior_epochs=1, epochs=2,
                       budget="quick", scratch_arch="resnet18_cifar_slim", batch_size=8)
    monkeypatch.setitem(bench.SCALES, "quick", tiny)
    monkeypatch.setattr(bench.data, "pretrain_disjoint_prior", lambda folders, cache, scale, seed: bench.Prior(
        "disjoint", tmp_path / f"prior-s{seed}.pth", "resnet20_cifar", 0.7))
    protected = []

    def fake_protected(row, prior, folders, cache, scale, seed, log):
        protected.append((row.name, prior.name, seed))
        return tmp_path / f"{row.name}-s{seed}", {"prior": None, "seconds": 1.0}

    monkeypatch.setattr(bench.cells, "protected_folder", fake_protected)
    trained = []

    def fake_verify(train, test, *, json_path, resume=False, **options):
        trained.append((Path(train).name, options["paradigm"], options["seed"]))
        return write_fake_report(bench, train, test, json_path, options, 0.5 + 0.1 * options["seed"])

    monkeypatch.setattr(ueguard.sdk, "verify", fake_verify)
    monkeypatch.setattr(bench.render, "plot", lambda results, columns, stem: [])
    out = tmp_path / "r.json"
    common = ["--quick", "--methods", "emn", "--priors", "disjoint", "--paradigms", "scratch,finetune",
              "--defenses", "none", "--data", str(root), "--cache", str(tmp_path / "cache"), "--json", str(out)]
    argv = common + ["--victim-seeds", "0,1"]
    bench.main(argv)
    assert protected == [("emn", "disjoint", 0), ("emn", "disjoint", 0)]  # scratch and prior groups, seed 0 only
    assert sorted(s for _, _, s in trained) == [0, 0, 0, 0, 1, 1, 1, 1]  # clean + emn × two groups × two seeds
    record = json.loads(out.read_text())
    assert record["victim_seeds"] == [0, 1] and record["entry_seeds"]["emn"] == [[0, 0], [0, 1]]
    assert "55.0 ± 7.1" in record["table"]
    trained.clear()
    bench.main(argv)  # every victim seed's cell is cached under its own seed
    assert trained == []
    seed_1 = common[:-1] + [str(tmp_path / "r1.json"), "--seeds", "1"]  # seed 1's own prior, protection, victims
    bench.main(seed_1)  # clean from scratch at seed 1 is the victim seed 1 run already made: the same run
    assert sorted(trained) == [("emn-s1", "finetune", 1), ("emn-s1", "scratch", 1),
                               ("task-train-4pc-s0", "finetune", 1)]
    trained.clear()
    bench.main(argv)  # seed 1's batteries wrote beside, not over, the victim seed 1 cells of seed 0
    bench.main(seed_1)
    assert trained == []
    with pytest.raises(SystemExit, match=r"4 cell\(s\) this run would not write again \(clean "
                                         r"finetune·disjoint/none \(seed 0, victim seed 1\)"):
        bench.main(common + ["--seeds", "0,1"])  # r.json holds victim seed 1's cells of seed 0
    bench.main(common + ["--seeds", "0,1", "--replace"])  # each seed's disjoint prior is listed, not the last one's
    record = json.loads(out.read_text())
    assert sorted(record["priors"]) == ["disjoint, seed 0", "disjoint, seed 1"]
    assert [v["weights"] for _, v in sorted(record["priors"].items())] == [str(tmp_path / f"prior-s{s}.pth") for s in (0, 1)]
    assert "priors: disjoint resnet20_cifar)" in out.with_suffix(".md").read_text()
    for bad in ("0,x", "", " , "):  # an empty list is an error, not silently the default
        with pytest.raises(SystemExit, match="victim-seeds"):
            bench.main(common + ["--victim-seeds", bad])


def test_a_results_file_is_never_rewritten_without_cells_it_holds(bench, tmp_path):
    """A narrower run (fewer defenses, another scale, --protect-only) must not erase a wider table: refused
    before anything runs, naming the file and the cells, unless --replace; a re-run of the same or a wider
    selection continues the file."""
    import json

    out = tmp_path / "r.json"
    base = ["--cpu-full-prior", "--methods", "clean,ssc", "--paradigms", "finetune", "--priors", "disjoint",
            "--json", str(out)]
    wide = bench.cli.select(bench.cli.parser().parse_args(base + ["--defenses", "none,classmean", "--defended", "ssc"]),
                            tmp_path)
    bench.check_results_file(wide)  # no file yet
    cell = {"accuracy": 50.0}
    record = {"bench": "reproduce", "scale_tag": wide.scale.tag(), "seeds": [0], "victim_seeds": None,
              "entry_seeds": {"clean": [[0, 0]], "ssc": [[0, 0]]},
              "results": {"clean": [{"finetune·disjoint/none": cell}],
                          "ssc": [{"finetune·disjoint/none": cell, "finetune·disjoint/classmean": cell}]}}
    out.write_text(json.dumps(record))
    kept = bench.check_results_file(wide)  # the same selection resumes, keeping the file's cells ...
    assert set(kept) == {("clean", (0, 0), "finetune·disjoint/none"), ("ssc", (0, 0), "finetune·disjoint/none"),
                         ("ssc", (0, 0), "finetune·disjoint/classmean")}
    landed = bench.Grid(wide.rows, entries={"ssc": {(0, 0): {"finetune·disjoint/none": {"accuracy": 30.0}}}})
    bench.write_results(wide, landed, bench._environment(), bench.Clock(), final=False, kept=kept)
    rewritten = json.loads(out.read_text())  # ... until it re-measures them: the first pass's write loses none
    assert rewritten["results"]["ssc"] == [{"finetune·disjoint/none": {"accuracy": 30.0},
                                            "finetune·disjoint/classmean": cell}]
    assert rewritten["results"]["clean"] == [{"finetune·disjoint/none": cell}]
    assert rewritten["entry_seeds"] == {"clean": [[0, 0]], "ssc": [[0, 0]]}
    out.write_text(json.dumps(record))
    bench.check_results_file(bench.cli.select(bench.cli.parser().parse_args(
        base + ["--defenses", "none,classmean,staged", "--defended", "ssc"]), tmp_path))  # a wider one too

    def refused(extra: list[str], match: str) -> None:
        sel = bench.cli.select(bench.cli.parser().parse_args(base + extra), tmp_path)
        with pytest.raises(SystemExit, match=match):
            bench.check_results_file(sel)
        bench.check_results_file(bench.cli.select(bench.cli.parser().parse_args(base + extra + ["--replace"]),
                                                  tmp_path))

    refused(["--defenses", "none"], r"r\.json: holds 1 cell\(s\) this run would not write again \(ssc "
                                    r"finetune·disjoint/classmean \(seed 0, victim seed 0\)\).*--merge.*--replace")
    refused(["--defenses", "none,classmean", "--defended", "ssc", "--seeds", "1"], r"3 cell\(s\)")
    refused(["--defenses", "none,classmean", "--defended", "ssc", "--protect-only"], r"3 cell\(s\)")
    refused(["--defenses", "none,classmean", "--defended", "ssc", "--train-per-class", "10"],
            r"results of scale cpu-full-prior-\w+, this run is cpu-full-prior-\w+")
    out.write_text("not json")
    refused(["--defenses", "none"], r"exists and is not a results file")


def test_a_cached_protection_is_found_by_its_resolved_constants(bench, tmp_path, monkeypatch):
    """A protected folder is reused only when its run resolved to the constants this code resolves now —
    under the row's own name first, else under any row's (a variant the defaults have become); a changed
    default is not found, so it is made anew."""
    import dataclasses
    import json

    from ueguard.methods import METHODS
    from ueguard.sdk.options import ProtectOptions

    ssc = METHODS.get("ssc")
    options = {"budget": "quick", "seed": 0, "size": 32, "format": "png", "method_options": {}}

    def made(name: str, method_options: dict, recorded: bool) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        given = {**options, "method_options": method_options}
        header = {"kind": "run", "options": ProtectOptions.resolve(method="ssc", **given).record()}
        if recorded:
            config = ssc.make_config("quick", seed=0, **method_options)
            header["method_config"] = json.loads(json.dumps(dataclasses.asdict(config)))
        (folder / "ueguard-manifest.jsonl").write_text(json.dumps(header) + "\n")
        (tmp_path / f"{name}.json").write_text(json.dumps({"method": "ssc", "options": given}))
        return folder

    plain = made("ssc@disjoint-s0", {}, recorded=False)  # made before method_config was recorded: revision 1
    deceive = made("ssc-deceive@disjoint-s0", {"deception_weight": 1}, recorded=True)
    find = lambda config, wanted=options: bench.cached_protection(tmp_path, plain, "ssc", wanted, config)  # noqa: E731
    assert find(ssc.make_config("quick", seed=0, deception_weight=0)) == plain  # revision 1's default: ρ 0
    assert find(ssc.make_config("quick", seed=0)) == deceive  # today's default is what that variant was made with
    assert find(ssc.make_config("quick", seed=0, anchor_weight=20)) is None  # nothing made with these
    assert find(ssc.make_config("quick", seed=0), {**options, "seed": 1}) is None  # other settings
    # another default changes: the folder without a record resolves under its revision's former defaults,
    # the one with a record keeps what it recorded
    monkeypatch.setattr(ssc, "defaults_revision", 3)
    monkeypatch.setattr(ssc, "former_defaults", {1: {"deception_weight": 0.0, "anchor_weight": 20.0},
                                                 2: {"anchor_weight": 20.0}})
    assert find(ssc.make_config("quick", seed=0, deception_weight=0)) is None
    assert find(ssc.make_config("quick", seed=0, deception_weight=0, anchor_weight=20)) == plain
    assert find(ssc.make_config("quick", seed=0)) == deceive


def _race(*calls):
    """Run the callables in threads started together; their results in order (an exception is re-raised)."""
    import threading

    results, errors, start = [None] * len(calls), [], threading.Barrier(len(calls))

    def run(i, call):
        start.wait()
        try:
            results[i] = call()
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def test_two_processes_on_one_battery_train_it_once(bench, cell_setup, monkeypatch):
    """Two reproduce runs that need the same verify battery (every invocation adds clean and `none`): the
    second waits for the first's lock, then reuses its runs instead of training them again on the same
    resume state. (flock locks are per open file, so two threads contend as two processes do.)"""
    import time

    import ueguard.sdk

    scale, folders, cells, calls = cell_setup
    fake = ueguard.sdk.verify

    def slow_verify(*args, **kwargs):
        time.sleep(0.5)  # long enough for the other caller to reach the cache before this one writes
        return fake(*args, **kwargs)

    monkeypatch.setattr(ueguard.sdk, "verify", slow_verify)
    said = []
    cell = lambda: bench.verify_cell("emn", "scratch", folders.task_train, folders, None,  # noqa: E731
                                     ["scratch"], ["none"], cells, scale, 0, said.append)
    first, second = _race(cell, cell)
    assert len(calls) == 1 and first == second and [r["defense"] for r in first["runs"]] == ["none"]
    assert any("waiting for another reproduce process" in m for m in said)
    _race(lambda: bench.verify_cell("emn", "scratch", folders.task_train, folders, None, ["scratch"], ["gray"],
                                    cells, scale, 0, said.append),
          lambda: bench.verify_cell("emn", "scratch", folders.task_train, folders, None, ["scratch"], ["jpeg"],
                                    cells, scale, 0, said.append))
    assert sorted(c["defense"] for c in calls[1:]) == ["gray", "jpeg"]  # other batteries do not wait or merge


def test_two_processes_on_one_protection_make_it_once(bench, tmp_path, monkeypatch):
    """The same for a protected folder: real `protect` (LSP on a tiny converted task) runs once, and the
    waiting caller gets the folder the first one made."""
    import time

    import ueguard.sdk

    tiny = bench.Scale("t", train_per_class=2, test_per_class=1, prior_per_class=2, prior_epochs=1, epochs=1,
                       budget="quick", scratch_arch="resnet18_cifar_slim", batch_size=8)
    cache = tmp_path / "cache"
    data = fake_cifar(tmp_path / "data")
    folders = _race(*[lambda: bench.convert(data, cache, tiny)] * 2)  # one converts, the other waits for it
    assert folders[0] == folders[1] and len(list(folders[0].task_train.rglob("*.png"))) == 10
    real, made = ueguard.sdk.protect, []

    def slow_protect(*args, **kwargs):
        made.append(args[1])
        result = real(*args, **kwargs)
        time.sleep(0.5)  # the record beside the folder is written after protect returns
        return result

    monkeypatch.setattr(ueguard.sdk, "protect", slow_protect)
    said = []
    row = bench.Variant("lsp", "lsp")
    first, second = _race(*[lambda: bench.protected_folder(row, None, folders[0], cache, tiny, 0, said.append)] * 2)
    assert len(made) == 1 and first[0] == second[0] == made[0]
    assert first[1]["ok"] == second[1]["ok"] == 10
    assert any("waiting for another reproduce process" in m for m in said)


def test_cached_reports_are_parsed_once_per_version_of_the_file(bench, cell_setup):
    """A render asks every cell's question of every report; each file is parsed once until it changes,
    and a rewritten report (another battery finished into it) is read again, not served stale."""
    import json

    scale, folders, cells, _ = cell_setup
    recipe = {"arch": "resnet18_cifar_slim", "epochs": 3, "budget": "quick", "seed": 0, "weights": None,
              "size": 32, "batch_size": 16, "lr": None}
    constants = {d: bench.defense_constants(d, "quick", {}) for d in ("none", "gray")}
    for name in ("a", "b", "c"):
        (cells / f"verify-emn-{name}-s0.json").write_text(json.dumps(_fake_report(folders, "none", "scratch", {})))
    data = (str(folders.task_train), str(folders.task_test))
    bench.cells._read_report.cache_clear()
    for _ in range(4):
        assert list(bench.cached_runs(cells, "emn", 0, recipe, data, constants)) == [("scratch", "none")]
    assert bench.cells._read_report.cache_info().misses == 3
    grown = _fake_report(folders, "none", "scratch", {})
    grown["runs"].append({"paradigm": "scratch", "defense": "gray", "defense_config": constants["gray"],
                          "test_accuracy": 0.25})
    (cells / "verify-emn-b-s0.json").write_text(json.dumps(grown))
    found = bench.cached_runs(cells, "emn", 0, recipe, data, constants)
    assert sorted(found) == [("scratch", "gray"), ("scratch", "none")] and found[("scratch", "gray")]["test_accuracy"] == 0.25
    assert bench.cells._read_report.cache_info().misses == 4
    assert bench.cells._read_report.cache_info().maxsize is not None  # superseded versions do not pile up


def test_the_disjoint_prior_is_trained_only_where_a_column_needs_it(bench, tmp_path, monkeypatch):
    """SSC's scratch column is protected against the disjoint prior, so an SSC row with ``scratch`` trains it
    even under ``--priors user``; without ``scratch`` and without the disjoint column nothing needs it."""
    import ueguard.sdk

    root = fake_cifar(tmp_path / "data")
    tiny = bench.Scale("quick", train_per_class=4, test_per_class=2, prior_per_class=4, prior_epochs=1, epochs=2,
                       budget="quick", scratch_arch="resnet18_cifar_slim", batch_size=8)
    monkeypatch.setitem(bench.SCALES, "quick", tiny)
    pretrained = []

    def fake_prior(folders, cache, scale, seed):
        pretrained.append(seed)
        return bench.Prior("disjoint", tmp_path / f"prior-s{seed}.pth", "resnet20_cifar", 0.7)

    monkeypatch.setattr(bench.data, "pretrain_disjoint_prior", fake_prior)
    protected = []

    def fake_protected(row, prior, folders, cache, scale, seed, log):
        protected.append((row.name, prior.name))
        return tmp_path / f"{row.name}-{prior.name}", {"prior": prior.name, "seconds": 1.0}

    monkeypatch.setattr(bench.cells, "protected_folder", fake_protected)

    def fake_verify(train, test, *, json_path, resume=False, **options):
        return write_fake_report(bench, train, test, json_path, options, 0.5)

    monkeypatch.setattr(ueguard.sdk, "verify", fake_verify)
    monkeypatch.setattr(bench.render, "plot", lambda results, columns, stem: [])
    weights = tmp_path / "user.pth"
    weights.write_bytes(b"")
    common = ["--quick", "--methods", "ssc", "--priors", "user", "--weights", str(weights), "--weights-arch",
              "resnet20_cifar", "--defenses", "none", "--data", str(root), "--cache", str(tmp_path / "cache"),
              "--json", str(tmp_path / "r.json")]
    bench.main(common + ["--paradigms", "finetune"])
    assert pretrained == [] and protected == [("ssc", "user")]
    bench.main(common + ["--paradigms", "scratch,finetune"])
    assert pretrained == [0] and protected[1:] == [("ssc", "disjoint"), ("ssc", "user")]


def _results_file(rows: dict[str, list[dict[str, float]]], *, time: str = "2026-12-03T10:00:00+0000",
                  tag: str = "cpu-a68e896e", protections: dict | None = None, cpu: str = "AMD EPYC") -> dict:
    """A reproduce results file as the script writes one: ``rows[row]`` one {column: accuracy} per seed."""
    cell = lambda acc: {"accuracy": acc, "peak": acc, "history": [acc], "seconds": 1.0}  # noqa: E731
    return {"bench": "reproduce", "scale_tag": tag, "time": time, "command": "python bench/reproduce.py --cpu",
            "environment": {"cpu": cpu}, "priors": {"disjoint": {"note": "a prior"}},
            "protections": protections or {},
            "results": {row: [{c: cell(a) for c, a in seed.items()} for seed in seeds] for row, seeds in rows.items()}}


def test_merge_takes_each_cell_from_the_last_file_that_measured_it(bench):
    older = _results_file({"clean": [{"scratch/none": 80.0, "finetune·disjoint/none": 70.0}],
                           "emn": [{"scratch/none": 40.0, "scratch/staged": 60.0}],
                           "emn-bf16": [{"scratch/none": 41.0}]})  # a variant: a constant search, left out
    newer = _results_file({"clean": [{"finetune·disjoint/none": 75.0}, {"finetune·disjoint/none": 77.0}],
                           "emn": [{"finetune·disjoint/none": 60.0}, {"finetune·disjoint/none": 64.0}],
                           "bait": [{"frozen·disjoint/none": 30.0}]}, cpu="Xeon")
    merged = bench.merge_records([("old.json", older), ("new.json", newer)])
    assert list(merged["results"]) == ["clean", "emn", "bait"]  # protocol row order, variants out
    assert merged["columns"] == ["scratch/none", "scratch/staged", "finetune·disjoint/none", "frozen·disjoint/none"]
    notes = merged["notes"]
    assert notes["clean", "scratch/none"] == "¹" and notes["clean", "finetune·disjoint/none"] == "²"
    assert notes["emn", "scratch/staged"] == "¹" and notes["bait", "frozen·disjoint/none"] == "²"
    # the newer file's cell holds all of its seeds; the older one's fills the gap on seed 0's row
    emn = merged["results"]["emn"]
    assert [s.get("finetune·disjoint/none", {}).get("accuracy") for s in emn] == [60.0, 64.0]
    assert emn[0]["scratch/none"]["accuracy"] == 40.0 and "scratch/none" not in emn[1]
    assert [s["used"] for s in merged["sources"]] == [True, True] and merged["sources"][1]["cpu"] == "Xeon"
    table = bench.render_table(merged["results"], merged["columns"], notes=notes, transpose=True).splitlines()
    assert table[0] == "| paradigm / defense | clean | emn | bait |"
    assert table[2] == "| scratch/none | 80.0¹ [94.7] | 40.0¹ [21.1] | — |"
    assert table[4] == "| finetune·disjoint/none | 76.0 ± 1.4² | 62.0 ± 2.8² | — |"
    # every distinct victim run, for how far a cell moves between runs
    assert merged["runs"]["clean", "finetune·disjoint/none"] == [70.0, 75.0, 77.0]
    assert merged["runs"]["emn", "scratch/none"] == [40.0]
    spread = bench.render_spread(merged["runs"], list(merged["results"]), merged["columns"]).splitlines()
    assert spread == ["| paradigm / defense | clean | emn | bait |", "|---|---:|---:|---:|",
                      "| finetune·disjoint/none | 70.0–77.0 (3) | 60.0–64.0 (2) | — |"]
    # a file that re-renders the same cached runs adds marks, not runs
    again = bench.merge_records([("old.json", older), ("new.json", newer), ("again.json", newer)])
    assert again["runs"]["clean", "finetune·disjoint/none"] == [70.0, 75.0, 77.0]
    assert again["notes"]["clean", "finetune·disjoint/none"] == "³"
    # the other order: the older file's finetune cells win
    flipped = bench.merge_records([("new.json", newer), ("old.json", older)])
    assert flipped["results"]["clean"][0]["finetune·disjoint/none"]["accuracy"] == 70.0
    assert flipped["notes"]["bait", "frozen·disjoint/none"] == "¹"


def test_merge_leaves_out_rows_made_under_former_defaults(bench, monkeypatch):
    """SSC's defaults changed (revision 2) at REVISION_LANDED: a file written before it holds revision-1 SSC
    and is left out of the merge, with the reason; a recorded ``defaults_revision`` is believed over the time."""
    before = _results_file({"clean": [{"scratch/none": 80.0}], "ssc": [{"scratch/none": 20.0}]},
                           time="2026-12-02T05:00:00+0000")
    after = _results_file({"ssc": [{"finetune·disjoint/none": 30.0}]}, time="2026-12-02T06:00:00+0000")
    recorded_old = _results_file({"ssc": [{"frozen·disjoint/none": 50.0}]}, time="2026-12-03T06:00:00+0000",
                                 protections={"ssc@disjoint-s0": {"row": "ssc-deceive", "defaults_revision": 1}})
    recorded_new = _results_file({"ssc": [{"linear·disjoint/none": 55.0}]}, time="2026-11-01T06:00:00+0000",
                                 protections={"ssc@disjoint-s0": {"row": "ssc-plain", "defaults_revision": 2},
                                              "ssc-plain@disjoint-s0": {"row": "ssc-plain", "defaults_revision": 1}})
    merged = bench.merge_records([("a.json", before), ("b.json", after), ("c.json", recorded_old),
                                  ("d.json", recorded_new)])
    assert sorted({c for s in merged["results"]["ssc"] for c in s}) == ["finetune·disjoint/none",
                                                                        "linear·disjoint/none"]
    assert merged["results"]["clean"][0]["scratch/none"]["accuracy"] == 80.0  # clean has no defaults to change
    assert merged["dropped"] == ["a.json: ssc (made under defaults revision 1; now 2)",
                                 "c.json: ssc (made under defaults revision 1; now 2)"]
    assert [s["used"] for s in merged["sources"]] == [True, True, False, True]
    from ueguard.methods import METHODS

    monkeypatch.setattr(METHODS.get("ssc"), "defaults_revision", 3)  # a third revision drops them all
    assert "ssc" not in bench.merge_records([("b.json", after), ("d.json", recorded_new)])["results"]


def test_merge_refuses_files_it_cannot_put_in_one_table(bench, tmp_path):
    quick = _results_file({"clean": [{"scratch/none": 80.0}]}, tag="quick-1234")
    cpu = _results_file({"clean": [{"scratch/none": 81.0}]})
    with pytest.raises(SystemExit, match=r"--merge b\.json: scale quick-1234, but a\.json is cpu-a68e896e"):
        bench.merge_records([("a.json", cpu), ("b.json", quick)])
    with pytest.raises(SystemExit, match=r"--merge bench\.json: not a results file of bench/reproduce\.py"):
        bench.merge_records([("a.json", cpu), ("bench.json", {"bench": "kernels", "results": {}})])
    with pytest.raises(SystemExit, match="at least one"):
        bench.merge_records([])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(SystemExit, match=r"broken\.json: cannot read it as JSON"):
        bench.main(["--merge", str(broken), "--json", str(tmp_path / "m.json")])


def test_merge_cli_writes_the_table_json_and_plots_and_trains_nothing(bench, tmp_path, monkeypatch):
    import json

    import ueguard.sdk

    monkeypatch.setattr(ueguard.sdk, "verify", lambda *a, **k: pytest.fail("a merge trained a model"))
    monkeypatch.setattr(ueguard.sdk, "protect", lambda *a, **k: pytest.fail("a merge protected a folder"))
    plotted = []
    monkeypatch.setattr(bench.render, "plot", lambda results, columns, stem: plotted.append((list(results), stem)) or [])
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_results_file({"clean": [{"scratch/none": 80.0}], "emn": [{"scratch/none": 40.0}]})))
    b.write_text(json.dumps(_results_file({"emn": [{"scratch/none": 45.0}]})))
    out = tmp_path / "m.json"
    bench.main(["--merge", f"{a},{b}", "--methods", "clean,emn", "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["bench"] == "reproduce-merge" and record["scale_tag"] == "cpu-a68e896e"
    assert record["notes"] == {"clean|scratch/none": "¹", "emn|scratch/none": "²"}
    assert "| scratch/none | 80.0¹ [94.7] | 45.0² [21.1] |" in record["table"]
    assert record["command"].startswith("python bench/reproduce.py --merge ")
    text = out.with_suffix(".md").read_text()
    assert record["table"] in text and "¹ `a.json`" in text and "² `b.json`" in text
    assert "| scratch/none | — | 40.0–45.0 (2) |" in text and record["runs"]["emn|scratch/none"] == [40.0, 45.0]
    assert plotted == [(["clean", "emn"], tmp_path / "m")]
    with pytest.raises(SystemExit, match="--methods: unknown nope"):
        bench.main(["--merge", str(a), "--methods", "nope", "--json", str(out)])


def test_a_protection_record_names_its_defaults_revision(bench, tmp_path, monkeypatch):
    """What a results file says of a protection carries the method's defaults revision, made now or found in
    the cache, so a later merge reads the revision instead of guessing it from the file's time."""
    import json

    from ueguard.methods import METHODS

    folders = bench.Folders(*(tmp_path / n for n in ("tt", "te", "pt", "pe")))
    prior = bench.Prior("disjoint", tmp_path / "p.pth", "resnet20_cifar", 0.7)
    made = []

    def fake_protect(row, prior, train, out, options, log):
        made.append(out.name)
        out.mkdir()
        record = {"method": row.method, "row": row.name, "prior": prior.name, "options": options}
        (out.parent / f"{out.name}.json").write_text(json.dumps(record))
        return record

    monkeypatch.setattr(bench.cells, "_protect", fake_protect)
    found = iter([None, "now"])
    monkeypatch.setattr(bench.cells, "cached_protection",
                        lambda cells, out, *a: out if next(found) == "now" else None)
    scale = bench.SCALES["quick"]
    ssc = bench.Variant("ssc", "ssc", {})
    _, record = bench.protected_folder(ssc, prior, folders, tmp_path / "cache", scale, 0, lambda m: None)
    assert made == ["ssc@disjoint-s0"] and record["defaults_revision"] == METHODS.get("ssc").defaults_revision
    _, again = bench.protected_folder(ssc, prior, folders, tmp_path / "cache", scale, 0, lambda m: None)
    assert made == ["ssc@disjoint-s0"] and again["defaults_revision"] == record["defaults_revision"]


def test_cached_only_renders_a_row_whose_protection_is_not_cached_as_empty(bench, tmp_path, monkeypatch):
    """A render of what the cache holds must not stop at a row never protected (its cells stay empty, the
    other rows' cached cells render and the plots are made), nor protect it."""
    import json

    import ueguard.sdk

    root = fake_cifar(tmp_path / "data")
    tiny = bench.Scale("quick", train_per_class=4, test_per_class=2, prior_per_class=4, prior_epochs=1, epochs=2,
                       budget="quick", scratch_arch="resnet18_cifar_slim", batch_size=8)
    monkeypatch.setitem(bench.SCALES, "quick", tiny)
    monkeypatch.setattr(bench.cells, "CACHED_ONLY", False)  # main sets it: restored after this test
    monkeypatch.setattr(ueguard.sdk, "verify", lambda train, test, *, json_path, resume=False, **options:
                        write_fake_report(bench, train, test, json_path, options, 0.5))
    monkeypatch.setattr(ueguard.sdk, "protect", lambda *a, **k: pytest.fail("--cached-only protected a row"))
    plotted = []
    monkeypatch.setattr(bench.render, "plot", lambda results, columns, stem: plotted.append(stem) or [])
    common = ["--quick", "--paradigms", "scratch", "--defenses", "none", "--data", str(root),
              "--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "r.json")]
    bench.main(common + ["--methods", "clean"])
    plotted.clear()
    bench.main(common + ["--methods", "clean,lsp", "--cached-only"])
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["results"]["clean"][0]["scratch/none"]["accuracy"] == 50.0
    assert record["results"]["lsp"] == [] and plotted
