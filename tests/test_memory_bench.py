"""bench/memory.py's scaling children: every store × loader runs the real ``protect`` and records its own
peak RSS under its own column; a streaming loader's child spills the working set (it writes the same
files as the in-memory one, which tests/test_loaders.py checks bit for bit)."""

import json

import pytest
from conftest import load_bench

pytestmark = pytest.mark.slow  # a benchmark script's tests: not in the fast subset (-m "not slow")


def test_columns_name_the_loader_only_when_it_streams():
    memory = load_bench("memory")
    assert memory.configurations(["memory", "disk"], ["memory", "torch"]) == [
        ("memory", "memory", "memory"), ("disk", "disk", "memory"),
        ("memory+torch", "memory", "torch"), ("disk+torch", "disk", "torch")]


def test_scaling_runs_each_loader_in_its_own_child(tmp_path):
    memory = load_bench("memory")
    partial = tmp_path / "partial.json"
    rows = memory.scaling([12], ["disk"], tmp_path, threads=1, partial=partial, loaders=("memory", "torch"))
    (row,) = rows
    assert row["files"] == 12
    for column in ("disk", "disk+torch"):
        # A child that imported torch and ran protect is hundreds of MiB; a parse slip would give 0 or None.
        assert row[f"{column}_peak_rss_mib"] > 100
        assert row[f"{column}_seconds"] > 0
    assert json.loads(partial.read_text())["rows"] == rows
    # The outputs are removed after each child, the generated tree is kept for reuse.
    assert not list(tmp_path.glob("out_*"))
    assert (tmp_path / "tree_12" / ".complete").read_text() == "12"
