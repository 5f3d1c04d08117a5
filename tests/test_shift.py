"""Class-wise δ at a per-image place: the ``shift`` option. Every image of a class carries the class's row
circularly shifted by its own offset, so the class's mean change no longer holds the pattern (what the
adaptive ``classmean`` defense reads), while the release stays within the budget and reproducible."""

from __future__ import annotations

import pytest
import torch

from test_methods import make_digits, run
from ueguard.defenses.classmean import class_patterns
from ueguard.engine.augment import roll_rows
from ueguard.methods import METHODS
from ueguard.methods.base import OptionError, Perturbation, shift_offsets


def test_roll_rows_is_a_per_row_circular_shift_and_passes_gradients_back():
    rows = torch.randn(3, 3, 5, 6, requires_grad=True)
    offsets = torch.tensor([[0, 0], [1, 2], [4, 5]])
    out = roll_rows(rows, offsets)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], torch.roll(rows[i], (dy, dx), (1, 2)))
    (out * torch.arange(out.numel()).view_as(out)).sum().backward()
    assert torch.equal(rows.grad.flatten().sort().values, torch.arange(out.numel(), dtype=torch.float))


def test_offsets_are_fixed_per_image_in_range_and_spread_evenly():
    index = torch.arange(64_000)
    offsets = shift_offsets(index, 8, seed=3)
    assert offsets.min() >= 0 and offsets.max() < 8
    assert torch.equal(shift_offsets(index[1000:1010], 8, 3), offsets[1000:1010])  # not the batch's
    counts = torch.bincount(offsets[:, 0] * 8 + offsets[:, 1], minlength=64)
    assert counts.min() > 0.85 * 1000 and counts.max() < 1.15 * 1000  # 64 cells, 1000 expected in each
    assert not torch.equal(shift_offsets(index[:100], 8, 4), offsets[:100])  # the seed moves them


def test_a_shifted_release_is_in_budget_and_hides_its_pattern_from_the_class_mean():
    """Random images with one ±ε checkerboard-like class pattern: unshifted, the classmean estimate holds
    the pattern; shifted by up to 8 px, most of it averages out of the class mean."""
    generator = torch.Generator().manual_seed(0)
    n, eps = 2000, 8 / 255
    labels = torch.arange(n) % 2
    rows = eps * torch.randint(0, 2, (2, 3, 32, 32), generator=generator).float().mul(2).sub(1)
    images = torch.randint(60, 196, (n, 3, 32, 32), generator=generator).float() / 255
    found = {}
    for shift in (0, 8):
        p = Perturbation(rows.clone(), True, eps, shift=shift, shift_seed=1)
        delta = p.for_samples(torch.arange(n), labels, torch.zeros(n, dtype=torch.bool))
        assert delta.abs().max() <= eps + 1e-7
        released = ((images + delta).clamp(0, 1) * 255).round().to(torch.uint8)
        pattern = class_patterns(released, labels, 1.0)[1]
        signal = delta[labels == 1].mean(0) - delta.mean(0)
        found[shift] = float((pattern * signal).sum() / signal.norm() ** 2) if signal.norm() > 0 else 0.0
        found[f"{shift}-rms"] = float(pattern.pow(2).mean().sqrt() * 255)
    assert found["0-rms"] > 3 * found["8-rms"], found  # the shifted class means carry little pattern


def test_a_sample_wise_delta_refuses_a_shift():
    with pytest.raises(ValueError, match="shift moves class-wise rows"):
        Perturbation(torch.zeros(4, 3, 8, 8), False, 8 / 255, shift=4)
    with pytest.raises(OptionError, match="shift shapes one δ per class"):
        METHODS.get("ssc").make_config(perturbation="samplewise", shift=4)


def test_ssc_with_a_shift_releases_shifted_rows_and_the_resume_state_keeps_them(tmp_path):
    from ueguard.sdk.protect import _load_state, _save_state

    digits = make_digits(8, 3, gray=False)
    _, shifted = run("ssc", digits, shift=4)
    assert shifted.classwise and shifted.shift == 4 and shifted.delta.abs().max() <= shifted.eps + 1e-7
    assert shifted.delta.abs().sum() > 0
    index = torch.arange(len(digits.labels))
    released = shifted.for_samples(index, digits.labels, digits.grayscale)
    offsets = shift_offsets(index, 4, shifted.shift_seed)
    assert len({tuple(o) for o in offsets.tolist()}) > 1
    for i in range(len(index)):
        row = shifted.delta[digits.labels[i]]
        assert torch.equal(released[i], torch.roll(row, tuple(offsets[i].tolist()), (1, 2)))
    ids = [str(i) for i in range(len(index))]
    _save_state(tmp_path / "state.pt", shifted, ids)
    again = _load_state(tmp_path / "state.pt", ids)
    assert (again.shift, again.shift_seed) == (4, shifted.shift_seed)
    assert torch.equal(again.for_samples(index, digits.labels, digits.grayscale), released)
