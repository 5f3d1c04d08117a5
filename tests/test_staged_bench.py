"""The pure pieces of bench/staged.py: the ACM ratio and the choice of the trigger's stage and tau."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_staged", ROOT / "bench" / "staged.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_min_ratio_is_the_lowest_fall_below_the_start_on_watched_stages_only(bench):
    curve = {"monitored": ["stem", "layer1"],
             "stages": {"stem": [2.0, 1.8, 1.0, 1.5], "layer1": [1.0, 1.2, 1.1], "layer2": [1.0, 0.1]}}
    assert bench.min_ratio(curve) == {"stem": 0.5, "layer1": 1.1}


def test_choose_tau_separates_clean_from_the_least_separated_protection(bench):
    clean = {"stem": 1.0, "layer1": 0.8, "layer2": 0.6}
    protected = {"emn": {"stem": 0.8, "layer1": 0.3, "layer2": 0.5},
                 "rem": {"stem": 0.85, "layer1": 0.4, "layer2": 0.3}}
    stage, tau, separation = bench.choose_tau(clean, protected)
    # layer1: clean 0.8 vs the worse of emn/rem 0.4 → 2.0, the best separation
    assert stage == "layer1" and separation["layer1"] == pytest.approx(2.0)
    assert tau == round(math.sqrt(0.8 * 0.4), 3)
    assert all(rows["layer1"] < tau < clean["layer1"] for rows in protected.values())  # fires on both, not on clean


def test_choose_tau_refuses_stages_that_do_not_separate(bench):
    clean = {"stem": 1.0, "layer1": 0.8}
    assert bench.choose_tau(clean, {"emn": {"stem": 0.95, "layer1": 0.78}})[:2] == (None, None)


def test_stage_count_is_the_monitor_option_that_watches_up_to_the_stage(bench):
    assert bench.stage_count({"monitored": ["stem", "layer1", "layer2"]}, "layer1") == 2
