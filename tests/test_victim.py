"""The fast victim: ``fastvgg_cifar`` and the ``fast`` verify recipe (ueguard.models.fastvgg,
ueguard.engine.recipes), and ``bench/victim.py --quick``. Small shapes, CPU, no shared data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trees import write_class_tree
from ueguard.data.working_set import WorkingSet
from ueguard.defenses import create_defense, create_paradigm
from ueguard.engine.fit import FitConfig, fit
from ueguard.engine.loops import Trainer
from ueguard.engine.recipes import Recipe, create_recipe
from ueguard.engine.runtime import Runtime, seed_everything
from ueguard.models import create_model, default_recipe, save_checkpoint
from ueguard.sdk import verify

CPU = Runtime.create("cpu", "fp32")
REPO = Path(__file__).resolve().parents[1]


def _set(n=24, classes=3, size=16, seed=0) -> WorkingSet:
    gen = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 3, size, size, generator=gen) * 255).to(torch.uint8)
    return WorkingSet(images, torch.arange(n) % classes, torch.zeros(n, dtype=torch.bool),
                      tuple(map(str, range(classes))), [f"{i}.png" for i in range(n)])


# -- the architecture -------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 24, 8])
def test_forward_and_backward(size):
    torch.manual_seed(0)
    model = create_model("fastvgg_cifar", 5).train()
    x = torch.rand(4, 3, size, size, requires_grad=True)
    logits = model(x)
    assert logits.shape == (4, 5)
    F.cross_entropy(logits, torch.arange(4) % 5).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    # Not learned: the whitening filters (a buffer) and BatchNorm's scale.
    assert "net.whiten.weight" in dict(model.named_buffers())
    assert not model.net.layer1.norm1.weight.requires_grad and model.net.layer1.norm1.bias.requires_grad


def test_registry_and_default_recipe():
    assert default_recipe("fastvgg_cifar") == "fast"
    assert default_recipe("resnet18_cifar") == "standard" and default_recipe("resnet18") == "standard"
    model = create_model("fastvgg_cifar", 10)
    assert [name for name, _ in model.stages()] == ["stem", "layer1", "layer2", "layer3", "head"]
    assert model.head is model.net.head and model.head.bias is None
    x = torch.rand(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.head(model.features(x)), model(x))
        torch.testing.assert_close(model.forward_features_at(x, "head"), model(x))


def test_whitening_init_is_deterministic_and_data_dependent():
    a, b = (create_model("fastvgg_cifar", 10) for _ in range(2))
    default = a.net.whiten.weight.clone()
    x = a.normalize(torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    a.net.init_whitening(x)
    b.net.init_whitening(x.clone())
    assert torch.equal(a.net.whiten.weight, b.net.whiten.weight)
    assert not torch.allclose(a.net.whiten.weight, default)
    b.net.init_whitening(a.normalize(torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)) ** 2))
    assert not torch.allclose(a.net.whiten.weight, b.net.whiten.weight)
    # What it is: the 12 first filters whiten 2×2 patches (second moment ≈ identity, up to the eps), the
    # other 12 are their negations.
    w = a.net.whiten.weight
    torch.testing.assert_close(w[12:], -w[:12])
    out = F.conv2d(x.double(), w[:12].double()).permute(0, 2, 3, 1).reshape(-1, 12)
    moment = out.T @ out / len(out)
    assert torch.allclose(moment.diagonal(), torch.ones(12, dtype=torch.float64), atol=0.05)
    assert (moment - torch.diag(moment.diagonal())).abs().max() < 0.05


def test_fast_recipe_prepares_only_a_from_scratch_model():
    recipe = create_recipe("fast", whiten_images=8)
    images = _set(16).images
    scratch, pretrained = (create_model("fastvgg_cifar", 3) for _ in range(2))
    default = scratch.net.whiten.weight.clone()
    recipe.prepare(scratch, images, CPU, pretrained=False)
    recipe.prepare(pretrained, images, CPU, pretrained=True)
    assert not torch.allclose(scratch.net.whiten.weight, default)
    assert torch.equal(pretrained.net.whiten.weight, default)
    assert recipe.prepare(create_model("resnet20_cifar", 3), images, CPU, pretrained=False) == {}
    assert Recipe().prepare(create_model("fastvgg_cifar", 3), images, CPU, pretrained=False) == {}


# -- the recipe -------------------------------------------------------------------------------------------

def test_recipe_constants_and_groups():
    fast = create_recipe("fast")
    cfg = fast.fit_config(None)
    assert (cfg.epochs, cfg.batch_size, cfg.momentum, cfg.nesterov) == (10, 1024, 0.85, True)
    assert cfg.lr == pytest.approx(1.5) and cfg.lr * cfg.weight_decay == pytest.approx(0.0153 / 7.6667, rel=1e-3)
    assert fast.fit_config(3, 64, None, paradigm_lr=1e-3).lr == pytest.approx(0.015)  # finetune's share of scratch
    standard = Recipe().fit_config(5, paradigm_lr=1e-3)
    assert (standard.lr, standard.batch_size, standard.weight_decay) == (1e-3, 128, 5e-4)
    model = create_model("fastvgg_cifar", 3)
    groups = fast.param_groups(model, create_paradigm("scratch").prepare(model), cfg)
    shifts = [g for g in groups if "lr" in g and g["params"]]
    assert {g["name"] for g in shifts} == {"layer1", "layer2", "layer3"}
    assert all(g["lr"] == pytest.approx(64 * cfg.lr) and g["lr"] * g["weight_decay"] == pytest.approx(
        cfg.lr * cfg.weight_decay) for g in shifts)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_fit_with_the_fast_recipe_uses_its_loss_augmentation_and_test_views(monkeypatch):
    recipe = create_recipe("fast", whiten_images=16)
    data = _set(24)
    seen = {}
    real_augment = recipe.augment

    def augment(x, generator):  # the standard augmentation fit hands the defense is the recipe's
        seen["augment"] = True
        return real_augment(x, generator)

    object.__setattr__(recipe, "augment", augment)  # a frozen dataclass: patch the instance for the test
    history = fit(create_model("fastvgg_cifar", 3), data, data, recipe.fit_config(2, 4), defense=create_defense("none"),
                  paradigm=create_paradigm("scratch"), runtime=CPU, generator=seed_everything(0), recipe=recipe)
    assert seen["augment"] and [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) and 0 <= h["test_accuracy"] <= 1 for h in history)
    assert history[-1]["lr"] == pytest.approx(1.5 * 0.07, rel=0.2)  # the triangle ends at 0.07 of the peak


def _momenta(recipe, steps=6):
    model = torch.nn.Linear(4, 3)
    cfg = recipe.fit_config(1, 8)
    trainer = Trainer(model, CPU, cfg.optim(), total_steps=steps, loss=recipe.loss)
    seen = []
    for _ in range(steps):
        seen.append(trainer.optimizer.param_groups[0]["momentum"])
        trainer.step(torch.rand(8, 4), torch.arange(8) % 3)
    return seen


def test_cycle_momentum_off_keeps_the_recipes_momentum():
    # airbench's rate is scaled for momentum 0.85; one-cycle's default momentum cycle (0.95 at both ends)
    # multiplies the early and late steps by ~2.7. The fast recipe keeps 0.85 fixed, with lookahead (airbench's
    # settings: 93.43 % on all of CIFAR-10 against the cycle's 91.99 %); the standard recipe keeps its cycle.
    assert _momenta(create_recipe("fast")) == [0.85] * 6
    assert create_recipe("fast").lookahead_every == 5
    assert _momenta(create_recipe("fast", cycle_momentum=True), steps=40)[0] == pytest.approx(0.95)
    cycled = _momenta(Recipe(), steps=40)
    assert cycled[0] == pytest.approx(0.95) and min(cycled) < 0.9  # the standard recipe as it always was


def test_lookahead_averages_trained_tensors_and_leaves_frozen_ones():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    model[0].bias.requires_grad_(False)
    frozen = model[0].bias.detach().clone()
    recipe = create_recipe("fast", lookahead_every=5)
    assert create_recipe("fast", lookahead_every=0).averager(model, 10) is None  # 0: off
    assert create_recipe("standard").averager(model, 10) is None  # only the fast recipe has it by default
    avg = recipe.averager(model, total_steps=10)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.add_(2.0)
    avg.step(4)  # not a multiple of lookahead_every (5): nothing happens
    assert torch.equal(model[0].weight, start + 1)
    avg.step(5)
    d = recipe.lookahead_decay * 0.5 ** 3
    assert torch.allclose(model[0].weight, start + (1 - d))  # slow ← d·slow + (1 − d)·fast, fast ← slow
    assert torch.allclose(model[1].running_mean, torch.full((3,), 2 * (1 - d)))
    with torch.no_grad():
        model[0].weight.add_(5.0)
    avg.finish()  # the slow copy goes into the model: the steps since the last sync are dropped
    assert torch.allclose(model[0].weight, start + (1 - d)) and torch.equal(model[0].bias, frozen)


def test_translate_test_views_only_in_the_final_logits():
    fast = create_recipe("fast")
    assert fast.tta_translate == 1 and fast.final_test_logits is not fast.test_logits
    assert create_recipe("fast", tta_translate=0).final_test_logits is fast.test_logits
    views = []

    def forward(x):
        views.append(x.clone())
        return x.mean(dim=(1, 2, 3)).unsqueeze(1).repeat(1, 3)

    x = torch.rand(2, 3, 8, 8)
    logits = fast.final_test_logits(forward, x)
    assert len(views) == 6 and logits.shape == (2, 3)
    padded = F.pad(x, (1,) * 4, mode="reflect")
    assert torch.equal(views[0], padded[..., :8, :8]) and torch.equal(views[2], padded[..., 2:, 2:])
    assert torch.equal(views[1], views[0].flip(-1)) and torch.equal(views[4], x)
    const = torch.full((2, 3, 8, 8), 0.3)  # every view of a constant image is the image: the logits are its own
    assert torch.allclose(fast.final_test_logits(forward, const), forward(const))


def test_fit_uses_the_final_test_views_after_the_last_epoch_only():
    calls = []

    class Counting(type(create_recipe("fast"))):
        @property
        def test_logits(self):
            return lambda forward, x: calls.append("epoch") or forward(x)

        @property
        def final_test_logits(self):
            return lambda forward, x: calls.append("final") or forward(x)

    data = _set(24)
    fit(create_model("fastvgg_cifar", 3), data, data, create_recipe("fast").fit_config(2, 12),
        defense=create_defense("none"), paradigm=create_paradigm("scratch"), runtime=CPU,
        generator=seed_everything(0), recipe=Counting(whiten_images=16, lookahead_every=1))
    assert calls == ["epoch", "final"]


@pytest.mark.parametrize("test_every, tested", [(1, [1, 2, 3]), (2, [2, 3]), (0, [3])])
def test_fit_tests_every_nth_epoch_and_always_the_last(test_every, tested):
    data = _set(24)
    history = fit(create_model("fastvgg_cifar", 3), data, data, create_recipe("fast").fit_config(3, 12),
                  defense=create_defense("none"), paradigm=create_paradigm("scratch"), runtime=CPU,
                  generator=seed_everything(0), recipe=create_recipe("fast", whiten_images=16),
                  test_every=test_every)
    assert [h["epoch"] for h in history] == [1, 2, 3]  # every epoch trains and is recorded
    assert [h["epoch"] for h in history if "test_accuracy" in h] == tested


@pytest.mark.parametrize("defense", ["at", "staged"])
def test_defenses_run_through_fastvgg(defense):
    options = {"steps": 2} if defense == "at" else {"probe_size": 8, "checks_per_epoch": 1}
    data = _set(24)
    model = create_model("fastvgg_cifar", 3)
    history = fit(model, data, data, create_recipe("fast").fit_config(1, 12),
                  defense=create_defense(defense, **options),
                  paradigm=create_paradigm("scratch"), runtime=CPU, generator=seed_everything(0),
                  recipe=create_recipe("fast", whiten_images=16))
    trained = [h for h in history if h["epoch"] >= 1]
    assert len(trained) == 1 and np.isfinite(trained[0]["train_loss"])
    if defense == "staged":
        assert set(history[0]["acm"]) == {"stem", "layer1", "layer2", "layer3"}


def test_adversarial_step_changes_the_weights():
    model = CPU.prepare_model(create_model("fastvgg_cifar", 3)).train()
    recipe = create_recipe("fast")
    cfg = recipe.fit_config(1, 8)
    trainer = Trainer(model, CPU, cfg.optim(), params=recipe.param_groups(model, None, cfg), loss=recipe.loss)
    before = model.net.layer2.conv1.weight.detach().clone()
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 3
    loss, _ = create_defense("at", steps=2).step(trainer, x, y)
    assert torch.isfinite(loss) and not torch.equal(before, model.net.layer2.conv1.weight)


@pytest.mark.parametrize("paradigm, frozen", [("frozen", {"stem", "layer1"}),
                                              ("linear", {"stem", "layer1", "layer2", "layer3"})])
def test_paradigms_freeze_fastvgg_stages(paradigm, frozen):
    model = create_model("fastvgg_cifar", 3)
    groups = create_paradigm(paradigm).prepare(model)
    assert {g["name"] for g in groups} == {"stem", "layer1", "layer2", "layer3", "head"} - frozen
    for name, module in model.stages():
        assert any(p.requires_grad for p in module.parameters()) == (name not in frozen), name


def test_pretrained_state_round_trips_with_a_fresh_head(tmp_path):
    model = create_model("fastvgg_cifar", 10)
    create_recipe("fast", whiten_images=8).prepare(model, _set(8).images, CPU, pretrained=False)
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 16, 16))  # non-default BatchNorm statistics
    path = save_checkpoint(model, tmp_path / "prior.pth")
    same = create_model("fastvgg_cifar", 10, weights=path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(same.state_dict()[key], value)
    prior = create_model("fastvgg_cifar", 3, weights=path)  # another task: the body loads, the head is fresh
    assert prior.head.out_features == 3
    torch.testing.assert_close(prior.net.whiten.weight, model.net.whiten.weight)
    torch.testing.assert_close(prior.net.layer3.conv2.weight, model.net.layer3.conv2.weight)
    whitening = prior.net.whiten.weight.clone()
    data = _set(12)
    fit(prior, data, data, create_recipe("fast").fit_config(1, 12, paradigm_lr=1e-3), defense=create_defense("none"),
        paradigm=create_paradigm("finetune"), runtime=CPU, generator=seed_everything(0), recipe=create_recipe("fast"))
    assert torch.equal(prior.net.whiten.weight, whitening)  # a pretrained stem is never re-initialised


# -- verify and the bench ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("victim")
    write_class_tree(base / "train", n_per_class=8, classes=3, size=16, seed=0)
    write_class_tree(base / "test", n_per_class=4, classes=3, size=16, seed=1)
    return base


def test_verify_selects_the_architectures_recipe(folders):
    options = dict(epochs=1, device="cpu", size=16, arch="fastvgg_cifar")
    report = verify(folders / "train", folders / "test", clean=folders / "train", **options)
    assert report["config"]["recipe"] == "fast" and report["config"]["batch_size"] == 1024
    run = report["runs"][0]
    assert run["recipe"]["name"] == "fast" and run["batch_size"] == 1024 and run["lr"] == pytest.approx(1.5)
    assert 0 <= run["test_accuracy"] <= 1 and report["protected"] in (True, False, None)
    standard = verify(folders / "train", folders / "test", recipe="standard", batch_size=8, **options)
    assert standard["runs"][0]["recipe"]["name"] == "standard" and standard["runs"][0]["lr"] == 0.1
    resnet = verify(folders / "train", folders / "test", **{**options, "arch": "resnet20_cifar"})
    assert resnet["config"]["recipe"] == "standard" and resnet["config"]["batch_size"] == 128


def test_verify_cli_takes_a_recipe(folders):
    from click.testing import CliRunner

    from ueguard.cli import main

    args = ["verify", str(folders / "train"), "--test", str(folders / "test"), "--arch", "fastvgg_cifar",
            "--epochs", "1", "--size", "16", "--device", "cpu", "-q"]
    ok = CliRunner().invoke(main, [*args, "--recipe", "fast"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(main, [*args, "--recipe", "fastest"])
    assert bad.exit_code != 0 and "recipe" in bad.output


def test_fastvgg_serves_as_a_protect_surrogate(tmp_path, folders):
    """As a surrogate no data-dependent init runs: the whitening stem keeps its identity default."""
    from ueguard.sdk import protect

    protect(folders / "train", tmp_path / "out", budget="quick", size=16, device="cpu", surrogate="fastvgg_cifar",
            method_options={"max_rounds": 1, "pgd_steps": 1})
    assert len(list((tmp_path / "out").rglob("*.png"))) == 24


def test_bench_quick_writes_the_fields(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, train_x=rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), train_y=np.arange(32) % 4,
             test_x=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), test_y=np.arange(16) % 4)
    out = tmp_path / "victim.json"
    done = subprocess.run([sys.executable, str(REPO / "bench/victim.py"), "--quick", "--npz", str(npz), "--json",
                           str(out), "--archs", "fastvgg_cifar,resnet18_cifar_slim", "--format-batch", "4",
                           "--recipe-set", "cycle_momentum=false", "--recipe-set", "lookahead_every=2"],
                          capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                          timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    records = {r["arch"]: r for r in results["records"]}
    assert set(records) == {"fastvgg_cifar", "resnet18_cifar_slim"}
    for record in records.values():
        for key in ("arch", "images", "epochs", "test_accuracy", "wall_s", "threads", "epoch_s", "precision",
                    "channels_last", "cpu", "torch"):
            assert key in record, key
    assert records["fastvgg_cifar"]["images"] == 32 and records["fastvgg_cifar"]["epochs"] == 1
    recipe = records["fastvgg_cifar"]["recipe"]  # --recipe-set reaches the fast victim's recipe, and only it
    assert recipe["cycle_momentum"] is False and recipe["lookahead_every"] == 2
    assert records["resnet18_cifar_slim"]["recipe"]["lookahead_every"] == 0
    assert results["ratios"][0]["arch"] == "resnet18_cifar_slim" and results["ratios"][0]["ratio_vs_fast"] > 0
    assert {(r["precision"], r["channels_last"]) for r in results["formats"]["rows"]} == {
        ("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)}
    assert "x the fast victim" in done.stdout
    steps = results["step_ratios"]["rows"]
    assert set(steps) == {"fastvgg_cifar", "resnet18_cifar_slim"} and steps["fastvgg_cifar"]["ratio_vs_fast"] == 1.0
