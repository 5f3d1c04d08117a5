"""SSC and BAIT, the two methods built to survive a pretrained backbone: their building blocks (the
channel PCA, the camouflage ratio, BAIT's target schedule), the released δ (budget, range, gray,
class-wise shape, seeds), that each optimises what it claims to, and the CLI/SDK path with a
pretrained ``--weights`` file (made here from a tiny model trained for a few steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from trees import write_class_tree
from ueguard.cli import main
from ueguard.data.manifest import MANIFEST_NAME, read_manifest
from ueguard.data.working_set import WorkingSet
from ueguard.engine.loops import OptimConfig, Trainer
from ueguard.engine.runtime import Runtime
from ueguard.errors import UsageError
from ueguard.methods import METHODS, create_method
from ueguard.methods.bait import TARGET_STAGES, choose_targets, class_means, target_stage
from ueguard.methods.ssc import channel_pca, out_of_subspace_ratio
from ueguard.models import create_model, save_checkpoint

EPS = 8 / 255
CPU = Runtime.create("cpu", "fp32")
ARCH = "resnet20_cifar"


@pytest.fixture(scope="module")
def digits() -> WorkingSet:
    """120 real digits of 4 classes at 16×16 (every fifth one in colour, the rest flagged gray)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.flatnonzero(d.target < 4)[:120]
    x = torch.from_numpy(d.images[keep] / 16).float()[:, None]
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    gray = torch.ones(len(keep), dtype=torch.bool)
    colour = torch.arange(len(keep)) % 5 == 0
    images[colour, 0] = images[colour, 0] // 2            # tint: these are RGB images, free to get colour noise
    gray[colour] = False
    return WorkingSet(images, torch.from_numpy(d.target[keep]).long(), gray, tuple("0123"), [str(i) for i in keep])


def pretrained(data: WorkingSet, seed: int = 0, steps: int = 30):
    """A tiny prior: the CIFAR ResNet-20 trained for a few SGD steps on the set."""
    torch.manual_seed(seed)
    model = CPU.prepare_model(create_model(ARCH, data.num_classes))
    trainer = Trainer(model, CPU, OptimConfig(lr=0.05))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(data), generator=g)[:32]
        trainer.step(CPU.to_float(data.images[idx]), data.labels[idx])
    return model


@pytest.fixture(scope="module")
def prior_state(digits):
    return pretrained(digits).state_dict()


def surrogate(state) -> torch.nn.Module:
    model = create_model(ARCH, 4)
    model.load_state_dict(state)
    return model


def run(name: str, data: WorkingSet, state, seed: int = 0, **options):
    method = create_method(name, budget="quick", runtime=CPU, surrogate=surrogate(state), seed=seed, **options)
    return method(data)


def assert_valid(delta: torch.Tensor, data: WorkingSet, classwise: bool) -> None:
    assert delta.dtype == torch.float32
    assert delta.abs().max() <= EPS + 1e-6
    rows = delta[data.labels] if classwise else delta
    x = data.images.float() / 255
    out = (x + rows).clamp(0, 1)
    assert ((out - x).abs() <= EPS + 1e-6).all()


# --- SSC building blocks ------------------------------------------------------------------------------


def test_channel_pca_is_orthonormal_and_keeps_the_top_variance():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([5.0, 3.0, 2.0, 0.5, 0.2, 0.1])
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    vectors = (torch.randn(20_000, 6, generator=g) * scales) @ rotation.T + 3.0   # a non-zero mean too
    features = vectors.reshape(50, 20, 20, 6).permute(0, 3, 1, 2)
    basis, explained = channel_pca(features, energy=0.9)
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5)
    variance = scales**2 / (scales**2).sum()            # ≈ 0.66, 0.24, 0.10, ...: 90 % needs three
    assert basis.shape == (6, 3)
    assert torch.allclose(explained, variance, atol=0.02)
    assert explained[:3].sum() >= 0.9 > explained[:2].sum()
    # span(U) is the span of the three largest axes of the rotated data
    top = rotation[:, :3]
    assert torch.allclose(basis @ basis.T, top @ top.T, atol=0.05)
    from sklearn.decomposition import PCA

    ref = PCA(n_components=6).fit(vectors.numpy()).explained_variance_ratio_
    assert np.allclose(explained.numpy(), ref, atol=1e-4)


def test_out_of_subspace_ratio_is_zero_inside_and_one_orthogonal():
    basis = torch.eye(4)[:, :2]                                   # span of channels 0, 1
    inside = torch.zeros(3, 4, 5, 5)
    inside[:, :2] = torch.randn(3, 2, 5, 5)
    outside = torch.zeros(3, 4, 5, 5)
    outside[:, 2:] = torch.randn(3, 2, 5, 5)
    assert torch.allclose(out_of_subspace_ratio(inside, basis), torch.zeros(3), atol=1e-6)
    assert torch.allclose(out_of_subspace_ratio(outside, basis), torch.ones(3), atol=1e-6)
    half = inside / inside.flatten(1).norm(dim=1)[:, None, None, None] + outside / outside.flatten(1).norm(dim=1)[:, None, None, None]
    assert torch.allclose(out_of_subspace_ratio(half, basis), torch.full((3,), 0.5), atol=1e-5)


# --- BAIT building blocks -----------------------------------------------------------------------------


def test_target_schedule_is_hardest_then_random_then_least():
    stages = [target_stage(i, 90) for i in range(90)]
    assert stages == ["hardest"] * 30 + ["random"] * 30 + ["least"] * 30
    assert [target_stage(i, 3) for i in range(3)] == list(TARGET_STAGES)
    assert [target_stage(i, 7) for i in range(7)] == ["hardest"] * 3 + ["random"] * 2 + ["least"] * 2
    assert target_stage(0, 1) == "hardest"
    with pytest.raises(ValueError):
        target_stage(90, 90)


def test_choose_targets_never_picks_the_true_class():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 5, generator=g)
    labels = torch.randint(0, 5, (500,), generator=g)
    logits[torch.arange(500), labels] += 10          # the true class is the model's favourite ...
    hardest = choose_targets("hardest", logits, labels, g)
    expected = logits.clone()
    expected[torch.arange(500), labels] = -1e9
    assert torch.equal(hardest, expected.argmax(1))   # ... so the hardest wrong class is the runner-up
    assert torch.equal(choose_targets("least", logits, labels, g), logits.argmin(1))
    random = choose_targets("random", logits, labels, g)
    assert (random != labels).all() and (hardest != labels).all()
    counts = torch.bincount((random - labels) % 5, minlength=5)
    assert counts[0] == 0 and counts[1:].min() > 80    # uniform over the 4 wrong classes
    with pytest.raises(ValueError, match="hardest"):
        choose_targets("nearest", logits, labels, g)


def test_class_means_are_per_class_averages_with_zero_for_absent_classes():
    values = torch.arange(12.0).reshape(4, 3)
    means = class_means(values, torch.tensor([0, 2, 0, 2]), 3)
    assert torch.equal(means, torch.stack([values[[0, 2]].mean(0), torch.zeros(3), values[[1, 3]].mean(0)]))


# --- the methods --------------------------------------------------------------------------------------


@pytest.mark.parametrize("parameterisation", ["direct", "generator"])
def test_bait_releases_class_wise_noise_in_budget_reproducibly(digits, prior_state, parameterisation):
    options = dict(parameterisation=parameterisation, iterations=3, batch_size=30, outer_batches=1, gen_width=4, gen_blocks=1)
    result = run("bait", digits, prior_state, **options)
    assert result.classwise and result.delta.shape == (4, 3, 16, 16)
    assert_valid(result.delta, digits, classwise=True)
    assert (result.delta.flatten(1).abs().amax(1) > 0).all()            # every class got noise
    assert [h["stage"] for h in result.info["history"]] == list(TARGET_STAGES)
    again = run("bait", digits, prior_state, **options)
    other = run("bait", digits, prior_state, seed=1, **options)
    assert torch.equal(result.delta, again.delta) and not torch.equal(result.delta, other.delta)


def test_bait_second_order_runs_and_differs_from_first_order(digits, prior_state):
    options = dict(iterations=2, batch_size=30, outer_batches=1)
    first = run("bait", digits, prior_state, **options)
    second = run("bait", digits, prior_state, second_order=True, **options)
    assert second.delta.shape == first.delta.shape and second.delta.abs().max() <= EPS + 1e-6
    assert not torch.equal(first.delta, second.delta)     # the gradient through θ′(δ) changes the steps


def test_bait_noise_binds_images_to_its_class(digits, prior_state):
    """With the surrogate held fixed (lr 0), BAIT's objective is a targeted one: adding δ_t to images of
    other classes must pull the surrogate towards t. The tiny prior is very confident on digits, so the
    mechanism is checked at a larger budget (32/255), where it shows within a few steps."""
    eps = 32 / 255
    result = run("bait", digits, prior_state, eps=eps, iterations=6, batch_size=120, lr=0.0, momentum=0.0,
                 weight_decay=0.0, direct_lr_fraction=0.4, augment=False)
    assert result.delta.abs().max() <= eps + 1e-6
    model = surrogate(prior_state).train()           # BAIT's surrogate runs on batch statistics
    x, y = digits.images.float() / 255, digits.labels
    loss, hits = {}, {}
    for shift in (1, 2, 3):
        t = (y + shift) % 4
        with torch.no_grad():
            noisy, clean = model((x + result.delta[t]).clamp(0, 1)), model(x)
        loss[shift] = (F.cross_entropy(noisy, t).item(), F.cross_entropy(clean, t).item())
        hits[shift] = ((noisy.argmax(1) == t).float().mean().item(), (clean.argmax(1) == t).float().mean().item())
    assert all(with_noise < 0.6 * without for with_noise, without in loss.values()), loss
    assert np.mean([a - b for a, b in hits.values()]) > 0.15, hits


def test_ssc_delta_in_budget_gray_stays_gray_and_reproducible(digits, prior_state):
    small = digits.subset(range(32))
    options = dict(max_rounds=1, train_steps=2, pgd_steps=3, batch_size=32, pca_images=32, perturbation="samplewise")
    result = run("ssc", small, prior_state, **options)
    delta = result.delta
    assert not result.classwise and delta.shape == (32, 3, 16, 16)
    assert_valid(delta, small, classwise=False)
    gray = small.grayscale
    assert torch.allclose(delta[gray, 0], delta[gray, 1]) and torch.allclose(delta[gray, 1], delta[gray, 2])
    assert not torch.allclose(delta[~gray, 0], delta[~gray, 1])          # colour images get colour noise
    assert delta.abs().mean() > 2 / 255
    assert set(result.info["subspace_dims"]) == {"stem", "layer1", "layer2"}
    again = run("ssc", small, prior_state, **options)
    other = run("ssc", small, prior_state, seed=1, **options)
    assert torch.equal(delta, again.delta) and not torch.equal(delta, other.delta)


def test_ssc_camouflage_keeps_the_feature_shift_in_the_semantic_subspace(digits, prior_state):
    small = digits.subset(range(48))
    options = dict(max_rounds=1, train_steps=2, pgd_steps=5, batch_size=24, pca_images=48, energy=0.7,
                   perturbation="samplewise")
    free = run("ssc", small, prior_state, camouflage_weight=0.0, **options).info["history"][-1]["out_of_subspace"]
    kept = run("ssc", small, prior_state, camouflage_weight=50.0, **options).info["history"][-1]["out_of_subspace"]
    assert kept < 0.7 * free, (kept, free)


def test_class_anchors_are_unit_directions_inside_the_subspace_with_their_natural_spread():
    from ueguard.methods.ssc import anchor_shift, class_anchors

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 8, 4, 4, generator=g) * torch.linspace(3, 0.1, 8).view(1, 8, 1, 1)
    basis, _ = channel_pca(feats, 0.95)
    anchors, sigma = class_anchors(feats, basis, 3, torch.Generator().manual_seed(1))
    assert anchors.shape == (8, 3) and basis.shape[1] >= 3
    assert torch.allclose(anchors.T @ anchors, torch.eye(3), atol=1e-5)              # orthonormal
    assert torch.allclose(basis @ (basis.T @ anchors), anchors, atol=1e-5)           # inside span(U)
    along = feats.permute(0, 2, 3, 1).reshape(-1, 8) @ anchors
    assert torch.allclose(sigma, along.std(0), rtol=1e-4)
    # a shift of 2σ along class 1's anchor at every location reads as 2 for a class-1 sample, ~0 for class 0
    shift = (2 * sigma[1] * anchors[:, 1]).view(1, 8, 1, 1).expand(2, 8, 4, 4)
    assert torch.allclose(anchor_shift(shift, anchors, sigma, torch.tensor([1, 0])), torch.tensor([2.0, 0.0]), atol=1e-4)
    fewer, _ = class_anchors(feats, basis[:, :2], 3, torch.Generator().manual_seed(1))  # k < K: unit, in span
    assert torch.allclose(fewer.norm(dim=0), torch.ones(3)) and torch.allclose(basis[:, :2] @ (basis[:, :2].T @ fewer), fewer, atol=1e-5)


def test_ssc_anchor_term_pushes_the_frozen_output_along_the_class_direction(digits, prior_state):
    small = digits.subset(range(48))
    # 32/255: at 8/255 the margin on this tiny prior is 0.06–0.10 σ and moves with the thread count (the
    # prior's 30 SGD steps differ between 1 and 2 threads); at 32/255 it is 0.27–0.34 at both
    options = dict(max_rounds=1, train_steps=2, pgd_steps=5, batch_size=24, pca_images=48, eps=32 / 255)
    default = run("ssc", small, prior_state, **options)
    assert "deceived" in default.info["history"][-1] and "anchor_shift" not in default.info["history"][-1]  # ρ 1, κ 0
    plain = run("ssc", small, prior_state, deception_weight=0, **options)
    assert not {"anchor_shift", "deceived"} & set(plain.info["history"][-1])  # both terms off
    weak = run("ssc", small, prior_state, anchor_weight=1e-6, **options)
    strong = run("ssc", small, prior_state, anchor_weight=50.0, **options)
    assert strong.delta.abs().max() <= 32 / 255 + 1e-6
    weak_shift, strong_shift = (r.info["history"][-1]["anchor_shift"] for r in (weak, strong))
    assert strong_shift > weak_shift + 0.1 and strong_shift > 0, (weak_shift, strong_shift)
    assert torch.equal(strong.delta, run("ssc", small, prior_state, anchor_weight=50.0, **options).delta)
    with pytest.raises(ValueError, match="anchor_weight"):
        run("ssc", small, prior_state, anchor_weight=-1.0)


def test_ssc_deception_term_makes_the_prior_read_the_shifted_class(digits, prior_state):
    small = digits.subset(range(48))
    # 32/255: at 8/255 a class-wise δ does not flip this tiny prior's reading of a 16-px gray digit
    options = dict(max_rounds=1, train_steps=2, pgd_steps=5, batch_size=24, pca_images=48, probe_images=48,
                   eps=32 / 255)
    weak = run("ssc", small, prior_state, deception_weight=1e-6, **options)
    strong = run("ssc", small, prior_state, deception_weight=20.0, **options)
    assert strong.delta.abs().max() <= 32 / 255 + 1e-6
    weak_hit, strong_hit = (r.info["history"][-1]["deceived"] for r in (weak, strong))
    assert strong_hit > weak_hit + 0.2, (weak_hit, strong_hit)
    with pytest.raises(ValueError, match="deception_shift"):
        run("ssc", small, prior_state, deception_weight=1.0, deception_shift=small.num_classes, **options)
    with pytest.raises(ValueError, match="deception_weight"):
        run("ssc", small, prior_state, deception_weight=-1.0)


def test_ssc_fresh_deep_init_resets_exactly_the_layers_after_the_frozen_stage(digits, prior_state):
    from ueguard.methods.ssc import _reset

    method = create_method("ssc", budget="quick", runtime=CPU, surrogate=surrogate(prior_state), frozen_stage="layer1")
    model = surrogate(prior_state)
    _, deep = method._split(model)
    _reset(deep, 1)
    deep_ids = {id(p) for module in deep for p in module.parameters()}
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, prior_state[name])}
    assert changed == {name for name, p in model.named_parameters() if id(p) in deep_ids}
    assert any("layer2" in name for name in changed) and not any("layer1" in name for name in changed)
    small = digits.subset(range(32))
    options = dict(max_rounds=1, train_steps=2, pgd_steps=3, batch_size=32, pca_images=32)
    fresh = run("ssc", small, prior_state, deep_init="fresh", **options)
    assert_valid(fresh.delta, small, classwise=True)
    assert not torch.equal(fresh.delta, run("ssc", small, prior_state, **options).delta)
    with pytest.raises(ValueError, match="deep_init"):
        run("ssc", small, prior_state, deep_init="random")


def test_ssc_classwise_releases_one_delta_per_class_in_budget(digits, prior_state):
    small = digits.subset(range(32))
    options = dict(max_rounds=1, train_steps=2, pgd_steps=3, batch_size=16, pca_images=32)
    result = run("ssc", small, prior_state, **options)  # class-wise is the default
    assert result.classwise and result.delta.shape == (4, 3, 16, 16)
    assert_valid(result.delta, small, classwise=True)
    assert (result.delta.flatten(1).abs().amax(1) > 0.5 * EPS).all()  # every class row moved, both batches
    assert torch.equal(result.delta, run("ssc", small, prior_state, perturbation="classwise", **options).delta)
    with pytest.raises(ValueError, match="perturbation"):
        run("ssc", small, prior_state, perturbation="pixelwise")


def test_ssc_through_augmentation_stays_in_budget_reproducible_and_changes_delta(digits, prior_state):
    small = digits.subset(range(32))
    options = dict(max_rounds=1, train_steps=2, pgd_steps=3, batch_size=16, pca_images=32)
    plain = run("ssc", small, prior_state, **options)
    crops = run("ssc", small, prior_state, augment="cropflip", **options)
    assert_valid(crops.delta, small, classwise=True)
    assert torch.equal(crops.delta, run("ssc", small, prior_state, augment="cropflip", **options).delta)
    assert not torch.equal(crops.delta, plain.delta)
    # The default is no augmentation (the setting the CIFAR-10 tables were measured with).
    assert torch.equal(plain.delta, run("ssc", small, prior_state, augment="none", **options).delta)
    with pytest.raises(ValueError, match="augment"):
        run("ssc", small, prior_state, augment="rotate")


def test_ssc_rejects_a_stage_the_model_does_not_have(digits, prior_state):
    with pytest.raises(ValueError, match="layer9"):
        run("ssc", digits.subset(range(8)), prior_state, frozen_stage="layer9")


# --- CLI and SDK --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_and_tree(tmp_path_factory, digits):
    base = tmp_path_factory.mktemp("pretrained")
    weights = save_checkpoint(pretrained(digits, steps=10), base / "prior.pth")   # 4 classes; the tree has 3
    write_class_tree(base / "photos", n_per_class=6, classes=3, size=20)
    return weights, base


def test_both_need_a_pretrained_surrogate(weights_and_tree):
    from ueguard.sdk import protect

    _, base = weights_and_tree
    for name in ("ssc", "bait"):
        assert METHODS.get(name).needs_pretrained
        with pytest.raises(UsageError, match=r"tried timm's resnet18\.a1_in1k from the hub.*--weights FILE"):
            protect(base / "photos", base / f"refused_{name}", name, size=16, device="cpu")  # offline here
        assert not (base / f"refused_{name}").exists()
    result = CliRunner().invoke(main, ["protect", str(base / "photos"), "--out", str(base / "refused"),
                                       "--method", "ssc", "--quiet"])
    assert result.exit_code == 2 and "needs a pretrained surrogate" in result.output
    listing = CliRunner().invoke(main, ["methods"]).output
    assert all(f"{name}" in listing for name in ("ssc", "bait")) and "needs pretrained surrogate" in listing
    refused = CliRunner().invoke(main, ["protect", str(base / "photos"), "--out", str(base / "refused"),
                                        "--method", "bait", "--surrogate", "resnet18_cifar", "--quiet"])
    assert refused.exit_code == 2 and "--surrogate resnet18.a1_in1k --pretrained" in refused.output


def test_a_method_that_needs_a_pretrained_surrogate_takes_timms_by_default(weights_and_tree, monkeypatch):
    """Where the hub is reachable (stood in for here: no network in tests), SSC without --weights uses timm's
    ImageNet ResNet-18 with its hub weights instead of refusing, and the manifest says so."""
    import importlib

    import timm

    from ueguard.data.manifest import MANIFEST_NAME, first_run
    from ueguard.sdk import protect

    factory = importlib.import_module("ueguard.models.factory")
    asked = []

    def from_hub(timm_module, name, num_classes):
        asked.append(name)
        return timm.create_model("resnet18", pretrained=False, num_classes=num_classes)

    monkeypatch.setattr(factory, "_download_pretrained", from_hub)
    _, base = weights_and_tree
    result = protect(base / "photos", base / "hub", "bait", size=16, device="cpu", budget="quick",
                     method_options={"iterations": 1})
    assert result.ok > 0 and asked and asked[0] == "resnet18.a1_in1k"
    header = first_run(base / "hub" / MANIFEST_NAME)
    assert header["surrogate"] == "resnet18.a1_in1k" and header["surrogate_from_hub"] is True


@pytest.mark.parametrize("method,options", [
    ("ssc", ["-o", "max_rounds=1", "-o", "pgd_steps=2", "-o", "train_steps=1", "-o", "pca_images=18"]),
    ("bait", ["-o", "iterations=3", "-o", "batch_size=9", "-o", "outer_batches=1", "-o", "parameterisation=generator",
              "-o", "gen_width=4"]),
])
def test_protect_cli_with_weights(weights_and_tree, method, options):
    weights, base = weights_and_tree
    out = base / f"out_{method}"
    result = CliRunner().invoke(main, ["protect", str(base / "photos"), "--out", str(out), "--method", method,
                                       "--weights", str(weights), "--surrogate", ARCH, "--size", "16",
                                       "--budget", "quick", "--device", "cpu", "--quiet", *options],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = list(read_manifest(out / MANIFEST_NAME))
    files = [r for r in records if r["kind"] == "file"]
    assert len(files) == 18 and all(r["status"] == "ok" and r["linf"] <= 8 + 1e-6 for r in files)
    assert max(r["linf"] for r in files) > 2                          # a real perturbation reached the files
    run_record = records[0]
    assert run_record["weights_sha256"] and run_record["surrogate"] == ARCH
    json.dumps(run_record)


def test_bait_steps_only_the_trained_parameters_of_a_surrogate_with_frozen_ones(digits):
    """fastvgg_cifar keeps its BatchNorm scales fixed (requires_grad False): BAIT's look-ahead differentiates
    the trained parameters only, and the frozen ones keep their values."""
    torch.manual_seed(0)
    model = create_model("fastvgg_cifar", 4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen  # the case under test
    method = create_method("bait", budget="quick", runtime=CPU, surrogate=model, seed=0,
                           iterations=2, batch_size=30, outer_batches=1)
    result = method(digits)
    assert result.delta.abs().max() <= EPS + 1e-6 and result.delta.abs().sum() > 0
    after = dict(method.surrogate.named_parameters())
    assert all(torch.equal(after[n].detach(), value) for n, value in frozen.items())
