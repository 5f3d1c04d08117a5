"""End-to-end ``ueguard protect`` on real image files: formats, modes, budget on the saved files,
manifest, exit codes, refusals and resume."""

from __future__ import annotations

import dataclasses

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import installed_from_this_checkout, resume_state
from trees import EPS_LEVELS, write_class_tree, write_mixed_tree
from ueguard.cli import main
from ueguard.data.images import load_image
from ueguard.data.manifest import MANIFEST_NAME, read_manifest

# A budget small enough for CI: two rounds of two PGD steps on a slim surrogate at 16 px.
FAST = ["--budget", "quick", "--size", "16", "--device", "cpu", "--surrogate", "resnet18_cifar_slim",
        "-o", "max_rounds=2", "-o", "pgd_steps=2", "-o", "train_steps=2", "--quiet"]


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def file_records(manifest: Path) -> dict[str, dict]:
    return {r["source"]: r for r in read_manifest(manifest) if r["kind"] == "file"}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """One protect run over the mixed tree, shared by the checks below (generation is the slow part)."""
    base = tmp_path_factory.mktemp("mixed")
    src, dst = base / "photos", base / "out"
    made = write_mixed_tree(src)
    before = tree_digest(src)
    result = run_cli("protect", str(src), "--out", str(dst), "--eps", "8/255", *FAST)
    return src, dst, made, before, result


def test_exit_status_and_summary_report_the_failed_file(mixed_run):
    _, _, _, _, result = mixed_run
    assert result.exit_code == 3, result.output
    assert "broken.png" in result.output and "1 file(s) failed" in result.output


def test_source_folder_is_untouched(mixed_run):
    src, _, _, before, _ = mixed_run
    assert tree_digest(src) == before


def test_manifest_has_config_line_and_one_record_per_file(mixed_run):
    src, dst, made, _, _ = mixed_run
    records = list(read_manifest(dst / MANIFEST_NAME))
    header = records[0]
    assert header["kind"] == "run"
    assert header["options"]["method"] == "emn" and header["options"]["eps_255"] == 8
    assert header["ueguard_version"] and header["torch_version"] and len(header["surrogate_sha256"]) == 64
    from ueguard.methods import METHODS

    # every constant the run used, the ones left at their defaults too: what a reader needs to re-make it
    resolved = METHODS.get("emn").make_config(header["options"]["budget"], **header["options"]["method_options"],
                                              eps=header["options"]["eps"], seed=header["options"]["seed"])
    assert header["method_config"] == dataclasses.asdict(resolved) and "pgd_steps" in header["method_config"]
    files = file_records(dst / MANIFEST_NAME)
    assert set(files) == set(made)
    for rel, rec in files.items():
        for key in ("source", "output", "source_sha256", "output_sha256", "label", "method", "eps", "seed",
                    "linf", "psnr", "status", "error"):
            assert key in rec, (rel, key)
        if made[rel] == "corrupt":
            assert rec["status"] == "failed" and "broken.png" in rec["error"]
        elif made[rel] == "non-image":
            assert rec["status"] == "skipped" and ".txt" in rec["error"]
        else:
            assert rec["status"] == "ok", rec
            assert rec["error"] is None
            assert rec["label"] == rel.split("/")[0]
            assert rec["source_sha256"] == hashlib.sha256((src / rel).read_bytes()).hexdigest()
            assert rec["output_sha256"] == hashlib.sha256((dst / rec["output"]).read_bytes()).hexdigest()
    lines = (dst / MANIFEST_NAME).read_text().splitlines()
    assert max(map(len, lines)) < 2000  # metadata only: no line could hold even a thumbnail's pixels


def test_outputs_mirror_the_tree_as_png(mixed_run):
    _, dst, made, _, _ = mixed_run
    for rel, kind in made.items():
        if kind in ("corrupt", "non-image"):
            continue
        out = dst / Path(rel).with_suffix(".png")
        assert out.is_file(), out
    assert not list(dst.rglob("*.tmp")) and not (dst / ".ueguard").exists() and not resume_state(dst).exists()


def test_budget_holds_on_every_decoded_output_and_the_perturbation_is_real(mixed_run):
    src, dst, made, _, _ = mixed_run
    files = file_records(dst / MANIFEST_NAME)
    changed_levels = []
    for rel, rec in files.items():
        if rec["status"] != "ok":
            continue
        original, saved = load_image(src / rel), load_image(dst / rec["output"])
        assert saved.pixels.shape == original.pixels.shape, rel          # size and channel count kept
        assert saved.max_value == original.max_value, rel                # 16-bit stays 16-bit
        diff = np.abs(saved.pixels.astype(np.int64) - original.pixels.astype(np.int64)) / original.max_value
        assert diff.max() <= (EPS_LEVELS + 0.5) / 255 + 1e-9, (rel, diff.max() * 255)
        assert rec["linf"] == pytest.approx(diff.max() * 255, abs=1e-3)
        if original.alpha is not None:
            np.testing.assert_array_equal(saved.alpha, original.alpha)    # alpha carried over unchanged
        else:
            assert saved.alpha is None
        changed_levels.append(diff.mean() * 255)
    assert len(changed_levels) == sum(k not in ("corrupt", "non-image") for k in made.values())
    assert np.mean(changed_levels) > 1.0  # on average more than one level per pixel moved: not trivial


def test_modes_are_kept(mixed_run):
    _, dst, made, _, _ = mixed_run
    for rel, kind in made.items():
        if kind in ("corrupt", "non-image"):
            continue
        saved = load_image(dst / Path(rel).with_suffix(".png"))
        assert saved.grayscale == (kind.startswith(("L ", "LA ", "16-bit"))), (rel, kind)
        assert saved.has_alpha == (kind in ("RGBA png", "LA png")), (rel, kind)


def test_exif_orientation_is_applied(mixed_run):
    _, dst, _, _, _ = mixed_run
    saved = load_image(dst / "cat" / "rotated.png")
    assert (saved.width, saved.height) == (24, 36)  # stored 36×24 with orientation 6 → displayed 24×36


@pytest.mark.parametrize("eps", ["8/255", "0.031", "8"])
def test_eps_forms_are_accepted(tmp_path, eps):
    write_class_tree(tmp_path / "src", n_per_class=3, classes=2, size=16)
    result = run_cli("protect", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--eps", eps, *FAST,
                     "-o", "max_rounds=1")
    assert result.exit_code == 0, result.output
    header = next(read_manifest(tmp_path / "out" / MANIFEST_NAME))
    assert header["options"]["eps"] == pytest.approx(0.031 if eps == "0.031" else 8 / 255)


@pytest.mark.parametrize("args, message", [
    (["--eps", "abc"], "invalid eps"),
    (["--eps", "300"], "out of range"),
    (["--eps", "0"], "out of range"),
    (["--method", "nope"], "valid methods: ar, bait, dune, emn"),
    (["-o", "pgd_steps"], "KEY=VALUE"),
    (["-o", "no_such_constant=1"], "has no option"),
    # a misspelt constant is named before the missing prior, so one fix is not followed by another refusal
    (["--method", "ssc", "-o", "deception_wieght=1"], "has no option deception_wieght"),
    (["--method", "ssc", "-o", "deception_weight=-1"], "deception_weight"),
])
def test_bad_options_are_usage_errors(tmp_path, args, message):
    write_class_tree(tmp_path / "src", n_per_class=2, classes=2, size=16)
    result = CliRunner().invoke(main, ["protect", str(tmp_path / "src"), "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()  # nothing created for a refused request


def test_destination_inside_source_is_refused(tmp_path):
    write_class_tree(tmp_path / "src", n_per_class=2, classes=2, size=16)
    before = tree_digest(tmp_path / "src")
    for dst in (tmp_path / "src", tmp_path / "src" / "class_0" / "out"):
        result = CliRunner().invoke(main, ["protect", str(tmp_path / "src"), "--out", str(dst)])
        assert result.exit_code == 2 and "inside the source folder" in result.output
    assert tree_digest(tmp_path / "src") == before


def test_non_empty_destination_needs_resume(tmp_path):
    write_class_tree(tmp_path / "src", n_per_class=2, classes=2, size=16)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    result = CliRunner().invoke(main, ["protect", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--resume" in result.output
    result = CliRunner().invoke(main, ["protect", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--resume"])
    assert result.exit_code == 2 and "not made by ueguard" in result.output
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"


def test_missing_or_flat_source_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["protect", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such folder" in result.output
    flat = tmp_path / "flat"
    write_class_tree(tmp_path / "tmp", n_per_class=2, classes=1, size=16)
    (tmp_path / "tmp" / "class_0").rename(flat)
    result = CliRunner().invoke(main, ["protect", str(flat)])
    assert result.exit_code == 2 and "no class subfolders" in result.output


def test_default_destination_is_a_sibling(tmp_path):
    write_class_tree(tmp_path / "photos", n_per_class=2, classes=2, size=16)
    result = run_cli("protect", str(tmp_path / "photos"), *FAST, "-o", "max_rounds=1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "photos_protected" / MANIFEST_NAME).exists()


@pytest.mark.parametrize("spelling", [".", "class_0/.."])
def test_default_destination_is_named_after_the_resolved_folder(tmp_path, monkeypatch, spelling):
    """`ueguard protect .` (run inside the folder) writes photos_protected beside it, not ./_protected."""
    write_class_tree(tmp_path / "photos", n_per_class=2, classes=2, size=16)
    monkeypatch.chdir(tmp_path / "photos")
    result = run_cli("protect", spelling, *FAST, "-o", "max_rounds=1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "photos_protected" / MANIFEST_NAME).exists()
    assert not any(p.name.endswith("_protected") for p in (tmp_path / "photos").iterdir())


def test_resume_redoes_only_unfinished_files_and_matches_an_uninterrupted_run(tmp_path):
    write_class_tree(tmp_path / "src", n_per_class=5, classes=2, size=20)
    full, partial = tmp_path / "full", tmp_path / "partial"
    assert run_cli("protect", str(tmp_path / "src"), "--out", str(full), *FAST).exit_code == 0
    assert run_cli("protect", str(tmp_path / "src"), "--out", str(partial), *FAST).exit_code == 0
    # Simulate a run killed after 6 of 10 files: drop the last 4 outputs and their manifest lines.
    lines = (partial / MANIFEST_NAME).read_text().splitlines()
    file_lines = [i for i, line in enumerate(lines) if json.loads(line)["kind"] == "file"]
    for i in file_lines[6:]:
        (partial / json.loads(lines[i])["output"]).unlink()
    (partial / MANIFEST_NAME).write_text("\n".join(lines[: file_lines[6]]) + "\n")
    kept = {p: p.stat().st_mtime_ns for p in partial.rglob("*.png")}
    result = run_cli("protect", str(tmp_path / "src"), "--out", str(partial), *FAST, "--resume")
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished files were not redone
    assert tree_digest(partial)[MANIFEST_NAME] != tree_digest(full)[MANIFEST_NAME]
    strip = lambda d: {k: v for k, v in d.items() if k != MANIFEST_NAME}  # noqa: E731
    assert strip(tree_digest(partial)) == strip(tree_digest(full))  # same outputs, byte for byte
    assert len(file_records(partial / MANIFEST_NAME)) == 10


def test_resume_with_different_settings_is_refused(tmp_path):
    write_class_tree(tmp_path / "src", n_per_class=2, classes=2, size=16)
    assert run_cli("protect", str(tmp_path / "src"), "--out", str(tmp_path / "out"), *FAST).exit_code == 0
    result = CliRunner().invoke(main, ["protect", str(tmp_path / "src"), "--out", str(tmp_path / "out"), *FAST,
                                       "--eps", "4/255", "--resume"])
    assert result.exit_code == 2 and "different settings (eps" in result.output


def test_resume_refuses_a_folder_made_under_other_method_defaults(tmp_path, monkeypatch):
    """A default that changed between two ueguard versions must not mix two kinds of δ in one folder."""
    from ueguard.methods import METHODS

    write_class_tree(tmp_path / "src", n_per_class=2, classes=2, size=16)
    out = tmp_path / "out"
    assert run_cli("protect", str(tmp_path / "src"), "--out", str(out), *FAST).exit_code == 0
    manifest = out / MANIFEST_NAME
    lines = manifest.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["kind"] == "run" and header["defaults_revision"] == 1 and header["method_config"]["eval_limit"] == 10_000

    def resume():
        return CliRunner().invoke(main, ["protect", str(tmp_path / "src"), "--out", str(out), *FAST, "--resume"])

    header["method_config"]["eval_limit"] = 500  # recorded: made with another default
    manifest.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    result = resume()
    assert result.exit_code == 2 and "defaults differ" in result.output and "eval_limit 500 → 10000" in result.output
    assert "pass -o eval_limit=500 to finish it with the constants it began with" in result.output
    result = CliRunner().invoke(main, ["protect", str(tmp_path / "src"), "--out", str(out), *FAST, "--resume",
                                       "-o", "eval_limit=500"])  # as the message says: the constants it began with
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["protect", str(tmp_path / "src"), "--out", str(out), *FAST, "--resume",
                                       "-o", "eval_limit=700"])
    assert result.exit_code == 2 and "made with other method constants (eval_limit 500 → 700)" in result.output
    # a manifest from before method_config was recorded: resolved under its revision's former defaults
    legacy = {k: v for k, v in header.items() if k not in ("method_config", "defaults_revision")}
    manifest.write_text("\n".join([json.dumps(legacy), *lines[1:]]) + "\n")
    assert resume().exit_code == 0  # revision 1 is this code's: nothing changed
    monkeypatch.setattr(METHODS.get("emn"), "defaults_revision", 2)
    monkeypatch.setattr(METHODS.get("emn"), "former_defaults", {1: {"eval_limit": 500}})
    manifest.write_text("\n".join([json.dumps(legacy), *lines[1:]]) + "\n")
    result = resume()
    assert result.exit_code == 2 and "eval_limit 500 → 10000" in result.output
    with pytest.raises(ValueError, match="no defaults revision 3"):
        METHODS.get("emn").config_at(3, "quick")


def test_an_ssc_folder_made_before_defaults_revision_2_resolves_to_plain_ssc():
    """What docs/methods.md (ssc) promises: a folder protected before SSC's deception term became the default (its run
    line has neither method_config nor defaults_revision) resolves to plain SSC, which differs from today's
    default, so --resume refuses it."""
    from ueguard.methods import METHODS
    from ueguard.sdk.options import ProtectOptions
    from ueguard.sdk.protect import changed_constants, recorded_constants

    ssc = METHODS.get("ssc")
    for given, then in (({}, 0.0), ({"deception_weight": 0}, 0.0), ({"deception_weight": 2}, 2.0)):
        header = {"kind": "run", "options": ProtectOptions.resolve(method="ssc", budget="quick",
                                                                    method_options=given).record()}
        assert recorded_constants(header, ssc)["deception_weight"] == then
    legacy = {"kind": "run", "options": ProtectOptions.resolve(method="ssc", budget="quick").record()}
    assert changed_constants(recorded_constants(legacy, ssc), ssc.make_config("quick")) == "deception_weight 0.0 → 1.0"
    assert changed_constants(recorded_constants(legacy, ssc), ssc.make_config("quick", deception_weight=0)) == ""


def test_a_constant_added_since_a_folder_was_made_counts_at_its_default():
    """A folder's record made before an option existed (here SSC's ``shift``) was made as that option's
    default behaves: it matches shift=0 and is not a folder made with shift=8 (a cache that took it for one
    would report an unshifted protection under the shifted variant's name, and --resume would mix the two)."""
    from ueguard.methods import METHODS
    from ueguard.sdk.protect import changed_constants

    ssc = METHODS.get("ssc")
    made = json.loads(json.dumps(dataclasses.asdict(ssc.make_config("quick"))))
    del made["shift"]
    assert changed_constants(made, ssc.make_config("quick")) == ""
    assert changed_constants(made, ssc.make_config("quick", shift=8)) == "shift 0 → 8"


def test_lossy_format_is_warned_about_and_measured(tmp_path):
    write_class_tree(tmp_path / "src", n_per_class=2, classes=2, size=16)
    result = run_cli("protect", str(tmp_path / "src"), "--out", str(tmp_path / "out"), *FAST, "--format", "jpeg",
                     "-o", "max_rounds=1")
    assert result.exit_code == 0 and "warning" in result.output
    records = file_records(tmp_path / "out" / MANIFEST_NAME)
    assert all(r["output"].endswith(".jpg") and r["linf"] is not None for r in records.values())


def test_methods_lists_emn():
    result = run_cli("methods")
    assert result.exit_code == 0 and "error-minimising" in result.output
    listed = [line.split()[0] for line in result.output.splitlines()]
    assert listed == ["ar", "bait", "dune", "emn", "lsp", "ops", "pil", "rem", "sp", "ssc", "tap", "uc"]
    assert "needs pretrained surrogate" in result.output and "label-free" in result.output and "L2 -o l2_eps" in result.output


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("ueguard")
    exe = str(exe) if exe.exists() else shutil.which("ueguard")
    if exe is None:
        if installed_from_this_checkout():
            pytest.fail("ueguard is pip-installed from this checkout but its `ueguard` console script is missing")
        pytest.skip("ueguard is not pip-installed here (no console script)")
    out = subprocess.run([exe, "methods"], capture_output=True, text=True, env={**os.environ}, timeout=120)
    assert out.returncode == 0 and "emn" in out.stdout, out.stderr


def _protect_in_terminal(tmp_path: Path, out: str, *extra: str, tty: bool) -> tuple[int, str]:
    """Run `python -m ueguard protect` in a subprocess whose stderr is a pseudo-terminal (``tty``) or a
    pipe; returns the exit status and everything written to stderr."""
    import fcntl
    import pty
    import struct
    import termios

    options = [o for o in FAST if o != "--quiet"]
    command = [sys.executable, "-m", "ueguard", "protect", str(tmp_path / "src"), "--out", str(tmp_path / out),
               *options, *extra]
    env = {**os.environ, "COLUMNS": "120"}
    if not tty:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        return done.returncode, done.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a real terminal's size
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow  # three protect subprocesses
def test_progress_is_live_on_a_terminal_plain_lines_in_a_pipe_and_quiet_with_quiet(tmp_path):
    """The one progress format (ueguard.engine.progress): stage, step k/N, elapsed and ETA — redrawn in
    place on a terminal, one line at a time without carriage returns in a pipe, nothing with --quiet."""
    write_class_tree(tmp_path / "src", n_per_class=3, classes=2, size=16)
    step = r"protect › \[2/3\] generating perturbations › emn: round \d+/\d+ · \d+:\d\d elapsed · ETA \d+:\d\d"
    status, shown = _protect_in_terminal(tmp_path, "bar", tty=True)
    assert status == 0 and re.search(step, shown) and "\r" in shown, shown
    status, quiet = _protect_in_terminal(tmp_path, "quiet", "--quiet", tty=True)
    assert status == 0 and "ETA" not in quiet, quiet
    status, piped = _protect_in_terminal(tmp_path, "piped", tty=False)
    assert status == 0 and re.search(step, piped) and "\r" not in piped, piped
    assert re.search(r"protect › \[3/3\] saving › image 6/6 · ", piped), piped


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")
def test_device_cuda_without_a_gpu_is_a_usage_error(tmp_path):
    write_class_tree(tmp_path / "src", n_per_class=2, classes=2, size=16)
    options = [o for o in FAST if o not in ("--device", "cpu")]
    result = run_cli("protect", str(tmp_path / "src"), "--out", str(tmp_path / "out"), *options, "--device", "cuda")
    assert result.exit_code == 2 and "cuda" in result.output.lower(), result.output
    assert not (tmp_path / "out").exists()


def test_default_working_size_follows_the_images(tmp_path):
    """No --size: 20-px images are worked on at the next size step (32), and outputs keep their 20 px."""
    write_class_tree(tmp_path / "src", n_per_class=2, classes=2, size=20)
    options = [o for o in FAST if o not in ("--size", "16")]
    result = run_cli("protect", str(tmp_path / "src"), "--out", str(tmp_path / "out"), *options, "-o", "max_rounds=1")
    assert result.exit_code == 0, result.output
    config = next(iter(read_manifest(tmp_path / "out" / MANIFEST_NAME)))
    assert config["size"] == 32, config
    records = file_records(tmp_path / "out" / MANIFEST_NAME)
    assert all(load_image(tmp_path / "out" / r["output"]).pixels.shape[:2] == (20, 20) for r in records.values())


def test_webp_output_is_warned_about_and_measured(tmp_path):
    write_class_tree(tmp_path / "src", n_per_class=2, classes=2, size=16)
    result = run_cli("protect", str(tmp_path / "src"), "--out", str(tmp_path / "out"), *FAST, "--format", "webp",
                     "-o", "max_rounds=1")
    assert result.exit_code == 0 and "warning" in result.output and "webp" in result.output.lower(), result.output
    records = file_records(tmp_path / "out" / MANIFEST_NAME)
    assert all(r["output"].endswith(".webp") and r["linf"] is not None for r in records.values())
    assert all(load_image(tmp_path / "out" / r["output"]).source_format == "WEBP" for r in records.values())


def test_format_keep_warns_only_when_it_writes_a_lossy_file(tmp_path):
    write_class_tree(tmp_path / "src", n_per_class=2, classes=2, size=16)
    args = [*FAST, "--format", "keep", "-o", "max_rounds=1"]
    lossless = run_cli("protect", str(tmp_path / "src"), "--out", str(tmp_path / "out_png"), *args)
    assert lossless.exit_code == 0 and "warning" not in lossless.output, lossless.output
    from PIL import Image

    Image.open(tmp_path / "src" / "class_0" / "img_000.png").convert("RGB").save(
        tmp_path / "src" / "class_0" / "photo.jpg", quality=95)
    mixed = run_cli("protect", str(tmp_path / "src"), "--out", str(tmp_path / "out_mixed"), *args)
    assert mixed.exit_code == 0 and "--format keep wrote 1 file(s)" in mixed.output, mixed.output
    assert (tmp_path / "out_mixed" / "class_0" / "photo.jpg").is_file()
