"""bench/defenses.py's CIFAR-10 mode, with reproduce's data, protection and verify steps faked: which
defenses it asks for and in what order, the verdict over the battery, and the table."""

from __future__ import annotations

import argparse

import pytest

from conftest import load_bench

pytestmark = pytest.mark.slow  # a benchmark script's tests: not in the fast subset (-m "not slow")


@pytest.fixture(scope="module")
def bench():
    return load_bench("defenses")


def test_cifar_battery_runs_every_defense_at_last_and_judges_the_worst(bench, monkeypatch, tmp_path):
    import reproduce

    accuracy = {"none": 0.30, "staged": 0.45, "at": 0.70, "at4": 0.40}  # clean 0.80, chance 0.2
    asked = []

    def run(defense):
        return {"defense": defense, "paradigm": "scratch", "test_accuracy": accuracy.get(defense, 0.35),
                "final_test_accuracy": accuracy.get(defense, 0.35), "peak_test_accuracy": 0.9, "selected_epoch": 3,
                "seconds": 1.0, "history": [{"epoch": 1, "test_accuracy": 0.2}], "train_images": 10}

    def verify_cell(row, group, folder, folders, prior, paradigms, defenses, cells, scale, seed, log, *rest):
        asked.append((row, group, list(defenses), scale.name))
        return {"runs": [dict(run(d), test_accuracy=0.80) if row == "clean" else run(d) for d in defenses]}

    folders = reproduce.Folders(tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "d")
    monkeypatch.setattr(reproduce, "convert", lambda data, cache, scale, seed: folders)
    monkeypatch.setattr(reproduce, "protected_folder", lambda row, prior, folders, cache, scale, seed, log: (
        tmp_path / row.name, {"max_linf_255": 8.0, "ok": 10, "seconds": 2.0}))
    monkeypatch.setattr(reproduce, "verify_cell", verify_cell)
    args = argparse.Namespace(quick=True, defenses="all", data=tmp_path, cache=tmp_path, seed=0)

    out = bench.cifar_batteries(args, ["emn"], lambda message: None)
    assert asked[0] == ("clean", "scratch", ["none"], "quick")
    defenses = asked[1][2]
    assert defenses[0] == "none" and defenses[-2:] == ["at", "at4"]  # the ~11× dearer runs last
    assert set(defenses) == {"none", "at", "at4", "bdr", "classalign", "classmean", "earlystop", "gray", "jpeg", "staged", "ueraser"}
    battery = out["methods"]["emn"]["battery"]
    assert battery["clean_accuracy"] == 0.80
    assert battery["worst"] == {"defense": "at", "test_accuracy": 0.70}
    assert battery["protected"] is False  # at: 0.70 - 0.2 > 0.5 · (0.80 - 0.2)
    table = bench.table(out)
    assert "| staged | 45.0 | 90.0 | 1.50 | 1 |" in table and "clean baseline 80.0 %" in table


def test_cifar_mode_refuses_the_digits_tau_sweep(bench):
    with pytest.raises(SystemExit):
        bench.main(["--cifar", "--taus", "0.5", "--json", "/dev/null"])
