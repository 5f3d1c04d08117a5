"""Every registered protection method, on real data (scikit-learn digits at 16 px, tiny surrogates):
the budget in the method's own norm, valid range, gray stays gray, shapes, determinism, and each
method's defining property; plus pseudo-labels by clustering."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ueguard.data.working_set import WorkingSet
from ueguard.engine.clusters import cluster_features
from ueguard.engine.runtime import Runtime
from ueguard.methods import METHODS, NORMS, apply_delta, create_method, list_methods, norm_of
from ueguard.methods.ar import ar_realise, random_filters
from ueguard.methods.ops import CORNERS
from ueguard.models import create_model

#: Canonical method names (aliases such as ``sp`` are the same class).
CANONICAL = [name for name, cls in METHODS.items() if cls.name == name]
SURROGATE = "resnet20_cifar"  # 0.27 M parameters: the cheapest real CNN in the zoo
#: Options that make each method a few seconds on 16-px digits (the quick preset underneath).
TINY = {
    "emn": dict(max_rounds=1, pgd_steps=2, train_steps=2, batch_size=40),
    "rem": dict(train_steps=2, pgd_steps=2, samples=1, adv_steps=1, batch_size=40),
    "tap": dict(train_epochs=1, steps=3, restarts=2, batch_size=40),
    "uc": dict(epochs=1, clusters=3, batch_size=40),
    "dune": dict(ensemble=2, train_epochs=2, steps=3, particles=3, pso_iterations=2, colour_batch=8, batch_size=40),
}
RUNTIME = Runtime.create("cpu", "fp32")


def make_digits(n_per_class: int, classes: int, gray: bool) -> WorkingSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.concatenate([np.flatnonzero(d.target == k)[:n_per_class] for k in range(classes)])
    x = torch.from_numpy(d.images[keep] / 16).float()[:, None]
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    if not gray:  # tint each image so the channels differ (a colour data set)
        tint = torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)
        images = (images.float() * tint).round().to(torch.uint8)
    return WorkingSet(images, torch.from_numpy(d.target[keep]).long(), torch.full((len(keep),), gray),
                      tuple(str(k) for k in range(classes)), [str(i) for i in keep])


@pytest.fixture(scope="module")
def digits() -> WorkingSet:
    return make_digits(10, 4, gray=False)


def run(name: str, data: WorkingSet, seed: int = 0, **options):
    """(method, perturbation) with a fresh surrogate seeded by ``seed``."""
    torch.manual_seed(seed)
    cls = METHODS.get(name)
    surrogate = create_model(SURROGATE, max(data.num_classes, 2)) if cls.needs_surrogate else None
    method = create_method(name, budget="quick", runtime=RUNTIME, surrogate=surrogate, seed=seed,
                           **{**TINY.get(name, {}), **options})
    return method, method(data)


@pytest.fixture(scope="module")
def results(digits):
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = run(name, digits)
        return cache[name]

    return get


def test_registry_has_every_method_and_the_alias():
    names = dict(list_methods())
    assert {"emn", "rem", "tap", "lsp", "sp", "ops", "ar", "uc", "pil"} <= set(names)
    assert METHODS.get("sp") is METHODS.get("lsp") and names["sp"] == "alias of lsp"
    assert all(METHODS.get(n).norm in NORMS for n in CANONICAL)
    assert not METHODS.get("uc").needs_labels and METHODS.get("uc").needs_pretrained
    assert {n for n in CANONICAL if not METHODS.get(n).needs_surrogate} == {"lsp", "ops", "ar", "pil"}


@pytest.mark.parametrize("name", CANONICAL)
def test_former_defaults_name_only_constants_no_preset_sets(name):
    """config_at applies a revision's former defaults above the budget presets (one value for every budget):
    right only while no preset sets those constants. Also: every listed revision is an earlier one, and each
    former value differs from today's default, or the listing would claim a change that is not there."""
    cls = METHODS.get(name)
    defaults = cls.config_class()
    for revision, former in cls.former_defaults.items():
        assert 1 <= revision < cls.defaults_revision
        for key, value in former.items():
            assert getattr(defaults, key) != value, (revision, key)
            assert all(key not in preset for preset in cls.presets.values()), (revision, key)
            assert getattr(cls.config_at(revision, "quick"), key) == value


@pytest.mark.parametrize("name", CANONICAL)
def test_budget_range_and_shape(name, results, digits):
    method, p = results(name)
    assert p.norm == type(method).norm
    n, k = len(digits), digits.num_classes
    rows = p.delta.shape[0]
    if p.classwise:
        assert rows == (k if p.assignment is None else int(p.assignment.max()) + 1)
    else:
        assert rows == n
    assert p.delta.shape[1:] == (3, 16, 16) and p.delta.dtype == torch.float32
    size = norm_of(p.delta, p.norm)
    assert (size <= p.eps * (1 + 1e-5) + 1e-6).all(), (name, size.max().item(), p.eps)
    assert (norm_of(p.delta, "l0") > 0).all(), "every row must perturb something"
    x = digits.images.float() / 255
    delta = p.for_samples(torch.arange(n), digits.labels, digits.grayscale)
    out = apply_delta(x, delta)
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().sum() > 0
    if p.norm == "linf":
        assert ((out - x).abs() <= p.eps + 1e-6).all()


@pytest.mark.parametrize("name", CANONICAL)
def test_gray_samples_get_gray_perturbations(name, results, digits):
    _, p = results(name)
    gray = torch.ones(len(digits), dtype=torch.bool)
    delta = p.for_samples(torch.arange(len(digits)), digits.labels, gray)
    assert torch.allclose(delta[:, 0], delta[:, 1]) and torch.allclose(delta[:, 1], delta[:, 2])
    assert (norm_of(delta, p.norm) <= p.eps * (1 + 1e-5) + 1e-6).all()  # the gray projection keeps the budget


@pytest.mark.parametrize("name", CANONICAL)
def test_same_seed_same_perturbation(name):
    small = make_digits(5, 3, gray=False)
    a = run(name, small)[1].delta
    b = run(name, small)[1].delta
    assert torch.equal(a, b)
    if name != "ops":  # OPS is a deterministic search: no randomness to seed
        assert not torch.equal(a, run(name, small, seed=1)[1].delta)


# ------------------------------------------------------------------------------------- model-free


def test_ops_changes_one_pixel_per_class_to_the_best_corner_colour(results, digits):
    _, p = results("ops")
    assert p.classwise and p.norm == "l0" and p.resample == "nearest"
    positions = set()
    for k in range(digits.num_classes):
        nonzero = torch.nonzero(p.delta[k].abs().sum(0))
        assert nonzero.shape[0] == 1                                       # exactly one position
        i, j = nonzero[0].tolist()
        colour = (p.delta[k, :, i, j] > 0).float()
        assert set(p.delta[k, :, i, j].tolist()) <= {-1.0, 1.0}
        positions.add((i, j, tuple(colour.tolist())))
        x = digits.images[digits.labels == k].float() / 255
        out = apply_delta(x, p.delta[k])
        assert torch.equal(out[:, :, i, j], colour.expand(x.shape[0], 3))   # the pixel is the corner colour
        assert torch.equal(out[:, :, :i], x[:, :, :i])                      # and nothing else moved
        # The chosen (position, colour) maximises mean/std of the change over the class (brute force).
        change = (CORNERS[:, None, :, None, None] - x[None]).abs().mean(2)  # 8×n×H×W
        score = change.mean(1) / change.std(1, unbiased=False).clamp_min(1e-6)
        best = score.max()
        chosen = score[int(torch.nonzero((CORNERS == colour).all(1))[0]), i, j]
        if k == 0:  # later classes may be denied a (position, colour) an earlier class took
            assert chosen >= best - 1e-4
    assert len(positions) == digits.num_classes                               # no shared shortcut


def test_lsp_is_patchwise_constant_classwise_and_l2_scaled(results, digits):
    method, p = results("lsp")
    assert p.classwise and p.norm == "l2"
    radius = 6 / 255 * math.sqrt(3 * 16 * 16)
    assert p.eps == pytest.approx(radius)
    assert norm_of(p.delta, "l2") == pytest.approx(torch.full((digits.num_classes,), radius), rel=1e-5)
    patch = p.info["patch"]
    assert patch == 4
    blocks = p.delta.unfold(2, patch, patch).unfold(3, patch, patch)     # K×3×4×4×p×p
    assert torch.allclose(blocks, blocks[..., :1, :1].expand_as(blocks))  # constant within every patch
    # Linearly separable: a least-squares one-vs-rest linear map classifies the class points perfectly.
    flat = torch.cat([p.delta.flatten(1), torch.ones(digits.num_classes, 1)], 1).double()
    weights = torch.linalg.lstsq(flat, torch.eye(digits.num_classes, dtype=torch.float64)).solution
    assert torch.equal((flat @ weights).argmax(1), torch.arange(digits.num_classes))
    same = run("sp", digits)[1]
    assert torch.equal(same.delta, p.delta)                                # the alias is the same method


def test_lsp_l2_budget_option_and_patch():
    data = make_digits(3, 3, gray=False)
    _, p = run("lsp", data, l2_eps=0.5, patch=8)
    assert norm_of(p.delta, "l2") == pytest.approx(torch.full((3,), 0.5), rel=1e-5)
    assert p.info["patch"] == 8 and p.info["dims"] == 3 * 2 * 2


def test_ar_noise_satisfies_its_classwise_recurrence(results, digits):
    _, p = results("ar")
    assert not p.classwise and p.norm == "l2"
    assert p.eps == pytest.approx(0.5)                                     # 1.0 · √(16·16)/32
    filters = torch.tensor(p.info["filters"]).view(digits.num_classes, 3, 3, 3)
    assert torch.allclose(filters.sum((-2, -1)), torch.ones(digits.num_classes, 3), atol=1e-3)
    assert (filters[..., 2, 2] == 0).all()
    delta = p.delta.double()
    taps = filters.double()[digits.labels]                                  # n×3×3×3
    windows = delta.unfold(2, 3, 1).unfold(3, 3, 1)                        # n×3×14×14×3×3
    terms = windows * taps[:, :, None, None]
    predicted = terms.sum((-2, -1))                                         # each pixel from its causal window
    scale = terms.abs().sum((-2, -1)) + delta[:, :, 2:, 2:].abs()           # float32 storage: relative error
    assert ((predicted - delta[:, :, 2:, 2:]).abs() <= 1e-5 * scale + 1e-12).all()
    # Stationary-looking: the energy is spread over the image, not piled into the last corner.
    corner = delta[:, :, -4:, -4:].pow(2).sum() / delta.pow(2).sum()
    assert corner < 0.5, corner
    # A fresh realisation per image: two images of one class get different noise.
    same_class = torch.nonzero(digits.labels == 0).flatten()[:2]
    assert not torch.allclose(p.delta[same_class[0]], p.delta[same_class[1]])


def test_ar_realise_stays_finite_for_unstable_filters():
    filters = torch.zeros(2, 3, 3, 3)
    filters[..., 1, 2] = 3.0                                                # x[i, j] = 3·x[i−1, j]: explodes
    filters[..., 2, 1] = -2.0
    out = ar_realise(filters, (40, 40), 4, torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    assert torch.allclose(random_filters(5, torch.Generator().manual_seed(0)).sum((-2, -1)), torch.ones(5, 3))


# -------------------------------------------------------------------------------- surrogate-based


def test_tap_targets_a_wrong_class_and_skips_training_a_fitted_surrogate():
    data = make_digits(10, 3, gray=False)
    torch.manual_seed(0)
    surrogate = create_model(SURROGATE, 3)
    tap = create_method("tap", budget="quick", runtime=RUNTIME, surrogate=surrogate, train_epochs=20,
                        fit_accuracy=0.6, eps=32 / 255, steps=30, step_fraction=0.15, restarts=1, batch_size=10)
    p = tap(data)
    fitted = p.info["surrogate_clean_accuracy"]
    assert p.info["clean_train_epochs"] >= 1 and fitted > p.info["surrogate_clean_accuracy_before"]
    targets = tap.targets(data.labels, 3)
    assert (targets != data.labels).all()                                   # always a wrong class
    x = data.images.float() / 255
    model = tap.surrogate.eval()
    with torch.no_grad():
        on_target = (model(apply_delta(x, p.delta)).argmax(1) == targets).float().mean().item()
        clean_on_target = (model(x).argmax(1) == targets).float().mean().item()
    # At ε = 8/255 how many images reach their target depended on how far the surrogate's fit happened to
    # get on a CPU model (47 % on an AMD EPYC with a barely fitted ResNet-20; 7 % on an Intel Xeon, where the
    # same seed fitted it to 97 %). At 32/255 on these 16-px digits the attack has room on either: measured
    # 97 % of the protected images on target against 0 % of the clean ones (Intel Xeon).
    assert on_target >= 0.6 and on_target > clean_on_target + 0.5, (on_target, clean_on_target)
    assert p.info["target_success"] == pytest.approx(on_target, abs=1e-4)  # recorded to 4 decimals
    # The now clean-trained surrogate (as if loaded with --weights) is used as is.
    again = create_method("tap", budget="quick", runtime=RUNTIME, surrogate=model, fit_accuracy=fitted - 1e-3, steps=1,
                          restarts=1, batch_size=15)(data)
    assert again.info["clean_train_epochs"] == 0


def test_rem_lowers_the_surrogate_loss_under_the_inner_max():
    data = make_digits(8, 3, gray=False)
    torch.manual_seed(0)
    rem = create_method("rem", budget="quick", runtime=RUNTIME, surrogate=create_model(SURROGATE, 3),
                        train_steps=12, pgd_steps=3, samples=1, adv_steps=2, batch_size=24)
    p = rem(data)
    assert p.info["rho_a"] == pytest.approx(4 / 255)                        # ρa = ρu / 2 by default
    x, y = data.images.float() / 255, data.labels
    protected = apply_delta(x, p.delta)
    robust_clean = rem.robust_loss(rem.surrogate, x, y)
    robust_rem = rem.robust_loss(rem.surrogate, protected, y)
    assert robust_rem < 0.85 * robust_clean, (robust_rem, robust_clean)  # measured: 1.08 vs 1.44
    with pytest.raises(ValueError, match="adv_eps"):
        METHODS.get("rem").make_config("quick", adv_eps=8 / 255)           # ρa must stay below ρu


def test_uc_needs_no_labels_and_moves_clusters_towards_their_targets():
    data = make_digits(8, 3, gray=False)
    unlabeled = WorkingSet(data.images, torch.full((len(data),), -1), data.grayscale, (), data.ids)
    torch.manual_seed(0)
    uc = create_method("uc", budget="quick", runtime=RUNTIME, surrogate=create_model(SURROGATE, 2),
                       clusters=3, epochs=4, batch_size=24)
    p = uc(unlabeled)
    assert p.classwise and p.assignment is not None and p.assignment.shape == (len(data),)
    assert p.delta.shape[0] == 3 and sorted(set(p.assignment.tolist())) == [0, 1, 2]
    assert p.info["cluster_sizes"] and sum(p.info["cluster_sizes"]) == len(data)
    # Each sample gets its cluster's δ, whatever (absent) label it has.
    rows = p.for_samples(torch.arange(len(data)), unlabeled.labels, unlabeled.grayscale)
    assert torch.equal(rows, p.delta[p.assignment])
    kl = p.info["kl"]
    assert sum(c["kl_protected"] for c in kl) < sum(c["kl_clean"] for c in kl), kl


# ----------------------------------------------------------------------------------- pseudo-labels


def test_clustering_finds_well_separated_groups_and_their_number():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]])
    truth = torch.arange(4).repeat_interleave(15)
    features = centres[truth] + 0.3 * torch.randn(60, 3, generator=gen)
    chosen = cluster_features(features, seed=0)
    assert chosen.k == 4 and chosen.chosen_by == "silhouette" and max(chosen.silhouette, key=chosen.silhouette.get) == 4
    # Same partition as the truth, up to renaming the clusters.
    pairs = set(zip(chosen.labels.tolist(), truth.tolist()))
    assert len(pairs) == 4
    given = cluster_features(features, 2, seed=0)
    assert given.k == 2 and given.chosen_by == "given" and given.centres.shape == (2, 3)
    with pytest.raises(ValueError, match="clusters"):
        cluster_features(features[:2])
