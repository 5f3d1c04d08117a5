"""The on-disk perturbation store (ueguard.data.store) and protect's --store disk path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import resume_state
from trees import write_class_tree
from ueguard.data import store as store_mod
from ueguard.data.manifest import MANIFEST_NAME, read_manifest
from ueguard.data.store import ENCODINGS, PerturbationStore, StoreError, dequantize, quantize
from ueguard.sdk import protect

IDS = [f"class_{i % 3}/img {i}.png" for i in range(10)]
SHAPE = (10, 3, 4, 5)


def _rows(seed: int = 0, n: int = SHAPE[0]) -> torch.Tensor:
    return (torch.rand(n, *SHAPE[1:], generator=torch.Generator().manual_seed(seed)) * 2 - 1) * (8 / 255)


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_round_trip(tmp_path, encoding):
    store = PerturbationStore.create(tmp_path / "s", SHAPE, IDS, encoding=encoding, fingerprint={"seed": 1})
    assert store[:].abs().max() == 0  # starts at zero
    values = _rows()
    store[0:4] = values[0:4]
    store[torch.tensor([9, 4, 7])] = values[[9, 4, 7]]
    store[torch.tensor([5, 6, 8])] = values[[5, 6, 8]]
    store.finish({"eps": 8 / 255, "norm": "linf", "info": {"rounds": 2}, "resample": "bilinear"})
    store.close()
    again = PerturbationStore.open(tmp_path / "s", IDS, shape=SHAPE, fingerprint={"seed": 1})
    assert again.complete and again.done_rows == 10 and again.meta["perturbation"]["info"] == {"rounds": 2}
    got = again[:]
    assert got.dtype == torch.float32 and got.shape == SHAPE
    tolerance = {"float32": 0.0, "int16": 1 / (255 * 256), "float16": 2.0**-16}[encoding]
    assert (got - values).abs().max().item() <= tolerance
    assert torch.equal(again[torch.tensor([3, 1])], got[[3, 1]])
    assert again.data_path.stat().st_size == np.prod(SHAPE) * np.dtype(ENCODINGS[encoding][0]).itemsize
    again.close()


def test_int16_is_exact_at_8bit_levels():
    """Every multiple of 1/255 in [−1, 1] (all an 8-bit file can hold) and of 1/(255·128) round-trips to
    the identical float32; anything else is within half a unit, and the encoding saturates at ±32767."""
    levels = torch.arange(-255, 256, dtype=torch.float32) / 255
    assert torch.equal(dequantize(quantize(levels, "int16"), "int16"), levels)
    fine = torch.arange(-32640, 32641, 97, dtype=torch.float64) / (255 * 128)
    assert torch.equal(dequantize(quantize(fine.float(), "int16"), "int16"), fine.float())
    odd = torch.rand(4096, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert (dequantize(quantize(odd, "int16"), "int16") - odd).abs().max() <= 0.5 / (255 * 128) + 1e-9
    assert quantize(torch.tensor([5.0, -5.0]), "int16").tolist() == [32767, -32767]
    # float16 cannot hold k/255 exactly
    assert not torch.equal(dequantize(quantize(levels, "float16"), "float16"), levels)


def test_done_rows_survive_reopen_only_after_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "CHECKPOINT_BYTES", 1 << 40)
    store = PerturbationStore.create(tmp_path / "s", (16, 3, 2, 2), [str(i) for i in range(16)])
    store[0:1] = torch.full((1, 3, 2, 2), 1 / 255)
    store.mark_done(0, 1)  # 1 row of 16: below the checkpoint size, still pending
    assert PerturbationStore.open(tmp_path / "s", [str(i) for i in range(16)]).done_rows == 0
    store[1:2] = torch.full((1, 3, 2, 2), 2 / 255)
    store.mark_done(1, 2)  # 2 rows = an eighth: checkpointed (data msync'ed, then the flags)
    reopened = PerturbationStore.open_or_create(tmp_path / "s", (16, 3, 2, 2), [str(i) for i in range(16)])
    assert reopened.done(0, 2) and not reopened.done(0, 3) and reopened.done_rows == 2
    assert reopened[1].mul(255).round().unique().tolist() == [2.0]
    # other samples: a fresh store rather than rows that belong to someone else
    other = PerturbationStore.open_or_create(tmp_path / "s", (16, 3, 2, 2), [str(i) for i in range(1, 17)])
    assert other.done_rows == 0 and other[:].abs().max() == 0


def test_bad_store_names_the_file(tmp_path):
    folder = tmp_path / "s"
    with pytest.raises(StoreError, match=r"store\.json.*missing"):
        PerturbationStore.open(folder, IDS)
    store = PerturbationStore.create(folder, SHAPE, IDS, fingerprint={"method": "emn", "eps": 0.03})
    store.close()
    with pytest.raises(StoreError, match=r"store\.json.*other samples"):
        PerturbationStore.open(folder, IDS[::-1])
    with pytest.raises(StoreError, match=r"store\.json.*different settings \(eps\)"):
        PerturbationStore.open(folder, IDS, fingerprint={"method": "emn", "eps": 0.06})
    with pytest.raises(StoreError, match=r"store\.json.*rows of shape"):
        PerturbationStore.open(folder, IDS, shape=(10, 3, 8, 8))
    data = folder / "delta.f32"
    with open(data, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(StoreError, match=rf"{data.name}: 100 bytes, expected {np.prod(SHAPE) * 4}"):
        PerturbationStore.open(folder, IDS)
    (folder / "store.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"store\.json: unreadable"):
        PerturbationStore.open(folder, IDS)
    (folder / "store.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(StoreError, match=r"store\.json: not a ueguard perturbation store"):
        PerturbationStore.open(folder, IDS)


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def _levels(out: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    return {str(p.relative_to(out)): np.asarray(Image.open(p), dtype=np.int16) for p in sorted(out.rglob("*.png"))}


@pytest.mark.parametrize("method,options", [("ar", {}),
                                            ("emn", {"max_rounds": 1, "pgd_steps": 2, "train_steps": 2})])
def test_disk_store_matches_memory(tmp_path, monkeypatch, method, options):
    """The default (float32) rows: the disk path writes byte-identical files, so the store never changes
    the result. int16 rows (opt-in) change a few values by one 8-bit level (x + δ within 1/65280 of a
    rounding boundary) and stay within budget."""
    src = tmp_path / "src"
    write_class_tree(src, n_per_class=6, classes=2, size=12)
    common = dict(method=method, size=8, budget="quick", seed=3, surrogate="resnet18_cifar_slim", device="cpu",
                  method_options=options)
    memory = protect(src, tmp_path / "memory", store="memory", **common)
    disk = protect(src, tmp_path / "disk32", store="disk", **common)
    assert disk.ok == memory.ok == 12 and disk.perturbation is None
    assert _outputs(tmp_path / "disk32") == _outputs(tmp_path / "memory")
    generation = [r for r in read_manifest(tmp_path / "disk32" / MANIFEST_NAME) if r["kind"] == "generation"]
    assert generation[0]["store_encoding"] == "float32"
    assert not resume_state(tmp_path / "disk32").exists()  # the store is removed with the state folder
    monkeypatch.setattr(store_mod, "DEFAULT_ENCODING", "int16")
    disk16 = protect(src, tmp_path / "disk16", store="disk", **common)
    a, b = _levels(tmp_path / "memory"), _levels(tmp_path / "disk16")
    assert a.keys() == b.keys()
    assert max(int(np.abs(a[k] - b[k]).max()) for k in a) <= 1
    assert all(item["within_budget"] for item in disk16.items)


def test_store_option_is_checked(tmp_path):
    from ueguard.errors import UsageError

    with pytest.raises(UsageError, match="invalid store 'ram'; choose one of auto, memory, disk"):
        protect(tmp_path, tmp_path / "out", store="ram")
    with pytest.raises(UsageError, match="store='disk' is for folder input"):
        protect(np.zeros((2, 3, 8, 8), np.uint8), labels=[0, 1], store="disk")


@pytest.mark.slow  # three AR subprocesses, one killed
def test_generation_resumes_from_stored_rows(tmp_path):
    """SIGKILL in the middle of AR generation (after its second checkpoint): --resume continues from the
    rows on disk instead of starting over, and the files equal an uninterrupted run's."""
    src = tmp_path / "src"
    write_class_tree(src, n_per_class=24, classes=2, size=10)
    args = [sys.executable, "-m", "ueguard", "protect", str(src), "--method", "ar", "--size", "8", "--seed", "5",
            "--store", "disk", "-o", "batch_size=6", "-q"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    whole = subprocess.run([*args, "--out", str(tmp_path / "whole")], env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    killed = subprocess.run([*args, "--out", str(tmp_path / "out")], env={**env, "UEGUARD_TEST_KILL": "store_checkpoint:2"},
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    sidecar = json.loads((resume_state(tmp_path / "out") / "perturbation" / "store.json").read_text())
    assert not sidecar["complete"]
    done = np.fromfile(resume_state(tmp_path / "out") / "perturbation" / "done.u8", dtype=np.uint8)
    assert 0 < done.sum() < done.size  # killed mid-generation with some rows final
    resumed = subprocess.run([*args, "--out", str(tmp_path / "out"), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    generation = [r for r in read_manifest(tmp_path / "out" / MANIFEST_NAME) if r["kind"] == "generation"]
    assert generation[-1]["store_resumed_rows"] == done.sum()
    assert _outputs(tmp_path / "out") == _outputs(tmp_path / "whole")


def test_manifest_items_stream_this_runs_records(tmp_path):
    """protect's file records are read back from the manifest: this run's lines, plus the earlier runs'
    records that --resume kept (by byte offset) — nothing else, and nothing held while the run goes."""
    from ueguard.data.manifest import ManifestItems, ManifestWriter, read_manifest_offsets

    path = tmp_path / MANIFEST_NAME
    with ManifestWriter(path) as first:
        first.write({"kind": "run"})
        first.write({"kind": "file", "source": "a", "status": "ok"})
        first.write({"kind": "file", "source": "b", "status": "failed"})
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"kind": "file", "sou')  # torn by a crash
    kept = [offset for offset, r in read_manifest_offsets(path) if r.get("source") == "a"]
    with ManifestWriter(path) as second:
        second.write({"kind": "run"})
        second.write({"kind": "file", "source": "b", "status": "ok"})
        items = ManifestItems(path, second.start, kept)
        assert [r["source"] for r in items] == ["a", "b"]
        second.write({"kind": "file", "source": "c", "status": "skipped"})
    assert [(r["source"], r["status"]) for r in items] == [("a", "ok"), ("b", "ok"), ("c", "skipped")]
    assert len(items) == 3 and items[-1]["source"] == "c"


def test_resume_after_generation_reuses_the_complete_store(tmp_path, monkeypatch):
    """Interrupted while saving: the finished store is reused by --resume (not generated again), and the
    files equal an uninterrupted run's."""
    import importlib

    protect_mod = importlib.import_module("ueguard.sdk.protect")  # the module (ueguard.sdk exports the function)

    src = tmp_path / "src"
    write_class_tree(src, n_per_class=5, classes=2, size=10)
    common = dict(method="ar", size=8, seed=2, store="disk")
    protect(src, tmp_path / "whole", **common)
    real_save, saved = protect_mod._save_one, []

    def interrupted(*args, **kwargs):
        if len(saved) == 4:
            raise KeyboardInterrupt
        saved.append(1)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(protect_mod, "_save_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        protect(src, tmp_path / "out", **common)
    sidecar = json.loads((resume_state(tmp_path / "out") / "perturbation" / "store.json").read_text())
    assert sidecar["complete"] and sidecar["perturbation"]["norm"] == "l2"
    monkeypatch.setattr(protect_mod, "_save_one", real_save)
    monkeypatch.setattr(protect_mod, "_store_factory", lambda *a: pytest.fail("generated again"))
    result = protect(src, tmp_path / "out", resume=True, **common)
    assert result.ok == 10 and len(result.items) == 10
    assert _outputs(tmp_path / "out") == _outputs(tmp_path / "whole")
