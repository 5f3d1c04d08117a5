"""bench/engine.py's cases build and time the method's own PGD pass beside the eager loop and the bare
limit, with the records docs/results/2026-12-01-engine.md's table reads. (The timings themselves are the benchmark's job; this
catches a case that no longer runs after a method's internals change, as SSC's ``_split`` once did.)"""

import pytest
import torch

from conftest import load_bench

pytestmark = pytest.mark.slow  # a benchmark script's tests: not in the fast subset (-m "not slow")


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
    assert method.config.perturbation == "samplewise" and method.config.deception_weight == 0  # plain, as eager
    delta, _, _ = method._pgd(*nets, bases, None, data, torch.zeros(2, 3, 32, 32), torch.arange(2))
    assert delta.shape == (2, 3, 32, 32) and 0 < delta.abs().max() <= engine.EPS + 1e-6


def test_compile_both_times_the_compiled_and_the_eager_engine_side_by_side(monkeypatch):
    engine = load_bench("engine")
    compiled = []

    def fake_compile(target, **options):  # the bookkeeping is under test, not inductor (minutes on this CPU)
        compiled.append(target)
        return target

    monkeypatch.setattr(torch, "compile", fake_compile)
    records = engine.run_case("emn", 32, batch=2, steps=1, device="cpu", compile_="both", warmup=0, repeat=1,
                              precisions=["fp32", "bf16"])
    assert [(r["precision"], r["compile"]) for r in records] == [
        ("fp32", "off"), ("fp32", "on"), ("bf16", "off"), ("bf16", "on")]
    assert compiled, "the compiled engine never reached torch.compile"
    assert set(records[0]["limit_step_s"]) == {"fp32_nchw", "fp32_cl", "bf16_cl", "fp32_cl_compiled",
                                               "bf16_cl_compiled"}
    for off, on in (records[0:2], records[2:4]):
        assert "compile_speedup" not in off
        assert on["compile_speedup"] == pytest.approx(off["engine"]["median_s"] / on["engine"]["median_s"])
