"""verify's recipe search: when the default recipe's clean model does not learn, verify chooses the learning rate
and epochs on a held-out split of the clean *training* images (never the test set), trains the clean and the
protected images with that recipe and says so; when nothing learns it says what to try."""

from __future__ import annotations

import importlib
import json

import pytest
from click.testing import CliRunner

from trees import write_class_tree
from ueguard.cli import main
from ueguard.defenses.base import Scratch
from ueguard.display import format_report
from ueguard.errors import UsageError
from ueguard.sdk import verify
from ueguard.sdk.recipe_search import EPOCH_FACTOR, LR_FACTORS, Candidate, advice, first_tier, search, second_tier

VERIFY = importlib.import_module("ueguard.sdk.verify")
SMALL = dict(budget="quick", device="cpu", size=16, batch_size=16, arch="resnet20_cifar")


def _learns_at(good: set[tuple[float, int]], scores: dict[tuple[float, int], float] | None = None):
    """A stand-in trial: 0.9 for the (lr, epochs) in ``good`` (or the given score), chance (1/3) otherwise."""
    calls = []

    def trial(c: Candidate) -> float:
        calls.append((c.lr, c.epochs))
        return (scores or {}).get((c.lr, c.epochs), 0.9 if (c.lr, c.epochs) in good else 1 / 3)
    return trial, calls


def learned(accuracy: float) -> bool:
    return accuracy - 1 / 3 >= 0.1


def test_tiers_are_bounded_and_respect_the_ceiling():
    assert first_tier(1e-3, 10, ceiling=0.1) == [Candidate(1e-2, 10), Candidate(0.1, 10), Candidate(1e-4, 10)]
    assert first_tier(0.1, 10, ceiling=0.1) == [Candidate(0.01, 10)]  # 1 and 10 would make SGD diverge
    assert second_tier(0.1, 10, Candidate(0.01, 10)) == [Candidate(0.1, 10 * EPOCH_FACTOR),
                                                         Candidate(0.01, 10 * EPOCH_FACTOR)]
    assert second_tier(0.1, 10, Candidate(0.1, 10)) == [Candidate(0.1, 10 * EPOCH_FACTOR)]
    assert len(first_tier(1e-3, 10, 0.1)) + len(second_tier(1e-3, 10, Candidate(0.1, 10))) <= len(LR_FACTORS) + 2


def test_search_stops_at_the_first_tier_that_learns_and_takes_its_best():
    trial, calls = _learns_at(set(), {(1e-2, 10): 0.6, (0.1, 10): 0.8})
    found = search(trial, 1e-3, 10, 0.1, learned)
    assert found["chosen"] == {"lr": 0.1, "epochs": 10} and calls == [(1e-2, 10), (0.1, 10), (1e-4, 10)]
    assert [t["learned"] for t in found["tried"]] == [True, True, False]


def test_search_trains_longer_only_when_no_rate_learns():
    trial, calls = _learns_at({(1e-3, 40)}, {(1e-2, 10): 0.4})  # 1e-2 is tier 1's best, not good enough
    found = search(trial, 1e-3, 10, 0.1, learned)
    assert calls == [(1e-2, 10), (0.1, 10), (1e-4, 10), (1e-3, 40), (1e-2, 40)]
    assert found["chosen"] == {"lr": 1e-3, "epochs": 40} and [t["tier"] for t in found["tried"]] == [1, 1, 1, 2, 2]
    trial, _ = _learns_at(set())
    assert search(trial, 1e-3, 10, 0.1, learned)["chosen"] is None


def test_advice_names_only_what_this_run_did_not_already_have():
    tips = advice(400, 10, 32, pretrained_paradigm=False, budget="quick")
    assert "about 40 per class" in tips and "--paradigm finetune" in tips and "--size" in tips and "--budget" in tips
    tips = advice(400, 10, 64, pretrained_paradigm=True, budget="thorough")
    assert "more images" in tips and "--paradigm" not in tips and "--size" not in tips and "--budget" not in tips


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-search") / "photos"
    write_class_tree(root, n_per_class=12, classes=3, size=20, seed=0)
    return root


@pytest.fixture
def fits(monkeypatch):
    """Every training run verify starts: (its label, its FitConfig, the sample ids it trains and tests on)."""
    calls, real_fit = [], VERIFY.fit

    def recording(model, data, test, cfg, **kwargs):
        calls.append({"desc": kwargs["desc"], "lr": cfg.lr, "epochs": cfg.epochs, "train": set(data.ids),
                      "test": set(test.ids)})
        return real_fit(model, data, test, cfg, **kwargs)

    monkeypatch.setattr(VERIFY, "fit", recording)
    return calls


def test_a_default_that_learns_is_kept_and_nothing_is_searched(photos, fits, monkeypatch):
    """The default path (the demo's) is unchanged: the default recipe's two runs and nothing else. (lr 0.01 for
    twelve epochs: a recipe measured to learn these folders, and cheaper than the 0.1 one-cycle needs here.)"""
    monkeypatch.setattr(Scratch, "default_lr", 0.01)
    monkeypatch.setitem(VERIFY.EPOCHS, "quick", 12)
    report = verify(photos, clean=photos, **SMALL)
    assert report["recipe_search"]["scratch"]["status"] == "default" and "advice" not in report["recipe_search"]["scratch"]
    # the clean baseline, then the protected run (the progress line's stage names which; fit's desc is "training")
    assert [(c["desc"], c["lr"], c["epochs"]) for c in fits] == [("training", 0.01, 12), ("training", 0.01, 12)]
    assert "recipe (" not in format_report(report)


def test_a_default_that_cannot_learn_is_replaced_by_a_recipe_chosen_off_the_test_set(photos, fits, monkeypatch,
                                                                                     tmp_path):
    """lr 1e-4 for three epochs cannot learn; the search finds a rate and epochs that do on a split of the clean
    training images, and the clean and the protected images are both trained with them."""
    monkeypatch.setattr(Scratch, "default_lr", 1e-4)
    monkeypatch.setitem(VERIFY.EPOCHS, "quick", 3)
    report = verify(photos, clean=photos, json_path=tmp_path / "r.json", report_dir=tmp_path / "rep", **SMALL)
    info = report["recipe_search"]["scratch"]
    assert info["status"] == "searched" and info["default"]["lr"] == 1e-4 and info["default"]["epochs"] == 3
    assert info["default"]["test_accuracy"] - report["chance"] < 0.1  # the default really did not learn
    chosen = info["chosen"]
    assert chosen in [{"lr": t["lr"], "epochs": t["epochs"]} for t in info["tried"] if t["learned"]]
    assert max(t["val_accuracy"] for t in info["tried"]) == next(
        t["val_accuracy"] for t in info["tried"] if {"lr": t["lr"], "epochs": t["epochs"]} == chosen)
    run = report["runs"][0]
    assert (run["lr"], run["epochs"]) == (chosen["lr"], chosen["epochs"]) and report["protected"] is not None
    assert (report["baselines"]["scratch"]["lr"], report["baselines"]["scratch"]["epochs"]) == (run["lr"], run["epochs"])
    # The search never saw the test images: it trained and scored inside the clean training set, disjoint splits.
    held_out = {f.rsplit(".", 1)[0] for f in report["data"]["holdout"]["files"]}
    clean_train = fits[0]["train"]
    trials = [c for c in fits if c["desc"].startswith("recipe search")]
    assert len(trials) == len(info["tried"]) and trials
    for c in trials:
        assert c["test"] | c["train"] == clean_train and not c["test"] & c["train"]
        assert not {i.rsplit(".", 1)[0] for i in c["test"] | c["train"]} & held_out
        assert len(c["test"]) == info["split"]["val_images"]
    assert [(c["desc"], c["lr"], c["epochs"]) for c in fits[-2:]] == [  # the clean baseline, then the protected run
        ("training", chosen["lr"], chosen["epochs"]), ("training", chosen["lr"], chosen["epochs"])]
    assert json.loads((tmp_path / "r.json").read_text())["recipe_search"] == json.loads(json.dumps(report["recipe_search"]))
    line = f"chose lr {chosen['lr']:g}, {chosen['epochs']} epochs"
    assert line in format_report(report) and line in (tmp_path / "rep" / "summary.md").read_text()
    # Resumed, the search is not run again and gives the same recipe.
    fits.clear()
    again = verify(photos, clean=photos, json_path=tmp_path / "r.json", resume=True, **SMALL)
    assert not fits and again["recipe_search"]["scratch"]["chosen"] == chosen
    assert again["runs"][0]["test_accuracy"] == run["test_accuracy"]


def test_when_no_recipe_learns_the_report_says_what_to_try(photos, fits, monkeypatch, tmp_path):
    monkeypatch.setattr(Scratch, "default_lr", 1e-9)
    monkeypatch.setitem(VERIFY.EPOCHS, "quick", 1)
    args = ["verify", str(photos), "--clean", str(photos), "--budget", "quick", "--size", "16", "--batch-size", "16",
            "--arch", "resnet20_cifar", "--device", "cpu", "--json", str(tmp_path / "r.json"), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "r.json").read_text())["recipe_search"]["scratch"]
    assert info["status"] == "none learned" and info["chosen"] is None
    assert [t["epochs"] for t in info["tried"]] == [1, 1, 1, EPOCH_FACTOR, EPOCH_FACTOR]
    assert "no verdict" in result.output and "none of the 5 recipes tried learned" in result.output
    for tip in ("more images", "about 10 per class", "--paradigm finetune", "--weights", "--size"):
        assert tip in info["advice"] and tip in result.output, tip
    fits.clear()
    off = CliRunner().invoke(main, [*args[:-3], "--json", str(tmp_path / "off.json"), "--recipe-search", "off", "-q"])
    assert off.exit_code == 0, off.output
    assert len(fits) == 2 and "--recipe-search off" in off.output and "more images" in off.output
    bad = CliRunner().invoke(main, [*args, "--recipe-search", "maybe"])
    assert bad.exit_code == 2 and "recipe-search" in bad.output


def test_an_explicit_rate_or_epochs_is_trained_as_given(photos, fits, monkeypatch):
    monkeypatch.setattr(Scratch, "default_lr", 1e-9)
    report = verify(photos, clean=photos, epochs=1, **SMALL)
    assert report["recipe_search"]["scratch"]["status"] == "given" and len(fits) == 2
    with pytest.raises(UsageError, match="recipe_search"):
        verify(photos, clean=photos, recipe_search="sometimes", **SMALL)
