"""The demo's data builder and work-folder safety, and bench/efficacy.py's budget scaling and table
(the demo and the benchmark themselves are long real runs; their results are in docs/results.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ueguard.data.manifest import read_manifest
from ueguard.demo import DEMO_EPS, MARKER, _prepare_workdir, build_digits_folders, demo_pictures, write_demo_report
from ueguard.errors import UsageError
from ueguard.sdk.report import plot_picture_grid
from ueguard.units import MAX_EPS, parse_eps

ROOT = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(d.glob("*.png")) for d in sorted(folder.iterdir()) if d.is_dir()}


def test_digits_folders_are_a_stratified_split_of_real_digits(tmp_path):
    from sklearn.datasets import load_digits

    train, test = build_digits_folders(tmp_path, classes=(5, 7))
    tr, te = _files(train), _files(test)
    assert set(tr) == set(te) == {"5", "7"}
    target = load_digits().target
    for label in ("5", "7"):
        names_tr = {p.name for p in tr[label]}
        names_te = {p.name for p in te[label]}
        assert not names_tr & names_te
        assert len(names_tr) + len(names_te) == int((target == int(label)).sum())
        assert abs(len(names_te) / (len(names_tr) + len(names_te)) - 0.25) < 0.02
    image = Image.open(tr["5"][0])
    assert image.mode == "L" and image.size == (32, 32)
    assert np.asarray(image).max() > 200  # ink, not a blank page


def test_all_classes_split_is_unchanged_by_the_class_filter(tmp_path):
    """classes=None and classes=all ten give the same split (the demo's split did not move)."""
    a_train, _ = build_digits_folders(tmp_path / "a")
    b_train, _ = build_digits_folders(tmp_path / "b", classes=range(10))
    assert {k: [p.name for p in v] for k, v in _files(a_train).items()} == \
           {k: [p.name for p in v] for k, v in _files(b_train).items()}


def test_demo_workdir_holding_user_files_is_refused_and_kept(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(UsageError, match="not made by `ueguard demo`"):
        _prepare_workdir(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "user data"
    own = tmp_path / "own"
    _prepare_workdir(own)
    (own / "old.png").write_bytes(b"x")
    _prepare_workdir(own)  # its own folder is rebuilt
    assert (own / MARKER).is_file() and not (own / "old.png").exists()


def test_demo_budget_is_a_valid_eps():
    assert 0 < parse_eps(DEMO_EPS) <= MAX_EPS


def _png(path: Path) -> tuple[int, int]:
    """The pixel size of a valid PNG file (raises on anything else)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
        return image.size


def _blank_edges(path: Path) -> bool:
    """Whether the outermost pixel columns of an image are white: nothing drawn was cut off at its sides."""
    pixels = np.asarray(Image.open(path).convert("L"))
    return bool((pixels[:, [0, -1]] >= 250).all())


def test_picture_grid_shows_originals_protected_and_delta_in_three_rows(tmp_path):
    rng = np.random.default_rng(0)
    originals = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(4)]
    copies = [np.clip(o.astype(int) + rng.integers(-8, 9, o.shape), 0, 255).astype(np.uint8) for o in originals]
    plot_picture_grid(originals, copies, ["a", "a", "b", "b"], 8 / 255, tmp_path / "gray.png")
    width, height = _png(tmp_path / "gray.png")
    assert width > 300 and 200 < height < 600 and (tmp_path / "gray.png").stat().st_size < 200_000
    colour = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(8)]
    plot_picture_grid(colour, colour, [str(i) for i in range(8)], 8 / 255, tmp_path / "rgb.png")
    assert _png(tmp_path / "rgb.png")[0] > width  # one column per image


def _fake_report(chance: float = 0.5) -> dict:
    """A verify report of the shape sdk.verify returns, one standard run, as small as the plots allow."""
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "train_accuracy": 0.5 + 0.1 * e, "test_accuracy": 0.5 + 0.05 * e}
               for e in range(3)]
    clean = [{**h, "test_accuracy": 0.6 + 0.15 * h["epoch"]} for h in history]
    run = {"defense": "none", "paradigm": "scratch", "arch": "resnet18_cifar_slim", "test_accuracy": 0.6,
           "peak_test_accuracy": 0.6, "clean_accuracy": 0.9, "chance": chance, "protected": True, "stalled": False,
           "history": history, "clean_history": clean, "selected_epoch": 2, "epochs": 2, "seconds": 1.0}
    return {"runs": [run], "protected": True, "chance": chance, "rule": "the rule",
            "worst": {k: run[k] for k in ("defense", "paradigm", "test_accuracy", "clean_accuracy", "protected")},
            "baselines": {"scratch": {"test_accuracy": 0.9}}, "stalled": [], "skipped": [], "classes": ["5", "7"],
            "data": {"train_images": 4, "test_images": 2, "holdout": None},
            "config": {"arch": "resnet18_cifar_slim", "size": 32, "epochs": 2, "seed": 0},
            "device": "cpu", "ueguard_version": "0", "torch_version": "0"}


def test_demo_report_folder_holds_the_pictures_the_curves_and_a_summary(tmp_path):
    """The report folder the demo writes after verify, from real digit folders and a stand-in protected
    copy (δ of ±64/255 at most, the demo's budget) and a small verify report."""
    train, _ = build_digits_folders(tmp_path, classes=(5, 7))
    rng = np.random.default_rng(0)
    for path in train.rglob("*.png"):
        pixels = np.asarray(Image.open(path), dtype=int) + rng.integers(-64, 65, (32, 32))
        (tmp_path / "protected" / path.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp_path / "protected" / path.parent.name / path.name)
    originals, copies, titles = demo_pictures(train, tmp_path / "protected")
    assert titles == ["digit 5", "digit 5", "digit 7", "digit 7"] and originals[0].shape == copies[0].shape == (32, 32)
    ran = {"rounds": 3, "protect_seconds": 40.0, "verify_seconds": 90.0, "train": 4, "test": 2}
    summary = write_demo_report(_fake_report(), train, tmp_path / "protected", tmp_path / "report", ran)
    assert summary == tmp_path / "report" / "summary.md"
    for name in ("digits.png", "accuracy.png", "curves.png"):
        width, height = _png(tmp_path / "report" / name)
        assert width >= 300 and height >= 200 and 2_000 < (tmp_path / "report" / name).stat().st_size < 500_000, name
        assert _blank_edges(tmp_path / "report" / name), f"{name}: something is cut off at its sides"
    text = summary.read_text()
    assert text.startswith("# ueguard demo report") and "ε = 64/255" in text and "**PROTECTED**" in text
    assert "](digits.png)" in text and "](curves.png)" in text and "## What verify found" in text


@pytest.fixture(scope="module")
def efficacy():
    spec = importlib.util.spec_from_file_location("bench_efficacy", ROOT / "bench" / "efficacy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_efficacy"] = module
    spec.loader.exec_module(module)
    return module


def test_efficacy_scales_l2_budgets_like_the_linf_one(efficacy):
    from ueguard.methods.lsp import LSP_RMS

    scale = parse_eps(DEMO_EPS) / (8 / 255)
    assert efficacy.L2_SCALE == pytest.approx(scale)
    lsp = efficacy.method_options("lsp")["l2_eps"]
    assert lsp / np.sqrt(32 * 32 * 3) == pytest.approx(scale * LSP_RMS)  # RMS per value scales by 8
    assert efficacy.method_options("ar")["l2_eps"] == pytest.approx(scale * 1.0)
    assert efficacy.method_options("ar", size=64)["l2_eps"] == pytest.approx(scale * 2.0)
    assert efficacy.method_options("emn") == {}


def test_efficacy_table_says_where_a_method_does_not_halve(efficacy):
    def victim(acc):
        return {"test_accuracy": acc, "peak_test_accuracy": acc}

    results = {"paradigms": ["scratch", "finetune"],
               "clean": {"scratch": victim(0.98), "finetune": victim(0.96)},
               "methods": {"emn": {"protect": {"norm": "linf", "max_linf_255": 64, "median_psnr": 14.4, "seconds": 40},
                                   "victims": {"scratch": victim(0.30), "finetune": victim(0.60)}}}}
    text = efficacy.table(results)
    row = [line for line in text.splitlines() if line.startswith("| emn")][0]
    assert "scratch yes" in row and "finetune **no**" in row
    assert "30.0" in row and "60.0" in row and "clean 98.0 %" in text


@pytest.mark.slow  # the whole demo: minutes
def test_demo_end_to_end_protects_the_digits(tmp_path):
    """The README's first command, for real (2.5 minutes on the 2-core EPYC of the README's table, 6–7 on an
    AVX2-only Zen 3 one — the suite's longest test by far): digits → protect with
    EMN → verify against the clean baseline; the protected-trained model must stay far below it."""
    from ueguard.demo import run_demo

    lines: list[str] = []
    report = run_demo(tmp_path / "demo", echo=lines.append)
    assert report["protected"] is True, "\n".join(lines)
    # verify's rule, spelt out: protected-trained accuracy above chance at most half of clean's. The margin
    # depends on the CPU model's numerics: seed 0 gave 34.9 % on an AMD EPYC and 51.3 % on an Intel Xeon
    # (clean 98.2 %), so the test holds the demo to the rule it reports, not to one machine's number.
    chance = report["chance"]
    assert report["clean_accuracy"] > 0.9, report
    assert report["test_accuracy"] - chance <= (report["clean_accuracy"] - chance) / 2, report
    assert any(line.startswith("PROTECTED") for line in "\n".join(lines).splitlines())
    folder = tmp_path / "demo" / "report"  # the data owner's picture of it, and where the demo says it is
    for name in ("digits.png", "curves.png", "accuracy.png"):
        assert _png(folder / name)[0] >= 300, name
    assert "](digits.png)" in (folder / "summary.md").read_text() and str(folder / "summary.md") in "\n".join(lines)
    manifest = tmp_path / "demo" / "train_protected" / "ueguard-manifest.jsonl"
    records = [r for r in read_manifest(manifest) if r.get("kind") == "file"]
    assert len(records) == 1347 and all(r["status"] == "ok" and r["linf"] <= 64 for r in records)


def test_efficacy_method_overrides_parse_json_values(efficacy):
    parsed = efficacy.parse_overrides(["bait.parameterisation=generator", "bait.iterations=6", "emn.augment=cropflip"])
    assert parsed == {"bait": {"parameterisation": "generator", "iterations": 6}, "emn": {"augment": "cropflip"}}
    with pytest.raises(SystemExit, match="METHOD.KEY=VALUE"):
        efficacy.parse_overrides(["iterations=6"])
