"""The Python SDK: in-memory round trips in every accepted layout/dtype, and folder parity with the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trees import write_class_tree
from ueguard.errors import UsageError
from ueguard.sdk import protect

FAST = dict(budget="quick", device="cpu", surrogate="resnet18_cifar_slim", seed=0,
            method_options={"max_rounds": 2, "pgd_steps": 2, "train_steps": 2})


@pytest.fixture(scope="module")
def digits():
    """Real data: 60 of scikit-learn's 8×8 digits (3 classes), upscaled to 16×16 uint8 N×H×W×1."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.flatnonzero(d.target < 3)[:60]
    x = torch.from_numpy(d.images[keep] / 16).float()[:, None]
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return images, d.target[keep]


def test_uint8_nhwc_numpy_round_trip(digits):
    images, labels = digits
    result = protect(images, labels=labels, eps="8/255", **FAST)
    out = result.data
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == images.shape
    diff = np.abs(out.astype(int) - images.astype(int))
    assert diff.max() <= 8 and diff.mean() > 0.5
    assert len(result.items) == len(images)
    assert all(item["linf"] <= 8 for item in result.items)
    assert result.perturbation.delta.shape == (60, 3, 16, 16)
    np.testing.assert_array_equal(images, digits[0])  # the caller's array is not modified


def test_float_nchw_torch_rgb_round_trip():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 17, 19, generator=gen, dtype=torch.float64)
    labels = torch.arange(12) % 3
    before = x.clone()
    result = protect(x, labels=labels, eps=8, **FAST)
    out = result.data
    assert torch.is_tensor(out) and out.dtype == torch.float64 and out.shape == x.shape
    assert (out - x).abs().max() <= 8 / 255 + 1e-6
    assert (out - x).abs().mean() > 0.5 / 255
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(x, before)


def test_grayscale_input_gets_a_gray_perturbation(digits):
    images, labels = digits
    result = protect(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels=labels, **FAST)
    assert result.data.shape == (60, 1, 16, 16)
    delta = result.perturbation.for_samples(torch.arange(60), torch.as_tensor(labels), torch.ones(60, dtype=torch.bool))
    assert torch.allclose(delta[:, 0], delta[:, 1]) and torch.allclose(delta[:, 0], delta[:, 2])


def test_classwise_perturbation_is_one_tensor_per_class(digits):
    images, labels = digits
    result = protect(images, labels=labels, perturbation="classwise", **FAST)
    assert result.perturbation.classwise and result.perturbation.delta.shape == (3, 3, 16, 16)
    assert result.perturbation.delta.abs().max() <= 8 / 255 + 1e-7


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "needs labels"),
    (dict(labels=[0, 1]), "labels must be"),
    (dict(labels=list(range(4)), eps="nine"), "invalid eps"),
])
def test_in_memory_errors_are_clear(kwargs, message):
    with pytest.raises(UsageError, match=message):
        protect(np.zeros((4, 8, 8, 3), np.uint8), **kwargs)


def test_ambiguous_layout_needs_a_hint():
    with pytest.raises(UsageError, match="layout="):
        protect(np.zeros((4, 3, 8, 3), np.uint8), labels=[0, 1, 0, 1])


def test_folder_input_returns_paths_and_manifest(tmp_path):
    write_class_tree(tmp_path / "src", n_per_class=3, classes=2, size=16)
    result = protect(tmp_path / "src", tmp_path / "out", size=16, **FAST)
    assert result.ok == 6 and result.failed == 0
    assert all(p.is_file() for p in result.paths) and len(result.paths) == 6
    assert result.manifest_path.is_file()
    assert result.info["rounds"] >= 1


def test_float_nhwc_numpy_round_trip_keeps_layout_and_dtype(digits):
    images, labels = digits
    x = images.astype(np.float32) / 255  # N×H×W×1 float32 in [0, 1]
    result = protect(x, labels=labels, eps="8/255", **FAST)
    out = result.data
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == x.shape
    assert np.abs(out - x).max() <= 8 / 255 + 1e-6 and np.abs(out - x).mean() > 0.5 / 255


def test_grayscale_uint8_tensor_keeps_its_dtype(digits):
    images, labels = digits
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    out = protect(x, labels=labels, **FAST).data
    assert torch.is_tensor(out) and out.dtype == torch.uint8 and out.shape == x.shape
    assert (out.int() - x.int()).abs().max() <= 8
