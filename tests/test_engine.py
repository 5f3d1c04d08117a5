"""The engine's runtime choices: compiled steps equal eager ones and compile once per model and shape,
bf16 autocast runs on CPU, and bad settings fail with a message that names the option."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch._dynamo
from click.testing import CliRunner
from torch import nn
from torch._dynamo.utils import counters

from ueguard.cli import main
from ueguard.data.working_set import WorkingSet
from ueguard.engine.compiled import frozen_parameters, model_call
from ueguard.engine.loops import OptimConfig, Trainer, fit_linear_head, input_gradient, pgd_step
from ueguard.engine.runtime import Runtime
from ueguard.errors import UsageError
from ueguard.methods import create_method
from ueguard.sdk.options import ProtectOptions

EPS = 8 / 255


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def batches(count: int, n: int = 4, size: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 4, (n,), generator=gen)) for _ in range(count)]


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_pgd_steps_equal_eager_and_compile_once_across_batches(fresh_dynamo):
    eager_rt, compiled_rt = Runtime.create("cpu", "fp32", "off"), Runtime.create("cpu", "fp32", "on")
    model = compiled_rt.prepare_model(tiny_net()).eval()
    data = batches(3)
    eager = []
    for x, y in data:
        delta = torch.zeros_like(x).contiguous()
        for _ in range(2):
            delta = pgd_step(model, x, delta, y, eager_rt, step_size=EPS / 4, eps=EPS)
        eager.append((delta, input_gradient(model, x, y, eager_rt)[0]))
    assert graphs_compiled() == 0
    for (x, y), (want_delta, want_grad) in zip(data, eager):
        delta = torch.zeros_like(x).contiguous()
        for _ in range(2):
            delta = pgd_step(model, x, delta, y, compiled_rt, step_size=EPS / 4, eps=EPS)
        grad, _ = input_gradient(model, x, y, compiled_rt)
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)
        # signed steps: a sign flip of a near-zero gradient entry moves one value by a step, no more
        assert (delta - want_delta).abs().gt(1e-6).float().mean() < 0.01
    assert graphs_compiled() == 1  # nine steps over three batches, one graph
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the step

    x, y = batches(1, n=3)[0]  # a smaller last batch: one more static graph, then reused
    input_gradient(model, x, y, compiled_rt)
    input_gradient(model, x, y, compiled_rt)
    assert graphs_compiled() == 2


def test_compiled_outer_step_matches_eager_and_is_reused(fresh_dynamo):
    data = batches(3)
    results = []
    for setting in ("off", "on"):
        rt = Runtime.create("cpu", "fp32", setting)
        model = rt.prepare_model(tiny_net()).train()
        trainer = Trainer(model, rt, OptimConfig(lr=0.05))
        losses = torch.stack([trainer.step(x, y)[0] for x, y in data])
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (eager_loss, eager_params), (compiled_loss, compiled_params) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for got, want in zip(compiled_params, eager_params):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert graphs_compiled() == 1


def test_compiled_callables_are_cached_on_the_model_and_not_copied():
    rt = Runtime.create("cpu", "fp32", "on")
    model = tiny_net()
    first = model_call(model, rt)
    assert model_call(model, rt) is first and first is not model
    clone = copy.deepcopy(model)
    assert model_call(clone, rt) is not first
    assert "_ueguard_compiled" not in model.state_dict() and not any("compiled" in n for n, _ in model.named_modules())
    assert model_call(model, Runtime.create("cpu", "fp32", "off")) is model


def test_fit_linear_head_reaches_scikit_learns_logistic_regression_optimum():
    """The probe SSC's deceiver and bench/filtering fit: the same convex problem as scikit-learn's
    multinomial LogisticRegression with C = 1 / (2 N l2) (neither penalises the intercept)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    x, y = torch.tensor(d.data[:600] / 16, dtype=torch.float64), torch.tensor(d.target[:600])
    l2 = 1e-2
    head = nn.Linear(64, 10).double()
    assert fit_linear_head(head, x, y, l2=l2, max_iter=500) is head
    ref = LogisticRegression(C=1 / (2 * len(x) * l2), tol=1e-10, max_iter=5000).fit(x.numpy(), y.numpy())
    weight, bias = head.weight.detach().numpy(), head.bias.detach().numpy()
    assert np.abs(weight - ref.coef_).max() < 1e-3 * np.abs(ref.coef_).max()
    assert np.abs((bias - bias.mean()) - (ref.intercept_ - ref.intercept_.mean())).max() < 1e-2  # up to a constant
    stronger = fit_linear_head(nn.Linear(64, 10).double(), x, y, l2=10 * l2, max_iter=500)
    assert stronger.weight.norm() < 0.7 * head.weight.norm()


def test_frozen_parameters_restores_only_what_was_trainable():
    model = tiny_net()
    model[0].weight.requires_grad_(False)
    with frozen_parameters(model, model):  # twice: shared parameters are fine
        assert not any(p.requires_grad for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [False] + [True] * 5


def test_bf16_autocast_gradient_runs_on_cpu_and_agrees_in_sign():
    fp32, bf16 = Runtime.create("cpu", "fp32", "off"), Runtime.create("cpu", "bf16", "off")
    model = fp32.prepare_model(tiny_net()).eval()
    x, y = batches(1, n=8, size=16)[0]
    want, _ = input_gradient(model, x, y, fp32)
    got, _ = input_gradient(model, x, y, bf16)
    assert got.dtype == torch.float32 and got.shape == x.shape
    agree = (got.sign() == want.sign()).float().mean()
    assert agree > 0.9, f"bf16 and fp32 input gradients agree in sign on only {agree:.2%} of the values"


def test_emn_runs_in_bf16_on_cpu_within_budget():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 16, 16), generator=gen, dtype=torch.uint8)
    data = WorkingSet(images, torch.arange(24) % 3, torch.zeros(24, dtype=torch.bool), ("a", "b", "c"),
                      [str(i) for i in range(24)])
    torch.manual_seed(0)
    method = create_method("emn", budget="quick", runtime=Runtime.create("cpu", "bf16", "off"),
                           surrogate=tiny_net(), max_rounds=1, train_steps=2, batch_size=8)
    delta = method(data).delta
    assert delta.dtype == torch.float32 and delta.abs().max() <= EPS + 1e-6 and delta.abs().max() > 0
    x = images.float() / 255
    assert bool(((x + delta) >= -1e-6).all() and ((x + delta) <= 1 + 1e-6).all())


@pytest.mark.parametrize("kwargs, words", [
    ({"compile": "yes"}, ["compile", "'yes'", "auto, on, off"]),
    ({"precision": "fp16"}, ["precision", "'fp16'", "auto, fp32, bf16"]),
])
def test_runtime_rejects_unknown_settings_by_name(kwargs, words):
    with pytest.raises(ValueError) as error:
        Runtime.create("cpu", **kwargs)
    assert all(w in str(error.value) for w in words)


def test_cuda_graphs_are_refused_off_cuda_or_without_compile():
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device and compile='on'"):
        Runtime.create("cpu", "fp32", "on", cuda_graphs=True)


def test_compile_auto_follows_the_documented_rule():
    assert Runtime.create("cpu", "fp32", "auto").compile == "off"
    assert Runtime.create("cpu", "fp32", "on").describe()["compile"] == "on"


def test_protect_options_and_cli_name_a_bad_compile_setting(tmp_path):
    assert ProtectOptions.resolve(compile="on").compile == "on"
    with pytest.raises(UsageError, match=r"invalid compile 'fast'; choose one of auto, on, off"):
        ProtectOptions.resolve(compile="fast")
    result = CliRunner().invoke(main, ["protect", str(tmp_path), "--compile", "fast"])
    assert result.exit_code == 2 and "--compile" in result.output and "'fast'" in result.output
    result = CliRunner().invoke(main, ["verify", str(tmp_path), str(tmp_path), "--compile", "maybe"])
    assert result.exit_code == 2 and "--compile" in result.output


def test_sdk_protect_takes_the_compile_setting():
    from ueguard.sdk import protect

    gen = np.random.default_rng(0)
    images = gen.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    result = protect(images, None, "emn", labels=[0, 1] * 3, budget="quick", device="cpu", compile="off",
                     method_options={"max_rounds": 1, "pgd_steps": 1, "train_steps": 1})
    assert result.options.compile == "off" and result.data.shape == images.shape
    assert all(item["within_budget"] for item in result.items)
