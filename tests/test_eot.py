"""Differentiable stand-ins of the squeezing defenses (``ueguard.engine.eot``) and the ``squeeze`` option of
the methods that optimise through them (EMN, SSC, BAIT)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from test_methods import make_digits, run
from trees import write_class_tree
from ueguard.cli import main
from ueguard.defenses.squeeze import bit_depth_reduce, grayscale, jpeg_squeeze
from ueguard.engine import eot
from ueguard.methods import METHODS
from ueguard.methods.base import OptionError

SQUEEZING = ("bait", "emn", "ssc")


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 ``n×3×size×size`` images of smooth colour blobs: what JPEG keeps well, like photos."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def test_modes_are_none_and_every_ordered_set_of_squeezes():
    assert eot.SQUEEZE_MODES[0] == "none" and len(eot.SQUEEZE_MODES) == 8
    assert eot.squeeze_kinds("none") == () and eot.squeeze_kinds("gray+jpeg") == ("gray", "jpeg")
    with pytest.raises(ValueError, match="unknown squeeze 'jpeg\\+gray'.*gray\\+jpeg"):
        eot.squeeze_kinds("jpeg+gray")


def test_soft_gray_is_the_defenses_luma_before_rounding():
    images = smooth_images(4)
    soft = eot.soft_gray(images.float() / 255) * 255
    assert (soft - grayscale(images).float()).abs().max() <= 0.5 + 1e-4
    assert torch.equal(soft[:, 0], soft[:, 2])


def test_soft_bdr_is_the_defense_forward_and_the_identity_backward():
    x = (smooth_images(3).float() / 255).requires_grad_(True)
    y = eot.soft_bdr(x, 2)
    assert torch.equal((y * 255).round().to(torch.uint8), bit_depth_reduce((x.detach() * 255).round().to(torch.uint8), 2))
    (w := torch.randn_like(x)).requires_grad_(False)
    (y * w).sum().backward()
    assert torch.equal(x.grad, w)


def test_soft_jpeg_is_close_to_pillows_codec_and_passes_a_gradient():
    images = smooth_images(16)
    x = (images.float() / 255).requires_grad_(True)
    soft = eot.soft_jpeg(x, 10)
    pil = jpeg_squeeze(images, 10).float() / 255
    codec_error = (pil - x.detach()).abs().mean()  # what JPEG-10 itself changes
    assert (soft.detach() - pil).abs().mean() < 0.35 * codec_error
    soft.sum().backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_an_empty_draw_leaves_the_generator_untouched_and_a_seed_replays_a_draw():
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert torch.equal(eot.draw_squeeze(7, g, ()), torch.zeros(7, dtype=torch.long))
    assert torch.equal(g.get_state(), state)
    a = eot.draw_squeeze(400, torch.Generator().manual_seed(1), ("gray", "jpeg"))
    assert torch.equal(a, eot.draw_squeeze(400, torch.Generator().manual_seed(1), ("gray", "jpeg")))
    assert set(a.tolist()) == {0, 1, 2}  # identity and both squeezes, about a third each
    assert abs((a == 0).float().mean().item() - 1 / 3) < 0.1


def test_each_image_goes_through_the_squeeze_its_draw_names():
    x = smooth_images(6).float() / 255
    choice = torch.tensor([0, 1, 2, 3, 1, 0])
    kinds = ("gray", "jpeg", "bdr")
    out = eot.apply_squeeze(x, choice, kinds)
    assert torch.equal(out[[0, 5]], x[[0, 5]])
    assert torch.allclose(out[[1, 4]], eot.soft_gray(x[[1, 4]]))
    assert torch.allclose(out[2:3], eot.soft_jpeg(x[2:3]), atol=1e-6)
    assert torch.equal(out[3:4], eot.soft_bdr(x[3:4]))


@pytest.fixture(scope="module")
def digits():
    return make_digits(8, 3, gray=False)


@pytest.mark.parametrize("name", SQUEEZING)
def test_methods_declare_the_option_off_by_default(name):
    assert METHODS.get(name).make_config().squeeze == "none"
    with pytest.raises(OptionError, match="squeeze"):
        METHODS.get(name).make_config(squeeze="blur")


@pytest.mark.parametrize("name", SQUEEZING)
def test_generation_optimises_through_the_chosen_squeeze(name, digits, monkeypatch):
    """Every method routes x + δ through the stand-ins it was asked for, and only those; δ stays within
    ε and a seed replays it."""
    calls = {"gray": 0, "jpeg": 0, "bdr": 0}
    real = dict(eot.STAND_INS)

    def counted(kind):
        def stand_in(x):
            calls[kind] += len(x)
            return real[kind](x)
        return stand_in
    monkeypatch.setattr(eot, "STAND_INS", {k: counted(k) for k in real})
    _, plain = run(name, digits)
    assert calls == {"gray": 0, "jpeg": 0, "bdr": 0}
    _, first = run(name, digits, squeeze="gray+bdr")
    assert calls["gray"] > 0 and calls["bdr"] > 0 and calls["jpeg"] == 0
    _, again = run(name, digits, squeeze="gray+bdr")
    assert torch.equal(first.delta, again.delta)
    assert not torch.equal(first.delta, plain.delta)
    assert first.delta.abs().max() <= first.eps + 1e-7


def test_protect_cli_refuses_an_unknown_squeeze_as_usage(tmp_path):
    write_class_tree(tmp_path / "src", n_per_class=2, classes=2, size=16)
    result = CliRunner().invoke(main, ["protect", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                                       "--method", "emn", "-o", "squeeze=blur", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "squeeze" in result.output and "gray+jpeg" in result.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.png"))
