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
