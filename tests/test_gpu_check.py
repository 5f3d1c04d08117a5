"""bench/gpu_check.py, the prepared GPU check, cannot rot: its dry run executes every step at toy size on
this CPU (interpreted Triton, tiny shapes, no pip install) and must leave a valid JSON per step; and its
bookkeeping — per-step time limits, a failing step not costing the rest, the CIFAR-10 slice — holds."""

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import load_bench

pytestmark = pytest.mark.slow  # a benchmark script's tests: not in the fast subset (-m "not slow")

ROOT = Path(__file__).resolve().parents[1]


def _records(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    assert set(data) >= {"command", "environment", "records"}, path.name  # bench/_timing.py's write_json format
    assert data["environment"]["torch"]
    assert data["records"], f"{path.name} has no records"
    return data["records"]


def test_dry_run_executes_every_step_and_writes_valid_json(tmp_path):
    gpu_check = load_bench("gpu_check")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--json-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / gpu_check.SUMMARY).read_text())
    assert summary["dry_run"] and summary["finished"] and summary["wall_seconds"] <= wall
    steps = {e["step"]: e for e in summary["steps"]}
    assert list(steps) == [s.name for s in gpu_check.STEPS]
    victim_exists = (ROOT / "bench" / "victim.py").is_file()
    for name, entry in steps.items():
        if name == "victim" and not victim_exists:
            assert entry["status"] == "skipped" and "victim.py" in entry["reason"]
            continue
        assert entry["status"] == "ok", (name, entry.get("reason"), entry.get("output_tail", "")[-2000:])
        assert entry["wall_s"] >= 0 and entry["timeout_s"] > 0
        if name not in ("install", "data"):
            assert (tmp_path / entry["json"]).is_file(), name
    assert set(summary["files"]) == {gpu_check.SUMMARY, *(e["json"] for e in steps.values() if e.get("json"))}
    assert len(summary["files"]) <= 8

    kernels = _records(tmp_path / "kernels-dry.json")
    assert {r["backend"] for r in kernels} >= {"triton"} and all(r["copy_gbps"] > 0 for r in kernels)
    tests = _records(tmp_path / "kernel-tests-dry.json")[0]
    assert tests["triton_interpret"] == "1" and tests["triton_backend"]["passed"] > 0 and not tests["failures"]
    engine = _records(tmp_path / "engine-dry.json")
    assert {r["method"] for r in engine if r["bench"] == "pgd"} == {"emn", "ssc"}
    for method in ("emn", "ssc"):
        compiled = _records(tmp_path / f"engine-dry-compile-{method}.json")
        assert any("compile_speedup" in r for r in compiled)
    projection = _records(tmp_path / "imagenet-projection-dry.json")
    assert {r["method"] for r in projection} == {"emn", "ssc"}
    assert all(r["this_device_hours"] > 0 and r["from_size"] == 32 and r["dry_run"] for r in projection)
    if victim_exists:
        assert _records(tmp_path / "victim-dry.json")


def test_a_failing_step_costs_only_itself_and_limits_fit_the_budget(tmp_path, monkeypatch):
    gpu_check = load_bench("gpu_check")
    seen = []

    def boom(ctx, step, timeout_s):
        seen.append((step.name, timeout_s))
        raise RuntimeError("planted")

    def fine(ctx, step, timeout_s):
        seen.append((step.name, timeout_s))
        return {"status": "ok", "wall_s": 0.0}

    steps = [gpu_check.Step("first", boom, cap_s=100, reserve_s=5, expected_s=1, gpu_only=False),
             gpu_check.Step("second", fine, cap_s=100, reserve_s=30, expected_s=1, gpu_only=False),
             gpu_check.Step("third", fine, cap_s=100, reserve_s=1000, expected_s=1, gpu_only=False)]
    monkeypatch.setattr(gpu_check, "STEPS", steps)
    assert gpu_check.main(["--dry-run", "--json-dir", str(tmp_path), "--budget-s", "60"]) == 1
    summary = json.loads((tmp_path / gpu_check.SUMMARY).read_text())
    first, second, third = summary["steps"]
    assert first["status"] == "failed" and "planted" in first["reason"] and "RuntimeError" in first["output_tail"]
    assert second["status"] == "ok"
    assert third["status"] == "skipped" and "budget" in third["reason"]
    # the first step's limit leaves the second its reserve (the third's cannot fit in 60 s anyway)
    assert seen[0][0] == "first" and seen[0][1] <= 60 - 30
    assert seen[1][0] == "second" and 30 <= seen[1][1] <= 60


def test_a_step_past_its_limit_is_stopped_with_its_children(tmp_path):
    gpu_check = load_bench("gpu_check")
    marker = tmp_path / "still-running"
    child = f"import time, pathlib; time.sleep(3); pathlib.Path({str(marker)!r}).write_text('x')"
    script = ("import subprocess, sys, time; "
              f"subprocess.Popen([sys.executable, '-c', {child!r}]); print('started', flush=True); time.sleep(60)")
    started = time.monotonic()
    result = gpu_check.run_process([sys.executable, "-c", script], 2, label="sleeper")
    assert result["timed_out"] and time.monotonic() - started < 20
    assert "started" in result["output_tail"]
    time.sleep(max(0.0, started + 5 - time.monotonic()))  # past when a surviving child would have written
    assert not marker.exists(), "the step's child outlived the step"


def _fake_cifar(folder: Path, per_batch: int = 40) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in (*[f"data_batch_{i}" for i in range(1, 6)], "test_batch"):
        labels = rng.permutation(np.arange(per_batch) % 10).tolist()  # every class in every batch
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f, protocol=2)


def test_the_slice_is_class_balanced_and_byte_reproducible(tmp_path):
    slicer = load_bench("cifar10_slice")
    _fake_cifar(tmp_path / "cifar-10-batches-py")
    arrays = slicer.build(tmp_path, train_per_class=3, test_per_class=1)
    assert arrays["train_x"].shape == (30, 32, 32, 3) and arrays["train_x"].dtype == np.uint8
    assert arrays["train_y"].dtype == np.int64 and np.bincount(arrays["train_y"]).tolist() == [3] * 10
    assert np.bincount(arrays["test_y"]).tolist() == [1] * 10
    assert (np.diff(arrays["train_index"]) > 0).all()  # official order, no shuffle
    slicer.save(arrays, tmp_path / "a.npz")
    time.sleep(1.1)  # a time stamp in the zip would now differ
    slicer.save(slicer.build(tmp_path, 3, 1), tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded = slicer.load(tmp_path / "a.npz")
    np.testing.assert_array_equal(loaded["train_x"], arrays["train_x"])


def test_the_checked_in_slice_is_the_documented_one():
    slicer = load_bench("cifar10_slice")
    path = ROOT / "bench" / "data" / "cifar10-slice.npz"
    if not path.is_file():
        pytest.fail("bench/data/cifar10-slice.npz is missing: python bench/cifar10_slice.py makes it")
    notes = (ROOT / "bench" / "data" / "SOURCES.md").read_text()
    assert slicer.sha256(path) in notes and path.stat().st_size < 20 * 2**20
