"""The ``classmean`` adaptive defense: estimate each class's additive pattern from its mean image and
subtract it; and ``classalign``, the same when each image may carry the pattern at its own shift."""

from __future__ import annotations

import pytest
import torch

from ueguard.defenses import DEFENSES, create_defense
from ueguard.defenses.classmean import class_patterns
from ueguard.engine.augment import roll_rows
from ueguard.errors import UsageError
from ueguard.sdk.verify import VerifyOptions

EPS = 8 / 255


def smooth_set(per_class: int, classes: int, size: int = 32, seed: int = 0):
    """uint8 smooth photos-like images with a natural, smooth colour cast per class, and their labels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(per_class * classes, 3, 4, 4, generator=g) * 0.7 + 0.15
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    labels = torch.arange(classes).repeat_interleave(per_class)
    cast = torch.linspace(-0.08, 0.08, classes).view(-1, 1, 1, 1) * torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)
    return x + cast[labels], labels


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def classwise_pattern(classes: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    """±ε sign patterns, one per class: what class-wise PGD releases."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (classes, 3, size, size), generator=g).float() * 2 - 1) * EPS


def test_a_planted_classwise_pattern_is_found_and_removed():
    clean, labels = smooth_set(200, 4)
    delta = classwise_pattern(4)
    released = to_uint8(clean + delta[labels])
    estimate = class_patterns(released, labels, sigma=1.0)
    # what carries the label is each class's pattern less the one all classes share (mean δ stays: harmless)
    distinct = delta - delta.mean(0)
    cos = torch.nn.functional.cosine_similarity(estimate.flatten(1), distinct.flatten(1))
    assert (cos > 0.9).all(), cos
    defense = create_defense("classmean")
    cleaned = defense.preprocess(released, labels).float() / 255

    def class_signal(x: torch.Tensor) -> torch.Tensor:  # the change from clean that differs between classes
        change = x - to_uint8(clean).float() / 255
        return change - change.mean(0)
    before = class_signal(released.float() / 255).pow(2).mean()
    assert class_signal(cleaned).pow(2).mean() < 0.2 * before
    assert defense.summary()["pattern_linf_255"] > 4


def test_clean_classes_keep_their_natural_smooth_differences():
    clean, labels = smooth_set(200, 4)
    images = to_uint8(clean)
    kept = create_defense("classmean").preprocess(images, labels)
    assert (kept.float() - images.float()).abs().mean() < 1.0  # grey levels: the smooth cast stays
    whole = create_defense("classmean", sigma=0.0).preprocess(images, labels)
    means = torch.stack([whole[labels == k].float().mean(0) for k in range(4)])
    assert (means - means.mean(0)).abs().max() < 1.5  # sigma 0: every class mean made the same
    assert (whole.float() - images.float()).abs().mean() > 3  # the cast itself was taken away


def test_samplewise_noise_averages_out_and_passes():
    clean, labels = smooth_set(200, 4)
    g = torch.Generator().manual_seed(3)
    noise = (torch.randint(0, 2, clean.shape, generator=g).float() * 2 - 1) * EPS
    released = to_uint8(clean + noise)
    cleaned = create_defense("classmean").preprocess(released, labels)
    changed = (cleaned.float() - released.float()).abs().mean()
    assert changed < 0.2 * EPS * 255  # a small fraction of the noise's own size


def test_an_empty_class_gets_no_pattern_and_a_bad_option_is_a_usage_error():
    clean, labels = smooth_set(20, 3)
    labels = torch.where(labels == 1, 2, labels)  # class 1 has no image
    patterns = class_patterns(to_uint8(clean), labels, sigma=1.0)
    assert patterns.shape[0] == 3 and torch.equal(patterns[1], torch.zeros_like(patterns[1]))
    with pytest.raises(ValueError, match="sigma"):
        DEFENSES.get("classmean").make_config(sigma=-1.0)
    with pytest.raises(UsageError, match="classmean.*sigma"):
        VerifyOptions.resolve(defense="classmean", defense_options=(("sigma", -1.0),))


def class_signal_left(released: torch.Tensor, cleaned: torch.Tensor, clean: torch.Tensor) -> float:
    """The class-specific change left after a defense, as a share of the release's own."""
    def signal(x: torch.Tensor) -> torch.Tensor:
        change = x.float() - to_uint8(clean).float()
        return change - change.mean(0)
    return float(signal(cleaned).pow(2).mean() / signal(released).pow(2).mean())


@pytest.mark.parametrize("shift", [0, 8])
def test_classalign_finds_a_pattern_moved_to_a_place_of_its_own_in_each_image(shift):
    clean, labels = smooth_set(150, 3)
    delta = classwise_pattern(3)
    offsets = torch.randint(0, max(shift, 1), (len(labels), 2), generator=torch.Generator().manual_seed(5))
    released = to_uint8(clean + roll_rows(delta[labels], offsets))
    aligned = create_defense("classalign")
    left = class_signal_left(released, aligned.preprocess(released, labels), clean)
    assert left < 0.15, left
    assert all(v > 8 for v in aligned.summary()["alignment_sharpness"].values())  # a pattern was found
    if shift:  # the plain class mean sees only a blur of the moved pattern
        assert class_signal_left(released, create_defense("classmean").preprocess(released, labels), clean) > 0.7


def test_classalign_costs_clean_images_little_and_refuses_zero_rounds():
    clean, labels = smooth_set(150, 3)
    images = to_uint8(clean)
    defense = create_defense("classalign")
    assert (defense.preprocess(images, labels).float() - images.float()).abs().mean() < 1.0
    assert all(v < 8 for v in defense.summary()["alignment_sharpness"].values())  # nothing stood out
    with pytest.raises(ValueError, match="iterations"):
        DEFENSES.get("classalign").make_config(iterations=0)
