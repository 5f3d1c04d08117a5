"""Defenses and paradigms: the math of each transform, ACM on known answers, the staged schedule on a
constructed ACM sequence, frozen layers staying frozen, and every defense × paradigm as a real (tiny)
training run through ``verify`` with a well-formed report, plots and resumable checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from trees import write_class_tree
from ueguard.cli import main
from ueguard.data.working_set import WorkingSet
from ueguard.defenses import DEFENSES, create_defense, create_paradigm, defense_names, paradigm_names
from ueguard.defenses import staged as staged_module
from ueguard.defenses.adversarial import pgd_linf
from ueguard.defenses.squeeze import bit_depth_reduce, grayscale, jpeg_squeeze
from ueguard.defenses.staged import StagedSchedule, acm, scale_group_lr
from ueguard.defenses.ueraser import channel_shuffle, plasma, ueraser_augment
from ueguard.engine.fit import FitConfig, fit
from ueguard.engine.runtime import Runtime, seed_everything
from ueguard.errors import UsageError
from ueguard.models import create_model, save_checkpoint
from ueguard.sdk import verify
from ueguard.sdk.verify import combine_verdicts

CPU = Runtime.create("cpu", "fp32")
TINY = dict(budget="quick", epochs=1, device="cpu", size=16, batch_size=12, arch="resnet20_cifar")
#: Cheap constants for the expensive defenses (the math is tested separately below).
CHEAP = {"steps": 1, "repeats": 2, "probe_size": 24}


def _images(n=6, size=16, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(n, 3, 4, 4, generator=gen), size=(size, size), mode="bilinear")
    return (smooth * 255).round().to(torch.uint8)


# -- transform math --------------------------------------------------------------------------------------------
def test_jpeg_quality_10_changes_pixels_but_keeps_the_picture():
    x = _images()
    y = jpeg_squeeze(x, 10)
    assert y.shape == x.shape and y.dtype == torch.uint8
    diff = (y.float() - x.float()).abs()
    assert diff.mean() > 0.5                       # lossy: pixels change
    r = torch.corrcoef(torch.stack([y.float().flatten(), x.float().flatten()]))[0, 1]
    assert r > 0.8                                 # ... but it is still the same picture
    assert (jpeg_squeeze(x, 95).float() - x.float()).abs().mean() < diff.mean()  # quality orders the error
    assert torch.equal(jpeg_squeeze(x, 10), y)     # deterministic


def test_grayscale_gives_three_equal_channels_of_luma():
    x = _images()
    y = grayscale(x)
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    luma = 0.299 * x[:, 0].float() + 0.587 * x[:, 1].float() + 0.114 * x[:, 2].float()
    assert (y[:, 0].float() - luma).abs().max() <= 0.5 + 1e-4


def test_bit_depth_reduction_levels():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    y = bit_depth_reduce(x, 2)
    assert set(y.unique().tolist()) == {0, 85, 170, 255}
    assert (y.float() - x.float()).abs().max() <= 255 / 3 / 2 + 0.5   # nearest level
    assert torch.equal(bit_depth_reduce(x, 8), x)
    assert set(bit_depth_reduce(x, 1).unique().tolist()) == {0, 255}


def test_ueraser_pieces():
    gen = torch.Generator().manual_seed(0)
    p = plasma(4, 16, 16, torch.full((4,), 0.5), gen)
    assert p.shape == (4, 1, 16, 16) and p.min() >= 0 and p.max() <= 1 and p.std() > 0.05
    x = torch.rand(5, 3, 8, 8, generator=gen)
    shuffled = channel_shuffle(x, gen, p=1.0)
    assert torch.allclose(shuffled.sort(1).values, x.sort(1).values)   # a permutation of the channels
    assert torch.equal(channel_shuffle(x, gen, p=0.0), x)
    out = ueraser_augment(x, gen)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_pgd_stays_in_the_ball_and_raises_the_loss():
    torch.manual_seed(0)
    model = create_model("resnet20_cifar", 3).eval()
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    adv = pgd_linf(model, x, y, CPU, eps=8 / 255, step_size=2 / 255, steps=5, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


# -- ACM and the staged schedule -------------------------------------------------------------------------------
def test_acm_known_answer():
    # class 0 at (0,0),(2,0): mean (1,0); class 1 at (0,10),(2,10): mean (1,10). Within: every point is 1 from
    # its mean; between: the means are 10 apart. ACM = 1 / 10.
    f = torch.tensor([[0.0, 0], [2, 0], [0, 10], [2, 10]])
    labels = torch.tensor([0, 0, 1, 1])
    assert acm(f, labels) == pytest.approx(0.1)
    assert acm(3 * f + 7, labels) == pytest.approx(0.1)            # invariant to scale and shift
    # three classes on a line at 0, 3, 6 with spread ±1: within 1; between mean of (3, 6, 3) = 4.
    g = torch.tensor([[-1.0], [1], [2], [4], [5], [7]])
    assert acm(g, torch.tensor([0, 0, 1, 1, 2, 2])) == pytest.approx(1 / 4)
    assert torch.isnan(torch.tensor(acm(f, torch.zeros(4, dtype=torch.long))))


def test_staged_schedule_on_a_constructed_sequence():
    s = StagedSchedule(["stem", "layer1", "layer2"], tau=0.6)
    assert s.observe({"stem": 1.0, "layer1": 2.0, "layer2": 4.0}) is None          # the reference
    assert s.observe({"stem": 0.9, "layer1": 1.9, "layer2": 3.9}) is None          # no fall below 0.6×
    assert s.observe({"stem": 0.5, "layer1": 1.9, "layer2": 3.9}) == "stem"
    assert s.observe({"stem": 0.1, "layer1": 1.9, "layer2": 3.9}) is None          # stem is already cut
    assert s.observe({"stem": 0.1, "layer1": 1.0, "layer2": 2.0}) == "layer2"      # deepest fired stage
    assert s.observe({"stem": 0.1, "layer1": 0.1, "layer2": 0.1}) is None          # nothing deeper is watched


def test_scale_group_lr_scales_the_whole_one_cycle_schedule():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "name": "stem"}, {"params": [b], "name": "head"}], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
    for _ in range(3):
        opt.step(); sched.step()
    assert scale_group_lr(opt, {"stem"}, 0.1) == ["stem"]
    for _ in range(10):
        opt.step(); sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * opt.param_groups[1]["lr"])


def _tiny_set(n=24, classes=3, seed=0) -> WorkingSet:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = (torch.rand(n, 3, 16, 16, generator=gen) * 255).to(torch.uint8)
    return WorkingSet(images, labels, torch.zeros(n, dtype=torch.bool), tuple(map(str, range(classes))),
                      [f"{i}.png" for i in range(n)])


def test_staged_cuts_group_learning_rates_when_acm_falls(monkeypatch):
    """The real defense inside a real fit, with ACM values injected: before training 1.0 everywhere; at the
    first check stem and layer1 fall to 0.3 (< 0.6): both are cut by gamma, deeper groups keep the base lr."""
    sequence = iter([{"stem": 1.0, "layer1": 1.0, "layer2": 1.0, "layer3": 1.0},
                     {"stem": 0.3, "layer1": 0.3, "layer2": 0.9, "layer3": 0.2}]
                    + [{"stem": 0.3, "layer1": 0.3, "layer2": 0.9, "layer3": 0.2}] * 10)
    monkeypatch.setattr(staged_module, "stage_acm", lambda *args, **kw: dict(next(sequence)))
    data = _tiny_set()
    defense = create_defense("staged", tau=0.6, gamma=0.1, probe_size=8, checks_per_epoch=1)
    history = fit(create_model("resnet20_cifar", 3), data, data, FitConfig(epochs=2, batch_size=12), defense=defense,
                  paradigm=create_paradigm("scratch"), runtime=CPU, generator=seed_everything(0))
    cuts = defense.summary()["stage_cuts"]
    assert [c["stage"] for c in cuts] == ["layer1"] and cuts[0]["groups"] == ["stem", "layer1"]   # layer3 unwatched
    lrs = history[-1]["group_lr"]
    assert lrs["stem"] == pytest.approx(0.1 * lrs["head"]) and lrs["layer1"] == pytest.approx(0.1 * lrs["head"])
    assert lrs["layer2"] == pytest.approx(lrs["head"]) and lrs["layer3"] == pytest.approx(lrs["head"])
    assert history[0]["epoch"] == 0 and set(history[0]["acm"]) == {"stem", "layer1", "layer2", "layer3"}


def test_reported_learning_rate_is_the_one_each_epoch_last_stepped_with():
    """One-cycle's value after the run's final step is extrapolated past the schedule's end (below zero for
    a linear anneal); the history reports the rate the last step used: the schedule's floor, lr/10/100."""
    data = _tiny_set()
    history = fit(create_model("resnet20_cifar", 3), data, data, FitConfig(epochs=3, batch_size=12, lr=0.01),
                  defense=create_defense("none"), runtime=CPU, generator=seed_everything(0))
    lrs = [h["lr"] for h in history if h["epoch"] >= 1]
    assert lrs[-1] == pytest.approx(0.01 / 10 / 100) and all(lr > 0 for lr in lrs)
    assert lrs[0] > lrs[1] > lrs[2]                              # two steps an epoch: the peak is in epoch 1


def test_staged_defaults_freeze_stem_to_layer2_at_the_first_fall_of_their_acm(monkeypatch):
    """The defaults (bench/staged.py's choice): tau 1, so a fall of any watched stage below its value before
    training fires; gamma 0, so the cut stages' weights stop exactly where they were; layer3, not watched,
    and the head go on training."""
    snapshots = []

    def fake_acm(model, *args, **kw):
        snapshots.append({(stage, k): v.detach().clone() for stage, module in model.stages()
                          for k, v in module.named_parameters()})
        return {"stem": 1.0, "layer1": 1.0, "layer2": 1.0 if len(snapshots) == 1 else 0.99, "layer3": 0.5}

    monkeypatch.setattr(staged_module, "stage_acm", fake_acm)
    defense = create_defense("staged", probe_size=8)
    data = _tiny_set()
    model = create_model("resnet20_cifar", 3)
    fit(model, data, data, FitConfig(epochs=2, batch_size=12), defense=defense, paradigm=create_paradigm("scratch"),
        runtime=CPU, generator=seed_everything(0))
    cuts = defense.summary()["stage_cuts"]
    assert [c["stage"] for c in cuts] == ["layer2"] and cuts[0]["groups"] == ["stem", "layer1", "layer2"]
    final = {(stage, k): v.detach() for stage, module in model.stages() for k, v in module.named_parameters()}
    for (stage, name), value in snapshots[1].items():  # the weights when the cut was made
        frozen = stage in ("stem", "layer1", "layer2")
        assert torch.equal(final[stage, name], value) == frozen, (stage, name)


# -- paradigms -------------------------------------------------------------------------------------------------
def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("paradigm, frozen, trained", [("frozen", ["stem", "layer1"], ["layer2", "layer3"]),
                                                       ("linear", ["stem", "layer1", "layer2", "layer3"], [])])
def test_frozen_stages_keep_weights_and_batchnorm_statistics(paradigm, frozen, trained):
    model = create_model("resnet20_cifar", 3)
    before = {name: _snapshot(module) for name, module in model.stages()}
    data = _tiny_set()
    fit(model, data, data, FitConfig(epochs=1, batch_size=12, lr=0.1), defense=create_defense("none"),
        paradigm=create_paradigm(paradigm), runtime=CPU, generator=seed_everything(0))
    stages = dict(model.stages())
    for name in frozen:  # weights and BN running statistics (buffers) alike
        after = _snapshot(stages[name])
        assert all(torch.equal(after[k], before[name][k]) for k in after), name
        assert not any(p.requires_grad for p in stages[name].parameters())
    for name in trained:
        after = _snapshot(stages[name])
        assert any(not torch.equal(after[k], before[name][k]) for k in after), name
    assert all(p.requires_grad for p in model.head.parameters())  # a fresh head, trained in every paradigm


def test_registries_cover_the_documented_defenses_and_paradigms():
    assert set(defense_names()) >= {"none", "staged", "at", "at4", "jpeg", "gray", "bdr", "ueraser", "earlystop"}
    assert paradigm_names() == ["scratch", "finetune", "frozen", "linear"]
    assert combine_verdicts([True, True]) is True and combine_verdicts([True, False, None]) is False
    assert combine_verdicts([True, None]) is None


# -- verify batteries ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("battery")
    write_class_tree(base / "train", n_per_class=8, classes=3, size=16, seed=0)
    write_class_tree(base / "test", n_per_class=3, classes=3, size=16, seed=1)
    save_checkpoint(create_model("resnet20_cifar", 10), base / "prior.pt")
    return base


def _well_formed(report: dict, pairs: set[tuple[str, str]]) -> None:
    assert {(r["defense"], r["paradigm"]) for r in report["runs"]} == pairs
    for run in report["runs"]:
        assert 0 <= run["test_accuracy"] <= 1 and 0 <= run["clean_accuracy"] <= 1
        assert run["history"] and {"epoch", "train_loss", "train_accuracy", "test_accuracy"} <= set(run["history"][-1])
        assert run["clean_history"] and run["seconds"] >= 0 and "defense_config" in run
    top = max(report["runs"], key=lambda r: r["test_accuracy"])
    assert report["worst"]["test_accuracy"] == top["test_accuracy"]
    assert report["protected"] == combine_verdicts([r["protected"] for r in report["runs"]])
    assert json.loads(json.dumps(report, allow_nan=False)) == report


def test_every_defense_runs_from_scratch_and_the_report_is_complete(tree, tmp_path):
    report = verify(tree / "train", tree / "test", clean=tree / "train", defense="all", paradigm="scratch",
                    defense_options=CHEAP, json_path=tmp_path / "r.json", report_dir=tmp_path / "report", **TINY)
    _well_formed(report, {(d, "scratch") for d in defense_names()})
    assert json.loads((tmp_path / "r.json").read_text()) == report
    runs = {r["defense"]: r for r in report["runs"]}
    assert "val_accuracy" in runs["earlystop"]["history"][-1] and runs["earlystop"]["train_images"] < 24
    assert runs["staged"]["acm_curve"]["stages"] and runs["staged"]["history"][0]["epoch"] == 0
    assert runs["at"]["defense_config"]["steps"] == 1 and runs["at4"]["defense_config"]["eps"] == pytest.approx(4 / 255)
    for name in ("summary.md", "accuracy.png", "curves.png", "acm.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000, name
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert all(f"| {d} | scratch |" in summary for d in defense_names())


def test_every_paradigm_runs_from_a_checkpoint(tree, tmp_path):
    report = verify(tree / "train", tree / "test", clean=tree / "train", defense="none", paradigm="all",
                    weights=str(tree / "prior.pt"), **TINY)
    _well_formed(report, {("none", p) for p in paradigm_names()})
    lrs = {r["paradigm"]: r["lr"] for r in report["runs"]}
    assert lrs == {"scratch": 0.1, "finetune": 1e-3, "frozen": 1e-3, "linear": 0.1}
    assert set(report["baselines"]) == set(paradigm_names())


def test_battery_skips_what_it_cannot_run_and_refuses_it_when_asked(tree):
    report = verify(tree / "train", tree / "test", defense="none,gray", paradigm="all", **TINY)
    assert {r["paradigm"] for r in report["runs"]} == {"scratch"} and report["protected"] is None
    assert {s["paradigm"] for s in report["skipped"]} == {"finetune", "frozen", "linear"}
    with pytest.raises(UsageError, match="--weights"):
        verify(tree / "train", tree / "test", paradigm="frozen", **TINY)
    with pytest.raises(UsageError, match="--clean"):
        verify(tree / "train", tree / "test", defense="earlystop", **TINY)
    with pytest.raises(UsageError, match="no option"):
        verify(tree / "train", tree / "test", defense="jpeg", defense_options={"jpeg.qualty": 5}, **TINY)


def test_interrupted_battery_resumes_at_the_run_it_stopped_in(tree, tmp_path):
    args = (tree / "train", tree / "test")
    options = dict(clean=tree / "train", defense="none,gray,bdr", json_path=tmp_path / "r.json", **TINY)
    seen = []

    def interrupt_after_first_protected_run(record):
        seen.append((record["kind"], record["defense"]))
        if record["kind"] == "protected":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        verify(*args, on_run_done=interrupt_after_first_protected_run, **options)
    assert seen == [("clean", "none"), ("protected", "none")]
    with pytest.raises(UsageError, match="settings differ"):
        verify(*args, resume=True, **{**options, "seed": 1})
    log = []
    report = verify(*args, resume=True, on_run_done=lambda r: log.append((r["defense"], r["kind"], r["resumed"])),
                    **options)
    assert log == [("none", "clean", True), ("none", "protected", True), ("gray", "protected", False),
                   ("bdr", "protected", False)]
    assert [r["defense"] for r in report["runs"]] == ["none", "gray", "bdr"]
    fresh = verify(*args, **{**options, "json_path": tmp_path / "fresh.json"})
    assert [r["test_accuracy"] for r in fresh["runs"]] == [r["test_accuracy"] for r in report["runs"]]


def test_cli_battery_with_options_and_report(tree, tmp_path):
    args = ["verify", str(tree / "train"), "--test", str(tree / "test"), "--clean", str(tree / "train"),
            "--defense", "none,jpeg", "-d", "jpeg.quality=20", "--budget", "quick", "--epochs", "1", "--size", "16",
            "--batch-size", "12", "--arch", "resnet20_cifar", "--device", "cpu", "--report", str(tmp_path / "rep"), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "jpeg" in result.output and "worst case" in result.output and (tmp_path / "rep" / "accuracy.png").exists()
    assert (tmp_path / "rep" / "state" / "run-protected-jpeg-scratch.json").exists()
    bad = CliRunner().invoke(main, [*args[:-1], "-d", "quality=abc", "--defense", "staged"])
    assert bad.exit_code == 2 and "quality" in bad.output


def test_report_dir_that_is_not_ours_is_refused(tree, tmp_path):
    (tmp_path / "mine" / "state").mkdir(parents=True)
    (tmp_path / "mine" / "state" / "precious.txt").write_text("user data")
    with pytest.raises(UsageError, match="not made by"):
        verify(tree / "train", tree / "test", report_dir=tmp_path / "mine", **TINY)
    assert (tmp_path / "mine" / "state" / "precious.txt").read_text() == "user data"


@pytest.mark.parametrize("name", sorted(defense_names()))
def test_every_defense_has_a_documented_config(name):
    cls = DEFENSES.get(name)
    assert len(cls.description) > 20 and cls.name == name
    for budget in ("quick", "standard", "thorough"):
        cls.make_config(budget)  # every preset is a valid config
