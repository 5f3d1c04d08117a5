"""The one progress format (ueguard.engine.progress) and what protect, verify and demo show with it: the
stage, the step k/N and an ETA, on a terminal and in a log alike."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from trees import write_class_tree
from ueguard.engine import progress as progress_module
from ueguard.engine.progress import Progress, eta, format_duration, progress_line

#: A bar's line: scope › desc: unit k/N · m:ss elapsed · ETA m:ss
STEP = r"{scope} › {desc}: {unit} (\d+)/(\d+) · \d+:\d\d elapsed · ETA \d+:\d\d"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_durations_and_eta():
    assert [format_duration(s) for s in (0, 7.4, 62, 3723)] == ["0:00", "0:07", "1:02", "1:02:03"]
    assert eta(0, 10, 5.0) is None and eta(3, None, 5.0) is None
    assert eta(2, 10, 4.0) == pytest.approx(16.0) and eta(10, 10, 4.0) == 0


def test_the_line_names_scope_stage_step_elapsed_eta_and_figures():
    line = progress_line(["verify", "[2/4] protected none/scratch"], "training", 4, 10, "epoch", 12.0, 18.0,
                         {"test_acc": "0.412"})
    assert line == ("verify › [2/4] protected none/scratch › training: epoch 4/10 · 0:12 elapsed · ETA 0:18 · "
                    "test_acc=0.412")
    assert progress_line(["protect"], "", 0, 12, "image", 0.0, None) == "protect › image 0/12 · 0:00 elapsed · ETA ?"
    assert progress_line(["demo", "[1/3] writing"], elapsed=3.0, show_eta=False) == "demo › [1/3] writing · 0:03 elapsed"


def test_in_a_log_a_bar_prints_its_start_its_end_and_one_line_per_interval(monkeypatch):
    clock = iter(range(0, 1000, 4))  # every reading of the clock is 4 s later
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: float(next(clock)))
    stream = io.StringIO()
    reporter = Progress(True, name="protect", stream=stream, interval=10)
    with reporter.step(2, 3, "generating perturbations"), reporter.bar(6, "emn", unit="round") as bar:
        for _ in range(6):
            bar.update(1, train_acc=0.5)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and lines[0].startswith("protect › [2/3] generating perturbations · ")
    steps = [re.match(STEP.format(scope=re.escape("protect › [2/3] generating perturbations"), desc="emn",
                                  unit="round"), line) for line in lines[2:]]
    assert all(steps) and [m.group(1) for m in steps][-1] == "6" and len(steps) < 6, lines  # throttled
    assert "emn: round 0/6 · " in lines[1] and lines[1].endswith("ETA ?"), lines
    assert lines[-1].endswith("train_acc=0.500"), lines


def test_on_a_terminal_the_line_is_redrawn_and_messages_go_above_it():
    stream = Terminal()
    reporter = Progress(True, name="verify", stream=stream)
    with reporter.bar(3, "training", unit="epoch") as bar:
        bar.update(1)
        reporter.log("a message")
        bar.update(2)
    text = stream.getvalue()
    assert text.count("\r") >= 2 and "\x1b[K" in text
    assert "\r\x1b[Ka message\n" in text  # the live line is cleared, the message printed, the line redrawn
    assert text.endswith("verify › training: epoch 3/3 · 0:00 elapsed · ETA 0:00\n")  # kept as a record


def test_resumed_steps_count_but_do_not_speed_up_the_eta(monkeypatch):
    reporter = Progress(True, stream=io.StringIO(), interval=0)
    with reporter.bar(10, "emn", unit="round") as bar:
        bar.skip(5)  # five rounds from a checkpoint, done in no time
        bar.update(1)
        monkeypatch.setattr(progress_module.time, "monotonic", lambda: bar._started + 40)
        assert bar.done == 6 and bar.line().endswith("round 6/10 · 0:40 elapsed · ETA 2:40")  # 40 s a round, 4 left


def test_disabled_progress_writes_nothing():
    stream = io.StringIO()
    reporter = Progress(False, name="protect", stream=stream)
    with reporter.step(1, 2, "a"), reporter.bar(3, "b") as bar:
        bar.update(3)
        reporter.log("c")
    assert stream.getvalue() == ""


def test_the_demo_shows_its_stages_and_protect_and_verify_steps_inside_them(tmp_path, monkeypatch):
    """The demo's wiring, with stand-ins for the slow parts (the real demo runs in test_demo, marked slow)."""
    import ueguard.demo as demo
    import ueguard.display
    import ueguard.sdk

    def fake_protect(train, out, method, progress, **options):
        with progress.bar(2, method, unit="round") as bar:
            bar.update(2)
        return SimpleNamespace(info={"rounds": 2}, ok=4, out=out, manifest_path=out / "manifest")

    def fake_verify(protected, test, progress, **options):
        with progress.step(1, 1, "clean none/scratch", show_eta=True), progress.bar(3, "training", "epoch") as bar:
            bar.update(3)
        return {"data": {"train_images": 4, "test_images": 2}}

    monkeypatch.setattr(demo, "build_digits_folders", lambda root, seed: (root / "train", root / "test"))
    monkeypatch.setattr(demo, "write_demo_report", lambda *args: tmp_path / "report" / "summary.md")
    monkeypatch.setattr(ueguard.display, "format_report", lambda report: "REPORT")
    monkeypatch.setattr(ueguard.sdk, "protect", fake_protect)
    monkeypatch.setattr(ueguard.sdk, "verify", fake_verify)
    stream, echoed = io.StringIO(), []
    demo.run_demo(tmp_path / "demo", progress=Progress(True, name="demo", stream=stream), echo=echoed.append)
    text = stream.getvalue()
    assert "demo › [1/3] writing scikit-learn's digits as image folders · " in text
    assert re.search(STEP.format(scope=r"demo › \[2/3\] protecting the training digits with EMN", desc="emn",
                                 unit="round"), text), text
    assert re.search(STEP.format(scope=r"demo › \[3/3\] training .* › \[1/1\] clean none/scratch",
                                 desc="training", unit="epoch"), text), text
    assert echoed[0].startswith("wrote scikit-learn's digits") and "REPORT" in echoed


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A protected copy of a tiny tree, made by the CLI with its progress captured (not a terminal)."""
    from ueguard.cli import main

    root = tmp_path_factory.mktemp("tiny")
    write_class_tree(root / "src", n_per_class=3, classes=2, size=16)
    result = CliRunner().invoke(main, ["protect", str(root / "src"), "--out", str(root / "out"), "--budget", "quick",
                                       "--size", "16", "--device", "cpu", "--surrogate", "resnet18_cifar_slim",
                                       "-o", "max_rounds=1", "-o", "train_steps=2", "-o", "pgd_steps=1"])
    assert result.exit_code == 0, result.output
    return root, result.output


def test_protect_shows_each_stage_its_step_and_an_eta(tiny):
    _, output = tiny
    for stage, desc, unit in (("[1/3] decoding", "", "image"), ("[2/3] generating perturbations", "emn: ", "round"),
                              ("[3/3] saving", "", "image")):
        pattern = rf"protect › {re.escape(stage)} › {desc}{unit} (\d+)/\1 · \d+:\d\d elapsed · ETA \d+:\d\d"
        assert re.search(pattern, output), (pattern, output)


def test_verify_shows_each_run_its_epoch_and_an_eta(tiny):
    from ueguard.cli import main

    root, _ = tiny
    result = CliRunner().invoke(main, ["verify", str(root / "out"), "--test", str(root / "src"), "--clean",
                                       str(root / "src"), "--epochs", "2", "--budget", "quick", "--size", "16",
                                       "--device", "cpu", "--arch", "resnet18_cifar_slim"])
    assert result.exit_code == 0, result.output
    for number, kind in ((1, "clean"), (2, "protected")):
        scope = rf"verify › \[{number}/2\] {kind} none/scratch"
        assert re.search(STEP.format(scope=scope, desc="training", unit="epoch").replace(r"(\d+)/(\d+)", "2/2"),
                         result.output), result.output
    assert re.search(r"verify › \[2/2\] protected none/scratch · \d+:\d\d elapsed · ETA \d+:\d\d", result.output)
    quiet = CliRunner().invoke(main, ["verify", str(root / "out"), "--test", str(root / "src"), "--epochs", "1",
                                      "--budget", "quick", "--size", "16", "--device", "cpu", "--quiet",
                                      "--arch", "resnet18_cifar_slim"])
    assert quiet.exit_code == 0 and "ETA" not in quiet.output, quiet.output
