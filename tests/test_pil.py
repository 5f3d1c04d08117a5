"""PIL's defining properties on real data (scikit-learn digits at 16 px): its surrogate is a bias-free
linear map, its objective is the paper's, the crafted δ lowers that objective and is a linear shortcut
a fresh linear classifier learns from δ alone, the thorough preset holds the authors' constants, and
``ueguard.sdk.protect`` releases files within the L∞ budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_methods import RUNTIME, make_digits
from ueguard.methods import METHODS, create_method
from ueguard.methods.pil import BiasFreeLinear, pil_objective


@pytest.fixture(scope="module")
def digits():
    return make_digits(30, 5, gray=False)


@pytest.fixture(scope="module")
def crafted(digits):
    """(method, its trained linear surrogate, perturbation) at the quick preset."""
    method = create_method("pil", budget="quick", runtime=RUNTIME, seed=0, batch_size=32)
    p = method(digits)
    model = BiasFreeLinear(3 * 16 * 16, digits.num_classes, torch.Generator().manual_seed(0))
    method.generator.manual_seed(0)
    method.train_surrogate(model, digits)
    return method, model.eval().requires_grad_(False), p


def test_the_surrogate_is_linear_and_bias_free(crafted):
    _, model, _ = crafted
    assert all(layer.bias is None for layer in (model.first, model.second))
    assert [name for name, _ in model.named_parameters()] == ["first.weight", "second.weight"]
    gen = torch.Generator().manual_seed(1)
    x, z = torch.rand(4, 3, 16, 16, generator=gen), torch.rand(4, 3, 16, 16, generator=gen)
    assert torch.equal(model(torch.zeros(2, 3, 16, 16)), torch.zeros(2, 5))
    assert torch.allclose(model(2.5 * x - 0.7 * z), 2.5 * model(x) - 0.7 * model(z), atol=1e-5)
    assert not torch.allclose(model(x), torch.zeros(4, 5))  # trained: not the zero map


def test_the_objective_is_the_papers_shortcut_plus_obfuscation(crafted):
    """pil_objective (from f(x), f(δ)) against the paper's terms computed directly on f(−δ), f(x + δ)."""
    _, model, _ = crafted
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(6, 3, 16, 16, generator=gen)
    delta = (torch.rand(6, 3, 16, 16, generator=gen) * 2 - 1) * 8 / 255
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    uniform = torch.full((6, 5), 1 / 5)
    for balance in (0.0, 0.9, 1.0):
        direct = (balance * F.cross_entropy(model(-delta), y, reduction="none")
                  + (1 - balance) * (uniform * (uniform.log() - F.log_softmax(model(x + delta), 1))).sum(1))
        got = pil_objective(model(x), model(delta), y, balance)
        assert torch.allclose(got, direct, atol=1e-5), balance
    assert (pil_objective(model(x), torch.zeros(6, 5), y, 0.0) >= -1e-6).all()  # a KL is never negative


def test_the_perturbation_lowers_the_objective_and_is_a_linear_shortcut(crafted, digits):
    method, model, p = crafted
    x = digits.images.float() / 255
    y = digits.labels
    crafted_loss = pil_objective(model(x), model(p.delta), y, method.config.balance).mean()
    gen = torch.Generator().manual_seed(3)
    random = ((x + (torch.rand(x.shape, generator=gen) * 2 - 1) * p.eps).clamp(0, 1) - x)
    # within 8/255 the logits a linear map gives δ are small, so the drop is modest but systematic
    assert crafted_loss < 0.95 * pil_objective(model(x), model(random), y, method.config.balance).mean()
    assert p.info["shortcut_accuracy"] == pytest.approx(
        (model(-p.delta).argmax(1) == y).float().mean().item(), abs=1e-4)
    assert p.info["shortcut_accuracy"] >= 0.95
    # a fresh linear classifier trained on half of the δ alone names the other half's classes
    train, held = torch.arange(len(y)) % 2 == 0, torch.arange(len(y)) % 2 == 1
    probe = torch.nn.Linear(3 * 16 * 16, digits.num_classes)
    torch.manual_seed(4)
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.5)
    features = p.delta.flatten(1) / p.eps
    for _ in range(100):
        optimizer.zero_grad()
        F.cross_entropy(probe(features[train]), y[train]).backward()
        optimizer.step()
    held_accuracy = (probe(features[held]).argmax(1) == y[held]).float().mean().item()
    assert held_accuracy >= 0.9, held_accuracy
    # the clean images' held-out accuracy under the same probe recipe is far lower: δ is the easier signal
    clean = torch.nn.Linear(3 * 16 * 16, digits.num_classes)
    optimizer = torch.optim.SGD(clean.parameters(), lr=0.5)
    for _ in range(100):
        optimizer.zero_grad()
        F.cross_entropy(clean(x.flatten(1)[train]), y[train]).backward()
        optimizer.step()
    assert held_accuracy > (clean(x.flatten(1)[held]).argmax(1) == y[held]).float().mean().item()


def test_the_thorough_preset_holds_the_authors_constants():
    cls = METHODS.get("pil")
    cfg = cls.make_config("thorough")
    assert (cfg.train_epochs, cfg.lr, cfg.momentum, cfg.weight_decay) == (30, 0.003, 0.9, 0.0)
    assert (cfg.steps, cfg.balance, cfg.batch_size) == (30, 0.9, 512)
    assert math.isclose(cfg.step_fraction * cfg.eps, 8 / 2550) and math.isclose(cfg.eps, 8 / 255)
    quick, standard = cls.make_config("quick"), cls.make_config("standard")
    cost = lambda c: (c.train_epochs, c.steps)  # noqa: E731
    assert cost(quick) < cost(standard) < cost(cfg)
    assert not cls.needs_surrogate and cls.norm == "linf"


def test_a_seed_fixes_the_linear_surrogate_and_the_starts(digits):
    small = digits.subset(list(range(0, 150, 5)))
    a = create_method("pil", budget="quick", runtime=RUNTIME, seed=7, steps=1)(small)
    b = create_method("pil", budget="quick", runtime=RUNTIME, seed=7, steps=1)(small)
    c = create_method("pil", budget="quick", runtime=RUNTIME, seed=8, steps=1)(small)
    assert torch.equal(a.delta, b.delta) and a.info["surrogate_clean_accuracy"] == b.info["surrogate_clean_accuracy"]
    assert not torch.equal(a.delta, c.delta)


def test_sdk_protect_releases_pil_within_the_linf_budget(digits):
    from ueguard.sdk import protect

    images = digits.images.permute(0, 2, 3, 1).numpy()
    result = protect(images, labels=digits.labels.numpy(), method="pil", budget="quick", eps="8/255", device="cpu",
                     size=16, seed=0)
    out = np.asarray(result.data).astype(np.int64)
    diff = np.abs(out - images.astype(np.int64))
    assert out.shape == images.shape and 7 <= diff.max() <= 8
    assert all(item["within_budget"] for item in result.items)
    assert result.info["shortcut_accuracy"] >= 0.9
