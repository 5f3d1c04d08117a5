"""``bench/classmean.py``: the class signal the classmean defense leaves of a protected folder, on PNG trees."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_bench
from test_classmean import classwise_pattern, smooth_set, to_uint8

pytestmark = pytest.mark.slow


def write_tree(root, images: torch.Tensor, labels: torch.Tensor) -> None:
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"class_{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy().astype(np.uint8)).save(folder / f"img_{i:04d}.png")


def test_the_planted_pattern_is_mostly_removed_and_the_record_written(tmp_path):
    clean, labels = smooth_set(60, 3)
    write_tree(tmp_path / "clean", to_uint8(clean), labels)
    write_tree(tmp_path / "protected", to_uint8(clean + classwise_pattern(3)[labels]), labels)
    (tmp_path / "protected" / "ueguard-manifest.jsonl").write_text("{}\n")  # not an image: ignored
    bench = load_bench("classmean")
    out = tmp_path / "r.json"
    results = bench.main(["--clean", str(tmp_path / "clean"), "--protected", str(tmp_path / "protected"),
                          "--sigmas", "0,1", "--json", str(out)])
    assert results["images"] == 180 and results["classes"] == 3
    assert 7 <= results["delta_linf_255"] <= 8
    whole, fine = results["rows"]
    assert fine["sigma"] == 1.0 and fine["class_signal_left"] < 0.3
    assert fine["clean_mae_255"] < whole["clean_mae_255"]  # sigma 0 also takes the natural casts
    assert json.loads(out.read_text())["command"].startswith("python bench/classmean.py")
