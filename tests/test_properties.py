"""Property-based tests (hypothesis): ε parsing, option combinations, and every image mode and size
through decode → perturb → save → decode. Examples are few and tiny so the file runs in seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ueguard.data.images import load_image, save_image
from ueguard.errors import UsageError
from ueguard.sdk.options import ProtectOptions
from ueguard.sdk.protect import perturb_native
from ueguard.units import MAX_EPS, MIN_EPS, parse_eps

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.integers(1, 64))
def test_levels_and_fractions_agree(levels):
    assert parse_eps(f"{levels}/255") == pytest.approx(levels / 255)
    assert parse_eps(f" {levels} / 255 ") == pytest.approx(levels / 255)
    assert parse_eps(str(levels)) == pytest.approx(levels / 255)
    assert parse_eps(levels) == pytest.approx(levels / 255)


@FAST
@given(st.floats(min_value=MIN_EPS, max_value=MAX_EPS, allow_nan=False))
def test_unit_values_are_taken_as_is(value):
    assert parse_eps(repr(value)) == pytest.approx(value)


@FAST
@given(st.floats(min_value=0.01, max_value=1000, allow_nan=False), st.floats(min_value=0.01, max_value=1000))
def test_any_fraction_is_parsed_or_refused_as_out_of_range(numerator, denominator):
    text = f"{numerator}/{denominator}"
    if MIN_EPS <= numerator / denominator <= MAX_EPS:
        assert parse_eps(text) == pytest.approx(numerator / denominator)
    else:
        with pytest.raises(ValueError, match="out of range"):
            parse_eps(text)


@FAST
@given(st.one_of(st.text(max_size=12), st.floats(), st.integers(-10**6, 10**6)))
def test_any_input_gives_a_valid_eps_or_a_value_error_that_says_what_is_accepted(value):
    try:
        eps = parse_eps(value)
    except ValueError as error:
        assert "eps" in str(error) and ("8/255" in str(error) or "out of range" in str(error))
    else:
        assert math.isfinite(eps) and MIN_EPS <= eps <= MAX_EPS


VALID = {"method": ["emn"], "eps": ["8/255", "0.02", 4, 1 / 255], "budget": ["quick", "standard", "thorough"],
         "device": ["auto", "cpu"], "precision": ["auto", "fp32", "bf16"], "compile": ["auto", "on", "off"], "size": [8, 32, 1024],
         "format": ["png", "keep", "jpeg", "webp"], "quality": [1, 95, 100], "max_pixels": [1, 10**8],
         "perturbation": ["samplewise", "classwise"], "keep_metadata": [True, False],
         "follow_symlinks": [True, False], "seed": [0, 7]}
INVALID = {"method": ["emm", ""], "eps": ["0", "abc", "300", "-1/255", float("nan"), 1e-3], "budget": ["fast"],
           "device": ["tpu"], "precision": ["fp16"], "compile": ["yes"], "size": [0, 7, 1025], "format": ["gif", "PNG"],
           "quality": [0, 101], "max_pixels": [0, -5]}


@st.composite
def option_sets(draw):
    names = draw(st.sets(st.sampled_from(sorted(VALID)), max_size=6))
    bad = draw(st.sampled_from([None, *[n for n in sorted(names) if n in INVALID]]))
    values = {name: draw(st.sampled_from(INVALID[name] if name == bad else VALID[name])) for name in names}
    return values, bad


@FAST
@given(option_sets())
def test_option_combinations_resolve_or_name_the_bad_option(case):
    values, bad = case
    if bad is None:
        opts = ProtectOptions.resolve(**values)
        assert 0 < opts.eps <= MAX_EPS
        assert ProtectOptions.resolve(**{k: getattr(opts, k) for k in values}) == opts  # resolving is idempotent
    else:
        with pytest.raises(UsageError) as error:
            ProtectOptions.resolve(**values)
        assert bad in str(error.value)  # the message names the option at fault


def test_unknown_option_names_are_listed():
    with pytest.raises(UsageError, match="unknown option.*epsilon.*valid: .*eps"):
        ProtectOptions.resolve(epsilon="8/255")


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(MODES), width=st.integers(1, 23), height=st.integers(1, 23),
       fmt=st.sampled_from(["png", "tiff"]), levels=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_any_mode_and_size_survives_protect_within_budget(tmp_path, mode, width, height, fmt, levels, seed):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        source = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    else:
        source = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA").convert(mode)
    path = tmp_path / f"src_{mode.replace(';', '')}_{width}x{height}.{fmt}"
    source.save(path)
    image = load_image(path)
    eps = levels / 255
    delta = (torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * eps
    if image.grayscale:
        delta = delta.mean(0, keepdim=True).expand(3, -1, -1)
    pixels = perturb_native(image.pixels, image.max_value, delta)
    out = tmp_path / f"out.{fmt}"
    save_image(out, image, pixels, fmt=fmt)
    saved = load_image(out)
    assert saved.pixels.shape == image.pixels.shape and saved.max_value == image.max_value
    np.testing.assert_array_equal(saved.pixels, pixels)  # lossless formats store exactly what was computed
    diff = np.abs(saved.pixels.astype(np.int64) - image.pixels.astype(np.int64)) / image.max_value
    assert diff.max() <= eps + 0.5 / 255 + 1e-9
    if image.alpha is None:
        assert saved.alpha is None
    else:
        np.testing.assert_array_equal(saved.alpha, image.alpha)
    assert not list(tmp_path.glob(".ueguard-*.tmp"))


@pytest.mark.parametrize("channels", [1, 3])
def test_a_read_only_decoded_image_is_perturbed_without_a_warning_or_a_write(channels):
    """A decoded image can be a read-only array (``np.asarray`` of a Pillow image); a gray ``H×W×1`` one is
    already contiguous after the channel transpose, so it used to reach ``torch.from_numpy`` read-only
    (a UserWarning per file, and a tensor aliasing the caller's buffer)."""
    import warnings

    planes = np.random.default_rng(0).integers(0, 256, (9, 7, channels), dtype=np.uint8)
    original = planes.copy()
    planes.flags.writeable = False
    delta = torch.full((3, 4, 4), 3 / 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = perturb_native(planes, 255, delta)
    np.testing.assert_array_equal(planes, original)
    np.testing.assert_array_equal(out.astype(int), np.minimum(original.astype(int) + 3, 255))
