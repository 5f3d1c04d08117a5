"""EMN on real data (scikit-learn digits): the min-min loop makes a shortcut the surrogate fits,
δ stays in budget, and runs are reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ueguard.data.working_set import WorkingSet
from ueguard.engine.runtime import Runtime
from ueguard.methods import METHODS, create_method, list_methods
from ueguard.models import create_model


@pytest.fixture(scope="module")
def digits_set() -> WorkingSet:
    """200 real digits of 5 classes at 16×16, as a working set (grayscale flags set)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.flatnonzero(d.target < 5)[:200]
    x = torch.from_numpy(d.images[keep] / 16).float()[:, None]
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return WorkingSet(images, torch.from_numpy(d.target[keep]).long(), torch.ones(len(keep), dtype=torch.bool),
                      tuple(str(k) for k in range(5)), [str(i) for i in keep])


def run_emn(data: WorkingSet, seed: int = 0, **options):
    torch.manual_seed(seed)
    surrogate = create_model("resnet18_cifar_slim", data.num_classes)
    method = create_method("emn", budget="quick", runtime=Runtime.create("cpu", "fp32"), surrogate=surrogate,
                           seed=seed, **options)
    return method(data)


def test_registry_lists_emn_with_a_description():
    assert ("emn" in dict(list_methods())) and METHODS.get("emn").needs_labels


def test_samplewise_emn_converges_within_budget(digits_set):
    result = run_emn(digits_set, max_rounds=6, stop_accuracy=0.95)
    delta = result.delta
    assert delta.shape == (200, 3, 16, 16) and not result.classwise
    assert delta.abs().max() <= 8 / 255 + 1e-6
    x = digits_set.images.float() / 255
    assert ((x + delta) >= -1e-6).all() and ((x + delta) <= 1 + 1e-6).all()   # valid image range
    assert torch.allclose(delta[:, 0], delta[:, 1]) and torch.allclose(delta[:, 1], delta[:, 2])  # gray stays gray
    assert delta.abs().mean() > 2 / 255                       # a real perturbation, not a trivial one
    accuracy = result.info["surrogate_train_accuracy"]
    assert accuracy[-1] >= 0.95 and result.info["converged"]  # the surrogate fits the perturbed data


def test_emn_minimises_the_surrogate_loss(digits_set):
    """The defining property of error-minimising noise: on the surrogate it was made against, x + δ has
    a far lower loss than the clean x and than random ±ε noise of the same budget."""
    torch.manual_seed(0)
    surrogate = create_model("resnet18_cifar_slim", 5)
    method = create_method("emn", budget="quick", runtime=Runtime.create("cpu", "fp32"), surrogate=surrogate,
                           max_rounds=6, stop_accuracy=0.95)
    delta = method(digits_set).delta
    surrogate.eval()
    x, y = digits_set.images.float() / 255, digits_set.labels
    random = (8 / 255) * torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)).mul(2).sub(1)
    with torch.no_grad():
        loss = {name: torch.nn.functional.cross_entropy(surrogate((x + d).clamp(0, 1)), y).item()
                for name, d in (("emn", delta), ("clean", torch.zeros_like(x)), ("random", random))}
    assert loss["emn"] < 0.5 * loss["clean"] and loss["emn"] < 0.5 * loss["random"], loss


def test_same_seed_same_perturbation(digits_set):
    small = digits_set.subset(range(40))
    a = run_emn(small, max_rounds=1).delta
    b = run_emn(small, max_rounds=1).delta
    c = run_emn(small, seed=1, max_rounds=1).delta
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_classwise_emn(digits_set):
    result = run_emn(digits_set, perturbation="classwise", max_rounds=3)
    assert result.classwise and result.delta.shape == (5, 3, 16, 16)
    assert result.delta.abs().max() <= 8 / 255 + 1e-6
    assert (result.delta.flatten(1).abs().amax(1) > 0).all()  # every class got noise


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match="pgd_steps"):
        METHODS.get("emn").make_config("quick", pgd_stepz=3)
    with pytest.raises(ValueError, match="samplewise"):
        METHODS.get("emn").make_config("quick", perturbation="pixelwise")


def test_augment_option_is_validated():
    with pytest.raises(ValueError, match="cropflip"):
        METHODS.get("emn").make_config("quick", augment="rotate")


def test_input_gradient_reaches_the_input_through_the_transform():
    """With a transform T, the gradient w.r.t. x is T's adjoint applied to the gradient at T(x): for a
    horizontal flip (its own adjoint) that is the flipped gradient at the flipped image."""
    from ueguard.engine.loops import input_gradient

    torch.manual_seed(0)
    model = create_model("resnet18_cifar_slim", 3).eval()
    rt = Runtime.create("cpu", "fp32")
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    through, _ = input_gradient(model, x, y, rt, transform=lambda z: z.flip(-1))
    direct, _ = input_gradient(model, x.flip(-1), y, rt)
    assert torch.allclose(through, direct.flip(-1), atol=1e-6)
    assert not torch.allclose(through, input_gradient(model, x, y, rt)[0], atol=1e-4)


@pytest.mark.parametrize("kind", ["samplewise", "classwise"])
def test_emn_through_augmentation_stays_in_budget_and_reproducible(digits_set, kind):
    small = digits_set.subset(range(60))
    a = run_emn(small, perturbation=kind, augment="cropflip", max_rounds=2)
    b = run_emn(small, perturbation=kind, augment="cropflip", max_rounds=2)
    plain = run_emn(small, perturbation=kind, max_rounds=2)
    assert torch.equal(a.delta, b.delta) and not torch.equal(a.delta, plain.delta)
    assert a.delta.abs().max() <= 8 / 255 + 1e-6 and a.delta.abs().mean() > 1 / 255
    applied = a.for_samples(torch.arange(len(small)), small.labels, small.grayscale)
    assert torch.allclose(applied[:, 0], applied[:, 2])  # gray images get gray noise


def test_emn_stops_at_the_round_cap_when_the_surrogate_never_reaches_the_threshold(digits_set):
    """An unreachable threshold: the loop runs exactly max_rounds and says it did not converge."""
    result = run_emn(digits_set, max_rounds=2, stop_accuracy=1.01)
    assert result.info["rounds"] == 2 and not result.info["converged"]
    assert len(result.info["surrogate_train_accuracy"]) == 2
