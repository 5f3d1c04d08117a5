"""The pure pieces of bench/staged.py: the ACM ratio and the choice of the trigger's stage and tau."""

from __future__ import annotations

import math

import pytest

from conftest import load_bench

pytestmark = pytest.mark.slow  # a benchmark script's tests: not in the fast subset (-m "not slow")


@pytest.fixture(scope="module")
def bench():
    return load_bench("staged")


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


def test_choose_setting_takes_the_best_worst_case_over_the_protections(bench):
    finals = {"clean": {"a": 80.0, "b": 70.0, "c": 75.0},
              "emn": {"a": 50.0, "b": 67.0, "c": 70.0},
              "rem": {"a": 60.0, "b": 66.0, "c": 55.0}}
    chosen, worst = bench.choose_setting(finals, ["emn", "rem"])
    # c is best on EMN but worst on REM; b's worst case (66) beats a's (50) and c's (55); clean is not scored
    assert chosen == "b" and worst == {"a": 50.0, "b": 66.0, "c": 55.0}


def test_parse_setting_reads_numbers_and_refuses_malformed_text(bench):
    assert bench.parse_setting("f3=tau=1,gamma=0.0,monitor=3") == ("f3", {"tau": 1, "gamma": 0.0, "monitor": 3})
    for bad in ("f3", "f3=", "f3=tau", "f3=tau=high"):
        with pytest.raises(Exception, match="--setting"):
            bench.parse_setting(bad)


def test_the_default_search_freezes_up_to_each_shallow_stage_at_the_first_fall(bench):
    assert [o["monitor"] for o in bench.SEARCH.values()] == [1, 2, 3, 4]
    assert all(o["gamma"] == 0 and o["tau"] == 1 for o in bench.SEARCH.values())
