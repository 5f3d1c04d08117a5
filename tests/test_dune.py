"""DUNE: the two branches each contribute and add up to the release, both are bound to the shifted
label, the particle swarm finds a box-constrained minimum, and the budget — ε + colour_eps, or ε with
the colour branch inside it — is declared in the manifest and checked on the saved files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from test_methods import SURROGATE, TINY, make_digits, run
from trees import write_class_tree
from ueguard.cli import main
from ueguard.data.images import load_image
from ueguard.data.manifest import MANIFEST_NAME, read_manifest
from ueguard.methods import METHODS, Perturbation
from ueguard.methods.base import OptionError
from ueguard.methods.dune import particle_swarm, shift
from ueguard.sdk.protect import within_budget

EPS = 16 / 255


@pytest.fixture(scope="module")
def digits():
    return make_digits(10, 4, gray=False)


@pytest.fixture(scope="module")
def branches(digits):
    """The same run three times (same seed, so the same ensemble): both branches, spatial only, colour only."""
    options = dict(eps=EPS, steps=6, step_fraction=0.25, train_epochs=4, batch_size=8, particles=6, pso_iterations=4,
                   colour_batch=1000)
    return {b: run("dune", digits, branches=b, **options) for b in ("both", "spatial", "colour")}


def test_the_release_is_the_spatial_plus_the_colour_branch_and_each_contributes(branches, digits):
    (_, both), (_, spatial), (method, colour) = branches["both"], branches["spatial"], branches["colour"]
    assert torch.allclose(both.delta, spatial.delta + colour.delta, atol=1e-6)
    # colour: one RGB offset per class, the same at every pixel, non-zero, inside its box
    shifts = torch.tensor(colour.info["colour_shift_255"]) / 255
    assert torch.allclose(colour.delta, shifts[digits.labels].view(-1, 3, 1, 1).expand_as(colour.delta), atol=1e-5)
    assert (shifts.abs().amax(1) > 1 / 255).all() and shifts.abs().max() <= method.config.colour_eps + 1e-6
    # spatial: per-pixel noise within ε that is not a per-image constant
    assert spatial.delta.abs().max() <= EPS + 1e-6
    assert (spatial.delta.flatten(2).std(2) > 0).all()
    assert spatial.info["colour_shift_255"] == [[0.0, 0.0, 0.0]] * digits.num_classes


def test_both_branches_are_bound_to_the_shifted_label(branches, digits):
    method, _ = branches["both"]
    target = method.targets(digits.labels, digits.num_classes)
    assert torch.equal(target, (digits.labels + 3) % 4) and not (target == digits.labels).any()
    other = (digits.labels + 1) % 4  # another wrong class, which no branch aims at
    x = digits.images.float() / 255

    def ensemble_loss(delta, labels):
        with torch.no_grad():
            return sum(F.cross_entropy(m((x + delta).clamp(0, 1)), labels) for m in method.members).item()

    # the spatial branch lowers the ensemble's loss towards the shifted label, and far more than towards
    # the other wrong class
    for name in ("both", "spatial"):
        delta = branches[name][1].delta
        gain = ensemble_loss(torch.zeros_like(x), target) - ensemble_loss(delta, target)
        gain_other = ensemble_loss(torch.zeros_like(x), other) - ensemble_loss(delta, other)
        assert gain > 0.2 and gain > gain_other + 0.2, (name, gain, gain_other)
    # the colour branch: each class's shift lowers the ensemble's objective towards that class's target
    colour_method, colour = branches["colour"]
    for k in range(digits.num_classes):
        rows = digits.labels == k
        xk, gray, t = x[rows], digits.grayscale[rows], target[rows]
        found = torch.tensor(colour.info["colour_shift_255"][k]) / 255
        assert colour_method._colour_objective(colour_method.members, xk, gray, t, found) < \
            colour_method._colour_objective(colour_method.members, xk, gray, t, torch.zeros(3))


def test_the_label_shift_never_binds_a_sample_to_its_own_class():
    assert shift(3, 10) == 3 and shift(1, 2) == 1 and shift(3, 4) == 3
    assert shift(3, 3) == 1  # the authors' 3 on a 3-class set would be the identity
    for classes in range(2, 12):
        assert all(shift(offset, classes) % classes != 0 for offset in range(1, 40))
    small = make_digits(5, 3, gray=False)
    method, p = run("dune", small)
    assert p.info["label_shift"] == 1 and torch.equal(method.targets(small.labels, 3), (small.labels + 1) % 3)


def test_particle_swarm_finds_the_minimum_in_its_box():
    centre = torch.tensor([0.02, -0.01, 0.015])

    def bowl(c):
        return float((c - centre).square().sum())

    best, value = particle_swarm(bowl, 0.05, torch.Generator().manual_seed(0), particles=10, iterations=30,
                                 inertia=0.5, cognitive=0.3, social=0.3)
    assert (best - centre).abs().max() < 2e-3 and value == pytest.approx(bowl(best))
    # a minimum outside the box: the swarm stays in the box and improves on its starting particles (the
    # authors' coefficients have no random factors, so it may settle short of the nearest face)
    far = lambda c: float((c - 1).square().sum())  # noqa: E731
    start = (torch.rand(10, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.05
    best, value = particle_swarm(far, 0.05, torch.Generator().manual_seed(0), particles=10, iterations=30,
                                 inertia=0.5, cognitive=0.3, social=0.3)
    assert best.abs().max() <= 0.05 and value < min(far(p) for p in start) - 1e-3


def test_the_budget_is_eps_plus_colour_eps_unless_the_colour_branch_lives_inside(digits):
    cls = METHODS.get("dune")
    config = cls.make_config("quick", eps=8 / 255, colour_eps=4 / 255)
    assert (config.spatial_eps, config.colour_radius) == (8 / 255, 4 / 255)
    assert config.total_eps == pytest.approx(12 / 255)
    inside = cls.make_config("quick", eps=8 / 255, colour_eps=3 / 255, colour_inside=True)
    assert inside.spatial_eps == pytest.approx(5 / 255) and inside.total_eps == pytest.approx(8 / 255)
    with pytest.raises(ValueError, match="colour_eps must be below eps"):
        cls.make_config("quick", eps=8 / 255, colour_eps=8 / 255, colour_inside=True)
    with pytest.raises(OptionError, match="colour_eps"):
        cls.make_config("quick", colour_eps=0.5 / 255)
    _, p = run("dune", digits, eps=8 / 255, colour_eps=3 / 255, colour_inside=True)
    assert p.eps == pytest.approx(8 / 255) and p.delta.abs().max() <= 8 / 255 + 1e-6
    assert p.budget()["budget_parts_255"] == {"spatial": pytest.approx(5.0), "colour": pytest.approx(3.0)}


def test_a_budget_declared_in_parts_must_add_up_and_within_budget_checks_the_sum():
    with pytest.raises(ValueError, match="add up"):
        Perturbation(torch.zeros(1, 3, 4, 4), False, 0.1, parts={"spatial": 0.05, "colour": 0.02})
    p = Perturbation(torch.zeros(1, 3, 4, 4), False, 16 / 255, parts={"spatial": 8 / 255, "colour": 8 / 255})
    assert within_budget({"linf": 12.0}, p, (4, 4), (4, 4))   # beyond the spatial part, within the sum
    assert within_budget({"linf": 16.5}, p, (4, 4), (4, 4))   # the sum plus 8-bit rounding
    assert not within_budget({"linf": 16.6}, p, (4, 4), (4, 4))


def test_protect_declares_the_two_part_budget_and_the_saved_files_respect_it(tmp_path):
    write_class_tree(tmp_path / "src", n_per_class=3, classes=2, size=20)
    options = [arg for key, value in {**TINY["dune"], "steps": 6, "step_fraction": 0.25}.items()
               for arg in ("-o", f"{key}={value}")]
    result = CliRunner().invoke(main, ["protect", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--method",
                                       "dune", "--budget", "quick", "--size", "16", "--device", "cpu", "--surrogate",
                                       SURROGATE, "--quiet", "--eps", "8/255", *options], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = list(read_manifest(tmp_path / "out" / MANIFEST_NAME))
    generation = next(r for r in records if r["kind"] == "generation")
    assert generation["norm"] == "linf" and generation["budget_255"] == 16.0
    assert generation["budget_parts_255"] == {"spatial": 8.0, "colour": 8.0}
    files = [r for r in records if r["kind"] == "file"]
    assert len(files) == 6
    largest = 0.0
    for rec in files:
        assert rec["budget"] == pytest.approx(16 / 255) and rec["budget_parts"] == generation["budget_parts"]
        original = load_image(tmp_path / "src" / rec["source"]).pixels.astype(np.int64)
        saved = load_image(tmp_path / "out" / rec["output"]).pixels.astype(np.int64)
        linf = np.abs(saved - original).max()
        assert rec["within_budget"] is True and linf <= 16 and rec["linf"] == linf
        largest = max(largest, linf)
    assert largest > 8 + 0.5, "the colour branch should use room beyond the spatial ε somewhere"
    assert math.isclose(sum(generation["budget_parts"].values()), generation["budget"])


def test_the_budget_parts_survive_the_resume_state(tmp_path):
    """An interrupted run reloads the finished perturbation: its parts (and so every later file record's
    budget_parts) come back from the torch file and from the on-disk store alike."""
    from ueguard.data.store import PerturbationStore
    from ueguard.sdk.protect import _load_state, _save_state

    ids = ["a", "b"]
    parts = {"spatial": 8 / 255, "colour": 4 / 255}
    p = Perturbation(torch.full((2, 3, 4, 4), 0.01), False, 12 / 255, {"seconds": 1.0}, parts=parts)
    _save_state(tmp_path / "state.pt", p, ids)
    assert _load_state(tmp_path / "state.pt", ids).budget() == p.budget()
    store = PerturbationStore.create(tmp_path / "store", (2, 3, 4, 4), ids)
    store[0:2] = p.delta
    _save_state(tmp_path / "unused.pt", Perturbation(store, False, 12 / 255, {}, parts=parts), ids)
    store.close()
    loaded = _load_state(tmp_path / "missing.pt", ids, store_dir=tmp_path / "store")
    assert loaded.budget()["budget_parts"] == parts and loaded.eps == pytest.approx(12 / 255)
    loaded.delta.close()
