"""bench/filtering.py on a tiny fake reproduce cache: real PNG folders, a saved prior, protected mirrors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_bench
from PIL import Image

pytestmark = pytest.mark.slow  # a benchmark script's tests: not in the fast subset (-m "not slow")

CLASSES = ("dog", "frog", "ship")


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, source: Path | None = None) -> None:
    for i, (image, label) in enumerate(zip(images, labels)):
        path = root / CLASSES[label] / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    if source is not None:  # what protect writes first: the run record naming its source folder
        (root / "ueguard-manifest.jsonl").write_text(json.dumps({"kind": "run", "source": str(source)}) + "\n")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from ueguard.models import create_model, save_checkpoint

    root = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 8)
    images = rng.integers(40, 215, size=(24, 32, 32, 3), dtype=np.uint8)
    train = root / "data" / "task-train-8pc-s0"
    write_folder(train, images, labels)
    torch.manual_seed(0)
    save_checkpoint(create_model("resnet20_cifar", 3), root / "priors" / "disjoint-resnet20_cifar-8pc-1ep-s0.pth")
    tag = root / "protected" / "cpu-test"
    pattern = rng.choice([-8, 8], size=(3, 32, 32, 3))                     # one ±8/255 pattern per class
    write_folder(tag / "classwise-s0", (images + pattern[labels]).astype(np.uint8), labels, train)
    write_folder(tag / "samplewise-s0", (images + rng.choice([-8, 8], size=images.shape)).astype(np.uint8), labels, train)
    write_folder(tag / "same@disjoint-s0", images, labels, train)            # no perturbation (a prior's row)
    write_folder(tag / "noprior-s3", images, labels, train)                  # a seed with no cached prior
    write_folder(tag / "other-s0", images[:12], labels[:12], train)          # does not mirror the task folder
    return root


def test_filtering_measures_every_mirror_of_the_task_folder_and_skips_the_rest(cache, tmp_path, capsys):
    bench = load_bench("filtering")
    out = tmp_path / "filtering.json"
    results = bench.main(["--quick", "--cache", str(cache), "--stages", "layer1", "--json", str(out)])
    assert json.loads(out.read_text())["table"] == results["table"]
    rows = {r["row"]: r["stages"]["layer1"] for r in results["folders"]}
    assert set(rows) == {"clean", "classwise", "samplewise", "same@disjoint"}
    printed = capsys.readouterr().out
    assert "noprior-s3: no prior of seed 3" in printed and "other-s0" in printed and "do not mirror" in printed
    assert rows["same@disjoint"]["shift_rel"] == 0
    only = bench.main(["--quick", "--cache", str(cache), "--stages", "layer1", "--rows", "same"])
    assert [r["row"] for r in only["folders"]] == ["clean", "same@disjoint"]  # a row matches its prior's folders
    # a class-wise pattern keeps far more of its shift class-consistent than per-image noise of the same size
    assert rows["classwise"]["class_share"] > 2 * rows["samplewise"]["class_share"]
    assert rows["classwise"]["shift_rel"] > 0 and 0 <= rows["samplewise"]["class_share"] <= 1
    assert all(0 <= r["probe_self"] <= 1 for r in rows.values())
    reach = results["reach_sigma"]["layer1"]
    assert set(reach) == set(bench.DIRECTIONS) and all(v > 0 for v in reach.values())


def test_filtering_says_what_to_run_first_on_an_empty_cache(tmp_path):
    bench = load_bench("filtering")
    with pytest.raises(SystemExit, match="reproduce.py --cpu"):
        bench.main(["--quick", "--cache", str(tmp_path)])
