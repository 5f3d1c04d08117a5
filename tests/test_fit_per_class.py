"""``fit_per_class``: a class-wise method optimised on a stratified subset, its rows applied to every image."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from test_methods import make_digits, run
from trees import write_class_tree
from ueguard.cli import main
from ueguard.methods import METHODS
from ueguard.methods.base import OptionError, stratified_subset

#: The methods whose δ is one row per class, and so may be fitted on a subset.
SUBSET_FIT = ("bait", "emn", "ops", "ssc")


@pytest.fixture(scope="module")
def digits():
    return make_digits(12, 3, gray=False)  # 12 images per class


def test_stratified_subset_takes_per_class_seeded_and_in_order(digits):
    a = stratified_subset(digits, 5, seed=3)
    assert torch.bincount(a.labels).tolist() == [5, 5, 5]
    assert a.ids == stratified_subset(digits, 5, seed=3).ids  # the same seed picks the same images
    assert a.ids != stratified_subset(digits, 5, seed=4).ids
    positions = [digits.ids.index(i) for i in a.ids]
    assert positions == sorted(positions)  # the set's own order
    short = stratified_subset(digits, 50, seed=0)  # more than a class holds: all of it
    assert sorted(short.ids) == sorted(digits.ids)


@pytest.mark.parametrize("name", SUBSET_FIT)
def test_every_classwise_method_declares_the_option(name):
    assert METHODS.get(name).make_config().fit_per_class == 0  # default: optimise on every image


def test_samplewise_perturbation_refuses_a_subset_fit():
    with pytest.raises(OptionError, match="fit_per_class.*one δ per image"):
        METHODS.get("emn").make_config(perturbation="samplewise", fit_per_class=10)
    assert METHODS.get("emn").make_config(perturbation="classwise", fit_per_class=10).fit_per_class == 10


def test_subset_fit_is_the_subsets_own_perturbation_applied_to_all(digits):
    _, whole = run("ops", digits)
    _, fitted = run("ops", digits, fit_per_class=4)
    _, on_subset = run("ops", stratified_subset(digits, 4, seed=0))
    assert torch.equal(fitted.delta, on_subset.delta)  # exactly what the method makes from those images
    assert fitted.classwise and fitted.delta.shape[0] == 3
    assert fitted.info["fit_images"] == 12 and fitted.info["fit_per_class"] == 4
    assert "fit_images" not in whole.info
    everyone = torch.arange(len(digits))  # every image, in the subset or not, gets its class's row
    rows = fitted.for_samples(everyone, digits.labels, digits.grayscale)
    assert torch.equal(rows, fitted.delta[digits.labels])


def test_subset_at_least_the_largest_class_is_the_whole_set(digits):
    _, whole = run("ops", digits)
    _, same = run("ops", digits, fit_per_class=12)
    assert torch.equal(whole.delta, same.delta) and "fit_images" not in same.info


def test_protect_cli_records_the_subset_in_the_manifest(tmp_path):
    write_class_tree(tmp_path / "src", n_per_class=6, classes=3, size=16)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["protect", str(tmp_path / "src"), "--out", str(out), "--method", "ops",
                                       "-o", "fit_per_class=2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "ueguard-manifest.jsonl").read_text().splitlines()]
    generation = next(line for line in lines if line.get("kind") == "generation")
    assert generation["fit_images"] == 6 and generation["fit_per_class"] == 2
    assert len(list(out.rglob("*.png"))) == 18  # every image protected, not only the six fitted on


def test_protect_cli_refuses_a_samplewise_subset_fit_as_usage(tmp_path):
    write_class_tree(tmp_path / "src", n_per_class=2, classes=2, size=16)
    result = CliRunner().invoke(main, ["protect", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--method", "emn",
                                       "-o", "fit_per_class=1", "--device", "cpu"])
    assert result.exit_code == 2 and "fit_per_class" in result.output
