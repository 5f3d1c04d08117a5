"""The pure piece of bench/dune.py: projecting a run's phases to CIFAR-10's 50,000 images."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conftest import load_bench

pytestmark = pytest.mark.slow  # a benchmark script's tests: not in the fast subset (-m "not slow")


def test_per_image_phases_scale_with_n_and_the_colour_phase_only_up_to_its_batch():
    bench = load_bench("dune")
    info = {"seconds_by_phase": {"ensemble": 10.0, "colour": 4.0, "spatial": 20.0}}
    # 500 images: 50 per class; colour_batch 128 → the colour phase grows by 128/50 at most
    out = bench.project(34.0, info, SimpleNamespace(colour_batch=128), 500)
    assert out["phases_50k_s"] == {"ensemble": 1000.0, "colour": pytest.approx(10.2, abs=0.05), "spatial": 2000.0}
    assert out["total_50k_s"] == pytest.approx(3010.2, abs=0.1) and out["total_50k_h"] == pytest.approx(0.84, abs=0.01)
    # a subset whose classes already fill the colour batch: the colour phase does not grow
    out = bench.project(34.0, info, SimpleNamespace(colour_batch=100), 5000)
    assert out["phases_50k_s"]["colour"] == 4.0 and out["phases_50k_s"]["spatial"] == 200.0
