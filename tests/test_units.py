"""ε parsing at the edge: the three written forms, and clear errors for everything else."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ueguard.units import MAX_EPS, format_eps, parse_eps


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
    assert 0 < eps <= MAX_EPS and math.isfinite(eps)
