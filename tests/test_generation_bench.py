"""bench/generation.py's per-method mode: its option parsing and one method timed through the SDK."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_bench
from test_methods import make_digits

pytestmark = pytest.mark.slow  # a benchmark script's tests: not in the fast subset (-m "not slow")


def test_method_settings_parse_and_refuse_a_malformed_pair():
    bench = load_bench("generation")
    assert bench.method_settings(["ssc:fit_per_class=500", "ssc:perturbation=classwise", "bait:augment=False",
                                  "emn:step_fraction=0.2"]) == {
        "ssc": {"fit_per_class": 500, "perturbation": "classwise"}, "bait": {"augment": False},
        "emn": {"step_fraction": 0.2}}
    for bad in ("ssc", "ssc:fit_per_class", "fit_per_class=500"):
        with pytest.raises(SystemExit, match="METHOD:KEY=VALUE"):
            bench.method_settings([bad])


def test_time_method_protects_every_image_with_the_options_given():
    bench = load_bench("generation")
    data = make_digits(8, 3, gray=False)
    record = bench.time_method("ops", data, "quick", {"fit_per_class": 3}, "fastvgg_cifar", Path("unused"), 0)
    assert record["method"] == "ops" and record["images"] == 24 and record["wall_s"] >= 0
    assert record["info"]["fit_images"] == 9  # fitted on 3 per class, applied to all 24
    assert record["surrogate"] is None and record["weights"] is None  # model-free: neither is passed
