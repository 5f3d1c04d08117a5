"""Round checkpoints of bi-level methods (EMN): ``protect --resume`` after a kill continues with the round
after the last one checkpointed, and ends with the files of an uninterrupted run with the same seed.

The SIGKILL test uses the test-only ``UEGUARD_TEST_KILL`` hook (``round_checkpoint:k``: killed right after
the k-th round's checkpoint); the in-process variants stop the run at the same point with an exception,
which leaves the same files behind and costs no second interpreter."""

from __future__ import annotations

import os
import shutil
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
from ueguard.data.store import PerturbationStore, RoundCheckpoint, StoreError
from ueguard.data.working_set import WorkingSet
from ueguard.engine.runtime import Runtime, seed_everything
from ueguard.methods import METHODS, create_method
from ueguard.models import create_model
from ueguard.sdk import protect

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 4
OPTIONS = {"max_rounds": ROUNDS, "pgd_steps": 1, "train_steps": 2, "batch_size": 4, "stop_accuracy": 1.01}
COMMON = dict(method="emn", size=8, budget="quick", seed=3, surrogate="resnet18_cifar_slim", device="cpu")


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def _generation(out: Path) -> dict:
    (line,) = [r for r in read_manifest(out / MANIFEST_NAME) if r["kind"] == "generation"]
    return line


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    src = tmp_path_factory.mktemp("rounds") / "src"
    write_class_tree(src, n_per_class=6, classes=2, size=10)
    return src


@pytest.fixture(scope="module")
def uninterrupted(tree):
    """One uninterrupted run per (perturbation, store), made when a test first asks for it."""
    runs: dict[tuple[str, str], Path] = {}

    def run(perturbation: str, store: str) -> Path:
        if (perturbation, store) not in runs:
            out = tree.parent / f"whole-{perturbation}-{store}"
            protect(tree, out, store=store, perturbation=perturbation, method_options=OPTIONS, **COMMON)
            runs[perturbation, store] = out
        return runs[perturbation, store]
    return run


def _stop_after_round(monkeypatch, k: int) -> None:
    """Raise (as Ctrl-C would) right after the k-th round checkpoint."""
    arrivals = []

    def stop(point: str) -> None:
        if point == "round_checkpoint":
            arrivals.append(point)
            if len(arrivals) == k:
                raise KeyboardInterrupt
    monkeypatch.setattr(store_mod, "kill_point", stop)


def _check_resumed(tree: Path, out: Path, reference: Path, perturbation: str, store: str, after: int) -> None:
    result = protect(tree, out, store=store, perturbation=perturbation, method_options=OPTIONS, resume=True, **COMMON)
    assert result.ok == 12
    generation, whole = _generation(out), _generation(reference)
    assert generation["resumed_after_round"] == after            # rounds 1..after were not run again
    assert generation["rounds"] == whole["rounds"] == ROUNDS
    assert generation["surrogate_train_accuracy"] == whole["surrogate_train_accuracy"]
    assert _outputs(out) == _outputs(reference)                  # byte-identical files
    assert not (out / ".ueguard").exists() and not resume_state(out).exists()


@pytest.mark.parametrize("perturbation,store", [("samplewise", "memory"), ("classwise", "memory"),
                                                ("samplewise", "disk")])
def test_interrupted_emn_resumes_after_the_last_round(tree, uninterrupted, tmp_path, monkeypatch, perturbation, store):
    out = tmp_path / "out"
    _stop_after_round(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        protect(tree, out, store=store, perturbation=perturbation, method_options=OPTIONS, **COMMON)
    state = torch.load(resume_state(out) / "rounds.pt", weights_only=True)
    assert len(state["history"]) == 2 and ("store" in state["delta"]) == (store == "disk" and perturbation == "samplewise")
    monkeypatch.undo()
    _check_resumed(tree, out, uninterrupted(perturbation, store), perturbation, store, after=2)


def test_resume_compares_method_options_by_the_constants_they_resolve_to(tree, uninterrupted, tmp_path, monkeypatch):
    """A run begun with the default left implicit, resumed with it spelt out (``-o eval_limit=10000``): the
    same constants, so it continues after its last round from its disk store and round checkpoint (both
    fingerprinted with the options it began with), and ends with the uninterrupted run's files."""
    out = tmp_path / "out"
    _stop_after_round(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        protect(tree, out, store="disk", perturbation="samplewise", method_options=OPTIONS, **COMMON)
    monkeypatch.undo()
    spelt = {**OPTIONS, "eval_limit": METHODS.get("emn").make_config("quick").eval_limit}
    result = protect(tree, out, store="disk", perturbation="samplewise", method_options=spelt, resume=True, **COMMON)
    assert result.ok == 12 and _generation(out)["resumed_after_round"] == 2
    assert _outputs(out) == _outputs(uninterrupted("samplewise", "disk"))


@pytest.mark.slow  # an EMN subprocess killed and resumed
def test_sigkill_in_the_round_after_a_checkpoint_then_resume(tree, uninterrupted, tmp_path):
    """SIGKILL right after round 1's checkpoint (disk store: round 2 then writes its rows to the second data
    file, which the resumed run discards); the rounds continue from round 2."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "UEGUARD_TEST_KILL": "round_checkpoint:1"}
    args = [sys.executable, "-m", "ueguard", "protect", str(tree), "--out", str(out), "--method", "emn", "--size", "8",
            "--budget", "quick", "--seed", "3", "--surrogate", "resnet18_cifar_slim", "--device", "cpu",
            "--store", "disk", "--perturbation", "samplewise", "-q", *[a for k, v in OPTIONS.items() for a in ("-o", f"{k}={v}")]]
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    assert (resume_state(out) / "rounds.pt").exists()
    assert not any(r["kind"] == "generation" for r in read_manifest(out / MANIFEST_NAME))
    _check_resumed(tree, out, uninterrupted("samplewise", "disk"), "samplewise", "disk", after=1)


def test_a_checkpoint_of_other_settings_is_not_used(tree, uninterrupted, tmp_path, monkeypatch, capsys):
    """A round checkpoint left by a run with another ε (or seed) is refused with a message naming the
    setting, and generation starts from the first round."""
    other = tmp_path / "other"
    _stop_after_round(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        protect(tree, other, store="memory", method_options=OPTIONS, **{**COMMON, "eps": "4/255"})
    monkeypatch.undo()

    out = tmp_path / "out"
    import importlib

    protect_mod = importlib.import_module("ueguard.sdk.protect")

    def stop(point: str) -> None:
        if point == "generating":
            raise KeyboardInterrupt
    monkeypatch.setattr(protect_mod, "kill_point", stop)
    with pytest.raises(KeyboardInterrupt):
        protect(tree, out, store="memory", method_options=OPTIONS, **COMMON)
    monkeypatch.undo()
    out.mkdir(exist_ok=True)
    resume_state(out).mkdir(parents=True, exist_ok=True)
    shutil.copy(resume_state(other) / "rounds.pt", resume_state(out) / "rounds.pt")
    capsys.readouterr()
    protect(tree, out, store="memory", method_options=OPTIONS, resume=True, progress=True, **COMMON)
    err = capsys.readouterr().err
    assert "round checkpoint made with different settings (eps)" in err and "generating from the first round" in err
    assert "resumed_after_round" not in _generation(out)
    assert _outputs(out) == _outputs(uninterrupted("samplewise", "memory"))


def test_round_checkpoint_is_tied_to_settings_and_samples(tmp_path):
    messages: list[str] = []
    ids = ["a", "b"]
    saved = RoundCheckpoint(tmp_path / "rounds.pt", {"method": "emn", "seed": 3, "method_options": (("k", 1),)}, ids)
    saved.save({"history": [0.5]}, torch.ones(2, 3, 2, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["rounds.pt"]  # no temporary file left
    same = RoundCheckpoint(tmp_path / "rounds.pt", {"method": "emn", "seed": 3, "method_options": (("k", 1),)}, ids)
    state = same.load()
    assert state["history"] == [0.5] and torch.equal(state["delta"]["tensor"], torch.ones(2, 3, 2, 2))
    assert RoundCheckpoint(tmp_path / "rounds.pt", {"method": "emn", "seed": 4, "method_options": (("k", 1),)}, ids,
                           log=messages.append).load() is None
    assert RoundCheckpoint(tmp_path / "rounds.pt", {"method": "emn", "seed": 3, "method_options": (("k", 1),)}, ["b", "a"],
                           log=messages.append).load() is None
    assert "different settings (seed)" in messages[0] and "different settings (ids_sha256)" in messages[1]
    (tmp_path / "rounds.pt").write_bytes(b"torn")
    assert same.load() is None
    same.remove()
    assert same.load() is None and not (tmp_path / "rounds.pt").exists()


def test_store_commits_rounds_as_a_whole(tmp_path):
    """Between commits, writes go to the second data file: reads see them, the committed rows stay intact
    (what a killed round leaves), and a reopened store continues from the file a commit named."""
    ids = [str(i) for i in range(6)]
    shape = (6, 3, 2, 2)
    store = PerturbationStore.create(tmp_path / "s", shape, ids, encoding="float32")
    store.start_rounds()
    store[0:6] = torch.full(shape, 1.0)
    first = store.commit()
    store[0:3] = torch.full((3, 3, 2, 2), 2.0)             # round 2, killed half-way
    assert store[2:4][:, 0, 0, 0].tolist() == [2.0, 1.0]    # read-after-write within the round
    on_disk = np.fromfile(tmp_path / "s" / first, dtype=np.float32).reshape(shape)
    assert (on_disk == 1.0).all()                           # the committed round is untouched
    store.close()

    again = PerturbationStore.open(tmp_path / "s", ids)
    again.start_rounds(first)
    assert (again[:] == 1.0).all()
    again[torch.tensor([4, 1])] = torch.full((2, 3, 2, 2), 3.0)
    second = again.commit()                                 # unwritten rows carried over
    assert second != first and again[:][:, 0, 0, 0].tolist() == [1.0, 3.0, 1.0, 1.0, 3.0, 1.0]
    again.finish({"eps": 1.0, "norm": "linf", "info": {}, "resample": "bilinear"})
    again.close()
    assert sorted(p.name for p in (tmp_path / "s").glob("delta.*")) == [second]
    done = PerturbationStore.open(tmp_path / "s", ids)
    assert done.complete and done[:][:, 0, 0, 0].tolist() == [1.0, 3.0, 1.0, 1.0, 3.0, 1.0]
    with pytest.raises(StoreError, match="not a data file"):
        done.start_rounds("delta.i16")
    done.close()


#: Fast settings of every method that checkpoints rounds (a new one fails here until it is given some).
FAST = {"emn": dict(OPTIONS, max_rounds=3), "ssc": dict(OPTIONS, max_rounds=3, pca_images=12, pca_locations=200),
        "rem": dict(train_steps=9, round_steps=3, batch_size=4, pgd_steps=1, samples=1, adv_steps=1)}


@pytest.mark.parametrize("name", sorted(n for n, cls in METHODS.items() if cls.name == n and cls.checkpoints_rounds))
def test_every_round_checkpointing_method_resumes_to_the_same_delta(name, tmp_path, monkeypatch):
    """Method level (no protect): stopped after round 1, a new instance continues from the checkpoint
    and releases the δ of an uninterrupted run, bit for bit."""
    g = torch.Generator().manual_seed(0)
    data = WorkingSet(torch.randint(0, 256, (12, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(12) % 2,
                      torch.zeros(12, dtype=torch.bool), ("a", "b"), [str(i) for i in range(12)])

    def method(checkpoint: bool):
        seed_everything(0)
        surrogate = create_model("resnet18_cifar_slim", 2)
        built = create_method(name, budget="quick", runtime=Runtime.create("cpu", "fp32"), surrogate=surrogate,
                              seed=0, **FAST[name])
        if checkpoint:
            built.round_checkpoint = RoundCheckpoint(tmp_path / "rounds.pt", {"method": name}, data.ids)
        return built

    whole = method(checkpoint=False)(data)
    _stop_after_round(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        method(checkpoint=True)(data)
    monkeypatch.undo()
    resumed = method(checkpoint=True)(data)
    assert resumed.info["resumed_after_round"] == 1 and resumed.info["rounds"] == whole.info["rounds"] == 3
    assert torch.equal(resumed.delta, whole.delta)
