"""The promises an attacker or an unlucky user tests first: SRC is never written to whatever DST holds (no
write through a link, ever), nothing from which δ can be rebuilt is ever in the published folder, the
output folder is never read back as a source, and the manifest stays valid JSONL after any fault."""

from __future__ import annotations

import errno
import importlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import resume_state
from trees import write_class_tree
from ueguard.cli import main
from ueguard.data import manifest as manifest_mod
from ueguard.data.manifest import MANIFEST_NAME, ManifestWriter, read_manifest
from ueguard.data.safe_fs import LinkError, find_link, open_directory, write_atomically
from ueguard.errors import FatalError, UsageError
from ueguard.sdk import protect

REPO = Path(__file__).resolve().parents[1]
LSP = ["--method", "lsp", "--size", "16", "--device", "cpu", "--quiet"]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links as their target text), so any write into it shows."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(root))] = "link:" + os.readlink(path)
        elif path.is_file():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run(src: Path, out: Path, *extra: str, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("UEGUARD_TEST_KILL", None)
    if kill:
        env["UEGUARD_TEST_KILL"] = kill
    return subprocess.run([sys.executable, "-m", "ueguard", "protect", str(src), "--out", str(out), *LSP, *extra],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def src(tmp_path):
    write_class_tree(tmp_path / "src", n_per_class=3, classes=2, size=16)
    return tmp_path / "src"


# ---- no write through a link


def test_resume_refuses_a_class_folder_replaced_by_a_link_into_src(src, tmp_path):
    out = tmp_path / "out"
    killed = run(src, out, kill="renamed:2")
    assert killed.returncode == -9
    before = tree_digest(src)
    victim = out / "class_0"
    for child in victim.iterdir():
        child.unlink()
    victim.rmdir()
    victim.symlink_to(src / "class_0", target_is_directory=True)
    result = CliRunner().invoke(main, ["protect", str(src), "--out", str(out), *LSP, "--resume"])
    assert result.exit_code == 2, result.output
    assert f"{victim} is a symbolic link" in result.output and "never writes through a link" in result.output
    assert tree_digest(src) == before


def test_resume_refuses_a_manifest_linked_to_a_file_elsewhere(src, tmp_path):
    out = tmp_path / "out"
    assert run(src, out, kill="renamed:2").returncode == -9
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("precious\n")
    (out / MANIFEST_NAME).unlink()
    (out / MANIFEST_NAME).symlink_to(elsewhere)
    result = CliRunner().invoke(main, ["protect", str(src), "--out", str(out), *LSP, "--resume"])
    assert result.exit_code == 2 and "symbolic link" in result.output
    assert elsewhere.read_text() == "precious\n"


def test_resume_refuses_a_manifest_that_is_not_a_regular_file(src, tmp_path):
    """A FIFO in the manifest's place would block the reader forever."""
    out = tmp_path / "out"
    assert run(src, out, kill="renamed:2").returncode == -9
    (out / MANIFEST_NAME).unlink()
    os.mkfifo(out / MANIFEST_NAME)
    refused = run(src, out, "--resume")
    assert refused.returncode == 2 and "is not a regular file" in refused.stderr


def test_a_hard_linked_manifest_is_never_appended_to(tmp_path):
    precious = tmp_path / "precious.jsonl"
    precious.write_text('{"kind": "mine"}\n')
    os.link(precious, tmp_path / "linked.jsonl")
    with pytest.raises(LinkError, match="single name"):
        ManifestWriter(tmp_path / "linked.jsonl")
    assert precious.read_text() == '{"kind": "mine"}\n'


def test_an_output_folder_that_is_a_link_is_refused(src, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real", target_is_directory=True)
    result = CliRunner().invoke(main, ["protect", str(src), "--out", str(tmp_path / "out"), *LSP])
    assert result.exit_code == 2 and "is a symbolic link" in result.output
    assert not any((tmp_path / "real").iterdir())


def test_writes_never_follow_a_link_that_appears_mid_run(tmp_path):
    """The pre-run check can be raced; every write walks DST with O_NOFOLLOW, at any depth."""
    root, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "a" / "b").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(LinkError, match="never writes through a link"):
        write_atomically(root / "a" / "b" / "c" / "x.png", lambda fh: fh.write(b"data"), root=root)
    with pytest.raises(LinkError):
        open_directory(root / "a" / "b", ())
    assert list(elsewhere.iterdir()) == [] and find_link(root) == root / "a" / "b"
    write_atomically(root / "a" / "new" / "x.png", lambda fh: fh.write(b"data"), root=root)
    (root / "a" / "new" / "y.png").symlink_to(elsewhere / "victim.png")
    write_atomically(root / "a" / "new" / "y.png", lambda fh: fh.write(b"mine"), root=root)  # replaces the link
    assert (root / "a" / "new" / "y.png").read_bytes() == b"mine" and not (elsewhere / "victim.png").exists()


def test_a_link_met_while_saving_stops_the_run_and_names_it(src, tmp_path, monkeypatch):
    protect_mod = importlib.import_module("ueguard.sdk.protect")

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    real_save = protect_mod.save_image

    def plant_then_save(path, *args, **kwargs):
        if not (out / "class_1").exists():
            (out / "class_1").symlink_to(elsewhere, target_is_directory=True)
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(protect_mod, "save_image", plant_then_save)
    with pytest.raises(FatalError, match="class_1 is a symbolic link"):
        protect(src, out, "lsp", size=16, device="cpu")
    assert list(elsewhere.iterdir()) == []


# ---- nothing that rebuilds δ in the published folder


@pytest.mark.slow  # protect subprocesses killed and resumed
@pytest.mark.parametrize("kill", ["generating:1", "renamed:3", "before-complete:1"])
def test_a_killed_run_never_leaves_the_perturbation_in_dst(src, tmp_path, kill):
    out = tmp_path / "out"
    killed = run(src, out, kill=kill)
    assert killed.returncode == -9, killed.stderr
    names = {p.relative_to(out).parts[0] for p in out.rglob("*")}
    assert names <= {"class_0", "class_1", MANIFEST_NAME} and not list(out.rglob("*.pt"))
    assert not list(out.rglob(".*"))  # no hidden state, no temporary file (the kill came after a rename)
    finished = run(src, out, "--resume")
    assert finished.returncode == 0, finished.stderr
    records = list(read_manifest(out / MANIFEST_NAME))
    assert records[-1]["kind"] == "complete" and records[-1]["ok"] == 6
    assert not resume_state(out).exists()


def test_resume_removes_the_state_an_older_version_left_in_dst(src, tmp_path):
    out = tmp_path / "out"
    assert run(src, out, kill="renamed:3").returncode == -9
    legacy = out / ".ueguard"
    legacy.mkdir()
    (legacy / "perturbation.pt").write_bytes(b"the exact delta")
    finished = run(src, out, "--resume")
    assert finished.returncode == 0 and not legacy.exists()


def test_the_private_state_is_private_and_refused_inside_dst(src, tmp_path, monkeypatch):
    protect_mod = importlib.import_module("ueguard.sdk.protect")

    seen = {}
    real = protect_mod.state_folder

    def spy(*args, **kwargs):
        seen["folder"] = folder = real(*args, **kwargs)
        seen["mode"] = folder.stat().st_mode & 0o777
        return folder

    monkeypatch.setattr(protect_mod, "state_folder", spy)
    protect(src, tmp_path / "out", "lsp", size=16, device="cpu")
    assert seen["mode"] == 0o700 and not seen["folder"].exists()
    assert tmp_path / "out" not in seen["folder"].parents
    with pytest.raises(UsageError, match="cache folder .* is inside the output folder"):
        protect(src, tmp_path / "out2", "lsp", size=16, device="cpu", cache_dir=str(tmp_path / "out2" / "cache"))


# ---- the output folder is never a source


def test_follow_symlinks_never_reads_the_output_folder(src, tmp_path):
    out = tmp_path / "out"
    first = CliRunner().invoke(main, ["protect", str(src), "--out", str(out), *LSP, "--follow-symlinks"])
    assert first.exit_code == 0, first.output
    (src / "class_0" / "mirror").symlink_to(out, target_is_directory=True)
    (src / "class_1" / "one.png").symlink_to(out / "class_1" / sorted(p.name for p in (out / "class_1").iterdir())[0])
    again = CliRunner().invoke(main, ["protect", str(src), "--out", str(out), *LSP, "--follow-symlinks", "--resume"])
    assert again.exit_code == 0, again.output
    records = {r["source"]: r for r in read_manifest(out / MANIFEST_NAME) if r["kind"] == "file"}
    for link in ("class_0/mirror", "class_1/one.png"):
        assert records[link]["status"] == "skipped" and "inside the output folder" in records[link]["error"]
    assert not any("mirror/" in source for source in records)


def test_an_output_folder_inside_the_source_is_refused_by_identity(src, tmp_path):
    """``--out`` spelt through a link to SRC: another path, the same folder."""
    (tmp_path / "alias").symlink_to(src, target_is_directory=True)
    result = CliRunner().invoke(main, ["protect", str(src), "--out", str(tmp_path / "alias" / "out"), *LSP])
    assert result.exit_code == 2 and "inside the source folder" in result.output
    from ueguard.sdk.protect import _inside

    assert _inside(tmp_path / "alias" / "class_0", src) and not _inside(tmp_path, src)


# ---- the manifest after faults


def test_a_full_disk_while_appending_leaves_whole_records_and_says_resume(tmp_path, monkeypatch):
    path = tmp_path / MANIFEST_NAME
    with ManifestWriter(path) as writer:
        writer.write({"kind": "run", "n": 1})
        real_write = os.write

        def half_then_full(fd, data):
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(manifest_mod.os, "write", half_then_full)
        with pytest.raises(OSError, match=f"{path}.*No space left.*whole record"):
            writer.write({"kind": "file", "source": "x" * 100})
        monkeypatch.undo()
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"kind": "run", "n": 1}]


def test_protect_turns_a_full_disk_on_the_manifest_into_a_fatal_error(src, tmp_path, monkeypatch):
    def full(self, record):
        if record.get("kind") == "file":
            raise manifest_mod.ManifestWriteError(self.path, OSError(errno.ENOSPC, "No space left on device"))
        return real(self, record)

    real = ManifestWriter.write
    monkeypatch.setattr(ManifestWriter, "write", full)
    with pytest.raises(FatalError, match=rf"{MANIFEST_NAME}.*No space left.*--resume"):
        protect(src, tmp_path / "out", "lsp", size=16, device="cpu")


def test_a_torn_last_line_is_cut_off_by_the_next_writer(tmp_path):
    path = tmp_path / MANIFEST_NAME
    path.write_text('{"kind": "run"}\n{"kind": "file", "sour')
    with ManifestWriter(path) as writer:
        writer.write({"kind": "file", "source": "a"})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"kind": "run"},
                                                                          {"kind": "file", "source": "a"}]


def test_an_empty_manifest_left_alone_in_dst_does_not_refuse_the_next_run(src, tmp_path):
    """A run stopped before its first record (the disk filled as it began) left a 0-byte manifest: the
    corrected command, without --resume, proceeds."""
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_NAME).write_bytes(b"")
    result = CliRunner().invoke(main, ["protect", str(src), "--out", str(out), *LSP])
    assert result.exit_code == 0, result.output
    assert next(read_manifest(out / MANIFEST_NAME))["kind"] == "run"


def test_a_busy_output_folder_says_so_rather_than_asking_for_resume(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with ManifestWriter(out / MANIFEST_NAME):
        result = CliRunner().invoke(main, ["protect", str(src), "--out", str(out), *LSP])
    assert result.exit_code == 2 and "another ueguard run is writing to" in result.output
    assert "pass --resume to continue" not in result.output


# ---- listing: twins, hidden files, a changed SRC


def test_a_valid_image_is_kept_when_its_name_twin_is_broken(tmp_path):
    root = tmp_path / "src"
    write_class_tree(root, n_per_class=2, classes=2, size=16)
    (root / "class_0" / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(root / "class_0" / "photo.png")
    result = protect(root, tmp_path / "out", "lsp", size=16, device="cpu")
    records = {r["source"]: r for r in result.items}
    assert records["class_0/photo.png"]["status"] == "ok"
    assert records["class_0/photo.jpg"]["status"] == "failed"
    assert "overwrite" not in records["class_0/photo.jpg"]["error"]


def test_hidden_files_and_folders_are_listed_as_skipped(tmp_path):
    root = tmp_path / "src"
    write_class_tree(root, n_per_class=2, classes=2, size=16)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "class_0" / ".secret.png")
    (root / ".thumbs").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / ".thumbs" / "t.png")
    result = protect(root, tmp_path / "out", "lsp", size=16, device="cpu")
    records = {r["source"]: r for r in result.items}
    assert records["class_0/.secret.png"]["status"] == "skipped" and "hidden file" in records["class_0/.secret.png"]["error"]
    assert records[".thumbs"]["status"] == "skipped" and "hidden folder" in records[".thumbs"]["error"]
    header = next(r for r in read_manifest(tmp_path / "out" / MANIFEST_NAME) if r["kind"] == "run")
    assert header["classes"] == ["class_0", "class_1"] and not (tmp_path / "out" / ".thumbs").exists()


def test_resume_after_src_changed_is_refused_once_files_are_finished(src, tmp_path):
    out = tmp_path / "out"
    assert run(src, out, kill="renamed:3").returncode == -9
    target = sorted((src / "class_1").iterdir())[0]
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(target)
    refused = run(src, out, "--resume")
    assert refused.returncode == 2 and "source folder changed since the run" in refused.stderr


def test_resume_after_src_changed_before_anything_finished_generates_again(src, tmp_path):
    out = tmp_path / "out"
    assert run(src, out, kill="generating:1").returncode == -9
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(src / "class_1" / "new.png")
    finished = run(src, out, "--resume")
    assert finished.returncode == 0, finished.stderr
    assert sum(r["kind"] == "file" and r["status"] == "ok" for r in read_manifest(out / MANIFEST_NAME)) == 7
