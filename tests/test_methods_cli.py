"""Every method through ``ueguard protect`` on real image files, with its own budget checked on the
saved files; ``--labels auto`` pseudo-labels for flat folders; budget options per norm."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from test_methods import CANONICAL, SURROGATE, TINY
from trees import write_class_tree
from ueguard.cli import main
from ueguard.data.images import load_image
from ueguard.data.manifest import MANIFEST_NAME, read_manifest
from ueguard.methods import METHODS
from ueguard.models import create_model
from ueguard.sdk import protect

BASE = ["--budget", "quick", "--size", "16", "--device", "cpu", "--surrogate", SURROGATE, "--quiet"]


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def tiny_options(name: str) -> list[str]:
    return [arg for key, value in TINY.get(name, {}).items() for arg in ("-o", f"{key}={value}")]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A local checkpoint standing in for a pretrained prior (``--weights``)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "prior.pt"
    torch.save(create_model(SURROGATE, 2).state_dict(), path)
    return str(path)


def flat_folder(root, n_per_class: int = 4):
    """A folder of photos with no class subfolders."""
    write_class_tree(root / "tmp", n_per_class=n_per_class, classes=2, size=20)
    flat = root / "flat"
    flat.mkdir()
    for path in sorted((root / "tmp").rglob("*.png")):
        shutil.move(str(path), flat / f"{path.parent.name}_{path.name}")
    return flat


@pytest.mark.parametrize("name", CANONICAL)
def test_every_method_protects_a_folder_within_its_own_budget(tmp_path, name, weights):
    write_class_tree(tmp_path / "src", n_per_class=3, classes=2, size=20)  # 20 px files, 16 px working size
    cls = METHODS.get(name)
    extra = ["--weights", weights] if cls.needs_pretrained else []
    result = run_cli("protect", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--method", name, *BASE,
                     *tiny_options(name), *extra)
    assert result.exit_code == 0, result.output
    records = list(read_manifest(tmp_path / "out" / MANIFEST_NAME))
    generation = next(r for r in records if r["kind"] == "generation")
    assert generation["norm"] == cls.norm
    files = [r for r in records if r["kind"] == "file"]
    assert len(files) == 6 and all(r["status"] == "ok" for r in files)
    for rec in files:
        assert rec["norm"] == cls.norm and rec["within_budget"] is True, rec
        original = load_image(tmp_path / "src" / rec["source"]).pixels.astype(np.int64)
        saved = load_image(tmp_path / "out" / rec["output"]).pixels.astype(np.int64)
        diff = np.abs(saved - original) / 255
        if cls.norm == "linf":
            assert diff.max() <= rec["budget"] + 0.5 / 255 + 1e-9
        elif cls.norm == "l2":  # RMS at the native size within the working-size budget's RMS (+ rounding)
            budget_rms = rec["budget"] / np.sqrt(3 * 16 * 16)
            assert np.sqrt(np.mean(diff**2)) <= budget_rms * 1.02 + 0.5 / 255
            assert rec["rms"] == pytest.approx(np.sqrt(np.mean(diff**2)) * 255, abs=1e-3)
        else:  # one working pixel = at most a 2×2 block of the 20-px file
            changed = int(np.count_nonzero(diff.max(2)))
            assert changed == rec["l0"] and 1 <= changed <= 4
        assert diff.max() > 0


def test_l2_method_takes_its_own_budget_and_refuses_an_linf_eps(tmp_path):
    write_class_tree(tmp_path / "src", n_per_class=2, classes=2, size=16)
    refused = run_cli("protect", str(tmp_path / "src"), "--out", str(tmp_path / "a"), "--method", "lsp", *BASE,
                      "--eps", "4/255")
    assert refused.exit_code == 2 and "l2_eps" in refused.output and not (tmp_path / "a").exists()
    result = run_cli("protect", str(tmp_path / "src"), "--out", str(tmp_path / "b"), "--method", "sp", *BASE,
                     "-o", "l2_eps=0.3")
    assert result.exit_code == 0, result.output
    files = [r for r in read_manifest(tmp_path / "b" / MANIFEST_NAME) if r["kind"] == "file"]
    assert all(r["budget"] == pytest.approx(0.3) and r["norm"] == "l2" and r["within_budget"] for r in files)
    assert "RMS" in result.output


def test_flat_folder_needs_labels_auto_and_a_prior(tmp_path):
    flat = flat_folder(tmp_path)
    result = run_cli("protect", str(flat), "--out", str(tmp_path / "a"), "--method", "lsp", *BASE)
    assert result.exit_code == 2 and "--labels auto" in result.output
    result = run_cli("protect", str(flat), "--out", str(tmp_path / "b"), "--method", "lsp", *BASE, "--labels", "auto")
    assert result.exit_code == 2 and "--weights" in result.output and not (tmp_path / "b").exists()


@pytest.mark.parametrize("clusters", [["--clusters", "3"], []])
def test_labels_auto_pseudo_labels_a_flat_folder(tmp_path, weights, clusters):
    flat = flat_folder(tmp_path)
    result = run_cli("protect", str(flat), "--out", str(tmp_path / "out"), "--method", "lsp", *BASE,
                     "--labels", "auto", "--weights", weights, *clusters)
    assert result.exit_code == 0, result.output
    records = list(read_manifest(tmp_path / "out" / MANIFEST_NAME))
    pseudo = next(r for r in records if r["kind"] == "pseudo_labels")
    k = pseudo["clusters"]
    if clusters:
        assert k == 3 and pseudo["chosen_by"] == "given"
    else:  # chosen by silhouette over 2..min(10, N-1)
        assert pseudo["chosen_by"] == "silhouette" and 2 <= k <= 7 and str(k) in pseudo["silhouette"]
    files = [r for r in records if r["kind"] == "file"]
    assert len(files) == 8 and all(r["pseudo_label"] for r in files)
    assert {r["label"] for r in files} == {f"cluster_{i}" for i in range(k)}
    assert sum(pseudo["cluster_sizes"]) == 8
    # Class-wise LSP: files of one pseudo-class received the same δ (same working-size noise).
    generation = next(r for r in records if r["kind"] == "generation")
    assert generation["norm"] == "l2"


def test_uc_works_on_a_flat_folder_without_labels(tmp_path, weights):
    flat = flat_folder(tmp_path, n_per_class=3)
    result = run_cli("protect", str(flat), "--out", str(tmp_path / "out"), "--method", "uc", *BASE, "--weights",
                     weights, *tiny_options("uc"))
    assert result.exit_code == 0, result.output
    files = [r for r in read_manifest(tmp_path / "out" / MANIFEST_NAME) if r["kind"] == "file"]
    assert len(files) == 6 and all(r["status"] == "ok" and r["label"] is None for r in files)


def test_sdk_in_memory_labels_auto(weights):
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.flatnonzero(d.target < 3)[:24]
    images = (d.images[keep] / 16 * 255).round().astype(np.uint8)[..., None].repeat(3, axis=3)  # N×8×8×3
    result = protect(images, labels="auto", method="ar", device="cpu", surrogate=SURROGATE, weights=weights,
                     clusters=3, size=16)
    assert result.data.shape == images.shape
    assert result.labels is not None and set(result.labels.tolist()) == {0, 1, 2}
    assert result.info["pseudo_labels"]["clusters"] == 3
    assert all(item["within_budget"] for item in result.items)
    with pytest.raises(Exception, match="weights"):
        protect(images, labels="auto", method="ar", device="cpu", size=16)
