"""``verify`` end to end: real training runs on small folders, the report and the verdict rule."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from trees import write_class_tree
from ueguard.cli import main
from ueguard.errors import UsageError
from ueguard.models import create_model, save_checkpoint
from ueguard.sdk import protect, verify
from ueguard.sdk.verify import verdict

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
