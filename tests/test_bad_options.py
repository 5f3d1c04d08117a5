"""Bad requests: malformed or out-of-range ε, unknown method / defense / paradigm (the message lists the
valid ones), destinations that are inside SRC, not folders or not writable, and a disk that fills up
while saving. Each gives a clear message and the documented exit status (usage 2, fatal 1), and never
leaves a partial file under a final name."""

from __future__ import annotations

import errno
import os

import pytest
from click.testing import CliRunner
from PIL import Image

from trees import write_class_tree
from unprivileged import permissions_apply, run_ueguard
from ueguard.cli import main
from ueguard.data.images import load_image
from ueguard.data.manifest import MANIFEST_NAME, read_manifest

FAST = ["--budget", "quick", "--size", "16", "--device", "cpu", "--surrogate", "resnet18_cifar_slim",
        "-o", "max_rounds=1", "-o", "pgd_steps=1", "-o", "train_steps=1", "--quiet"]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def src(tmp_path):
    write_class_tree(tmp_path / "src", n_per_class=3, classes=2, size=16)
    return tmp_path / "src"


@pytest.mark.parametrize("eps, message", [
    ("8/0", "invalid eps"), ("nan", "invalid eps"), ("inf", "invalid eps"), ("-8/255", "invalid eps"),
    ("1e400", "invalid eps"), ("", "invalid eps"), ("8/255/2", "invalid eps"), ("0x8", "invalid eps"),
    ("65/255", "out of range"), ("0.5", "out of range"), ("0/255", "out of range"), ("256", "out of range"),
])
def test_bad_eps_is_a_usage_error_that_says_what_is_accepted(src, tmp_path, eps, message):
    result = invoke("protect", str(src), "--out", str(tmp_path / "out"), "--eps", eps)
    assert result.exit_code == 2, result.output
    assert message in result.output and "--eps" not in result.output.split("error:")[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, kind", [("--defense", "defenses"), ("--paradigm", "paradigms")])
def test_unknown_defense_or_paradigm_lists_the_valid_ones(tmp_path, src, option, kind):
    from ueguard.defenses import DEFENSES, PARADIGMS

    registry = DEFENSES if kind == "defenses" else PARADIGMS
    result = invoke("verify", str(src), "--test", str(src), option, "nope", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert f"valid {kind}: {', '.join(registry.names())}" in result.output and "'nope'" in result.output


def test_unknown_method_lists_the_valid_ones(src, tmp_path):
    result = invoke("protect", str(src), "--out", str(tmp_path / "out"), "--method", "emm")
    assert result.exit_code == 2
    from ueguard.methods import METHODS

    assert "unknown method 'emm' (did you mean" in result.output and "emn" in result.output.split("valid")[0]
    assert f"valid methods: {', '.join(METHODS.names())}" in result.output


def test_destination_that_is_a_file_or_under_a_file_is_refused(src, tmp_path):
    (tmp_path / "file.txt").write_text("user data")
    for dst, message in ((tmp_path / "file.txt", "exists and is not a folder"),
                         (tmp_path / "file.txt" / "out", "cannot create the output folder")):
        result = invoke("protect", str(src), "--out", str(dst), *FAST)
        assert result.exit_code == 2, result.output
        assert message in result.output and str(dst) in result.output
    assert (tmp_path / "file.txt").read_text() == "user data"


def test_destination_that_is_not_writable_is_refused(src, tmp_path):
    reason = permissions_apply()
    if reason:
        pytest.skip(reason)
    locked = tmp_path / "locked"
    (locked / "empty").mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    locked.chmod(0o555)
    (locked / "empty").chmod(0o555)
    try:
        new = run_ueguard("protect", str(src), "--out", str(locked / "new"), *FAST)
        empty = run_ueguard("protect", str(src), "--out", str(locked / "empty"), *FAST)
    finally:
        (locked / "empty").chmod(0o755)
        locked.chmod(0o755)
    assert new.returncode == 2 and "cannot create the output folder" in new.stderr and "Permission denied" in new.stderr
    assert empty.returncode == 2 and f"{locked / 'empty'} is not writable" in empty.stderr
    assert not list(locked.rglob("*.png"))


def test_disk_full_while_saving_stops_with_exit_1_and_leaves_no_partial_file(src, tmp_path, monkeypatch):
    """The third save fails with ENOSPC after writing part of the file: the run stops (no point failing
    every remaining file), nothing partial exists under a final name, and --resume then finishes."""
    real_save, calls = Image.Image.save, []

    def save_until_full(self, fp, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            fp.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)  # a partial file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(Image.Image, "save", save_until_full)
    result = invoke("protect", str(src), "--out", str(out), *FAST)
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and "--resume" in result.output
    assert "Traceback" not in result.output
    assert not list(out.rglob("*.tmp"))
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 2 and all(load_image(p).pixels.shape == (16, 16, 3) for p in pngs)  # complete files only
    records = [r for r in read_manifest(out / MANIFEST_NAME) if r["kind"] == "file"]
    assert [r["status"] for r in records] == ["ok", "ok"]

    monkeypatch.setattr(Image.Image, "save", real_save)
    resumed = invoke("protect", str(src), "--out", str(out), *FAST, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert len([r for r in read_manifest(out / MANIFEST_NAME) if r["kind"] == "file"]) == 6
    assert not list(out.rglob("*.tmp"))


def test_per_file_write_errors_other_than_a_full_disk_fail_only_that_file(src, tmp_path, monkeypatch):
    real_save, calls = Image.Image.save, []

    def save_with_one_io_error(self, fp, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_with_one_io_error)
    result = invoke("protect", str(src), "--out", str(tmp_path / "out"), *FAST)
    assert result.exit_code == 3, result.output
    statuses = [r["status"] for r in read_manifest(tmp_path / "out" / MANIFEST_NAME) if r["kind"] == "file"]
    assert statuses.count("failed") == 1 and statuses.count("ok") == 5
    assert "Input/output error" in result.output


# --------------------------------------------------------------------------------------------------
# method constants (-o KEY=VALUE): every field of every registered method is typed and bounded


def method_fields():
    """(method, field, kind, optional, bounds) for every constant of every registered method (not aliases)."""
    import dataclasses

    from ueguard.methods import METHODS
    from ueguard.methods.base import Bounds, _field_types

    for name, cls in METHODS.items():
        if cls.name != name:
            continue
        kinds = _field_types(cls.config_class)
        for f in dataclasses.fields(cls.config_class):
            yield name, f.name, *kinds[f.name], f.metadata.get("bounds", Bounds())


def bad_values(kind: str, bounds) -> list:
    """Values a field of ``kind`` with ``bounds`` must refuse: the wrong type, non-finite, just outside its range."""
    if kind == "bool":
        return [1, "yes", 0.0]
    if kind == "str":
        return [1, 2.5, True] + (["no-such-choice"] if bounds.choices else [])
    out = ["abc", True, float("nan"), float("inf"), float("-inf")] + ([2.5] if kind == "int" else [])
    step = 1 if kind == "int" else max(1e-9, abs(bounds.low or 0) * 1e-6)
    out.append(bounds.low if bounds.above else bounds.low - step)
    out.append(bounds.high + (1 if kind == "int" else max(1e-6, abs(bounds.high) * 1e-6)))
    return out


def test_every_numeric_method_constant_declares_its_range():
    """A new method's constants are covered by the tests below for free, as long as it declares their range."""
    undeclared = [f"{m}.{f}" for m, f, kind, _, b in method_fields()
                  if kind in ("int", "float") and (b.low is None or b.high is None)]
    assert not undeclared, f"declare the range of these constants with option(default, low, high): {undeclared}"


BAD_CASES = [pytest.param(m, f, v, id=f"{m}.{f}={v!r}")
             for m, f, kind, _, b in method_fields() if b.low is not None or kind in ("bool", "str")
             for v in bad_values(kind, b)]


@pytest.mark.parametrize("method, key, value", BAD_CASES)
def test_a_method_constant_of_the_wrong_type_or_out_of_range_is_a_usage_error_naming_it(method, key, value):
    from ueguard.errors import UsageError
    from ueguard.sdk.options import ProtectOptions

    if key in ("seed", "eps"):  # run options: checked through --seed/--eps (below)
        from ueguard.methods import METHODS

        with pytest.raises(ValueError, match=f"option {key} must be"):
            METHODS.get(method).make_config("standard", **{key: value})
        return
    with pytest.raises(UsageError) as error:
        ProtectOptions.resolve(method=method, method_options=((key, value),))
    message = str(error.value)
    assert f"method {method!r}, option {key} must be" in message and repr(value) in message


@pytest.mark.parametrize("method, key, value", [(m, f, b.low if not b.above else b.high)
                                                for m, f, kind, _, b in method_fields()
                                                if kind in ("int", "float") and f not in ("seed", "eps")])
def test_the_declared_bounds_themselves_are_accepted(method, key, value):
    from ueguard.methods import METHODS

    config = METHODS.get(method).make_config("standard", **{key: value})
    assert getattr(config, key) == value


def test_an_int_given_for_a_float_constant_is_taken_as_that_float():
    from ueguard.methods import METHODS

    config = METHODS.get("emn").make_config("standard", lr=1)
    assert config.lr == 1.0 and isinstance(config.lr, float)


@pytest.mark.parametrize("args, message", [
    (["-o", "pgd_steps=abc"], "option pgd_steps must be an integer from 1 to 10000, got 'abc'"),
    (["-o", "pgd_steps=2.5"], "option pgd_steps must be an integer from 1 to 10000, got 2.5"),
    (["-o", "train_steps=-1"], "option train_steps must be an integer from 0 to 100000, got -1"),
    (["-o", "stop_accuracy=nan"], "option stop_accuracy must be a number above 0 and at most 2"),
    (["--method", "lsp", "-o", "l2_eps=nan"], "option l2_eps must be a number from 0.00392157 (1/255) to 2000"),
    (["--method", "lsp", "-o", "l2_eps=1e-5"], "rounds away"),
    (["--method", "lsp", "-o", "patch=100000"], "option patch must be an integer from 1 to 1024"),
    (["--method", "ar", "-o", "crop=100000"], "option crop must be an integer from 2 to 64"),
    (["-o", "seed=7"], "-o seed=7 is not a method constant; give --seed"),
    (["-o", "eps=0.1"], "-o eps=0.1 is not a method constant; give --eps"),
    (["--perturbation", "classwise", "-o", "perturbation=samplewise"], "contradicts -o perturbation=samplewise"),
])
def test_bad_method_options_exit_2_before_anything_is_written(src, tmp_path, args, message):
    out = tmp_path / "out"
    common = ["--budget", "quick", "--size", "16", "--device", "cpu", "--quiet"] if "--method" in args else FAST
    result = invoke("protect", str(src), "--out", str(out), *common, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()  # no 0-byte manifest that would make the corrected command refuse the folder


def test_the_sdk_checks_method_options_alike(src, tmp_path):
    import ueguard.sdk
    from ueguard.errors import UsageError

    for options, message in (({"pgd_steps": 2.5}, "pgd_steps must be an integer"),
                             ({"seed": 7}, "give --seed"), ({"colour_eps": 0.1}, "no option colour_eps")):
        with pytest.raises(UsageError, match=message):
            ueguard.sdk.protect(src, tmp_path / "out", "emn", method_options=options, device="cpu")
    with pytest.raises(UsageError, match="patch must be an integer from 1 to 1024"):
        ueguard.sdk.protect(src, tmp_path / "out", "lsp", method_options={"patch": 10**5}, device="cpu")
    assert not (tmp_path / "out").exists()


def test_a_patch_wider_than_the_image_costs_only_the_image():
    import torch

    from ueguard.methods.lsp import patch_upsample

    points = torch.randn(2, 3)
    wide = patch_upsample(points, (16, 12), 1024)
    assert wide.shape == (2, 3, 16, 12) and torch.equal(wide, points.view(2, 3, 1, 1).expand(-1, -1, 16, 12))
    points = torch.randn(2, 3 * 2 * 2)
    repeated = points.view(2, 3, 2, 2).repeat_interleave(4, 2).repeat_interleave(4, 3)[:, :, :7, :8]
    assert torch.equal(patch_upsample(points, (7, 8), 4), repeated)  # what it computed before, for a fitting patch


def test_ssc_checks_its_stage_names_when_built_not_when_generating():
    """The surrogate is built before the output folder is created, so a misspelt stage is refused there."""
    from ueguard import models
    from ueguard.engine.runtime import Runtime
    from ueguard.methods import METHODS

    cls = METHODS.get("ssc")
    surrogate = models.create_model("resnet18_cifar_slim", 2)
    with pytest.raises(ValueError, match="stage 'layer9' is not a body stage"):
        cls(cls.make_config("quick", frozen_stage="layer9"), runtime=Runtime.create("cpu", "fp32"), surrogate=surrogate)


def test_a_seed_torch_cannot_take_is_a_usage_error_naming_seed(src, tmp_path):
    result = invoke("protect", str(src), "--out", str(tmp_path / "out"), *FAST, "--seed", str(2**64))
    assert result.exit_code == 2 and "invalid seed 18446744073709551616" in result.output, result.output
    from ueguard.methods.base import Bounds

    assert Bounds(-(2**63), 2**64 - 1).describe("int") == "an integer from -9223372036854775808 to 18446744073709551615"


def test_numpy_numbers_from_the_sdk_are_taken_as_python_numbers():
    import numpy as np

    from ueguard.methods import METHODS

    config = METHODS.get("emn").make_config("standard", pgd_steps=np.int64(5), lr=np.float32(0.5))
    assert config.pgd_steps == 5 and type(config.pgd_steps) is int and type(config.lr) is float
    with pytest.raises(ValueError, match="pgd_steps must be an integer"):
        METHODS.get("emn").make_config("standard", pgd_steps=np.float64(5.0))
