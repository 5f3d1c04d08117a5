"""bench/kernels.py's bandwidth bookkeeping: every timed op has its bytes-per-element figure, and the
copy-bandwidth probe measures something real. (The timings themselves are the benchmark's job.)"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # a benchmark script's tests: not in the fast subset (-m "not slow")

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def kernels_bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_kernels", BENCH / "kernels.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_every_case_has_a_byte_count(kernels_bench):
    names = [name for name, _ in kernels_bench.cases((2, 3, 8, 8), "cpu")]
    assert sorted(names) == sorted(kernels_bench.BYTES_PER_ELEMENT)
    # Inputs read once plus outputs written once, e.g. L∞: delta, grad, x in and delta' out (float32).
    assert kernels_bench.BYTES_PER_ELEMENT["project_step_linf"] == 16
    assert kernels_bench.BYTES_PER_ELEMENT["apply_quantize"] == 6


def test_copy_bandwidth_is_measured(kernels_bench):
    gbps = kernels_bench.copy_bandwidth("cpu", warmup=1, repeat=3, mib=8)
    assert 0.1 < gbps < 10_000
    if torch.cuda.is_available():
        assert kernels_bench.copy_bandwidth("cuda", warmup=1, repeat=3, mib=64) > 10
