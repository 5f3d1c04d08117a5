"""Units at the edge: everything inside ueguard uses float images in [0, 1] and ε in the same units.

The command line and the SDK accept ε the way people write it — ``8/255``, ``0.031`` or ``8`` (meaning
8/255) — and :func:`parse_eps` converts it once, here.
"""

from __future__ import annotations

import math
import re

#: The largest ε accepted: beyond 64/255 a perturbation is no longer "imperceptible" by any standard.
MAX_EPS = 64 / 255
#: The smallest ε accepted: one grey level. Below it no value of the image moves by a full level, so the
#: 8-bit (or 8-bit-equivalent) output rounds the change away and the folder would be written unprotected.
MIN_EPS = 1 / 255

_FRACTION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*/\s*([0-9]*\.?[0-9]+)\s*$")


def parse_eps(value: str | float | int) -> float:
    """Convert an L∞ budget to [0, 1] units.

    Accepted forms:
      * ``"8/255"`` (any fraction ``a/b``) → a / b;
      * a number below 1, e.g. ``0.031`` → taken as is, in [0, 1] units;
      * a number ≥ 1 up to 255, e.g. ``8`` → 8/255 (pixel levels).

    Raises ``ValueError`` with a message that says what is accepted for anything else, including
    zero, negative, non-finite and out-of-range values (above :data:`MAX_EPS`).
    """
    text = str(value).strip()
    match = _FRACTION.match(text)
    try:
        if match:
            numerator, denominator = float(match.group(1)), float(match.group(2))
            if denominator == 0:
                raise ValueError
            eps = numerator / denominator
        else:
            number = float(text)
            if not math.isfinite(number):
                raise ValueError
            eps = number if number < 1 else number / 255
    except ValueError:
        raise ValueError(
            f"invalid eps {value!r}: write it as a fraction like 8/255, as a value in [0, 1) like 0.031, "
            "or as pixel levels like 8 (meaning 8/255)"
        ) from None
    if not (MIN_EPS <= eps <= MAX_EPS):
        low = eps < MIN_EPS
        bound = MIN_EPS if low else MAX_EPS
        why = ": below one grey level, 8-bit output would round the change away" if low else ""
        raise ValueError(
            f"eps {value!r} = {_levels(eps, bound)}/255 is out of range{why}; it must be at least "
            f"{MIN_EPS * 255:.0f}/255 and at most {MAX_EPS * 255:.0f}/255"
        )
    return eps


def _levels(eps: float, bound: float) -> str:
    """ε in 1/255 levels with enough significant digits to tell it apart from ``bound`` (so ``64.0001``
    is not shown as ``64``, which would look like an accepted value)."""
    for digits in range(3, 18):
        text = f"{eps * 255:.{digits}g}"
        if float(text) != round(bound * 255, digits):
            return text
    return f"{eps * 255!r}"


def format_eps(eps: float) -> str:
    """``8/255``-style text for an ε in [0, 1] units (rounded to 3 significant digits of levels)."""
    return f"{eps * 255:.3g}/255"
