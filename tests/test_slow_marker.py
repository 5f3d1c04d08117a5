"""The ``slow`` marker that splits off the fast subset (``python -m pytest -q -m "not slow"``): registered,
on every benchmark script's tests, and on the suite's longest test."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: Test files that only exercise benchmark scripts (bench/) or the GPU check: slow as a whole.
BENCH_TESTS = sorted({*TESTS.glob("test_*_bench.py"), TESTS / "test_bench_kernels.py", TESTS / "test_reproduce_bench.py",
                      TESTS / "test_gpu_check.py"})


def _module_marked_slow(path: Path) -> bool:
    """Whether the module assigns ``pytestmark = pytest.mark.slow`` at its top level."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return ast.unparse(node.value) == "pytest.mark.slow"
    return False


def test_the_slow_marker_is_registered(pytestconfig):
    assert any(line.startswith("slow:") for line in pytestconfig.getini("markers"))


def test_every_benchmark_test_file_is_marked_slow():
    assert len(BENCH_TESTS) >= 8
    assert [p.name for p in BENCH_TESTS if not _module_marked_slow(p)] == []


def test_the_full_demo_is_marked_slow():
    from test_demo import test_demo_end_to_end_protects_the_digits as demo

    assert "slow" in {mark.name for mark in getattr(demo, "pytestmark", [])}
