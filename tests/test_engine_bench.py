"""bench/engine.py's cases build and time the method's own PGD pass beside the eager loop and the bare
limit, with the records the README's table reads. (The timings themselves are the benchmark's job; this
catches a case that no longer runs after a method's internals change, as SSC's ``_split`` once did.)"""

import pytest
import torch

from conftest import load_bench


@pytest.mark.parametrize("method", ["emn", "ssc"])
def test_a_case_times_engine_eager_and_limit(method):
    engine = load_bench("engine")
    records = engine.run_case(method, 32, batch=2, steps=1, device="cpu", compile_="off", warmup=0, repeat=1,
                              precisions=["fp32"])
    (record,) = records
    assert record["method"] == method and record["precision"] == "fp32" and record["compile"] == "off"
    assert set(record["limit_step_s"]) == {"fp32_nchw", "fp32_cl"}
    assert record["speedup"] > 0 and record["limit_ratio"] > 0
    assert record["engine_images_steps_per_s"] == pytest.approx(2 / record["engine"]["median_s"])


def test_the_ssc_case_runs_the_samplewise_pass_the_eager_loop_writes():
    engine = load_bench("engine")
    from ueguard.engine.runtime import Runtime

    rt = Runtime.create("cpu", "fp32", "off")
    data = engine.synthetic_set(2, 32)
    method, nets, bases = engine.make_ssc(rt, "resnet18_cifar", 1, 2, data)
    assert method.config.perturbation == "samplewise"
    delta, _ = method._pgd(*nets, bases, data, torch.zeros(2, 3, 32, 32), torch.arange(2))
    assert delta.shape == (2, 3, 32, 32) and 0 < delta.abs().max() <= engine.EPS + 1e-6
