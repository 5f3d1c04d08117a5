"""ε parsing at the edge: the three written forms, and clear errors for everything else."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ueguard.units import MAX_EPS, MIN_EPS, format_eps, parse_eps


@pytest.mark.parametrize("text, expected", [("8/255", 8 / 255), ("0.031", 0.031), ("8", 8 / 255), (8, 8 / 255),
                                            (" 16 / 255 ", 16 / 255), ("4.5", 4.5 / 255), (0.02, 0.02)])
def test_accepted_forms(text, expected):
    assert parse_eps(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "abc", "8/0", "-8", "0", "0/255", "nan", "inf", "255", "1/2", "8//255", "8/255/2"])
def test_rejected_forms(text):
    with pytest.raises(ValueError, match="eps"):
        parse_eps(text)


@given(st.integers(min_value=1, max_value=64))
def test_levels_and_fractions_agree(levels):
    assert parse_eps(str(levels)) == pytest.approx(parse_eps(f"{levels}/255"))
    assert format_eps(parse_eps(str(levels))) == f"{levels}/255"


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_any_float_is_either_in_range_or_an_error(value):
    try:
        eps = parse_eps(value)
    except ValueError:
        return
    assert MIN_EPS <= eps <= MAX_EPS and math.isfinite(eps)


@pytest.mark.parametrize("text, shown", [("1e-300", "2.55e-298/255"), ("0.5/255", "0.5/255"), ("0.001", "0.255/255")])
def test_a_budget_below_one_grey_level_is_refused_because_rounding_would_remove_it(text, shown):
    with pytest.raises(ValueError, match="below one grey level, 8-bit output would round the change away") as error:
        parse_eps(text)
    assert f"= {shown} is out of range" in str(error.value) and "at least 1/255" in str(error.value)
    assert parse_eps("1/255") == MIN_EPS


@pytest.mark.parametrize("text, shown", [("64.0001", "64.0001/255"), ("64.0000001", "64.0000001/255"),
                                         ("0.2510", "64.005/255")])
def test_an_out_of_range_budget_is_shown_precisely_enough_to_see_why(text, shown):
    with pytest.raises(ValueError, match="at most 64/255") as error:
        parse_eps(text)
    assert f"eps {text!r} = {shown} is out of range" in str(error.value)
