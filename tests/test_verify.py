"""``verify`` end to end: real training runs on small folders, the report and the verdict rule."""

from __future__ import annotations

import importlib
import json
import math
from collections import Counter
from pathlib import Path, PurePosixPath

import pytest
from click.testing import CliRunner

from trees import write_class_tree
from ueguard.cli import main
from ueguard.data.folder import FolderEntry, FolderListing, scan_folder
from ueguard.display import format_report
from ueguard.errors import UsageError
from ueguard.models import create_model, save_checkpoint
from ueguard.sdk import protect, verify
from ueguard.sdk.holdout import hold_out_test, leave_out
from ueguard.sdk.verify import stalled, verdict

TINY = dict(budget="quick", epochs=2, device="cpu", size=16, batch_size=16)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("verify")
    write_class_tree(base / "train", n_per_class=12, classes=3, size=20, seed=0)
    write_class_tree(base / "test", n_per_class=4, classes=3, size=20, seed=1)
    protect(base / "train", base / "protected", budget="quick", size=16, device="cpu",
            method_options={"max_rounds": 2, "pgd_steps": 2})
    return base


def test_verify_writes_a_well_formed_report(folders, tmp_path):
    report = verify(folders / "protected", folders / "test", clean=folders / "train", json_path=tmp_path / "r.json", **TINY)
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for key in ("defense", "paradigm", "arch", "test_accuracy", "clean_accuracy", "chance", "protected", "history",
                "runs", "worst", "rule"):
        assert key in report, key
    assert report["defense"] == "none" and report["paradigm"] == "scratch" and report["chance"] == pytest.approx(1 / 3)
    assert len(report["history"]) == 2 and set(report["history"][0]) >= {"epoch", "train_loss", "train_accuracy",
                                                                          "test_accuracy"}
    assert 0 <= report["test_accuracy"] <= 1 and 0 <= report["clean_accuracy"] <= 1
    assert report["data"]["train_images"] == 36 and report["data"]["test_images"] == 12
    assert report["data"]["holdout"] is None  # --test given: used as it is, nothing held out


def test_arch_and_seed_are_used_and_recorded(folders):
    """--arch picks the trained architecture; --seed makes a run repeatable and a different seed differs."""
    options = {**TINY, "arch": "resnet20_cifar"}
    a = verify(folders / "protected", folders / "test", seed=3, **options)
    b = verify(folders / "protected", folders / "test", seed=3, **options)
    c = verify(folders / "protected", folders / "test", seed=4, **options)
    assert a["arch"] == "resnet20_cifar" and a["config"]["arch"] == "resnet20_cifar" and a["config"]["seed"] == 3
    losses = lambda r: [h["train_loss"] for h in r["history"]]  # noqa: E731
    assert losses(a) == losses(b) and losses(a) != losses(c)


def test_without_clean_there_is_no_verdict(folders):
    report = verify(folders / "protected", folders / "test", **TINY)
    assert report["clean_accuracy"] is None and report["protected"] is None


def test_verdict_rule():
    assert verdict(0.30, 0.95, 0.1, 0.5) is True       # far below clean
    assert verdict(0.80, 0.95, 0.1, 0.5) is False      # close to clean
    assert verdict(0.30, None, 0.1, 0.5) is None       # no baseline
    assert verdict(0.12, 0.15, 0.1, 0.5) is None       # clean model did not learn
    assert verdict(0.10, 0.95, 0.1, 0.5, stalled=True) is None    # chance from a failed recipe: no evidence
    assert verdict(0.90, 0.95, 0.1, 0.5, stalled=True) is False   # stalled, yet it learned the task: broken


#: (final train loss, final train accuracy) of the eleven adversarial-training batteries of
#: ``bench/reproduce.py --cpu`` (5 classes, 2,500 images, 15 epochs): the two from the akamaster prior fell to
#: the uniform predictor (test accuracy 20.0 % for clean and SSC data alike); the nine others trained.
MEASURED_AT = {"clean/akamaster/finetune": (1.61091, 0.17188), "ssc/akamaster/finetune": (1.61092, 0.15986),
               "clean/disjoint/finetune": (1.37577, 0.38902), "clean/disjoint/frozen": (1.54293, 0.28606),
               "emn/disjoint/finetune": (1.31732, 0.42468), "emn/disjoint/frozen": (1.51455, 0.31611),
               "ssc/disjoint/finetune": (1.35846, 0.39904), "ssc/disjoint/frozen": (1.53049, 0.30288),
               "bait/disjoint/finetune": (1.29567, 0.42508), "clean/scratch": (1.18791, 0.49359),
               "ssc/scratch": (1.17327, 0.49639)}


def test_stall_rule_flags_exactly_the_collapsed_adversarial_runs():
    flagged = {name for name, (loss, acc) in MEASURED_AT.items()
               if stalled([{"epoch": 0, "train_loss": 9.0, "train_accuracy": 0.0},
                           {"epoch": 1, "train_loss": loss, "train_accuracy": acc}], 0.2)}
    assert flagged == {"clean/akamaster/finetune", "ssc/akamaster/finetune"}
    assert not stalled([{"epoch": 1, "train_loss": 1.61, "train_accuracy": 0.0},     # stalled once, then learned
                        {"epoch": 2, "train_loss": 0.4, "train_accuracy": 0.9}], 0.2)
    assert not stalled([{"epoch": 1, "train_loss": 0.05, "train_accuracy": 0.2}], 0.2)  # fits noise: protected, not stalled


def test_a_stalled_run_has_no_verdict_and_the_report_says_why(folders, monkeypatch, tmp_path):
    """The adversarial run's last epoch is replaced by the akamaster collapse (at K = 3: train loss ln 3,
    accuracy 0): whatever its test accuracy, it must not count as protected; the standard run keeps its verdict."""
    module = importlib.import_module("ueguard.sdk.verify")
    real_fit = module.fit

    def collapsing(model, data, test, cfg, *, defense, **kwargs):
        history = real_fit(model, data, test, cfg, defense=defense, **kwargs)
        if defense.name == "at":
            history[-1].update(train_loss=round(math.log(3), 5), train_accuracy=0.0)
        return history

    monkeypatch.setattr(module, "fit", collapsing)
    report = verify(folders / "protected", folders / "test", clean=folders / "train", defense="none,at",
                    defense_options={"at.steps": 1}, report_dir=tmp_path / "report", **TINY)
    runs = {r["defense"]: r for r in report["runs"]}
    assert runs["at"]["stalled"] and not runs["none"]["stalled"]
    for run in runs.values():
        assert run["protected"] is verdict(run["test_accuracy"], run["clean_accuracy"], report["chance"], 0.5,
                                           run["stalled"])
    assert runs["at"]["protected"] is not True
    assert report["stalled"] == [{"defense": "at", "paradigm": "scratch"}] and report["protected"] is not True
    assert "stalled" in report["rule"]
    assert "stalled: at/scratch ended at or below chance" in format_report(report)
    assert "Stalled: `at` / `scratch`" in (tmp_path / "report" / "summary.md").read_text()


def test_finetune_needs_weights_and_uses_them(folders, tmp_path):
    with pytest.raises(UsageError, match="pretrained"):
        verify(folders / "protected", folders / "test", paradigm="finetune", **TINY)
    weights = tmp_path / "prior.pt"
    save_checkpoint(create_model("resnet18_cifar_slim", 10), weights)
    report = verify(folders / "protected", folders / "test", paradigm="finetune", weights=str(weights), **TINY)
    assert report["paradigm"] == "finetune" and report["runs"][0]["lr"] == pytest.approx(1e-3)


def test_cli_prints_a_table_and_rejects_unknown_names(folders, tmp_path):
    args = ["verify", str(folders / "protected"), "--test", str(folders / "test"), "--clean", str(folders / "train"),
            "--budget", "quick", "--epochs", "1", "--size", "16", "--device", "cpu", "--json", str(tmp_path / "v.json"), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "protected-trained" in result.output and "rule:" in result.output and (tmp_path / "v.json").exists()
    bad = CliRunner().invoke(main, [*args, "--defense", "magic"])
    assert bad.exit_code == 2 and "valid defenses" in bad.output and "none" in bad.output
    bad = CliRunner().invoke(main, [*args, "--paradigm", "magic"])
    assert bad.exit_code == 2 and "scratch" in bad.output


def test_defenses_command_lists_registry():
    result = CliRunner().invoke(main, ["defenses"])
    assert result.exit_code == 0 and "none" in result.output and "scratch" in result.output and "finetune" in result.output


def test_test_folder_with_unknown_class_is_refused(folders, tmp_path):
    write_class_tree(tmp_path / "other", n_per_class=1, classes=5, size=16)
    with pytest.raises(UsageError, match="not among the reference classes"):
        verify(folders / "protected", tmp_path / "other", **TINY)


def _stems(ids) -> set[str]:
    return {str(PurePosixPath(i).with_suffix("")) for i in ids}


def test_holdout_split_is_stratified_seeded_and_disjoint(tmp_path):
    write_class_tree(tmp_path / "orig", n_per_class=10, classes=3, size=8)
    listing = scan_folder(tmp_path / "orig")
    train, test = hold_out_test(listing, 0.2, seed=0)
    per_class = Counter(e.label for e in test.images)
    assert per_class == {0: 2, 1: 2, 2: 2}
    names = lambda part: {str(e.relpath) for e in part.images}  # noqa: E731
    assert not names(train) & names(test) and names(train) | names(test) == names(listing)
    assert names(hold_out_test(listing, 0.2, seed=0)[1]) == names(test)   # deterministic for a seed
    assert names(hold_out_test(listing, 0.2, seed=1)[1]) != names(test)   # and moves with it
    assert Counter(e.label for e in hold_out_test(listing, 0.01, seed=0)[1].images) == {0: 1, 1: 1, 2: 1}
    write_class_tree(tmp_path / "few", n_per_class=1, classes=2, size=8)
    with pytest.raises(UsageError, match="fewer than two images"):
        hold_out_test(scan_folder(tmp_path / "few"), 0.2, seed=0)


def test_holdout_leaves_out_protected_copies_by_name_whatever_their_format():
    entries = tuple(FolderEntry(PurePosixPath(p), 0) for p in ("a/x.png", "a/y.webp", "a/z.jpg"))
    listing = FolderListing(Path("p"), ("a",), entries + (FolderEntry(PurePosixPath("a/x.txt"), None, "not an image"),))
    kept = leave_out(listing, {"a/x", "a/y"})
    assert [str(e.relpath) for e in kept.images] == ["a/z.jpg"] and len(kept.skipped) == 1


def test_holdout_needs_clean_without_test_and_is_refused_beside_test(folders):
    with pytest.raises(UsageError, match="pass --test TEST, or --clean ORIGINALS"):
        verify(folders / "protected", **TINY)
    with pytest.raises(UsageError, match="--holdout"):
        verify(folders / "protected", folders / "test", clean=folders / "train", holdout=0.3, **TINY)
    with pytest.raises(UsageError, match="between 0 and 1"):
        verify(folders / "protected", clean=folders / "train", holdout=1.0, **TINY)
    result = CliRunner().invoke(main, ["verify", str(folders / "protected"), "--budget", "quick", "-q"])
    assert result.exit_code == 2 and "pass --test TEST, or --clean ORIGINALS" in result.output


def test_holdout_files_are_tested_on_in_neither_training_set_and_recorded(folders, monkeypatch, tmp_path):
    """verify PROTECTED --clean ORIGINALS without --test: the CLI and the SDK underneath it train both models
    without the held-out originals (nor their protected copies), test on exactly those, and say so."""
    module = importlib.import_module("ueguard.sdk.verify")
    real_fit, seen = module.fit, []

    def recording(model, data, test, cfg, **kwargs):
        seen.append((list(data.ids), list(test.ids)))
        return real_fit(model, data, test, cfg, **kwargs)

    monkeypatch.setattr(module, "fit", recording)
    args = ["verify", str(folders / "protected"), "--clean", str(folders / "train"), "--holdout", "0.25", "--seed", "3",
            "--budget", "quick", "--epochs", "1", "--size", "16", "--device", "cpu", "--batch-size", "16",
            "--json", str(tmp_path / "v.json"), "--report", str(tmp_path / "report"), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "v.json").read_text())
    held = report["data"]["holdout"]
    assert held["fraction"] == 0.25 and held["seed"] == 3 and held["originals"] == 36 and held["protected_left_out"] == 9
    assert Counter(name.split("/")[0] for name in held["files"]) == {"class_0": 3, "class_1": 3, "class_2": 3}
    assert len(seen) == 2  # the clean baseline and the protected run
    for train_ids, test_ids in seen:
        assert len(train_ids) == 27 and not _stems(train_ids) & _stems(held["files"])
        assert sorted(test_ids) == sorted(held["files"])
    assert report["data"]["test"] is None and report["data"]["test_images"] == 9 and report["data"]["train_images"] == 27
    assert "test set: 9 of the 36 originals held out of --clean (25 %" in result.output
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "Test set: 9 of the 36 originals held out" in summary and f"- `{held['files'][0]}`" in summary
