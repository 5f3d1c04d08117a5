"""Crash safety of ``protect``: SIGKILL at exact points of the data path (test-only ``UEGUARD_TEST_KILL``
hook), at an arbitrary moment from outside, and Ctrl-C; then ``--resume`` must finish the job without
redoing finished files and end byte-identical to an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import resume_state
from trees import write_class_tree
from ueguard.cli import main
from ueguard.data.manifest import MANIFEST_NAME, ManifestWriter, first_run, read_manifest
from ueguard.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
FAST = ["--budget", "quick", "--size", "16", "--device", "cpu", "--surrogate", "resnet18_cifar_slim",
        "-o", "max_rounds=1", "-o", "pgd_steps=1", "-o", "train_steps=1", "--seed", "3", "--quiet"]
N_FILES = 8


def protect_in_process(src: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["protect", str(src), "--out", str(out), *FAST, *extra], catch_exceptions=False)


def start_protect(src: Path, out: Path, kill: str | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("UEGUARD_TEST_KILL", None)
    if kill:
        env["UEGUARD_TEST_KILL"] = kill
    # SIGINT at its default, as in a terminal: a runner that starts the suite in the background (a
    # non-interactive shell's `cmd &`) hands its children SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler at all
    return subprocess.Popen([sys.executable, "-m", "ueguard", "protect", str(src), "--out", str(out), *FAST, *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def digest(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too, so a leftover temporary file shows up), but the manifest."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}


def visible(files: dict[str, bytes]) -> dict[str, bytes]:
    """Files under final names: not hidden, not in ueguard's hidden state folder."""
    return {rel: data for rel, data in files.items() if not any(part.startswith(".") for part in Path(rel).parts)}


def ok_outputs(out: Path) -> dict[str, Path]:
    return {r["source"]: out / r["output"] for r in read_manifest(out / MANIFEST_NAME)
            if r["kind"] == "file" and r["status"] == "ok"}


def wait_for_manifest_line(proc: subprocess.Popen, manifest: Path, kind: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and any(r.get("kind") == kind for r in read_manifest(manifest)):
            return
        time.sleep(0.01)
    raise AssertionError(f"no {kind!r} line before the process ended (rc={proc.poll()})")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The source tree and one uninterrupted run over it."""
    base = tmp_path_factory.mktemp("crash")
    src = base / "src"
    write_class_tree(src, n_per_class=N_FILES // 2, classes=2, size=16)
    result = protect_in_process(src, base / "reference")
    assert result.exit_code == 0, result.output
    return src, base / "reference", digest(base / "reference")


def check_resume(src: Path, out: Path, expected: dict[str, bytes], *extra: str) -> None:
    """Resume the run in ``out``: finished files stay untouched, the result equals the reference."""
    finished = {rel: (p.stat().st_ino, p.stat().st_mtime_ns) for rel, p in ok_outputs(out).items()}
    result = protect_in_process(src, out, "--resume", *extra)
    assert result.exit_code == 0, result.output
    outputs = ok_outputs(out)
    assert len(outputs) == N_FILES
    assert {rel: (outputs[rel].stat().st_ino, outputs[rel].stat().st_mtime_ns) for rel in finished} == finished
    assert digest(out) == expected  # byte-identical, and no temporary or state file left
    assert not (out / ".ueguard").exists() and not resume_state(out).exists()


@pytest.mark.parametrize("kill, finished_before, on_disk_before", [
    ("generating:0.01s", 0, 0),  # in the middle of generation (it takes ≥ 0.1 s here): nothing saved yet
    ("tmp-written:3", 2, 2),    # third file complete in its temporary file, not yet renamed
    ("renamed:3", 2, 3),        # third file renamed into place, its manifest line not yet written
])
@pytest.mark.slow  # protect subprocesses killed and resumed
def test_sigkill_at_a_point_then_resume(reference, tmp_path, kill, finished_before, on_disk_before):
    src, _, expected = reference
    out = tmp_path / "out"
    proc = start_protect(src, out, kill)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr

    on_disk = visible(digest(out))
    assert len(ok_outputs(out)) == finished_before
    assert len(on_disk) == on_disk_before
    for rel, data in on_disk.items():  # whatever is under a final name is complete and correct
        assert data == expected[rel], rel
    temporaries = [p for p in out.rglob(".ueguard-*.tmp")]
    assert len(temporaries) == (1 if kill.startswith("tmp-written") else 0)
    if kill.startswith("generating"):
        assert not (resume_state(out) / "perturbation.pt").exists()
        assert not any(r["kind"] == "generation" for r in read_manifest(out / MANIFEST_NAME))
    check_resume(src, out, expected)


@pytest.mark.slow  # protect subprocesses killed and resumed
def test_sigkill_at_an_arbitrary_moment_while_saving(reference, tmp_path):
    src, _, expected = reference
    out = tmp_path / "out"
    proc = start_protect(src, out)
    wait_for_manifest_line(proc, out / MANIFEST_NAME, "generation")  # saving has just begun
    proc.kill()
    proc.communicate(timeout=60)
    for rel, data in visible(digest(out)).items():
        assert data == expected[rel], rel
    check_resume(src, out, expected)


@pytest.mark.slow  # a protect subprocess interrupted and resumed
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(reference, tmp_path):
    src = reference[0]
    # A generation of seconds, so that the interrupt lands inside the run on a fast idle machine too (with
    # FAST's one PGD step the run could finish between the manifest's first line and the signal).
    slow = ("-o", "pgd_steps=300")
    assert protect_in_process(src, tmp_path / "reference", *slow).exit_code == 0
    expected = digest(tmp_path / "reference")
    out = tmp_path / "out"
    proc = start_protect(src, out, extra=slow)
    wait_for_manifest_line(proc, out / MANIFEST_NAME, "run")  # decoding or generating
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert not list(out.rglob("*.tmp"))
    check_resume(src, out, expected, *slow)


def test_manifest_torn_last_line_does_not_swallow_the_next_record(tmp_path):
    path = tmp_path / MANIFEST_NAME
    with ManifestWriter(path) as writer:
        writer.write({"kind": "run", "n": 1})
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"kind": "file", "sour')  # a crash in the middle of a line
    with ManifestWriter(path) as writer:
        writer.write({"kind": "file", "source": "b.png"})
    assert list(read_manifest(path)) == [{"kind": "run", "n": 1}, {"kind": "file", "source": "b.png"}]


def test_first_run_is_the_invocation_that_made_the_folder(tmp_path):
    path = tmp_path / MANIFEST_NAME
    with ManifestWriter(path) as writer:
        writer.write({"kind": "file", "source": "a.png"})  # a file record before any run line
    assert first_run(path) is None  # is not taken for one
    with ManifestWriter(path) as writer:
        writer.write({"kind": "run", "n": 1})
    with ManifestWriter(path) as writer:  # a --resume appends a second run line
        writer.write({"kind": "run", "n": 2})
    assert first_run(path) == {"kind": "run", "n": 1}


def test_a_second_run_on_the_same_output_folder_is_refused(tmp_path):
    with ManifestWriter(tmp_path / MANIFEST_NAME):
        with pytest.raises(UsageError, match="another ueguard run is writing"):
            ManifestWriter(tmp_path / MANIFEST_NAME)
    ManifestWriter(tmp_path / MANIFEST_NAME).close()  # released on close


def test_non_utf8_file_name_round_trips_through_the_manifest(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8, kept as a lone surrogate
    with ManifestWriter(tmp_path / MANIFEST_NAME) as writer:
        writer.write({"kind": "file", "source": name})
    text = (tmp_path / MANIFEST_NAME).read_text(encoding="utf-8")
    assert "\\udce9" in text
    assert [r["source"] for r in read_manifest(tmp_path / MANIFEST_NAME)] == [name]
    assert json.loads(text)["source"] == name
