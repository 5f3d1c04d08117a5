"""Class-wise δ in a subspace: ``patch`` (constant over pixel blocks) and ``achromatic`` (equal in R, G, B),
for the class-wise methods that take them (EMN class-wise, SSC, BAIT)."""

from __future__ import annotations

import pytest
import torch

from test_methods import make_digits, run
from ueguard.methods import METHODS
from ueguard.methods.base import OptionError, subspace_project

SUBSPACE = {"bait": {}, "emn": {"perturbation": "classwise"}, "ssc": {}}


def test_projection_averages_blocks_and_channels_and_is_idempotent():
    d = torch.randn(2, 3, 10, 10)
    p = subspace_project(d, patch=4, achromatic=True)
    assert torch.allclose(p[:, 0], p[:, 2])
    assert torch.allclose(p[0, 0, :4, :4], d[0].mean(0)[:4, :4].mean().expand(4, 4))
    assert torch.allclose(p[0, 0, 8:, 8:], d[0].mean(0)[8:, 8:].mean().expand(2, 2))  # a partial edge block
    assert torch.allclose(subspace_project(p, 4, True), p, atol=1e-6)
    assert p.norm() <= d.norm()  # orthogonal: never longer
    assert torch.equal(subspace_project(d), d)
    eps = 8 / 255
    assert subspace_project(d.clamp(-eps, eps), 3, True).abs().max() <= eps + 1e-7


@pytest.fixture(scope="module")
def digits():
    return make_digits(8, 3, gray=False)


@pytest.mark.parametrize("name", sorted(SUBSPACE))
def test_classwise_rows_stay_in_the_subspace(name, digits):
    base = SUBSPACE[name]
    _, plain = run(name, digits, **base)
    _, coarse = run(name, digits, **base, patch=4, achromatic=True)
    delta = coarse.delta
    assert coarse.classwise and delta.abs().max() <= coarse.eps + 1e-7
    assert torch.allclose(subspace_project(delta, 4, True), delta, atol=1e-6)
    assert delta.abs().sum() > 0 and not torch.equal(delta, plain.delta)
    assert not torch.allclose(subspace_project(plain.delta, 4, True), plain.delta, atol=1e-6)


@pytest.mark.parametrize("name", ["emn", "ssc"])
def test_a_samplewise_perturbation_refuses_the_subspace(name):
    for option in ({"patch": 2}, {"achromatic": True}):
        with pytest.raises(OptionError, match=f"{next(iter(option))} shapes one δ per class"):
            METHODS.get(name).make_config(perturbation="samplewise", **option)
